"""Hugging Face SwitchTransformers <-> this project: config, parameter names, import and export.

HF's conventions and how they map (transformers' `modeling_switch_transformers.py`):

- Sparse layers (`hf_sparse_layers`): block i of a stack is sparse when `i % sparse_step == 1`
  (every block when the step is 1, none when it is 0). `sparse_step` is config.json's
  `encoder_sparse_step` / `decoder_sparse_step` when present (transformers keeps an explicit
  step), else `num_layers // num_sparse_layers` (`num_layers` when there are 0 sparse layers,
  which still makes block 1 sparse). The import reads which blocks hold a router from the
  weights and checks that against the config; the export writes both the count and the step.
- torch `nn.Linear` weights are [out, in]; our kernels are [in, out] (transposed on the way).
- Experts are separate tensors `mlp.experts.expert_{e}.{wi,wo}.weight`; ours are stacked
  `mlp/expert/{wi,wo}/kernel` [experts, ...]; the router `mlp.router.classifier.weight`
  [experts, embed] is our `mlp/router/w/kernel` [embed, experts].
- The relative attention bias lives only in block 0 (`relative_attention_bias.weight`
  [buckets, heads]); ours is `relpos_bias/rel_embedding` [heads, buckets] once per stack.
- Tied embeddings (`tie_word_embeddings`): `shared.weight` [vocab, embed] is our
  `token_embedder/embedding`, padded with zero rows to a multiple of 128; both models scale the
  decoder output by d_model**-0.5 before the tied projection. Untied: `lm_head.weight` is our
  `decoder/logits_dense/kernel` (no rescale in either).

Routing: the import records transformers' rule in the SwitchConfig it makes (saved with the
checkpoint): `SwitchConfig.expert_capacity` = config.json's `expert_capacity`, i.e. every
sequence is one routing group with exactly that many slots per expert (no factor, no minimum),
padding takes slots in sequence order, a dropped token's expert output is 0 and a decoding step
(one token per sequence) never drops. With dtype="float32" the imported model reproduces
transformers' logits and greedy tokens. `expert_capacity=None` (a `load_hf` / `hf_to_orbax`
override, or the gin binding `switch_t5.SwitchConfig.expert_capacity = None`) switches to this
project's capacity-factor routing (`eval_capacity_factor` over routing groups).
"""

from __future__ import annotations

import json
import os
from typing import Any

import numpy as np

from switch_t5 import errors
from switch_t5.config import SwitchConfig, pad_vocab_size, sparse_layers_hf
from switch_t5.interop import streaming

_ACT_TO_OURS = {
    "relu": ("relu",),
    # Our GELU is the tanh approximation (T5.1.1 / Mesh-TF); HF names it gelu_new.
    "gelu_new": ("gelu",),
    "gelu_pytorch_tanh": ("gelu",),
}


class UnsupportedFeatureError(errors.UserError):
    """A model feature the target format cannot represent (the message names it)."""


# SwitchTransformersConfig's defaults for keys a config.json may lack.
_HF_DEFAULT_NUM_SPARSE_LAYERS = 3


def hf_sparse_step(num_layers: int, num_sparse_layers: int) -> int:
    """HF's `sparse_step` of a stack (`SwitchTransformersConfig.__post_init__`)."""
    return num_layers // num_sparse_layers if num_sparse_layers > 0 else num_layers


def hf_stack_sparse_step(hf: dict[str, Any], stack: str) -> tuple[int, str]:
    """(sparse_step, where it comes from) of one stack of an HF config.json, as transformers
    builds it: an explicit `{stack}_sparse_step` wins over `num_layers // num_sparse_layers`
    (`__post_init__` computes the step, then the config's own keys are set over it)."""
    key = f"num_sparse_{stack}_layers"
    explicit = hf.get(f"{stack}_sparse_step")
    if explicit is not None:
        return int(explicit), f"{stack}_sparse_step={explicit}"
    count = int(hf.get(key, _HF_DEFAULT_NUM_SPARSE_LAYERS))
    n = hf_num_layers(hf, stack)
    return hf_sparse_step(n, count), f"{key}={count}, so sparse_step={n} // {count}"


