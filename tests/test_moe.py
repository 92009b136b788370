"""The MoE layer: dispatch implementations, dense equivalence, jitter, sharding, intermediates.

Tiny odd sizes (embed 8, mlp 16, 4 experts, groups of 6 tokens), float32 unless stated.
"""

import dataclasses
import functools
import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from tiny import tiny_config

from switch_t5 import layers, moe, partitioning
from switch_t5.config import SwitchConfig

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

IMPLS = ("einsum", "scatter", "dropless", "ragged")

BASE = tiny_config(
    group_size=6,
    train_capacity_factor=1.0,
    eval_capacity_factor=1.0,
    min_expert_capacity=1,
    router_jitter_noise=0.0,
    dropout_rate=0.0,
)


def cfg(**kw) -> SwitchConfig:
    return dataclasses.replace(BASE, **kw)


def _x(shape=(2, 6, 8), seed=0):
    return jax.random.normal(jax.random.key(seed), shape, jnp.float32)


def _skewed(variables, scale=40.0):
    """Scales the router kernel up so that routing is confident, skewed and drops tokens."""
    v = jax.tree.map(lambda a: a, nn.unbox(variables))
    v["params"]["router"]["w"]["kernel"] = v["params"]["router"]["w"]["kernel"] * scale
    return v


@jax.jit
def _collect(tree):
    stats = moe.collect_moe_intermediates(tree)
    stats.pop("layer_names")  # strings stay outside jit
    return stats


@functools.cache
def _compiled_apply(config, train, is_encoder=True):
    layer = moe.MoeLayer(config, is_encoder)

    @jax.jit
    def f(v, x, mask, rngs):
        out, state = layer.apply(
            v, x, mask, enable_dropout=train, rngs=rngs, mutable=["intermediates"]
        )
        stats = moe.collect_moe_intermediates(state["intermediates"])
        stats.pop("layer_names")
        return out, stats

    return f


def _apply(config, variables, x, mask=None, *, train=False, rngs=None, is_encoder=True):
    """(output, averaged intermediates) of one jitted layer call; compiled once per config."""
    return _compiled_apply(config, train, is_encoder)(variables, x, mask, rngs or {})


def _init(module, x, seed=0):
    return jax.jit(module.init)(jax.random.key(seed), x)


@pytest.fixture(scope="module")
def variables():
    return nn.unbox(_init(moe.MoeLayer(BASE), _x(), seed=1))


def test_param_names_shapes_and_init():
    boxed = jax.eval_shape(moe.MoeLayer(cfg(num_experts=4)).init, jax.random.key(0), _x())
    boxed = boxed["params"]
    specs = nn.get_partition_spec(boxed)
    assert boxed["router"]["w"]["kernel"].value.shape == (8, 4)
    assert specs["router"]["w"]["kernel"] == P("embed", "unmodeled")
    assert boxed["expert"]["wi"]["kernel"].value.shape == (4, 8, 16)
    assert specs["expert"]["wi"]["kernel"] == P("expert", "embed", "mlp")
    assert boxed["expert"]["wo"]["kernel"].value.shape == (4, 16, 8)
    assert specs["expert"]["wo"]["kernel"] == P("expert", "mlp", "embed")
    for leaf in jax.tree.leaves(nn.unbox(boxed)):
        assert leaf.dtype == jnp.float32
    gated_layer = moe.MoeLayer(cfg(mlp_activations=("gelu", "linear")))
    gated = jax.eval_shape(gated_layer.init, jax.random.key(0), _x())
    assert set(gated["params"]["expert"]) == {"wi_0", "wi_1", "wo"}
    # Router init normal(0, 2e-2); expert init fan-in (embed = 8) truncated normal * 0.1.
    big = cfg(d_model=64, d_ff=96, num_experts=8)
    p = nn.unbox(_init(moe.MoeLayer(big), jnp.zeros((1, 6, 64))))["params"]
    np.testing.assert_allclose(np.std(p["router"]["w"]["kernel"]), 2e-2, rtol=0.1)
    np.testing.assert_allclose(np.std(p["expert"]["wi"]["kernel"]), (0.1 / 64) ** 0.5, rtol=0.1)
    np.testing.assert_allclose(np.std(p["expert"]["wo"]["kernel"]), (0.1 / 96) ** 0.5, rtol=0.1)


