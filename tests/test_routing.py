"""Routing invariants, capacity slots and auxiliary losses (pure functions, float32)."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from switch_t5 import routing
from switch_t5.config import SwitchConfig

E = 4

# One compiled program per case instead of dozens of eagerly dispatched ops.
_route = jax.jit(
    routing.route,
    static_argnames=(
        "num_selected_experts",
        "capacity",
        "batch_prioritized",
        "slot_impl",
        "padding_takes_capacity",
    ),
)
_lb_loss = jax.jit(routing.load_balancing_loss)
_metrics = jax.jit(routing.routing_metrics)


def _reference_positions(expert_index, valid, probs, batch_prioritized):
    """Slot of every (token, choice), one claim at a time in priority order (numpy loops)."""
    g, t, k = expert_index.shape
    pos = np.full((g, t, k), -1, np.int64)
    for gi in range(g):
        order = np.argsort(-probs[gi].max(-1), kind="stable") if batch_prioritized else np.arange(t)
        counter = np.zeros(probs.shape[-1], np.int64)
        for j in range(k):  # all first choices before any second choice
            for ti in order:
                if valid[gi, ti]:
                    e = expert_index[gi, ti, j]
                    pos[gi, ti, j] = counter[e]
                    counter[e] += 1
    return pos


def _random_case(seed, g=3, t=11, padding=True):
    rng = np.random.default_rng(seed)
    logits = rng.normal(size=(g, t, E)).astype(np.float32) * 2.0
    # A skewed router so that capacity truncation actually happens.
    logits[..., 1] += 1.5
    valid = np.ones((g, t), bool)
    if padding:
        valid[:, -3:] = False
        valid[1, :5] = False
    return logits, valid


@pytest.mark.parametrize("k", [1, 2])
@pytest.mark.parametrize("batch_prioritized", [False, True])
@pytest.mark.parametrize("slot_impl", ["cumsum", "sort"])
def test_routing_matches_reference_and_invariants(k, batch_prioritized, slot_impl):
    logits, valid = _random_case(seed=k + 2 * batch_prioritized)
    capacity = routing.expert_capacity(logits.shape[1], E, 1.0, 2)
    assert capacity == 3  # round(11 / 4) = 3 > min 2
    r = _route(
        jnp.asarray(logits),
        jnp.asarray(valid),
        num_selected_experts=k,
        capacity=capacity,
        batch_prioritized=batch_prioritized,
        slot_impl=slot_impl,
    )
    idx, pos, kept = np.asarray(r.expert_index), np.asarray(r.position), np.asarray(r.kept)
    probs = np.asarray(r.router_probs)

    ref = _reference_positions(idx, valid, probs, batch_prioritized)
    np.testing.assert_array_equal(pos[valid], ref[valid])
    np.testing.assert_array_equal(kept, valid[..., None] & (ref < capacity) & (ref >= 0))

    # Each token goes to at most k distinct experts.
    for j in range(k):
        for jj in range(j):
            assert not np.any(idx[..., j] == idx[..., jj])
    assert kept.sum(-1).max() <= k
    # Capacity respected and slots of an expert are 0..n-1, each used once.
    for gi in range(logits.shape[0]):
        for e in range(E):
            slots = sorted(pos[gi][kept[gi] & (idx[gi] == e)])
            assert slots == list(range(len(slots))) and len(slots) <= capacity
    # Padding never takes a slot.
    assert not kept[~valid].any()
    # Drops counted over real (token, choice) pairs.
    m = _metrics(r)
    n_real_pairs = valid.sum() * k
    dropped = (valid[..., None] & ~kept).sum()
    assert dropped > 0, "the case must exercise capacity truncation"
    np.testing.assert_allclose(m["fraction_dropped"], dropped / n_real_pairs, rtol=1e-6)
    processed = np.array([(kept & (idx == e)).sum() for e in range(E)], np.float32)
    np.testing.assert_array_equal(m["tokens_per_expert"], processed)
    usage = np.array([(valid[..., None] & (idx == e)).sum() for e in range(E)]) / n_real_pairs
    np.testing.assert_allclose(m["expert_usage"], usage, rtol=1e-6)
    top1 = probs.max(-1)[valid].mean()
    np.testing.assert_allclose(m["router_confidence"], top1, rtol=1e-6)


def test_cumsum_and_sort_slots_agree_under_heavy_dropping():
    logits, valid = _random_case(seed=7, g=4, t=32)
    for k in (1, 2):
        for bpr in (False, True):
            a, b = (
                _route(
                    jnp.asarray(logits),
                    jnp.asarray(valid),
                    num_selected_experts=k,
                    capacity=2,
                    batch_prioritized=bpr,
                    slot_impl=impl,
                )
                for impl in ("cumsum", "sort")
            )
            np.testing.assert_array_equal(a.position, b.position)
            np.testing.assert_array_equal(a.kept, b.kept)


def test_batch_prioritized_routing_serves_confident_tokens_first():
    # All 6 tokens choose expert 0; capacity 2. Sequence order keeps tokens 0, 1; BPR keeps the
    # two most confident (tokens 4 and 2).
    conf = np.array([0.5, 0.6, 2.0, 0.7, 3.0, 0.1], np.float32)
    logits = np.zeros((1, 6, E), np.float32)
    logits[0, :, 0] = conf
    valid = np.ones((1, 6), bool)
    for bpr, expect in ((False, [0, 1]), (True, [2, 4])):
        r = _route(
            jnp.asarray(logits),
            jnp.asarray(valid),
            num_selected_experts=1,
            capacity=2,
            batch_prioritized=bpr,
        )
        assert list(np.flatnonzero(np.asarray(r.kept)[0, :, 0])) == expect


def test_padding_changes_nothing_for_real_tokens():
    logits, valid = _random_case(seed=3)
    other = logits.copy()
    other[~valid] = np.random.default_rng(0).normal(size=other[~valid].shape) * 10
    outs = []
    for lg in (logits, other):
        r = _route(jnp.asarray(lg), jnp.asarray(valid), num_selected_experts=2, capacity=3)
        outs.append(
            (
                r,
                _metrics(r),
                _lb_loss(r.router_probs, r.expert_index, r.valid),
                routing.router_z_loss(r.router_logits, r.valid),
            )
        )
    (r1, m1, lb1, z1), (r2, m2, lb2, z2) = outs
    np.testing.assert_array_equal(r1.kept, r2.kept)
    np.testing.assert_array_equal(np.asarray(r1.position)[valid], np.asarray(r2.position)[valid])
    assert float(lb1) == float(lb2) and float(z1) == float(z2)
    for key in m1:
        np.testing.assert_array_equal(m1[key], m2[key])


def _lb(probs, k=1, valid=None):
    logits = jnp.log(jnp.asarray(probs, jnp.float32))[None]
    valid = jnp.ones(logits.shape[:2], bool) if valid is None else jnp.asarray(valid)[None]
    r = _route(logits, valid, num_selected_experts=k, capacity=logits.shape[1])
    return float(_lb_loss(r.router_probs, r.expert_index, r.valid))


def test_load_balancing_loss_uniform_collapse_and_hand_computed():
    # Uniform: tokens round-robin over experts, each with the same probability profile.
    t = 8
    logits = 3.0 * jax.nn.one_hot(jnp.arange(t) % E, E)[None]
    r = _route(logits, jnp.ones((1, t), bool), num_selected_experts=1, capacity=t)
    lb = _lb_loss(r.router_probs, r.expert_index, r.valid)
    np.testing.assert_allclose(lb, 1.0, rtol=1e-6)
    np.testing.assert_allclose(SwitchConfig().load_balancing_loss_weight * lb, 0.01, rtol=1e-6)
    # Collapse: every token sends (almost) all its probability to expert 0 -> N.
    logits = 100.0 * jax.nn.one_hot(jnp.zeros(t, jnp.int32), E)[None]
    r = _route(logits, jnp.ones((1, t), bool), num_selected_experts=1, capacity=t)
    lb = _lb_loss(r.router_probs, r.expert_index, r.valid)
    np.testing.assert_allclose(lb, E, rtol=1e-6)
    # Hand-computed, 2 experts: argmax 0, 0, 1, 0 -> f = (3/4, 1/4);
    # P = (0.65, 0.35) -> 2 * (0.75 * 0.65 + 0.25 * 0.35) = 1.15. A padding row changes nothing.
    probs = [[0.9, 0.1], [0.8, 0.2], [0.3, 0.7], [0.6, 0.4], [0.01, 0.99]]
    np.testing.assert_allclose(_lb(probs, valid=[1, 1, 1, 1, 0]), 1.15, rtol=1e-6)
    # Top-2 over 3 experts: choices (0,1), (1,2), (2,0), (0,1) -> f = (3, 3, 2) / 8;
    # P = (0.375, 0.325, 0.3) -> 3 * (3*0.375 + 3*0.325 + 2*0.3) / 8 = 1.0125.
    probs = [[0.5, 0.3, 0.2], [0.1, 0.5, 0.4], [0.3, 0.1, 0.6], [0.6, 0.4, 0.0 + 1e-30]]
    np.testing.assert_allclose(_lb(probs, k=2), 3 * (3 * 0.375 + 3 * 0.325 + 2 * 0.3) / 8, 1e-6)


def test_load_balancing_gradient_flows_only_through_probs():
    logits = jnp.asarray(_random_case(seed=1, padding=False)[0])
    valid = jnp.ones(logits.shape[:2], bool)

    def loss(lg):
        r = _route(lg, valid, num_selected_experts=1, capacity=4)
        return _lb_loss(r.router_probs, r.expert_index, r.valid)

    r = _route(logits, valid, num_selected_experts=1, capacity=4)
    f = routing.expert_fractions(r.expert_index, valid, E)
    n = valid.sum()
    # d/dlogits of E * sum_i f_i * mean_t p_ti with f constant, by the softmax Jacobian.
    p = r.router_probs
    gp = E * f / n  # dL/dp_ti
    expect = p * (gp - jnp.sum(gp * p, axis=-1, keepdims=True))
    np.testing.assert_allclose(jax.grad(loss)(logits), expect, rtol=1e-5, atol=1e-6)


def test_router_z_loss():
    logits = jnp.asarray([[[0.0, 0.0], [1.0, 2.0], [50.0, -3.0]]])
    valid = jnp.asarray([[True, True, False]])
    lse1 = math.log(2.0)
    lse2 = 2.0 + math.log1p(math.exp(-1.0))
    np.testing.assert_allclose(
        routing.router_z_loss(logits, valid), (lse1**2 + lse2**2) / 2, rtol=1e-6
    )


def test_expert_capacity_rule():
    assert routing.expert_capacity(64, 4, 1.25, 4) == 20
    assert routing.expert_capacity(64, 32, 1.0, 4) == 4  # floor
    assert routing.expert_capacity(3, 8, 2.0, 4) == 3  # never more slots than tokens
    assert routing.expert_capacity(10, 4, 1.0, 1) == 2  # round(2.5) -> 2 (banker's rounding)


@pytest.mark.parametrize("slot_impl", ["cumsum", "sort"])
def test_transformers_rule_padding_takes_slots_in_sequence_order(slot_impl):
    """transformers' `SwitchTransformersTop1Router`: cumsum of the argmax one-hot over the whole
    sequence, padding included; a token is kept while the count is <= expert_capacity."""
    logits, valid = _random_case(seed=4, t=13)
    r = _route(
        jnp.asarray(logits),
        jnp.asarray(valid),
        num_selected_experts=1,
        capacity=2,
        slot_impl=slot_impl,
        padding_takes_capacity=True,
    )
    onehot = np.eye(E, dtype=np.int64)[np.argmax(logits, -1)]
    hf_kept = ((np.cumsum(onehot, axis=1) <= 2) * onehot).sum(-1) > 0
    np.testing.assert_array_equal(np.asarray(r.kept)[..., 0], hf_kept)
    # Group 1 starts with 5 padding tokens: they take slots that real tokens lose.
    own = _route(jnp.asarray(logits), jnp.asarray(valid), num_selected_experts=1, capacity=2)
    assert np.sum(np.asarray(own.kept)[1, :, 0] & valid[1]) > np.sum(hf_kept[1] & valid[1])
    # Drops and the losses still count real tokens only.
    m = _metrics(r)
    real_dropped = np.sum(valid & ~hf_kept) / np.sum(valid)
    np.testing.assert_allclose(float(m["fraction_dropped"]), real_dropped, rtol=1e-6)


def test_slot_limit_per_group_from_real_tokens():
    logits, valid = _random_case(seed=5, t=12)
    real = jnp.asarray(valid.sum(1), jnp.int32)
    limit = routing.capacity_by_real_tokens(real, 12, E, 1.0, 1)
    expect = [routing.expert_capacity(int(n), E, 1.0, 1) for n in valid.sum(1)]
    np.testing.assert_array_equal(limit, expect)
    # Each group routes as if it had only its real tokens and their capacity: the slot limit
    # equals re-routing the group alone, unpadded, with the static rule.
    r = jax.jit(
        lambda lg, v, lim: routing.route(lg, v, num_selected_experts=1, capacity=3, slot_limit=lim)
    )(jnp.asarray(logits), jnp.asarray(valid), limit)
    for gi in range(logits.shape[0]):
        n = int(valid[gi].sum())
        alone = _route(
            jnp.asarray(logits[gi][valid[gi]])[None],
            jnp.ones((1, n), bool),
            num_selected_experts=1,
            capacity=routing.expert_capacity(n, E, 1.0, 1),
        )
        np.testing.assert_array_equal(np.asarray(r.kept)[gi][valid[gi]], alone.kept[0])
    assert not np.asarray(r.kept)[valid].all(), "the case must drop tokens"


def test_bad_slot_impl():
    with pytest.raises(ValueError, match="slot_impl"):
        _route(
            jnp.zeros((1, 2, E)),
            jnp.ones((1, 2), bool),
            num_selected_experts=1,
            capacity=1,
            slot_impl="bogus",
        )


def test_registered_switch_and_topk_routers_are_route_and_its_losses():
    """router_type "switch"/"topk" (the registry) give `route`'s slots, losses and metrics."""
    logits = jax.random.normal(jax.random.key(3), (2, 12, E), jnp.float32) * 2
    valid = jnp.arange(12)[None, :] < jnp.array([[12], [7]])
    for router_type, k in (("switch", 1), ("topk", 2)):
        config = SwitchConfig(num_experts=E, router_type=router_type, num_selected_experts=k)
        call = routing.RouteCall(capacity=3, batch_prioritized=True, slot_impl="cumsum")
        out = routing.make_router(config)(logits, valid, call)
        r = routing.route(logits, valid, num_selected_experts=k, capacity=3, batch_prioritized=True)
        plan = routing.plan_from_routing(r)
        for field in ("expert", "position", "weight", "kept"):
            np.testing.assert_array_equal(getattr(out.plan, field), getattr(plan, field))
        assert (out.plan.capacity, out.plan.num_experts) == (3, E)
        np.testing.assert_array_equal(
            out.losses["load_balancing_loss"],
            routing.load_balancing_loss(r.router_probs, r.expert_index, valid),
        )
        np.testing.assert_array_equal(
            out.losses["router_z_loss"], routing.router_z_loss(r.router_logits, valid)
        )
        want = routing.routing_metrics(r)
        assert set(out.metrics) == set(want)
        for name in want:
            np.testing.assert_array_equal(out.metrics[name], want[name])


def test_plan_from_slots_reads_per_slot_picks_from_the_token_side():
    # 1 group, 2 experts, 2 slots, 3 tokens: expert 0 holds tokens 2 and 0, expert 1 token 2
    # and an empty slot (3 = out of range).
    token = jnp.array([[[2, 0], [2, 3]]], jnp.int32)
    weight = jnp.array([[[0.5, 0.25], [0.75, 9.0]]], jnp.float32)
    plan = routing.plan_from_slots(token, weight, 3)
    np.testing.assert_array_equal(plan.expert[0], [[0, 1]] * 3)
    np.testing.assert_array_equal(plan.kept[0], [[True, False], [False, False], [True, True]])
    np.testing.assert_array_equal(plan.position[0][plan.kept[0]], [1, 0, 0])
    np.testing.assert_array_equal(plan.weight[0], [[0.25, 0.0], [0.0, 0.0], [0.5, 0.75]])