def hf_num_layers(hf: dict[str, Any], stack: str) -> int:
    """Blocks of one stack of an HF config.json."""
    n_enc = int(hf["num_layers"])
    return n_enc if stack == "encoder" else int(hf.get("num_decoder_layers") or n_enc)


def hf_sparse_layers(hf: dict[str, Any], stack: str) -> tuple[int, ...]:
    """The sparse blocks of one stack of an HF config.json (transformers' rule exactly:
    `is_sparse = (i % step == 1 or step == 1) if step > 0 else False`)."""
    step, _ = hf_stack_sparse_step(hf, stack)
    return sparse_layers_hf(hf_num_layers(hf, stack), step)


def read_hf_config(path: str) -> dict[str, Any]:
    file = os.path.join(path, "config.json") if os.path.isdir(path) else path
    if not os.path.exists(file):
        raise FileNotFoundError(f"no config.json in {path}; pass a Hugging Face model directory")
    with open(file) as f:
        cfg = json.load(f)
    if cfg.get("model_type") != "switch_transformers":
        raise ValueError(
            f"{file} has model_type={cfg.get('model_type')!r}; expected 'switch_transformers' "
            "(for a dense T5 checkpoint, convert it and use `upcycle`)"
        )
    return cfg


def _sparse_blocks(names: list[str], stack: str) -> tuple[int, ...]:
    out = set()
    for n in names:
        parts = n.split(".")
        if parts[0] == stack and "router" in parts and parts[-2] == "classifier":
            out.add(int(parts[2]))
    return tuple(sorted(out))


def config_from_hf(
    hf: dict[str, Any], weight_names: list[str], dtype: str = "bfloat16", **overrides: Any
) -> SwitchConfig:
    """Our SwitchConfig for an HF SwitchTransformers config.json (and its weight names).

    Raises:
      UnsupportedFeatureError: router bias or an activation we do not implement.
      errors.UserError: weights whose sparse blocks differ from the blocks transformers makes sparse
        for this config.json (`hf_sparse_layers`).
    """
    if hf.get("router_bias"):
        raise UnsupportedFeatureError(
            "router_bias=True: the Switch router has no bias (arXiv 2101.03961); this model "
            "cannot be imported"
        )
    act = hf.get("dense_act_fn", "relu")
    if act not in _ACT_TO_OURS:
        raise UnsupportedFeatureError(
            f"dense_act_fn={act!r} is not supported; use one of {sorted(_ACT_TO_OURS)}"
        )
    n_enc = hf_num_layers(hf, "encoder")
    n_dec = hf_num_layers(hf, "decoder")
    sparse = {}
    for stack in ("encoder", "decoder"):
        rule = hf_sparse_layers(hf, stack)
        found = _sparse_blocks(weight_names, stack)
        if found != rule:
            _, why = hf_stack_sparse_step(hf, stack)
            raise errors.UserError(
                f"{stack}: the weights have routers in blocks {found} but config.json ({why}) "
                f"puts sparse layers at {rule}, as transformers builds the model; the config and "
                "the weights do not belong together"
            )
        sparse[stack] = found
    fields: dict[str, Any] = dict(
        vocab_size=pad_vocab_size(int(hf["vocab_size"])),
        d_model=int(hf["d_model"]),
        num_heads=int(hf["num_heads"]),
        head_dim=int(hf["d_kv"]),
        d_ff=int(hf["d_ff"]),
        num_encoder_layers=n_enc,
        num_decoder_layers=n_dec,
        mlp_activations=_ACT_TO_OURS[act],
        dropout_rate=float(hf.get("dropout_rate", 0.1)),
        logits_via_embedding=bool(hf.get("tie_word_embeddings", True)),
        relative_attention_num_buckets=int(hf.get("relative_attention_num_buckets", 32)),
        relative_attention_max_distance=int(hf.get("relative_attention_max_distance", 128)),
        layer_norm_epsilon=float(hf.get("layer_norm_epsilon", 1e-6)),
        dtype=dtype,
        param_dtype="float32",
        num_experts=int(hf["num_experts"]),
        encoder_sparse_layers=sparse["encoder"],
        decoder_sparse_layers=sparse["decoder"],
        router_type="switch",
        num_selected_experts=1,
        router_jitter_noise=float(hf.get("router_jitter_noise", 0.0)),
        load_balancing_loss_weight=float(hf.get("router_aux_loss_coef", 0.01)),
        router_z_loss_weight=float(hf.get("router_z_loss_coef", 0.0)),
        # transformers' routing rule (64 is SwitchTransformersConfig's default).
        expert_capacity=int(hf.get("expert_capacity", 64)),
    )
    fields.update(overrides)
    return SwitchConfig(**fields)


