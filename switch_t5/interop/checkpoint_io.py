"""This project's orbax checkpoints, written and read in chunks, plus the matching model gin.

A converted checkpoint has exactly the layout `switch_t5.checkpoints.Checkpointer` writes, so
training, fine-tuning and inference start from it like from any checkpoint of this project:

  DST/checkpoints/0/state   the TrainState: step 0, params, a fresh optimizer state (zeros, as
                            Adafactor's and AdamW's init), rng = split(PRNGKey(seed))[1]
  DST/checkpoints/0/data    {} (no input pipeline position)
  DST/checkpoints/0/meta    make_meta(config, vocabulary) plus a "converted_from" record
  DST/model.gin             every SwitchConfig field of the converted model
  DST/spiece.model          the vocabulary the meta records, when the source has one (HF)

DST must be new or empty; with `overwrite` an old run's checkpoints and run files are removed
first (`destination`), while the MODEL_DIR lock is held, so no training run writes there.

The state item is written without OCDBT (one zarr directory per array, which orbax restores like
its default layout): orbax first saves the tree with placeholder arrays, then every large array
is rewritten chunk by chunk with TensorStore (`streaming.run_plan`), so no array is ever whole in
memory. The step directory appears (atomic rename) only once every array is written.
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import json
import os
import shutil
from typing import Any

import jax
import numpy as np
from flax import linen as nn

from switch_t5 import checkpoints, network, run_dir, scan_utils
from switch_t5.config import SwitchConfig
from switch_t5.errors import UserError
from switch_t5.interop import destination, streaming

# Arrays up to this size are saved directly by orbax; larger ones are streamed.
_INLINE_BYTES = 1 << 20


def config_from_dict(fields: dict[str, Any]) -> SwitchConfig:
    """A SwitchConfig from its JSON form (lists back to tuples)."""
    names = {f.name for f in dataclasses.fields(SwitchConfig)}
    unknown = sorted(set(fields) - names)
    if unknown:
        raise ValueError(f"unknown SwitchConfig fields {unknown} in the checkpoint's meta")
    return SwitchConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in fields.items()})


def config_to_gin(config: SwitchConfig, header: str = "") -> str:
    """A model gin file binding every field of `config` (for `--gin_file=DST/model.gin`)."""
    lines = [f"# {line}" for line in header.splitlines()] if header else []
    for f in dataclasses.fields(SwitchConfig):
        value = getattr(config, f.name)
        lines.append(f"switch_t5.SwitchConfig.{f.name} = {value!r}")
    return "\n".join(lines) + "\n"


@functools.lru_cache(maxsize=8)
def abstract_params(config: SwitchConfig) -> tuple[dict[str, Any], Any]:
    """(flat {"encoder/...": ShapeDtypeStruct}, logical specs tree) of the model's params."""
    boxed = network.init_abstract(config)["params"]
    specs = nn.get_partition_spec(boxed)
    flat = {"/".join(p): leaf for p, leaf in network._leaves_with_paths(boxed)}
    return flat, specs


def unscanned(config: SwitchConfig) -> SwitchConfig:
    """The unscanned twin of `config`: the per-layer layout every conversion plan is written in."""
    return dataclasses.replace(config, scan_layers=False)


def scanned_plan(
    plan: streaming.Plan,
    src_config: SwitchConfig | None = None,
    dst_config: SwitchConfig | None = None,
) -> streaming.Plan:
    """`plan`, written for unscanned params (`layers_{i}`), moved to the scanned layout
    (`scan_utils.scanned_name`) on the side(s) whose config has `scan_layers`: the source
    names of a scanned `src_config`, the target names and tensors of a scanned `dst_config`."""
    src_scan = src_config is not None and src_config.scan_layers
    dst_scan = dst_config is not None and dst_config.scan_layers
    if not (src_scan or dst_scan):
        return plan
    targets = plan.targets
    if dst_scan:
        flat, _ = abstract_params(dst_config)
        targets = {
            k: streaming.TargetSpec(tuple(v.shape), np.dtype(v.dtype)) for k, v in flat.items()
        }
    pieces: list[streaming.Piece] = []
    for piece in plan.pieces:
        if src_scan and isinstance(piece, streaming.Copy):
            src, lead = scan_utils.scanned_name(piece.src, src_config)
            piece = dataclasses.replace(piece, src=src, src_lead=lead + piece.src_lead)
        if dst_scan:
            dst, lead = scan_utils.scanned_name(piece.dst, dst_config)
            if isinstance(piece, streaming.Zeros):
                box = tuple(slice(b, b + 1) for b in lead) + (piece.region or ())
                piece = dataclasses.replace(piece, dst=dst, region=box if lead else piece.region)
            else:
                piece = dataclasses.replace(piece, dst=dst, dst_lead=lead + piece.dst_lead)
        pieces.append(piece)
    return streaming.Plan(targets, pieces)