@pytest.mark.parametrize("acts", [("relu",), ("gelu", "linear")])
@pytest.mark.parametrize("impl", IMPLS)
def test_one_expert_equals_dense_mlp(acts, impl):
    c = cfg(num_experts=1, mlp_activations=acts, dispatch=impl)
    x = _x()
    v = nn.unbox(_init(moe.MoeLayer(c), x, seed=2))
    out, stats = _apply(c, v, x)
    dense_params = {
        name: {"kernel": v["params"]["expert"][name]["kernel"][0]} for name in v["params"]["expert"]
    }
    dense = jax.jit(layers.MlpBlock(c).apply)({"params": dense_params}, x)
    # One expert: the router probability is exactly 1 and capacity (6 = group) drops nothing.
    np.testing.assert_allclose(out, dense, rtol=1e-5, atol=1e-6)
    assert float(stats["fraction_dropped"]) == 0.0


def test_einsum_and_scatter_identical_under_heavy_dropping(variables):
    x = _x((4, 6, 8), seed=3)
    mask = jnp.ones((4, 6), bool).at[1, 4:].set(False).at[3, :2].set(False)
    v = _skewed(variables)
    for extra in (
        {},
        {"router_type": "topk", "num_selected_experts": 2},
        {"batch_prioritized_routing": True},
        {"router_type": "topk", "num_selected_experts": 2, "batch_prioritized_routing": True},
    ):
        outs = {
            impl: _apply(cfg(dispatch=impl, eval_capacity_factor=0.7, **extra), v, x, mask)
            for impl in ("einsum", "scatter")
        }
        (oe, se), (os_, ss) = outs["einsum"], outs["scatter"]
        assert float(se["fraction_dropped"]) > 0.2, "the case must drop many tokens"
        np.testing.assert_allclose(oe, os_, rtol=1e-6, atol=1e-6)
        # Same drop set: the same tokens get an all-zero output, same per-expert counts.
        np.testing.assert_array_equal(
            np.all(np.asarray(oe) == 0, -1), np.all(np.asarray(os_) == 0, -1)
        )
        for key in se:
            np.testing.assert_array_equal(se[key], ss[key])
        # Padding gets zeros.
        assert np.all(np.asarray(oe)[~np.asarray(mask)] == 0)


@functools.cache
def _compiled_grad(config):
    layer = moe.MoeLayer(config)

    @jax.jit
    def grad(v, x, mask, cot):
        def loss(v, x):
            return jnp.sum(layer.apply(v, x, mask) * cot)

        return jax.grad(loss, argnums=(0, 1))(v, x)

    return grad


