"""Sparse upcycling (Komatsuzaki et al., arXiv 2212.05055): a Switch model from a dense T5.

Every expert of a sparse layer starts as a copy of that layer's dense MLP, the router starts
fresh (normal(0, `router_init_stddev`), as a new model's), and everything else (attention,
norms, embeddings, dense layers that stay dense) is copied. The optimizer state is fresh
(`checkpoint_io.write_checkpoint`). At initialisation the upcycled model computes exactly the
dense model's function wherever routing picks any expert, up to the router probability that
scales each expert's output (arXiv 2101.03961 eq. 2).
"""

from __future__ import annotations

import os

import numpy as np

from switch_t5 import errors
from switch_t5.config import SwitchConfig
from switch_t5.interop import checkpoint_io, hf, streaming

_SIZE_FIELDS = (
    "vocab_size",
    "d_model",
    "num_heads",
    "head_dim",
    "d_ff",
    "num_encoder_layers",
    "num_decoder_layers",
    "mlp_activations",
    "logits_via_embedding",
    "relative_attention_num_buckets",
)


def upcycle_plan(
    dense: checkpoint_io.ProjectCheckpoint, config: SwitchConfig, seed: int = 0
) -> streaming.Plan:
    """The plan dense params -> the params of the sparse `config`.

    Raises:
      ValueError: the dense checkpoint already has experts, or its sizes differ from `config`
        (names every differing field).
    """
    if dense.config.is_sparse:
        raise errors.UserError(
            "the source checkpoint already has MoE layers; upcycle a dense model"
        )
    diff = [
        f"{f}: dense {getattr(dense.config, f)!r} != sparse {getattr(config, f)!r}"
        for f in _SIZE_FIELDS
        if getattr(dense.config, f) != getattr(config, f)
    ]
    if diff:
        raise errors.UserError(
            "the sparse model config must keep the dense model's sizes; " + "; ".join(diff)
        )
    if not config.is_sparse:
        raise errors.UserError(
            "the target config has no sparse layers (num_experts=0?); nothing to do"
        )
    if config.num_shared_experts or config.expert_width != config.d_ff:
        raise errors.UserError(
            f"num_shared_experts={config.num_shared_experts}, expert_d_ff={config.expert_d_ff}: "
            "upcycling starts every expert as a copy of the dense MLP; set num_shared_experts=0 "
            "and expert_d_ff=None (= d_ff)"
        )
    # Written per layer (`layers_{i}`), then moved to the scanned layout of either side.
    targets = hf._our_targets(checkpoint_io.unscanned(config))
    rng = np.random.default_rng(seed)
    pieces: list[streaming.Piece] = []
    for name in sorted(targets):
        if "/mlp/expert/" in name:
            layer, rest = name.split("/mlp/expert/")
            for e in range(config.num_experts):
                pieces.append(streaming.Copy(f"{layer}/mlp/{rest}", name, dst_lead=(e,)))
        elif name.endswith("/mlp/router/w/kernel"):
            shape = targets[name].shape
            value = rng.normal(0.0, config.router_init_stddev, shape).astype(np.float32)
            pieces.append(streaming.Const(name, value))
        else:
            pieces.append(streaming.Copy(name, name))
    plan = streaming.Plan(targets, pieces)
    return checkpoint_io.scanned_plan(plan, src_config=dense.config, dst_config=config)


def upcycle(
    src: str,
    dst: str,
    config: SwitchConfig,
    *,
    step: int | None = None,
    seed: int = 0,
    budget_bytes: int = streaming.DEFAULT_BUDGET_BYTES,
    overwrite: bool = False,
) -> streaming.RunStats:
    """Writes a project checkpoint of the sparse `config` upcycled from a dense checkpoint.

    `dst` must be new or empty unless `overwrite` (`destination.prepare`).
    """
    dense = checkpoint_io.open_checkpoint(src, step)
    plan = upcycle_plan(dense, config, seed)
    checkpoint_io.check_sources(plan, dense.params, f"{src} (step {dense.step})")
    return checkpoint_io.write_checkpoint(
        dst,
        config,
        plan,
        dense.params,
        budget_bytes=budget_bytes,
        seed=seed,
        overwrite=overwrite,
        vocabulary=dense.meta.get("vocabulary"),
        converted_from={
            "format": "upcycled",
            "path": os.path.abspath(src),
            "step": dense.step,
            **{
                k: v
                for k, v in dense.meta.get("converted_from", {}).items()
                if k == "hf_vocab_size"
            },
        },
    )
