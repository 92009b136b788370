"""Extending the MoE layer from outside switch_t5/: a router, a dispatch and a metric registered
here route, dispatch and log a tiny model without any edit of the library."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from tiny import tiny_config, tiny_train_step

from switch_t5 import (
    errors,
    metrics_logging,
    moe,
    moe_metrics,
    routing,
    run_dir,
)

FIRST_FIT = "test_first_fit"
EXPERT_CHOICE = "test_expert_choice"
TOY_DISPATCH = "test_scatter_copy"
KEPT = "test_kept_fraction"


def first_fit_router(config):
    """Deterministic token choice: the real tokens of a group fill expert 0's slots in sequence
    order, then expert 1's, ...; the rest is dropped. Weight 1, no losses."""

    def run(logits, valid, call):
        g, t, e = logits.shape
        # [g, t] rank of each real token among the real tokens of its group.
        rank = jnp.cumsum(valid.astype(jnp.int32), axis=1) - 1
        expert = rank // call.capacity
        kept = valid & (expert < e)
        plan = routing.DispatchPlan(
            expert=jnp.clip(expert, 0, e - 1)[..., None],
            position=(rank % call.capacity)[..., None],
            weight=jnp.ones((g, t, 1), jnp.float32),
            kept=kept[..., None],
            capacity=call.capacity,
            num_experts=e,
        )
        # [g, t] -> [e]
        processed = jnp.sum(jax.nn.one_hot(expert, e) * kept[..., None], axis=(0, 1))
        kept_fraction = jnp.sum(kept) / jnp.maximum(jnp.sum(valid), 1)
        return routing.RouterOutput(plan, {}, {KEPT: kept_fraction, "tokens_per_expert": processed})

    return run


def expert_choice_router(config):
    """Expert choice (arXiv 2202.09368): each expert takes its `capacity` highest-probability real
    tokens of the group, weighted by their router probability."""

    def run(logits, valid, call):
        t = logits.shape[1]
        probs = jax.nn.softmax(logits, axis=-1)
        # [g, t, e] -> [g, e, t] -> [g, e, c]
        scores = jnp.where(valid[..., None], probs, -1.0).swapaxes(1, 2)
        weight, token = jax.lax.top_k(scores, call.capacity)
        token = jnp.where(weight >= 0, token, t)
        plan = routing.plan_from_slots(token, jnp.maximum(weight, 0.0), t)
        return routing.RouterOutput(plan, {}, {KEPT: jnp.mean(jnp.any(plan.kept, -1))})

    return run


@pytest.fixture(scope="module", autouse=True)
def registered():
    moe_metrics.register(
        moe_metrics.MoeMetric(
            KEPT,
            shown=frozenset({moe_metrics.JSONL, moe_metrics.TENSORBOARD, moe_metrics.PROGRESS}),
            description="real tokens with a slot / real tokens",
        )
    )
    routing.register_router(FIRST_FIT, first_fit_router)
    routing.register_router(EXPERT_CHOICE, expert_choice_router)
    moe.register_dispatch(TOY_DISPATCH, moe.ScatterDispatch())
    yield
    moe.unregister_dispatch(TOY_DISPATCH)
    routing.unregister_router(EXPERT_CHOICE)
    routing.unregister_router(FIRST_FIT)
    moe_metrics.unregister(KEPT)


def _toy_config():
    """Built after the fixture registered the router (the config validates router_type).

    Capacity max(round(0.5 * 8 / 4), 1) = 1 slot per expert and group of 8 tokens: the first fit
    keeps 4 of every 8 real tokens.
    """
    return tiny_config(
        router_type=FIRST_FIT,
        moe_layer_interval=2,
        dropout_rate=0.0,
        router_jitter_noise=0.0,
        train_capacity_factor=0.5,
        min_expert_capacity=1,
        group_size=8,
    )


def _batch(batch=8, inputs=16, targets=8):
    """Every token real (no padding), so every routing group holds 8 real tokens."""
    rng = np.random.default_rng(0)
    tgt = rng.integers(2, 128, (batch, targets)).astype(np.int32)
    return {
        "encoder_input_tokens": rng.integers(2, 128, (batch, inputs)).astype(np.int32),
        "decoder_input_tokens": np.concatenate([np.zeros((batch, 1), np.int32), tgt[:, :-1]], 1),
        "decoder_target_tokens": tgt,
    }