@pytest.mark.parametrize("k", [1, 2])
def test_scatter_gradients_equal_einsum_gradients_under_dropping(variables, k):
    # The scatter dispatch differentiates its gathers by hand (`_gather_rows`: the transpose of a
    # partial permutation is the inverse gather); the einsum path is plain autodiff.
    x = _x((4, 6, 8), seed=21)
    mask = jnp.ones((4, 6), bool).at[2, 3:].set(False)
    cot = _x((4, 6, 8), seed=22)
    v = _skewed(variables)
    kw = {"router_type": "topk", "num_selected_experts": k} if k > 1 else {}
    grads = {
        impl: _compiled_grad(cfg(dispatch=impl, eval_capacity_factor=0.7, **kw))(v, x, mask, cot)
        for impl in ("einsum", "scatter")
    }
    _, stats = _apply(cfg(dispatch="scatter", eval_capacity_factor=0.7, **kw), v, x, mask)
    assert float(stats["fraction_dropped"]) > 0.2, "the case must drop many tokens"
    (gv_e, gx_e), (gv_s, gx_s) = grads["einsum"], grads["scatter"]
    np.testing.assert_allclose(gx_s, gx_e, rtol=1e-5, atol=1e-6)
    for a, b in zip(jax.tree.leaves(gv_s), jax.tree.leaves(gv_e)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    # A dropped or padding token gets no gradient through the experts: only the residual
    # (outside this layer) carries it. Padding gets none at all (its router row is masked out
    # of the losses, and it has no gate).
    assert np.all(np.asarray(gx_s)[2, 3:] == 0)
    # Every expert kernel received gradient from its kept tokens.
    assert np.all(np.abs(np.asarray(gv_s["params"]["expert"]["wo"]["kernel"])).sum((1, 2)) > 0)


def test_scatter_backward_has_no_float_scatter(variables):
    hlo = (
        _compiled_grad(cfg(dispatch="scatter"))
        .lower(variables, _x(), jnp.ones((2, 6), bool), _x(seed=5))
        .compile()
        .as_text()
    )
    scatters = re.findall(r"= (\w+)\[[\d,]*\][^\n]*? scatter\(", hlo)
    # Only the int32 slot tables are built by scatters; no row of activations is scattered.
    assert scatters and set(scatters) <= {"s32"}, scatters


@pytest.mark.parametrize("acts", [("relu",), ("gelu", "linear")])
def test_expert_loop_equals_batched_einsum(acts):
    c = cfg(mlp_activations=acts, d_ff=17)
    experts = moe.Experts(c)
    x = _x((4, 3, 5, 8), seed=23)
    v = jax.jit(experts.init)(jax.random.key(3), x)
    batched = jax.jit(lambda v, x: experts.apply(v, x, loop=False))(v, x)
    looped = jax.jit(lambda v, x: experts.apply(v, x, loop=True))(v, x)
    np.testing.assert_allclose(looped, batched, rtol=1e-5, atol=1e-6)
    # With dropout: a fresh mask per expert, kept units scaled by 1 / (1 - rate).
    c_drop = cfg(mlp_activations=acts, d_ff=17, expert_dropout_rate=0.5)
    apply_drop = jax.jit(
        lambda v, x, key: moe.Experts(c_drop).apply(
            v, x, loop=True, enable_dropout=True, rngs={"dropout": key}
        )
    )
    d1, d2 = apply_drop(v, x, jax.random.key(0)), apply_drop(v, x, jax.random.key(1))
    assert not np.allclose(d1, d2) and not np.allclose(d1, batched)
    assert np.all(np.isfinite(np.asarray(d1)))


def test_loop_experts_only_on_cpu_for_big_unsharded_experts(mesh_222):
    big = (8, 128, 8192)  # rows x d_model x d_ff = LOOP_MIN_EXPERT_MACS
    assert moe.loop_experts("scatter", *big) == (jax.default_backend() == "cpu")
    assert not moe.loop_experts("scatter", 7, 128, 8192)
    assert not moe.loop_experts("dropless", *big)
    with jax.set_mesh(mesh_222), partitioning.axis_rules():
        assert not moe.loop_experts("scatter", *big)


@pytest.mark.parametrize("k", [1, 2])
def test_all_dispatch_impls_agree_without_drops(variables, k):
    x = _x((2, 6, 8), seed=4)
    mask = jnp.ones((2, 6), bool).at[0, 5].set(False)
    kw = {"router_type": "topk", "num_selected_experts": k} if k > 1 else {}
    # Capacity factor 4 = number of experts: every expert can take the whole group.
    results = [
        _apply(cfg(dispatch=impl, eval_capacity_factor=4.0, **kw), variables, x, mask)
        for impl in IMPLS
    ]
    for out, stats in results[1:]:
        np.testing.assert_allclose(out, results[0][0], rtol=1e-5, atol=1e-6)
        for key in stats:
            np.testing.assert_allclose(stats[key], results[0][1][key], rtol=1e-6, atol=1e-7)
    assert float(results[0][1]["fraction_dropped"]) == 0.0


def test_padding_takes_no_capacity(variables):
    v = _skewed(variables)
    x = _x((2, 6, 8), seed=5)
    mask = jnp.ones((2, 6), bool).at[0, :3].set(False)
    noisy = x.at[0, :3].set(100.0 * _x((3, 8), seed=6))
    for impl in ("einsum", "scatter"):
        c = cfg(dispatch=impl, eval_capacity_factor=0.7)
        (o1, s1), (o2, s2) = _apply(c, v, x, mask), _apply(c, v, noisy, mask)
        np.testing.assert_array_equal(o1, o2)
        for key in s1:
            np.testing.assert_array_equal(s1[key], s2[key])
        # 9 real tokens; the processed counts can only come from them.
        assert float(jnp.sum(s1["tokens_per_expert"])) <= 9


def test_batch_prioritized_routing_is_encoder_only(variables):
    v = _skewed(variables)
    x = _x((2, 6, 8), seed=16)
    plain, _ = _apply(cfg(eval_capacity_factor=0.7), v, x)
    bpr = cfg(eval_capacity_factor=0.7, batch_prioritized_routing=True)
    encoder, _ = _apply(bpr, v, x)
    decoder, _ = _apply(bpr, v, x, is_encoder=False)
    assert not np.array_equal(encoder, plain), "BPR must change which tokens are dropped here"
    np.testing.assert_array_equal(decoder, plain)


@pytest.mark.parametrize("impl", IMPLS)
def test_decode_sized_input(variables, impl):
    # One autoregressive step: [batch, 1, d]; 3 tokens -> one group of 3, capacity floor applies.
    x = _x((3, 1, 8), seed=7)
    c = cfg(dispatch=impl, min_expert_capacity=4)
    out, stats = _apply(c, variables, x)
    ref, _ = _apply(cfg(dispatch="dropless"), variables, x)
    assert out.shape == (3, 1, 8)
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-6)
    assert float(stats["fraction_dropped"]) == 0.0


