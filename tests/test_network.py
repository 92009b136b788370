"""The encoder-decoder: shapes and dtypes, param layout, packing, KV-cache decoding, counts."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from tiny import tiny_config

from switch_t5 import network
from switch_t5.config import SwitchConfig

RTOL, ATOL = 1e-5, 1e-6

DENSE = tiny_config(num_experts=0)
# Gated GELU and untied logits exercise the other param names; eval capacity factor 8 >= the 4
# experts, so no token is ever dropped (capacity >= tokens per group).
SPARSE = dataclasses.replace(
    DENSE,
    num_experts=4,
    moe_layer_interval=2,
    mlp_activations=("gelu", "linear"),
    logits_via_embedding=False,
    eval_capacity_factor=8.0,
)


# Two examples, each in its own row (the packed test packs them into one row).
UNPACKED_INPUTS = dict(
    encoder_input_tokens=jnp.array([[11, 12, 13, 0, 0, 0], [14, 15, 0, 0, 0, 0]]),
    decoder_input_tokens=jnp.array([[0, 21, 0, 0, 0, 0], [0, 23, 24, 0, 0, 0]]),
    decoder_target_tokens=jnp.array([[21, 22, 0, 0, 0, 0], [23, 24, 25, 0, 0, 0]]),
)


@functools.cache
def _apply(config: SwitchConfig, **kwargs):
    model = network.EncoderDecoder(config)
    return jax.jit(functools.partial(model.apply, enable_dropout=False, **kwargs))


def _forward(config: SwitchConfig):
    """Jitted apply returning (logits, state) with every module's output captured."""
    return _apply(config, capture_intermediates=True, mutable=("intermediates",))


@pytest.fixture(scope="module")
def sparse_variables():
    return network.init_variables(SPARSE, jax.random.key(0), batch=2, inputs_length=6)


@pytest.fixture(scope="module")
def dense_variables():
    return network.init_variables(DENSE, jax.random.key(1), inputs_length=6)


def _paths(tree) -> set[str]:
    flat = jax.tree_util.tree_flatten_with_path(
        tree, is_leaf=lambda x: isinstance(x, nn.meta.AxisMetadata)
    )[0]
    return {"/".join(k.key for k in path) for path, _ in flat}


def test_param_tree_layout_matches_docstring():
    params = network.init_abstract(SPARSE)["params"]
    attn = [f"{p}/kernel" for p in ("query", "key", "value", "out")]
    dense_mlp = ["mlp/wi_0/kernel", "mlp/wi_1/kernel", "mlp/wo/kernel"]
    sparse_mlp = [
        "mlp/router/w/kernel",
        "mlp/expert/wi_0/kernel",
        "mlp/expert/wi_1/kernel",
        "mlp/expert/wo/kernel",
    ]
    expected = {
        "token_embedder/embedding",
        "encoder/relpos_bias/rel_embedding",
        "encoder/encoder_norm/scale",
        "decoder/relpos_bias/rel_embedding",
        "decoder/decoder_norm/scale",
        "decoder/logits_dense/kernel",
    }
    for i, mlp in ((0, dense_mlp), (1, sparse_mlp)):
        enc, dec = f"encoder/layers_{i}", f"decoder/layers_{i}"
        expected |= {f"{enc}/{n}" for n in ("pre_attention_layer_norm/scale", *mlp)}
        expected |= {f"{enc}/pre_mlp_layer_norm/scale"} | {f"{enc}/attention/{a}" for a in attn}
        expected |= {f"{dec}/{n}" for n in mlp}
        expected |= {
            f"{dec}/{norm}/scale"
            for norm in (
                "pre_self_attention_layer_norm",
                "pre_cross_attention_layer_norm",
                "pre_mlp_layer_norm",
            )
        }
        expected |= {f"{dec}/{m}/{a}" for m in ("self_attention", "encoder_decoder_attention")
                     for a in attn}  # fmt: skip
    assert _paths(params) == expected
    assert params["encoder"]["layers_1"]["mlp"]["expert"]["wi_0"]["kernel"].value.shape == (
        4,
        8,
        16,
    )
    assert params["encoder"]["relpos_bias"]["rel_embedding"].value.shape == (2, 32)


