"""Scanned layers (nn.scan over dense/sparse blocks), remat policies, layout conversion."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from tiny import tiny_config

from switch_t5 import moe, network, scan_utils

RTOL, ATOL = 1e-5, 1e-6

# 4 layers per stack, sparse layers 1 and 3: two dense/sparse blocks per stack. Top-2 routing and
# the ST-MoE extra MLP exercise every param kind; eval capacity 8 >= 4 experts drops nothing.
UNSCANNED = tiny_config(
    num_encoder_layers=4,
    num_decoder_layers=4,
    moe_layer_interval=2,
    mlp_activations=("gelu", "linear"),
    logits_via_embedding=False,
    router_type="topk",
    num_selected_experts=2,
    sparse_extra_mlp=True,
    eval_capacity_factor=8.0,
)
SCANNED = dataclasses.replace(UNSCANNED, scan_layers=True)

INPUTS = dict(
    encoder_input_tokens=jnp.array([[11, 12, 13, 0, 0, 0], [14, 15, 16, 17, 0, 0]]),
    decoder_input_tokens=jnp.array([[0, 21, 0, 0, 0, 0], [0, 23, 24, 0, 0, 0]]),
    decoder_target_tokens=jnp.array([[21, 22, 0, 0, 0, 0], [23, 24, 25, 0, 0, 0]]),
)


@pytest.fixture(scope="module")
def params():
    variables = network.init_variables(UNSCANNED, jax.random.key(0), batch=2, inputs_length=6)
    return nn.unbox(variables["params"])


def _forward(config, params):
    def run(p):
        logits, state = network.EncoderDecoder(config).apply(
            {"params": p}, **INPUTS, enable_dropout=False, mutable=["intermediates"]
        )
        stats = moe.collect_moe_intermediates(state["intermediates"])
        stats.pop("layer_names")
        return logits, stats

    return jax.jit(run)(params)


def _loss_grads(config, params):
    def loss(p):
        logits = network.EncoderDecoder(config).apply({"params": p}, **INPUTS, enable_dropout=False)
        return jnp.mean(jnp.square(logits))

    return jax.jit(jax.grad(loss))(params)


def test_scanned_layout_matches_abstract_init(params):
    scanned = scan_utils.scan_params(params, SCANNED)
    abstract = network.init_abstract(SCANNED)["params"]
    assert jax.tree.structure(scanned) == jax.tree.structure(nn.unbox(abstract))
    for got, want in zip(jax.tree.leaves(scanned), jax.tree.leaves(nn.unbox(abstract))):
        assert got.shape == want.shape
    block = abstract["encoder"]["layers"]
    assert set(block) == {"subblock_0", "subblock_1"}
    # Block b, subblock 1 is layer 2b + 1.
    np.testing.assert_array_equal(
        scanned["encoder"]["layers"]["subblock_1"]["mlp"]["expert"]["wo"]["kernel"][1],
        params["encoder"]["layers_3"]["mlp"]["expert"]["wo"]["kernel"],
    )
    # The stacked axis is the logical "layers" axis, in front of the param's own axes.
    specs = nn.get_partition_spec(abstract)
    assert specs["encoder"]["layers"]["subblock_1"]["mlp"]["expert"]["wi_0"]["kernel"] == (
        jax.sharding.PartitionSpec("layers", "expert", "embed", "mlp")
    )
    assert specs["decoder"]["layers"]["subblock_0"]["self_attention"]["query"]["kernel"] == (
        jax.sharding.PartitionSpec("layers", "embed", "joined_kv")
    )
    # Shared params stay unstacked.
    assert abstract["encoder"]["relpos_bias"]["rel_embedding"].value.shape == (2, 32)


def test_scan_round_trip_is_exact(params):
    back = scan_utils.unscan_params(scan_utils.scan_params(params, SCANNED), SCANNED)
    assert jax.tree.structure(back) == jax.tree.structure(params)
    for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(params)):
        np.testing.assert_array_equal(a, b)
    assert not scan_utils.is_scanned(params)
    assert scan_utils.is_scanned(scan_utils.match_layout(params, SCANNED))
    assert not scan_utils.is_scanned(scan_utils.match_layout(params, UNSCANNED))


def test_scanned_model_with_converted_params_equals_unscanned(params):
    want_logits, want_stats = _forward(UNSCANNED, params)
    got_logits, got_stats = _forward(SCANNED, scan_utils.scan_params(params, SCANNED))
    np.testing.assert_allclose(got_logits, want_logits, rtol=RTOL, atol=ATOL)
    # MoE losses and per-layer expert usage, layer for layer in the same order.
    assert got_stats["expert_usage"].shape == (4, 4)
    for key in want_stats:
        np.testing.assert_allclose(got_stats[key], want_stats[key], rtol=RTOL, atol=ATOL)


@pytest.mark.slow
def test_remat_policies_keep_the_gradients(params):
    want = _loss_grads(UNSCANNED, params)
    scanned_full = _loss_grads(
        dataclasses.replace(SCANNED, remat_policy="full"), scan_utils.scan_params(params, SCANNED)
    )
    got = scan_utils.unscan_params(scanned_full, SCANNED)
    unscanned_dots = _loss_grads(
        dataclasses.replace(UNSCANNED, remat_policy="dots_no_batch"), params
    )
    assert max(float(jnp.max(jnp.abs(g))) for g in jax.tree.leaves(want)) > 0
    for g_scan, g_dots, w in zip(
        jax.tree.leaves(got), jax.tree.leaves(unscanned_dots), jax.tree.leaves(want)
    ):
        np.testing.assert_allclose(g_scan, w, rtol=RTOL, atol=ATOL)
        np.testing.assert_allclose(g_dots, w, rtol=RTOL, atol=ATOL)


def test_period_follows_the_sparse_layout():
    assert SCANNED.scan_period("encoder") == 2
    st_moe = dataclasses.replace(SCANNED, num_encoder_layers=8, moe_layer_interval=4)
    assert st_moe.scan_period("encoder") == 4
    assert dataclasses.replace(SCANNED, num_experts=0).scan_period("decoder") == 1
    assert dataclasses.replace(SCANNED, moe_layer_interval=1).scan_period("encoder") == 1


def test_conversion_errors_name_the_problem(params):
    scanned = scan_utils.scan_params(params, SCANNED)
    other = dataclasses.replace(SCANNED, num_encoder_layers=8, moe_layer_interval=4)
    with pytest.raises(ValueError, match="scan period is 4"):
        scan_utils.unscan_params(scanned, other)
    with pytest.raises(ValueError, match=r"no layers \[4, 5, 6, 7\]"):
        scan_utils.scan_params(params, dataclasses.replace(other, moe_layer_interval=2))
    with pytest.raises(ValueError, match="layers_1 is sparse in the params but dense"):
        scan_utils.scan_params(params, dataclasses.replace(SCANNED, moe_layer_interval=4))
    with pytest.raises(ValueError, match="already unscanned"):
        scan_utils.unscan_params(params, SCANNED)
    with pytest.raises(ValueError, match="remat_policy='most'"):
        dataclasses.replace(SCANNED, remat_policy="most")


def test_decoding_asks_for_unscanned_params():
    model = network.EncoderDecoder(SCANNED)
    with pytest.raises(ValueError, match="unscan_params"):
        jax.eval_shape(
            lambda: model.init(
                network.init_rngs(jax.random.key(0)),
                INPUTS["encoder_input_tokens"],
                INPUTS["decoder_input_tokens"],
                enable_dropout=False,
                decode=True,
                max_decode_length=6,
            )
        )
