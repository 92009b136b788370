"""T5 building blocks: dense projections, RMS layer norm, relative-position attention, MLP.

Everything here follows T5 / Mesh-TF (arXiv 1910.10683) as used by Switch Transformers
(arXiv 2101.03961): no biases anywhere, pre-norm RMS layer norms with a scale only, no 1/sqrt(d)
scaling of the attention logits (folded into the query init instead), and relative position
biases shared by all layers of a stack.

Modules take the ONE frozen `SwitchConfig` as `config` and read only the fields they need.

Einsum legend:
  b=batch, q=query length, k=key length, l=length, h=heads, d=head_dim (kv), e=embed,
  v=vocab.

Masks are boolean `[batch, 1, q, k]` arrays (True = may attend); biases are float32
`[batch or 1, heads, q, k]` arrays added to the attention logits.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from switch_t5 import partitioning
from switch_t5.config import SwitchConfig

Initializer = Callable[..., jax.Array]

# Added to masked-out attention logits. Finite (not -inf) so that a fully masked row (a padding
# query) gives a uniform softmax instead of NaN, and large enough that exp() underflows to 0.
NEG_INF = -1e10


def compute_dtype(config: SwitchConfig) -> jnp.dtype:
    return jnp.dtype(config.dtype)


def param_dtype(config: SwitchConfig) -> jnp.dtype:
    return jnp.dtype(config.param_dtype)


def kernel_init(scale: float) -> Initializer:
    """Fan-in truncated normal: Switch uses scale 0.1 (arXiv 2101.03961 sec. 2.4), T5 uses 1.0."""
    return nn.initializers.variance_scaling(scale, "fan_in", "truncated_normal")


class Dense(nn.Module):
    """A bias-free projection of the last axis, `y = x @ kernel`, with logical kernel axes.

    Attributes:
      features: output width.
      kernel_axes: logical names of the `[in, features]` kernel.
      config: the network config (dtype, param_dtype).
      init: kernel initializer.
    """

    features: int
    kernel_axes: tuple[str, str]
    config: SwitchConfig
    init: Initializer

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """x: [..., in] -> [..., features] in the compute dtype."""
        # Under FSDP d_model of a (non-expert) weight has its own logical name.
        embed = partitioning.weight_embed_axis(self.config)
        axes = tuple(embed if a == "embed" else a for a in self.kernel_axes)
        kernel = self.param(
            "kernel",
            nn.with_logical_partitioning(self.init, axes),
            (x.shape[-1], self.features),
            param_dtype(self.config),
        )
        dtype = compute_dtype(self.config)
        return jnp.dot(x.astype(dtype), kernel.astype(dtype))


class Embed(nn.Module):
    """The token embedding `[vocab, embed]`, shared by encoder, decoder and (tied) logits.

    Attributes:
      config: vocab_size, d_model, dtype, param_dtype.
    """

    config: SwitchConfig

    def setup(self):
        self.embedding = self.param(
            "embedding",
            # Mesh-TF/T5 embeddings are N(0, 1): no sqrt(d_model) scaling of the inputs either.
            nn.with_logical_partitioning(
                nn.initializers.normal(stddev=1.0),
                ("vocab", partitioning.weight_embed_axis(self.config)),
            ),
            (self.config.vocab_size, self.config.d_model),
            param_dtype(self.config),
        )

    def __call__(self, tokens: jax.Array) -> jax.Array:
        """tokens: <int32>[batch, length] -> <dtype>[batch, length, embed]."""
        if not jnp.issubdtype(tokens.dtype, jnp.integer):
            raise TypeError(f"token ids must be integers, got dtype {tokens.dtype}")
        # [vocab, embed] gathered by [batch, length] -> [batch, length, embed]
        x = jnp.take(self.embedding.astype(compute_dtype(self.config)), tokens, axis=0)
        return nn.with_logical_constraint(x, ("batch", "length", "embed"))

    def attend(self, x: jax.Array) -> jax.Array:
        """Tied output projection. x: [batch, length, embed] -> <float32>[batch, length, vocab]."""
        dtype = compute_dtype(self.config)
        # Accumulate in float32: the logits feed a float32 softmax cross-entropy.
        return jnp.einsum(
            "ble,ve->blv",
            x.astype(dtype),
            self.embedding.astype(dtype),
            preferred_element_type=jnp.float32,
        )


class RMSNorm(nn.Module):
    """T5 layer norm: x / sqrt(mean(x^2) + eps) * scale; no mean subtraction, no bias.

    Attributes:
      config: layer_norm_epsilon, dtype, param_dtype.
    """

    config: SwitchConfig

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """x: [..., embed] -> same shape in the compute dtype; statistics in float32."""
        scale = self.param(
            "scale",
            nn.with_logical_partitioning(nn.initializers.ones, ("embed",)),
            (x.shape[-1],),
            param_dtype(self.config),
        )
        x32 = x.astype(jnp.float32)
        var = jnp.mean(jnp.square(x32), axis=-1, keepdims=True)
        y = x32 * jax.lax.rsqrt(var + self.config.layer_norm_epsilon)
        dtype = compute_dtype(self.config)
        return y.astype(dtype) * scale.astype(dtype)


def relative_position_bucket(
    relative_position: jax.Array | np.ndarray,
    *,
    bidirectional: bool,
    num_buckets: int = 32,
    max_distance: int = 128,
) -> jax.Array:
    """T5's bucketing of `key_position - query_position` (Mesh-TF `_relative_position_bucket`).

    Half the buckets (all of them when causal) hold exact distances 0..max_exact-1; the rest are
    logarithmically spaced up to `max_distance`, beyond which everything shares the last bucket.
    In bidirectional mode keys after the query use the upper half of the buckets.

    Args:
      relative_position: <int32>[...] key position minus query position.
      bidirectional: encoder (True) or causal decoder (False; future keys map to bucket 0).
      num_buckets: number of buckets.
      max_distance: distance at which the buckets saturate.

    Returns:
      <int32>[...] bucket ids in [0, num_buckets).
    """
    n = -jnp.asarray(relative_position, jnp.int32)
    bucket = jnp.zeros_like(n)
    if bidirectional:
        num_buckets //= 2
        bucket += (n < 0).astype(jnp.int32) * num_buckets
        n = jnp.abs(n)
    else:
        n = jnp.maximum(n, 0)
    max_exact = num_buckets // 2
    is_small = n < max_exact
    # log(n / max_exact) / log(max_distance / max_exact) in [0, 1) maps onto the remaining buckets.
    # The epsilon keeps log() finite at n = 0 (those positions take the `is_small` branch anyway).
    log_ratio = jnp.log(n.astype(jnp.float32) / max_exact + np.finfo(np.float32).eps) / np.log(
        max_distance / max_exact
    )
    val_if_large = max_exact + (log_ratio * (num_buckets - max_exact)).astype(jnp.int32)
    val_if_large = jnp.minimum(val_if_large, num_buckets - 1)
    return bucket + jnp.where(is_small, n, val_if_large)


class RelativePositionBiases(nn.Module):
    """T5 relative position biases: one learned scalar per (head, bucket), shared by all layers.

    Computed once per stack (encoder: bidirectional, decoder: causal) and added to every layer's
    self-attention logits.

    Attributes:
      config: num_heads, relative_attention_num_buckets, relative_attention_max_distance.
      bidirectional: encoder (True) or decoder (False).
    """

    config: SwitchConfig
    bidirectional: bool

    @nn.compact
    def __call__(self, query_length: int, key_length: int) -> jax.Array:
        """Returns <float32>[1, heads, query_length, key_length].

        Positions are `arange`: within a packed segment positions are contiguous, so the
        differences are the same as those of the segment's own positions, and pairs across
        segments are masked anyway (T5X does the same).
        """
        cfg = self.config
        rel_embedding = self.param(
            "rel_embedding",
            nn.with_logical_partitioning(
                nn.initializers.variance_scaling(1.0, "fan_avg", "uniform"),
                ("heads", "relpos_buckets"),
            ),
            (cfg.num_heads, cfg.relative_attention_num_buckets),
            param_dtype(cfg),
        )
        # [q, 1] and [1, k] -> [q, k]
        relative_position = np.arange(key_length)[None, :] - np.arange(query_length)[:, None]
        buckets = relative_position_bucket(
            relative_position,
            bidirectional=self.bidirectional,
            num_buckets=cfg.relative_attention_num_buckets,
            max_distance=cfg.relative_attention_max_distance,
        )
        # [heads, buckets] gathered by [q, k] -> [heads, q, k]
        bias = jnp.take(rel_embedding.astype(jnp.float32), buckets, axis=1)
        # [heads, q, k] -> [1, heads, q, k]
        return bias[None]


def make_attention_mask(
    query_input: jax.Array,
    key_input: jax.Array,
    pairwise_fn: Callable[[jax.Array, jax.Array], jax.Array] = jnp.logical_and,
) -> jax.Array:
    """Pairwise mask from per-position inputs: [batch, q], [batch, k] -> <bool>[batch, 1, q, k]."""
    # [b, q, 1] op [b, 1, k] -> [b, q, k] -> [b, 1, q, k]
    mask = pairwise_fn(query_input[:, :, None], key_input[:, None, :])
    return mask[:, None].astype(jnp.bool_)


def make_causal_mask(x: jax.Array) -> jax.Array:
    """<bool>[batch, 1, length, length]: query i may attend to keys j <= i. x: [batch, length]."""
    idx = jnp.broadcast_to(jnp.arange(x.shape[-1], dtype=jnp.int32), x.shape)
    return make_attention_mask(idx, idx, jnp.greater_equal)


def combine_masks(*masks: jax.Array | None) -> jax.Array | None:
    """Logical AND of the masks that are not None (None if all are None)."""
    masks = [m for m in masks if m is not None]
    if not masks:
        return None
    shapes = {m.ndim for m in masks}
    if len(shapes) != 1:
        raise ValueError(f"masks must have equal rank, got shapes {[m.shape for m in masks]}")
    mask = masks[0].astype(jnp.bool_)
    for m in masks[1:]:
        mask = jnp.logical_and(mask, m.astype(jnp.bool_))
    return mask


def segment_mask(query_segment_ids: jax.Array, key_segment_ids: jax.Array) -> jax.Array:
    """Packing: attend only within the same segment. <bool>[batch, 1, q, k]."""
    return make_attention_mask(query_segment_ids, key_segment_ids, jnp.equal)


def mask_to_bias(mask: jax.Array | None, bias: jax.Array | None) -> jax.Array | None:
    """Turns a boolean mask into an additive float32 bias and adds `bias` (either may be None)."""
    if mask is None:
        return None if bias is None else bias.astype(jnp.float32)
    attention_bias = jnp.where(mask, 0.0, NEG_INF).astype(jnp.float32)
    return attention_bias if bias is None else attention_bias + bias.astype(jnp.float32)


class MultiHeadAttention(nn.Module):
    """T5 multi-head dot-product attention with an optional autoregressive KV cache.

    Params (T5X layout): `query`, `key`, `value`: `kernel` [embed, heads * head_dim]
    (`joined_kv`); `out`: `kernel` [heads * head_dim, embed].

    In decode mode (self-attention of the decoder only) the "cache" collection holds
    `cached_key`, `cached_value`: [batch, max_length, heads, head_dim] in the compute dtype and
    `cache_index`: <int32>[] (the next position to write, shared by the batch). The first
    call with `decode=True` (typically through `model.init`/`jax.eval_shape` on full-length
    inputs) creates the cache; later calls take one token at a time.

    Attributes:
      config: num_heads, head_dim, init_scale, dropout_rate, dtype, param_dtype.
    """

    config: SwitchConfig

    @nn.compact
    def __call__(
        self,
        inputs_q: jax.Array,
        inputs_kv: jax.Array,
        mask: jax.Array | None = None,
        bias: jax.Array | None = None,
        *,
        enable_dropout: bool = False,
        decode: bool = False,
    ) -> jax.Array:
        """Attends `inputs_q` to `inputs_kv`.

        Args:
          inputs_q: [batch, q, embed].
          inputs_kv: [batch, k, embed].
          mask: <bool>[batch, 1, q, k] (True = attend) or None. In decode mode the cache adds
            the causal part itself: pass only what else applies (usually None).
          bias: [1 or batch, heads, q, k] added to the logits (relative positions). In decode
            mode pass the full [1, heads, max_length, max_length] bias; the row of the current
            position is taken from it.
          enable_dropout: dropout on the attention probabilities.
          decode: use and update the KV cache.

        Returns:
          [batch, q, embed] in the compute dtype.
        """
        cfg = self.config
        dtype = compute_dtype(cfg)
        heads, head_dim = cfg.num_heads, cfg.head_dim
        query, key, value = self._project_qkv(inputs_q, inputs_kv)
        if decode:
            key, value, mask, bias = self._decode_cache(query, key, value, mask, bias)

        # [b, q, h, d] x [b, k, h, d] -> [b, h, q, k]; logits and softmax in float32.
        logits = jnp.einsum("bqhd,bkhd->bhqk", query, key, preferred_element_type=jnp.float32)
        attention_bias = mask_to_bias(mask, bias)
        if attention_bias is not None:
            logits = logits + attention_bias
        probs = jax.nn.softmax(logits, axis=-1).astype(dtype)
        probs = nn.Dropout(cfg.dropout_rate)(probs, deterministic=not enable_dropout)
        # [b, h, q, k] x [b, k, h, d] -> [b, q, h, d]
        out = jnp.einsum("bhqk,bkhd->bqhd", probs, value)
        out = nn.with_logical_constraint(out, ("batch", "length", "heads", "kv"))
        # [b, q, h, d] -> [b, q, h * d]
        out = out.reshape(*out.shape[:-2], heads * head_dim)
        init = kernel_init(cfg.init_scale)
        return Dense(cfg.d_model, ("joined_kv", "embed"), cfg, init, name="out")(out)

    def _project_qkv(
        self, inputs_q: jax.Array, inputs_kv: jax.Array
    ) -> tuple[jax.Array, jax.Array, jax.Array]:
        """[batch, q or k, embed] -> query, key, value: [batch, q or k, heads, kv]."""
        cfg = self.config
        heads, head_dim = cfg.num_heads, cfg.head_dim
        init = kernel_init(cfg.init_scale)

        # No 1/sqrt(head_dim) on the logits: T5/Mesh-TF fold it into the query init, std
        # (d_model * head_dim)**-0.5 at init_scale 1 (equivalent under Adafactor).
        # (The scale is cast to the param dtype so bfloat16 params stay bfloat16.)
        def query_init(key, shape, dtype=jnp.float32):
            return init(key, shape, dtype) / jnp.asarray(np.sqrt(head_dim), dtype)

        qkv_axes = ("embed", "joined_kv")

        def project(name, init_fn, x):
            y = Dense(heads * head_dim, qkv_axes, cfg, init_fn, name=name)(x)
            # [batch, length, heads * kv] -> [batch, length, heads, kv]
            y = y.reshape(*y.shape[:-1], heads, head_dim)
            return nn.with_logical_constraint(y, ("batch", "length", "heads", "kv"))

        query = project("query", query_init, inputs_q)
        key = project("key", init, inputs_kv)
        value = project("value", init, inputs_kv)
        return query, key, value

    def _decode_cache(
        self,
        query: jax.Array,
        key: jax.Array,
        value: jax.Array,
        mask: jax.Array | None,
        bias: jax.Array | None,
    ) -> tuple[jax.Array, jax.Array, jax.Array | None, jax.Array | None]:
        """Decode mode: the KV cache, created by the first call and written one step at a time.

        The first call (full-length inputs, typically `model.init`) only creates the variables
        and returns its arguments unchanged. Later calls write this step's key and value at
        `cache_index` and return (key, value, mask, bias) over all cached positions: keys and
        values [batch, max_length, heads, kv], the mask limited to the positions written so
        far, the bias cut to the current row.
        """
        is_initialized = self.has_variable("cache", "cached_key")
        cached_key = self.variable("cache", "cached_key", jnp.zeros, key.shape, key.dtype)
        cached_value = self.variable("cache", "cached_value", jnp.zeros, value.shape, value.dtype)
        cache_index = self.variable("cache", "cache_index", lambda: jnp.array(0, dtype=jnp.int32))
        if not is_initialized:
            return key, value, mask, bias
        batch, max_length, _, _ = cached_key.value.shape
        if query.shape[1] != 1:
            raise ValueError(
                f"decode=True with an initialised cache takes one token per step, got "
                f"decoder inputs of length {query.shape[1]}; feed [batch, 1] tokens"
            )
        if key.shape[0] != batch:
            raise ValueError(
                f"decode batch {key.shape[0]} does not match the cache's batch {batch}; "
                "initialise the cache with the same batch size"
            )
        cur = cache_index.value
        # [batch, max_length, heads, kv] with [batch, 1, heads, kv] written at `cur`.
        key = jax.lax.dynamic_update_slice(cached_key.value, key, (0, cur, 0, 0))
        value = jax.lax.dynamic_update_slice(cached_value.value, value, (0, cur, 0, 0))
        cached_key.value, cached_value.value = key, value
        cache_index.value = cur + 1
        # Causality from the cache: only positions written so far (<= cur).
        # [max_length] -> [batch, 1, 1, max_length]
        valid = jnp.arange(max_length) <= cur
        step_mask = jnp.broadcast_to(valid[None, None, None, :], (batch, 1, 1, max_length))
        mask = combine_masks(mask, step_mask)
        if bias is not None:
            if bias.shape[-1] != max_length or bias.shape[-2] != max_length:
                raise ValueError(
                    f"decode-mode relative position bias has shape {bias.shape} but the "
                    f"cache holds {max_length} positions; pass max_decode_length="
                    f"{max_length} (the length the cache was initialised with)"
                )
            # [1, heads, max_length, max_length] -> [1, heads, 1, max_length]
            bias = jax.lax.dynamic_slice_in_dim(bias, cur, 1, axis=-2)
        return key, value, mask, bias


_ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "relu": jax.nn.relu,
    # T5.1.1 / Mesh-TF use the tanh approximation of GELU.
    "gelu": lambda x: jax.nn.gelu(x, approximate=True),
    "silu": jax.nn.silu,
    "linear": lambda x: x,
}


def apply_activations(hidden: Sequence[jax.Array], activations: Sequence[str]) -> jax.Array:
    """Multiplies the activated branches: ("gelu", "linear") is the gated GELU of T5.1.1."""
    unknown = [a for a in activations if a not in _ACTIVATIONS]
    if unknown:
        raise ValueError(f"unknown activation(s) {unknown}; known: {sorted(_ACTIVATIONS)}")
    out = _ACTIVATIONS[activations[0]](hidden[0])
    for h, name in zip(hidden[1:], activations[1:]):
        out = out * _ACTIVATIONS[name](h)
    return out


class MlpBlock(nn.Module):
    """The dense T5 feed-forward block: wi (or wi_0, wi_1 when gated) -> act -> dropout -> wo.

    Attributes:
      config: d_model, d_ff, mlp_activations, init_scale, dropout_rate, dtype, param_dtype.
    """

    config: SwitchConfig

    @nn.compact
    def __call__(self, x: jax.Array, *, enable_dropout: bool = False) -> jax.Array:
        """x: [batch, length, embed] -> [batch, length, embed] in the compute dtype."""
        cfg = self.config
        init = kernel_init(cfg.init_scale)
        names = (
            ["wi"]
            if len(cfg.mlp_activations) == 1
            else [f"wi_{i}" for i in range(len(cfg.mlp_activations))]
        )
        # [batch, length, embed] -> [batch, length, mlp] per branch
        hidden = [Dense(cfg.d_ff, ("embed", "mlp"), cfg, init, name=n)(x) for n in names]
        h = apply_activations(hidden, cfg.mlp_activations)
        h = nn.with_logical_constraint(h, ("batch", "length", "mlp"))
        h = nn.Dropout(cfg.dropout_rate)(h, deterministic=not enable_dropout)
        # [batch, length, mlp] -> [batch, length, embed]
        return Dense(cfg.d_model, ("mlp", "embed"), cfg, init, name="wo")(h)