def _stack_names(config: SwitchConfig):
    """(stack, layers, our norm/attention names, HF sublayer index of the MLP)."""
    yield "encoder", config.num_encoder_layers, "encoder_norm", 1
    yield "decoder", config.num_decoder_layers, "decoder_norm", 2


def param_pairs(config: SwitchConfig) -> list[tuple[str, str, tuple[int, ...], bool]]:
    """(our name, HF name, our lead index, transpose) for every HF tensor of `config`.

    Vocabulary-sized tensors (embedding, untied logits) are not included (see `vocab_pairs`).
    """
    out = []
    qkvo = (("query", "q"), ("key", "k"), ("value", "v"), ("out", "o"))
    for stack, n, final_norm, m in _stack_names(config):
        sparse = set(config.sparse_layers(stack))
        out.append(
            (
                f"{stack}/relpos_bias/rel_embedding",
                f"{stack}.block.0.layer.0.SelfAttention.relative_attention_bias.weight",
                (),
                True,
            )
        )
        out.append((f"{stack}/{final_norm}/scale", f"{stack}.final_layer_norm.weight", (), False))
        for i in range(n):
            ours, hf = f"{stack}/layers_{i}", f"{stack}.block.{i}.layer"
            attn, norm = (
                ("attention", "pre_attention_layer_norm")
                if stack == "encoder"
                else ("self_attention", "pre_self_attention_layer_norm")
            )
            out.append((f"{ours}/{norm}/scale", f"{hf}.0.layer_norm.weight", (), False))
            for a, b in qkvo:
                out.append(
                    (f"{ours}/{attn}/{a}/kernel", f"{hf}.0.SelfAttention.{b}.weight", (), True)
                )
            if stack == "decoder":
                out.append(
                    (
                        f"{ours}/pre_cross_attention_layer_norm/scale",
                        f"{hf}.1.layer_norm.weight",
                        (),
                        False,
                    )
                )
                for a, b in qkvo:
                    out.append(
                        (
                            f"{ours}/encoder_decoder_attention/{a}/kernel",
                            f"{hf}.1.EncDecAttention.{b}.weight",
                            (),
                            True,
                        )
                    )
            out.append(
                (f"{ours}/pre_mlp_layer_norm/scale", f"{hf}.{m}.layer_norm.weight", (), False)
            )
            if i in sparse:
                out.append(
                    (
                        f"{ours}/mlp/router/w/kernel",
                        f"{hf}.{m}.mlp.router.classifier.weight",
                        (),
                        True,
                    )
                )
                for e in range(config.num_experts):
                    for w in ("wi", "wo"):
                        out.append(
                            (
                                f"{ours}/mlp/expert/{w}/kernel",
                                f"{hf}.{m}.mlp.experts.expert_{e}.{w}.weight",
                                (e,),
                                True,
                            )
                        )
            else:
                for w in ("wi", "wo"):
                    out.append((f"{ours}/mlp/{w}/kernel", f"{hf}.{m}.mlp.{w}.weight", (), True))
    return out