def test_forward_shapes_and_dtypes_bfloat16(sparse_variables):
    cfg = dataclasses.replace(SPARSE, dtype="bfloat16")
    abstract = network.init_abstract(cfg)
    assert {x.dtype for x in jax.tree_util.tree_leaves(nn.unbox(abstract))} == {
        np.dtype(np.float32)
    }
    enc = jnp.array([[3, 4, 5, 6, 0, 0], [7, 8, 9, 10, 11, 1]])
    dec = jnp.array([[0, 3, 4, 5, 6], [0, 9, 8, 7, 0]])
    # Params are float32 whatever the compute dtype, so the float32-config init serves.
    logits, state = _forward(cfg)(sparse_variables, enc, dec, dec)
    assert logits.shape == (2, 5, 128) and logits.dtype == jnp.float32
    assert bool(jnp.all(jnp.isfinite(logits)))
    encoded = state["intermediates"]["encoder"]["__call__"][0]
    assert encoded.shape == (2, 6, 8) and encoded.dtype == jnp.bfloat16
    mlp_out = state["intermediates"]["decoder"]["layers_1"]["mlp"]["__call__"][0]
    assert mlp_out.dtype == jnp.bfloat16


def test_packed_equals_unpacked(dense_variables):
    # Example A: inputs [11 12 13], targets [21 22]; example B: inputs [14 15], targets [23 24 25].
    # Packed as T5X's feature converter does: each segment's decoder inputs start with 0.
    packed = dict(
        encoder_input_tokens=jnp.array([[11, 12, 13, 14, 15, 0]]),
        encoder_segment_ids=jnp.array([[1, 1, 1, 2, 2, 0]]),
        encoder_positions=jnp.array([[0, 1, 2, 0, 1, 0]]),
        decoder_input_tokens=jnp.array([[0, 21, 0, 23, 24, 0]]),
        decoder_target_tokens=jnp.array([[21, 22, 23, 24, 25, 0]]),
        decoder_segment_ids=jnp.array([[1, 1, 2, 2, 2, 0]]),
        decoder_positions=jnp.array([[0, 1, 0, 1, 2, 0]]),
    )
    unpacked = UNPACKED_INPUTS
    packed_logits = np.asarray(_forward(DENSE)(dense_variables, **packed)[0])
    unpacked_logits = np.asarray(_forward(DENSE)(dense_variables, **unpacked)[0])
    np.testing.assert_allclose(packed_logits[0, 0:2], unpacked_logits[0, 0:2], RTOL, ATOL)
    np.testing.assert_allclose(packed_logits[0, 2:5], unpacked_logits[1, 0:3], RTOL, ATOL)
    # The segments really interact without the segment ids.
    crosstalk = np.asarray(
        _forward(DENSE)(
            dense_variables,
            encoder_input_tokens=packed["encoder_input_tokens"],
            decoder_input_tokens=packed["decoder_input_tokens"],
            decoder_target_tokens=packed["decoder_target_tokens"],
        )[0]
    )
    assert np.abs(crosstalk[0, 2:5] - unpacked_logits[1, 0:3]).max() > 1e-3


def _decode_step(model, params, cache, encoded, enc, tokens, max_decode_length):
    """One KV-cache decoding call of `model.decode`: (logits, {"cache": the updated cache})."""
    return model.apply(
        {**params, "cache": cache},
        encoded,
        enc,
        tokens,
        enable_dropout=False,
        decode=True,
        max_decode_length=max_decode_length,
        mutable=["cache"],
        method=model.decode,
    )


