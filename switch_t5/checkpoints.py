"""Checkpoints (orbax), exact resume, restore onto another mesh, and the MODEL_DIR lock.

A checkpoint `MODEL_DIR/checkpoints/<step>/` holds three items:
  state: the TrainState (params, optimizer state, step, rng) via `StandardSave`, restored onto
    whatever shardings the caller asks for (another mesh shape reshards on read);
  data: the input pipeline position (JSON), so a resumed run sees the same batches;
  meta: the model config and the vocabulary (path and hash), checked on restore.

Nothing damaged is ever restored, and nothing is silently skipped:
  - orbax writes a step into `<step>.orbax-checkpoint-tmp*` and renames it when complete, so a
    process killed mid-write leaves a temporary directory, never a step directory. Such leftovers
    are moved aside at start (with a warning) into `MODEL_DIR/checkpoints_quarantine/`.
  - `restore_latest` tries the newest step first; a step whose files cannot be read (truncated or
    deleted array files, a half-copied directory, a checksum mismatch) is moved aside to
    `checkpoints_quarantine/<step>.damaged-<time>` with a warning naming it, so a later save of
    that step is not refused by orbax, and the previous step is tried. With checkpoints present
    and none readable it raises `CheckpointCorruptError`; it never starts from scratch over them.
  - A checkpoint of another architecture (meta or array shapes) is a configuration error
    (`CheckpointMismatchError`): nothing is moved. Settings that leave the arrays' names and
    shapes alone (`RUNTIME_FIELDS`: compute and param dtypes, remat, dispatch, capacity, dropout)
    may change on resume; arrays are cast to the dtypes the run asks for (float32 <-> bfloat16
    params and optimizer state).
  - Bit flips inside array data pass every structural check; the optional per-checkpoint SHA-256
    checksums (`checksums=True`, off by default: they re-read every file after each save) catch
    them.
  - A failed write (e.g. no space left) raises `CheckpointSaveError` naming the step; earlier
    checkpoints are untouched (orbax deletes old steps only after a successful save).

Paths go through `fileio` (local and `gs://` alike) and the folder layout is `run_dir`'s.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import hashlib
import json
import logging
import os
import time
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from switch_t5 import errors, faults, fileio, run_dir

log = logging.getLogger(__name__)

CHECKSUM_FILE = "switch_t5_checksums.json"
# orbax's suffix of a step directory still being written (`atomicity_types.TMP_DIR_SUFFIX`).
ORBAX_TMP_SUFFIX = ".orbax-checkpoint-tmp"
DAMAGED_TAG = ".damaged-"


class ModelDirIsFileError(errors.UserError):
    """MODEL_DIR (or a folder above it) exists as a regular file."""


def check_model_dir(
    model_dir: str | os.PathLike,
    name: str = "MODEL_DIR",
    fix: str = "give a folder: a new path starts a new run, an existing run's folder resumes it",
) -> None:
    """Raises ModelDirIsFileError when `model_dir`, or the nearest existing path above it, is a
    file: nothing could be written there (train) or read from it (eval, infer). Object stores
    have no such conflict and are not checked."""
    if fileio.is_remote(str(model_dir)):
        return
    p = fileio.path(model_dir)
    for candidate in (p, *p.parents):
        if not candidate.exists():
            continue
        if candidate.is_dir():
            return
        where = "is a file" if candidate == p else f"is inside {candidate}, which is a file"
        raise ModelDirIsFileError(f"{name} {model_dir} {where}, not a folder; {fix}")


# ---------------------------------------------------------------------------------------------
# The MODEL_DIR lock.
# ---------------------------------------------------------------------------------------------


class ModelDirLockedError(errors.UserError, RuntimeError):
    """Another process is training in the same MODEL_DIR."""


class ModelDirLock:
    """An exclusive `flock` on MODEL_DIR/.train.lock, held by process 0 while it trains.

    The kernel drops an flock when its process dies (even by SIGKILL), so a restart after a crash
    is never refused. On object stores (gs://) there is no such lock: nothing prevents two runs
    from writing the same MODEL_DIR there, so a warning is logged and the caller must ensure one
    run per directory (e.g. one job per MODEL_DIR in the scheduler).
    """

    def __init__(self, model_dir: str):
        self.model_dir = str(model_dir)
        self._fd: int | None = None

    def acquire(self) -> ModelDirLock:
        if fileio.is_remote(self.model_dir):
            log.warning(
                "MODEL_DIR %s is on an object store: no lock prevents two runs from sharing it",
                self.model_dir,
            )
            return self
        import fcntl

        os.makedirs(self.model_dir, exist_ok=True)
        lock_path = run_dir.RunDir(self.model_dir).lock_file
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            holder = ""
            with contextlib.suppress(OSError):
                holder = os.pread(fd, 100, 0).decode().strip()
            os.close(fd)
            if e.errno in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                raise ModelDirLockedError(
                    f"MODEL_DIR {self.model_dir} is in use by another training run "
                    f"({holder or 'unknown process'}); wait for it to finish, stop it, or choose "
                    "another --gin.MODEL_DIR"
                ) from e
            raise
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()}\n".encode(), 0)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            import fcntl

            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> ModelDirLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


# ---------------------------------------------------------------------------------------------
# What a checkpoint records about the model and its vocabulary.
# ---------------------------------------------------------------------------------------------


class CheckpointMismatchError(errors.UserError):
    """The checkpoint was written for another architecture or vocabulary."""


def make_meta(
    model_config: Any,
    vocabulary: dict[str, Any] | None = None,
    feature_lengths: dict[str, int] | None = None,
    task: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """JSON-able record of the model config (a dataclass), the vocabulary (path, hash), the
    training feature lengths ({"inputs": N, "targets": M}; infer truncates inputs to N) and the
    task ({"name": MIXTURE_OR_TASK_NAME, "data": {macro: value}}, the data macros the run set;
    `eval` reuses them). What is not known (a converted checkpoint's task) is left absent."""
    cfg = dataclasses.asdict(model_config)
    cfg = json.loads(json.dumps(cfg))  # tuples -> lists, as they come back from JSON
    meta = {"model_config": cfg, "vocabulary": dict(vocabulary or {})}
    if feature_lengths is not None:
        meta["feature_lengths"] = {k: int(v) for k, v in feature_lengths.items()}
    if task is not None:
        meta["task"] = {
            "name": str(task["name"]),
            "data": json.loads(json.dumps(dict(task.get("data") or {}), default=str)),
        }
    return meta


def recorded_task(meta: dict[str, Any]) -> dict[str, Any] | None:
    """The task a checkpoint was trained on, {"name": str, "data": {macro: value}}; None when
    the meta does not record one (checkpoints written before it did, converted checkpoints)."""
    task = meta.get("task")
    if not isinstance(task, dict) or not task.get("name"):
        return None
    return {"name": str(task["name"]), "data": dict(task.get("data") or {})}


def recorded_feature_lengths(meta: dict[str, Any], step_dir: str | os.PathLike) -> dict | None:
    """The feature lengths a checkpoint was trained with: its meta's, else (checkpoints written
    before the meta held them) its data item's pipeline settings; None when neither has them
    (e.g. a checkpoint imported from Hugging Face)."""
    if meta.get("feature_lengths"):
        return {k: int(v) for k, v in meta["feature_lengths"].items()}
    data = fileio.path(step_dir, "data", "metadata")
    try:
        lengths = json.loads(data.read_text())["config"]["feature_lengths"]
        return {k: int(v) for k, v in lengths.items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None


# SwitchConfig fields that may change when a run resumes: they change neither the names nor the
# shapes of the stored arrays, only how the step computes (dtypes, rematerialisation, dispatch,
# capacity, regularisation). `param_dtype` is cast on restore. Every other field (layer and
# expert counts, sizes, routing type, layout) must match.
RUNTIME_FIELDS = frozenset(
    {
        "dtype",
        "param_dtype",
        "moe_dtype",
        "remat_policy",
        "fsdp",
        "dispatch",
        "train_capacity_factor",
        "eval_capacity_factor",
        "min_expert_capacity",
        "capacity_scales_with_k",
        "group_size",
        "decoder_group_size",
        "max_group_size",
        "routing_groups",
        "expert_capacity",
        "dropout_rate",
        "expert_dropout_rate",
        "router_jitter_noise",
        "load_balancing_loss_weight",
        "router_z_loss_weight",
        # Auxiliary-loss-free balancing may start on resume (the biases start at 0); stopping
        # it is refused by the array check (the checkpoint's biases would be dropped).
        "router_bias_update_rate",
        "sequence_balance_loss_weight",
        "init_scale",
        "router_init_stddev",
    }
)


def _default_model_config() -> dict[str, Any]:
    """The JSON form of every SwitchConfig field's default (as `make_meta` records fields)."""
    from switch_t5.config import SwitchConfig

    fields = {
        f.name: f.default
        for f in dataclasses.fields(SwitchConfig)
        if f.default is not dataclasses.MISSING
    }
    return json.loads(json.dumps(fields))


def with_default_fields(model_config: dict[str, Any], keys: Any = None) -> dict[str, Any]:
    """A meta's recorded model_config with the default of each SwitchConfig field it lacks (of
    `keys`, default all): a field the checkpoint's version of SwitchConfig did not have yet
    takes its default."""
    defaults = _default_model_config()
    return {**{k: v for k, v in defaults.items() if keys is None or k in keys}, **model_config}


def check_meta(saved: dict[str, Any], current: dict[str, Any], where: str) -> None:
    """Raises CheckpointMismatchError naming every architecture field that differs.

    Fields in `RUNTIME_FIELDS` may differ (logged): a run can resume with bfloat16 params or
    another remat policy, capacity factor or dispatch. A different `scan_layers` is refused with
    the way to convert (fine-tuning from the checkpoint converts the layout on load).
    """
    problems, changed = [], []
    s_cfg, c_cfg = saved.get("model_config", {}), current.get("model_config", {})
    # A field the checkpoint's version of SwitchConfig did not have yet takes its default.
    if s_cfg:
        s_cfg = with_default_fields(s_cfg, c_cfg)
    for key in sorted(set(s_cfg) | set(c_cfg)):
        if s_cfg.get(key) == c_cfg.get(key):
            continue
        line = f"model_config.{key}: checkpoint {s_cfg.get(key)!r} != now {c_cfg.get(key)!r}"
        (changed if key in RUNTIME_FIELDS else problems).append(line)
    s_voc, c_voc = saved.get("vocabulary", {}), current.get("vocabulary", {})
    if s_voc.get("hash") != c_voc.get("hash"):
        problems.append(
            f"vocabulary: checkpoint {s_voc.get('path')!r} (hash {s_voc.get('hash')!r}) != now "
            f"{c_voc.get('path')!r} (hash {c_voc.get('hash')!r})"
        )
    if problems:
        fix = "Use the model gin file and vocabulary it was trained with, or a new MODEL_DIR."
        if s_cfg.get("scan_layers") != c_cfg.get("scan_layers"):
            fix += (
                " To change the layer layout (scan_layers), start a new MODEL_DIR with "
                f"INITIAL_CHECKPOINT_PATH={where!r}: the params are converted on load (the "
                "optimizer state starts fresh)."
            )
        raise CheckpointMismatchError(
            f"the checkpoint in {where} does not match this run: "
            + "; ".join(problems)
            + ". "
            + fix
        )
    if changed:
        log.warning("resuming %s with changed settings: %s", where, "; ".join(changed))


# ---------------------------------------------------------------------------------------------
# The checkpoint manager.
# ---------------------------------------------------------------------------------------------


class CheckpointCorruptError(errors.UserError, RuntimeError):
    """Checkpoints exist but none can be read (each was moved to the quarantine folder)."""


class CheckpointSaveError(errors.UserError, RuntimeError):
    """Writing a checkpoint failed (e.g. no space left); the earlier ones are intact."""


class _DamagedError(Exception):
    """Internal: this step's files cannot be read (the reason is the message)."""


@dataclasses.dataclass
class Restored:
    """A restored checkpoint: the state on the requested shardings, data position, meta."""

    step: int
    state: Any
    data_state: Any
    meta: dict[str, Any]


def _without_missing_bias(abstract_state: Any, saved_tree: Any) -> tuple[Any, Any]:
    """A checkpoint written without choice biases (auxiliary-loss-free balancing off, or before
    it existed) restores into a state that has them with every bias 0: (the abstract state to
    read, state -> state with the biases filled in)."""
    wanted = getattr(abstract_state, "router_bias", None)
    if wanted is None or not isinstance(saved_tree, dict) or "router_bias" in saved_tree:
        return abstract_state, lambda state: state
    log.info("the checkpoint has no router biases: they start at 0")

    def fill(state):
        zeros = jax.tree.map(
            lambda a: jax.device_put(np.zeros(a.shape, a.dtype), a.sharding), wanted
        )
        return state.replace(router_bias=zeros)

    return abstract_state.replace(router_bias=None), fill


def _key_name(key: Any) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(key, attr):
            return str(getattr(key, attr))
    return str(key)


def _array_signature(tree: Any) -> dict[str, tuple[tuple[int, ...], str]]:
    """{dotted path (orbax's array names): (shape, dtype)} of a tree of arrays or metadata."""
    out = {}
    for key_path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        name = getattr(leaf, "name", None) or ".".join(_key_name(k) for k in key_path)
        out[name] = (tuple(leaf.shape), str(np.dtype(leaf.dtype)))
    return out


def _sha256(p: epath.Path) -> str:
    digest = hashlib.sha256()
    with p.open("rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _files_under(root: epath.Path) -> list[epath.Path]:
    """Every file below `root` (epath has no recursive glob on object stores: walk by hand)."""
    out, todo = [], [root]
    while todo:
        for p in todo.pop().iterdir():
            if p.is_dir():
                todo.append(p)
            elif p.name != CHECKSUM_FILE:
                out.append(p)
    return sorted(out)


class Checkpointer:
    """orbax `CheckpointManager` with (state, data, meta) items, async saves, keep last K.

    Args:
      model_dir: MODEL_DIR; checkpoints go to MODEL_DIR/checkpoints/<step>/.
      max_to_keep: keep the last K complete checkpoints (None = all).
      async_save: write in a background thread (the arrays are copied first).
      checksums: after each save, record the SHA-256 of every file of the step in
        `<step>/switch_t5_checksums.json`; restores verify any step that has one (whatever this
        flag). Off by default: it re-reads each checkpoint once after writing it.
    """

    def __init__(
        self,
        model_dir: str,
        max_to_keep: int | None = 3,
        async_save: bool = True,
        checksums: bool = False,
    ):
        faults.install_checkpoint_write_hook()
        self.model_dir = str(model_dir)
        self.directory = run_dir.RunDir(model_dir).checkpoints
        self.quarantine_dir = run_dir.RunDir(model_dir).quarantine
        self.checksums = checksums
        self.quarantined: list[str] = []
        self._pending_checksums: list[int] = []
        self._in_flight: int | None = None
        self._save_failed = False
        # Before orbax deletes them (cleanup_tmp_directories), half-written steps are moved aside.
        if self.directory.exists():
            for leftover in sorted(self.directory.glob(f"*{ORBAX_TMP_SUFFIX}*")):
                self._move_aside(
                    leftover,
                    leftover.name,
                    "a checkpoint whose write never finished (the process died before its commit)",
                )
        options = ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep,
            enable_async_checkpointing=async_save,
            create=True,
            # Partial saves of an interrupted run are never restored (moved aside above).
            cleanup_tmp_directories=True,
        )
        # Handlers named up front: `item_metadata` (the shape check before reading arrays) then
        # works in a fresh process, before anything was saved or restored.
        self._manager = ocp.CheckpointManager(
            self.directory,
            options=options,
            item_handlers={
                "state": ocp.StandardCheckpointHandler(),
                "data": ocp.JsonCheckpointHandler(),
                "meta": ocp.JsonCheckpointHandler(),
            },
        )

    def latest_step(self) -> int | None:
        """The newest COMPLETE checkpoint (orbax commits a step atomically when it is done)."""
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self._manager.all_steps())

    def step_dir(self, step: int) -> epath.Path:
        return self.directory / str(int(step))

    # -- saving -----------------------------------------------------------------------------

    def _save_error(self, step: int | None, e: BaseException) -> CheckpointSaveError:
        self._save_failed = True
        with contextlib.suppress(Exception):
            self._manager.reload()
        kept = []
        with contextlib.suppress(Exception):
            kept = self.all_steps()
        hint = ""
        text = repr(e)
        if any(k in text for k in ("ENOSPC", "No space", "EFBIG", "File too large", "Quota")):
            hint = " The file system is full (or a file-size/quota limit was hit): free space."
        return CheckpointSaveError(
            f"writing checkpoint {step} to {self.directory} failed: {text[:800]}.{hint} "
            f"The complete checkpoints {kept} are intact; fix the cause and rerun the same "
            f"command: it resumes from checkpoint {kept[-1] if kept else 'none (from scratch)'}."
        )

    def save(self, step: int, state: Any, data_state: Any, meta: dict[str, Any]) -> bool:
        """Starts an (async) save; the arrays are copied before this returns.

        Raises:
          CheckpointSaveError: this save or the previous (async) one failed.
        """
        step = int(step)
        if self._pending_checksums or faults.fires("no_space", step):
            # The previous step must be complete before it is hashed (or the disk "fills").
            self.wait()
        faults.maybe_limit_file_size(step)
        previous, self._in_flight = self._in_flight, step
        try:
            saved = self._manager.save(
                step,
                args=ocp.args.Composite(
                    state=ocp.args.StandardSave(state),
                    data=ocp.args.JsonSave(data_state if data_state is not None else {}),
                    meta=ocp.args.JsonSave(meta),
                ),
                force=True,
            )
        except Exception as e:
            # orbax first waits for the previous async save: its error surfaces here too.
            raise self._save_error(f"{previous} or {step}" if previous else step, e) from e
        if saved and self.checksums:
            self._pending_checksums.append(step)
        if faults.fires("after_save", step):
            self.wait()
            faults.kill("after_save", step, f"SIGKILL after commit of {self.step_dir(step)}")
        return saved

    def wait(self) -> None:
        """Blocks until the (async) save is committed; then writes pending checksums.

        Raises:
          CheckpointSaveError: the save failed.
        """
        try:
            self._manager.wait_until_finished()
        except Exception as e:
            raise self._save_error(self._in_flight, e) from e
        pending, self._pending_checksums = self._pending_checksums, []
        for step in pending:
            if self.step_dir(step).exists():
                self.write_checksums(step)

    def write_checksums(self, step: int) -> dict[str, str]:
        """Hashes every file of a committed step into `<step>/switch_t5_checksums.json`."""
        root = self.step_dir(step)
        sums = {str(p.relative_to(root)): _sha256(p) for p in _files_under(root)}
        if jax.process_index() == 0:
            (root / CHECKSUM_FILE).write_text(json.dumps(sums, indent=0, sort_keys=True))
        return sums

    def verify_checksums(self, step: int) -> bool | None:
        """None without a checksum file, True when every file matches; else _DamagedError."""
        root = self.step_dir(step)
        sums_path = root / CHECKSUM_FILE
        if not sums_path.exists():
            return None
        try:
            sums = json.loads(sums_path.read_text())
        except (OSError, ValueError) as e:
            raise _DamagedError(f"unreadable {CHECKSUM_FILE}: {e}") from e
        for rel, want in sums.items():
            p = root / rel
            if not p.exists():
                raise _DamagedError(f"file {rel} is missing")
            if _sha256(p) != want:
                raise _DamagedError(f"file {rel} does not match its SHA-256 checksum")
        return True

    # -- restoring --------------------------------------------------------------------------

    def _restore_step(
        self, abstract_state: Any, step: int, expected_meta: dict[str, Any] | None
    ) -> Restored:
        """Restores one step; _DamagedError for unreadable files, CheckpointMismatchError for a
        checkpoint of another model (checked on meta and array shapes before reading arrays)."""
        where = str(self.step_dir(step))
        self.verify_checksums(step)
        try:
            meta = self._manager.restore(
                step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())
            )["meta"]
        except Exception as e:
            raise _DamagedError(f"meta unreadable: {str(e)[:300]}") from e
        if not isinstance(meta, dict):
            raise _DamagedError(f"meta is {type(meta).__name__}, not a JSON object")
        if expected_meta is not None:
            check_meta(meta, expected_meta, where)
        try:
            saved_tree = self._manager.item_metadata(step)["state"]
            saved_tree = getattr(saved_tree, "tree", saved_tree)
            saved = _array_signature(saved_tree)
        except Exception as e:
            raise _DamagedError(f"state metadata unreadable: {str(e)[:300]}") from e
        if not saved:
            raise _DamagedError("state metadata lists no arrays")
        abstract_state, fill = _without_missing_bias(abstract_state, saved_tree)
        wanted = _array_signature(abstract_state)
        # Shapes must match; dtypes may differ (bfloat16 <-> float32 params or optimizer state):
        # orbax casts each array to the dtype `abstract_state` asks for while reading it.
        saved_shapes = {k: shape for k, (shape, _) in saved.items()}
        wanted_shapes = {k: shape for k, (shape, _) in wanted.items()}
        if saved_shapes != wanted_shapes:
            diffs = [
                f"{k}: checkpoint {saved.get(k)} != now {wanted.get(k)}"
                for k in sorted(set(saved) | set(wanted))
                if saved_shapes.get(k) != wanted_shapes.get(k)
            ]
            raise CheckpointMismatchError(
                f"the checkpoint in {where} holds other arrays than this run's train state "
                f"({len(diffs)} differ: {'; '.join(diffs[:5])}). Use the model and optimizer "
                "settings it was trained with, or a new MODEL_DIR."
            )
        casts = sorted({f"{saved[k][1]} -> {wanted[k][1]}" for k in saved if saved[k] != wanted[k]})
        if casts:
            log.warning("restoring %s with dtype casts: %s", where, ", ".join(casts))
        try:
            out = self._manager.restore(
                step,
                args=ocp.args.Composite(
                    state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore()
                ),
            )
        except Exception as e:
            raise _DamagedError(f"arrays unreadable: {str(e)[:400]}") from e
        return Restored(step=step, state=fill(out["state"]), data_state=out["data"], meta=meta)

    def restore(
        self,
        abstract_state: Any,
        step: int | None = None,
        expected_meta: dict[str, Any] | None = None,
    ) -> Restored:
        """Restores `step` (default latest) onto the shardings carried by `abstract_state`.

        Args:
          abstract_state: a tree of `jax.ShapeDtypeStruct` with `sharding=` set; a different mesh
            than the one that saved is fine (orbax reshards on read).
          step: the step to restore; None = latest.
          expected_meta: checked against the saved meta before reading the arrays.

        Raises:
          FileNotFoundError: no checkpoint in the directory.
          CheckpointMismatchError: another architecture or vocabulary.
          CheckpointCorruptError: the step's files cannot be read (nothing is moved; see
            `restore_latest` for the resuming path).
        """
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no complete checkpoint under {self.directory}")
        try:
            return self._restore_step(abstract_state, step, expected_meta)
        except _DamagedError as e:
            raise CheckpointCorruptError(f"checkpoint {self.step_dir(step)} is damaged: {e}") from e

    def restore_latest(
        self, abstract_state: Any, expected_meta: dict[str, Any] | None = None
    ) -> Restored | None:
        """Resumes: the newest readable checkpoint, moving damaged newer ones aside.

        Returns:
          The restored checkpoint, or None when the directory never held a complete one.

        Raises:
          CheckpointCorruptError: checkpoints exist (or were quarantined) but none is readable.
          CheckpointMismatchError: the newest checkpoint belongs to another model (nothing is
            moved: that is a configuration error, not damage).
        """
        steps = sorted(self.all_steps(), reverse=True)
        for step in steps:
            try:
                restored = self._restore_step(abstract_state, step, expected_meta)
            except _DamagedError as e:
                self._move_aside(
                    self.step_dir(step), f"{step}{DAMAGED_TAG}{time.strftime('%Y%m%dT%H%M%S')}", e
                )
                self._manager.reload()
                continue
            faults.maybe_kill("after_restore", step)
            return restored
        damaged = []
        if self.quarantine_dir.exists():
            damaged = sorted(p.name for p in self.quarantine_dir.iterdir() if DAMAGED_TAG in p.name)
        if steps or damaged:
            raise CheckpointCorruptError(
                f"no readable checkpoint under {self.directory}: the damaged ones were moved to "
                f"{self.quarantine_dir} ({', '.join(damaged)}). Refusing to start from scratch "
                "over them: put back an intact copy, or delete the quarantine folder (or use a "
                "new MODEL_DIR) to train from scratch on purpose."
            )
        return None

    def _move_aside(self, src: epath.Path, name: str, reason: Any) -> None:
        dest = self.quarantine_dir / name
        n = 1
        while dest.exists():  # the same step may be left half-written more than once
            dest, n = self.quarantine_dir / f"{name}.{n}", n + 1
        log.warning(
            "checkpoint %s is not usable (%s); moved to %s. It is never restored; delete it "
            "when it is no longer needed.",
            src,
            reason,
            dest,
        )
        if jax.process_index() == 0:
            self.quarantine_dir.mkdir(parents=True, exist_ok=True)
            src.rename(dest)
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices(f"switch_t5 quarantine {name}")
        self.quarantined.append(str(dest))

    def reached_preemption(self, step: int) -> bool:
        return self._manager.reached_preemption(step)

    def close(self) -> None:
        """Waits for the last save and closes; after a failed save only closes (the error was
        already raised)."""
        if self._save_failed:
            with contextlib.suppress(Exception):
                self._manager.close()
            return
        self.wait()
        self._manager.close()


def all_finite(tree: Any) -> bool:
    """True when every floating leaf of `tree` is finite (checked before saving)."""
    for x in jax.tree.leaves(tree):
        if jax.numpy.issubdtype(x.dtype, jax.numpy.floating) and not bool(
            jax.numpy.all(jax.numpy.isfinite(x))
        ):
            return False
    return True


def tree_equal(a: Any, b: Any) -> bool:
    """Bitwise equality of two trees of arrays (for tests and checks)."""
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    return len(la) == len(lb) and all(
        np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(la, lb)
    )