def _our_targets(config: SwitchConfig) -> dict[str, streaming.TargetSpec]:
    from switch_t5.interop import checkpoint_io

    flat, _ = checkpoint_io.abstract_params(config)
    return {k: streaming.TargetSpec(tuple(v.shape), np.dtype(v.dtype)) for k, v in flat.items()}


def check_shared_input_embeddings(source: streaming.Source, rows: int = 4096) -> None:
    """Raises UnsupportedFeatureError when encoder/decoder input embeddings differ from `shared`.

    transformers 5 unties `encoder.embed_tokens`/`decoder.embed_tokens` from `shared` when
    `tie_word_embeddings=False`; T5 and Switch share one input embedding (compared in row
    chunks, never whole).
    """
    names = set(source.names())
    if "shared.weight" not in names:
        return
    vocab = source.shape("shared.weight")[0]
    for other in ("encoder.embed_tokens.weight", "decoder.embed_tokens.weight"):
        if other not in names:
            continue
        for start in range(0, vocab, rows):
            box = (slice(start, min(start + rows, vocab)),)
            if not np.array_equal(source.read("shared.weight", box), source.read(other, box)):
                raise UnsupportedFeatureError(
                    f"{other} differs from shared.weight: separate encoder/decoder input "
                    "embeddings cannot be represented (T5 and Switch share one input embedding)"
                )


def import_plan(config: SwitchConfig, source: streaming.Source, hf_vocab: int) -> streaming.Plan:
    """The plan HF tensors -> our params (float32 by default), in the layout of `config`
    (scanned layers too: `checkpoint_io.scanned_plan`)."""
    from switch_t5.interop import checkpoint_io

    plan = _import_plan(checkpoint_io.unscanned(config), source, hf_vocab)
    return checkpoint_io.scanned_plan(plan, dst_config=config)


def _import_plan(config: SwitchConfig, source: streaming.Source, hf_vocab: int) -> streaming.Plan:
    check_shared_input_embeddings(source)
    targets = _our_targets(config)
    pieces: list[streaming.Piece] = []
    for ours, hf, lead, transpose in param_pairs(config):
        pieces.append(streaming.Copy(hf, ours, dst_lead=lead, transpose=transpose))
    names = set(source.names())
    emb = "shared.weight" if "shared.weight" in names else "encoder.embed_tokens.weight"
    vp, d = config.vocab_size, config.d_model
    pieces.append(streaming.Copy(emb, "token_embedder/embedding", extent=(hf_vocab, d)))
    if vp > hf_vocab:
        # Padding rows: zero embeddings (never looked up; logits of 0 for the tied projection).
        pieces.append(
            streaming.Zeros("token_embedder/embedding", (slice(hf_vocab, vp), slice(0, d)))
        )
    if not config.logits_via_embedding:
        pieces.append(
            streaming.Copy(
                "lm_head.weight",
                "decoder/logits_dense/kernel",
                transpose=True,
                extent=(hf_vocab, d),
            )
        )
        if vp > hf_vocab:
            pieces.append(
                streaming.Zeros("decoder/logits_dense/kernel", (slice(0, d), slice(hf_vocab, vp)))
            )
    return streaming.Plan(targets, pieces)


def hf_layout(num_layers: int, sparse: tuple[int, ...], stack: str) -> tuple[int, int]:
    """(num_sparse_layers, sparse_step) that make transformers build exactly `sparse`.

    The step is what transformers uses (it is written explicitly); the count is chosen so that
    `num_layers // count` gives the same step where one exists (else the number of sparse
    layers), for readers that recompute the step from the count.

    Raises:
      UnsupportedFeatureError: no step gives `sparse` (HF makes block i sparse when
        i % sparse_step == 1).
    """
    sparse = tuple(sorted(sparse))
    steps = [s for s in (*range(1, num_layers + 2), 0) if sparse_layers_hf(num_layers, s) == sparse]
    for step in steps:
        counts = [k for k in range(num_layers + 1) if hf_sparse_step(num_layers, k) == step]
        if counts:
            return counts[-1], step
    if steps:
        return len(sparse), steps[0]
    raise UnsupportedFeatureError(
        f"the {stack} sparse layer layout {sparse} cannot be expressed in HF SwitchTransformers, "
        "which makes block i sparse when i % sparse_step == 1 (every block when the step is 1, "
        "none when it is 0)"
    )


