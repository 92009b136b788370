"""Shared and fine-grained experts (DeepSeekMoE, arXiv 2401.06066): a sparse layer's output is
the shared MLP plus the routed experts of width `expert_d_ff`, on one device and on the
(2, 2, 2) mesh; capacity = cf x k x tokens / experts on request; the planner's counts against a
hand count; what HF export and upcycling refuse; old checkpoints' metas still match."""

import dataclasses

import gin
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from tiny import random_batch, tiny_config, tiny_train_step

from switch_t5 import checkpoints, errors, moe, partitioning, plan
from switch_t5.interop import hf, upcycle

# 4 experts of width 6 (d_ff 16), top-2, 2 shared experts of width 6: odd sizes so that a
# swapped axis fails loudly; the model axis (2) divides 6 and the shared width 12.
FINE = tiny_config(
    expert_d_ff=6,
    num_shared_experts=2,
    router_type="topk",
    num_selected_experts=2,
    group_size=6,
    # cf x k x 6 / 4 = 6 slots: every expert can take its whole group, nothing is dropped.
    eval_capacity_factor=2.0,
    capacity_scales_with_k=True,
    min_expert_capacity=1,
    router_jitter_noise=0.0,
    router_init_stddev=1.0,
    dropout_rate=0.0,
)


def _x(shape, seed=0):
    return jax.random.normal(jax.random.key(seed), shape, jnp.float32)


def _variables(config, x):
    return nn.unbox(jax.jit(moe.MoeLayer(config).init)(jax.random.key(1), x))


def _by_hand(config, params, x):
    """Every token's top-k routed experts (gates not renormalised) plus the S shared experts,
    each shared expert its own [d, f] x [f, d] MLP: the column slice s of the shared kernel."""
    p = jax.device_get(params["params"])
    xs = np.asarray(x, np.float64).reshape(-1, x.shape[-1])
    logits = xs @ p["router"]["w"]["kernel"]
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    wi, wo = p["expert"]["wi"]["kernel"], p["expert"]["wo"]["kernel"]
    f = config.expert_width
    assert wi.shape == (config.num_experts, config.d_model, f)
    swi, swo = p["shared_experts"]["wi"]["kernel"], p["shared_experts"]["wo"]["kernel"]
    assert swi.shape == (config.d_model, config.num_shared_experts * f)
    out = np.zeros_like(xs)
    for t, row in enumerate(xs):
        for e in np.argsort(-probs[t], kind="stable")[: config.num_selected_experts]:
            out[t] += probs[t, e] * (np.maximum(row @ wi[e], 0.0) @ wo[e])
        for s in range(config.num_shared_experts):
            cols = slice(s * f, (s + 1) * f)
            out[t] += np.maximum(row @ swi[:, cols], 0.0) @ swo[cols]
    return out.reshape(x.shape)


def _apply(config, variables, x):
    def f(v, x):
        out, state = moe.MoeLayer(config).apply(v, x, mutable=["intermediates"])
        return out, moe.collect_moe_intermediates(state["intermediates"])["fraction_dropped"]

    return jax.jit(f)(variables, x)


def test_param_paths_and_logical_axes():
    boxed = jax.eval_shape(moe.MoeLayer(FINE).init, jax.random.key(0), _x((2, 6, 8)))["params"]
    specs = nn.get_partition_spec(boxed)
    # Routed experts of width expert_d_ff; the shared experts a dense MLP of width S x expert_d_ff.
    assert boxed["expert"]["wi"]["kernel"].value.shape == (4, 8, 6)
    assert specs["expert"]["wo"]["kernel"] == P("expert", "mlp", "embed")
    assert boxed["shared_experts"]["wi"]["kernel"].value.shape == (8, 12)
    assert specs["shared_experts"]["wi"]["kernel"] == P("embed", "mlp")
    assert specs["shared_experts"]["wo"]["kernel"] == P("mlp", "embed")
    # The defaults add nothing: the params of a plain Switch layer are unchanged.
    plain = jax.eval_shape(moe.MoeLayer(tiny_config()).init, jax.random.key(0), _x((2, 6, 8)))[
        "params"
    ]
    assert set(plain) == {"router", "expert"}
    assert plain["expert"]["wi"]["kernel"].value.shape == (4, 8, 16)


