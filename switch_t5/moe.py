"""The sparse feed-forward layer: groups -> route -> dispatch -> experts -> combine.

Switch Transformer (arXiv 2101.03961) replaces the dense MLP of a T5 block with E experts (each an
MLP of the same size) and a router that sends each token to its top-1 expert (top-k for the
"MoE" baseline). Each step below is a small pure function:

1. `group_layout`: the [batch, length] tokens of the call are split into groups of the
   stack's group size (`config.stack_group_size`: `group_size`, or `decoder_group_size` in the
   decoder). The number of groups depends only on the global token count and the configured
   size, never on the mesh, so a batch routes (and drops) identically on any mesh.
   Rule: the group size is the largest divisor of the token count that is <= the configured
   size (batch * length is usually a power of two, so this is the size itself). When the groups
   cannot be laid evenly over the batch shards (mesh axes of the logical "group" axis), the call
   fails and names the sizes to change; a single group (fewer tokens than the size, e.g. one
   decoding step of [batch, 1, d]) is allowed on any mesh. A config that leaves `group_size`
   unset gets sizes chosen once from the run's batch and lengths (`resolve_group_sizes`): group
   counts that are multiples of 16, which split over 1, 2, 4, 8 or 16 batch shards. With
   per-sequence groups
   (`config.routing_groups="sequence"`, inference, or transformers' `config.expert_capacity`)
   each batch row is a group (`call_groups`): they are the batch and shard as it does.
2. route: the float32 router kernel (`routing.Router`) and the router function of
   `config.router_type` (`routing.register_router`; "switch"/"topk" = `routing.route`: top-k,
   capacity slots) turn the tokens into a `routing.DispatchPlan` (which token each expert slot
   holds, with what weight), under the capacity rule of `capacity_rule`.
3. dispatch: tokens -> <dtype>[experts, groups, capacity, embed]. Groups are sharded over
   ("data", "expert") before and experts over "expert" (groups over "data") after, so XLA emits an
   all-to-all (arXiv 2101.03961 Figure 9). Implementations are `Dispatch` objects registered
   by name (`register_dispatch`, chosen by `config.dispatch`; "auto": `resolve_dispatch`):
   "einsum"  one-hot dispatch mask [g, t, e, c] and combine array, as Mesh-TF/Flaxformer;
   "scatter" index gathers into the expert buffers, no [tokens, experts, capacity] tensor;
             forward AND backward are row gathers (`_gather_rows`), never a scatter-add;
   "dropless" no capacity: (token, choice) rows sorted by expert, padded to blocks of
             `config.dropless_block_size` rows, one expert per block (`grouped_matmul`,
             MegaBlocks' block-sparse layout in plain JAX): about the dense MLP's work;
   "ragged"  no capacity, the same rows through `jax.lax.ragged_dot` (a masked dense dot on
             CPU, about E times the work; for backends with a real grouped GEMM).
   "einsum" and "scatter" give identical outputs and drop the same tokens.
4. `Experts`: per-expert MLP, gated or not, expert dropout on the hidden activations; on CPU
   with an unsharded expert axis the experts run one at a time as 2-D matmuls
   (`loop_experts`), elsewhere as one batched einsum.
5. combine: output = sum over kept claims of weight * expert output; a dropped token gets 0.

The router's losses and load metrics are sown, unweighted, into the "intermediates"
collection under the names declared in `moe_metrics`; `collect_moe_intermediates` reduces them
over the layers as declared there, for the trainer.

Einsum legend: g=groups, t=tokens per group, k=claims per token (the selected experts of
token-choice routing), e=experts, c=expert capacity, d=embed, f=mlp, m=sorted (token, claim)
rows.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn
from jax.sharding import PartitionSpec as P

from switch_t5 import errors, layers, moe_metrics, partitioning
from switch_t5 import grouped_matmul as gmm_lib
from switch_t5 import routing as routing_lib
from switch_t5.config import SwitchConfig

_ACTIVATIONS = {
    "relu": nn.relu,
    # tanh-approximate GELU, as T5.1.1 and flax's default.
    "gelu": functools.partial(nn.gelu, approximate=True),
    "silu": nn.silu,
    "linear": lambda x: x,
}


def resolve_dispatch(dispatch: str) -> str:
    """The dispatch implementation for `config.dispatch` on the default backend.

    "auto" is the masked einsum on TPU (dense one-hot matmuls suit the MXU, as Mesh-TF) and the
    index-based scatter elsewhere: on CPU it is the fastest measured by scripts/bench_moe.py
    (32 experts, cf 1.0, 16k tokens: about the dense MLP's time, the einsum 3-4x, "ragged" 5-10x
    as `ragged_dot` is a masked dense dot there). On GPU the scatter's forward and backward are
    row gathers (no scatter-add atomics); run scripts/bench_moe.py there to compare. Any other
    registered value ("einsum", "scatter", "dropless", "ragged", or one added with
    `register_dispatch`) overrides the choice (gin: `switch_t5.SwitchConfig.dispatch`). "auto"
    would pick the block-sparse "dropless" (no token ever dropped) where it runs within 10% of
    the capacity dispatch; on CPU it does not (scripts/bench_moe.py --quick, 32 experts, 16k
    tokens, block 32: 1.21x the dense MLP's CPU time, 1.29x the scatter's at cf 1.0), and
    GPU/TPU are not measured yet.
    """
    if dispatch == "auto":
        return "einsum" if jax.default_backend() == "tpu" else "scatter"
    if dispatch not in _DISPATCHES:
        raise errors.UserError(_unknown_dispatch(dispatch))
    return dispatch


# Multiply-adds of one expert's [rows, d] x [d, f] matmul from which looping over the experts
# beats the batched dot on CPU (measured: 160 x 128 x 512 even, 320 x 128 x 512 0.78x the CPU
# time, 80 x 128 x 512 1.15x; below, the loop's per-iteration overhead dominates).
LOOP_MIN_EXPERT_MACS = 2**23


def loop_experts(impl: str | Dispatch, expert_rows: int, d_model: int, d_ff: int) -> bool:
    """Whether the capacity dispatch runs its experts one at a time (`jax.lax.map`).

    On CPU, E separate [rows, d] x [d, f] matmuls (rows = groups x capacity) run at the speed
    of the dense MLP's single matmul, while XLA's batched [e, rows, d] x [e, d, f] dot is
    1.2-1.5x slower once the matmuls are big (scripts/bench_moe.py); small ones favour the
    batched dot (`LOOP_MIN_EXPERT_MACS`). Accelerators keep the batched einsum (one batched
    GEMM / MXU op), and so does a sharded expert axis (a loop over it would make the partitioner
    gather the experts' kernels).
    """
    if isinstance(impl, str):
        impl = _DISPATCHES.get(impl)
    return (
        isinstance(impl, CapacityDispatch)
        and jax.default_backend() == "cpu"
        and expert_rows * d_model * d_ff >= LOOP_MIN_EXPERT_MACS
        and _group_shards("expert")[0] == 1
    )


def group_layout(num_tokens: int, group_size: int) -> tuple[int, int]:
    """(num_groups, tokens_per_group): the largest divisor of num_tokens that is <= group_size.

    Depends only on the global token count and the configured group size (never on the mesh).
    """
    if num_tokens <= 0 or group_size <= 0:
        raise errors.UserError(
            f"num_tokens={num_tokens} and group_size={group_size} must be positive"
        )
    if num_tokens <= group_size:
        return 1, num_tokens
    best = 1
    for d in range(1, math.isqrt(num_tokens) + 1):
        if num_tokens % d == 0:
            for cand in (d, num_tokens // d):
                if cand <= group_size:
                    best = max(best, cand)
    return num_tokens // best, best


def call_groups(
    config: SwitchConfig, batch: int, length: int, stack: str = "encoder"
) -> tuple[int, int]:
    """(num_groups, tokens_per_group) of a [batch, length] call of one stack's sparse layers
    under the config's grouping."""
    if config.groups_per_sequence:
        return batch, length
    return group_layout(batch * length, config.stack_group_size(stack))


# Group counts the automatic group size (SwitchConfig.group_size=None) makes a multiple of: they
# split evenly over 1, 2, 4, 8 or 16 batch shards, so the run routes identically on those meshes.
AUTO_GROUP_MULTIPLE = 16


def auto_group_size(rows: int, length: int, max_group_size: int, shards: int = 1) -> int:
    """Tokens per routing group for calls of [rows, length] tokens (a microbatch of one stack)
    when the config leaves group_size unset: the largest size <= max_group_size that makes a
    group count that is a multiple of lcm(16, shards); else `length` (one group per sequence,
    which splits wherever the batch does)."""
    tokens = rows * length
    multiple = math.lcm(AUTO_GROUP_MULTIPLE, shards)
    if tokens % multiple:
        return length
    # A group count that is a multiple of `multiple` <=> a size that divides tokens / multiple.
    _, size = group_layout(tokens // multiple, max_group_size)
    return size


def resolve_group_sizes(
    config: SwitchConfig, rows: int, lengths: Mapping[str, int], shards: int = 1
) -> SwitchConfig:
    """`config` with its unset group sizes chosen by `auto_group_size`, per stack.

    Args:
      config: the network config; an explicit group_size is kept as it is (the decoder then
        uses it too, unless decoder_group_size is set), so is a dense model's None.
      rows: sequences per microbatch (global: batch_size / num_microbatches).
      lengths: {"inputs": encoder tokens, "targets": decoder tokens} per sequence.
      shards: the batch shards (data x expert) of the mesh the run starts on; on meshes of up
        to 16 shards (powers of two) the choice is the same.
    """
    if config.group_size is not None or not config.is_sparse:
        return config
    encoder = auto_group_size(rows, lengths["inputs"], config.max_group_size, shards)
    decoder = config.decoder_group_size
    if decoder is None:
        decoder = auto_group_size(rows, lengths["targets"], config.max_group_size, shards)
    return dataclasses.replace(config, group_size=encoder, decoder_group_size=decoder)


def group_size_gin(config: SwitchConfig) -> str:
    """The gin flags that fix a config's group sizes (e.g. what `plan` chose)."""
    flags = [f"--gin.switch_t5.SwitchConfig.group_size={config.group_size}"]
    if config.decoder_group_size is not None:
        flags.append(f"--gin.switch_t5.SwitchConfig.decoder_group_size={config.decoder_group_size}")
    return " ".join(flags)


@dataclasses.dataclass(frozen=True)
class CapacityRule:
    """How many tokens each expert takes per routing group.

    Attributes:
      capacity: the static slots per expert and group (the buffer size).
      from_real_tokens: each group's usable slots come from its own real-token count
        (`routing.capacity_by_real_tokens`) instead of its padded size.
      padding_takes_capacity: padding claims slots in sequence order (transformers' rule).
      capacity_factor, min_expert_capacity: the factor rule's settings (from_real_tokens only).
    """

    capacity: int
    from_real_tokens: bool = False
    padding_takes_capacity: bool = False
    capacity_factor: float = 1.0
    min_expert_capacity: int = 0


def capacity_rule(config: SwitchConfig, tokens_per_group: int, training: bool) -> CapacityRule:
    """The capacity rule of a group of `tokens_per_group` tokens (padding included).

    - transformers' rule (`config.expert_capacity` set): exactly that many slots, padding takes
      slots (capped at the group size, which drops nothing more: a decoding step never drops);
    - per-sequence groups: the capacity factor applied to each sequence's real tokens, so its
      padding length does not change which of its tokens are dropped;
    - groups of `group_size` tokens: the factor applied to the group size (Flaxformer's rule).
    The factor is `train_capacity_factor` in training, else `eval_capacity_factor`, times
    `num_selected_experts` with `config.capacity_scales_with_k` (capacity = cf x k x tokens /
    experts: the slots fine-grained top-k routing needs).
    """
    if config.expert_capacity is not None:
        return CapacityRule(
            min(config.expert_capacity, tokens_per_group), padding_takes_capacity=True
        )
    cf = config.train_capacity_factor if training else config.eval_capacity_factor
    if config.capacity_scales_with_k:
        cf = cf * config.num_selected_experts
    capacity = routing_lib.expert_capacity(
        tokens_per_group, config.num_experts, cf, config.min_expert_capacity
    )
    if config.groups_per_sequence:
        return CapacityRule(capacity, True, False, cf, config.min_expert_capacity)
    return CapacityRule(capacity)


def _group_shards(name: str = "group") -> tuple[int, tuple[str, ...]]:
    """How many shards a logical axis ("group") has under the active mesh and axis rules."""
    mesh = jax.sharding.get_abstract_mesh()
    rules = nn.get_logical_axis_rules()
    if mesh.empty or not rules:
        return 1, ()
    axes = nn.logical_to_mesh_axes((name,), rules)[0]
    if axes is None:
        return 1, ()
    axes = (axes,) if isinstance(axes, str) else tuple(axes)
    axes = tuple(a for a in axes if a in mesh.shape)
    return math.prod(mesh.shape[a] for a in axes), axes


def _check_groups_fit_mesh(
    num_tokens: int, num_groups: int, group_size: int, field: str = "group_size"
) -> None:
    shards, axes = _group_shards()
    if num_groups == 1 or num_groups % shards == 0:
        return
    hint = ""
    if num_tokens % shards == 0:
        _, fit = group_layout(num_tokens // shards, group_size)
        hint = f" (e.g. {field}={fit})"
    raise errors.UserError(
        f"MoE routing: {num_tokens} tokens in groups of {num_tokens // num_groups} make "
        f"{num_groups} groups, which cannot be split evenly over the {shards} shards of mesh "
        f"axes {axes} that hold the logical 'group' axis. Set SwitchConfig.{field} so that "
        f"the group count is a multiple of {shards}{hint}, or use a batch whose token count "
        f"(batch * length) gives such a count. Routing never adapts groups to the mesh, so that "
        f"the same batch routes identically on every mesh."
    )


def _constrain(x: jax.Array, names: tuple[str | None, ...]) -> jax.Array:
    return nn.with_logical_constraint(x, names)


class _StackedKernel(nn.Module):
    """One [experts, in, out] kernel: the experts' copies of a dense layer, stacked."""

    shape: tuple[int, int, int]
    axis_names: tuple[str, str, str]
    init_scale: float
    param_dtype: Any

    @nn.compact
    def __call__(self) -> jax.Array:
        # Truncated-normal fan-in init scaled by init_scale (0.1 for Switch, arXiv 2101.03961
        # Table 3), per expert: batch_axis=0 keeps the expert count out of the fan-in.
        init = nn.initializers.variance_scaling(
            self.init_scale, "fan_in", "truncated_normal", in_axis=1, out_axis=2, batch_axis=(0,)
        )
        return self.param(
            "kernel",
            nn.with_logical_partitioning(init, self.axis_names),
            self.shape,
            self.param_dtype,
        )


class Experts(nn.Module):
    """E MLPs of the T5 feed-forward shape: wi (or gated wi_0, wi_1) -> activation -> wo.

    Params: `wi/kernel` (or `wi_0/kernel`, `wi_1/kernel`) <param_dtype>[experts, embed, mlp],
    logical ("expert", "embed", "mlp"); `wo/kernel` [experts, mlp, embed] ("expert", "mlp",
    "embed"). No biases (T5).

    Attributes:
      config: the network config (d_model, expert_width, num_experts, mlp_activations, dtype,
        param_dtype, init_scale, expert_dropout).
    """

    config: SwitchConfig

    def setup(self):
        cfg = self.config
        e, d, f = cfg.num_experts, cfg.d_model, cfg.expert_width
        pdt = jnp.dtype(cfg.param_dtype)
        names = (
            ["wi"]
            if len(cfg.mlp_activations) == 1
            else [f"wi_{i}" for i in range(len(cfg.mlp_activations))]
        )
        self.wi = [
            _StackedKernel((e, d, f), ("expert", "embed", "mlp"), cfg.init_scale, pdt, name=n)
            for n in names
        ]
        self.wo = _StackedKernel(
            (e, f, d), ("expert", "mlp", "embed"), cfg.init_scale, pdt, name="wo"
        )
        self.dropout = nn.Dropout(rate=cfg.expert_dropout)

    def _hidden(self, project, enable_dropout: bool) -> jax.Array:
        dtype = jnp.dtype(self.config.dtype)
        h = None
        for act_name, wi in zip(self.config.mlp_activations, self.wi):
            a = _ACTIVATIONS[act_name](project(wi().astype(dtype)))
            h = a if h is None else h * a
        # Expert dropout on the hidden activations (arXiv 2101.03961 Table 4: 0.4 when
        # fine-tuning, 0.1 elsewhere).
        return self.dropout(h, deterministic=not enable_dropout)

    def __call__(
        self,
        x: jax.Array,
        *,
        enable_dropout: bool = False,
        group_axis: str | None = None,
        loop: bool = False,
    ) -> jax.Array:
        """Applies every expert to its own capacity buffer.

        Args:
          x: <dtype>[experts, groups, capacity, embed] dispatched tokens.
          enable_dropout: apply expert dropout ("dropout" rng stream).
          group_axis: logical name of the groups axis ("expert_group"; None = not sharded,
            for a single group).
          loop: run the experts one after the other (`jax.lax.map`), each as plain 2-D matmuls
            (see `loop_experts`); the same products as the batched einsum. Only for an
            unsharded expert axis.

        Returns:
          <dtype>[experts, groups, capacity, embed].
        """
        dtype = jnp.dtype(self.config.dtype)
        x = x.astype(dtype)
        if loop:
            return self._loop(x, enable_dropout)
        # [e, g, c, d] x [e, d, f] -> [e, g, c, f]
        h = self._hidden(lambda w: jnp.einsum("egcd,edf->egcf", x, w), enable_dropout)
        h = _constrain(h, ("expert", group_axis, "capacity", "mlp"))
        # [e, g, c, f] x [e, f, d] -> [e, g, c, d]
        return jnp.einsum("egcf,efd->egcd", h, self.wo().astype(dtype))

    def _loop(self, x: jax.Array, enable_dropout: bool) -> jax.Array:
        cfg = self.config
        dtype = jnp.dtype(cfg.dtype)
        e, g, c, d = x.shape
        rate = cfg.expert_dropout
        drop = enable_dropout and rate > 0
        key = self.make_rng("dropout") if drop else None
        wis = [wi().astype(dtype) for wi in self.wi]

        def one_expert(args):
            i, xe, wo, *wi = args
            # [g, c, d] -> [g * c, d]
            rows = xe.reshape(g * c, d)
            h = None
            for act_name, w in zip(cfg.mlp_activations, wi):
                # [g * c, d] x [d, f] -> [g * c, f]
                a = _ACTIVATIONS[act_name](rows @ w)
                h = a if h is None else h * a
            if drop:
                # Same distribution as nn.Dropout, one key per expert.
                keep = jax.random.bernoulli(jax.random.fold_in(key, i), 1.0 - rate, h.shape)
                h = jnp.where(keep, h / max(1.0 - rate, 1e-12), 0.0).astype(dtype)
            # [g * c, f] x [f, d] -> [g * c, d] -> [g, c, d]
            return (h @ wo).reshape(g, c, d)

        return jax.lax.map(
            one_expert, (jnp.arange(e, dtype=jnp.int32), x, self.wo().astype(dtype), *wis)
        )

    def ragged(
        self, x: jax.Array, group_sizes: jax.Array, *, enable_dropout: bool = False
    ) -> jax.Array:
        """Grouped matmuls over rows sorted by expert (dropless).

        Args:
          x: <dtype>[rows, embed] rows sorted by expert; rows past sum(group_sizes) give 0.
          group_sizes: <int32>[experts] rows of each expert.
          enable_dropout: apply expert dropout.

        Returns:
          <dtype>[rows, embed].
        """
        dtype = jnp.dtype(self.config.dtype)
        x = x.astype(dtype)
        ragged = functools.partial(
            jax.lax.ragged_dot, group_sizes=group_sizes, preferred_element_type=dtype
        )
        # [m, d] x [e, d, f] -> [m, f]
        h = self._hidden(lambda w: ragged(x, w), enable_dropout)
        # [m, f] x [e, f, d] -> [m, d]
        return ragged(h, self.wo().astype(dtype))

    def grouped(
        self,
        x: jax.Array,
        expert_index: jax.Array,
        weights: jax.Array,
        *,
        enable_dropout: bool = False,
    ) -> jax.Array:
        """Dropless experts: every (token, choice) row through its expert, block-sparse.

        Rows are sorted by expert and padded to blocks of `config.dropless_block_size`
        (`grouped_matmul.block_layout`); each matmul runs over the used blocks only, a chunk
        of one expert's blocks at a time with that expert's weights (`grouped_matmul.gmm`).
        On a mesh the experts run where their kernels live (`jax.shard_map`): each expert x
        model shard takes the rows of its experts from the tokens of its data shard and the
        partial outputs are summed over the expert and model axes, so no expert kernel is ever
        gathered.

        Args:
          x: <dtype>[batch, length, embed].
          expert_index: <int32>[batch, length, k] chosen experts; -1 = none (padding).
          weights: <float32>[batch, length, k] gate of each choice.
          enable_dropout: apply expert dropout ("dropout" rng stream).

        Returns:
          <dtype>[batch, length, embed]: sum over choices of gate x expert output.
        """
        cfg = self.config
        dtype = jnp.dtype(cfg.dtype)
        key = self.make_rng("dropout") if enable_dropout and cfg.expert_dropout > 0 else None
        kernels = [wi().astype(dtype) for wi in self.wi] + [self.wo().astype(dtype)]
        layout = _DroplessShards.of(cfg, x.shape[0])
        run = functools.partial(_dropless_rows, cfg=cfg, shards=layout)
        if not layout.sharded:
            return run(x, expert_index, weights, kernels, key)
        tokens = P(layout.token_axes or None)
        wi_spec = P(layout.expert_axes or None, None, layout.mlp_axes or None)
        wo_spec = P(layout.expert_axes or None, layout.mlp_axes or None, None)
        specs = (tokens, tokens, tokens, [wi_spec] * len(self.wi) + [wo_spec])
        if key is None:
            return jax.shard_map(
                functools.partial(run, key=None), in_specs=specs, out_specs=tokens, check_vma=False
            )(x, expert_index, weights, kernels)
        return jax.shard_map(run, in_specs=(*specs, P()), out_specs=tokens, check_vma=False)(
            x, expert_index, weights, kernels, key
        )


@dataclasses.dataclass(frozen=True)
class _DroplessShards:
    """How the dropless experts split over the mesh: expert shards hold `local_experts` each,
    model shards a slice of d_ff, token shards the batch rows the others do not split."""

    expert_axes: tuple[str, ...]
    mlp_axes: tuple[str, ...]
    token_axes: tuple[str, ...]
    local_experts: int
    sharded: bool
    axis_names: tuple[str, ...]

    @classmethod
    def of(cls, cfg: SwitchConfig, batch: int) -> _DroplessShards:
        expert_shards, expert_axes = _group_shards("expert")
        mlp_shards, mlp_axes = _group_shards("mlp")
        _, batch_axes = _group_shards("batch")
        token_axes = tuple(a for a in batch_axes if a not in expert_axes + mlp_axes)
        mesh = jax.sharding.get_abstract_mesh()
        token_shards = math.prod(mesh.shape[a] for a in token_axes) if token_axes else 1
        if batch % token_shards:
            token_axes, token_shards = (), 1
        sharded = not mesh.empty and (expert_shards > 1 or mlp_shards > 1 or token_shards > 1)
        return cls(
            expert_axes,
            mlp_axes,
            token_axes,
            cfg.num_experts // expert_shards,
            sharded,
            tuple(mesh.axis_names) if sharded else (),
        )


def _dropless_rows(x, expert_index, weights, kernels, key, *, cfg, shards: _DroplessShards):
    """One shard's dropless experts (the whole layer when unsharded); see `Experts.grouped`."""
    *wis, wo = kernels
    dtype = jnp.dtype(cfg.dtype)
    impl = gmm_lib.default_impl()
    b, length, d = x.shape
    n, k = b * length, expert_index.shape[-1]
    first = 0
    if shards.expert_axes:
        first = jax.lax.axis_index(shards.expert_axes) * shards.local_experts
    # Experts held by other shards are out of [0, local_experts): not computed here.
    layout = gmm_lib.block_layout(
        (expert_index.reshape(n * k) - first).astype(jnp.int32),
        shards.local_experts,
        cfg.dropless_block_size,
    )
    block = gmm_lib.block_rows(n * k, cfg.dropless_block_size)
    # [n, d] -> [blocks, block, d]
    xb = gmm_lib.dispatch_rows(x.reshape(n, d).astype(dtype), layout, k, block)
    h = None
    for act_name, w in zip(cfg.mlp_activations, wis):
        a = _ACTIVATIONS[act_name](
            gmm_lib.gmm(xb, w, layout.block_expert, layout.used_blocks, impl)
        )
        h = a if h is None else h * a
    if key is not None:
        h = _expert_dropout(h, key, cfg.expert_dropout, shards.axis_names, dtype)
    # [blocks, block, f] x [e, f, d] -> [blocks, block, d] -> [n * k, d] -> [n, k, d]
    y = gmm_lib.gmm(h, wo, layout.block_expert, layout.used_blocks, impl)
    y = gmm_lib.combine_rows(y, layout).reshape(n, k, d)
    # [n, k, d] x [n, k] -> [n, d]
    out = jnp.einsum("nkd,nk->nd", y, weights.reshape(n, k).astype(dtype))
    if shards.expert_axes or shards.mlp_axes:
        out = jax.lax.psum(out, shards.expert_axes + shards.mlp_axes)
    return out.reshape(b, length, d)


def _expert_dropout(h, key, rate: float, axes: tuple[str, ...], dtype):
    """Expert dropout (arXiv 2101.03961 Table 4), one key per shard."""
    for axis in axes:
        key = jax.random.fold_in(key, jax.lax.axis_index(axis))
    keep = jax.random.bernoulli(key, 1.0 - rate, h.shape)
    return jnp.where(keep, h / max(1.0 - rate, 1e-12), 0.0).astype(dtype)


def dispatch_einsum(x: jax.Array, plan: routing_lib.DispatchPlan) -> tuple[jax.Array, jax.Array]:
    """Masked one-hot dispatch (Mesh-TF/Flaxformer).

    Args:
      x: <dtype>[groups, tokens, embed].
      plan: where these tokens go.

    Returns:
      expert_inputs: <dtype>[experts, groups, capacity, embed].
      combine: <float32>[groups, tokens, experts, capacity] gate of each kept (token, slot).
    """
    num_experts = plan.num_experts
    kept = plan.kept.astype(jnp.float32)
    # [g, t, k] -> [g, t, k, e] and [g, t, k, c]; a dropped choice has an all-zero slot row.
    expert_onehot = jax.nn.one_hot(plan.expert, num_experts, dtype=jnp.float32)
    slot_onehot = jax.nn.one_hot(jnp.where(plan.kept, plan.position, plan.capacity), plan.capacity)
    # [g, t, k, e] x [g, t, k, c] -> [g, t, e, c]
    dispatch = jnp.einsum("gtke,gtkc->gtec", expert_onehot * kept[..., None], slot_onehot)
    combine = jnp.einsum(
        "gtke,gtkc->gtec", expert_onehot * (plan.weight * kept)[..., None], slot_onehot
    )
    # [g, t, e, c] x [g, t, d] -> [e, g, c, d]
    expert_inputs = jnp.einsum("gtec,gtd->egcd", dispatch.astype(x.dtype), x)
    return expert_inputs, combine


def combine_einsum(expert_outputs: jax.Array, combine: jax.Array) -> jax.Array:
    """[e, g, c, d] x [g, t, e, c] -> [g, t, d]."""
    return jnp.einsum("egcd,gtec->gtd", expert_outputs, combine.astype(expert_outputs.dtype))


def _slots(plan: routing_lib.DispatchPlan) -> jax.Array:
    """<int32>[groups, tokens, k] flat buffer index expert * capacity + slot; dropped -> e * c."""
    num_experts = plan.num_experts
    flat = plan.expert * plan.capacity + plan.position
    return jnp.where(plan.kept, flat, num_experts * plan.capacity)


def _take_rows(src: jax.Array, idx: jax.Array) -> jax.Array:
    """[g, n, d] rows at [g, m] indices -> [g, m, d]; an out-of-range index gives a zero row."""
    return jnp.take_along_axis(src, idx[..., None], axis=1, mode="fill", fill_value=0)


@jax.custom_vjp
def _gather_rows(src: jax.Array, idx: jax.Array, readers: jax.Array) -> jax.Array:
    """out[g, i] = src[g, idx[g, i]], differentiated with gathers only.

    The dispatch and combine maps are partial permutations (each expert slot holds at most one
    (token, choice) and vice versa), so the transpose of the gather is another gather, through
    the inverse map `readers`, instead of the scatter-add that autodiff would emit (serial on
    CPU, atomics on GPU).

    Args:
      src: <dtype>[groups, n, d].
      idx: <int32>[groups, m] source row of each output row; >= n gives a zero row.
      readers: <int32>[groups, n, j] the (at most j) output rows that read each source row;
        >= m marks an unused entry.

    Returns:
      <dtype>[groups, m, d].
    """
    return _take_rows(src, idx)


def _gather_rows_fwd(src, idx, readers):
    return _take_rows(src, idx), readers


def _gather_rows_bwd(readers, d_out):
    g, n, j = readers.shape
    # [g, m, d] -> [g, n * j, d] -> [g, n, j, d] -> [g, n, d]
    d_src = _take_rows(d_out, readers.reshape(g, n * j)).reshape(g, n, j, d_out.shape[-1])
    return jnp.sum(d_src, axis=2), None, None


_gather_rows.defvjp(_gather_rows_fwd, _gather_rows_bwd)


def slot_tables(plan: routing_lib.DispatchPlan) -> tuple[jax.Array, jax.Array]:
    """The dispatch map in both directions, as index tables.

    Returns:
      slot_of_row: <int32>[groups, tokens * k] flat slot (expert * capacity + position) of every
        (token, choice) row; a dropped or padding row points past the buffer (e * c).
      row_of_slot: <int32>[groups, experts * capacity] the (token * k + choice) row held by every
        slot; an empty slot points past the rows (t * k).
    """
    g, t, k = plan.expert.shape
    num_slots = plan.num_experts * plan.capacity
    # [g, t, k] -> [g, t * k]
    slot_of_row = _slots(plan).reshape(g, t * k)
    rows = jnp.broadcast_to(jnp.arange(t * k, dtype=jnp.int32), (g, t * k))
    # Inverse map by an integer scatter of t * k indices (cheap next to the [t, d] row moves).
    row_of_slot = jnp.full((g, num_slots), t * k, jnp.int32)
    row_of_slot = jax.vmap(lambda tb, s, v: tb.at[s].set(v, mode="drop"))(
        row_of_slot, slot_of_row, rows
    )
    return slot_of_row, row_of_slot


def dispatch_scatter(
    x: jax.Array, plan: routing_lib.DispatchPlan, tables: tuple[jax.Array, jax.Array] | None = None
) -> jax.Array:
    """Index-based dispatch: gathers each slot's token into the expert buffers.

    Args:
      x: <dtype>[groups, tokens, embed].
      plan: where these tokens go.
      tables: `slot_tables(plan)`, when the caller already has them.

    Returns:
      <dtype>[experts, groups, capacity, embed]; empty slots are zero.
    """
    g, t, d = x.shape
    k = plan.expert.shape[-1]
    num_experts = plan.num_experts
    slot_of_row, row_of_slot = tables if tables is not None else slot_tables(plan)
    # Row -> token (row // k); an empty slot (row t * k) maps to token t: out of range, zeros.
    token_of_slot = row_of_slot // k
    # [g, t * k] -> [g, t, k]: the slots that read each token.
    readers = slot_of_row.reshape(g, t, k)
    # [g, t, d] -> [g, e * c, d]
    buf = _gather_rows(x, token_of_slot, readers)
    # [g, e * c, d] -> [e, g, c, d]
    return jnp.transpose(buf.reshape(g, num_experts, plan.capacity, d), (1, 0, 2, 3))


def combine_scatter(
    expert_outputs: jax.Array,
    plan: routing_lib.DispatchPlan,
    tables: tuple[jax.Array, jax.Array] | None = None,
) -> jax.Array:
    """Gathers each kept choice's expert output and sums gate * output over choices.

    Args:
      expert_outputs: <dtype>[experts, groups, capacity, embed].
      plan: where the tokens went.
      tables: `slot_tables(plan)`, when the caller already has them.

    Returns:
      <dtype>[groups, tokens, embed]; dropped tokens get 0.
    """
    e, g, c, d = expert_outputs.shape
    t, k = plan.expert.shape[1:]
    slot_of_row, row_of_slot = tables if tables is not None else slot_tables(plan)
    # [e, g, c, d] -> [g, e * c, d]
    buf = jnp.transpose(expert_outputs, (1, 0, 2, 3)).reshape(g, e * c, d)
    # [g, e * c, d] -> [g, t * k, d] -> [g, t, k, d]; dropped rows point past the buffer -> 0.
    picked = _gather_rows(buf, slot_of_row, row_of_slot[..., None]).reshape(g, t, k, d)
    weights = (plan.weight * plan.kept).astype(expert_outputs.dtype)
    # [g, t, k, d] x [g, t, k] -> [g, t, d]
    return jnp.einsum("gtkd,gtk->gtd", picked, weights)


# ---------------------------------------------------------------------------------------------
# Dispatch implementations, registered by name (`config.dispatch`).
# ---------------------------------------------------------------------------------------------

# route(tokens <dtype>[groups, tokens, embed], valid <bool>[groups, tokens], call) -> the plan;
# the layer's router: logits, the registered router function, its losses and metrics sown.
RouteFn = Callable[[jax.Array, jax.Array, routing_lib.RouteCall], routing_lib.DispatchPlan]


class Dispatch:
    """How a MoE layer call brings its tokens to their experts and back.

    `apply` runs the call after the layer's input checks: it lays out the routing groups, calls
    `route` once, moves the tokens to the experts, runs them and combines their outputs.

    Attributes:
      drops_tokens: the experts have a capacity (slots beyond it are dropped).
    """

    drops_tokens: bool = True

    def apply(
        self,
        cfg: SwitchConfig,
        x: jax.Array,
        valid: jax.Array,
        route: RouteFn,
        experts: Experts,
        *,
        is_encoder: bool,
        enable_dropout: bool,
    ) -> jax.Array:
        """<dtype>[batch, length, embed] -> the same shape; valid: <bool>[batch, length]."""
        raise NotImplementedError


class CapacityDispatch(Dispatch):
    """Expert buffers of `capacity` slots per group: groups -> route -> dispatch -> all-to-all
    -> experts -> all-to-all -> combine. Subclasses give `dispatch` and `combine`.

    Attributes:
      slot_impl: the `routing.route` slot computation that suits the dispatch (same slots).
    """

    slot_impl: str = "sort"

    def dispatch(self, xg: jax.Array, plan: routing_lib.DispatchPlan, on_groups) -> tuple:
        """([g, t, d] tokens, plan) -> (<dtype>[e, g, c, d] expert inputs, state for combine)."""
        raise NotImplementedError

    def combine(self, expert_out: jax.Array, plan: routing_lib.DispatchPlan, state) -> jax.Array:
        """<dtype>[e, g, c, d] expert outputs -> <dtype>[g, t, d]; dropped tokens get 0."""
        raise NotImplementedError

    def apply(self, cfg, x, valid, route, experts, *, is_encoder, enable_dropout):
        batch, length, d = x.shape
        stack = "encoder" if is_encoder else "decoder"
        num_groups, group_tokens = call_groups(cfg, batch, length, stack)
        if cfg.groups_per_sequence:
            # The groups are the batch rows: they shard as the batch does, evenly or not, and
            # no layout changes what a row computes.
            sharded = num_groups > 1 and num_groups % _group_shards()[0] == 0
        else:
            _check_groups_fit_mesh(
                batch * length,
                num_groups,
                cfg.stack_group_size(stack),
                cfg.group_size_field(stack),
            )
            sharded = num_groups > 1
        # A single group (decoding steps, small calls) spans the batch shards: its token layout is
        # left to the partitioner instead of being forced onto one device.
        expert_group_axis = "expert_group" if sharded else None

        def on_groups(a, names):
            return _constrain(a, names) if sharded else a

        rule = capacity_rule(cfg, group_tokens, training=enable_dropout)
        # [batch, length, d] -> [g, t, d]: consecutive tokens, so groups never straddle shards.
        xg = on_groups(x.reshape(num_groups, group_tokens, d), ("group", "capacity", "embed"))
        valid = valid.reshape(num_groups, group_tokens)
        plan = route(xg, valid, _route_call(cfg, rule, valid, group_tokens, is_encoder, self))
        expert_in, state = self.dispatch(xg, plan, on_groups)
        # Dispatch stays local to each group shard; then the all-to-all: groups over
        # (data, expert) -> experts over expert, groups over data (arXiv 2101.03961 Figure 9).
        # Without the first constraint XLA may instead gather tokens into the expert layout.
        expert_in = on_groups(expert_in, (None, "group", "capacity", "embed"))
        expert_in = _constrain(expert_in, ("expert", expert_group_axis, "capacity", "embed"))
        expert_out = experts(
            expert_in,
            enable_dropout=enable_dropout,
            group_axis=expert_group_axis,
            loop=loop_experts(self, num_groups * rule.capacity, cfg.d_model, cfg.expert_width),
        )
        expert_out = _constrain(expert_out, ("expert", expert_group_axis, "capacity", "embed"))
        # And back: the second all-to-all returns each expert output to its group's shard.
        expert_out = on_groups(expert_out, (None, "group", "capacity", "embed"))
        out = on_groups(self.combine(expert_out, plan, state), ("group", "capacity", "embed"))
        # [g, t, d] -> [batch, length, d]
        return out.reshape(batch, length, d)


def _route_call(
    cfg: SwitchConfig,
    rule: CapacityRule,
    valid: jax.Array,
    group_tokens: int,
    is_encoder: bool,
    impl: CapacityDispatch,
) -> routing_lib.RouteCall:
    """The router call of a capacity dispatch under `rule` (valid: <bool>[groups, tokens])."""
    slot_limit = None
    if rule.from_real_tokens:
        slot_limit = routing_lib.capacity_by_real_tokens(
            jnp.sum(valid, axis=1, dtype=jnp.int32),
            group_tokens,
            cfg.num_experts,
            rule.capacity_factor,
            rule.min_expert_capacity,
        )
    return routing_lib.RouteCall(
        capacity=rule.capacity,
        slot_limit=slot_limit,
        batch_prioritized=cfg.batch_prioritized_routing and is_encoder,
        padding_takes_capacity=rule.padding_takes_capacity,
        slot_impl=impl.slot_impl,
    )


class EinsumDispatch(CapacityDispatch):
    """Masked one-hot dispatch and combine einsums (Mesh-TF/Flaxformer; `dispatch_einsum`)."""

    slot_impl = "cumsum"

    def dispatch(self, xg, plan, on_groups):
        expert_in, combine = dispatch_einsum(xg, plan)
        return expert_in, on_groups(combine, ("group", "capacity", None, None))

    def combine(self, expert_out, plan, state):
        return combine_einsum(expert_out, state)


class ScatterDispatch(CapacityDispatch):
    """Index gathers into and out of the expert buffers (`dispatch_scatter`)."""

    slot_impl = "sort"

    def dispatch(self, xg, plan, on_groups):
        tables = slot_tables(plan)
        return dispatch_scatter(xg, plan, tables), tables

    def combine(self, expert_out, plan, state):
        return combine_scatter(expert_out, plan, state)


class DroplessDispatch(Dispatch):
    """No capacity: all tokens of the call form one routing group and every kept claim runs
    through its expert. Subclasses give `run_experts`."""

    drops_tokens = False

    def run_experts(
        self, cfg: SwitchConfig, x: jax.Array, plan, experts: Experts, enable_dropout: bool
    ) -> jax.Array:
        """[batch, length, d] tokens and their one-group plan -> [batch, length, d] outputs."""
        raise NotImplementedError

    def apply(self, cfg, x, valid, route, experts, *, is_encoder, enable_dropout):
        batch, length, d = x.shape
        n = batch * length
        # Nothing is dropped, so groups do not matter: all tokens form one routing group.
        # [batch, length, d] -> [1, n, d]
        plan = route(x.reshape(1, n, d), valid.reshape(1, n), routing_lib.RouteCall(capacity=n))
        return self.run_experts(cfg, x, plan, experts, enable_dropout)


class BlockSparseDispatch(DroplessDispatch):
    """Rows sorted by expert in blocks, block-sparse grouped matmuls (`Experts.grouped`)."""

    def run_experts(self, cfg, x, plan, experts, enable_dropout):
        batch, length, _ = x.shape
        j = plan.expert.shape[-1]
        weights = plan.weight[0] * plan.kept[0]
        # Padding and dropped claims go to no expert (-1): they take no rows of the blocks.
        expert_index = jnp.where(plan.kept[0], plan.expert[0], -1)
        # [n, j] -> [batch, length, j]
        return experts.grouped(
            x,
            expert_index.reshape(batch, length, j),
            weights.reshape(batch, length, j),
            enable_dropout=enable_dropout,
        )


class RaggedDispatch(DroplessDispatch):
    """Rows sorted by expert through `jax.lax.ragged_dot` (`Experts.ragged`)."""

    def run_experts(self, cfg, x, plan, experts, enable_dropout):
        batch, length, d = x.shape
        n, j = plan.expert.shape[1:]
        # [1, n, j] -> [n * j]; padding sorts last (sentinel id) and lies past sum(group_sizes).
        keys = jnp.where(plan.kept[0], plan.expert[0], cfg.num_experts).reshape(n * j)
        order = jnp.argsort(keys, stable=True)
        group_sizes = jnp.zeros((cfg.num_experts + 1,), jnp.int32).at[keys].add(1)[:-1]
        # [n, d] -> [n * j, d] sorted by expert
        rows = x.reshape(n, d)[order // j]
        out_rows = experts.ragged(rows, group_sizes, enable_dropout=enable_dropout)
        # [n * j, d] back to (token, claim) order -> [n, j, d]
        out = jnp.zeros_like(out_rows).at[order].set(out_rows).reshape(n, j, d)
        weights = (plan.weight[0] * plan.kept[0]).astype(out.dtype)
        # [n, j, d] x [n, j] -> [n, d]
        out = jnp.einsum("nkd,nk->nd", out, weights)
        return out.reshape(batch, length, d)


_DISPATCHES: dict[str, Dispatch] = {}


def register_dispatch(name: str, impl: Dispatch) -> None:
    """Makes `SwitchConfig.dispatch = name` run MoE layers through `impl` (a new name)."""
    if name == "auto" or name in _DISPATCHES:
        raise ValueError(f"dispatch {name!r} is already registered")
    _DISPATCHES[name] = impl


def unregister_dispatch(name: str) -> None:
    """Removes a dispatch added with `register_dispatch`."""
    _DISPATCHES.pop(name, None)


def dispatch_names() -> tuple[str, ...]:
    """The registered dispatch implementations, in registration order ("auto" not included)."""
    return tuple(_DISPATCHES)


def get_dispatch(dispatch: str) -> Dispatch:
    """The implementation `config.dispatch` runs on this backend (`resolve_dispatch`)."""
    return _DISPATCHES[resolve_dispatch(dispatch)]


register_dispatch("einsum", EinsumDispatch())
register_dispatch("scatter", ScatterDispatch())
register_dispatch("dropless", BlockSparseDispatch())
register_dispatch("ragged", RaggedDispatch())

# The built-in dispatch implementations that never drop a token.
DROPLESS_IMPLS = tuple(n for n, d in _DISPATCHES.items() if not d.drops_tokens)


def config_problems(config: SwitchConfig) -> list[str]:
    """Problems of the config's router type and dispatch (SwitchConfig validation reads the
    registries, so registered names pass)."""
    problems = []
    for router_type in (config.router_type, config.decoder_router_type):
        router_problem = router_type and routing_lib.unknown_router_problem(router_type)
        if router_problem:
            problems.append(router_problem)
    if config.dispatch != "auto" and config.dispatch not in _DISPATCHES:
        problems.append(_unknown_dispatch(config.dispatch))
    return problems


def _unknown_dispatch(dispatch: str) -> str:
    return f"dispatch={dispatch!r}: use {routing_lib.choices(('auto', *dispatch_names()))}"


class MoeLayer(nn.Module):
    """Sparse (Switch) feed-forward layer: a drop-in replacement for the dense T5 MLP.

    Params: `router/w/kernel` <f32>[embed, experts]; `expert/wi[_i]/kernel` [experts, embed, mlp],
    `expert/wo/kernel` [experts, mlp, embed] (see `Experts`; mlp = `config.expert_width`); with
    `config.num_shared_experts` S > 0, `shared_experts/wi[_i]/kernel` [embed, S x expert_width]
    and `shared_experts/wo/kernel`, a dense MLP (`layers.MlpBlock`) that every token passes
    through, added to the routed output (DeepSeekMoE, arXiv 2401.06066).

    Rng streams (only with enable_dropout): "jitter" (router input noise), "dropout" (experts).
    Capacity factor: `train_capacity_factor` with enable_dropout, else `eval_capacity_factor`
    (Flaxformer's convention); see `capacity_rule` for per-sequence groups and transformers'
    fixed `expert_capacity`. The router (`config.router_type`, `routing.register_router`) and
    the dispatch (`config.dispatch`, `register_dispatch`) come from their registries.

    Attributes:
      config: the network config.
      is_encoder: batch-prioritized routing applies to encoder layers only (decoder tokens must
        not see the priorities of later positions).
    """

    config: SwitchConfig
    is_encoder: bool = True

    def _choice_bias(self) -> jax.Array | None:
        """<float32>[experts] the choice bias of auxiliary-loss-free balancing (a variable of
        `routing.BIAS_COLLECTION`, zeros at init), or None when it is off."""
        if not self.config.router_bias_update_rate > 0:
            return None
        e = self.config.num_experts
        name, collection = routing_lib.BIAS_NAME, routing_lib.BIAS_COLLECTION
        if not (self.has_variable(collection, name) or self.is_mutable_collection(collection)):
            raise errors.UserError(
                f"router_bias_update_rate={self.config.router_bias_update_rate} but the model "
                f"was applied without its {collection!r} variables (the train state's "
                "router_bias): pass train_state.model_variables(params, router_bias)"
            )
        return self.variable(routing_lib.BIAS_COLLECTION, name, jnp.zeros, (e,), jnp.float32).value

    def _sow_load(self, load: jax.Array) -> None:
        # Summed over the calls of one apply; the train step sums it over microbatches too, so
        # the bias moves by the load of the global batch (`routing.update_choice_bias`).
        self.sow(
            routing_lib.LOAD_COLLECTION,
            routing_lib.BIAS_NAME,
            load,
            init_fn=lambda: jnp.zeros_like(load),
            reduce_fn=jnp.add,
        )

    def _sow(self, out: routing_lib.RouterOutput) -> None:
        # Losses first, then metrics; every name must be declared in moe_metrics.
        for name, value in {**out.losses, **out.metrics}.items():
            moe_metrics.get(name)
            self.sow("intermediates", name, value)

    @nn.compact
    def __call__(
        self, x: jax.Array, padding_mask: jax.Array | None = None, *, enable_dropout: bool = False
    ) -> jax.Array:
        """Routes every token to its expert(s) and combines their outputs.

        Args:
          x: <dtype>[batch, length, embed].
          padding_mask: [batch, length], 1/True = real token; None = all real. Padding takes no
            expert capacity, gets a zero output and is left out of the losses and metrics
            (under transformers' rule, `config.expert_capacity`, it takes slots and is
            processed as transformers does, still outside the losses and metrics).
          enable_dropout: training mode (router jitter, expert dropout, train capacity factor).

        Returns:
          <dtype>[batch, length, embed]; a token dropped by every chosen expert gets zeros.
        """
        cfg = self.config
        valid = _check_inputs(cfg, x, padding_mask)
        dtype = jnp.dtype(cfg.dtype)
        x = x.astype(dtype)
        impl = get_dispatch(cfg.dispatch)
        router_fn = routing_lib.make_router(
            cfg.stack_config("encoder" if self.is_encoder else "decoder")
        )
        router = routing_lib.Router(
            cfg.num_experts,
            jitter_noise=cfg.router_jitter_noise,
            init_stddev=cfg.router_init_stddev,
            param_dtype=jnp.dtype(cfg.param_dtype),
            embed_axis=partitioning.weight_embed_axis(cfg),
            name="router",
        )
        experts = Experts(cfg, name="expert")
        bias = self._choice_bias()

        def route(tokens, valid, call):
            call = dataclasses.replace(call, choice_bias=bias, sequence_length=x.shape[1])
            out = router_fn(router(tokens, apply_jitter=enable_dropout), valid, call)
            self._sow(out)
            if bias is not None:
                self._sow_load(out.load)
            return out.plan

        out = impl.apply(
            cfg,
            x,
            valid,
            route,
            experts,
            is_encoder=self.is_encoder,
            enable_dropout=enable_dropout,
        )
        out = out.astype(dtype)
        if cfg.num_shared_experts:
            # Shared experts (DeepSeekMoE, arXiv 2401.06066 sec. 3.2): S MLPs of width
            # expert_width that every token passes through, run as the one dense MLP of width
            # S x expert_width that their sum is.
            shared_cfg = dataclasses.replace(cfg, d_ff=cfg.shared_expert_width)
            shared = layers.MlpBlock(shared_cfg, name="shared_experts")
            out = out + shared(x, enable_dropout=enable_dropout)
        return _constrain(out, ("batch", "length", "embed"))


def _check_inputs(cfg: SwitchConfig, x: jax.Array, padding_mask: jax.Array | None) -> jax.Array:
    """<bool>[batch, length] real tokens, after checking the layer's input shapes."""
    if cfg.num_experts < 1:
        raise ValueError("MoeLayer needs config.num_experts >= 1 (0 means a dense model)")
    if x.ndim != 3 or x.shape[-1] != cfg.d_model:
        raise ValueError(
            f"MoeLayer input has shape {x.shape}; expected [batch, length, d_model={cfg.d_model}]"
        )
    batch, length = x.shape[:2]
    if padding_mask is None:
        return jnp.ones((batch, length), bool)
    if padding_mask.shape != (batch, length):
        raise ValueError(
            f"padding_mask has shape {padding_mask.shape}; expected [batch, length] = "
            f"{(batch, length)} matching x"
        )
    return padding_mask.astype(bool)


def _natural_key(path: str) -> list:
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", path)]


def _stack_rank(path: str) -> int:
    low = path.lower()
    if "encoder" in low:
        return 0
    if "decoder" in low:
        return 1
    return 2


def _moe_layers(intermediates: Mapping) -> list[tuple[str, Mapping]]:
    """(path, node) of every sown MoE layer, encoder first, then decoder, then the rest, each in
    natural (layer number) order. A node is a MoE layer when it holds a declared metric."""
    declared = {m.name for m in moe_metrics.all_metrics()}
    found: list[tuple[str, Mapping]] = []

    def walk(node, path):
        if isinstance(node, Mapping):
            if any(k in declared and not isinstance(v, Mapping) for k, v in node.items()):
                found.append(("/".join(path), node))
                return
            for key, child in node.items():
                walk(child, (*path, str(key)))

    walk(intermediates, ())
    found.sort(key=lambda item: (_stack_rank(item[0]), _natural_key(item[0])))
    return found


def _calls(value) -> tuple:
    """The sown values of one name: one per call of the layer."""
    return tuple(value) if isinstance(value, tuple | list) else (value,)


def collect_moe_intermediates(intermediates: Mapping) -> dict[str, Any]:
    """Gathers the sown MoE losses and metrics of every MoE layer call.

    Walks any nesting of the "intermediates" collection for MoE layers (`_moe_layers`); each
    sown call counts once, and values with extra leading axes (from `nn.scan`) count once per
    leading index. Each declared metric (`moe_metrics`) is reduced over the layer calls that
    sowed it as it declares ("mean": <float32>[] for a scalar; "stack": <float32>[L, ...]). With
    no MoE layer every metric is zeros of its `empty` shape; a metric no layer sowed is left
    out. Works inside jit.

    Args:
      intermediates: the "intermediates" collection (or any tree containing it).

    Returns:
      metric name -> reduced value (e.g. load_balancing_loss <float32>[], expert_usage
      <float32>[layers, experts]), and layer_names: the "a/b/c" path of every layer call.
    """
    found = _moe_layers(intermediates)
    names: list[str] = []
    values: dict[str, list[jax.Array]] = {m.name: [] for m in moe_metrics.all_metrics()}
    for path, node in found:
        metrics = moe_metrics.present(node)
        first = _calls(node[metrics[0].name])
        for call_index, call in enumerate(first):
            # Values sown under nn.scan carry the stacked layer axes in front.
            lead = jnp.shape(call)[: jnp.ndim(call) - metrics[0].ndim]
            count = math.prod(lead)
            for i in range(count):
                suffix = "" if len(first) == 1 else f"[{call_index}]"
                suffix += "" if not lead else f"[{i}]"
                names.append(path + suffix)
            for metric in metrics:
                v = jnp.asarray(_calls(node[metric.name])[call_index], jnp.float32)
                values[metric.name].append(v.reshape((count, *v.shape[len(lead) :])))

    result: dict[str, Any] = {"layer_names": names}
    for metric in moe_metrics.all_metrics():
        rows = values[metric.name]
        if not names:
            result[metric.name] = jnp.zeros(metric.empty, jnp.float32)
        elif rows and metric.over_layers == "stack":
            result[metric.name] = jnp.concatenate(rows, axis=0)
        elif rows and metric.ndim == 0:
            result[metric.name] = jnp.mean(jnp.concatenate(rows))
        elif rows:
            result[metric.name] = jnp.mean(jnp.concatenate(rows, axis=0), axis=0)
    return result
