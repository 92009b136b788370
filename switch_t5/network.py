"""The (Switch) T5 encoder-decoder: dense and sparse (MoE) layers interleaved.

A sparse layer replaces the dense feed-forward block with `switch_t5.moe.MoeLayer`
(arXiv 2101.03961 sec. 2, Figure 2); which layers are sparse is `config.sparse_layers(stack)`.

Parameter tree (T5X/Flaxformer layout; HF and T5X checkpoint import map onto these names):

  token_embedder/embedding                                [vocab, embed]
  encoder/relpos_bias/rel_embedding                       [heads, relpos_buckets]
  encoder/layers_{i}/pre_attention_layer_norm/scale       [embed]
  encoder/layers_{i}/attention/{query,key,value}/kernel   [embed, heads * head_dim]
  encoder/layers_{i}/attention/out/kernel                 [heads * head_dim, embed]
  encoder/layers_{i}/pre_mlp_layer_norm/scale             [embed]
  encoder/layers_{i}/mlp/wi/kernel                        [embed, mlp]   (gated: wi_0, wi_1)
  encoder/layers_{i}/mlp/wo/kernel                        [mlp, embed]
    sparse layers instead: mlp/router/w/kernel [embed, experts],
    mlp/expert/wi/kernel [experts, embed, mlp] (gated: wi_0, wi_1),
    mlp/expert/wo/kernel [experts, mlp, embed]
  encoder/encoder_norm/scale                              [embed]
  decoder/relpos_bias/rel_embedding                       [heads, relpos_buckets]
  decoder/layers_{i}/pre_self_attention_layer_norm/scale
  decoder/layers_{i}/self_attention/{query,key,value,out}/kernel
  decoder/layers_{i}/pre_cross_attention_layer_norm/scale
  decoder/layers_{i}/encoder_decoder_attention/{query,key,value,out}/kernel
  decoder/layers_{i}/pre_mlp_layer_norm/scale
  decoder/layers_{i}/mlp/...                              (as in the encoder)
  decoder/decoder_norm/scale                              [embed]
  decoder/logits_dense/kernel                             [embed, vocab]  (untied logits only)

ST-MoE sparse layers (`config.sparse_extra_mlp`) add `pre_extra_mlp_layer_norm/scale` and
`extra_mlp/...` (a dense MLP after the MoE).

With `config.scan_layers` each stack is an `nn.scan` over blocks of `config.scan_period(stack)`
layers (one period of the dense/sparse pattern): `{encoder,decoder}/layers/subblock_{j}/...`
holds layer `block * period + j`, every param with a leading "layers" axis of `n / period`
blocks. `switch_t5.scan_utils` converts between the two layouts.

The decoder's KV cache ("cache" collection) lives at
`decoder/layers_{i}/self_attention/{cached_key, cached_value, cache_index}`.

Inputs follow T5X's feature converter: `encoder_input_tokens`, `decoder_input_tokens` (targets
shifted right), `decoder_target_tokens` (0 = padding), and for packed examples
`{encoder,decoder}_segment_ids` and `{encoder,decoder}_positions`.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from switch_t5 import layers
from switch_t5.config import SwitchConfig


def _moe_layer(config: SwitchConfig, is_encoder: bool) -> nn.Module:
    # Imported here so that dense models need nothing of the MoE code.
    from switch_t5 import moe

    if config.moe_dtype is not None and config.moe_dtype != config.dtype:
        # T5X's truncated MoE dtype: dispatch, experts, combine (and so the all-to-alls) run in
        # `moe_dtype`; the router computes in float32 whatever the dtype.
        config = dataclasses.replace(config, dtype=config.moe_dtype)
    return moe.MoeLayer(config=config, is_encoder=is_encoder, name="mlp")


def _residual(dropout: nn.Module, x: jax.Array, y: jax.Array, enable_dropout: bool) -> jax.Array:
    """x + dropout(y), constrained to [batch, length, embed]: every sublayer's residual.

    The caller passes its own Dropout module (one per layer body, called once per sublayer), so
    that each module's dropout rng stream is drawn in sublayer order.
    """
    x = x + dropout(y, deterministic=not enable_dropout)
    return nn.with_logical_constraint(x, ("batch", "length", "embed"))


def _feed_forward(
    config: SwitchConfig,
    x: jax.Array,
    padding_mask: jax.Array | None,
    sparse: bool,
    is_encoder: bool,
    enable_dropout: bool,
) -> jax.Array:
    """The pre-normed dense MLP or MoE block of a layer, with its residual (and, for ST-MoE
    sparse layers, the extra dense MLP after it). Must be called inside a compact module."""
    dropout = nn.Dropout(config.dropout_rate)
    dtype = layers.compute_dtype(config)
    y = layers.RMSNorm(config, name="pre_mlp_layer_norm")(x)
    if sparse:
        y = _moe_layer(config, is_encoder)(y, padding_mask, enable_dropout=enable_dropout)
    else:
        y = layers.MlpBlock(config, name="mlp")(y, enable_dropout=enable_dropout)
    x = _residual(dropout, x, y.astype(dtype), enable_dropout)
    if sparse and config.sparse_extra_mlp:
        # ST-MoE (arXiv 2202.08906 sec. 3.1): a dense FFN right after each sparse one.
        y = layers.RMSNorm(config, name="pre_extra_mlp_layer_norm")(x)
        y = layers.MlpBlock(config, name="extra_mlp")(y, enable_dropout=enable_dropout)
        x = _residual(dropout, x, y, enable_dropout)
    return x


def remat_policy(name: str) -> Any:
    """The `jax.checkpoint` policy of a `SwitchConfig.remat_policy` name ("none" -> None)."""
    policies = {
        "none": None,
        "full": None,  # jax.checkpoint's default: save nothing, recompute the whole layer
        "dots": jax.checkpoint_policies.checkpoint_dots,
        "dots_no_batch": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
    }
    if name not in policies:
        raise ValueError(f"remat_policy={name!r}: use one of {', '.join(policies)}")
    return policies[name]


def _maybe_remat(cls: type[nn.Module], config: SwitchConfig, **kwargs) -> type[nn.Module]:
    if config.remat_policy == "none":
        return cls
    return nn.remat(cls, policy=remat_policy(config.remat_policy), **kwargs)


def _check_tokens(name: str, tokens: jax.Array) -> None:
    if tokens.ndim != 2:
        raise ValueError(f"{name} must be [batch, length] token ids, got shape {tokens.shape}")


def _check_same_shape(name: str, x: jax.Array | None, ref_name: str, ref: jax.Array) -> None:
    if x is not None and x.shape != ref.shape:
        raise ValueError(
            f"{name} has shape {x.shape} but {ref_name} has shape {ref.shape}; packed features "
            "must have one entry per token"
        )


class _StackLayer(nn.Module):
    """The fields of every encoder and decoder layer.

    Attributes:
      config: the network config.
      sparse: use the MoE layer instead of the dense MLP.
    """

    config: SwitchConfig
    sparse: bool = False


class EncoderLayer(_StackLayer):
    """Pre-norm self-attention then a dense MLP or an MoE layer, each with a residual."""

    @nn.compact
    def __call__(
        self,
        x: jax.Array,
        mask: jax.Array | None,
        bias: jax.Array,
        padding_mask: jax.Array | None,
        enable_dropout: bool = False,
    ) -> jax.Array:
        """x: [batch, length, embed] -> same shape.

        `enable_dropout` may be passed positionally: it is static argument 5 under `nn.remat`.
        """
        cfg = self.config
        dropout = nn.Dropout(cfg.dropout_rate)
        y = layers.RMSNorm(cfg, name="pre_attention_layer_norm")(x)
        y = layers.MultiHeadAttention(cfg, name="attention")(
            y, y, mask, bias, enable_dropout=enable_dropout
        )
        x = _residual(dropout, x, y, enable_dropout)
        return _feed_forward(cfg, x, padding_mask, self.sparse, True, enable_dropout)


class DecoderLayer(_StackLayer):
    """Causal self-attention, cross-attention to the encoder, then a dense MLP or an MoE layer."""

    @nn.compact
    def __call__(
        self,
        x: jax.Array,
        encoded: jax.Array,
        self_mask: jax.Array | None,
        self_bias: jax.Array,
        cross_mask: jax.Array | None,
        padding_mask: jax.Array | None,
        enable_dropout: bool = False,
        decode: bool = False,
    ) -> jax.Array:
        """x: [batch, length, embed], encoded: [batch, inputs_length, embed] -> like x.

        `enable_dropout` and `decode` may be passed positionally: static arguments 7 and 8 under
        `nn.remat`.
        """
        cfg = self.config
        dropout = nn.Dropout(cfg.dropout_rate)
        y = layers.RMSNorm(cfg, name="pre_self_attention_layer_norm")(x)
        y = layers.MultiHeadAttention(cfg, name="self_attention")(
            y, y, self_mask, self_bias, enable_dropout=enable_dropout, decode=decode
        )
        x = _residual(dropout, x, y, enable_dropout)

        y = layers.RMSNorm(cfg, name="pre_cross_attention_layer_norm")(x)
        # No relative position bias across encoder and decoder positions (T5).
        y = layers.MultiHeadAttention(cfg, name="encoder_decoder_attention")(
            y, encoded, cross_mask, None, enable_dropout=enable_dropout
        )
        x = _residual(dropout, x, y, enable_dropout)
        return _feed_forward(cfg, x, padding_mask, self.sparse, False, enable_dropout)


def _block_pattern(config: SwitchConfig, stack: str) -> tuple[bool, ...]:
    """Which layers of one scanned block are sparse."""
    period = config.scan_period(stack)
    sparse = set(config.sparse_layers(stack))
    return tuple(j in sparse for j in range(period))


class LayerBlock(nn.Module):
    """One period of a stack's dense/sparse pattern: the unit `nn.scan` repeats.

    Attributes:
      config: the network config.
      layer: the layer class (`EncoderLayer` or `DecoderLayer`).
      pattern: per layer of the block, whether it is sparse.
      enable_dropout: training mode (an attribute, not an argument, so scan/remat keep it
        static).
    """

    config: SwitchConfig
    layer: type[nn.Module]
    pattern: tuple[bool, ...]
    enable_dropout: bool = False

    @nn.compact
    def __call__(self, x, *args):
        """(carry x: [batch, length, embed], broadcast args of the layer) -> (x, None), as
        nn.scan wants."""
        for j, sparse in enumerate(self.pattern):
            x = self.layer(self.config, sparse=sparse, name=f"subblock_{j}")(
                x, *args, self.enable_dropout
            )
        return x, None


def _scanned(config: SwitchConfig, stack: str, num_args: int):
    """`LayerBlock` rematerialised per `config.remat_policy` and scanned over the stack's blocks.

    Params (and sown MoE metrics) get a leading axis of `num_layers / period` blocks, named
    "layers" for the partitioner and the optimizer (per-layer Adafactor factoring).
    """
    n_blocks = config.num_layers(stack) // config.scan_period(stack)
    # Inside scan, CSE across iterations cannot defeat remat, so prevent_cse is not needed.
    block_cls = _maybe_remat(LayerBlock, config, prevent_cse=False)
    return nn.scan(
        block_cls,
        variable_axes={"params": 0, "intermediates": 0, "router_bias": 0, "router_load": 0},
        split_rngs={"params": True, "dropout": True, "jitter": True},
        in_axes=(nn.broadcast,) * num_args,
        length=n_blocks,
        metadata_params={nn.PARTITION_NAME: "layers"},
    )


def _layer_stack(
    config: SwitchConfig,
    stack: str,
    layer_cls: type[nn.Module],
    x: jax.Array,
    args: tuple[Any, ...],
    static_args: tuple[bool, ...],
) -> jax.Array:
    """Runs x: [batch, length, embed] through the stack's layers; returns the same shape.

    `args` are the layer's array arguments after x (shared by every layer), `static_args` its
    trailing flags (`enable_dropout`, then the decoder's `decode`). Scanned: one `LayerBlock`
    per period, params under "layers" (decode mode is refused before this). Unscanned: modules
    `layers_{i}`. Must be called inside a compact module.
    """
    if config.scan_layers:
        blocks = _scanned(config, stack, len(args))
        pattern = _block_pattern(config, stack)
        x, _ = blocks(config, layer_cls, pattern, static_args[0], name="layers")(x, *args)
        return x
    # Static argument positions under nn.remat count the module itself, then x and `args`.
    first_static = 2 + len(args)
    layer_cls = _maybe_remat(
        layer_cls,
        config,
        static_argnums=tuple(range(first_static, first_static + len(static_args))),
    )
    sparse = set(config.sparse_layers(stack))
    for i in range(config.num_layers(stack)):
        x = layer_cls(config, sparse=i in sparse, name=f"layers_{i}")(x, *args, *static_args)
    return x


class Encoder(nn.Module):
    """Embedding, the encoder layers and the final layer norm.

    Attributes:
      config: the network config.
      shared_embedding: the token embedder shared with the decoder.
    """

    config: SwitchConfig
    shared_embedding: nn.Module

    @nn.compact
    def __call__(
        self,
        encoder_input_tokens: jax.Array,
        encoder_segment_ids: jax.Array | None = None,
        *,
        enable_dropout: bool = False,
    ) -> jax.Array:
        """Returns the encoded inputs [batch, length, embed] in the compute dtype."""
        cfg = self.config
        dropout = nn.Dropout(cfg.dropout_rate)
        length = encoder_input_tokens.shape[1]
        real = encoder_input_tokens > 0
        mask = layers.make_attention_mask(real, real)
        if encoder_segment_ids is not None:
            mask = layers.combine_masks(
                mask, layers.segment_mask(encoder_segment_ids, encoder_segment_ids)
            )
        # Computed once and shared by every layer of the stack (T5).
        bias = layers.RelativePositionBiases(cfg, bidirectional=True, name="relpos_bias")(
            length, length
        )

        x = self.shared_embedding(encoder_input_tokens)
        x = dropout(x, deterministic=not enable_dropout)
        x = _layer_stack(cfg, "encoder", EncoderLayer, x, (mask, bias, real), (enable_dropout,))
        x = layers.RMSNorm(cfg, name="encoder_norm")(x)
        return dropout(x, deterministic=not enable_dropout)


class Decoder(nn.Module):
    """Embedding, the decoder layers, the final layer norm and the output logits.

    Attributes:
      config: the network config.
      shared_embedding: the token embedder shared with the encoder (and the tied logits).
    """

    config: SwitchConfig
    shared_embedding: nn.Module

    @nn.compact
    def __call__(
        self,
        encoded: jax.Array,
        encoder_input_tokens: jax.Array,
        decoder_input_tokens: jax.Array,
        decoder_target_tokens: jax.Array | None = None,
        encoder_segment_ids: jax.Array | None = None,
        decoder_segment_ids: jax.Array | None = None,
        *,
        enable_dropout: bool = False,
        decode: bool = False,
        max_decode_length: int | None = None,
    ) -> jax.Array:
        """Returns <float32>[batch, target_length, vocab] logits."""
        cfg = self.config
        dropout = nn.Dropout(cfg.dropout_rate)
        encoder_real = encoder_input_tokens > 0
        if decode:
            masks = _decode_step_masks(
                cfg, decoder_input_tokens, encoder_real, encoder_segment_ids, decoder_segment_ids
            )
            length = decoder_input_tokens.shape[1]
            bias_length = max_decode_length if max_decode_length is not None else length
        else:
            masks = _decoder_masks(
                decoder_input_tokens,
                decoder_target_tokens,
                encoder_real,
                encoder_segment_ids,
                decoder_segment_ids,
            )
            bias_length = decoder_input_tokens.shape[1]
        self_mask, cross_mask, padding_mask = masks
        # Computed once and shared by every layer; in decode mode the full
        # [max_decode_length, max_decode_length] bias, sliced per step by the attention.
        bias = layers.RelativePositionBiases(cfg, bidirectional=False, name="relpos_bias")(
            bias_length, bias_length
        )

        y = self.shared_embedding(decoder_input_tokens)
        y = dropout(y, deterministic=not enable_dropout)
        y = _layer_stack(
            cfg,
            "decoder",
            DecoderLayer,
            y,
            (encoded, self_mask, bias, cross_mask, padding_mask),
            (enable_dropout, decode),
        )
        y = layers.RMSNorm(cfg, name="decoder_norm")(y)
        y = dropout(y, deterministic=not enable_dropout)
        return self._logits(y)

    def _logits(self, y: jax.Array) -> jax.Array:
        """[batch, length, embed] decoder output -> <float32>[batch, length, vocab] logits."""
        cfg = self.config
        if cfg.logits_via_embedding:
            # Tied logits: rescale by d_model**-0.5 first (Mesh-TF, HF), because the N(0, 1)
            # embedding would otherwise give logits of std ~sqrt(d_model).
            y = y * (cfg.d_model**-0.5)
            logits = self.shared_embedding.attend(y)
        else:
            logits = layers.Dense(
                cfg.vocab_size,
                ("embed", "vocab"),
                cfg,
                layers.kernel_init(cfg.init_scale),
                name="logits_dense",
            )(y).astype(jnp.float32)
        return nn.with_logical_constraint(logits, ("batch", "length", "vocab"))


# (self-attention mask, cross-attention mask, MoE padding mask) of the decoder; each may be None.
_DecoderMasks = tuple[jax.Array | None, jax.Array | None, jax.Array | None]


def _decode_step_masks(
    config: SwitchConfig,
    decoder_input_tokens: jax.Array,
    encoder_real: jax.Array,
    encoder_segment_ids: jax.Array | None,
    decoder_segment_ids: jax.Array | None,
) -> _DecoderMasks:
    """The decoder's masks in decode mode, after refusing what the KV cache cannot do."""
    if config.scan_layers:
        raise ValueError(
            "decode=True needs unscanned layers: convert the params with "
            "switch_t5.scan_utils.unscan_params and decode with scan_layers=False"
        )
    if decoder_segment_ids is not None or encoder_segment_ids is not None:
        raise ValueError(
            "decode=True does not support packed (segment_ids) inputs; decode unpacked examples"
        )
    # The KV cache makes the self-attention causal; every decoded token is real.
    decoder_real = jnp.ones_like(decoder_input_tokens, dtype=jnp.bool_)
    cross_mask = layers.make_attention_mask(decoder_real, encoder_real)
    return None, cross_mask, None


def _decoder_masks(
    decoder_input_tokens: jax.Array,
    decoder_target_tokens: jax.Array | None,
    encoder_real: jax.Array,
    encoder_segment_ids: jax.Array | None,
    decoder_segment_ids: jax.Array | None,
) -> _DecoderMasks:
    """The decoder's masks on whole sequences: causal, padding and (packed) segment masks."""
    decoder_real = (
        decoder_target_tokens > 0
        if decoder_target_tokens is not None
        else jnp.ones_like(decoder_input_tokens, dtype=jnp.bool_)
    )
    # [b, 1, l, l]: causal and both positions real.
    self_mask = layers.combine_masks(
        layers.make_causal_mask(decoder_input_tokens),
        layers.make_attention_mask(decoder_real, decoder_real),
    )
    # [b, 1, l, inputs_length]
    cross_mask = layers.make_attention_mask(decoder_real, encoder_real)
    if decoder_segment_ids is not None:
        if encoder_segment_ids is None:
            raise ValueError(
                "decoder_segment_ids given without encoder_segment_ids; packed examples need both"
            )
        self_mask = layers.combine_masks(
            self_mask, layers.segment_mask(decoder_segment_ids, decoder_segment_ids)
        )
        cross_mask = layers.combine_masks(
            cross_mask, layers.segment_mask(decoder_segment_ids, encoder_segment_ids)
        )
    padding_mask = decoder_real if decoder_target_tokens is not None else None
    return self_mask, cross_mask, padding_mask


class EncoderDecoder(nn.Module):
    """The T5 / Switch Transformer encoder-decoder (T5X `Transformer` interface).

    Example:
      logits = model.apply({"params": params}, enc_tokens, dec_inputs, dec_targets,
                           enable_dropout=False)

    Attributes:
      config: the one frozen network config.
    """

    config: SwitchConfig

    def setup(self):
        self.token_embedder = layers.Embed(self.config)
        self.encoder = Encoder(self.config, shared_embedding=self.token_embedder)
        self.decoder = Decoder(self.config, shared_embedding=self.token_embedder)

    def encode(
        self,
        encoder_input_tokens: jax.Array,
        encoder_segment_ids: jax.Array | None = None,
        encoder_positions: jax.Array | None = None,
        *,
        enable_dropout: bool = True,
    ) -> jax.Array:
        """Encodes <int32>[batch, inputs_length] tokens -> [batch, inputs_length, embed].

        `encoder_positions` is accepted for T5X's packed features; relative position biases only
        need position differences within a segment, which `arange` gives as well.
        """
        _check_tokens("encoder_input_tokens", encoder_input_tokens)
        _check_same_shape(
            "encoder_segment_ids", encoder_segment_ids, "encoder_input_tokens", encoder_input_tokens
        )
        _check_same_shape(
            "encoder_positions", encoder_positions, "encoder_input_tokens", encoder_input_tokens
        )
        return self.encoder(
            encoder_input_tokens, encoder_segment_ids, enable_dropout=enable_dropout
        )

    def decode(
        self,
        encoded: jax.Array,
        encoder_input_tokens: jax.Array,
        decoder_input_tokens: jax.Array,
        decoder_target_tokens: jax.Array | None = None,
        encoder_segment_ids: jax.Array | None = None,
        decoder_segment_ids: jax.Array | None = None,
        decoder_positions: jax.Array | None = None,
        *,
        enable_dropout: bool = True,
        decode: bool = False,
        max_decode_length: int | None = None,
    ) -> jax.Array:
        """Decodes given the encoder output; returns <float32>[batch, target_length, vocab].

        With `decode=True` the decoder self-attention reads and extends the KV cache (apply
        with `mutable=["cache"]`); initialise the cache with `init_decode_cache` or by calling
        with full-length [batch, max_decode_length] decoder inputs, then feed one token per call.
        `max_decode_length` (the cache length) is needed for the relative position biases.
        """
        _check_tokens("decoder_input_tokens", decoder_input_tokens)
        _check_tokens("encoder_input_tokens", encoder_input_tokens)
        for name, x in (
            ("decoder_target_tokens", decoder_target_tokens),
            ("decoder_segment_ids", decoder_segment_ids),
            ("decoder_positions", decoder_positions),
        ):
            _check_same_shape(name, x, "decoder_input_tokens", decoder_input_tokens)
        if encoded.shape[:2] != encoder_input_tokens.shape:
            raise ValueError(
                f"encoded has shape {encoded.shape} but encoder_input_tokens has shape "
                f"{encoder_input_tokens.shape}; pass the tokens that were encoded"
            )
        return self.decoder(
            encoded,
            encoder_input_tokens,
            decoder_input_tokens,
            decoder_target_tokens,
            encoder_segment_ids,
            decoder_segment_ids,
            enable_dropout=enable_dropout,
            decode=decode,
            max_decode_length=max_decode_length,
        )

    def __call__(
        self,
        encoder_input_tokens: jax.Array,
        decoder_input_tokens: jax.Array,
        decoder_target_tokens: jax.Array | None = None,
        encoder_segment_ids: jax.Array | None = None,
        decoder_segment_ids: jax.Array | None = None,
        encoder_positions: jax.Array | None = None,
        decoder_positions: jax.Array | None = None,
        *,
        enable_dropout: bool = True,
        decode: bool = False,
        max_decode_length: int | None = None,
    ) -> jax.Array:
        """Encodes and decodes; returns <float32>[batch, target_length, vocab] logits.

        Args:
          encoder_input_tokens: <int32>[batch, inputs_length], 0 = padding.
          decoder_input_tokens: <int32>[batch, target_length], targets shifted right.
          decoder_target_tokens: <int32>[batch, target_length], 0 = padding (masks attention and
            the MoE padding mask); None = every decoder position is real.
          encoder_segment_ids: <int32>[batch, inputs_length] packed segment ids (1, 2, ...; 0 =
            padding) or None.
          decoder_segment_ids: <int32>[batch, target_length] or None.
          encoder_positions: positions within segments (accepted; see `encode`).
          decoder_positions: positions within segments (accepted; see `encode`).
          enable_dropout: dropout (rng stream "dropout"; MoE layers also use "jitter").
          decode: single-step decoding on the KV cache (see `decode`).
          max_decode_length: the cache length in decode mode.
        """
        encoded = self.encode(
            encoder_input_tokens,
            encoder_segment_ids,
            encoder_positions,
            enable_dropout=enable_dropout,
        )
        return self.decode(
            encoded,
            encoder_input_tokens,
            decoder_input_tokens,
            decoder_target_tokens,
            encoder_segment_ids,
            decoder_segment_ids,
            decoder_positions,
            enable_dropout=enable_dropout,
            decode=decode,
            max_decode_length=max_decode_length,
        )


def dummy_inputs(batch: int, inputs_length: int, targets_length: int) -> dict[str, jax.Array]:
    """All-ones int32 features of the given shapes (for init and shape evaluation)."""
    return {
        "encoder_input_tokens": jnp.ones((batch, inputs_length), jnp.int32),
        "decoder_input_tokens": jnp.ones((batch, targets_length), jnp.int32),
        "decoder_target_tokens": jnp.ones((batch, targets_length), jnp.int32),
    }


def init_rngs(rng: jax.Array) -> dict[str, jax.Array]:
    """The rng streams `model.init` needs: params, dropout and the MoE router's jitter."""
    params_rng, dropout_rng, jitter_rng = jax.random.split(rng, 3)
    return {"params": params_rng, "dropout": dropout_rng, "jitter": jitter_rng}


def init_variables(
    config: SwitchConfig,
    rng: jax.Array,
    *,
    batch: int = 1,
    inputs_length: int = 8,
    targets_length: int = 8,
) -> dict[str, Any]:
    """Initialises the (boxed, logically partitioned) variables concretely, under `jax.jit`."""
    model = EncoderDecoder(config)
    inputs = dummy_inputs(batch, inputs_length, targets_length)
    return jax.jit(lambda r: model.init(init_rngs(r), **inputs, enable_dropout=False))(rng)


def init_abstract(
    config: SwitchConfig, *, batch: int = 1, inputs_length: int = 8, targets_length: int = 8
) -> dict[str, Any]:
    """The boxed variables as `jax.ShapeDtypeStruct`s (`jax.eval_shape`: no memory, no FLOPs).

    `nn.get_partition_spec` of the result gives the logical axis names of every param.
    """
    model = EncoderDecoder(config)
    inputs = dummy_inputs(batch, inputs_length, targets_length)
    return jax.eval_shape(
        lambda r: model.init(init_rngs(r), **inputs, enable_dropout=False), jax.random.key(0)
    )


def init_decode_cache(
    config: SwitchConfig, *, batch: int, max_decode_length: int, inputs_length: int
) -> dict[str, Any]:
    """A zero KV cache (the "cache" collection) for `batch` sequences of `max_decode_length`.

    Only shapes are traced (`jax.eval_shape`); the result is zeros, with `cache_index` = 0.
    """
    model = EncoderDecoder(config)

    def cache_shapes(rng):
        variables = model.init(
            init_rngs(rng),
            jnp.ones((batch, inputs_length), jnp.int32),
            jnp.ones((batch, max_decode_length), jnp.int32),
            enable_dropout=False,
            decode=True,
            max_decode_length=max_decode_length,
        )
        return variables["cache"]

    shapes = jax.eval_shape(cache_shapes, jax.random.key(0))
    return jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)


