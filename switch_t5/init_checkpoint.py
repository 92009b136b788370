"""Initial parameters for fine-tuning: read a checkpoint's params onto this run's shardings.

T5X's `RestoreCheckpointConfig(mode="specific")` controls, for this project's checkpoint layout
(`switch_t5.checkpoints`; converted checkpoints of `switch_t5.interop` share it):

- `path`: a MODEL_DIR (its latest complete step, or `step`), its `checkpoints/` folder, or one
  step's folder `.../checkpoints/N`.
- `strict=True`: every parameter of the model must come from the checkpoint (except those an
  assignment-map rule maps to None). `strict=False`: parameters the checkpoint lacks keep their
  fresh initialisation (e.g. a model with more layers than the checkpoint).
- `assignment_map`: `((target_regex, source_or_None), ...)`, the first rule whose regex fully
  matches a parameter name (`encoder/layers_0/attention/query/kernel`) applies: the parameter is
  read from `match.expand(source)` (backreferences allowed), or kept fresh when the source is
  None. Parameters no rule matches are read under their own name.
- `fallback_to_scratch=True`: when the path holds no checkpoint at all, start from scratch (with
  a warning) instead of failing.

Only the parameters are read (orbax partial restore, each array straight onto its sharding);
the optimizer state is always fresh and the step starts at 0: fine-tuning is a new run whose
`TRAIN_STEPS` counts fine-tuning steps only (unlike T5X, which continues the pretraining step
count).

A parameter whose shape differs from the checkpoint's is always an error, naming the first one
(sorted by name) and both shapes, since it means the model config is not the checkpoint's.

Layer layouts and dtypes convert on load. A checkpoint of the scanned layout
(`{encoder,decoder}/layers/subblock_{j}/...` with a leading blocks axis, `SwitchConfig.scan_layers`)
loads into an unscanned model and vice versa: names and assignment-map rules are those of the
model's layout, and each array is read whole-layer-stack onto the matching sharding, then sliced
or stacked on device (see `switch_t5.scan_utils` for the layout). Arrays are cast to the model's
`param_dtype` (e.g. the released bfloat16 Switch-XXL/C weights into float32 params).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import re
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath
from jax.sharding import NamedSharding, PartitionSpec

from switch_t5 import errors, partitioning, run_dir, train_state

log = logging.getLogger(__name__)

AssignmentMap = Sequence[tuple[str, str | None]]


class InitialCheckpointError(errors.UserError):
    """The initial checkpoint is missing, unreadable, or does not fit the model."""


class ArchitectureMismatchError(InitialCheckpointError):
    """A parameter's shape differs from the checkpoint's (or strict restore lacks one)."""


@dataclasses.dataclass(frozen=True)
class InitialCheckpoint:
    """Where a fine-tuning run's params come from (T5X's `RestoreCheckpointConfig`).

    Gin-configurable as `switch_t5.InitialCheckpoint` (configs/runs/finetune.gin).

    Attributes:
      path: INITIAL_CHECKPOINT_PATH: a MODEL_DIR, its checkpoints/ folder or one step's folder
        (converted checkpoints included).
      step: the step to read; None = latest (or the one `path` names).
      strict: every model param must come from the checkpoint (module docstring).
      assignment_map: ((target_regex, source_or_None), ...) (module docstring).
      fallback_to_scratch: start from scratch when `path` holds no checkpoint.
    """

    path: str
    step: int | None = None
    strict: bool = True
    assignment_map: tuple[tuple[str, str | None], ...] = ()
    fallback_to_scratch: bool = False

    def __post_init__(self):
        if not isinstance(self.path, str) or not self.path:
            raise InitialCheckpointError(
                f"InitialCheckpoint.path={self.path!r}: set INITIAL_CHECKPOINT_PATH to a "
                "MODEL_DIR or one step's checkpoint folder"
            )
        _compile_map(self.assignment_map)


@dataclasses.dataclass(frozen=True)
class CheckpointRef:
    """One step of a checkpoint on disk.

    Attributes:
      step_dir: `.../checkpoints/N`.
      step: N.
      meta: the checkpoint's meta item (model config, vocabulary).
    """

    step_dir: epath.Path
    step: int
    meta: dict[str, Any]


@dataclasses.dataclass
class LoadedParams:
    """What `load_initial_params` read.

    Attributes:
      params: the params tree (unboxed), on the shardings of the abstract tree; None when
        `fallback_to_scratch` found no checkpoint (after `initial_train_state`: the state's
        params).
      source: the checkpoint read (None when falling back to scratch).
      restored: {target name: source name} of the params read from the checkpoint.
      fresh: names of the params left to their fresh initialisation.
      unused: checkpoint params no model param reads.
    """

    params: Any
    source: CheckpointRef | None
    restored: dict[str, str]
    fresh: list[str]
    unused: list[str]


def _is_step_dir(p: epath.Path) -> bool:
    return (p / "state").is_dir() and (p / "meta").is_dir()


def _complete_steps(root: epath.Path) -> list[int]:
    # orbax writes a step into a temporary name and renames it when complete: digits only.
    if not root.is_dir():
        return []
    return sorted(int(d.name) for d in root.iterdir() if d.name.isdigit() and _is_step_dir(d))


def find_checkpoint(path: str, step: int | None = None) -> CheckpointRef | None:
    """The checkpoint step `path` names, or None when `path` holds no checkpoint at all.

    Args:
      path: MODEL_DIR, MODEL_DIR/checkpoints, or MODEL_DIR/checkpoints/N.
      step: the step to read; None = the one `path` names, else the latest complete step.

    Raises:
      InitialCheckpointError: `step` is not among the complete steps, or `path` is one step's
        folder of another step.
    """

    p = epath.Path(path)
    if _is_step_dir(p):
        if not p.name.isdigit():
            raise InitialCheckpointError(
                f"{path} looks like a checkpoint step but its name is not the step number"
            )
        if step is not None and step != int(p.name):
            raise InitialCheckpointError(
                f"{path} is the checkpoint of step {p.name} but step={step} was asked for; give "
                "the MODEL_DIR to choose a step, or drop the step"
            )
        step_dir = p
    else:
        root = p / run_dir.CHECKPOINTS if (p / run_dir.CHECKPOINTS).is_dir() else p
        steps = _complete_steps(root)
        if not steps:
            return None
        if step is None:
            step = steps[-1]
        if step not in steps:
            raise InitialCheckpointError(
                f"no complete checkpoint of step {step} under {root}; complete steps there: {steps}"
            )
        step_dir = root / str(step)
    meta_file = step_dir / "meta" / "metadata"
    meta = json.loads(meta_file.read_text()) if meta_file.exists() else {}
    return CheckpointRef(step_dir=step_dir, step=int(step_dir.name), meta=meta)


def recorded_vocabulary_path(ref: CheckpointRef) -> str | None:
    """The vocabulary file the checkpoint's meta records, or None (e.g. T5X imports).

    Raises:
      InitialCheckpointError: a recorded file that cannot be read or is not a vocabulary (names
        it, and VOCABULARY_PATH as the way to give a copy).
    """
    from switch_t5.data import vocab as vocab_lib

    saved = ref.meta.get("vocabulary") or {}
    path = saved.get("path")
    if not path:
        return None
    try:
        vocab_lib.check_sentencepiece_file(path)
    except vocab_lib.VocabularyFileError as e:
        detail = " ".join(str(e).split(";")[0].split())
        raise InitialCheckpointError(
            f"the initial checkpoint {ref.step_dir} was trained with vocabulary {path!r}, which "
            f"cannot be used here ({detail}); set VOCABULARY_PATH to a copy of that file "
            f"(sha256 {saved.get('hash')})"
        ) from None
    return path


def _as_json(value: Any) -> Any:
    return json.loads(json.dumps(value, default=str))


def model_config_from_checkpoint(
    ref: CheckpointRef, bindings: Mapping[str, Any], reshape: bool = False
):
    """The checkpoint's recorded SwitchConfig, with the explicitly set fields of `bindings`.

    Fields in `checkpoints.RUNTIME_FIELDS` (dtypes, capacity, dropout, ...) and `scan_layers`
    (the layout converts on load) are overridden by `bindings`; an architecture field may be
    bound only to the checkpoint's value, unless `reshape`.

    Args:
      ref: the initial checkpoint; its meta must hold "model_config".
      bindings: {field: value} set explicitly (gin's `switch_t5.SwitchConfig.*` bindings).
      reshape: every binding overrides (a non-strict restore or an assignment map: the model
        is meant to differ from the checkpoint; `plan_restore` still checks each shape).

    Raises:
      ArchitectureMismatchError: a bound architecture field differs from the checkpoint's
        (names every such field with both values).
    """
    from switch_t5 import checkpoints
    from switch_t5.interop import checkpoint_io

    saved = checkpoints.with_default_fields(ref.meta["model_config"])
    try:
        config = checkpoint_io.config_from_dict(dict(saved))
    except (TypeError, ValueError) as e:
        raise InitialCheckpointError(
            f"the initial checkpoint {ref.step_dir} records a model config this version cannot "
            f"read ({e}); bind every switch_t5.SwitchConfig field in a model gin file instead"
        ) from None
    runtime, clashes = {}, []
    for name, value in sorted(bindings.items()):
        if reshape or name in checkpoints.RUNTIME_FIELDS or name == "scan_layers":
            runtime[name] = value
        elif _as_json(value) != _as_json(saved.get(name)):
            clashes.append(f"{name}={value!r} but the checkpoint has {name}={saved.get(name)!r}")
    if clashes:
        raise ArchitectureMismatchError(
            f"gin sets switch_t5.SwitchConfig.{'; '.join(clashes)} (initial checkpoint "
            f"{ref.step_dir}); the architecture comes from the checkpoint: drop those bindings "
            "(e.g. do not include a model gin file); only runtime fields (dtypes, capacity, "
            "dropout, ...) and scan_layers may be changed, unless InitialCheckpoint.strict=False "
            "or an assignment_map says how the params differ"
        )
    return config.with_fields(**runtime) if runtime else config


def _name(path: tuple) -> str:
    return "/".join(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path)


def flatten(tree: Any) -> dict[str, Any]:
    """{"encoder/layers_0/attention/query/kernel": leaf} of a nested params dict."""
    return {_name(p): leaf for p, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def saved_params(ref: CheckpointRef) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """{name: (shape, dtype)} of the params stored in a checkpoint (its metadata only)."""
    import orbax.checkpoint as ocp

    state_dir = ref.step_dir / "state"
    try:
        metadata = ocp.PyTreeCheckpointer().metadata(state_dir)
    except (FileNotFoundError, ValueError) as e:
        raise InitialCheckpointError(f"cannot read the checkpoint in {state_dir}: {e}") from e
    tree = getattr(metadata, "item_metadata", metadata)
    tree = getattr(tree, "tree", tree)
    if not isinstance(tree, Mapping) or "params" not in tree:
        raise InitialCheckpointError(
            f"{state_dir} holds no 'params': not a checkpoint of this project (convert T5X or "
            "Hugging Face checkpoints first with `python -m switch_t5.convert`)"
        )
    return {
        name: (tuple(m.shape), np.dtype(m.dtype)) for name, m in flatten(tree["params"]).items()
    }


_SCANNED = re.compile(r"^(encoder|decoder)/layers/subblock_(\d+)/(.+)$")
_UNSCANNED = re.compile(r"^(encoder|decoder)/layers_(\d+)/(.+)$")


@dataclasses.dataclass(frozen=True)
class _Piece:
    """How one param name of the model's layout is made from the checkpoint's arrays.

    kind "same": `sources[0]` as is; "index": block `index` of the scanned `sources[0]`;
    "stack": the unscanned layers `sources`, stacked along a new leading blocks axis.
    """

    kind: str
    sources: tuple[str, ...]
    index: int = 0


def _scanned_stacks(names) -> dict[str, int]:
    """{stack: number of subblocks} of the stacks stored in the scanned layout."""
    out: dict[str, set[str]] = {}
    for name in names:
        m = _SCANNED.match(name)
        if m:
            out.setdefault(m.group(1), set()).add(m.group(2))
    return {stack: len(subs) for stack, subs in out.items()}


def layout_view(
    saved: Mapping[str, tuple[tuple[int, ...], Any]], target: Mapping[str, Any]
) -> tuple[dict[str, tuple[tuple[int, ...], Any]], dict[str, _Piece]]:
    """The checkpoint's params as they would be named and shaped in the model's layer layout.

    Args:
      saved: {name: (shape, dtype)} of the checkpoint's params.
      target: {name: leaf with .shape} of the model's params.

    Returns:
      ({name in the model's layout: (shape, dtype)}, {that name: its `_Piece`}). Identity when
      both use the same layout. A scanned block with period P holds layer b * P + j of the
      unscanned stack at index b of subblock_j (`switch_t5.scan_utils`).
    """
    saved_scanned, target_scanned = _scanned_stacks(saved), _scanned_stacks(target)
    view: dict[str, tuple[tuple[int, ...], Any]] = {}
    pieces: dict[str, _Piece] = {}
    for name, (shape, dtype) in saved.items():
        m = _SCANNED.match(name)
        stack = m.group(1) if m else None
        if m and stack not in target_scanned:
            # Scanned checkpoint, unscanned model: one view name per block.
            period, j, rest = saved_scanned[stack], int(m.group(2)), m.group(3)
            for b in range(shape[0]):
                layer = f"{stack}/layers_{b * period + j}/{rest}"
                view[layer] = (tuple(shape[1:]), dtype)
                pieces[layer] = _Piece("index", (name,), b)
            continue
        u = _UNSCANNED.match(name)
        if u and u.group(1) in target_scanned:
            continue  # stacked below, from the model's side
        view[name] = (tuple(shape), dtype)
        pieces[name] = _Piece("same", (name,))
    for name, leaf in target.items():
        m = _SCANNED.match(name)
        if not m or m.group(1) in saved_scanned:
            continue
        # Unscanned checkpoint, scanned model: stack the layers of this subblock.
        stack, j, rest = m.group(1), int(m.group(2)), m.group(3)
        period = target_scanned[stack]
        sources = tuple(f"{stack}/layers_{b * period + j}/{rest}" for b in range(leaf.shape[0]))
        shapes = {saved[src][0] for src in sources if src in saved}
        if len(shapes) != 1 or any(src not in saved for src in sources):
            continue  # missing (or inconsistent) layers: reported as missing by plan_restore
        view[name] = ((len(sources), *shapes.pop()), saved[sources[0]][1])
        pieces[name] = _Piece("stack", sources)
    return view, pieces


def _source_sharding(sharding: Any, kind: str) -> Any:
    """The sharding to read a checkpoint array with, from the model param's `sharding`: the
    scanned blocks axis is replicated (as the rules table does for `layers`)."""
    if kind == "same" or not isinstance(sharding, NamedSharding):
        return sharding
    spec = tuple(sharding.spec)
    spec = (None, *spec) if kind == "index" else spec[1:]
    return NamedSharding(sharding.mesh, PartitionSpec(*spec))


@functools.partial(jax.jit, static_argnames=("dtype",))
def _take_block(x: jax.Array, index: jax.Array, dtype: Any) -> jax.Array:
    # [blocks, ...] -> [...]
    return jax.lax.dynamic_index_in_dim(x, index, keepdims=False).astype(dtype)


def _assemble(piece: _Piece, read: Mapping[str, Any], t: Any) -> jax.Array:
    """One model param from the arrays read for it, on `t.sharding` in `t.dtype`."""
    if piece.kind == "index":
        x = _take_block(read[piece.sources[0]], jnp.int32(piece.index), jnp.dtype(t.dtype))
    else:  # "stack": [...] x blocks -> [blocks, ...]
        x = jnp.stack([read[src] for src in piece.sources]).astype(t.dtype)
    return jax.device_put(x, t.sharding)


def _compile_map(assignment_map: AssignmentMap) -> list[tuple[re.Pattern, str | None]]:
    rules = []
    for rule in assignment_map:
        if not isinstance(rule, (tuple, list)) or len(rule) != 2:
            raise InitialCheckpointError(
                f"assignment_map rule {rule!r}: give (target_regex, source_name_or_None) pairs"
            )
        try:
            rules.append((re.compile(rule[0]), rule[1]))
        except re.error as e:
            raise InitialCheckpointError(f"assignment_map regex {rule[0]!r}: {e}") from e
    return rules


def plan_restore(
    target: Mapping[str, Any],
    saved: Mapping[str, tuple[tuple[int, ...], Any]],
    *,
    strict: bool = True,
    assignment_map: AssignmentMap = (),
    where: str = "the checkpoint",
) -> tuple[dict[str, str], list[str]]:
    """Which checkpoint param each model param reads.

    Args:
      target: {name: leaf with .shape} of the model's params.
      saved: {name: (shape, dtype)} of the checkpoint's params.
      strict: every target param must be found (or explicitly mapped to None).
      assignment_map: rules, see the module docstring.
      where: the checkpoint, for messages.

    Returns:
      ({target name: source name}, [target names left fresh]).

    Raises:
      ArchitectureMismatchError: the first param (by name) whose shape differs, or, when strict,
        the first one the checkpoint lacks.
    """
    rules = _compile_map(assignment_map)
    restored: dict[str, str] = {}
    fresh: list[str] = []
    missing: list[tuple[str, str]] = []
    for name in sorted(target):
        source: str | None = name
        for pattern, replacement in rules:
            match = pattern.fullmatch(name)
            if match:
                source = None if replacement is None else match.expand(replacement)
                break
        if source is None:
            fresh.append(name)
            continue
        if source not in saved:
            missing.append((name, source))
            fresh.append(name)
            continue
        want, got = tuple(target[name].shape), tuple(saved[source][0])
        if want != got:
            via = "" if source == name else f" (read from {source!r})"
            raise ArchitectureMismatchError(
                f"parameter {name!r}{via} has shape {want} in this model but {got} in {where}; "
                "the model config does not match the checkpoint: use the model gin file it was "
                "trained with (for a converted checkpoint, its model.gin)"
            )
        restored[name] = source
    if strict and missing:
        name, source = missing[0]
        via = "" if source == name else f" (mapped to {source!r})"
        raise ArchitectureMismatchError(
            f"parameter {name!r}{via} of this model is not in {where} ({len(missing)} missing "
            "in all); the model config does not match the checkpoint. Use the model gin file it "
            "was trained with, or restore partially (strict=False, with an assignment_map)"
        )
    return restored, fresh


def check_vocabulary(ref: CheckpointRef, expected: Mapping[str, Any] | None) -> None:
    """Raises when the checkpoint's vocabulary hash is known and differs from `expected`'s."""
    saved = ref.meta.get("vocabulary") or {}
    if not expected or not saved.get("hash") or not expected.get("hash"):
        return
    if saved["hash"] != expected["hash"]:
        raise InitialCheckpointError(
            f"the checkpoint {ref.step_dir} was trained with vocabulary {saved.get('path')!r} "
            f"(hash {saved['hash']}) but this run uses {expected.get('path')!r} (hash "
            f"{expected['hash']}); set VOCABULARY_PATH to the checkpoint's vocabulary"
        )


def load_initial_params(
    path: str,
    abstract_params: Any,
    *,
    step: int | None = None,
    strict: bool = True,
    assignment_map: AssignmentMap = (),
    fallback_to_scratch: bool = False,
    expected_vocabulary: Mapping[str, Any] | None = None,
) -> LoadedParams:
    """Reads the params of a checkpoint onto the shardings of `abstract_params`.

    Args:
      path: see `find_checkpoint`.
      abstract_params: the model's params as `jax.ShapeDtypeStruct`s with `sharding=` set (e.g.
        `StateSetup.abstract_state.params`); arrays are read in their dtypes.
      step: the step to read (None = latest, or the one `path` names).
      strict: see the module docstring.
      assignment_map: see the module docstring.
      fallback_to_scratch: return `params=None` instead of failing when `path` holds no
        checkpoint.
      expected_vocabulary: this run's vocabulary record ({"path", "hash"}); a checkpoint trained
        with another vocabulary is an error.

    Returns:
      A `LoadedParams`; params the checkpoint does not give are None leaves in `params` when
      not strict (see `initial_train_state`, which fills them).

    Raises:
      InitialCheckpointError: no checkpoint (without fallback), or another vocabulary.
      ArchitectureMismatchError: see `plan_restore`.
    """
    ref = find_checkpoint(path, step)
    if ref is None:
        if fallback_to_scratch:
            log.warning("no checkpoint under %s: fine-tuning starts from scratch", path)
            return LoadedParams(None, None, {}, sorted(flatten(abstract_params)), [])
        raise InitialCheckpointError(
            f"no complete checkpoint under {path}; give a MODEL_DIR, its checkpoints/ folder "
            "or one step's folder (…/checkpoints/N), or set fallback_to_scratch=True"
        )
    check_vocabulary(ref, expected_vocabulary)
    saved = saved_params(ref)
    target = flatten(abstract_params)
    # The checkpoint in the model's layer layout (identity unless scanned <-> unscanned).
    view, pieces = layout_view(saved, target)
    restored, fresh = plan_restore(
        target,
        view,
        strict=strict,
        assignment_map=assignment_map,
        where=f"checkpoint {ref.step_dir}",
    )
    first_target = _first_targets(restored, pieces)
    read = _read_arrays(ref, _restore_args(first_target, target, saved))
    values = _place_values(restored, pieces, target, read, first_target)
    del read
    leaves = [values.get(name) for name in flatten(abstract_params)]
    params = jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(abstract_params), leaves)
    used = {real for source in restored.values() for real in pieces[source].sources}
    unused = sorted(n for n in saved if n not in used)
    if unused:
        log.info("%d checkpoint params are not used, e.g. %s", len(unused), unused[0])
    return LoadedParams(params, ref, restored, fresh, unused)


def _first_targets(
    restored: Mapping[str, str], pieces: Mapping[str, _Piece]
) -> dict[str, tuple[str, str]]:
    """{checkpoint array: (the first target param that reads it, how it is read)}.

    One read per checkpoint array (several targets may share one), on the sharding the first
    target that needs it asks for.
    """
    first_target: dict[str, tuple[str, str]] = {}
    for name, source in restored.items():
        for real in pieces[source].sources:
            first_target.setdefault(real, (name, pieces[source].kind))
    return first_target


def _restore_args(
    first_target: Mapping[str, tuple[str, str]],
    target: Mapping[str, Any],
    saved: Mapping[str, tuple[tuple[int, ...], Any]],
) -> dict[str, Any]:
    """The nested orbax `ArrayRestoreArgs` of the arrays to read.

    Each array is read on the sharding of its first target (`_source_sharding` of it) and in
    that target's dtype: orbax reshards on read and casts.
    """
    import orbax.checkpoint as ocp

    item: dict[str, Any] = {}
    for real, (name, kind) in first_target.items():
        node = item
        *parents, leaf = real.split("/")
        for part in parents:
            node = node.setdefault(part, {})
        t = target[name]
        node[leaf] = ocp.ArrayRestoreArgs(
            sharding=_source_sharding(t.sharding, kind),
            global_shape=tuple(saved[real][0]),
            dtype=t.dtype,
        )
    return item


def _read_arrays(ref: CheckpointRef, item: dict[str, Any]) -> dict[str, Any]:
    """{checkpoint name: array} of the params `item` asks for (a partial orbax restore)."""
    import orbax.checkpoint as ocp

    abstract_item = jax.tree.map(
        lambda a: jax.ShapeDtypeStruct(a.global_shape, a.dtype, sharding=a.sharding),
        item,
        is_leaf=lambda x: isinstance(x, ocp.ArrayRestoreArgs),
    )
    out = ocp.PyTreeCheckpointer().restore(
        ref.step_dir / "state",
        args=ocp.args.PyTreeRestore(
            item={"params": abstract_item}, restore_args={"params": item}, partial_restore=True
        ),
    )
    return flatten(out["params"])


def _place_values(
    restored: Mapping[str, str],
    pieces: Mapping[str, _Piece],
    target: Mapping[str, Any],
    read: Mapping[str, Any],
    first_target: Mapping[str, tuple[str, str]],
) -> dict[str, Any]:
    """{target name: array on its sharding and dtype}, from the arrays read."""
    values: dict[str, Any] = {}
    for name, source in restored.items():
        piece, t = pieces[source], target[name]
        if piece.kind != "same":
            values[name] = _assemble(piece, read, t)
            continue
        x = read[source]
        if first_target[source][0] != name:
            # A separate buffer: the same one twice in a tree cannot be donated.
            x = jax.device_put(jnp.copy(x).astype(t.dtype), t.sharding)
        values[name] = x
    return values


def initial_train_state(
    setup: train_state.StateSetup,
    path: str,
    *,
    seed: int,
    step: int | None = None,
    strict: bool = True,
    assignment_map: AssignmentMap = (),
    fallback_to_scratch: bool = False,
    expected_vocabulary: Mapping[str, Any] | None = None,
) -> tuple[train_state.TrainState, LoadedParams]:
    """A fresh TrainState (step 0, new optimizer state) whose params come from a checkpoint.

    Args:
      setup: the run's `train_state.setup_train_state(...)`.
      path, step, strict, assignment_map, fallback_to_scratch, expected_vocabulary: see
        `load_initial_params`.
      seed: RANDOM_SEED; the training rng is `split(PRNGKey(seed))[1]`, as a run from scratch
        derives it. Params the checkpoint does not give come from `setup.init_fn()`.

    Returns:
      (state on `setup.shardings`, what was read).
    """
    loaded = load_initial_params(
        path,
        setup.abstract_state.params,
        step=step,
        strict=strict,
        assignment_map=assignment_map,
        fallback_to_scratch=fallback_to_scratch,
        expected_vocabulary=expected_vocabulary,
    )
    if loaded.params is None or loaded.fresh:
        # Only then is a scratch initialisation needed (it allocates a second set of params).
        scratch = setup.init_fn()
        if loaded.params is None:
            return scratch, loaded
        params = jax.tree.map(
            lambda x, s: s if x is None else x,
            loaded.params,
            scratch.params,
            is_leaf=lambda x: x is None,
        )
        del scratch
    else:
        params = loaded.params
    rng = jax.random.split(jax.random.PRNGKey(seed))[1]

    def fresh_state(params: Any) -> train_state.TrainState:
        return train_state.TrainState(
            step=jnp.zeros([], jnp.int32),
            params=params,
            opt_state=setup.optimizer.tx.init(params),
            rng=rng,
            # Auxiliary-loss-free balancing's choice biases start at 0 when fine-tuning.
            router_bias=jax.tree.map(
                lambda a: jnp.zeros(a.shape, a.dtype), setup.abstract_state.router_bias
            ),
        )

    mesh = partitioning.run_mesh(setup.shardings)
    with jax.set_mesh(mesh), partitioning.axis_rules():
        state = jax.jit(fresh_state, out_shardings=setup.shardings, donate_argnums=0)(params)
    # The read arrays were donated to the state.
    loaded.params = state.params
    return state, loaded
