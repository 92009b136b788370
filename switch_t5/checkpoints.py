"""Checkpoints (orbax), exact resume, restore onto another mesh, and the MODEL_DIR lock.

A checkpoint `MODEL_DIR/checkpoints/<step>/` holds three items:
  state: the TrainState (params, optimizer state, step, rng) via `StandardSave`, restored onto
    whatever shardings the caller asks for (another mesh shape reshards on read);
  data: the input pipeline position (JSON), so a resumed run sees the same batches;
  meta: the model config and the vocabulary (path and hash), checked on restore.

All file handling for local paths and `gs://` URLs is in this module (`etils.epath`, which orbax
uses too), so the rest of the code never branches on the kind of path.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import json
import logging
import os
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

log = logging.getLogger(__name__)

CHECKPOINT_SUBDIR = "checkpoints"
LOCK_NAME = ".train.lock"


# ---------------------------------------------------------------------------------------------
# File handling (local paths and object-store URLs alike).
# ---------------------------------------------------------------------------------------------


def is_remote(path: str) -> bool:
    """True for object-store URLs (gs://, s3://): no POSIX locks, no local writes."""
    return "://" in str(path)


def path(p: str | os.PathLike, *parts: str) -> epath.Path:
    out = epath.Path(p)
    for part in parts:
        out = out / part
    return out


def makedirs(p: str | os.PathLike) -> None:
    path(p).mkdir(parents=True, exist_ok=True)


def exists(p: str | os.PathLike) -> bool:
    return path(p).exists()


def write_text(p: str | os.PathLike, text: str) -> None:
    path(p).write_text(text)


def read_text(p: str | os.PathLike) -> str:
    return path(p).read_text()


def append_text(p: str | os.PathLike, text: str) -> None:
    """Appends to a local file; on an object store the whole object is rewritten."""
    if is_remote(str(p)):
        old = read_text(p) if exists(p) else ""
        write_text(p, old + text)
    else:
        with open(p, "a") as f:
            f.write(text)


def local_dir_for(p: str) -> str | None:
    """The local directory for things only written locally (None for remote paths)."""
    return None if is_remote(p) else os.fspath(p)


# ---------------------------------------------------------------------------------------------
# The MODEL_DIR lock.
# ---------------------------------------------------------------------------------------------


class ModelDirLockedError(RuntimeError):
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
        if is_remote(self.model_dir):
            log.warning(
                "MODEL_DIR %s is on an object store: no lock prevents two runs from sharing it",
                self.model_dir,
            )
            return self
        import fcntl

        os.makedirs(self.model_dir, exist_ok=True)
        lock_path = os.path.join(self.model_dir, LOCK_NAME)
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


class CheckpointMismatchError(ValueError):
    """The checkpoint was written for another architecture or vocabulary."""


def make_meta(model_config: Any, vocabulary: dict[str, Any] | None = None) -> dict[str, Any]:
    """JSON-able record of the model config (a dataclass) and the vocabulary (path, hash)."""
    cfg = dataclasses.asdict(model_config)
    cfg = json.loads(json.dumps(cfg))  # tuples -> lists, as they come back from JSON
    return {"model_config": cfg, "vocabulary": dict(vocabulary or {})}


def check_meta(saved: dict[str, Any], current: dict[str, Any], where: str) -> None:
    """Raises CheckpointMismatchError naming every field that differs."""
    problems = []
    s_cfg, c_cfg = saved.get("model_config", {}), current.get("model_config", {})
    for key in sorted(set(s_cfg) | set(c_cfg)):
        if s_cfg.get(key) != c_cfg.get(key):
            problems.append(
                f"model_config.{key}: checkpoint {s_cfg.get(key)!r} != now {c_cfg.get(key)!r}"
            )
    s_voc, c_voc = saved.get("vocabulary", {}), current.get("vocabulary", {})
    if s_voc.get("hash") != c_voc.get("hash"):
        problems.append(
            f"vocabulary: checkpoint {s_voc.get('path')!r} (hash {s_voc.get('hash')!r}) != now "
            f"{c_voc.get('path')!r} (hash {c_voc.get('hash')!r})"
        )
    if problems:
        raise CheckpointMismatchError(
            f"the checkpoint in {where} does not match this run: "
            + "; ".join(problems)
            + ". Use the model gin file and vocabulary it was trained with, or a new MODEL_DIR."
        )


# ---------------------------------------------------------------------------------------------
# The checkpoint manager.
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Restored:
    """A restored checkpoint: the state on the requested shardings, data position, meta."""

    step: int
    state: Any
    data_state: Any
    meta: dict[str, Any]


class Checkpointer:
    """orbax `CheckpointManager` with (state, data, meta) items, async saves, keep last K."""

    def __init__(self, model_dir: str, max_to_keep: int | None = 3, async_save: bool = True):
        self.directory = path(model_dir, CHECKPOINT_SUBDIR)
        options = ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep,
            enable_async_checkpointing=async_save,
            create=True,
            # Partial saves of an interrupted run are removed at start, never restored.
            cleanup_tmp_directories=True,
        )
        self._manager = ocp.CheckpointManager(
            self.directory, options=options, item_names=("state", "data", "meta")
        )

    def latest_step(self) -> int | None:
        """The newest COMPLETE checkpoint (orbax commits a step atomically when it is done)."""
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self._manager.all_steps())

    def save(self, step: int, state: Any, data_state: Any, meta: dict[str, Any]) -> bool:
        """Starts an (async) save; the arrays are copied before this returns."""
        return self._manager.save(
            int(step),
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state),
                data=ocp.args.JsonSave(data_state if data_state is not None else {}),
                meta=ocp.args.JsonSave(meta),
            ),
            force=True,
        )

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
        """
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no complete checkpoint under {self.directory}")
        meta = self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))[
            "meta"
        ]
        if expected_meta is not None:
            check_meta(meta, expected_meta, f"{self.directory}/{step}")
        out = self._manager.restore(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore()
            ),
        )
        return Restored(step=step, state=out["state"], data_state=out["data"], meta=meta)

    def wait(self) -> None:
        self._manager.wait_until_finished()

    def reached_preemption(self, step: int) -> bool:
        return self._manager.reached_preemption(step)

    def close(self) -> None:
        self._manager.wait_until_finished()
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
