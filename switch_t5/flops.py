"""The ONE formula for the model FLOPs of a train step (plan's report, MFU, benchmarks).

Model FLOPs, as for MFU (PaLM, arXiv 2204.02311 app. B): what the model needs, not what the
program runs, so rematerialisation's recomputation, capacity padding and dropped tokens are not
counted. A train step is 3 x the forward pass (backward = 2 x forward), and a multiply-add is 2
FLOPs, hence "6 x the weights a token multiplies" per token plus attention.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from switch_t5 import network
from switch_t5.config import SwitchConfig

# Leaves that are no matmul weight: layer-norm scales (elementwise) and the relative-position
# bias tables (a lookup).
_NOT_MATMUL = ("scale", "rel_embedding")


def _weights_per_token(abstract_params: Any, config: SwitchConfig) -> tuple[float, float]:
    """(weights multiplied per encoder token, weights multiplied per decoder token).

    Expert kernels count k / E of their size (a token visits k of E experts, arXiv 2101.03961
    sec. 2.1); routers count fully. The cross-attention key and value kernels multiply the
    encoder's outputs, so they are per encoder token. The token embedding's input lookup is
    free; tied to the output projection it is a [d_model, vocab] matmul per decoder token.
    """
    k_over_e = config.num_selected_experts / max(config.num_experts, 1)
    enc = dec = 0.0
    for path, leaf in network._leaves_with_paths(abstract_params):
        if path[-1] in _NOT_MATMUL:
            continue
        n = float(np.prod(leaf.shape)) * (k_over_e if "expert" in path[:-1] else 1.0)
        if path[0] == "encoder":
            enc += n
        elif path[0] == "decoder":
            cross_kv = "encoder_decoder_attention" in path and path[-2] in ("key", "value")
            if cross_kv:
                enc += n
            else:
                dec += n
        elif path[0] == "token_embedder" and config.logits_via_embedding:
            dec += n
    return enc, dec


def train_flops_per_step(
    abstract_params: Any, config: SwitchConfig, batch_size: int, lengths: Mapping[str, int]
) -> float:
    """Model FLOPs of one train step on `batch_size` sequences of `lengths`.

    flops = 3 x batch x forward FLOPs per sequence, where with li = lengths["inputs"],
    lt = lengths["targets"], h = num_heads x head_dim:

      forward = 2 x (W_enc x li + W_dec x lt)
                + 4 x h x (enc_layers x li^2 + dec_layers x lt x (lt + li))

    W_enc / W_dec: the matmul weights each encoder / decoder token multiplies
    (`_weights_per_token`: experts at k / E, routers, attention projections with the
    cross-attention's key and value on encoder tokens, the (tied) output projection on decoder
    tokens; no norms, relative-position tables or embedding lookup). The attention term is
    QK^T and the attention-weighted values, 2 matmuls of [l, h] x [h, l'] each: encoder self
    attention (l' = li), decoder self attention (l' = lt, counted in full, causal masking
    notwithstanding) and cross attention (l' = li).

    Args:
      abstract_params: the params tree (boxed or not; ShapeDtypeStructs are enough).
      config: the model config (experts, heads, layers, tied logits).
      batch_size: sequences per step (all microbatches together).
      lengths: {"inputs": li, "targets": lt}, tokens per sequence (padding included).
    """
    enc, dec = _weights_per_token(abstract_params, config)
    li, lt = lengths["inputs"], lengths["targets"]
    hd = config.num_heads * config.head_dim
    attention = (
        4 * hd * (config.num_encoder_layers * li * li + config.num_decoder_layers * lt * (lt + li))
    )
    forward = 2.0 * (enc * li + dec * lt) + attention
    return 3.0 * batch_size * forward