def check_sources(plan: streaming.Plan, source: streaming.Source, what: str) -> None:
    """Raises UserError when `plan` reads tensors that `source` (described by `what`) lacks."""
    names = set(source.names())
    missing = sorted({p.src for p in plan.pieces if isinstance(p, streaming.Copy)} - names)
    if missing:
        raise UserError(
            f"{what} lacks {missing[:3]}{' ...' if len(missing) > 3 else ''} that its recorded "
            f"model config needs (it holds e.g. {sorted(names)[:3]}); the checkpoint's params do "
            "not match the layout its meta records"
        )


def _path_name(path) -> str:
    parts = []
    for k in path:
        for attr in ("key", "name", "idx"):
            if hasattr(k, attr):
                parts.append(str(getattr(k, attr)))
                break
        else:
            parts.append(str(k))
    return "/".join(parts)


def _unflatten(flat: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, value in flat.items():
        node = out
        *parents, leaf = name.split("/")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return out


def _state_template(config: SwitchConfig, optimizer: str, seed: int):
    """The TrainState of ShapeDtypeStructs a training run of `config` restores."""
    from switch_t5 import optim, train_state

    flat, specs = abstract_params(config)
    params = _unflatten({k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in flat.items()})
    opt = optim.make_optimizer(optimizer, lambda step: 0.0, specs)
    opt_state = jax.eval_shape(opt.tx.init, params)
    rng = np.asarray(jax.random.split(jax.random.PRNGKey(seed))[1])
    return train_state.TrainState(
        step=np.zeros([], np.int32), params=params, opt_state=opt_state, rng=rng
    )


def _orbax_names(state_dir: str) -> dict[str, str]:
    """{"a/b/c": "a.b.c"}: tree path -> array directory, from orbax's `_METADATA`."""
    with open(os.path.join(state_dir, "_METADATA")) as f:
        meta = json.load(f)
    out = {}
    for key in meta["tree_metadata"]:
        parts = [str(p) for p in ast.literal_eval(key)]
        out["/".join(parts)] = ".".join(parts)
    return out


def write_checkpoint(
    dst: str,
    config: SwitchConfig,
    plan: streaming.Plan,
    source: streaming.Source | None,
    *,
    budget_bytes: int = streaming.DEFAULT_BUDGET_BYTES,
    optimizer: str = "adafactor",
    seed: int = 0,
    vocabulary: dict[str, Any] | None = None,
    vocabulary_file: str | None = None,
    converted_from: dict[str, Any] | None = None,
    overwrite: bool = False,
) -> streaming.RunStats:
    """Writes a project checkpoint (step 0) of `config` whose params come from `plan`.

    Args:
      dst: the new MODEL_DIR (local path): new or empty, unless `overwrite`.
      config: the model config (params must match `network.init_abstract(config)`).
      plan: targets named like the params ("encoder/layers_0/attention/query/kernel").
      source: where the plan's Copy pieces read.
      budget_bytes: memory budget of the streamed copy.
      optimizer: the optimizer whose fresh state is written ("adafactor" or "adamw").
      seed: the training rng is split(PRNGKey(seed))[1], as `train` derives it.
      vocabulary: the meta's vocabulary record (path, hash), when known.
      vocabulary_file: a SentencePiece model (T5 ids, 100 extra ids) to copy into
        `dst/spiece.model` and record as the run's vocabulary (instead of `vocabulary`).
      converted_from: provenance stored in the meta (format, path, HF vocab size, ...); its
        "path" (the source) is never removed by `overwrite`.
      overwrite: remove an old run's checkpoints and run files from `dst` first
        (`destination.prepare`) instead of refusing a non-empty `dst`.

    Returns:
      The copy's RunStats; `notes` says what was removed from `dst`.

    Raises:
      UserError: `dst` is not empty (without `overwrite`), is a file or the source, or a
        training run holds it.
      ValueError: the plan's tensors do not match the model's params (names the first).
    """
    src = (converted_from or {}).get("path")
    destination.check_path(dst, src)
    try:
        lock = checkpoints.ModelDirLock(dst).acquire()
    except checkpoints.ModelDirLockedError as e:
        raise UserError(str(e)) from e
    try:
        removed = destination.prepare(dst, "orbax", overwrite=overwrite, src=src)
        if vocabulary_file is not None:
            vocabulary = copy_vocabulary(vocabulary_file, dst)
        stats = _write_step_0(
            dst, config, plan, source, budget_bytes, optimizer, seed, vocabulary, converted_from
        )
    finally:
        lock.release()
    if removed:
        stats.notes.append(f"removed from {dst} (--overwrite): {', '.join(removed)}")
    if vocabulary_file is not None:
        stats.notes.append(
            f"vocabulary: {vocabulary['path']} (copied from {vocabulary_file}), recorded in the "
            "checkpoint; infer uses it, eval and train check their task's vocabulary against it"
        )
    return stats


def copy_vocabulary(path: str, dst: str, extra_ids: int = 100) -> dict[str, Any]:
    """Copies a SentencePiece model to `dst/spiece.model`; returns its vocabulary record
    (the record training writes: path, hash, fingerprint, size)."""
    import types

    import sentencepiece as spm

    from switch_t5.data import vocab as vocab_lib

    target = os.path.abspath(os.path.join(dst, destination.VOCABULARY_FILE))
    shutil.copyfile(path, target)
    pieces = spm.SentencePieceProcessor(model_file=target).get_piece_size()
    vocab = types.SimpleNamespace(
        sentencepiece_model_file=target, extra_ids=extra_ids, vocab_size=pieces + extra_ids
    )
    return vocab_lib.vocabulary_record(vocab)


def _write_step_0(
    dst: str,
    config: SwitchConfig,
    plan: streaming.Plan,
    source: streaming.Source | None,
    budget_bytes: int,
    optimizer: str,
    seed: int,
    vocabulary: dict[str, Any] | None,
    converted_from: dict[str, Any] | None,
) -> streaming.RunStats:
    """Writes dst/checkpoints/0 (staged, then renamed into place) and dst/model.gin."""
    final = os.path.join(dst, run_dir.CHECKPOINTS, "0")
    template = _state_template(config, optimizer, seed)
    _check_plan_matches(config, plan)
    placeholder_state, streamed, pieces = _placeholder_state(template, plan)
    staging = os.path.join(dst, destination.STAGING_DIR)
    shutil.rmtree(staging, ignore_errors=True)
    meta = checkpoints.make_meta(config, vocabulary)
    meta["converted_from"] = dict(converted_from or {})
    step_dir = _save_placeholders(staging, placeholder_state, meta)
    state_dir = os.path.join(step_dir, "state")
    names = _orbax_names(state_dir)
    missing = sorted(set(streamed) - set(names))
    if missing:
        raise RuntimeError(f"orbax named the arrays differently than expected: {missing[:3]}")
    sink = streaming.ZarrSink({k: os.path.join(state_dir, names[k]) for k in streamed})
    stats = streaming.run_plan(
        streaming.Plan(streamed, pieces), source, sink, budget_bytes=budget_bytes
    )
    os.makedirs(os.path.dirname(final), exist_ok=True)
    os.rename(step_dir, final)
    shutil.rmtree(staging, ignore_errors=True)
    header = "Model config of the checkpoint converted into this directory."
    if converted_from:
        header += f"\nConverted from {converted_from.get('format')} {converted_from.get('path')}."
    with open(os.path.join(dst, "model.gin"), "w") as f:
        f.write(config_to_gin(config, header))
    return stats


def _check_plan_matches(config: SwitchConfig, plan: streaming.Plan) -> None:
    """Refuses a plan whose tensors are not exactly the model's params, or leaves one unwritten."""
    flat_params, _ = abstract_params(config)
    expected = {k: (tuple(v.shape), np.dtype(v.dtype)) for k, v in flat_params.items()}
    got = {k: (tuple(t.shape), np.dtype(t.dtype)) for k, t in plan.targets.items()}
    if expected != got:
        diff = sorted(set(expected.items()) ^ set(got.items()))
        raise ValueError(
            f"the converted tensors do not match the params of this model config; first "
            f"difference: {diff[0] if diff else '?'}"
        )
    streaming.check_plan_covers(plan)


def _placeholder_state(
    template: Any, plan: streaming.Plan
) -> tuple[Any, dict[str, streaming.TargetSpec], list[streaming.Piece]]:
    """The state orbax saves first, and what is streamed over it afterwards.

    Params and large optimizer arrays are size-1 placeholders (streamed later: params from the
    plan, optimizer moments as zeros); small arrays (step, rng, factored optimizer rows) are
    written for real.

    Returns:
      (placeholder state, {state path: spec of a streamed array}, the pieces that write them).
    """
    streamed: dict[str, streaming.TargetSpec] = {}
    pieces: list[streaming.Piece] = []
    flat, treedef = jax.tree_util.tree_flatten_with_path(template)
    leaves = []
    for path, leaf in flat:
        name = _path_name(path)
        shape, dtype = tuple(leaf.shape), np.dtype(leaf.dtype)
        if name.startswith("params/"):
            streamed[name] = plan.targets[name[len("params/") :]]
            leaves.append(np.zeros((1,) * len(shape), dtype))
        elif (
            isinstance(leaf, jax.ShapeDtypeStruct)
            and int(np.prod(shape)) * dtype.itemsize > _INLINE_BYTES
        ):
            streamed[name] = streaming.TargetSpec(shape, dtype)
            pieces.append(streaming.Zeros(name))
            leaves.append(np.zeros((1,) * len(shape), dtype))
        elif isinstance(leaf, jax.ShapeDtypeStruct):
            leaves.append(np.zeros(shape, dtype))
        else:
            leaves.append(np.asarray(leaf))
    for piece in plan.pieces:
        pieces.append(dataclasses.replace(piece, dst="params/" + piece.dst))
    return jax.tree_util.tree_unflatten(treedef, leaves), streamed, pieces


def _save_placeholders(staging: str, placeholder_state: Any, meta: dict[str, Any]) -> str:
    """Saves step 0 under `staging` with orbax; returns its step directory.

    The state is saved without OCDBT: one zarr directory per array, so that each can then be
    rewritten chunk by chunk.
    """
    import orbax.checkpoint as ocp

    manager = ocp.CheckpointManager(
        os.path.abspath(os.path.join(staging, run_dir.CHECKPOINTS)),
        options=ocp.CheckpointManagerOptions(create=True, enable_async_checkpointing=False),
        item_names=("state", "data", "meta"),
        item_handlers={
            "state": ocp.StandardCheckpointHandler(use_ocdbt=False),
            "data": ocp.JsonCheckpointHandler(),
            "meta": ocp.JsonCheckpointHandler(),
        },
    )
    manager.save(
        0,
        args=ocp.args.Composite(
            state=ocp.args.StandardSave(placeholder_state),
            data=ocp.args.JsonSave({}),
            meta=ocp.args.JsonSave(meta),
        ),
    )
    manager.close()
    return os.path.join(staging, run_dir.CHECKPOINTS, "0")


@dataclasses.dataclass
class ProjectCheckpoint:
    """A project checkpoint opened for chunked reads.

    Attributes:
      config: the model config from the checkpoint's meta.
      meta: the whole meta record.
      params: a ZarrSource of the params, named "encoder/layers_0/attention/query/kernel".
      step: the step read.
    """

    config: SwitchConfig
    meta: dict[str, Any]
    params: streaming.ZarrSource
    step: int


def _step_dir(path: str, step: int | None) -> tuple[str, int]:
    if os.path.isdir(os.path.join(path, "state")) and os.path.isdir(os.path.join(path, "meta")):
        return path, int(os.path.basename(os.path.normpath(path)))
    root = path
    if os.path.isdir(os.path.join(path, run_dir.CHECKPOINTS)):
        root = os.path.join(path, run_dir.CHECKPOINTS)
    steps = sorted(int(d) for d in os.listdir(root) if d.isdigit()) if os.path.isdir(root) else []
    if not steps:
        raise FileNotFoundError(
            f"no checkpoint of this project under {path}; pass a MODEL_DIR, its checkpoints/ "
            "directory or one step directory (…/checkpoints/N)"
        )
    if step is None:
        step = steps[-1]
    if step not in steps:
        raise FileNotFoundError(f"no step {step} under {root}; steps there: {steps}")
    return os.path.join(root, str(step)), step


def open_checkpoint(path: str, step: int | None = None) -> ProjectCheckpoint:
    """Opens a checkpoint of this project (converted or written by training) for reading."""
    step_dir, step = _step_dir(path, step)
    with open(os.path.join(step_dir, "meta", "metadata")) as f:
        meta = json.load(f)
    if "model_config" not in meta:
        raise ValueError(f"{step_dir}/meta has no model_config; not a checkpoint of this project")
    config = config_from_dict(meta["model_config"])
    state_dir = os.path.abspath(os.path.join(step_dir, "state"))
    with open(os.path.join(state_dir, "_METADATA")) as f:
        tree_meta = json.load(f)
    driver = "zarr3" if tree_meta.get("use_zarr3") else "zarr"
    specs = {}
    for name, dotted in _orbax_names(state_dir).items():
        if not name.startswith("params/"):
            continue
        if tree_meta.get("use_ocdbt"):
            kv = {"driver": "ocdbt", "base": f"file://{state_dir}/", "path": dotted}
        else:
            kv = {"driver": "file", "path": os.path.join(state_dir, dotted)}
        specs[name[len("params/") :]] = {"driver": driver, "kvstore": kv}
    return ProjectCheckpoint(config, meta, streaming.ZarrSource(specs), step)


def load_params(path: str, step: int | None = None) -> tuple[SwitchConfig, dict[str, Any]]:
    """(config, nested params of numpy arrays) of a project checkpoint (whole, in memory)."""
    ckpt = open_checkpoint(path, step)
    flat = {n: ckpt.params.read(n, ()) for n in ckpt.params.names()}
    return ckpt.config, _unflatten(flat)
