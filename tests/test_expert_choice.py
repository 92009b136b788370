"""Expert-choice routing (`router_type="experts_choose"`, arXiv 2202.09368): every expert takes
its top-C real tokens of each routing group, padding never; encoder layers and capacity
dispatches only; per-sequence inference groups; no cross-group gather of the router
probabilities on the (2, 2, 2) mesh; training on one device and on the mesh."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from tiny import tiny_config, tiny_train_step

from switch_t5 import errors, moe, partitioning, routing

EC = routing.EXPERTS_CHOOSE


def ec_config(**overrides):
    """Encoder-only MoE (the decoder stays dense: expert choice is not causal)."""
    fields = dict(
        router_type=EC,
        decoder_sparse_layers=(),
        dropout_rate=0.0,
        router_jitter_noise=0.0,
        router_init_stddev=1.0,
        group_size=8,
    )
    return tiny_config(**{**fields, **overrides})


# 4 groups of 8 tokens with 8, 5, 2 and 0 real tokens (right padding).
REAL = np.array([8, 5, 2, 0])
VALID = np.arange(8)[None, :] < REAL[:, None]


def _route(logits, valid, capacity, slot_limit=None):
    run = routing.make_router(ec_config())

    @jax.jit
    def routed(logits, valid, slot_limit):
        return run(logits, valid, routing.RouteCall(capacity=capacity, slot_limit=slot_limit))

    return routed(jnp.asarray(logits), jnp.asarray(valid), slot_limit)


def _expert_tokens(plan):
    """{(group, expert): tokens in slot order} of the kept claims."""
    kept, pos = np.asarray(plan.kept), np.asarray(plan.position)
    out = {}
    for g, t, e in zip(*np.nonzero(kept)):
        out.setdefault((g, e), []).append((pos[g, t, e], t))
    return {k: [t for _, t in sorted(v)] for k, v in out.items()}


@pytest.mark.parametrize("slot_limit", [None, [3, 2, 4, 4]])
def test_each_expert_takes_its_top_min_c_real_tokens_never_padding(slot_limit):
    logits = jax.random.normal(jax.random.key(0), (4, 8, 4), jnp.float32) * 3
    capacity = 4
    out = _route(logits, VALID, capacity, None if slot_limit is None else jnp.array(slot_limit))
    plan = out.plan
    probs = np.asarray(jax.nn.softmax(logits, -1))
    limit = np.full(4, capacity) if slot_limit is None else np.array(slot_limit)
    taken = _expert_tokens(plan)
    for g in range(4):
        for e in range(4):
            n = min(limit[g], REAL[g])
            # The n real tokens of highest probability for this expert, best first.
            want = [int(t) for t in np.argsort(-probs[g, : REAL[g], e], kind="stable")[:n]]
            assert [int(t) for t in taken.get((g, e), [])] == want, (g, e)
    kept = np.asarray(plan.kept)
    assert not kept[~VALID].any(), "padding was taken"
    np.testing.assert_array_equal(np.asarray(plan.weight)[kept], probs[kept])
    per_expert = np.minimum(limit, REAL).sum()
    np.testing.assert_array_equal(out.metrics["tokens_per_expert"], [per_expert] * 4)
    # Metrics over the real tokens: no expert / several experts.
    experts_per_token = kept.sum(-1)[VALID]
    np.testing.assert_allclose(
        out.metrics["fraction_dropped"], np.mean(experts_per_token == 0), rtol=1e-6
    )
    np.testing.assert_allclose(
        out.metrics["fraction_multi_routed"], np.mean(experts_per_token > 1), rtol=1e-6
    )
    np.testing.assert_allclose(
        out.metrics["router_confidence"], probs.max(-1)[VALID].mean(), rtol=1e-6
    )
    # Balanced by construction: no load-balancing loss; the router z-loss as token choice.
    assert set(out.losses) == {"router_z_loss"}
    np.testing.assert_allclose(
        out.losses["router_z_loss"], routing.router_z_loss(logits, jnp.asarray(VALID)), rtol=1e-6
    )


@pytest.mark.parametrize("dispatch", ["scatter", "einsum"])
def test_layer_takes_min_c_real_tokens_per_group_and_combines_by_probability(dispatch):
    c = ec_config(dispatch=dispatch, eval_capacity_factor=1.0, min_expert_capacity=1)
    x = jax.random.normal(jax.random.key(1), (4, 8, 8), jnp.float32)
    layer = moe.MoeLayer(c)
    v = jax.jit(layer.init)(jax.random.key(2), x)
    out, state = jax.jit(lambda v, x: layer.apply(v, x, VALID, mutable=["intermediates"]))(v, x)
    stats = moe.collect_moe_intermediates(state["intermediates"])
    capacity = routing.expert_capacity(8, 4, 1.0, 1)  # round(1.0 * 8 / 4) = 2
    np.testing.assert_array_equal(stats["tokens_per_expert"], [[2 + 2 + 2 + 0] * 4])
    assert "load_balancing_loss" not in stats and "expert_usage" not in stats
    # Reference: each expert's MLP on its top tokens, weighted by their router probability.
    p = jax.device_get(nn.unbox(v["params"]))
    xs = np.asarray(x, np.float64)
    probs = np.asarray(jax.nn.softmax(xs @ p["router"]["w"]["kernel"], -1))
    wi, wo = p["expert"]["wi"]["kernel"], p["expert"]["wo"]["kernel"]
    want = np.zeros_like(xs)
    for g in range(4):
        for e in range(4):
            for t in np.argsort(-probs[g, : REAL[g], e], kind="stable")[:capacity]:
                want[g, t] += probs[g, t, e] * (np.maximum(xs[g, t] @ wi[e], 0.0) @ wo[e])
    np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-6)
    assert np.all(np.asarray(out)[~VALID] == 0)


def _one_line_error(**overrides):
    with pytest.raises(errors.UserError) as e:
        tiny_config(router_type=EC, **overrides)
    message = str(e.value)
    assert "\n" not in message
    return message


def test_decoder_sparse_layer_and_dropless_dispatch_are_refused_naming_the_fix():
    # The tiny model's default layout makes decoder layer 1 sparse.
    message = _one_line_error()
    assert "not causal" in message and "decoder layers (1,)" in message
    assert "decoder_sparse_layers=()" in message and "router_type='switch'" in message
    for dispatch in ("dropless", "ragged"):
        message = _one_line_error(decoder_sparse_layers=(), dispatch=dispatch)
        assert f"dispatch={dispatch!r}" in message and "dispatch='auto'" in message
        assert "not causal" not in message
    assert ec_config().sparse_layers("encoder") == (1,)


def test_expert_choice_in_the_encoder_with_a_switch_decoder():
    # decoder_router_type: the decoder's sparse layers route top-1, the encoder's by expert choice.
    c = ec_config(decoder_sparse_layers=None, decoder_router_type="switch")
    assert c.sparse_layers("decoder") == (1,)
    assert c.stack_config("decoder").router_type == "switch"
    x = jax.random.normal(jax.random.key(3), (2, 8, 8), jnp.float32)
    sown = {}
    for stack, is_encoder in (("encoder", True), ("decoder", False)):
        layer = moe.MoeLayer(c, is_encoder=is_encoder)
        v = jax.jit(layer.init)(jax.random.key(2), x)
        _, state = jax.jit(lambda v, x, layer=layer: layer.apply(v, x, mutable=["intermediates"]))(
            v, x
        )
        sown[stack] = set(state["intermediates"])
    assert (
        "fraction_multi_routed" in sown["encoder"] and "load_balancing_loss" not in sown["encoder"]
    )
    assert (
        "load_balancing_loss" in sown["decoder"] and "fraction_multi_routed" not in sown["decoder"]
    )
    with pytest.raises(
        errors.UserError, match="decoder_router_type='experts_choose' is not causal"
    ):
        tiny_config(decoder_router_type=EC)


def test_inference_routing_of_a_sequence_ignores_its_batch_mates():
    """`for_inference` makes each sequence its own group: an expert picks among that sequence's
    real tokens only, whatever the other rows (or its padding length) are."""
    c = ec_config(group_size=16)
    a = jax.random.normal(jax.random.key(3), (1, 8, 8), jnp.float32)
    mates = [jax.random.normal(jax.random.key(s), (1, 8, 8), jnp.float32) * 4 for s in (4, 5)]
    layer = moe.MoeLayer(c)
    v = jax.jit(layer.init)(jax.random.key(6), a)
    mask = jnp.ones((2, 8), bool).at[0, 6:].set(False)

    def first_row(config, mate):
        x = jnp.concatenate([a, mate])
        return np.asarray(jax.jit(moe.MoeLayer(config).apply)(v, x, mask))[0]

    inference = c.for_inference()
    assert inference.routing_groups == "sequence"
    ref = first_row(inference, mates[0])
    np.testing.assert_allclose(first_row(inference, mates[1]), ref, rtol=1e-6, atol=1e-7)
    alone = np.asarray(jax.jit(moe.MoeLayer(inference).apply)(v, a, mask[:1]))[0]
    np.testing.assert_allclose(alone, ref, rtol=1e-6, atol=1e-7)
    # With one group of 16 tokens over both rows (training's grouping) the mate does matter:
    # the check above is not vacuous.
    assert not np.allclose(first_row(c, mates[0]), first_row(c, mates[1]), atol=1e-4)


def _train_batch():
    """8 x 16 encoder tokens, the last 4 of each row padding; 8 decoder tokens."""
    rng = np.random.default_rng(0)
    enc = rng.integers(2, 128, (8, 16)).astype(np.int32)
    enc[:, 12:] = 0
    tgt = rng.integers(2, 128, (8, 8)).astype(np.int32)
    return {
        "encoder_input_tokens": enc,
        "decoder_input_tokens": np.concatenate([np.zeros((8, 1), np.int32), tgt[:, :-1]], 1),
        "decoder_target_tokens": tgt,
        "decoder_loss_weights": np.ones((8, 8), np.float32),
    }


# 128 encoder tokens in 8 groups of 16 (12 real each): 2 groups per batch shard of the mesh.
TRAIN_CFG = ec_config(group_size=16, router_init_stddev=2e-2)


def _train(mesh, steps=2):
    """(losses, last metrics, compiled HLO text) of `steps` train steps of TRAIN_CFG."""
    run, batch = tiny_train_step(TRAIN_CFG, mesh, _train_batch())
    st, step = run.setup, run.train_step
    state, losses = st.init_fn(), []
    for _ in range(steps):
        state, metrics = step(state, batch)
        losses.append(float(metrics["loss"]))
    hlo = step.jitted.lower(st.abstract_state, batch).compile().as_text()
    return losses, jax.device_get(metrics), hlo


@pytest.fixture(scope="module")
def trained(mesh_222):
    one = partitioning.make_mesh(1, 1, 1, num_experts=4, devices=jax.devices()[:1])
    return {"one": _train(one), "mesh": _train(mesh_222)}


def test_trains_on_one_device_and_on_the_mesh_with_the_same_losses(trained):
    (one, m1, _), (mesh, m8, _) = trained["one"], trained["mesh"]
    assert all(np.isfinite(one)) and all(np.isfinite(mesh))
    # Routing groups never depend on the mesh, so neither do the losses.
    np.testing.assert_allclose(mesh, one, rtol=1e-5, atol=1e-6)
    # Capacity round(1.25 * 16 / 4) = 5 of 12 real tokens in each of 8 groups, every expert.
    np.testing.assert_array_equal(m8["tokens_per_expert"], [[40.0] * 4])
    np.testing.assert_array_equal(m1["tokens_per_expert"], m8["tokens_per_expert"])
    assert 0.0 <= float(m8["fraction_dropped"]) < 1.0
    assert 0.0 < float(m8["fraction_multi_routed"]) < 1.0
    assert "load_balancing_loss" not in m8


def test_top_c_does_not_gather_router_probabilities_across_groups(trained):
    """The routing groups (`[groups, tokens, experts]` probabilities, `[groups, experts,
    capacity]` slot tables) are sharded 4 ways over (data, expert); expert choice's top-C and
    its slot scatter must stay on each group shard. Criterion: no all-gather of the compiled
    train step comes from the MoE layer's routing, i.e. has an op_name under an MoE layer's
    `mlp/` but not under its experts (`mlp/expert/`, whose kernels the tiny step may gather as
    the token-choice router's step does). A gather of the router's arrays would appear there
    (the per-group scatter of `routing.plan_from_slots` was once all-gathered there as
    s32[8,4,5] slot tables), and neither the probabilities f32[8,16,4] nor their [8,4,16]
    transpose may be all-gathered anywhere.
    """
    hlo = trained["mesh"][2]
    gathers = re.findall(r"= (\w+\[[\d,]*\])\S* all-gather(?:-start)?\([^\n]*", hlo)
    assert gathers, "expected some all-gather in the step (sanity of the pattern)"
    lines = re.findall(r"= \w+\[[\d,]*\]\S* all-gather(?:-start)?\([^\n]*", hlo)
    routing_side = [line for line in lines if re.search(r'op_name="[^"]*/mlp/(?!expert/)', line)]
    assert not routing_side, routing_side
    for shape in ("f32[8,16,4]", "f32[8,4,16]"):
        assert shape not in gathers, gathers
