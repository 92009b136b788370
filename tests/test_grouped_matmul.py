"""The block-sparse grouped matmul (switch_t5/grouped_matmul.py) and the "dropless" MoE path.

"dropless" must give the same outputs and gradients as the `jax.lax.ragged_dot` path ("ragged")
in float32 (1e-5 rel / 1e-6 abs): both compute the same products, only grouped differently.
Tiny odd sizes (embed 8, mlp 16, 4 experts).
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from tiny import tiny_config

from switch_t5 import grouped_matmul as gm
from switch_t5 import moe, network, partitioning, plan, scan_utils

RTOL, ATOL = 1e-5, 1e-6

BASE = tiny_config(router_jitter_noise=0.0, dropout_rate=0.0, dropless_block_size=4)


def cfg(**kw):
    return dataclasses.replace(BASE, **kw)


def _x(shape, seed):
    return jax.random.normal(jax.random.key(seed), shape, jnp.float32)


def _check_layout(ids, num_experts, block):
    (m,) = ids.shape
    layout = jax.jit(gm.block_layout, static_argnums=(1, 2))(ids, num_experts, block)
    b = gm.block_rows(m, block)
    n = gm.num_blocks(m, num_experts, block)
    ids = np.asarray(ids)
    computed = (ids >= 0) & (ids < num_experts)
    # The static buffer and the used blocks both stay within the padded-total bound.
    assert n * b <= m + num_experts * (b - 1)
    assert layout.row_of_slot.shape == (n * b,)
    used = int(layout.used_blocks)
    sizes = np.bincount(ids[computed], minlength=num_experts)
    assert used == sum(-(-s // b) for s in sizes) <= n
    np.testing.assert_array_equal(layout.group_sizes, sizes)
    slot = np.asarray(layout.slot_of_row)
    row = np.asarray(layout.row_of_slot)
    block_expert = np.asarray(layout.block_expert)
    # Every computed row has its own slot, in a block of its expert; the maps are inverse.
    assert np.all(slot[~computed] >= n * b)
    assert len(set(slot[computed])) == computed.sum()
    np.testing.assert_array_equal(row[slot[computed]], np.flatnonzero(computed))
    np.testing.assert_array_equal(block_expert[slot[computed] // b], ids[computed])
    assert np.all(slot[computed] < used * b)
    # Empty slots point past the rows.
    empty = np.setdiff1d(np.arange(n * b), slot[computed])
    assert np.all(row[empty] == m)


@pytest.mark.parametrize("block", [1, 3, 4, 16])
def test_block_layout_bound_and_maps(block):
    rng = np.random.default_rng(block)
    for m, e in ((37, 5), (12, 4), (3, 4)):
        _check_layout(jnp.asarray(rng.integers(-1, e + 1, m), jnp.int32), e, block)
        # Worst padding: every expert gets rows that leave its last block 1 row full.
        _check_layout(jnp.asarray(np.arange(m) % e, jnp.int32), e, block)
        # All rows to one expert; no row computed at all.
        _check_layout(jnp.full((m,), e - 1, jnp.int32), e, block)
        _check_layout(jnp.full((m,), -1, jnp.int32), e, block)


def _ragged_reference(x, w, ids):
    """Rows through their expert by `jax.lax.ragged_dot` on the expert-sorted rows."""
    order = jnp.argsort(ids, stable=True)
    sizes = jnp.bincount(ids, length=w.shape[0]).astype(jnp.int32)
    y = jax.lax.ragged_dot(x[order], w, group_sizes=sizes)
    return jnp.zeros_like(y).at[order].set(y)


def _gmm_rows(x, w, ids, impl, block):
    layout = gm.block_layout(ids, w.shape[0], block)
    b = gm.block_rows(ids.shape[0], block)
    xb = gm.dispatch_rows(x, layout, 1, b)
    y = gm.gmm(xb, w, layout.block_expert, layout.used_blocks, impl)
    return gm.combine_rows(y, layout)


@pytest.mark.parametrize("impl", gm.GMM_IMPLS)
@pytest.mark.parametrize("block", [1, 4, 8])
def test_gmm_equals_ragged_dot_with_gradients(impl, block):
    m, e, d, f = 29, 5, 8, 12
    x, w = _x((m, d), 0), _x((e, d, f), 1)
    ids = jax.random.randint(jax.random.key(2), (m,), 0, e)
    cot = _x((m, f), 3)

    def loss(fn):
        return lambda x, w: jnp.sum(fn(x, w) * cot)

    got = jax.jit(lambda x, w: _gmm_rows(x, w, ids, impl, block))(x, w)
    want = _ragged_reference(x, w, ids)
    np.testing.assert_allclose(got, want, rtol=RTOL, atol=ATOL)
    g_got = jax.jit(jax.grad(loss(lambda x, w: _gmm_rows(x, w, ids, impl, block)), (0, 1)))(x, w)
    g_want = jax.grad(loss(lambda x, w: _ragged_reference(x, w, ids)), (0, 1))(x, w)
    for a, b in zip(g_got, g_want):
        np.testing.assert_allclose(a, b, rtol=RTOL, atol=ATOL)


def test_loop_backward_has_no_per_block_weight_tensor():
    """The custom backward accumulates dW per expert: no [blocks, d, f] array anywhere."""
    m, e, d, f, block = 64, 4, 8, 12, 4
    n = gm.num_blocks(m, e, block)
    ids = jnp.arange(m, dtype=jnp.int32) % e

    def loss(x, w):
        return jnp.sum(_gmm_rows(x, w, ids, "loop", block))

    hlo = jax.jit(jax.grad(loss, (0, 1))).lower(_x((m, d), 0), _x((e, d, f), 1)).as_text()
    assert f"{n}x{d}x{f}" not in hlo and f"tensor<{n}x{d}x{f}" not in hlo
    assert "stablehlo.while" in hlo


def _layer_grads(c, variables, x, mask, cot, train=False, rngs=None):
    layer = moe.MoeLayer(c)

    def loss(v, x):
        out = layer.apply(
            v, x, mask, enable_dropout=train, rngs=rngs or {}, mutable=["intermediates"]
        )[0]
        return jnp.sum(out.astype(jnp.float32) * cot), out

    (_, out), grads = jax.jit(jax.value_and_grad(loss, (0, 1), has_aux=True))(variables, x)
    return out, grads


@pytest.fixture(scope="module")
def variables():
    x = _x((2, 6, 8), 0)
    return nn.unbox(jax.jit(moe.MoeLayer(BASE).init)(jax.random.key(1), x))


@pytest.mark.parametrize("k", [1, 2])
@pytest.mark.parametrize("acts", [("relu",), ("gelu", "linear")])
def test_dropless_equals_ragged_outputs_and_gradients(k, acts):
    kw = {"router_type": "topk", "num_selected_experts": k} if k > 1 else {}
    x = _x((2, 6, 8), 4)
    cot = _x((2, 6, 8), 5)
    # Padding: a masked token takes no rows and gets a zero output (and zero gradient).
    mask = jnp.ones((2, 6), bool).at[0, 4:].set(False)
    c = cfg(mlp_activations=acts, **kw)
    v = nn.unbox(jax.jit(moe.MoeLayer(c).init)(jax.random.key(6), x))
    # Sharpen the router so that the experts get unequal loads (blocks pad differently).
    v["params"]["router"]["w"]["kernel"] = v["params"]["router"]["w"]["kernel"] * 20.0
    want_out, want_g = _layer_grads(dataclasses.replace(c, dispatch="ragged"), v, x, mask, cot)
    for block in (1, 3, 128):
        c_block = dataclasses.replace(c, dispatch="dropless", dropless_block_size=block)
        out, g = _layer_grads(c_block, v, x, mask, cot)
        np.testing.assert_allclose(out, want_out, rtol=RTOL, atol=ATOL)
        for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(want_g)):
            np.testing.assert_allclose(a, b, rtol=RTOL, atol=ATOL)
    np.testing.assert_array_equal(out[0, 4:], 0.0)


def test_dropless_bfloat16_tracks_float32(variables):
    x = _x((2, 6, 8), 7)
    cot = _x((2, 6, 8), 8)
    out32, g32 = _layer_grads(cfg(dispatch="dropless"), variables, x, None, cot)
    out16, g16 = _layer_grads(cfg(dispatch="dropless", dtype="bfloat16"), variables, x, None, cot)
    assert out16.dtype == jnp.bfloat16
    # bfloat16 keeps 8 mantissa bits: relative error ~4e-3 per rounding, a few roundings deep.
    scale = float(jnp.max(jnp.abs(out32)))
    np.testing.assert_allclose(out16.astype(jnp.float32), out32, rtol=0, atol=3e-2 * scale)
    for a, b in zip(jax.tree.leaves(g16), jax.tree.leaves(g32)):
        np.testing.assert_allclose(
            a.astype(jnp.float32), b, rtol=0, atol=3e-2 * float(jnp.max(jnp.abs(b)))
        )


def test_dropless_expert_dropout_uses_dropout_rng(variables):
    x = _x((2, 6, 8), 9)
    cot = jnp.ones_like(x)
    c = cfg(dispatch="dropless", expert_dropout_rate=0.5)
    o1, _ = _layer_grads(c, variables, x, None, cot, True, {"dropout": jax.random.key(0)})
    o2, _ = _layer_grads(c, variables, x, None, cot, True, {"dropout": jax.random.key(1)})
    oe, _ = _layer_grads(c, variables, x, None, cot)
    assert not np.allclose(o1, o2) and not np.allclose(o1, oe)
    c0 = cfg(dispatch="dropless", expert_dropout_rate=0.0)
    o0, _ = _layer_grads(c0, variables, x, None, cot, True, {"dropout": jax.random.key(0)})
    np.testing.assert_allclose(o0, oe, rtol=RTOL, atol=ATOL)


def test_dropless_on_the_mesh_equals_unsharded_with_gradients(mesh_222, variables):
    """(data 2, expert 2, model 2): experts run on their shard (shard_map), outputs and
    gradients equal the unsharded layer; expert dropout runs there too."""
    c = cfg(dispatch="dropless", router_type="topk", num_selected_experts=2)
    layer = moe.MoeLayer(c)
    x = _x((8, 6, 8), 10)
    cot = _x((8, 6, 8), 11)
    mask = jnp.ones((8, 6), bool).at[3, 2:].set(False)
    want_out, want_g = _layer_grads(c, variables, x, mask, cot)
    with jax.set_mesh(mesh_222), partitioning.axis_rules():
        abstract = jax.eval_shape(layer.init, jax.random.key(0), x)
        p_shard = partitioning.params_shardings(abstract, mesh_222)
        tok = NamedSharding(mesh_222, P(("data", "expert")))
        v = jax.device_put(variables, p_shard)
        xs, ms, cs = (jax.device_put(a, tok) for a in (x, mask, cot))
        out, g = _layer_grads(c, v, xs, ms, cs)
        c_drop = dataclasses.replace(c, expert_dropout_rate=0.5)
        rngs = {"dropout": jax.random.key(0)}
        dropped, _ = _layer_grads(c_drop, v, xs, ms, cs, True, rngs)
    np.testing.assert_allclose(out, want_out, rtol=RTOL, atol=ATOL)
    for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(want_g)):
        np.testing.assert_allclose(a, b, rtol=RTOL, atol=ATOL)
    assert np.all(np.isfinite(dropped)) and not np.allclose(dropped, out)


def test_dropless_network_with_scan_and_remat_equals_ragged():
    """The dropless layer inside scanned, rematerialised blocks: same loss gradients as the
    unscanned ragged_dot network."""
    base = tiny_config(
        num_encoder_layers=2,
        num_decoder_layers=2,
        moe_layer_interval=2,
        router_type="topk",
        num_selected_experts=2,
        router_jitter_noise=0.0,
        dropout_rate=0.0,
        dispatch="ragged",
    )
    inputs = dict(
        encoder_input_tokens=jnp.array([[11, 12, 13, 0, 0, 0], [14, 15, 16, 17, 0, 0]]),
        decoder_input_tokens=jnp.array([[0, 21, 0, 0, 0, 0], [0, 23, 24, 0, 0, 0]]),
        decoder_target_tokens=jnp.array([[21, 22, 0, 0, 0, 0], [23, 24, 25, 0, 0, 0]]),
    )
    params = nn.unbox(
        network.init_variables(base, jax.random.key(0), batch=2, inputs_length=6)["params"]
    )

    def grads(config, p):
        def loss(p):
            logits = network.EncoderDecoder(config).apply({"params": p}, **inputs)
            return jnp.mean(jnp.square(logits))

        return jax.jit(jax.grad(loss))(p)

    want = grads(base, params)
    scanned = dataclasses.replace(
        base, dispatch="dropless", scan_layers=True, remat_policy="full", dropless_block_size=3
    )
    got = scan_utils.unscan_params(grads(scanned, scan_utils.scan_params(params, scanned)), scanned)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_allclose(a, b, rtol=RTOL, atol=ATOL)


def test_dispatch_names():
    assert moe.resolve_dispatch("dropless") == "dropless"
    assert moe.resolve_dispatch("ragged") == "ragged"
    assert set(moe.DROPLESS_IMPLS) == {"dropless", "ragged"}
    with pytest.raises(ValueError, match="'dropless' or 'ragged'"):
        moe.resolve_dispatch("megablocks")
    with pytest.raises(ValueError, match="dropless_block_size=0"):
        cfg(dropless_block_size=0)


def test_planner_counts_expert_kernel_gathers(mesh_222, variables):
    """`plan.count_expert_kernel_gathers`: 0 on the partitioned dropless layer (forward and
    backward), which keeps each device's [E/2, 8, 16/2] kernel slices; a gather that rebuilds
    a kernel is counted."""
    x = _x((8, 6, 8), 12)
    c = cfg(dispatch="dropless")
    mesh = {"data": 2, "expert": 2, "model": 2}
    layer = moe.MoeLayer(c)
    with jax.set_mesh(mesh_222), partitioning.axis_rules():
        abstract = jax.eval_shape(layer.init, jax.random.key(0), x)
        p_shard = partitioning.params_shardings(abstract, mesh_222)
        tok = NamedSharding(mesh_222, P(("data", "expert")))

        def loss(v, x):
            return jnp.sum(layer.apply(v, x, mutable=["intermediates"])[0])

        jf = jax.jit(jax.grad(loss), in_shardings=(p_shard, tok))
        hlo = jf.lower(variables, x).compile().as_text()
    assert "all-gather" in hlo  # the tokens are gathered over the expert axis
    assert plan.count_expert_kernel_gathers(hlo, c, mesh) == 0
    gathers = [
        "%g = f32[4,8,8]{2,1,0} all-gather(%p), dimensions={0}",  # all experts, own d_ff half
        "%g = f32[2,16,8]{2,1,0} all-gather(%p), dimensions={1}",  # own experts, all of d_ff
        "%g = (f32[3,4,8,16]{3,2,1,0}) all-gather-start(%p), dimensions={1}",  # scanned layers
        "%g = f32[2,8,8]{2,1,0} all-gather(%p), dimensions={0}",  # the local slice: not counted
        "%g = f32[4,6,8]{2,1,0} all-gather(%p), dimensions={0}",  # tokens: not counted
    ]
    assert plan.count_expert_kernel_gathers("\n".join(gathers), c, mesh) == 3
