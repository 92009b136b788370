"""Plan a model before running it: parameter counts from the real param tree, without memory.

  python -m switch_t5.plan --gin_file=configs/models/switch_base_8.gin [--gin.NUM_EXPERTS=64]

The model is initialised abstractly (`jax.eval_shape`), so even Switch-C (1.6T parameters) is
counted on a laptop in seconds. Library functions return plain data (`ModelPlan`); `main` only
formats it, so mesh, memory and collective planning can be added as further sections.
"""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Sequence

import numpy as np

from switch_t5 import gin_utils, network
from switch_t5.config import SwitchConfig


@dataclasses.dataclass(frozen=True)
class ModelPlan:
    """Parameter counts of one model config.

    Attributes:
      total_params: every parameter.
      active_params_per_token: what one token touches (all non-expert params, embeddings and
        routers included, plus `num_selected_experts` experts per sparse layer).
      expert_params: parameters inside the experts, all layers and experts together.
      embedding_params: the token embedding (and the untied output projection).
      encoder_sparse_layers: sparse encoder layer indices.
      decoder_sparse_layers: sparse decoder layer indices.
      param_bytes: total_params in the config's param dtype.
    """

    total_params: int
    active_params_per_token: int
    expert_params: int
    embedding_params: int
    encoder_sparse_layers: tuple[int, ...]
    decoder_sparse_layers: tuple[int, ...]
    param_bytes: int


def plan_model(config: SwitchConfig) -> ModelPlan:
    """Counts the parameters of `config`'s model from its abstractly initialised param tree."""
    params = network.init_abstract(config)["params"]
    embedding = network.param_count(params["token_embedder"])
    if "logits_dense" in params["decoder"]:
        embedding += network.param_count(params["decoder"]["logits_dense"])
    total = network.param_count(params)
    return ModelPlan(
        total_params=total,
        active_params_per_token=network.active_params_per_token(config, params),
        expert_params=network.expert_param_count(params, config),
        embedding_params=embedding,
        encoder_sparse_layers=config.sparse_layers("encoder"),
        decoder_sparse_layers=config.sparse_layers("decoder"),
        param_bytes=total * np.dtype(config.param_dtype).itemsize,
    )


def _human(n: float) -> str:
    for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.4g}{unit}"
    return str(n)


def format_model_plan(config: SwitchConfig, plan: ModelPlan) -> list[str]:
    """`key: value` lines; exact integers first so that scripts can parse them."""
    c = config
    return [
        f"total_params: {plan.total_params}",
        f"active_params_per_token: {plan.active_params_per_token}",
        f"expert_params: {plan.expert_params}",
        f"embedding_params: {plan.embedding_params}",
        f"param_bytes: {plan.param_bytes}",
        f"summary: {_human(plan.total_params)} params, {_human(plan.active_params_per_token)} "
        f"active per token, {plan.param_bytes / 2**30:.1f} GiB of {c.param_dtype} weights",
        f"layers: encoder {c.num_encoder_layers}, decoder {c.num_decoder_layers}; d_model "
        f"{c.d_model}, heads {c.num_heads} x {c.head_dim}, d_ff {c.d_ff}, "
        f"activations {'-'.join(c.mlp_activations)}, vocab {c.vocab_size}, "
        f"logits {'tied' if c.logits_via_embedding else 'untied'}",
        f"experts: {c.num_experts}; sparse encoder layers {list(plan.encoder_sparse_layers)}, "
        f"sparse decoder layers {list(plan.decoder_sparse_layers)}",
    ]


def main(argv: Sequence[str]) -> None:
    flags = gin_utils.parse_flags(argv)
    if not flags.gin_files:
        raise SystemExit(
            "error: pass a model config, e.g. --gin_file=configs/models/switch_base_8.gin"
        )
    gin_utils.parse_gin(flags.gin_files, flags.gin_bindings)
    config = gin_utils.make_model_config()
    for line in format_model_plan(config, plan_model(config)):
        print(line)


if __name__ == "__main__":
    main(sys.argv[1:])