def test_registered_router_and_metric_train_through_make_train_step(mesh_222):
    run, batch = tiny_train_step(_toy_config(), mesh_222, _batch())
    state = run.setup.init_fn()
    for _ in range(2):
        state, metrics = run.train_step(state, batch)
    m = jax.device_get(metrics)
    assert np.isfinite(m["loss"])
    assert float(m[KEPT]) == 0.5
    # One MoE layer per stack: 128 encoder tokens in 16 groups, 64 decoder tokens in 8 groups,
    # one token per expert and group.
    np.testing.assert_array_equal(m["tokens_per_expert"], [[16.0] * 4, [8.0] * 4])
    # What the toy router does not compute is not reported (and adds no loss).
    assert "expert_usage" not in m and "load_balancing_loss" not in m
    np.testing.assert_allclose(m["loss"], m["cross_entropy"] + m["z_loss"], rtol=1e-5)


def test_unknown_router_type_is_one_line_naming_the_registered_ones():
    with pytest.raises(errors.UserError) as e:
        tiny_config(router_type="nope")
    message = str(e.value)
    assert "\n" not in message
    assert "router_type='nope'" in message
    for name in ("'switch'", "'topk'", repr(FIRST_FIT)):
        assert name in message


def _layer_apply(config, variables, x):
    layer = moe.MoeLayer(config)
    out, state = jax.jit(lambda v, x: layer.apply(v, x, mutable=["intermediates"]))(variables, x)
    return np.asarray(out), moe.collect_moe_intermediates(state["intermediates"])


def _reference_expert_choice(params, x, capacity):
    """Each expert's MLP on its top-`capacity` tokens by router probability, weighted by it."""
    p = jax.device_get(nn.unbox(params))
    xg = np.asarray(x, np.float64).reshape(-1, 8, x.shape[-1])
    probs = np.asarray(jax.nn.softmax(xg @ p["router"]["w"]["kernel"], -1))
    wi, wo = p["expert"]["wi"]["kernel"], p["expert"]["wo"]["kernel"]
    out = np.zeros_like(xg)
    for g in range(xg.shape[0]):
        for e in range(wi.shape[0]):
            for t in np.argsort(-probs[g, :, e], kind="stable")[:capacity]:
                out[g, t] += probs[g, t, e] * (np.maximum(xg[g, t] @ wi[e], 0.0) @ wo[e])
    return out.reshape(x.shape)


@pytest.mark.parametrize("dispatch", ["einsum", "scatter", TOY_DISPATCH])
def test_expert_choice_router_and_registered_dispatch(dispatch):
    """A router where experts pick tokens runs through every capacity dispatch, including one
    registered here, and gives each expert's top tokens (a token may get 0 or several experts)."""
    c = tiny_config(
        router_type=EXPERT_CHOICE,
        dispatch=dispatch,
        group_size=8,
        eval_capacity_factor=1.0,
        min_expert_capacity=1,
        router_init_stddev=1.0,
    )
    x = jax.random.normal(jax.random.key(0), (2, 8, 8), jnp.float32)
    variables = jax.jit(moe.MoeLayer(c).init)(jax.random.key(1), x)
    out, stats = _layer_apply(c, variables, x)
    capacity = routing.expert_capacity(8, 4, 1.0, 1)
    want = _reference_expert_choice(variables["params"], x, capacity)
    np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-6)
    # 4 experts x 2 slots over 8 tokens: some tokens are picked twice, so some are never picked.
    assert 0.0 < float(stats[KEPT]) < 1.0


def test_logger_and_plots_follow_the_schema(tmp_path, capsys):
    logger = metrics_logging.MetricsLogger(str(tmp_path), total_steps=1, progress="lines")
    usage = np.full((2, 4), 0.25, np.float32)
    logger.write(
        1, "train", {"loss": 2.0, KEPT: 0.5, "expert_usage": usage, "tokens_per_expert": 4 * usage}
    )
    logger.progress(1, {"loss": 2.0, KEPT: 0.5})
    logger.close()
    assert f" {KEPT} 0.5" in capsys.readouterr().out
    record = json.loads((tmp_path / run_dir.METRICS_FILE).read_text())
    assert record[KEPT] == 0.5 and record["tokens_per_expert"] == [[1.0] * 4] * 2
    written = metrics_logging.make_plots(str(tmp_path))
    assert set(written) == {"loss", "expert_load", "tokens_per_expert"}


def test_a_metric_the_schema_does_not_declare_is_an_error_naming_it():
    def undeclared(config):
        def run(logits, valid, call):
            out = first_fit_router(config)(logits, valid, call)
            return routing.RouterOutput(out.plan, {}, {"test_undeclared": jnp.zeros(())})

        return run

    routing.register_router("test_undeclared_metric", undeclared)
    try:
        c = tiny_config(router_type="test_undeclared_metric", min_expert_capacity=1)
        x = jnp.zeros((1, 8, 8), jnp.float32)
        with pytest.raises(ValueError, match="'test_undeclared' is not declared"):
            jax.eval_shape(moe.MoeLayer(c).init, jax.random.key(0), x)
    finally:
        routing.unregister_router("test_undeclared_metric")