def test_kv_cache_decode_equals_full_forward(sparse_variables):
    model = network.EncoderDecoder(SPARSE)
    enc = jnp.array([[3, 4, 5, 6, 0, 0], [7, 8, 9, 10, 11, 12]])
    dec = jnp.array([[0, 31, 42, 53, 64], [0, 75, 86, 97, 108]])
    length = dec.shape[1]
    # All targets real, as in decoding (same shapes as test_moe_padding_masks_from_tokens).
    full, state = _forward(SPARSE)(sparse_variables, enc, dec, jnp.ones_like(dec))
    dropped = state["intermediates"]["decoder"]["layers_1"]["mlp"]["fraction_dropped"][0]
    assert float(dropped) == 0.0

    params = {"params": sparse_variables["params"]}
    encoded = jax.jit(
        lambda p, tokens: model.apply(p, tokens, enable_dropout=False, method=model.encode)
    )(params, enc)
    cache = network.init_decode_cache(
        SPARSE, batch=2, max_decode_length=length, inputs_length=enc.shape[1]
    )

    @jax.jit
    def step(cache, token):
        logits, new_vars = _decode_step(model, params, cache, encoded, enc, token, length)
        return logits, new_vars["cache"]

    for i in range(length):
        logits, cache = step(cache, dec[:, i : i + 1])
        assert logits.shape == (2, 1, 128)
        np.testing.assert_allclose(
            np.asarray(logits[:, 0]), np.asarray(full[:, i]), RTOL, ATOL, err_msg=f"step {i}"
        )
    assert int(cache["decoder"]["layers_0"]["self_attention"]["cache_index"]) == length


def test_decode_errors_name_the_fix(sparse_variables):
    model = network.EncoderDecoder(SPARSE)
    params = {"params": sparse_variables["params"]}
    cache = network.init_decode_cache(SPARSE, batch=2, max_decode_length=5, inputs_length=6)
    encoded = jnp.zeros((2, 6, 8))
    enc = jnp.ones((2, 6), jnp.int32)

    def run(tokens, max_decode_length):
        return jax.eval_shape(
            lambda: _decode_step(model, params, cache, encoded, enc, tokens, max_decode_length)
        )

    with pytest.raises(ValueError, match="max_decode_length=5"):
        run(jnp.ones((2, 1), jnp.int32), None)
    with pytest.raises(ValueError, match="one token per step"):
        run(jnp.ones((2, 3), jnp.int32), 5)


def test_bad_inputs_are_rejected(dense_variables):
    model = network.EncoderDecoder(DENSE)
    tokens = jnp.ones((1, 6), jnp.int32)

    def run(**kwargs):
        return jax.eval_shape(lambda: model.apply(dense_variables, enable_dropout=False, **kwargs))

    with pytest.raises(ValueError, match="encoder_segment_ids"):
        run(
            encoder_input_tokens=tokens,
            decoder_input_tokens=tokens,
            decoder_segment_ids=tokens,
        )
    with pytest.raises(ValueError, match="decoder_target_tokens has shape"):
        run(
            encoder_input_tokens=tokens,
            decoder_input_tokens=tokens,
            decoder_target_tokens=jnp.ones((1, 5), jnp.int32),
        )
    with pytest.raises(ValueError, match=r"\[batch, length\]"):
        run(encoder_input_tokens=jnp.ones((6,), jnp.int32), decoder_input_tokens=tokens)


def test_moe_padding_masks_from_tokens(sparse_variables):
    enc = jnp.array([[3, 4, 5, 6, 0, 0], [7, 8, 9, 0, 0, 0]])
    dec = jnp.array([[0, 3, 4, 5, 6], [0, 9, 8, 7, 6]])
    targets = jnp.array([[3, 4, 5, 6, 0], [9, 8, 0, 0, 0]])
    _, state = _forward(SPARSE)(sparse_variables, enc, dec, targets)
    inter = state["intermediates"]
    enc_kept = inter["encoder"]["layers_1"]["mlp"]["tokens_per_expert"][0]
    dec_kept = inter["decoder"]["layers_1"]["mlp"]["tokens_per_expert"][0]
    # Nothing is dropped (capacity factor 8), so the experts process exactly the real tokens.
    assert float(jnp.sum(enc_kept)) == 7.0
    assert float(jnp.sum(dec_kept)) == 6.0


def test_tied_logits_scale_decoder_output_by_rsqrt_d_model(dense_variables):
    logits, state = _forward(DENSE)(dense_variables, **UNPACKED_INPUTS)
    decoder_out = np.asarray(state["intermediates"]["decoder"]["decoder_norm"]["__call__"][0])
    embedding = np.asarray(dense_variables["params"]["token_embedder"]["embedding"].value)
    expected = (decoder_out.astype(np.float64) * 8**-0.5) @ embedding.T.astype(np.float64)
    assert logits.dtype == jnp.float32 and logits.shape == (2, 6, 128)
    np.testing.assert_allclose(np.asarray(logits), expected, RTOL, ATOL)
    assert "logits_dense" not in dense_variables["params"]["decoder"]