def test_jitter_only_touches_the_router(variables):
    c = cfg(router_jitter_noise=1e-2, eval_capacity_factor=1.0, train_capacity_factor=1.0)
    v = _skewed(variables, scale=100.0)
    x = _x((2, 6, 8), seed=8)
    layer = moe.MoeLayer(c)
    seen = []

    def record(next_fun, args, kwargs, context):
        if isinstance(context.module, moe.Experts) and context.method_name == "__call__":
            seen.append(args[0])
        if isinstance(context.module, moe.routing_lib.Router):
            seen.append(next_fun(*args, **kwargs))
            return seen[-1]
        return next_fun(*args, **kwargs)

    @functools.partial(jax.jit, static_argnums=0)
    def run(train, seed):
        seen.clear()
        with nn.intercept_methods(record):
            out = layer.apply(
                v,
                x,
                enable_dropout=train,
                rngs={"jitter": jax.random.key(seed), "dropout": jax.random.key(seed)},
            )
        logits, expert_in = seen
        return out, logits, expert_in

    out_a, logits_a, in_a = run(True, 0)
    out_b, logits_b, in_b = run(True, 1)
    out_e, logits_e, in_e = run(False, 0)
    # Training: the router logits depend on the jitter rng ...
    assert not np.array_equal(logits_a, logits_b)
    assert not np.array_equal(logits_a, logits_e)
    # ... routing is the same here (confident router), and the experts saw the clean tokens,
    # bitwise: the jitter multiplies only the router's copy of the input.
    np.testing.assert_array_equal(jnp.argmax(logits_a, -1), jnp.argmax(logits_e, -1))
    np.testing.assert_array_equal(in_a, in_e)
    np.testing.assert_array_equal(in_b, in_e)
    assert not np.array_equal(out_a, out_b)  # gates = jittered probabilities
    # Eval: identical across rngs.
    out_e2, _, _ = run(False, 1)
    np.testing.assert_array_equal(out_e, out_e2)