def _refuse_unexportable_experts(config: SwitchConfig) -> None:
    """Raises UnsupportedFeatureError for experts HF's SwitchTransformers cannot hold."""
    if config.gated:
        raise UnsupportedFeatureError(
            f"gated feed-forward layers (mlp_activations={config.mlp_activations}, as in "
            "Switch-XXL's gated GELU) cannot be exported: HF SwitchTransformers experts have a "
            "single wi"
        )
    if config.num_shared_experts:
        raise UnsupportedFeatureError(
            f"num_shared_experts={config.num_shared_experts} cannot be exported: HF "
            "SwitchTransformers sparse layers have routed experts only (no shared experts)"
        )
    if config.expert_width != config.d_ff:
        raise UnsupportedFeatureError(
            f"expert_d_ff={config.expert_d_ff} (d_ff={config.d_ff}) cannot be exported: HF "
            "SwitchTransformers experts have the dense layers' width d_ff"
        )


def _refuse_unexportable_routing(config: SwitchConfig) -> None:
    """Raises UnsupportedFeatureError for routing HF's SwitchTransformers cannot do."""
    if config.decoder_router_type not in (None, "switch"):
        raise UnsupportedFeatureError(
            f"decoder_router_type={config.decoder_router_type!r} cannot be exported: HF "
            "SwitchTransformers routes every token to its top-1 expert"
        )
    if config.router_type != "switch" or config.num_selected_experts != 1:
        what = (
            f"top-{config.num_selected_experts} routing"
            if config.router_type != "experts_choose"
            else "expert-choice routing"
        )
        raise UnsupportedFeatureError(
            f"{what} (router_type={config.router_type!r}) cannot be exported: HF "
            "SwitchTransformers routes every token to its top-1 expert"
        )
    routing = []
    if config.router_bias_update_rate > 0:
        routing.append(
            f"auxiliary-loss-free balancing (router_bias_update_rate="
            f"{config.router_bias_update_rate}: per-expert router choice biases)"
        )
    if config.router_score != "softmax":
        routing.append(f"router_score={config.router_score!r}")
    if routing:
        raise UnsupportedFeatureError(
            f"{' and '.join(routing)} cannot be exported: HF SwitchTransformers routes by the "
            "softmax of its router logits alone"
        )