def test_untied_logits_use_logits_dense_without_scaling(sparse_variables):
    enc = jnp.array([[3, 4, 5, 6, 0, 0], [7, 8, 9, 0, 0, 0]])
    dec = jnp.array([[0, 3, 4, 5, 6], [0, 9, 8, 7, 6]])
    logits, state = _forward(SPARSE)(sparse_variables, enc, dec, jnp.ones_like(dec))
    decoder_out = np.asarray(state["intermediates"]["decoder"]["decoder_norm"]["__call__"][0])
    kernel = np.asarray(sparse_variables["params"]["decoder"]["logits_dense"]["kernel"].value)
    assert kernel.shape == (8, 128)
    np.testing.assert_allclose(
        np.asarray(logits), decoder_out.astype(np.float64) @ kernel, RTOL, ATOL
    )


def test_dropout_is_random_per_rng(dense_variables):
    cfg = dataclasses.replace(DENSE, dropout_rate=0.5)
    model = network.EncoderDecoder(cfg)
    tokens = jnp.array([[3, 4, 5, 6, 7, 8]])
    run = jax.jit(
        lambda rng: model.apply(
            dense_variables, tokens, tokens, rngs={"dropout": rng}, enable_dropout=True
        )
    )
    a, b = run(jax.random.key(0)), run(jax.random.key(1))
    np.testing.assert_array_equal(np.asarray(a), np.asarray(run(jax.random.key(0))))
    assert np.abs(np.asarray(a) - np.asarray(b)).max() > 1e-3


def test_param_counts_from_the_tree():
    params = network.init_abstract(SPARSE)["params"]
    d, f, v, h = 8, 16, 128, 6  # h = heads * head_dim
    attention = 4 * d * h
    gated_mlp = 3 * d * f
    relpos = 2 * 32
    encoder = 2 * (attention + 2 * d) + relpos + d
    decoder = 2 * (2 * attention + 3 * d) + relpos + d
    # One dense and one sparse (4 experts + router) MLP per stack; untied logits.
    mlps = 2 * (gated_mlp + 4 * gated_mlp + d * 4)
    total = v * d + encoder + decoder + mlps + d * v
    assert network.param_count(params) == total
    assert network.expert_param_count(params, SPARSE) == 2 * 4 * gated_mlp
    assert network.active_params_per_token(SPARSE, params) == total - 2 * 3 * gated_mlp


def test_truncated_moe_dtype_runs_the_moe_layer_in_bfloat16():
    """moe_dtype="bfloat16" with float32 activations: the MoE layer (dispatch, experts, combine,
    so its all-to-alls) computes in bfloat16, the rest of the network in float32."""
    config = dataclasses.replace(SPARSE, moe_dtype="bfloat16")
    model = network.EncoderDecoder(config)
    variables = network.init_abstract(config, batch=2, inputs_length=6, targets_length=6)

    def run(v):
        return model.apply(
            v,
            **UNPACKED_INPUTS,
            enable_dropout=False,
            capture_intermediates=True,
            mutable=("intermediates",),
        )

    logits, state = jax.eval_shape(run, variables)
    inter = state["intermediates"]["encoder"]
    assert inter["layers_1"]["mlp"]["__call__"][0].dtype == jnp.bfloat16
    assert inter["layers_1"]["mlp"]["expert"]["__call__"][0].dtype == jnp.bfloat16
    assert inter["layers_0"]["mlp"]["__call__"][0].dtype == jnp.float32
    assert inter["layers_1"]["__call__"][0].dtype == jnp.float32
    assert logits.dtype == jnp.float32
    # The params keep their dtype.
    kernel = variables["params"]["encoder"]["layers_1"]["mlp"]["expert"]["wo"]["kernel"]
    assert kernel.value.dtype == jnp.float32