def test_expert_dropout_uses_dropout_rng(variables):
    x = _x((2, 6, 8), seed=9)
    c = cfg(expert_dropout_rate=0.5, eval_capacity_factor=4.0, train_capacity_factor=4.0)
    o1, _ = _apply(c, variables, x, train=True, rngs={"dropout": jax.random.key(0)})
    o2, _ = _apply(c, variables, x, train=True, rngs={"dropout": jax.random.key(1)})
    oe, _ = _apply(c, variables, x)
    assert not np.allclose(o1, o2) and not np.allclose(o1, oe)
    c0 = cfg(expert_dropout_rate=0.0, eval_capacity_factor=4.0, train_capacity_factor=4.0)
    o0, _ = _apply(c0, variables, x, train=True, rngs={"dropout": jax.random.key(0)})
    np.testing.assert_allclose(o0, oe, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("aux", [False, True])
def test_router_gradient_matches_finite_differences(variables, aux):
    c = cfg(
        dispatch="scatter", eval_capacity_factor=1.0, router_type="topk", num_selected_experts=2
    )
    v = _skewed(variables, scale=10.0)
    x = _x((2, 6, 8), seed=10)
    cot = _x((2, 6, 8), seed=11)
    layer = moe.MoeLayer(c)

    @jax.jit
    def loss(w):
        params = {**v["params"], "router": {"w": {"kernel": w}}}
        out, state = layer.apply({"params": params}, x, mutable=["intermediates"])
        total = jnp.sum(out * cot)
        if aux:
            s = moe.collect_moe_intermediates(state["intermediates"])
            total = total + 10.0 * s["load_balancing_loss"] + 0.1 * s["router_z_loss"]
        return total

    @jax.jit
    def route_of(w):
        logits = jnp.einsum("btd,de->bte", x, w)
        return jnp.argsort(-logits, axis=-1)[..., :2]

    w = v["params"]["router"]["w"]["kernel"]
    grad = jax.grad(loss)(w)
    # Central differences in float32 along random directions: with eps = 1e-3 the rounding
    # error (~1e-7 * |loss| / eps, |loss| ~ 10) is up to ~1e-3 of the derivative, so the
    # comparison uses rtol 2e-3 instead of the float32 default.
    eps = 1e-3
    for seed in range(3):
        d = jax.random.normal(jax.random.key(100 + seed), w.shape)
        # The routing (choices and drops) must be the same at both points, or the loss jumps.
        for sign in (-1.0, 1.0):
            assert np.array_equal(route_of(w + sign * eps * d), route_of(w)), "routing flipped"
        fd = (loss(w + eps * d) - loss(w - eps * d)) / (2 * eps)
        np.testing.assert_allclose(fd, jnp.sum(grad * d), rtol=2e-3, atol=1e-5)


def _shardings(mesh, layer, x):
    with jax.set_mesh(mesh), partitioning.axis_rules():
        abstract = jax.eval_shape(layer.init, jax.random.key(0), x)
    p_shard = partitioning.params_shardings(abstract, mesh)
    return p_shard, NamedSharding(mesh, P(("data", "expert"), None, None))


def _sharded_apply(mesh, config, variables, x):
    layer = moe.MoeLayer(config)
    p_shard, x_shard = _shardings(mesh, layer, x)

    def f(v, x):
        out, state = layer.apply(v, x, mutable=["intermediates"])
        stats = moe.collect_moe_intermediates(state["intermediates"])
        stats.pop("layer_names")
        return out, stats

    with jax.set_mesh(mesh), partitioning.axis_rules():
        jf = jax.jit(f, in_shardings=(p_shard, x_shard), out_shardings=(x_shard, None))
        v = jax.device_put(variables, p_shard)
        return jf(v, jax.device_put(x, x_shard)), jf.lower(v, x).compile().as_text()


_SHARDED: dict = {}


def _sharded_case(mesh, variables, impl):
    """8 x 6 tokens in groups of 6: 8 groups, 2 per batch shard of the (2, 2, 2) mesh; drops."""
    if impl not in _SHARDED:
        x = _x((8, 6, 8), seed=12)
        c = cfg(dispatch=impl, eval_capacity_factor=0.7)
        v = _skewed(variables)
        _SHARDED[impl] = (c, v, x, *_sharded_apply(mesh, c, v, x))
    return _SHARDED[impl]


@pytest.mark.parametrize("impl", IMPLS)
def test_routing_is_mesh_independent(mesh_222, variables, impl):
    c, v, x, (out, stats), _ = _sharded_case(mesh_222, variables, impl)
    ref_out, ref_stats = _apply(c, v, x)
    if impl not in moe.DROPLESS_IMPLS:
        assert float(ref_stats["fraction_dropped"]) > 0.1
    np.testing.assert_allclose(out, ref_out, rtol=1e-5, atol=1e-6)
    for key in stats:
        np.testing.assert_allclose(stats[key], ref_stats[key], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("impl", ["einsum", "scatter", "dropless"])
def test_hlo_all_to_all_and_no_expert_kernel_gather(mesh_222, variables, impl):
    hlo = _sharded_case(mesh_222, variables, impl)[-1]
    # The capacity dispatches move tokens by all-to-all; dropless runs the experts where their
    # kernels live and sums the partial outputs (all-reduce).
    assert ("all-reduce" if impl == "dropless" else "all-to-all") in hlo
    # No all-gather may rebuild an expert kernel: every device keeps its [E/2, 8, 16/2] slice.
    gathered = re.findall(r"= \w+\[([\d,]*)\][^\n]*? all-gather\(", hlo)
    for shape in gathered:
        dims = tuple(int(s) for s in shape.split(",") if s)
        # A kernel is [E or E/2, 8, 16 or 8] (wi) or [E or E/2, 16 or 8, 8] (wo); dropless
        # all-gathers its tokens over the expert axis ([4, 6, 8]), which is not a kernel.
        kernel_like = dims[1:] in ((8, 16), (8, 8), (16, 8))
        assert not (len(dims) == 3 and dims[0] in (2, 4) and kernel_like), (
            f"expert kernel all-gathered: {dims}"
        )
    # The expert kernels enter the program as their local slice.
    assert "f32[2,8,8]" in hlo


# Compiles the sharded MoE layer in a fresh process (no persistent compilation cache, whose hit
# would skip the compiler and its dump) and dumps the SPMD partitioner's output.
_PARTITION_SCRIPT = """
import sys
import jax, jax.numpy as jnp
from flax import linen as nn
from jax.sharding import NamedSharding, PartitionSpec as P
sys.path.insert(0, "tests")
from tiny import tiny_config
from switch_t5 import moe, partitioning
config = tiny_config(group_size=6, dispatch="scatter", eval_capacity_factor=2.0, dtype=sys.argv[1])
layer = moe.MoeLayer(config)
mesh = partitioning.make_mesh(2, 2, 2, num_experts=4)
x = jax.ShapeDtypeStruct((8, 6, 8), jnp.float32)
with jax.set_mesh(mesh), partitioning.axis_rules():
    abstract = jax.eval_shape(layer.init, jax.random.key(0), x)
shardings = partitioning.params_shardings(abstract, mesh)
params = nn.unbox(abstract)
x_sharding = NamedSharding(mesh, P(("data", "expert"), None, None))
jf = jax.jit(
    lambda v, x: layer.apply(v, x, mutable=["intermediates"])[0],
    in_shardings=(shardings, x_sharding),
    out_shardings=x_sharding,
)
with jax.set_mesh(mesh), partitioning.axis_rules():
    jf.lower(params, x).compile()
"""


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_partitioned_all_to_all_runs_in_the_moe_dtype(tmp_path, dtype):
    """The SPMD partitioner emits the dispatch/combine all-to-alls in the MoE's compute dtype
    (the network passes `moe_dtype` here). XLA:CPU widens bfloat16 collectives to float32 in a
    later pass (float-normalization-bf16), which is why the final CPU program, and the
    planner's `all_to_all_dtypes`, show f32; TPU/GPU keep bfloat16."""
    env = {
        **os.environ,
        "XLA_FLAGS": "--xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0 "
        f"--xla_dump_to={tmp_path} --xla_dump_hlo_pass_re=spmd-partitioning",
        "JAX_PLATFORMS": "cpu",
        "PYTHONPATH": REPO,
    }
    proc = subprocess.run(
        [sys.executable, "-c", _PARTITION_SCRIPT, dtype],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    (partitioned,) = tmp_path.glob("*jit__lambda*after_spmd-partitioning*.txt")
    types = re.findall(r"= \(?(\w+)\[[^\]]*\][^\n]*? all-to-all\(", partitioned.read_text())
    assert types and set(types) == {"bf16" if dtype == "bfloat16" else "f32"}, types


def test_decode_step_on_the_mesh(mesh_222, variables):
    # One decoding step of 4 sequences: a single group of 4 tokens spans the 4 batch shards.
    x = _x((4, 1, 8), seed=15)
    c = cfg(dispatch="scatter", min_expert_capacity=2)
    v = _skewed(variables)
    ref_out, ref_stats = _apply(c, v, x)
    (out, stats), _ = _sharded_apply(mesh_222, c, v, x)
    np.testing.assert_allclose(out, ref_out, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(stats["fraction_dropped"], ref_stats["fraction_dropped"])


def test_groups_that_do_not_fit_the_mesh_fail_clearly(mesh_222, variables):
    # 2 x 6 tokens in groups of 6 = 2 groups over 4 batch shards.
    x = _x((2, 6, 8))
    layer = moe.MoeLayer(cfg())
    with (
        jax.set_mesh(mesh_222),
        partitioning.axis_rules(),
        pytest.raises(ValueError, match=r"2 groups.*4 shards.*group_size=3"),
    ):
        jax.eval_shape(lambda v, x: layer.apply(v, x), variables, x)


def test_bad_inputs(variables):
    layer = moe.MoeLayer(cfg())
    with pytest.raises(ValueError, match="padding_mask has shape"):
        layer.apply(variables, _x(), jnp.ones((2, 5)))
    with pytest.raises(ValueError, match="d_model=8"):
        layer.apply(variables, jnp.ones((2, 6, 7)))
    assert moe.group_layout(48, 6) == (8, 6)
    assert moe.group_layout(3, 8192) == (1, 3)
    assert moe.group_layout(2 * 509, 512) == (2, 509)  # largest divisor <= group_size


class _Stack(nn.Module):
    config: SwitchConfig
    layer_ids: tuple[int, ...]
    is_encoder: bool

    @nn.compact
    def __call__(self, y):
        for i in self.layer_ids:
            y = y + moe.MoeLayer(self.config, self.is_encoder, name=f"layers_{i}")(y)
        return y


class _TwoStacks(nn.Module):
    """Encoder with MoE layers 2 and 10 (natural order matters), decoder with MoE layer 0."""

    config: SwitchConfig

    @nn.compact
    def __call__(self, x):
        y = _Stack(self.config, (2, 10), True, name="encoder")(x)
        return _Stack(self.config, (0,), False, name="decoder")(y)


def test_collect_moe_intermediates():
    c = cfg(eval_capacity_factor=0.7)
    model = _TwoStacks(c)
    x = _x((2, 6, 8), seed=14)
    v = _init(model, x, seed=3)
    _, state = jax.jit(lambda v, x: model.apply(v, x, mutable=["intermediates"]))(v, x)
    inter = state["intermediates"]
    names = moe.collect_moe_intermediates(inter)["layer_names"]
    assert names == ["encoder/layers_2", "encoder/layers_10", "decoder/layers_0"]
    got = _collect(inter)
    layers_in_order = [
        inter["encoder"]["layers_2"],
        inter["encoder"]["layers_10"],
        inter["decoder"]["layers_0"],
    ]
    for key in ("load_balancing_loss", "router_z_loss", "fraction_dropped", "router_confidence"):
        expect = np.mean([float(lay[key][0]) for lay in layers_in_order])
        np.testing.assert_allclose(got[key], expect, rtol=1e-6)
    usage = np.stack([lay["expert_usage"][0] for lay in layers_in_order])
    np.testing.assert_array_equal(got["expert_usage"], usage)
    assert got["expert_usage"].shape == (3, 4)
    np.testing.assert_allclose(got["expert_usage"].sum(-1), 1.0, rtol=1e-6)
    empty = moe.collect_moe_intermediates({})
    assert empty["layer_names"] == [] and float(empty["load_balancing_loss"]) == 0.0


# ---------------------------------------------------------------------------------------------
# Per-sequence routing groups (inference) and transformers' fixed expert capacity.
# ---------------------------------------------------------------------------------------------

# 6 sequences of 8 tokens, with 8, 5, 3, 8, 6 and 2 real tokens (padding at the end).
REAL = (8, 5, 3, 8, 6, 2)


def _rows(length=8, seed=20):
    x = np.asarray(_x((len(REAL), length, 8), seed=seed))
    mask = np.arange(length)[None, :] < np.asarray(REAL)[:, None]
    # Padding holds junk: it must change nothing.
    x = np.where(mask[..., None], x, 50.0 * np.asarray(_x(x.shape, seed=seed + 1)))
    return jnp.asarray(x), jnp.asarray(mask)


def _per_row_outputs(c, v, x, mask):
    """Each row's real-token outputs when routed alone."""
    return [
        np.asarray(_apply(c, v, x[i : i + 1], mask[i : i + 1])[0])[0, : REAL[i]]
        for i in range(len(REAL))
    ]


@pytest.mark.parametrize("impl", ["einsum", "scatter"])
def test_sequence_groups_make_each_row_independent_of_its_batch(variables, impl):
    v = _skewed(variables)
    x, mask = _rows()
    c = cfg(dispatch=impl, routing_groups="sequence", eval_capacity_factor=0.7)
    out, stats = _apply(c, v, x, mask)
    assert float(stats["fraction_dropped"]) > 0.2, "the case must drop tokens"
    alone = _per_row_outputs(c, v, x, mask)
    # The batch of 6, alone, in shuffled order, and padded to another length.
    perm = np.array([4, 0, 5, 2, 1, 3])
    shuffled, _ = _apply(c, v, x[perm], mask[perm])
    x16, mask16 = _rows(length=16)
    x16 = x16.at[:, :8].set(x)  # the same real tokens, 8 more padding positions of junk
    longer, _ = _apply(c, v, x16, mask16)
    for i, n in enumerate(REAL):
        for got in (out[i], shuffled[np.flatnonzero(perm == i)[0]], longer[i]):
            np.testing.assert_allclose(np.asarray(got)[:n], alone[i], rtol=1e-5, atol=1e-6)
    # Groups of tokens across rows (training's setting) do depend on the batch-mates.
    mixed = cfg(dispatch=impl, group_size=48, eval_capacity_factor=0.7)
    batch_out, _ = _apply(mixed, v, x, mask)
    assert any(
        not np.allclose(np.asarray(batch_out[i])[:n], got, rtol=1e-5, atol=1e-6)
        for i, (n, got) in enumerate(zip(REAL, _per_row_outputs(mixed, v, x, mask)))
    )


def test_decode_steps_never_drop_with_sequence_groups(variables):
    # A decoding step: 4 sequences x 1 token, every one routed to the same expert.
    v = _skewed(variables, scale=400.0)
    x = jnp.broadcast_to(_x((1, 1, 8), seed=21), (4, 1, 8))
    tokens = cfg(dispatch="scatter", eval_capacity_factor=0.5)
    _, s_tokens = _apply(tokens, v, x)
    assert float(s_tokens["fraction_dropped"]) > 0  # one group of 4 tokens, 1 slot
    for c in (
        cfg(dispatch="scatter", routing_groups="sequence", eval_capacity_factor=0.5),
        cfg(dispatch="scatter", expert_capacity=1),
    ):
        out, stats = _apply(c, v, x)
        ref, _ = _apply(cfg(dispatch="dropless"), v, x)
        assert float(stats["fraction_dropped"]) == 0.0
        np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("impl", ["einsum", "scatter"])
def test_transformers_capacity_is_exact_per_sequence_and_padding_takes_slots(variables, impl):
    v = _skewed(variables)
    x, mask = _rows()
    c = cfg(dispatch=impl, expert_capacity=2, min_expert_capacity=4, eval_capacity_factor=9.0)
    out, stats = _apply(c, v, x, mask)
    # Reference: per row, cumsum over the whole row (padding included) of the argmax one-hot.
    logits = np.einsum(
        "btd,de->bte", np.asarray(x), np.asarray(v["params"]["router"]["w"]["kernel"])
    )
    onehot = np.eye(4)[np.argmax(logits, -1)]
    kept = ((np.cumsum(onehot, axis=1) <= 2) * onehot).sum(-1) > 0
    dropped = np.asarray(mask) & ~kept
    assert dropped.any()
    np.testing.assert_array_equal(np.abs(np.asarray(out)[dropped]).max(-1), 0.0)
    assert (np.abs(np.asarray(out)[np.asarray(mask) & kept]).max(-1) > 0).all()
    # Padding that is kept is processed, as in transformers (it follows the real tokens).
    assert (np.abs(np.asarray(out)[~np.asarray(mask) & kept]).max(-1) > 0).all()
    np.testing.assert_allclose(
        float(stats["fraction_dropped"]), dropped.sum() / np.asarray(mask).sum(), rtol=1e-6
    )


def _replicated_apply(mesh, config, variables, x, mask):
    layer = moe.MoeLayer(config)

    def f(v, x, mask):
        out, state = layer.apply(v, x, mask, mutable=["intermediates"])
        return out, moe.collect_moe_intermediates(state["intermediates"])["fraction_dropped"]

    with jax.set_mesh(mesh), partitioning.axis_rules():
        return jax.jit(f)(variables, x, mask)


def test_sequence_groups_on_the_mesh(mesh_222, variables):
    """Rows shard over the 4 batch shards when they divide evenly (8 rows), and run unsharded
    otherwise (6 rows): no refusal, the same outputs as on one device."""
    v = _skewed(variables)
    c = cfg(dispatch="scatter", routing_groups="sequence", eval_capacity_factor=0.7)
    x, mask = _rows()
    x8 = jnp.concatenate([x, x[:2]])
    mask8 = jnp.concatenate([mask, mask[:2]])
    for xs, ms in ((x8, mask8), (x, mask)):
        ref, ref_dropped = _apply(c, v, xs, ms)
        out, dropped = _replicated_apply(mesh_222, c, v, xs, ms)
        assert float(ref_dropped["fraction_dropped"]) > 0.2
        np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(dropped, ref_dropped["fraction_dropped"], rtol=1e-6)
    (out, _), hlo = _sharded_apply(mesh_222, c, v, x8)
    np.testing.assert_allclose(out, _apply(c, v, x8)[0], rtol=1e-5, atol=1e-6)
    assert "all-to-all" in hlo  # the 8 row-groups were laid over the batch shards