@pytest.mark.parametrize("dispatch", ["scatter", "einsum", "dropless"])
def test_output_is_shared_mlp_plus_routed_experts_by_hand(dispatch):
    config = dataclasses.replace(FINE, dispatch=dispatch)
    x = _x((2, 6, 8), seed=2)
    v = _variables(config, x)
    out, dropped = _apply(config, v, x)
    assert float(dropped) == 0.0
    np.testing.assert_allclose(out, _by_hand(config, v, x), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dispatch", ["scatter", "dropless"])
def test_output_by_hand_on_the_mesh(mesh_222, dispatch):
    # 8 x 6 tokens in groups of 6: 2 groups per batch shard; experts over the expert axis, the
    # expert and shared widths over the model axis.
    config = dataclasses.replace(FINE, dispatch=dispatch)
    x = _x((8, 6, 8), seed=3)
    layer = moe.MoeLayer(config)
    with jax.set_mesh(mesh_222), partitioning.axis_rules():
        abstract = jax.eval_shape(layer.init, jax.random.key(0), x)
    p_shard = partitioning.params_shardings(abstract, mesh_222)
    assert p_shard["params"]["shared_experts"]["wi"]["kernel"].spec == P(None, "model")
    x_shard = NamedSharding(mesh_222, P(("data", "expert"), None, None))
    v = _variables(config, x)
    with jax.set_mesh(mesh_222), partitioning.axis_rules():
        f = jax.jit(lambda v, x: layer.apply(v, x), in_shardings=(p_shard, x_shard))
        out = f(jax.device_put(v, p_shard), jax.device_put(x, x_shard))
    np.testing.assert_allclose(out, _by_hand(config, v, x), rtol=1e-5, atol=1e-6)


def test_capacity_scales_with_k_only_when_asked():
    # The case: k = 4, cf 1.25, 32 experts, groups of 512 tokens.
    base = tiny_config(
        num_experts=32, router_type="topk", num_selected_experts=4, min_expert_capacity=1
    )
    flax_rule = moe.capacity_rule(base, 512, training=True)
    assert flax_rule.capacity == 20  # round(1.25 x 512 / 32): Flaxformer's, k left out
    scaled = dataclasses.replace(base, capacity_scales_with_k=True)
    assert moe.capacity_rule(scaled, 512, training=True).capacity == 80  # round(1.25 x 4 x 16)
    assert moe.capacity_rule(scaled, 512, training=False).capacity == 128  # eval cf 2.0
    # Per-sequence groups read the factor (k included) from the rule, per real-token count.
    rule = moe.capacity_rule(dataclasses.replace(scaled, routing_groups="sequence"), 64, True)
    assert (rule.capacity, rule.capacity_factor) == (10, 5.0)


def test_capacity_option_stops_the_drops_of_fine_grained_top_k():
    # 32 experts, k = 4, cf 1.25 over 64 tokens: 3 slots per expert without the option (about
    # 70% of the choices dropped under a near-uniform router), 10 with it.
    config = tiny_config(
        num_experts=32,
        router_type="topk",
        num_selected_experts=4,
        eval_capacity_factor=1.25,
        min_expert_capacity=1,
        group_size=64,
        router_jitter_noise=0.0,
        dispatch="scatter",
    )
    x = _x((1, 64, 8), seed=4)
    v = _variables(config, x)
    _, dropped = _apply(config, v, x)
    _, dropped_scaled = _apply(dataclasses.replace(config, capacity_scales_with_k=True), v, x)
    assert float(dropped) > 0.5
    assert float(dropped_scaled) < 0.5 * float(dropped)


def _train_losses(config, mesh):
    batch = random_batch(0, 8, 12, 6)
    run, batch = tiny_train_step(config, mesh, batch)
    state, losses = run.setup.init_fn(), []
    for _ in range(2):
        state, metrics = run.train_step(state, batch)
        losses.append(float(metrics["loss"]))
    return losses


@pytest.mark.slow
def test_trains_on_one_device_and_on_the_mesh_with_the_same_losses(mesh_222):
    config = dataclasses.replace(FINE, group_size=12, router_init_stddev=2e-2)
    one = partitioning.make_mesh(1, 1, 1, num_experts=4, devices=jax.devices()[:1])
    on_one, on_mesh = _train_losses(config, one), _train_losses(config, mesh_222)
    assert all(np.isfinite(on_one))
    np.testing.assert_allclose(on_mesh, on_one, rtol=1e-5, atol=1e-6)


# configs/models/tiny.gin: vocab 32128, d_model 128, 4 heads x 24, d_ff 320, 2 + 2 layers, layer
# 1 of each stack sparse; here 32 routed experts of d_ff / 4 = 80, top-3, 1 shared.
PLAN_BINDINGS = [
    "--gin.switch_t5.SwitchConfig.num_experts=32",
    "--gin.switch_t5.SwitchConfig.expert_d_ff=80",
    "--gin.switch_t5.SwitchConfig.num_shared_experts=1",
    "--gin.switch_t5.SwitchConfig.router_type='topk'",
    "--gin.switch_t5.SwitchConfig.num_selected_experts=3",
]


def _plan_counts(capsys, bindings):
    gin.clear_config()
    try:
        plan.main(["--gin_file=configs/models/tiny.gin", *bindings])
    finally:
        gin.clear_config()
    lines = dict(line.split(": ", 1) for line in capsys.readouterr().out.splitlines())
    return int(lines["total_params"]), int(lines["active_params_per_token"]), lines["experts"]


def test_plan_counts_shared_and_fine_grained_experts_by_hand(capsys):
    d, inner, vocab, d_ff = 128, 4 * 24, 32128, 320
    attention = 4 * d * inner
    mlp = 2 * d * d_ff
    rel_bias = 32 * 4  # buckets x heads, one table per stack
    enc_layer, dec_layer = attention + 2 * d, 2 * attention + 3 * d  # + norms; MLPs below
    dense_ffn_layers = 2  # layer 0 of each stack
    common = vocab * d + 2 * (enc_layer + dec_layer) + 2 * (rel_bias + d)
    router, expert, shared = d * 32, 2 * d * 80, 2 * d * 80
    sparse = router + 32 * expert + shared
    total = common + dense_ffn_layers * mlp + 2 * sparse
    active = common + dense_ffn_layers * mlp + 2 * (router + 3 * expert + shared)
    got_total, got_active, experts = _plan_counts(capsys, PLAN_BINDINGS)
    assert (got_total, got_active) == (total, active)
    assert experts.startswith("32, top-3 of width 80, 1 shared;")
    # The plain tiny model: 4 experts of width d_ff, top-1, nothing shared.
    got_total, got_active, _ = _plan_counts(capsys, [])
    plain_sparse = d * 4 + 4 * mlp
    assert got_total == common + dense_ffn_layers * mlp + 2 * plain_sparse
    assert got_active == common + dense_ffn_layers * mlp + 2 * (d * 4 + mlp)


@pytest.mark.parametrize(
    "change, name",
    [(dict(num_shared_experts=1), "num_shared_experts=1"), (dict(expert_d_ff=4), "expert_d_ff=4")],
)
def test_hf_export_and_upcycling_refuse_by_name(change, name):
    config = tiny_config(**change)
    with pytest.raises(hf.UnsupportedFeatureError, match=name) as e:
        hf.hf_config_from_ours(config)
    assert "\n" not in str(e.value)
    dense = type("Dense", (), {"config": tiny_config(num_experts=0)})()
    with pytest.raises(errors.UserError, match=name) as e:
        upcycle.upcycle_plan(dense, config)
    assert "\n" not in str(e.value)
    # expert_d_ff equal to d_ff is the plain layout: exported as usual.
    assert hf.hf_config_from_ours(tiny_config(expert_d_ff=16))["d_ff"] == 16


@pytest.mark.parametrize(
    "change, fix",
    [
        (dict(num_shared_experts=1, num_experts=0), "set num_experts > 0 or num_shared_experts=0"),
        (dict(num_shared_experts=-1), "num_shared_experts=-1 must be an integer >= 0"),
        (dict(expert_d_ff=0), "expert_d_ff=0 must be a positive integer or None"),
    ],
)
def test_bad_settings_are_one_line_errors_naming_the_fix(change, fix):
    with pytest.raises(errors.UserError, match=fix) as e:
        tiny_config(**change)
    assert "\n" not in str(e.value)


def test_model_axis_must_divide_expert_d_ff():
    problems = partitioning.mesh_problems(
        tiny_config(expert_d_ff=5), {"data": 2, "expert": 2, "model": 2}, 8, 1, {"inputs": 6}
    )
    assert any("does not divide expert_d_ff=5" in p for p in problems)


def test_checkpoints_of_older_versions_still_match():
    # A meta written before these fields existed resumes with the defaults, and a different
    # capacity rule is a runtime change; a different expert width is not.
    current = checkpoints.make_meta(tiny_config())
    old = {"model_config": dict(current["model_config"]), "vocabulary": {}}
    for name in ("num_shared_experts", "expert_d_ff", "capacity_scales_with_k"):
        del old["model_config"][name]
    checkpoints.check_meta(old, current, "old")
    checkpoints.check_meta(old, checkpoints.make_meta(tiny_config(capacity_scales_with_k=True)), "")
    with pytest.raises(checkpoints.CheckpointMismatchError, match="expert_d_ff"):
        checkpoints.check_meta(old, checkpoints.make_meta(tiny_config(expert_d_ff=8)), "old")
