"""T5X / Flaxformer Switch checkpoints: layout, names, import (and a writer for tests).

A T5X checkpoint directory `checkpoint_<step>/` (t5x/checkpoints.py, format version 3) holds a
msgpack file `checkpoint` with `{"version": 3, "optimizer": {"target": <params>, "state":
{"step": ..., "param_states": ...}}}`. Large arrays are not inline: their leaf is a TensorStore
spec (zarr driver, kvstore path relative to the directory, e.g.
`target.encoder.layers_1.mlp.expert.wi.kernel`), small ones are inline numpy arrays.

Parameter names (Flaxformer `t5_architecture` / `moe_architecture` with the MoE `moe.gin`):
ours plus a `target/` prefix, except the router, which Flaxformer nests one level deeper:
`mlp/router/router_weights/w/kernel` (`routing.RouterWeights` named `router_weights`, its
`DenseGeneral` named `w`; no bias in Switch). Attention kernels are stored 2-D ([embed,
heads * head_dim], `DenseGeneral(reshape_kernel=True)`), experts stacked [experts, embed, mlp]
(`nn.vmap` over the expert `MlpBlock`). `tests/data/t5x_switch_base_8_param_shapes.json` lists
switch_base_8's paths and shapes.

T5X checkpoints carry no model config: sizes are read from the shapes; the activation (ReLU for
un-gated "classic" Switch, gated GELU when `wi_0`/`wi_1` exist), relative-attention max distance
(128) and capacity factors take the Switch defaults unless overridden.
"""

from __future__ import annotations

import os
import re
from typing import Any

import numpy as np

from switch_t5 import errors
from switch_t5.config import SwitchConfig
from switch_t5.interop import streaming

_ROUTER_OURS = "mlp/router/w/kernel"
_ROUTER_T5X = "mlp/router/router_weights/w/kernel"


def to_t5x_name(ours: str) -> str:
    """Our param name -> the T5X checkpoint path ("target/...")."""
    return "target/" + ours.replace(_ROUTER_OURS, _ROUTER_T5X)


def from_t5x_name(t5x: str) -> str:
    if not t5x.startswith("target/"):
        raise ValueError(f"{t5x} is not a model parameter (T5X params live under target/)")
    return t5x[len("target/") :].replace(_ROUTER_T5X, _ROUTER_OURS)


def expected_shapes(config: SwitchConfig) -> dict[str, list[int]]:
    """{T5X path: shape} of the params of `config`."""
    from switch_t5.interop import checkpoint_io

    flat, _ = checkpoint_io.abstract_params(config)
    return {to_t5x_name(k): list(v.shape) for k, v in sorted(flat.items())}


def _find_checkpoint_file(path: str, step: int | None) -> str:
    if os.path.isfile(path):
        return path
    if os.path.exists(os.path.join(path, "checkpoint")):
        return os.path.join(path, "checkpoint")
    steps = sorted(
        int(m.group(1))
        for d in (os.listdir(path) if os.path.isdir(path) else [])
        if (m := re.fullmatch(r"checkpoint_(\d+)", d))
    )
    if not steps:
        raise FileNotFoundError(
            f"no T5X checkpoint at {path}: expected a `checkpoint` msgpack file or checkpoint_N "
            "directories"
        )
    step = steps[-1] if step is None else step
    return os.path.join(path, f"checkpoint_{step}", "checkpoint")


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    out = {}
    if isinstance(tree, dict) and not {"driver", "kvstore"} <= set(tree):
        for k, v in tree.items():
            out.update(_flatten(v, f"{prefix}/{k}" if prefix else str(k)))
    else:
        out[prefix] = tree
    return out


def open_t5x(path: str, step: int | None = None) -> streaming.ZarrSource:
    """The params (`target/...`) of a local T5X checkpoint as a source named like ours."""
    from flax import serialization

    file = _find_checkpoint_file(path, step)
    directory = os.path.dirname(os.path.abspath(file))
    with open(file, "rb") as f:
        contents = serialization.msgpack_restore(f.read())
    state = contents.get("optimizer", contents) if contents.get("version", 0) else contents
    if "target" not in state:
        raise errors.UserError(f"{file} has no optimizer/target tree; not a T5X checkpoint")
    specs: dict[str, Any] = {}
    for name, leaf in _flatten(state["target"], "target").items():
        if isinstance(leaf, dict):
            spec = dict(leaf)
            kv = dict(spec.get("kvstore", {}))
            if kv.get("driver", "file") not in ("file", "gfile"):
                raise errors.UserError(
                    f"{name} is stored with the {kv.get('driver')!r} driver; copy the checkpoint "
                    "to a local directory first (gsutil -m cp -r gs://... DIR)"
                )
            rel = kv.get("path", spec.pop("path", None))
            if rel is None:
                raise errors.UserError(f"{name}: TensorStore spec without a path: {leaf}")
            kv.update(driver="file", path=os.path.join(directory, rel))
            spec["kvstore"] = kv
            specs[from_t5x_name(name)] = spec
        else:
            specs[from_t5x_name(name)] = np.asarray(leaf)
    return streaming.ZarrSource(specs)


