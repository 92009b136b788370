"""T5 building blocks: RMS norm, relative position buckets, attention masks, attention, MLP.

The tied/untied output logits are tested with the whole network in test_network.py.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from tiny import tiny_config

from switch_t5 import layers
from switch_t5.config import SwitchConfig

RTOL, ATOL = 1e-5, 1e-6

# Odd sizes so that swapped axes fail loudly.
CFG = tiny_config(num_encoder_layers=1, num_decoder_layers=1, num_experts=0, dropout_rate=0.0)


def test_rms_norm_matches_formula():
    x = jax.random.normal(jax.random.key(0), (2, 5, 8)) * 3.0 + 1.0
    norm = layers.RMSNorm(CFG)
    params = norm.init(jax.random.key(1), x)
    scale = np.linspace(0.5, 2.0, 8).astype(np.float32)
    params = {"params": {"scale": params["params"]["scale"].replace_boxed(jnp.asarray(scale))}}
    y = norm.apply(params, x)
    xn = np.asarray(x, np.float64)
    # No mean subtraction, no bias (T5).
    expected = xn / np.sqrt(np.mean(xn**2, axis=-1, keepdims=True) + 1e-6) * scale
    np.testing.assert_allclose(np.asarray(y), expected, rtol=RTOL, atol=ATOL)
    assert set(params["params"]) == {"scale"}


def test_rms_norm_bfloat16_output_and_float32_statistics():
    cfg = SwitchConfig(**{**CFG.__dict__, "dtype": "bfloat16"})
    # Large values whose squares overflow bfloat16's precision, not its range.
    x = (jax.random.normal(jax.random.key(0), (3, 8)) * 100.0).astype(jnp.bfloat16)
    norm = layers.RMSNorm(cfg)
    y = norm.apply(norm.init(jax.random.key(1), x), x)
    assert y.dtype == jnp.bfloat16
    rms = np.sqrt(np.mean(np.square(np.asarray(y, np.float32)), axis=-1))
    # bfloat16 output: 8 mantissa bits, so the unit RMS holds to ~2**-8.
    np.testing.assert_allclose(rms, 1.0, rtol=1e-2)


# Hand-computed from Mesh-TF's _relative_position_bucket, 32 buckets, max distance 128.
# Bidirectional: 16 buckets per direction, exact below 8, log-spaced 8..15 up to distance 128,
# keys AFTER the query (relative_position > 0) offset by 16.
#   -20: 8 + int(log(20/8) / log(128/8) * 8) = 8 + int(2.64) = 10
#   -127: 8 + int(log(127/8) / log(16) * 8) = 8 + int(7.98) = 15
BIDIRECTIONAL = {0: 0, -1: 1, -3: 3, -7: 7, -8: 8, -20: 10, -127: 15, -1000: 15, 3: 19, 20: 26}
# Causal: 32 buckets for the past, exact below 16, log-spaced 16..31 up to 128; future -> 0.
#   -40: 16 + int(log(40/16) / log(8) * 16) = 16 + int(7.05) = 23
#   -100: 16 + int(log(100/16) / log(8) * 16) = 16 + int(14.10) = 30
CAUSAL = {0: 0, 5: 0, 100: 0, -5: 5, -15: 15, -16: 16, -40: 23, -100: 30, -127: 31, -500: 31}


@pytest.mark.parametrize(
    "bidirectional, table", [(True, BIDIRECTIONAL), (False, CAUSAL)], ids=["enc", "dec"]
)
def test_relative_position_buckets_hand_computed(bidirectional, table):
    rel = np.array(list(table), np.int32)
    buckets = layers.relative_position_bucket(
        rel, bidirectional=bidirectional, num_buckets=32, max_distance=128
    )
    assert np.asarray(buckets).tolist() == list(table.values())


def test_relative_position_bias_looks_up_buckets_per_head():
    module = layers.RelativePositionBiases(CFG, bidirectional=False)
    variables = module.init(jax.random.key(0), 5, 5)
    table = np.asarray(variables["params"]["rel_embedding"].value)
    assert table.shape == (2, 32)  # [heads, buckets] (T5X layout)
    bias = np.asarray(module.apply(variables, 5, 7))
    assert bias.shape == (1, 2, 5, 7)
    for q in range(5):
        for k in range(7):
            b = max(q - k, 0)  # causal, exact range: past distance, future -> bucket 0
            np.testing.assert_allclose(bias[0, :, q, k], table[:, b], rtol=RTOL, atol=ATOL)


def test_attention_masks_with_packing():
    # Two segments packed in one row, then padding: [a a a b b 0].
    tokens = jnp.array([[5, 6, 7, 8, 9, 0]])
    segments = jnp.array([[1, 1, 1, 2, 2, 0]])
    real = tokens > 0
    enc = layers.combine_masks(
        layers.make_attention_mask(real, real), layers.segment_mask(segments, segments)
    )
    dec = layers.combine_masks(layers.make_causal_mask(tokens), enc)
    a, b = np.array([1, 1, 1, 0, 0, 0]), np.array([0, 0, 0, 1, 1, 0])
    expected_enc = np.stack([a, a, a, b, b, np.zeros(6)]).astype(bool)
    expected_dec = np.array(
        [
            [1, 0, 0, 0, 0, 0],
            [1, 1, 0, 0, 0, 0],
            [1, 1, 1, 0, 0, 0],
            [0, 0, 0, 1, 0, 0],
            [0, 0, 0, 1, 1, 0],
            [0, 0, 0, 0, 0, 0],
        ],
        bool,
    )
    assert enc.shape == dec.shape == (1, 1, 6, 6)
    np.testing.assert_array_equal(np.asarray(enc[0, 0]), expected_enc)
    np.testing.assert_array_equal(np.asarray(dec[0, 0]), expected_dec)


def _reference_attention(p, xq, xkv, mask, bias):
    """Numpy T5 attention: no 1/sqrt(d) on the logits, no biases on the projections."""
    h, d = CFG.num_heads, CFG.head_dim
    q = (xq @ p["query"]).reshape(*xq.shape[:2], h, d)
    k = (xkv @ p["key"]).reshape(*xkv.shape[:2], h, d)
    v = (xkv @ p["value"]).reshape(*xkv.shape[:2], h, d)
    logits = np.einsum("bqhd,bkhd->bhqk", q, k) + bias
    logits = np.where(mask, logits, -1e10)
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    out = np.einsum("bhqk,bkhd->bqhd", probs, v).reshape(*xq.shape[:2], h * d)
    return out @ p["out"]


def test_attention_matches_reference_with_mask_and_bias():
    xq = np.asarray(jax.random.normal(jax.random.key(0), (2, 4, 8)), np.float64)
    xkv = np.asarray(jax.random.normal(jax.random.key(1), (2, 5, 8)), np.float64)
    mask = np.array(jax.random.bernoulli(jax.random.key(2), 0.7, (2, 1, 4, 5)))
    mask[..., 0] = True  # every query sees at least one key
    bias = np.asarray(jax.random.normal(jax.random.key(3), (1, 2, 4, 5)), np.float64)
    attn = layers.MultiHeadAttention(CFG)
    variables = jax.jit(attn.init)(jax.random.key(4), xq, xkv, jnp.asarray(mask), jnp.asarray(bias))
    p = {
        n: np.asarray(variables["params"][n]["kernel"].value, np.float64)
        for n in variables["params"]
    }
    assert p["query"].shape == (8, 6) and p["out"].shape == (6, 8)
    y = jax.jit(attn.apply)(
        variables,
        jnp.asarray(xq, jnp.float32),
        jnp.asarray(xkv, jnp.float32),
        jnp.asarray(mask),
        jnp.asarray(bias, jnp.float32),
    )
    np.testing.assert_allclose(
        np.asarray(y), _reference_attention(p, xq, xkv, mask, bias), rtol=RTOL, atol=ATOL
    )


def test_query_init_folds_in_head_dim_scaling():
    # T5/Mesh-TF: the query kernel std is (init_scale / d_model)**0.5 / head_dim**0.5, the others
    # (init_scale / fan_in)**0.5. 64 x 96 = 6144 samples per kernel: the std estimate has a
    # relative standard error of ~1%, hence the 5% tolerance.
    cfg = SwitchConfig(**{**CFG.__dict__, "d_model": 64, "num_heads": 4, "head_dim": 24})
    x = jnp.zeros((1, 2, 64))
    params = layers.MultiHeadAttention(cfg).init(jax.random.key(0), x, x)["params"]
    std = {n: float(np.std(np.asarray(params[n]["kernel"].value))) for n in params}
    scale = cfg.init_scale
    np.testing.assert_allclose(std["query"], (scale / 64) ** 0.5 / 24**0.5, rtol=0.05)
    np.testing.assert_allclose(std["key"], (scale / 64) ** 0.5, rtol=0.05)
    np.testing.assert_allclose(std["value"], (scale / 64) ** 0.5, rtol=0.05)
    np.testing.assert_allclose(std["out"], (scale / 96) ** 0.5, rtol=0.05)


@pytest.mark.parametrize("activations", [("relu",), ("gelu", "linear")], ids=["relu", "geglu"])
def test_mlp_matches_reference(activations):
    cfg = SwitchConfig(**{**CFG.__dict__, "mlp_activations": activations})
    x = jax.random.normal(jax.random.key(0), (2, 3, 8))
    mlp = layers.MlpBlock(cfg)
    variables = mlp.init(jax.random.key(1), x)
    p = {n: np.asarray(v["kernel"].value, np.float64) for n, v in variables["params"].items()}
    xn = np.asarray(x, np.float64)
    if activations == ("relu",):
        assert set(p) == {"wi", "wo"}
        hidden = np.maximum(xn @ p["wi"], 0.0)
    else:
        assert set(p) == {"wi_0", "wi_1", "wo"}
        a = xn @ p["wi_0"]
        gelu = 0.5 * a * (1 + np.tanh(np.sqrt(2 / np.pi) * (a + 0.044715 * a**3)))
        hidden = gelu * (xn @ p["wi_1"])
    np.testing.assert_allclose(
        np.asarray(mlp.apply(variables, x)), hidden @ p["wo"], rtol=RTOL, atol=ATOL
    )


def test_embed_rejects_float_tokens():
    embed = layers.Embed(CFG)
    variables = embed.init(jax.random.key(0), jnp.ones((1, 2), jnp.int32))
    with pytest.raises(TypeError, match="integers"):
        embed.apply(variables, jnp.ones((1, 2), jnp.float32))