def _unbox(x):
    return x.value if isinstance(x, nn.meta.AxisMetadata) else x


def _leaves_with_paths(params) -> list[tuple[tuple[str, ...], Any]]:
    flat = jax.tree_util.tree_flatten_with_path(
        params, is_leaf=lambda x: isinstance(x, nn.meta.AxisMetadata)
    )[0]
    out = []
    for path, leaf in flat:
        names = tuple(str(getattr(k, "key", getattr(k, "name", k))) for k in path)
        out.append((names, _unbox(leaf)))
    return out


def param_count(params) -> int:
    """Number of parameters in a (boxed or plain, concrete or abstract) params tree."""
    return int(sum(int(np.prod(leaf.shape)) for _, leaf in _leaves_with_paths(params)))


def expert_param_count(params, config: SwitchConfig) -> int:
    """Parameters inside MoE experts (`.../mlp/expert/...`), all experts together."""
    total = 0
    for path, leaf in _leaves_with_paths(params):
        if "expert" in path[:-1]:
            # Scanned stacks (`<stack>/layers/...`) put the stacked layers axis first.
            axis = 1 if len(path) > 1 and path[1] == "layers" else 0
            if len(leaf.shape) <= axis or leaf.shape[axis] != config.num_experts:
                raise ValueError(
                    f"expert param {'/'.join(path)} has shape {leaf.shape}; expected the "
                    f"experts axis ({config.num_experts}) at position {axis}"
                )
            total += int(np.prod(leaf.shape))
    return total


def active_params_per_token(config: SwitchConfig, params) -> int:
    """Parameters one token touches: everything outside the experts (embeddings, attention,
    routers, norms) plus `num_selected_experts` experts in each sparse layer."""
    experts = expert_param_count(params, config)
    if experts == 0:
        return param_count(params)
    k = config.num_selected_experts
    return param_count(params) - experts + experts // config.num_experts * k