def hf_config_from_ours(
    config: SwitchConfig, *, vocab_size: int | None = None, expert_capacity: int = 64
) -> dict[str, Any]:
    """The HF config.json of `config`.

    Raises:
      UnsupportedFeatureError: naming what HF's SwitchTransformers cannot represent: gated
        experts (switch_xxl's gated GELU), shared experts, experts narrower or wider than d_ff,
        top-k routing, router choice biases or sigmoid scores, or sparse layouts other than
        HF's `i % sparse_step == 1`.
    """
    _refuse_unexportable_experts(config)
    _refuse_unexportable_routing(config)
    act = {("relu",): "relu", ("gelu",): "gelu_new"}.get(tuple(config.mlp_activations))
    if act is None:
        raise UnsupportedFeatureError(
            f"mlp_activations={config.mlp_activations} has no HF SwitchTransformers equivalent"
        )
    if config.num_experts == 0 or not (
        config.sparse_layers("encoder") or config.sparse_layers("decoder")
    ):
        raise UnsupportedFeatureError(
            "a model without sparse layers cannot be exported as HF SwitchTransformers"
        )
    layout = {}
    for stack in ("encoder", "decoder"):
        layout[stack] = hf_layout(config.num_layers(stack), config.sparse_layers(stack), stack)
    vocab = int(vocab_size or config.vocab_size)
    return {
        "architectures": ["SwitchTransformersForConditionalGeneration"],
        "model_type": "switch_transformers",
        "vocab_size": vocab,
        "d_model": config.d_model,
        "d_kv": config.head_dim,
        "d_ff": config.d_ff,
        "num_layers": config.num_encoder_layers,
        "num_decoder_layers": config.num_decoder_layers,
        "num_heads": config.num_heads,
        "num_experts": config.num_experts,
        "num_sparse_encoder_layers": layout["encoder"][0],
        "num_sparse_decoder_layers": layout["decoder"][0],
        "encoder_sparse_step": layout["encoder"][1],
        "decoder_sparse_step": layout["decoder"][1],
        "expert_capacity": int(expert_capacity),
        "router_bias": False,
        "router_jitter_noise": config.router_jitter_noise,
        "router_dtype": "float32",
        "router_ignore_padding_tokens": False,
        "router_z_loss_coef": config.router_z_loss_weight,
        "router_aux_loss_coef": config.load_balancing_loss_weight,
        "relative_attention_num_buckets": config.relative_attention_num_buckets,
        "relative_attention_max_distance": config.relative_attention_max_distance,
        "dropout_rate": config.dropout_rate,
        "layer_norm_epsilon": config.layer_norm_epsilon,
        "dense_act_fn": act,
        "tie_word_embeddings": config.logits_via_embedding,
        "is_encoder_decoder": True,
        "pad_token_id": 0,
        "eos_token_id": 1,
        "decoder_start_token_id": 0,
        "dtype": "float32",
    }


def export_plan(config: SwitchConfig, hf_vocab: int, dtype: str = "float32") -> streaming.Plan:
    """The plan our params (in the layout of `config`, scanned layers too) -> HF tensors."""
    from switch_t5.interop import checkpoint_io

    plan = _export_plan(checkpoint_io.unscanned(config), hf_vocab, dtype)
    return checkpoint_io.scanned_plan(plan, src_config=config)


def _export_plan(config: SwitchConfig, hf_vocab: int, dtype: str) -> streaming.Plan:
    ours_targets = _our_targets(config)
    np_dtype = np.dtype(dtype) if dtype != "bfloat16" else np.dtype(streaming.ml_dtypes.bfloat16)
    targets: dict[str, streaming.TargetSpec] = {}
    pieces: list[streaming.Piece] = []
    for ours, hf, lead, transpose in param_pairs(config):
        shape = ours_targets[ours].shape[len(lead) :]
        shape = tuple(shape[::-1]) if transpose else tuple(shape)
        targets[hf] = streaming.TargetSpec(shape, np_dtype)
        pieces.append(streaming.Copy(ours, hf, src_lead=lead, transpose=transpose))
    d = config.d_model
    if hf_vocab > config.vocab_size:
        raise ValueError(
            f"HF vocab_size={hf_vocab} exceeds the embedding's {config.vocab_size} rows"
        )
    targets["shared.weight"] = streaming.TargetSpec((hf_vocab, d), np_dtype)
    pieces.append(streaming.Copy("token_embedder/embedding", "shared.weight", extent=(hf_vocab, d)))
    if not config.logits_via_embedding:
        targets["lm_head.weight"] = streaming.TargetSpec((hf_vocab, d), np_dtype)
        pieces.append(
            streaming.Copy(
                "decoder/logits_dense/kernel",
                "lm_head.weight",
                transpose=True,
                extent=(d, hf_vocab),
            )
        )
    return streaming.Plan(targets, pieces)