def config_from_t5x(
    source: streaming.ZarrSource, dtype: str = "bfloat16", **overrides: Any
) -> SwitchConfig:
    """Infers the SwitchConfig of a T5X Switch checkpoint from its parameter shapes."""
    names = set(source.names())

    def layers(stack):
        idx = {int(m.group(1)) for n in names if (m := re.match(rf"{stack}/layers_(\d+)/", n))}
        return sorted(idx)

    enc, dec = layers("encoder"), layers("decoder")
    if not enc or not dec:
        raise errors.UserError("the checkpoint has no encoder/decoder layers_N; not a T5 model")
    vocab, d_model = source.shape("token_embedder/embedding")
    heads, buckets = source.shape("encoder/relpos_bias/rel_embedding")
    head_dim = source.shape("encoder/layers_0/attention/query/kernel")[1] // heads
    sparse = {
        s: tuple(i for i in layers(s) if f"{s}/layers_{i}/{_ROUTER_OURS}" in names)
        for s in ("encoder", "decoder")
    }
    gated = any(n.endswith("/wi_0/kernel") for n in names)
    experts = 0
    d_ff = None
    for n in sorted(names):
        if n.endswith("/mlp/expert/wi/kernel") or n.endswith("/mlp/expert/wi_0/kernel"):
            experts, _, d_ff = source.shape(n)
            break
    if d_ff is None:
        d_ff = next(
            source.shape(n)[1] for n in sorted(names) if re.search(r"/mlp/wi(_0)?/kernel$", n)
        )
    fields: dict[str, Any] = dict(
        vocab_size=vocab,
        d_model=d_model,
        num_heads=heads,
        head_dim=head_dim,
        d_ff=d_ff,
        num_encoder_layers=len(enc),
        num_decoder_layers=len(dec),
        mlp_activations=("gelu", "linear") if gated else ("relu",),
        logits_via_embedding="decoder/logits_dense/kernel" not in names,
        relative_attention_num_buckets=buckets,
        dtype=dtype,
        num_experts=experts,
        encoder_sparse_layers=sparse["encoder"],
        decoder_sparse_layers=sparse["decoder"],
        # T5X's Switch runs use no router jitter (flaxformer moe.gin: JITTER_NOISE = 0.0).
        router_jitter_noise=0.0,
    )
    fields.update(overrides)
    return SwitchConfig(**fields)


def t5x_to_orbax(
    src: str,
    dst: str,
    *,
    step: int | None = None,
    budget_bytes: int = streaming.DEFAULT_BUDGET_BYTES,
    dtype: str = "bfloat16",
    overwrite: bool = False,
    **overrides: Any,
) -> streaming.RunStats:
    """Converts a local T5X Switch checkpoint into a project checkpoint + model gin.

    `dst` must be new or empty unless `overwrite` (`destination.prepare`).
    """
    from switch_t5.interop import checkpoint_io, hf

    source = open_t5x(src, step)
    config = config_from_t5x(source, dtype=dtype, **overrides)
    # T5X stores one subtree per layer: the plan is per layer, then moved to a scanned layout.
    targets = hf._our_targets(checkpoint_io.unscanned(config))
    missing = sorted(set(targets) - set(source.names()))
    if missing:
        raise errors.UserError(
            f"the T5X checkpoint lacks {[to_t5x_name(m) for m in missing[:3]]} that a model of "
            "the inferred config needs"
        )
    plan = streaming.Plan(targets, [streaming.Copy(n, n) for n in sorted(targets)])
    plan = checkpoint_io.scanned_plan(plan, dst_config=config)
    return checkpoint_io.write_checkpoint(
        dst,
        config,
        plan,
        source,
        budget_bytes=budget_bytes,
        overwrite=overwrite,
        converted_from={"format": "t5x", "path": os.path.abspath(src)},
    )


def write_t5x_checkpoint(directory: str, arrays: dict[str, np.ndarray], step: int = 0) -> str:
    """Writes params {T5X path "target/...": array} in T5X's layout; returns the step dir.

    Arrays go to TensorStore zarr directories `target.<dotted path>` (gzip, as T5X), the tree
    with their specs to the msgpack file `checkpoint`. (For tests and hand-made checkpoints;
    whole arrays in memory.)
    """
    from flax import serialization

    step_dir = os.path.join(directory, f"checkpoint_{step}")
    os.makedirs(step_dir, exist_ok=True)
    paths = {k: os.path.join(step_dir, k.replace("/", ".")) for k in arrays}
    targets = {
        k: streaming.TargetSpec(tuple(v.shape), np.asarray(v).dtype, tuple(v.shape))
        for k, v in arrays.items()
    }
    sink = streaming.ZarrSink(paths, compressor="gzip")
    sink.open(targets)
    for k, v in arrays.items():
        sink.write(k, (), np.asarray(v))
    sink.close()
    tree: dict[str, Any] = {}
    for k, t in targets.items():
        spec = streaming.zarr_spec(k.replace("/", "."), t, "gzip")
        node = tree
        *parents, leaf = k.split("/")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = spec
    contents = {
        "version": 3,
        "optimizer": {"target": tree["target"], "state": {"step": np.int32(step)}},
    }
    with open(os.path.join(step_dir, "checkpoint"), "wb") as f:
        f.write(serialization.msgpack_serialize(contents))
    return step_dir
