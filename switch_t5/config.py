"""The one frozen configuration dataclass of the network.

Layers read only the fields they need; there are no model-name branches anywhere. Entry points
make this class gin-configurable (see `switch_t5.gin_utils`); the defaults below are the ONE place
where defaults live (a Switch-Base-8-like model).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, Literal

from switch_t5.errors import UserError

DispatchImpl = Literal["auto", "einsum", "scatter", "dropless", "ragged"]
RouterType = Literal["switch", "topk", "experts_choose"]
# How the tokens of a MoE layer call are split into routing groups (capacity is per group):
#   "tokens": consecutive groups of `group_size` tokens over the flattened batch (training and
#     teacher-forced evaluation: the paper's setting, arXiv 2101.03961 sec. 2.2);
#   "sequence": every sequence (batch row) is its own group, so which of its tokens are dropped
#     depends on nothing else in the batch (what inference uses, see `SwitchConfig.for_inference`).
RoutingGroups = Literal["tokens", "sequence"]
ROUTING_GROUPS = ("tokens", "sequence")
# Rematerialisation (activation checkpointing) of each layer, or each scanned block:
#   "none": keep every activation for the backward pass (fastest, most memory);
#   "full": keep only the layer inputs and recompute everything else (least memory);
#   "dots": keep matmul outputs, recompute element-wise ops (`checkpoint_dots`);
#   "dots_no_batch": keep matmul outputs without batch dims, i.e. those of the weights only
#     (`dots_with_no_batch_dims_saveable`, MaxText's "minimal").
RematPolicy = Literal["none", "full", "dots", "dots_no_batch"]
REMAT_POLICIES = ("none", "full", "dots", "dots_no_batch")


class InvalidConfigError(UserError):
    """A SwitchConfig field (or a combination of fields) is invalid; lists every problem."""


def pad_vocab_size(vocab_size: int, multiple: int = 128) -> int:
    """Embedding rows: the vocabulary size padded up to a multiple of 128 (T5's 32100 -> 32128)."""
    return -(-vocab_size // multiple) * multiple


def sparse_layers_every(num_layers: int, interval: int) -> tuple[int, ...]:
    """Switch/Flaxformer layout: layer i is sparse when i % interval == interval - 1.

    interval 2 -> (1, 3, 5, ...); interval 1 -> every layer; interval 0 -> none.
    """
    if interval <= 0:
        return ()
    return tuple(i for i in range(num_layers) if i % interval == interval - 1)


def sparse_layers_hf(num_layers: int, sparse_step: int) -> tuple[int, ...]:
    """Hugging Face SwitchTransformers layout: layer i is sparse when i % sparse_step == 1.

    (sparse_step 1 means every layer in HF's code.)
    """
    if sparse_step <= 0:
        return ()
    if sparse_step == 1:
        return tuple(range(num_layers))
    return tuple(i for i in range(num_layers) if i % sparse_step == 1)


# What inference changes in a model's config (`SwitchConfig.for_inference`); a
# `switch_t5.SwitchConfig.*` gin binding given to infer/eval still overrides it.
INFERENCE_FIELDS = {"routing_groups": "sequence"}


@dataclasses.dataclass(frozen=True)
class SwitchConfig:
    """Architecture and routing hyperparameters of a (Switch) T5 encoder-decoder.

    Attributes:
      vocab_size: rows of the token embedding; already padded to a multiple of 128.
      d_model: embedding width.
      num_heads: attention heads.
      head_dim: width of one head (query/key/value).
      d_ff: hidden width of the feed-forward layers (dense, and each expert unless
        expert_d_ff is set).
      num_encoder_layers: encoder blocks.
      num_decoder_layers: decoder blocks.
      mlp_activations: ("relu",) for Switch "classic"; ("gelu", "linear") for gated GELU (T5.1.1,
        Switch-XXL).
      dropout_rate: dropout everywhere except inside experts.
      expert_dropout_rate: dropout on the experts' hidden activations; None = dropout_rate.
      logits_via_embedding: tie the output projection to the embedding (decoder output scaled by
        d_model**-0.5 first, as Mesh-TF/HF) or use a separate projection.
      relative_attention_num_buckets: T5 relative-position buckets.
      relative_attention_max_distance: T5 relative-position max distance.
      layer_norm_epsilon: RMS layer norm epsilon.
      dtype: compute dtype ("bfloat16" or "float32").
      param_dtype: parameter dtype.
      init_scale: scale of the (truncated-normal, fan-in) kernel inits; Switch uses 0.1 (arXiv
        2101.03961 Table 3), T5 uses 1.0.
      num_experts: experts per sparse layer; 0 makes the model dense.
      moe_layer_interval: derives the sparse layers when the explicit sets below are None:
        sparse where layer % interval == interval - 1.
      encoder_sparse_layers: explicit sparse encoder layer indices (None = derived).
      decoder_sparse_layers: explicit sparse decoder layer indices (None = derived).
      router_type: "switch" (top-1), "topk", "experts_choose" (expert-choice routing, arXiv
        2202.09368: each expert takes its top-capacity tokens of a group; encoder layers and
        capacity dispatches only) or a router added with `switch_t5.routing.register_router`.
      decoder_router_type: the router of the decoder's sparse layers; None = router_type. E.g.
        router_type="experts_choose" (not causal) with decoder_router_type="switch": expert
        choice in the encoder, top-1 token choice in the decoder.
      num_selected_experts: k for the top-k router (1 for switch).
      batch_prioritized_routing: encoder layers give capacity to confident tokens first.
      train_capacity_factor: expert capacity factor during training.
      eval_capacity_factor: expert capacity factor in evaluation and decoding.
      min_expert_capacity: floor of the expert capacity.
      group_size: tokens per routing group (routing never depends on the mesh) when
        routing_groups is "tokens": of the encoder's sparse layers, and of the decoder's unless
        decoder_group_size is set. None (the default): chosen once by the run that trains
        (or plans) the model from its global batch and feature lengths
        (`moe.resolve_group_sizes`, for each stack), recorded with its checkpoints and reused
        from then on (resume, eval, fine-tuning, any mesh); a model applied before that groups
        by max_group_size.
      decoder_group_size: tokens per routing group of the decoder's sparse layers; None =
        group_size (set when group_size is resolved: the decoder's tokens are fewer).
      max_group_size: the largest group the automatic choice (group_size=None) picks.
      routing_groups: "tokens" (groups of `group_size` tokens, capacity from the group's token
        count) or "sequence" (each sequence one group; its capacity comes from the
        capacity factor and the sequence's own real tokens, so padding length and batch-mates
        change nothing; a decoding step's group is its one token, which is never dropped).
        Inference (infer, decode-based eval, training samples) sets "sequence"
        (`for_inference`).
      expert_capacity: transformers' routing rule (`SwitchTransformersTop1Router`), recorded
        by the Hugging Face import: every sequence is one routing group whatever
        routing_groups says, each expert takes exactly this many of its tokens (no capacity
        factor, no minimum; a decoding step's single token is never dropped), and padding takes
        slots in sequence order like real tokens (right padding comes after the real tokens,
        so it takes nothing from them). None = this project's capacity-factor routing
        (train/eval_capacity_factor, min_expert_capacity, padding takes no slot).
      router_jitter_noise: multiplicative uniform(1-eps, 1+eps) noise on the router input.
      router_init_stddev: router kernel init normal(0, stddev).
      load_balancing_loss_weight: alpha of the load-balancing loss.
      router_z_loss_weight: beta of the router z-loss (ST-MoE).
      router_bias_update_rate: u of auxiliary-loss-free load balancing (after DeepSeek-V3, arXiv
        2412.19437 sec. 2.1.2); 0 = off. A per-expert, per-layer bias (the "router_bias"
        variable collection, not a param) is added to the router scores for the choice of
        experts only, never to the gates: to the logits under softmax scoring (DeepSeek-V3 adds
        it to sigmoid affinities, as router_score="sigmoid" does). After each train step it
        moves by u * sign(mean load - load), the load being each expert's pre-capacity token
        count over the global batch. Token-choice routers ("switch", "topk") only.
      router_score: "softmax" (Switch) or "sigmoid" (DeepSeek-V3 affinities: each expert's
        score is sigmoid(logit); the losses use the scores normalised to sum 1). Token-choice
        routers only.
      router_renormalize_gates: divide the gates of a token's k chosen experts by their sum
        (DeepSeek-V3, Mixtral); needs num_selected_experts > 1 (a single gate would be 1 and the
        router would get no gradient from the task).
      sequence_balance_loss_weight: alpha of DeepSeek-V3's sequence-wise balance loss (eq. 17-20:
        E / (k T) sum_i count_i P_i per batch row, averaged over rows; 1 = uniform); 0 = off.
      dispatch: "einsum" (masked one-hot), "scatter" (index based), "dropless" (no drops:
        block-sparse grouped matmul, `switch_t5.grouped_matmul`), "ragged" (no drops through
        `jax.lax.ragged_dot`, for backends that implement it well), "auto" (picked per
        platform, `moe.resolve_dispatch`) or one added with `moe.register_dispatch`.
      dropless_block_size: rows per block of the "dropless" grouped matmul; each expert's rows
        are padded to a multiple of it (at most num_experts x (block - 1) padding rows).
      moe_dtype: compute dtype of the MoE layer's dispatch, experts and combine, hence of its
        all-to-alls; None = `dtype`. "bfloat16" with float32 activations is T5X's truncated MoE
        dtype (halves the all-to-all bytes); the router stays float32 either way.
      num_shared_experts: DeepSeekMoE's shared experts (arXiv 2401.06066 sec. 3.2): each sparse
        layer adds S experts of width `expert_d_ff` that every token passes through (no router,
        no capacity), summed with the routed experts' output. They run as one dense MLP of width
        S x expert_d_ff (the sum of S MLPs is that MLP), params `mlp/shared_experts/wi/kernel`
        [embed, S x expert_d_ff] (`wi_0`, `wi_1` when gated) and `mlp/shared_experts/wo/kernel`,
        dense (non-expert) weights with dropout_rate as the dense MLP. 0 = none.
      expert_d_ff: hidden width of each routed and shared expert; None = d_ff. Fine-grained
        experts (arXiv 2401.06066 sec. 3.1) are narrower (e.g. d_ff / 4) with more experts and
        k > 1, so that k x expert_d_ff keeps the active width.
      capacity_scales_with_k: expert capacity = cf x k x tokens / experts (k =
        num_selected_experts), as fine-grained top-k routing needs; False = cf x tokens /
        experts whatever k (Flaxformer's convention, which at k=4, cf 1.25 and 32 experts drops
        about 70% of the choices).
      sparse_extra_mlp: ST-MoE (arXiv 2202.08906 sec. 3.1, Flaxformer `extra_mlp`): each sparse
        layer adds a dense MLP after the MoE, with its own pre-norm and residual (params
        `pre_extra_mlp_layer_norm`, `extra_mlp`).
      scan_layers: run each stack as `nn.scan` over repeated blocks (one period of the
        dense/sparse pattern, e.g. a dense/sparse pair) with params stacked on a leading
        "layers" axis; compiles one block instead of every layer. Checkpoints convert with
        `switch_t5.scan_utils`.
      remat_policy: activation rematerialisation per layer (per block when scanned); see
        `REMAT_POLICIES`.
    """

    vocab_size: int = 32128
    d_model: int = 768
    num_heads: int = 12
    head_dim: int = 64
    d_ff: int = 3072
    num_encoder_layers: int = 12
    num_decoder_layers: int = 12
    mlp_activations: tuple[str, ...] = ("relu",)
    dropout_rate: float = 0.1
    expert_dropout_rate: float | None = None
    logits_via_embedding: bool = True
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    layer_norm_epsilon: float = 1e-6
    dtype: str = "bfloat16"
    param_dtype: str = "float32"
    init_scale: float = 0.1
    # Mixture of experts.
    num_experts: int = 8
    moe_layer_interval: int = 2
    encoder_sparse_layers: tuple[int, ...] | None = None
    decoder_sparse_layers: tuple[int, ...] | None = None
    router_type: RouterType = "switch"
    decoder_router_type: RouterType | None = None
    num_selected_experts: int = 1
    batch_prioritized_routing: bool = False
    train_capacity_factor: float = 1.25
    eval_capacity_factor: float = 2.0
    min_expert_capacity: int = 4
    group_size: int | None = None
    decoder_group_size: int | None = None
    max_group_size: int = 8192
    routing_groups: RoutingGroups = "tokens"
    expert_capacity: int | None = None
    router_jitter_noise: float = 1e-2
    router_init_stddev: float = 2e-2
    load_balancing_loss_weight: float = 1e-2
    router_z_loss_weight: float = 0.0
    router_bias_update_rate: float = 0.0
    router_score: str = "softmax"
    router_renormalize_gates: bool = False
    sequence_balance_loss_weight: float = 0.0
    dispatch: DispatchImpl = "auto"
    dropless_block_size: int = 32
    moe_dtype: str | None = None
    sparse_extra_mlp: bool = False
    # Shared and fine-grained experts (DeepSeekMoE, arXiv 2401.06066).
    num_shared_experts: int = 0
    expert_d_ff: int | None = None
    capacity_scales_with_k: bool = False
    # Memory and compilation at scale.
    scan_layers: bool = False
    remat_policy: RematPolicy = "none"
    # FSDP: shard the non-expert weights (and so their gradients and optimizer state) over the
    # batch axes too (`partitioning.WEIGHT_EMBED`). None = automatic (`partitioning.fsdp_enabled`).
    fsdp: bool | None = None

    def __post_init__(self):
        problems = []
        for name in ("d_model", "num_heads", "head_dim", "d_ff", "vocab_size"):
            if getattr(self, name) <= 0:
                problems.append(f"{name}={getattr(self, name)} must be positive")
        if self.num_experts < 0:
            problems.append(f"num_experts={self.num_experts} must be >= 0 (0 = dense)")
        if self.num_experts:
            for name in ("train_capacity_factor", "eval_capacity_factor"):
                if getattr(self, name) <= 0:
                    problems.append(
                        f"{name}={getattr(self, name)} must be > 0 (Switch uses 1.0-2.0)"
                    )
            if not 1 <= self.num_selected_experts <= self.num_experts:
                problems.append(
                    f"num_selected_experts={self.num_selected_experts} must be in "
                    f"[1, num_experts={self.num_experts}]"
                )
            for name in ("router_type", "decoder_router_type"):
                if getattr(self, name) == "switch" and self.num_selected_experts != 1:
                    problems.append(f"{name}='switch' routes to exactly 1 expert; use 'topk'")
            problems.extend(self._group_size_problems())
            if self.routing_groups not in ROUTING_GROUPS:
                problems.append(
                    f"routing_groups={self.routing_groups!r}: use 'tokens' or 'sequence'"
                )
            if self.expert_capacity is not None and (
                isinstance(self.expert_capacity, bool)
                or not isinstance(self.expert_capacity, int)
                or self.expert_capacity < 1
            ):
                problems.append(
                    f"expert_capacity={self.expert_capacity!r} must be a positive integer "
                    "(transformers' per-sequence capacity) or None (capacity factors)"
                )
        problems.extend(self._expert_width_problems())
        if self.mlp_activations not in (
            ("relu",),
            ("gelu", "linear"),
            ("gelu",),
            ("silu", "linear"),
        ):
            problems.append(
                f"mlp_activations={self.mlp_activations}: use ('relu',) or ('gelu', 'linear')"
            )
        # Routers and dispatches are registries (`routing.register_router`,
        # `moe.register_dispatch`): any registered name passes.
        from switch_t5 import moe, routing

        problems.extend(moe.config_problems(self))
        if self.num_experts and "experts_choose" in (self.router_type, self.decoder_router_type):
            problems.extend(self._expert_choice_problems(moe))
        problems.extend(routing.balancing_problems(self))
        if self.dropless_block_size <= 0:
            problems.append(f"dropless_block_size={self.dropless_block_size} must be positive")
        if self.remat_policy not in REMAT_POLICIES:
            problems.append(
                f"remat_policy={self.remat_policy!r}: use one of {', '.join(REMAT_POLICIES)}"
            )
        for name in ("dtype", "param_dtype", "moe_dtype"):
            value = getattr(self, name)
            if value is not None and value not in ("float32", "bfloat16", "float16"):
                problems.append(f"{name}={value!r}: use 'float32' or 'bfloat16'")
        for stack, layers, n in (
            ("encoder", self.encoder_sparse_layers, self.num_encoder_layers),
            ("decoder", self.decoder_sparse_layers, self.num_decoder_layers),
        ):
            if layers is not None and any(not 0 <= i < n for i in layers):
                problems.append(f"{stack}_sparse_layers={layers} has indices outside [0, {n})")
        if self.num_experts > 0 and not (
            self.sparse_layers("encoder") or self.sparse_layers("decoder")
        ):
            problems.append(self._no_sparse_layer_problem())
        if problems:
            raise InvalidConfigError("Invalid SwitchConfig: " + "; ".join(problems))

    def _group_size_problems(self) -> list[str]:
        problems = []
        for name in ("group_size", "decoder_group_size", "max_group_size"):
            value = getattr(self, name)
            if value is None and name != "max_group_size":
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                unset = "" if name == "max_group_size" else " or None (chosen by the run)"
                problems.append(f"{name}={value!r} must be a positive integer{unset}")
        return problems

    def _expert_choice_problems(self, moe) -> list[str]:
        """Where expert-choice routing cannot run: an expert compares all tokens of a group,
        later positions included (not causal), and it needs a capacity per expert."""
        problems = []
        decoder = self.sparse_layers("decoder")
        if decoder and (self.decoder_router_type or self.router_type) == "experts_choose":
            name = "decoder_router_type" if self.decoder_router_type else "router_type"
            problems.append(
                f"{name}='experts_choose' is not causal (each expert picks among all tokens "
                f"of a group, later ones included) but decoder layers {decoder} are sparse: set "
                f"decoder_router_type='switch' (expert choice in the encoder only), or "
                f"decoder_sparse_layers=() to keep the decoder dense"
            )
        if (
            self.dispatch in moe.dispatch_names()
            and not moe.get_dispatch(self.dispatch).drops_tokens
        ):
            problems.append(
                f"router_type='experts_choose' gives each expert a capacity of cf x tokens / "
                f"experts, which dispatch={self.dispatch!r} does not have: use dispatch='auto', "
                f"'scatter' or 'einsum'"
            )
        return problems

    def _expert_width_problems(self) -> list[str]:
        """Shared experts and the expert width (arXiv 2401.06066)."""
        problems = []
        shared = self.num_shared_experts
        if isinstance(shared, bool) or not isinstance(shared, int) or shared < 0:
            problems.append(f"num_shared_experts={shared!r} must be an integer >= 0 (0 = none)")
        elif shared and not self.num_experts:
            problems.append(
                f"num_shared_experts={shared} needs sparse layers (shared experts are part of "
                "each MoE layer): set num_experts > 0 or num_shared_experts=0"
            )
        width = self.expert_d_ff
        if width is not None and (
            isinstance(width, bool) or not isinstance(width, int) or width < 1
        ):
            problems.append(f"expert_d_ff={width!r} must be a positive integer or None (= d_ff)")
        return problems

    @property
    def expert_width(self) -> int:
        """Hidden width of each routed and shared expert (`expert_d_ff`, default d_ff)."""
        return self.d_ff if self.expert_d_ff is None else self.expert_d_ff

    @property
    def shared_expert_width(self) -> int:
        """Hidden width of a sparse layer's shared-experts MLP (0 = no shared experts)."""
        return self.num_shared_experts * self.expert_width

    def _no_sparse_layer_problem(self) -> str:
        """The text for `num_experts > 0` with no sparse layer in either stack: such a model
        trains as a dense one while its logs report experts and drops/losses of exactly 0."""
        how, fixes = [], ["set num_experts=0 for a dense model"]
        derived = []
        for stack, layers in (
            ("encoder", self.encoder_sparse_layers),
            ("decoder", self.decoder_sparse_layers),
        ):
            if layers is None:
                derived.append(stack)
            else:
                how.append(f"{stack}_sparse_layers={tuple(layers)!r}")
        if derived:
            k = self.moe_layer_interval
            rule = f"layer i sparse when i % {k} == {k - 1}" if k > 0 else "no layer sparse"
            how.insert(0, f"moe_layer_interval={k} ({rule}) for the {' and '.join(derived)}")
            longest = max(self.num_layers(stack) for stack in derived)
            if longest > 0:
                fixes.append(
                    f"a moe_layer_interval of at most {longest} (e.g. {min(2, longest)}: every "
                    f"{'other' if longest >= 2 else ''} layer sparse)".replace("every  ", "every ")
                )
        if len(derived) < 2:
            fixes.append("sparse layer indices in encoder_sparse_layers/decoder_sparse_layers")
        return (
            f"num_experts={self.num_experts} but no layer is sparse: {self.num_encoder_layers} "
            f"encoder and {self.num_decoder_layers} decoder layers with {'; '.join(how)}; "
            + ", or ".join(fixes)
        )

    def stack_config(self, stack: Literal["encoder", "decoder"]) -> SwitchConfig:
        """The config a stack's MoE layers run: `router_type` is that stack's router."""
        if stack == "encoder" or self.decoder_router_type is None:
            return self
        return dataclasses.replace(
            self, router_type=self.decoder_router_type, decoder_router_type=None
        )

    @property
    def groups_per_sequence(self) -> bool:
        """Whether every sequence is its own routing group (see routing_groups, expert_capacity)."""
        return self.routing_groups == "sequence" or self.expert_capacity is not None

    def stack_group_size(self, stack: Literal["encoder", "decoder"]) -> int:
        """Tokens per routing group of a stack's sparse layers under "tokens" grouping (see
        group_size; max_group_size while group_size is unresolved)."""
        if stack == "decoder" and self.decoder_group_size is not None:
            return self.decoder_group_size
        return self.max_group_size if self.group_size is None else self.group_size

    def group_size_field(self, stack: Literal["encoder", "decoder"]) -> str:
        """The field that sets `stack_group_size(stack)` (what an error tells users to set)."""
        if stack == "decoder" and self.decoder_group_size is not None:
            return "decoder_group_size"
        return "group_size"

    def with_recorded_groups(self, saved: Mapping[str, Any]) -> SwitchConfig:
        """This config with the group sizes a checkpoint recorded (`saved`: its meta's
        model_config) where group_size is unset, so that a run resumed or evaluated from it
        routes as it was trained whatever its batch or mesh. An explicit group_size wins."""
        if self.group_size is not None or saved.get("group_size") is None:
            return self
        decoder = self.decoder_group_size
        if decoder is None:
            decoder = saved.get("decoder_group_size")
        return dataclasses.replace(self, group_size=saved["group_size"], decoder_group_size=decoder)

    def with_fields(self, **fields: Any) -> SwitchConfig:
        """`dataclasses.replace`, where a group_size given without decoder_group_size sets both
        stacks' size (as group_size always did), not the encoder's alone."""
        if "group_size" in fields and "decoder_group_size" not in fields:
            fields["decoder_group_size"] = None
        return dataclasses.replace(self, **fields)

    def for_inference(self) -> SwitchConfig:
        """This config as inference runs it: each sequence its own routing group, so that an
        output never depends on the other inputs of its batch (nor on its padding length)."""
        return dataclasses.replace(self, **INFERENCE_FIELDS)

    @property
    def is_sparse(self) -> bool:
        return self.num_experts > 0 and bool(
            self.sparse_layers("encoder") or self.sparse_layers("decoder")
        )

    def sparse_layers(self, stack: Literal["encoder", "decoder"]) -> tuple[int, ...]:
        """The sparse (MoE) layer indices of one stack."""
        if self.num_experts == 0:
            return ()
        explicit = self.encoder_sparse_layers if stack == "encoder" else self.decoder_sparse_layers
        if explicit is not None:
            return tuple(sorted(explicit))
        n = self.num_encoder_layers if stack == "encoder" else self.num_decoder_layers
        return sparse_layers_every(n, self.moe_layer_interval)

    def num_layers(self, stack: Literal["encoder", "decoder"]) -> int:
        return self.num_encoder_layers if stack == "encoder" else self.num_decoder_layers

    def scan_period(self, stack: Literal["encoder", "decoder"]) -> int:
        """Layers per scanned block: the smallest period of the stack's dense/sparse pattern.

        1 for all-dense or all-sparse stacks, `moe_layer_interval` for the Switch/ST-MoE layouts
        (a dense/sparse pair for Switch-Base/XXL). An irregular layout gives the whole stack as
        one block (still correct, but nothing is saved by scanning).
        """
        n = self.num_layers(stack)
        sparse = set(self.sparse_layers(stack))
        pattern = [i in sparse for i in range(n)]
        for period in range(1, n + 1):
            if n % period == 0 and all(pattern[i] == pattern[i % period] for i in range(n)):
                return period
        return 1  # no layers at all

    @property
    def gated(self) -> bool:
        return len(self.mlp_activations) > 1

    @property
    def expert_dropout(self) -> float:
        return self.dropout_rate if self.expert_dropout_rate is None else self.expert_dropout_rate
