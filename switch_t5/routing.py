"""Routers of the sparse feed-forward layers and their auxiliary losses.

A router scores every token against every expert (arXiv 2101.03961 sec. 2.1), picks the top-k
experts of each token ("switch" routing is k = 1), and gives each (token, choice) a slot inside
the chosen expert's buffer. Slots beyond the expert capacity are dropped: the token gets no output
from that expert (the caller's residual connection carries it).

Everything here is pure JAX on float32 ("selective precision", arXiv 2101.03961 sec. 2.4: the
softmax over experts is unstable in bfloat16), except the `Router` module that owns the kernel.

Priority of the slots follows Flaxformer's `TokensChooseMaskedRouter`: all first choices of a group
are served before any second choice, tokens in sequence order inside a choice; with
batch-prioritized routing (BPR, arXiv 2202.08906 / V-MoE) the tokens of a group are first sorted by
their top-1 probability so that confident tokens claim capacity first. Padding tokens never take
a slot and are left out of the losses and metrics; under transformers' rule
(`padding_takes_capacity`) padding claims slots in sequence order like real tokens, as
`SwitchTransformersTop1Router` does, and is still left out of the losses and metrics.

A group's capacity is a static buffer size; `slot_limit` optionally lowers it per group (the
capacity of a sequence computed from its own real tokens, `capacity_by_real_tokens`), so that
neither padding length nor the buffer size of the batch changes which tokens are dropped.

The layer reaches its router through a registry (`register_router`, chosen by
`SwitchConfig.router_type`): a router turns the logits into a `DispatchPlan` (which token each
expert slot holds, with what combine weight), its unweighted losses and its metrics
(`RouterOutput`). "switch" and "topk" are the token-choice router above (`token_choice_router`);
the plan does not assume that tokens pick experts (`plan_from_slots` takes an expert-choice
router's per-slot picks). "experts_choose" is expert-choice routing (arXiv 2202.09368,
`expert_choice_router`): each expert takes its top-capacity tokens of a group, so a token gets
any number of experts; it is not causal and runs in encoder layers only.

Auxiliary-loss-free balancing (after DeepSeek-V3, arXiv 2412.19437 sec. 2.1.2;
`SwitchConfig.router_bias_update_rate`): the token-choice router adds a per-expert bias of its
layer (`RouteCall.choice_bias`) to the scores that choose the experts, never to the gates:
to the softmax router's logits here (DeepSeek-V3 adds it to sigmoid affinities, which
`router_score="sigmoid"` gives). The router returns each expert's pre-capacity load
(`RouterOutput.load`); the train step moves the bias by u * sign(mean load - load)
(`update_choice_bias`) outside the optimizer.

Two implementations compute the same slots: `positions_by_cumsum` (a cumulative sum over a
[tokens, experts] one-hot, as Mesh-TF) and `positions_by_sort` (a stable sort of expert ids, no
[tokens, experts] tensor). They are equal by construction of the priority order, so the
masked-einsum and the scatter dispatch drop exactly the same tokens.

Einsum legend: g=groups, t=tokens per group, k=selected experts per token, e=experts,
c=expert capacity, d=embed.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import flax
import jax
import jax.numpy as jnp
from flax import linen as nn

from switch_t5 import errors


@flax.struct.dataclass
class Routing:
    """The routing decision of every (token, choice) of a layer call.

    Attributes:
      router_logits: <float32>[groups, tokens, experts] raw router scores.
      router_probs: <float32>[groups, tokens, experts] softmax of the logits.
      expert_index: <int32>[groups, tokens, k] chosen experts, best first.
      gate: <float32>[groups, tokens, k] combine weight of each choice: the router probability of
        that expert (top-k gates are NOT renormalised, as Flaxformer's masked router).
      position: <int32>[groups, tokens, k] slot of the choice inside its expert's buffer; padding
        tokens get `capacity` (i.e. no slot) unless padding takes capacity.
      kept: <bool>[groups, tokens, k] the choice holds a slot: a real token (or any token when
        padding takes capacity) and position < the group's slot limit (<= capacity).
      valid: <bool>[groups, tokens] real (non-padding) tokens.
      capacity: static expert capacity (slots per expert and group).
    """

    router_logits: jax.Array
    router_probs: jax.Array
    expert_index: jax.Array
    gate: jax.Array
    position: jax.Array
    kept: jax.Array
    valid: jax.Array
    capacity: int = flax.struct.field(pytree_node=False)


def expert_capacity(
    tokens_per_group: int,
    num_experts: int,
    capacity_factor: float,
    min_expert_capacity: int,
) -> int:
    """Slots per expert and group: max(round(cf * tokens / experts), min_expert_capacity).

    As Flaxformer, the capacity does not scale with k for top-k routing unless the caller folds
    k into the factor (`SwitchConfig.capacity_scales_with_k`, `moe.capacity_rule`). It is capped
    at the group's token count: an expert can never receive more tokens than a group holds
    (each token picks an expert at most once), so the cap drops nothing and saves work when
    decoding.
    """
    capacity = max(round(capacity_factor * tokens_per_group / num_experts), min_expert_capacity)
    return min(capacity, tokens_per_group)


def capacity_by_real_tokens(
    real_tokens: jax.Array,
    max_tokens: int,
    num_experts: int,
    capacity_factor: float,
    min_expert_capacity: int,
) -> jax.Array:
    """`expert_capacity` of each group computed from its real (non-padding) token count.

    A table of `expert_capacity(n, ...)` for n = 0..max_tokens, looked up per group: the same
    rounding as the static rule, and never above `expert_capacity(max_tokens, ...)`.

    Args:
      real_tokens: <int32>[groups] real tokens of each group.
      max_tokens: tokens per group (padding included).

    Returns:
      <int32>[groups] slots per expert of each group.
    """
    table = [
        expert_capacity(n, num_experts, capacity_factor, min_expert_capacity)
        for n in range(max_tokens + 1)
    ]
    return jnp.asarray(table, jnp.int32)[real_tokens]


def _priority_order(router_probs: jax.Array, batch_prioritized: bool) -> jax.Array | None:
    """Token order inside each group in which the slots are handed out (None = sequence order).

    Args:
      router_probs: <float32>[groups, tokens, experts].
      batch_prioritized: sort tokens by descending top-1 probability (BPR).

    Returns:
      <int32>[groups, tokens] permutation, or None.
    """
    if not batch_prioritized:
        return None
    # Stable sort so that ties keep sequence order, identically for both slot implementations.
    top1 = jnp.max(router_probs, axis=-1)
    return jnp.argsort(-top1, axis=-1, stable=True).astype(jnp.int32)


def _permute(x: jax.Array, order: jax.Array | None) -> jax.Array:
    """Reorders the token axis (axis 1) of [groups, tokens, ...] by `order`."""
    if order is None:
        return x
    idx = order.reshape(order.shape + (1,) * (x.ndim - 2))
    return jnp.take_along_axis(x, idx, axis=1)


def _unpermute(x: jax.Array, order: jax.Array | None) -> jax.Array:
    if order is None:
        return x
    return _permute(x, jnp.argsort(order, axis=-1).astype(jnp.int32))


def positions_by_cumsum(
    expert_index: jax.Array, valid: jax.Array, num_experts: int, order: jax.Array | None
) -> jax.Array:
    """Slot of every (token, choice) via a cumulative sum over a one-hot (Mesh-TF/Flaxformer).

    Args:
      expert_index: <int32>[groups, tokens, k].
      valid: <bool>[groups, tokens] real tokens; padding takes no slot.
      num_experts: number of experts.
      order: <int32>[groups, tokens] token priority order, or None for sequence order.

    Returns:
      <int32>[groups, tokens, k] slot index (padding: a huge value, never < capacity).
    """
    g, t, k = expert_index.shape
    idx = _permute(expert_index, order)
    ok = _permute(valid, order)
    # [g, t, k] -> [g, t, k, e]: padding rows are all zero so they never advance a counter.
    mask = jax.nn.one_hot(idx, num_experts, dtype=jnp.int32) * ok[..., None, None]
    # [g, t, k, e] -> [g, k * t, e]: all first choices of a group come before any second choice.
    mask = jnp.swapaxes(mask, 1, 2).reshape(g, k * t, num_experts)
    before = jnp.cumsum(mask, axis=1) - mask
    # [g, k * t, e] -> [g, k * t]: the count of earlier claims on this choice's own expert.
    pos = jnp.sum(before * mask, axis=-1)
    pos = jnp.swapaxes(pos.reshape(g, k, t), 1, 2)
    pos = _unpermute(pos, order)
    return jnp.where(valid[..., None], pos, jnp.iinfo(jnp.int32).max).astype(jnp.int32)


def positions_by_sort(
    expert_index: jax.Array, valid: jax.Array, num_experts: int, order: jax.Array | None
) -> jax.Array:
    """Same slots as `positions_by_cumsum`, from a stable sort of expert ids (no [t, e] tensor).

    The rank of a claim among the claims on the same expert, in priority order, is its slot.
    """
    g, t, k = expert_index.shape
    idx = _permute(expert_index, order)
    ok = _permute(valid, order)
    # Padding gets the sentinel expert id `num_experts`, sorted after every real claim.
    keys = jnp.where(ok[..., None], idx, num_experts)
    # [g, t, k] -> [g, k * t] in priority order (choice-major).
    keys = jnp.swapaxes(keys, 1, 2).reshape(g, k * t)

    def one_group(keys_g):
        perm = jnp.argsort(keys_g, stable=True)
        sorted_keys = keys_g[perm]
        counts = jnp.zeros((num_experts + 1,), jnp.int32).at[keys_g].add(1)
        starts = jnp.cumsum(counts) - counts
        rank_sorted = jnp.arange(keys_g.shape[0], dtype=jnp.int32) - starts[sorted_keys]
        return jnp.zeros_like(keys_g).at[perm].set(rank_sorted)

    pos = jax.vmap(one_group)(keys)
    pos = jnp.swapaxes(pos.reshape(g, k, t), 1, 2)
    pos = _unpermute(pos, order)
    return jnp.where(valid[..., None], pos, jnp.iinfo(jnp.int32).max).astype(jnp.int32)


def top_k(router_probs: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
    """The k largest probabilities of each token and their experts, best first.

    k rounds of argmax instead of `jax.lax.top_k`: the SPMD partitioner gathers the whole
    [groups, tokens, experts] array for a TopK op, while argmax stays local to each group shard.
    Ties go to the lower expert index, as `lax.top_k`.

    Args:
      router_probs: <float32>[groups, tokens, experts].
      k: experts per token.

    Returns:
      gate: <float32>[groups, tokens, k]; expert_index: <int32>[groups, tokens, k].
    """
    num_experts = router_probs.shape[-1]
    gates, indices = [], []
    remaining = router_probs
    for _ in range(k):
        # [g, t, e] -> [g, t]
        idx = jnp.argmax(remaining, axis=-1).astype(jnp.int32)
        chosen = jax.nn.one_hot(idx, num_experts, dtype=jnp.bool_)
        gates.append(jnp.sum(jnp.where(chosen, router_probs, 0.0), axis=-1))
        indices.append(idx)
        remaining = jnp.where(chosen, -jnp.inf, remaining)
    return jnp.stack(gates, axis=-1), jnp.stack(indices, axis=-1)


ROUTER_SCORES = ("softmax", "sigmoid")
# The routers that take the options of auxiliary-loss-free balancing (`balancing_problems`).
TOKEN_CHOICE_ROUTERS = ("switch", "topk")
# Flax variable collections of auxiliary-loss-free balancing: the per-expert choice bias of each
# MoE layer (train state, not a param: no optimizer, weight decay or freezing touches it) and the
# layer's pre-capacity load, sown by the train step under the same names (`update_choice_bias`).
BIAS_COLLECTION = "router_bias"
LOAD_COLLECTION = "router_load"
BIAS_NAME = "expert_bias"


def router_scores(router_logits: jax.Array, score: str = "softmax") -> jax.Array:
    """<float32>[..., experts] scores: softmax over the experts (Switch) or an independent
    sigmoid per expert (DeepSeek-V3 affinities, arXiv 2412.19437 eq. 15)."""
    if score == "sigmoid":
        return jax.nn.sigmoid(router_logits)
    return jax.nn.softmax(router_logits, axis=-1)


def update_choice_bias(bias: jax.Array, load: jax.Array, rate: float) -> jax.Array:
    """Auxiliary-loss-free balancing's step (arXiv 2412.19437 sec. 2.1.2), outside the optimizer.

    Each expert's bias moves by rate * sign(mean load - load): an overloaded expert's goes
    down, an underloaded one's up, an expert at exactly the mean load keeps its bias.

    Args:
      bias: <float32>[..., experts] the choice bias of one layer (leading axes: stacked layers).
      load: <float32>[..., experts] its pre-capacity token counts over the global batch.
      rate: u.

    Returns:
      <float32>[..., experts] the new bias.
    """
    mean = jnp.mean(load, axis=-1, keepdims=True)
    return bias + jnp.float32(rate) * jnp.sign(mean - load).astype(jnp.float32)


def balancing_problems(config: Any) -> list[str]:
    """Config problems of auxiliary-loss-free balancing and the DeepSeek-V3 routing options."""
    problems = []
    u, alpha = config.router_bias_update_rate, config.sequence_balance_loss_weight
    for name, value in (("router_bias_update_rate", u), ("sequence_balance_loss_weight", alpha)):
        if not errors.is_number(value) or value < 0:
            problems.append(f"{name}={value!r} must be a number >= 0 (0 = off)")
    if config.router_score not in ROUTER_SCORES:
        problems.append(f"router_score={config.router_score!r}: use {choices(ROUTER_SCORES)}")
    if problems or not config.num_experts:
        return problems
    used = [
        f"{name}={value!r}"
        for name, value, off in (
            ("router_bias_update_rate", u, 0),
            ("router_score", config.router_score, "softmax"),
            ("router_renormalize_gates", config.router_renormalize_gates, False),
            ("sequence_balance_loss_weight", alpha, 0),
        )
        if value != off
    ]
    if used and config.router_type not in TOKEN_CHOICE_ROUTERS:
        why = " (it balances load by construction)" if config.router_type == EXPERTS_CHOOSE else ""
        problems.append(
            f"{', '.join(used)} apply to token-choice routing only, not to "
            f"router_type={config.router_type!r}{why}: use router_type='switch' or 'topk', "
            "or leave them at their defaults"
        )
    if config.router_renormalize_gates and config.num_selected_experts < 2:
        problems.append(
            "router_renormalize_gates=True needs num_selected_experts > 1: one renormalised gate "
            "is always 1 and the router would get no gradient from the task"
        )
    return problems


def route(
    router_logits: jax.Array,
    valid: jax.Array,
    *,
    num_selected_experts: int,
    capacity: int,
    batch_prioritized: bool = False,
    slot_impl: str = "cumsum",
    slot_limit: jax.Array | None = None,
    padding_takes_capacity: bool = False,
    choice_bias: jax.Array | None = None,
    score: str = "softmax",
    renormalize_gates: bool = False,
) -> Routing:
    """Top-k token-choice routing with expert capacity.

    Args:
      router_logits: <float32>[groups, tokens, experts].
      valid: <bool>[groups, tokens] real tokens (padding takes no capacity by default).
      num_selected_experts: k (1 = switch routing).
      capacity: slots per expert and group (the static buffer size).
      batch_prioritized: hand out slots by descending top-1 probability (encoder only).
      slot_impl: "cumsum" or "sort" (same result; see `positions_by_cumsum`).
      slot_limit: <int32>[groups] slots per expert actually usable in each group (each
        <= capacity); None = capacity.
      padding_takes_capacity: padding claims slots like real tokens (transformers' router); it
        is still no real token for the losses and metrics.
      choice_bias: <float32>[experts] added to the scores that choose the experts (to the logits
        under softmax scoring, to the affinities under sigmoid), never to the gates
        (auxiliary-loss-free balancing, arXiv 2412.19437 sec. 2.1.2); None = no bias.
      score: "softmax" or "sigmoid" (`router_scores`).
      renormalize_gates: divide the k gates of each token by their sum.

    Returns:
      The `Routing` of every (token, choice).
    """
    if slot_impl not in ("cumsum", "sort"):
        raise ValueError(f"slot_impl={slot_impl!r}: use 'cumsum' or 'sort'")
    router_logits = router_logits.astype(jnp.float32)
    num_experts = router_logits.shape[-1]
    router_probs = router_scores(router_logits, score)
    if choice_bias is None:
        gate, expert_index = top_k(router_probs, num_selected_experts)
    else:
        biased = (router_logits if score == "softmax" else router_probs) + choice_bias
        _, expert_index = top_k(biased, num_selected_experts)
        # [g, t, k] -> [g, t, k, e] -> [g, t, k]: the unbiased score of each choice (a one-hot
        # sum, as `top_k`, so that the partitioner keeps it on each group shard).
        chosen = jax.nn.one_hot(expert_index, num_experts, dtype=jnp.bool_)
        gate = jnp.sum(jnp.where(chosen, router_probs[..., None, :], 0.0), axis=-1)
    if renormalize_gates:
        gate = gate / jnp.maximum(jnp.sum(gate, axis=-1, keepdims=True), 1e-9)
    order = _priority_order(router_probs, batch_prioritized)
    positions = positions_by_cumsum if slot_impl == "cumsum" else positions_by_sort
    # Tokens that compete for slots: the real ones, or all of them under transformers' rule.
    claims = jnp.ones_like(valid) if padding_takes_capacity else valid
    position = positions(expert_index, claims, num_experts, order)
    limit = capacity if slot_limit is None else slot_limit[:, None, None]
    kept = claims[..., None] & (position < limit)
    position = jnp.where(claims[..., None], position, capacity)
    return Routing(
        router_logits=router_logits,
        router_probs=router_probs,
        expert_index=expert_index,
        gate=gate,
        position=position,
        kept=kept,
        valid=valid,
        capacity=capacity,
    )


def _num_real(valid: jax.Array) -> jax.Array:
    # An all-padding batch has no tokens to average over: its losses and metrics are 0, not NaN.
    return jnp.maximum(jnp.sum(valid.astype(jnp.float32)), 1.0)


def expert_fractions(expert_index: jax.Array, valid: jax.Array, num_experts: int) -> jax.Array:
    """f_i: fraction of the real (token, choice) pairs sent to each expert, before capacity.

    Args:
      expert_index: <int32>[..., tokens, k].
      valid: <bool>[..., tokens].

    Returns:
      <float32>[experts], summing to 1 (0 when every token is padding).
    """
    k = expert_index.shape[-1]
    return expert_counts(expert_index, valid, num_experts) / (_num_real(valid) * k)


def expert_counts(expert_index: jax.Array, valid: jax.Array, num_experts: int) -> jax.Array:
    """<float32>[experts] real (token, choice) pairs sent to each expert, before capacity.

    Args:
      expert_index: <int32>[..., tokens, k].
      valid: <bool>[..., tokens].
    """
    # [..., t, k] -> [..., t, k, e]
    onehot = jax.nn.one_hot(expert_index, num_experts, dtype=jnp.float32)
    onehot = onehot * valid[..., None, None].astype(jnp.float32)
    return jnp.sum(onehot.reshape(-1, num_experts), axis=0)


def sequence_balance_loss(
    router_probs: jax.Array, expert_index: jax.Array, valid: jax.Array, sequence_length: int
) -> jax.Array:
    """DeepSeek-V3's sequence-wise balance loss (arXiv 2412.19437 eq. 17-20), unweighted.

    Per sequence (a batch row of `sequence_length` tokens: packed examples share a row):
    sum_i f_i P_i with f_i = E / (k T) x (real choices of expert i) and P_i the mean over its T
    real tokens of the scores normalised to sum 1; averaged over the rows with a real token.
    1 under uniform routing, as the Switch loss. Gradient only through P.

    Args:
      router_probs: <float32>[groups, tokens, experts] router scores (softmax or sigmoid).
      expert_index: <int32>[groups, tokens, k].
      valid: <bool>[groups, tokens]; the groups are consecutive tokens of [batch, length].
      sequence_length: tokens per batch row.

    Returns:
      <float32>[] the loss.
    """
    e, k = router_probs.shape[-1], expert_index.shape[-1]
    # [g, t, ...] -> [rows, length, ...]: groups hold consecutive tokens of the batch rows.
    probs = router_probs.reshape(-1, sequence_length, e)
    index = expert_index.reshape(-1, sequence_length, k)
    real = valid.reshape(-1, sequence_length).astype(jnp.float32)
    n = jnp.maximum(jnp.sum(real, axis=1), 1.0)
    # [rows, length, k] -> [rows, e]
    counts = jnp.sum(jax.nn.one_hot(index, e) * real[..., None, None], axis=(1, 2))
    f = jax.lax.stop_gradient(counts * e / (k * n[:, None]))
    normalised = probs / jnp.maximum(jnp.sum(probs, axis=-1, keepdims=True), 1e-9)
    p = jnp.sum(normalised * real[..., None], axis=1) / n[:, None]
    rows = jnp.sum(real, axis=1) > 0
    per_row = jnp.sum(f * p, axis=-1)
    return jnp.sum(jnp.where(rows, per_row, 0.0)) / jnp.maximum(jnp.sum(rows), 1)


def load_balancing_loss(
    router_probs: jax.Array, expert_index: jax.Array, valid: jax.Array
) -> jax.Array:
    """Switch auxiliary loss N * sum_i f_i * P_i (arXiv 2101.03961 eq. 4-6), unweighted.

    f_i is the fraction of real (token, choice) pairs routed to expert i before capacity
    truncation (for top-k divided by k, so the loss is 1 under uniform routing for any k) and
    P_i the mean router probability of expert i over real tokens. f and P are taken over the whole
    batch the layer sees (all groups), as in the paper, so the loss does not depend on grouping.
    The gradient flows only through P (f is piecewise constant).

    Args:
      router_probs: <float32>[groups, tokens, experts].
      expert_index: <int32>[groups, tokens, k].
      valid: <bool>[groups, tokens] real tokens.

    Returns:
      <float32>[] the loss: 1 under uniform routing, N under collapse onto one expert.
    """
    num_experts = router_probs.shape[-1]
    f = jax.lax.stop_gradient(expert_fractions(expert_index, valid, num_experts))
    probs = router_probs.astype(jnp.float32) * valid[..., None].astype(jnp.float32)
    p = jnp.sum(probs.reshape(-1, num_experts), axis=0) / _num_real(valid)
    return num_experts * jnp.sum(f * p)


def router_z_loss(router_logits: jax.Array, valid: jax.Array) -> jax.Array:
    """ST-MoE router z-loss: mean over real tokens of logsumexp(logits)^2 (arXiv 2202.08906 eq. 5).

    Args:
      router_logits: <float32>[groups, tokens, experts].
      valid: <bool>[groups, tokens].

    Returns:
      <float32>[] the unweighted loss.
    """
    lse = jax.nn.logsumexp(router_logits.astype(jnp.float32), axis=-1)
    return jnp.sum(jnp.where(valid, lse**2, 0.0)) / _num_real(valid)


def routing_metrics(routing: Routing) -> dict[str, jax.Array]:
    """Load metrics of one layer call, over real tokens only.

    Returns:
      fraction_dropped: <float32>[] dropped (token, choice) pairs / real pairs.
      router_confidence: <float32>[] mean top-1 router probability.
      expert_usage: <float32>[experts] f_i of the load-balancing loss (sums to 1).
      tokens_per_expert: <float32>[experts] tokens each expert actually processes (all groups).
      max_load_over_mean: <float32>[] the busiest expert's pre-capacity load over the mean load
        (1 = balanced, E = collapse onto one expert).
    """
    num_experts = routing.router_probs.shape[-1]
    k = routing.expert_index.shape[-1]
    n = _num_real(routing.valid)
    real_pairs = routing.valid[..., None] & jnp.ones((k,), bool)
    dropped = jnp.sum((real_pairs & ~routing.kept).astype(jnp.float32)) / (n * k)
    top1 = jnp.sum(jnp.where(routing.valid, routing.gate[..., 0], 0.0)) / n
    onehot = jax.nn.one_hot(routing.expert_index, num_experts, dtype=jnp.float32)
    processed = jnp.sum((onehot * routing.kept[..., None]).reshape(-1, num_experts), axis=0)
    usage = expert_fractions(routing.expert_index, routing.valid, num_experts)
    return {
        "fraction_dropped": dropped,
        "router_confidence": top1,
        "expert_usage": usage,
        "tokens_per_expert": processed,
        "max_load_over_mean": jnp.max(usage) * num_experts,
    }


@flax.struct.dataclass
class DispatchPlan:
    """Which token each expert slot holds and its combine weight, read from the token side.

    Every token has j claims; kept claim (g, t, i) puts token t of group g into slot `position`
    of expert `expert`'s buffer, and that expert's output for it comes back scaled by `weight`.
    No two kept claims share an (expert, slot). A token-choice router fills claim i with the
    token's i-th choice (j = k); an expert-choice router fills claim e with expert e's pick of
    the token, if any (j = experts; `plan_from_slots` builds that from per-slot picks). The
    dispatches read only this plan.

    Attributes:
      expert: <int32>[groups, tokens, j] expert of each claim.
      position: <int32>[groups, tokens, j] slot of the claim in that expert's buffer (read only
        where kept).
      weight: <float32>[groups, tokens, j] combine weight of the claim (read only where kept).
      kept: <bool>[groups, tokens, j] the claim holds a slot.
      capacity: static slots per expert and group.
      num_experts: static number of experts.
    """

    expert: jax.Array
    position: jax.Array
    weight: jax.Array
    kept: jax.Array
    capacity: int = flax.struct.field(pytree_node=False)
    num_experts: int = flax.struct.field(pytree_node=False)


def plan_from_routing(r: Routing) -> DispatchPlan:
    """The plan of token-choice routing: claim i of a token is its i-th choice."""
    return DispatchPlan(
        expert=r.expert_index,
        position=r.position,
        weight=r.gate,
        kept=r.kept,
        capacity=r.capacity,
        num_experts=r.router_probs.shape[-1],
    )


def plan_from_slots(slot_token: jax.Array, slot_weight: jax.Array, num_tokens: int) -> DispatchPlan:
    """The plan of per-slot picks (expert-choice routing): claim e of a token is expert e's pick.

    Args:
      slot_token: <int32>[groups, experts, capacity] token (index in its group) each slot
        holds; outside [0, num_tokens) = an empty slot. An expert picks a token at most once.
      slot_weight: <float32>[groups, experts, capacity] combine weight of each slot.
      num_tokens: tokens per group.

    Returns:
      The `DispatchPlan` with j = experts claims per token.
    """
    g, e, c = slot_token.shape
    # Empty slots write to an extra token row t, dropped below.
    rows = jnp.where((slot_token >= 0) & (slot_token < num_tokens), slot_token, num_tokens)
    ei = jnp.arange(e)[:, None]
    slots = jnp.broadcast_to(jnp.arange(c, dtype=jnp.int32), (e, c))

    def one_group(rows_g, weight_g):
        # [e, c] -> [t + 1, e]
        position_g = jnp.full((num_tokens + 1, e), c, jnp.int32).at[rows_g, ei].set(slots)
        return position_g, jnp.zeros((num_tokens + 1, e), jnp.float32).at[rows_g, ei].set(weight_g)

    # One scatter per group (vmap: the groups are a batch dimension of the scatter), so the
    # partitioner keeps it on each group shard instead of gathering the slot tables of all groups.
    # [g, e, c] -> [g, t + 1, e] -> [g, t, e]
    position, weight = jax.vmap(one_group)(rows, slot_weight)
    position, weight = position[:, :num_tokens], weight[:, :num_tokens]
    return DispatchPlan(
        expert=jnp.broadcast_to(jnp.arange(e, dtype=jnp.int32), (g, num_tokens, e)),
        position=position,
        weight=weight,
        kept=position < c,
        capacity=c,
        num_experts=e,
    )


@dataclasses.dataclass(frozen=True)
class RouteCall:
    """What one MoE layer call asks of its router (set by the dispatch and capacity rule).

    Attributes:
      capacity: slots per expert and group (the static buffer size; the group's token count for
        the dropless dispatches, which drop nothing).
      slot_limit: <int32>[groups] slots actually usable in each group (each <= capacity), or
        None (= capacity).
      batch_prioritized: hand out slots by router confidence (BPR, encoder layers only).
      padding_takes_capacity: padding claims slots like real tokens (transformers' rule).
      slot_impl: "cumsum" or "sort": the slot computation the dispatch prefers (same slots).
      choice_bias: <float32>[experts] the layer's choice bias (auxiliary-loss-free balancing,
        `route`), or None.
      sequence_length: tokens per batch row (the groups are consecutive tokens of the rows),
        for per-sequence losses; None = unknown.
    """

    capacity: int
    slot_limit: jax.Array | None = None
    batch_prioritized: bool = False
    padding_takes_capacity: bool = False
    slot_impl: str = "sort"
    choice_bias: jax.Array | None = None
    sequence_length: int | None = None


@flax.struct.dataclass
class RouterOutput:
    """A router's answer for one layer call.

    Attributes:
      plan: where the tokens go.
      losses: unweighted auxiliary losses, <float32>[] each (the trainer weights them, see
        `moe_metrics.MoeMetric.loss_weight`).
      metrics: load metrics by name; every name (loss or metric) is declared in `moe_metrics`.
        Decoding reads `fraction_dropped` (infer's drop report): a router that can drop tokens
        returns it.
      load: <float32>[experts] real (token, choice) pairs that chose each expert before
        capacity, all groups: what auxiliary-loss-free balancing evens out (None: the router
        does not report it).
    """

    plan: DispatchPlan
    losses: dict[str, jax.Array]
    metrics: dict[str, jax.Array]
    load: jax.Array | None = None


# router(router_logits <float32>[groups, tokens, experts], valid <bool>[groups, tokens], call).
RouterFn = Callable[[jax.Array, jax.Array, RouteCall], RouterOutput]
# factory(config: SwitchConfig) -> RouterFn, called at every trace of a MoE layer.
RouterFactory = Callable[[Any], RouterFn]

_ROUTERS: dict[str, RouterFactory] = {}


def register_router(name: str, factory: RouterFactory) -> None:
    """Makes `SwitchConfig.router_type = name` route with `factory(config)`.

    The factory reads the config fields it needs and raises `errors.UserError` for settings it
    cannot route with; the function it returns maps the layer's float32 router logits to a
    `RouterOutput`. Register before building the SwitchConfig (its validation reads this
    registry).
    """
    if name in _ROUTERS:
        raise ValueError(f"router {name!r} is already registered")
    _ROUTERS[name] = factory


def unregister_router(name: str) -> None:
    """Removes a router added with `register_router`."""
    _ROUTERS.pop(name, None)


def router_names() -> tuple[str, ...]:
    """The registered router types, in registration order."""
    return tuple(_ROUTERS)


def choices(names: tuple[str, ...]) -> str:
    """'a', 'b' or 'c'."""
    quoted = [repr(n) for n in names]
    return quoted[0] if len(quoted) == 1 else ", ".join(quoted[:-1]) + " or " + quoted[-1]


def unknown_router_problem(router_type: str) -> str | None:
    """The config problem of an unregistered router type (None when it is registered)."""
    if router_type in _ROUTERS:
        return None
    return (
        f"router_type={router_type!r} is not a registered router: use "
        f"{choices(router_names())} (switch_t5.routing.register_router adds one)"
    )


def make_router(config: Any) -> RouterFn:
    """The router function of `config.router_type` for this config."""
    problem = unknown_router_problem(config.router_type)
    if problem:
        raise errors.UserError(problem)
    return _ROUTERS[config.router_type](config)


def token_choice_router(config: Any) -> RouterFn:
    """Top-k token-choice routing (`route`; "switch" is k = 1), with the Switch load-balancing
    loss, the router z-loss, DeepSeek-V3's sequence-wise loss when its weight is set, and
    `routing_metrics`. The call's `choice_bias` (auxiliary-loss-free balancing) steers the choice;
    `config.router_score` and `config.router_renormalize_gates` shape the scores and gates."""
    k = config.num_selected_experts
    score = config.router_score

    def run(router_logits: jax.Array, valid: jax.Array, call: RouteCall) -> RouterOutput:
        r = route(
            router_logits,
            valid,
            num_selected_experts=k,
            capacity=call.capacity,
            batch_prioritized=call.batch_prioritized,
            slot_impl=call.slot_impl,
            slot_limit=call.slot_limit,
            padding_takes_capacity=call.padding_takes_capacity,
            choice_bias=call.choice_bias,
            score=score,
            renormalize_gates=config.router_renormalize_gates,
        )
        metrics = routing_metrics(r)
        probs = r.router_probs
        if score != "softmax":
            # The Switch loss compares fractions with probabilities: scores normalised to sum 1.
            probs = probs / jnp.maximum(jnp.sum(probs, axis=-1, keepdims=True), 1e-9)
        losses = {
            "load_balancing_loss": load_balancing_loss(probs, r.expert_index, r.valid),
            "router_z_loss": router_z_loss(r.router_logits, r.valid),
        }
        if config.sequence_balance_loss_weight > 0:
            length = call.sequence_length or r.valid.shape[1]
            losses["sequence_balance_loss"] = sequence_balance_loss(
                r.router_probs, r.expert_index, r.valid, length
            )
        load = expert_counts(r.expert_index, r.valid, probs.shape[-1])
        return RouterOutput(plan_from_routing(r), losses, metrics, load)

    return run


register_router("switch", token_choice_router)
register_router("topk", token_choice_router)

# Expert-choice routing (arXiv 2202.09368): each expert picks its tokens.
EXPERTS_CHOOSE = "experts_choose"


def expert_choice_slots(
    router_probs: jax.Array, valid: jax.Array, capacity: int, slot_limit: jax.Array | None = None
) -> tuple[jax.Array, jax.Array]:
    """Each expert's top-`capacity` real tokens of each group by router probability.

    Expert e of group g fills its first min(limit_g, real tokens of g) slots with the tokens of
    highest probability p[g, t, e], best first (ties: the earlier token), limit_g = the slot
    limit (None = capacity); the other slots stay empty. Padding is never taken.

    The top-C is a stable sort along the token axis of each (group, expert) row, which the SPMD
    partitioner keeps on each group shard; `jax.lax.top_k` here made it all-gather the
    [groups, experts, tokens] probabilities of every group (tests/test_expert_choice.py).

    Args:
      router_probs: <float32>[groups, tokens, experts].
      valid: <bool>[groups, tokens] real tokens.
      capacity: static slots per expert and group (<= tokens).
      slot_limit: <int32>[groups] usable slots per expert of each group, or None.

    Returns:
      slot_token: <int32>[groups, experts, capacity] the token of each slot; `tokens` = empty.
      slot_weight: <float32>[groups, experts, capacity] its router probability (0 if empty).
    """
    t = router_probs.shape[1]
    real = jnp.sum(valid, axis=1, dtype=jnp.int32)
    limit = real if slot_limit is None else jnp.minimum(slot_limit, real)
    # [g, t, e] -> [g, e, t]; padding scores -1 (a probability is >= 0), so it sorts last.
    probs = jnp.swapaxes(router_probs, 1, 2)
    scores = jnp.where(valid[:, None, :], probs, -1.0)
    # [g, e, t] -> [g, e, c]
    token = jnp.argsort(-scores, axis=-1, stable=True)[..., :capacity].astype(jnp.int32)
    weight = jnp.take_along_axis(probs, token, axis=-1)
    taken = jnp.arange(capacity, dtype=jnp.int32) < limit[:, None, None]
    return jnp.where(taken, token, t), jnp.where(taken, weight, 0.0)


def expert_choice_metrics(
    plan: DispatchPlan, router_probs: jax.Array, valid: jax.Array
) -> dict[str, jax.Array]:
    """Load metrics of an expert-choice layer call, over real tokens only.

    Returns:
      fraction_dropped: <float32>[] real tokens no expert took / real tokens.
      fraction_multi_routed: <float32>[] real tokens more than one expert took / real tokens.
      router_confidence: <float32>[] mean top-1 router probability (as token choice).
      tokens_per_expert: <float32>[experts] tokens each expert processes (all groups).
    """
    n = _num_real(valid)
    # [g, t, e] -> [g, t]: how many experts took each token (padding: none).
    experts_per_token = jnp.sum(plan.kept, axis=-1)
    top1 = jnp.max(router_probs, axis=-1)
    return {
        "fraction_dropped": jnp.sum(valid & (experts_per_token == 0)) / n,
        "fraction_multi_routed": jnp.sum(valid & (experts_per_token > 1)) / n,
        "router_confidence": jnp.sum(jnp.where(valid, top1, 0.0)) / n,
        "tokens_per_expert": jnp.sum(plan.kept, axis=(0, 1), dtype=jnp.float32),
    }


def expert_choice_router(config: Any) -> RouterFn:
    """Expert-choice routing (arXiv 2202.09368): every expert takes its top-C tokens of each
    group (`expert_choice_slots`, C = the call's capacity, cf x tokens / experts), weighted by
    their router probability. Load is balanced by construction: no load-balancing loss; the
    router z-loss as token choice. A token may get several experts or none. Not causal (an
    expert compares all tokens of a group): encoder layers only (`SwitchConfig` refuses it in
    the decoder)."""

    def run(router_logits: jax.Array, valid: jax.Array, call: RouteCall) -> RouterOutput:
        router_logits = router_logits.astype(jnp.float32)
        router_probs = jax.nn.softmax(router_logits, axis=-1)
        slot_token, slot_weight = expert_choice_slots(
            router_probs, valid, call.capacity, call.slot_limit
        )
        plan = plan_from_slots(slot_token, slot_weight, router_probs.shape[1])
        losses = {"router_z_loss": router_z_loss(router_logits, valid)}
        return RouterOutput(plan, losses, expert_choice_metrics(plan, router_probs, valid))

    return run


register_router(EXPERTS_CHOOSE, expert_choice_router)


class Router(nn.Module):
    """The router kernel: logits = (jittered) tokens @ w, computed in float32.

    Params: `w/kernel` <param_dtype>[embed, experts], logical (embed_axis, "unmodeled"): every
    device holds the whole router unless FSDP names d_model otherwise; init
    normal(0, init_stddev) (arXiv 2101.03961 sec. 2.4 uses a 10x smaller init than T5 for
    stability).

    Attributes:
      num_experts: experts to score.
      jitter_noise: eps of the multiplicative uniform(1-eps, 1+eps) input noise.
      init_stddev: stddev of the kernel init.
      param_dtype: dtype of the kernel.
      embed_axis: logical name of the kernel's d_model (`partitioning.weight_embed_axis`).
    """

    num_experts: int
    jitter_noise: float = 0.0
    init_stddev: float = 2e-2
    param_dtype: Any = jnp.float32
    embed_axis: str = "embed"

    @nn.compact
    def __call__(self, token_inputs: jax.Array, *, apply_jitter: bool = False) -> jax.Array:
        """Router logits.

        Args:
          token_inputs: <any float>[..., embed].
          apply_jitter: multiply the router input (only the router's copy: the experts see the
            clean tokens) by uniform(1-eps, 1+eps) noise from the "jitter" rng stream (training).

        Returns:
          <float32>[..., experts] logits.
        """
        # Router in float32: selective precision, arXiv 2101.03961 sec. 2.4.
        x = token_inputs.astype(jnp.float32)
        if apply_jitter and self.jitter_noise > 0:
            noise = jax.random.uniform(
                self.make_rng("jitter"),
                x.shape,
                jnp.float32,
                minval=1.0 - self.jitter_noise,
                maxval=1.0 + self.jitter_noise,
            )
            x = x * noise
        # HIGHEST: a float32 matmul on TPU otherwise runs in one bfloat16 pass; the router is tiny.
        return nn.Dense(
            self.num_experts,
            use_bias=False,
            dtype=jnp.float32,
            param_dtype=self.param_dtype,
            precision=jax.lax.Precision.HIGHEST,
            kernel_init=nn.with_logical_partitioning(
                nn.initializers.normal(self.init_stddev), (self.embed_axis, "unmodeled")
            ),
            name="w",
        )(x)