def open_hf(path: str) -> tuple[dict[str, Any], streaming.Source]:
    """(config.json, weights source) of an HF model directory (safetensors or a torch .bin)."""
    cfg = read_hf_config(path)
    has_st = os.path.exists(os.path.join(path, "model.safetensors")) or os.path.exists(
        os.path.join(path, "model.safetensors.index.json")
    )
    if has_st:
        return cfg, streaming.SafetensorsSource(path)
    bin_file = os.path.join(path, "pytorch_model.bin")
    if os.path.exists(bin_file):
        import torch

        # Memory-mapped: tensors are read when sliced (not streamed under the budget).
        state = torch.load(bin_file, map_location="cpu", mmap=True, weights_only=True)
        return cfg, streaming.MemorySource(
            {
                k: v.float().numpy() if v.dtype == torch.bfloat16 else v.numpy()
                for k, v in state.items()
            }
        )
    raise FileNotFoundError(
        f"no model.safetensors, model.safetensors.index.json or pytorch_model.bin in {path}"
    )


def load_hf(path: str, dtype: str = "bfloat16", **overrides: Any):
    """Loads an HF SwitchTransformers model directory into this project's model.

    Args:
      path: a directory with config.json and safetensors (single or sharded) weights.
      dtype: compute dtype of the returned model ("float32" for parity checks); params are
        float32 either way.
      **overrides: SwitchConfig fields to change; by default the model routes as transformers
        does (`expert_capacity` from config.json), `expert_capacity=None` gives this project's
        capacity-factor routing (with e.g. `eval_capacity_factor`).

    Returns:
      (model, params): `switch_t5.network.EncoderDecoder` and its params (nested dict of
      float32 jax arrays); `model.apply({"params": params}, encoder_input_tokens,
      decoder_input_tokens, decoder_target_tokens, enable_dropout=False)` gives logits
      [batch, target_length, vocab padded to 128] whose first `vocab_size` columns are HF's.
    """
    import jax.numpy as jnp

    from switch_t5 import network
    from switch_t5.interop import checkpoint_io

    hf, source = open_hf(path)
    config = config_from_hf(hf, source.names(), dtype=dtype, **overrides)
    sink = streaming.MemorySink()
    streaming.run_plan(import_plan(config, source, int(hf["vocab_size"])), source, sink)
    params = checkpoint_io._unflatten({k: jnp.asarray(v) for k, v in sink.arrays.items()})
    return network.EncoderDecoder(config), params


def hf_to_orbax(
    src: str,
    dst: str,
    *,
    budget_bytes: int = streaming.DEFAULT_BUDGET_BYTES,
    dtype: str = "bfloat16",
    overwrite: bool = False,
    **overrides: Any,
) -> streaming.RunStats:
    """Converts an HF SwitchTransformers directory into a project checkpoint + model gin.

    The directory's `spiece.model` becomes the run's vocabulary (copied to `dst/spiece.model`
    and recorded in the checkpoint), so infer and eval of the run use it
    (`hf_tokenizer.hf_vocabulary` says when it cannot). `dst` must be new or empty unless
    `overwrite` (`destination.prepare`).
    """
    from switch_t5.interop import checkpoint_io, hf_tokenizer

    hf, source = open_hf(src)
    config = config_from_hf(hf, source.names(), dtype=dtype, **overrides)
    plan = import_plan(config, source, int(hf["vocab_size"]))
    vocabulary_file, note = hf_tokenizer.hf_vocabulary(src, int(hf["vocab_size"]))
    stats = checkpoint_io.write_checkpoint(
        dst,
        config,
        plan,
        source,
        budget_bytes=budget_bytes,
        vocabulary_file=vocabulary_file,
        overwrite=overwrite,
        converted_from={
            "format": "huggingface",
            "path": os.path.abspath(src),
            "hf_vocab_size": int(hf["vocab_size"]),
            "hf_expert_capacity": hf.get("expert_capacity"),
        },
    )
    if note:
        stats.notes.append(note)
    return stats


def orbax_to_hf(
    src: str,
    dst: str,
    *,
    step: int | None = None,
    budget_bytes: int = streaming.DEFAULT_BUDGET_BYTES,
    vocab_size: int | None = None,
    expert_capacity: int | None = None,
    dtype: str = "float32",
    max_shard_bytes: int | None = None,
    overwrite: bool = False,
    tokenizer: bool = True,
    vocabulary_path: str | None = None,
) -> streaming.RunStats:
    """Writes config.json + safetensors that `SwitchTransformersForConditionalGeneration`
    loads, and the tokenizer `AutoTokenizer` loads, from a project checkpoint.

    Args:
      src: MODEL_DIR, its checkpoints/ directory or one step directory.
      dst: the HF model directory to write: new or empty unless `overwrite`.
      step: the checkpoint step (None = latest).
      budget_bytes: memory budget of the streamed copy.
      vocab_size: HF vocab_size; default the original HF size recorded at import, else all
        embedding rows.
      expert_capacity: HF's fixed per-sequence expert capacity (HF drops tokens beyond it);
        default the one the model routes with (`SwitchConfig.expert_capacity`, recorded by an
        HF import), else transformers' default 64.
      dtype: dtype of the written weights.
      max_shard_bytes: split the safetensors into shards with an index file above this size.
      overwrite: remove old weights, index, config and tokenizer files from `dst` first.
      tokenizer: write spiece.model, tokenizer_config.json and tokenizer.json
        (`hf_tokenizer`) from the checkpoint's vocabulary; False exports the weights alone.
      vocabulary_path: the SentencePiece model to export (default: the one the checkpoint
        records; when both are known their hashes must agree).

    Raises:
      errors.UserError: a non-empty `dst` without `overwrite`; no vocabulary known (or it cannot be
        read) while `tokenizer` is set; a tokenizer transformers would load differently.
    """
    import tempfile

    from switch_t5.interop import checkpoint_io, destination, hf_tokenizer

    destination.check_path(dst, src)
    ckpt = checkpoint_io.open_checkpoint(src, step)
    config = ckpt.config
    hf_vocab = int(
        vocab_size or ckpt.meta.get("converted_from", {}).get("hf_vocab_size") or config.vocab_size
    )
    if expert_capacity is None:
        expert_capacity = config.expert_capacity if config.expert_capacity is not None else 64
    hf_cfg = hf_config_from_ours(config, vocab_size=hf_vocab, expert_capacity=expert_capacity)
    hf_cfg["dtype"] = dtype
    plan = export_plan(config, hf_vocab, dtype)
    checkpoint_io.check_sources(plan, ckpt.params, f"{src} (step {ckpt.step})")
    with tempfile.TemporaryDirectory(prefix="switch_t5_tokenizer_") as tok_dir:
        # The tokenizer is built and checked before the destination is touched.
        if tokenizer:
            model_bytes, extra_ids, vocab_name = hf_tokenizer.resolve_vocabulary(
                ckpt.meta.get("vocabulary"), vocabulary_path, f"{src} (step {ckpt.step})"
            )
            hf_tokenizer.write_tokenizer(model_bytes, extra_ids, tok_dir, hf_vocab, vocab_name)
        removed = destination.prepare(dst, "hf", overwrite=overwrite, src=src)
        stats = streaming.run_plan(
            plan, ckpt.params, streaming.SafetensorsSink(dst, max_shard_bytes), budget_bytes
        )
        with open(os.path.join(dst, "config.json"), "w") as f:
            json.dump(hf_cfg, f, indent=2, sort_keys=True)
        if removed:
            stats.notes.append(f"removed from {dst} (--overwrite): {', '.join(removed)}")
        if tokenizer:
            names = hf_tokenizer.copy_files(tok_dir, dst)
            stats.notes.append(f"tokenizer: {', '.join(names)} from {vocab_name}")
        else:
            stats.notes.append("no tokenizer written (--no_tokenizer)")
    return stats
