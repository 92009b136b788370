"""The device mesh (data, expert, model) and the ONE logical-axis rules table.

Every parameter and key activation carries logical axis names (flax `nn.with_logical_partitioning`
and `nn.with_logical_constraint`); this table is the only place that maps them onto mesh axes.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Mapping, Sequence

import jax
import numpy as np
from flax import linen as nn
from jax.experimental import mesh_utils
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from switch_t5 import errors

MESH_AXES = ("data", "expert", "model")

# d_model of a non-expert weight under FSDP (see the last rule), and the axes it is split over.
WEIGHT_EMBED = "weight_embed"
FSDP_AXES = ("data", "expert")

# Logical name -> mesh axis (or axes). The batch is split over data AND expert: the expert axis
# holds different tokens too, and experts exchange them with an all-to-all (arXiv 2101.03961
# sec. 2.2, Figure 9).
LOGICAL_AXIS_RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    ("batch", ("data", "expert")),  # examples of a batch
    ("length", None),  # sequence positions
    ("embed", None),  # d_model: replicated, activations stay whole per token
    ("mlp", "model"),  # d_ff of dense MLPs and experts: Megatron-style model parallelism
    ("heads", "model"),  # attention heads
    ("kv", None),  # head_dim
    ("joined_kv", "model"),  # heads * head_dim, when kept fused
    ("vocab", "model"),  # embedding rows and output logits
    ("relpos_buckets", None),  # relative-position buckets
    ("expert", "expert"),  # experts: each device of the expert axis holds E / expert_size
    ("group", ("data", "expert")),  # routing groups before dispatch (they are the batch)
    ("expert_group", "data"),  # routing groups after dispatch (experts now use the expert axis)
    ("capacity", None),  # expert capacity slots / tokens inside a group
    ("unmodeled", None),  # small axes never worth sharding (router logits' expert dim, ...)
    ("layers", None),  # the stacked axis of scanned layers
    # FSDP / ZeRO-3: d_model of the non-expert weights only (attention, dense MLPs, embeddings,
    # logits, routers), split over the batch axes; GSPMD all-gathers each layer's slice before
    # use and reduce-scatters its gradient. A name of its own: "embed" also names activations,
    # expert kernels and the all-to-all buffers, which must stay whole on d_model. Where the
    # batch shards do not divide d_model, `fit_fsdp` places them on another dim (or fewer).
    (WEIGHT_EMBED, FSDP_AXES),
)


# FSDP turns itself on (`SwitchConfig.fsdp=None`) from this many non-expert parameters, or on
# meshes of at least FSDP_AUTO_MIN_SHARDS batch shards (data x expert) from
# FSDP_AUTO_LARGE_MESH_MIN_PARAMS: there each device's share of the experts is small and the
# replicated weights, their gradients and optimizer state are a large part of its memory.
FSDP_AUTO_MIN_PARAMS = 500_000_000
FSDP_AUTO_MIN_SHARDS = 256
FSDP_AUTO_LARGE_MESH_MIN_PARAMS = 100_000_000


def non_expert_params(config) -> int:
    """Non-expert parameter count of a SwitchConfig (embeddings, untied logits, attention, dense
    MLPs, routers; norms and relative-position biases left out), by arithmetic."""
    d, inner = config.d_model, config.num_heads * config.head_dim
    n = config.vocab_size * d * (1 if config.logits_via_embedding else 2)
    n_mlp = len(config.mlp_activations) * d * config.d_ff + config.d_ff * d
    for stack, attn in (("encoder", 1), ("decoder", 2)):
        layers = config.num_layers(stack)
        sparse = len(config.sparse_layers(stack)) if config.num_experts else 0
        n += layers * attn * 4 * d * inner + (layers - sparse) * n_mlp
        n += sparse * d * config.num_experts
        if config.num_experts and config.sparse_extra_mlp:
            n += sparse * n_mlp
        # Shared experts (`SwitchConfig.num_shared_experts`) are dense weights.
        n += sparse * (len(config.mlp_activations) + 1) * d * config.shared_expert_width
    return n


def fsdp_enabled(config, mesh_sizes: Mapping[str, int] | None = None) -> bool:
    """`config.fsdp`, or (None) whether the non-expert params reach FSDP_AUTO_MIN_PARAMS, or
    FSDP_AUTO_LARGE_MESH_MIN_PARAMS on a mesh of FSDP_AUTO_MIN_SHARDS batch shards or more."""
    if config.fsdp is not None:
        return bool(config.fsdp)
    n = non_expert_params(config)
    shards = math.prod(mesh_sizes[a] for a in FSDP_AXES) if mesh_sizes else 1
    if shards >= FSDP_AUTO_MIN_SHARDS:
        return n >= FSDP_AUTO_LARGE_MESH_MIN_PARAMS
    return n >= FSDP_AUTO_MIN_PARAMS


def resolve_fsdp(config, mesh: Mesh):
    """`config` with `fsdp` decided for `mesh` (the model picks its param names from it)."""
    if config.fsdp is not None:
        return config
    return dataclasses.replace(config, fsdp=fsdp_enabled(config, dict(mesh.shape)))


def weight_embed_axis(config) -> str:
    """The logical name of d_model on a non-expert weight: WEIGHT_EMBED with FSDP, else "embed"."""
    return WEIGHT_EMBED if fsdp_enabled(config) else "embed"


class MeshConfigError(errors.UserError):
    """The mesh sizes are invalid, or do not fit the devices, the model or the batch."""


def _resolve_sizes(sizes: Sequence[int], num_devices: int) -> tuple[int, ...]:
    sizes = tuple(int(s) for s in sizes)
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if num_devices % known:
            raise MeshConfigError(
                f"mesh sizes {dict(zip(MESH_AXES, sizes))}: the fixed axes multiply to {known}, "
                f"which does not divide the {num_devices} devices; pick sizes whose product "
                f"divides {num_devices}"
            )
        sizes = tuple(num_devices // known if s == -1 else s for s in sizes)
    if math.prod(sizes) != num_devices:
        raise MeshConfigError(
            f"mesh sizes data={sizes[0]} x expert={sizes[1]} x model={sizes[2]} = "
            f"{math.prod(sizes)} but there are {num_devices} devices; make the product equal "
            f"{num_devices} (or set one axis to -1)"
        )
    return sizes


def default_expert_size(num_devices: int, num_experts: int, model: int = 1) -> int:
    """As many expert partitions as the experts allow: gcd(devices / model, num_experts)."""
    if num_experts <= 0:
        return 1
    return math.gcd(num_devices // max(model, 1), num_experts)


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """The (data, expert, model) mesh sizes a run asks for (gin `train.mesh_data` etc.).

    Attributes:
      data: data-parallel size; -1 = the devices the other axes leave.
      expert: expert-parallel size; None = as many partitions as the experts allow
        (`default_expert_size`); -1 = the rest.
      model: model-parallel (tensor) size; -1 = the rest.
    """

    data: int = -1
    expert: int | None = None
    model: int = 1

    def __post_init__(self):
        sizes = {"data": self.data, "expert": self.expert, "model": self.model}
        problems = []
        for name, value in sizes.items():
            if value is None and name == "expert":
                continue
            if not errors.is_int(value):
                problems.append(f"{name}={value!r} must be an integer")
            elif value == 0 or value < -1:
                problems.append(f"{name}={value} must be positive (or -1 for 'the rest')")
        if list(sizes.values()).count(-1) > 1:
            problems.append("at most one axis may be -1")
        if problems:
            raise MeshConfigError(f"mesh sizes {sizes}: " + "; ".join(problems))

    def resolve(self, device_count: int, num_experts: int = 0) -> tuple[int, int, int]:
        """(data, expert, model) for `device_count` devices and `num_experts` experts per MoE
        layer (0 = dense: no expert-axis constraint).

        Raises:
          MeshConfigError: the sizes do not multiply to the device count, or the expert axis
            does not divide the experts; the message names the fix.
        """
        expert, model = self.expert, self.model
        if expert is None:
            if model != -1 and device_count % model:
                raise MeshConfigError(
                    f"model={model} does not divide the {device_count} devices; pick a divisor "
                    f"of {device_count}"
                )
            expert = default_expert_size(device_count, num_experts, model if model > 0 else 1)
        sizes = _resolve_sizes((self.data, expert, model), device_count)
        if num_experts and num_experts % sizes[1]:
            raise MeshConfigError(
                f"the expert mesh axis ({sizes[1]}) does not divide num_experts={num_experts}; "
                f"use an expert axis size that divides {num_experts} (e.g. "
                f"{math.gcd(sizes[1], num_experts)})"
            )
        return sizes


def routing_groups_problem(
    stack: str,
    tokens: int,
    num_groups: int,
    group_size: int,
    shards: int,
    field: str = "group_size",
) -> str | None:
    """Why `num_groups` routing groups of `tokens` tokens cannot be split over `shards` batch
    shards (None when they can: one group, or a multiple of the shards). Routing never adapts
    its groups to the mesh, so that a batch routes identically on every mesh. `field`: the
    SwitchConfig field that sets the stack's group size."""
    if num_groups == 1 or num_groups % shards == 0:
        return None
    from switch_t5 import moe

    hint = ""
    if tokens % shards == 0:
        hint = f" (e.g. {field}={moe.group_layout(tokens // shards, group_size)[1]})"
    return (
        f"the {stack}'s {tokens} tokens per microbatch make {num_groups} routing groups of "
        f"{tokens // num_groups}, which cannot be split over the {shards} batch shards; set "
        f"--gin.switch_t5.SwitchConfig.{field} so that the group count is a multiple of "
        f"{shards}{hint}"
    )


def _axes_problems(config, data: int, expert: int, model: int) -> list[str]:
    problems = []
    if config.num_experts and config.num_experts % expert:
        problems.append(
            f"the expert axis ({expert}) does not divide num_experts={config.num_experts}; use "
            f"a divisor of {config.num_experts}"
        )
    if not config.num_experts and expert > 1:
        problems.append(f"expert axis {expert} > 1 but the model is dense; use expert:1")
    if model > 1:
        for name in ("num_heads", "d_ff", "vocab_size", "expert_d_ff"):
            if (getattr(config, name) or 0) % model:  # expert_d_ff None = d_ff
                problems.append(
                    f"the model axis ({model}) does not divide {name}={getattr(config, name)}; "
                    f"use a divisor of {getattr(config, name)}"
                )
    return problems


def mesh_problems(
    config,
    mesh_sizes: Mapping[str, int],
    batch_size: int,
    num_microbatches: int,
    lengths: Mapping[str, int],
) -> list[str]:
    """Why a (data, expert, model) mesh cannot train `config` on this batch; empty when it can.

    The ONE mesh-fit rule: the batch splits into microbatches, each microbatch's rows over the
    data x expert batch shards; the expert axis divides the experts (a dense model has none);
    the model axis divides heads, d_ff and the vocabulary; and, for the capacity dispatches,
    each sparse stack's routing groups (`moe.call_groups`) split over the batch shards (group
    sizes left unset are first chosen for this mesh, `moe.resolve_group_sizes`).

    Args:
      config: the SwitchConfig.
      mesh_sizes: {"data": D, "expert": E, "model": M} (e.g. `dict(mesh.shape)`).
      batch_size: global sequences per optimizer step.
      num_microbatches: gradient-accumulation steps per optimizer step.
      lengths: {"inputs": encoder tokens, "targets": decoder tokens} per sequence.
    """
    from switch_t5 import moe

    data, expert, model = (mesh_sizes[a] for a in MESH_AXES)
    shards = data * expert
    problems = []
    if batch_size % num_microbatches:
        problems.append(
            f"batch {batch_size} is not divisible by num_microbatches={num_microbatches}"
        )
    rows = batch_size // num_microbatches
    if rows % shards:
        problems.append(
            f"{rows} sequences per microbatch cannot be split over the data x expert = "
            f"{data} x {expert} = {shards} batch shards; use a batch that is a multiple of "
            f"{shards} or smaller data/expert axes"
        )
    problems += _axes_problems(config, data, expert, model)
    dropless = moe.resolve_dispatch(config.dispatch) in moe.DROPLESS_IMPLS
    if config.is_sparse and not dropless and not problems:
        config = moe.resolve_group_sizes(config, rows, lengths, shards)
        for stack, length in (("encoder", lengths["inputs"]), ("decoder", lengths["targets"])):
            if config.sparse_layers(stack):
                groups, _ = moe.call_groups(config, rows, length, stack)
                problem = routing_groups_problem(
                    stack,
                    rows * length,
                    groups,
                    config.stack_group_size(stack),
                    shards,
                    config.group_size_field(stack),
                )
                problems += [problem] if problem else []
    return problems


def mesh_of(device_array: np.ndarray) -> Mesh:
    """A (data, expert, model) Mesh over a device array of that shape, with classic (auto)
    GSPMD axis types: jax 0.10's default explicit types reject einsums over sharded dims."""
    return Mesh(device_array, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))


def make_mesh(
    data: int = -1,
    expert: int | None = None,
    model: int = 1,
    *,
    num_experts: int = 0,
    devices: Sequence[jax.Device] | None = None,
) -> Mesh:
    """Builds the (data, expert, model) mesh with classic (auto) GSPMD axis types.

    Args:
      data: data-parallel size (-1 = the rest).
      expert: expert-parallel size; None = as many partitions as the experts allow.
      model: model-parallel (tensor) size.
      num_experts: experts per MoE layer (0 for a dense model); the expert axis must divide it.
      devices: devices to use; default all of `jax.devices()`.

    Raises:
      ValueError: naming the sizes and the fix, when they do not multiply to the device count or
        the expert axis does not divide the number of experts.
    """
    devices = list(jax.devices() if devices is None else devices)
    sizes = MeshConfig(data, expert, model).resolve(len(devices), num_experts)
    try:
        device_array = mesh_utils.create_device_mesh(sizes, devices=devices)
    except (ValueError, NotImplementedError, AssertionError):
        # Simulated or irregular device sets have no physical topology to follow.
        device_array = np.asarray(devices).reshape(sizes)
    return mesh_of(device_array)


def _is_spec(x) -> bool:
    return isinstance(x, PartitionSpec)


def fit_fsdp(
    logical: PartitionSpec, mesh_spec: PartitionSpec, shape: Sequence[int], sizes: Mapping
) -> PartitionSpec:
    """The mesh spec of one weight with its FSDP axes placed where they divide its shape.

    jax shards only evenly: Switch-C's d_model 2080 cannot be split over 2048 batch shards.
    In order: the WEIGHT_EMBED dim over data x expert; else another dim that no mesh axis splits
    yet, the stacked layers axis excepted (the router's 2048 experts); else the WEIGHT_EMBED dim
    over the larger single batch axis that divides it; else that dim whole (this weight is then
    replicated over the batch axes). `fsdp_sharding` first tries two dims (`split_fsdp`).
    """
    if WEIGHT_EMBED not in logical:
        return mesh_spec
    spec, i, free = _fsdp_candidates(logical, mesh_spec, shape, sizes)
    shards = math.prod(sizes[a] for a in FSDP_AXES)
    for j in [i, *sorted(free, key=lambda j: -shape[j])]:
        if shape[j] % shards == 0:
            spec[j] = FSDP_AXES
            return PartitionSpec(*spec)
    for axis in sorted(FSDP_AXES, key=lambda a: -sizes[a]):
        if sizes[axis] > 1 and shape[i] % sizes[axis] == 0:
            spec[i] = axis
            break
    return PartitionSpec(*spec)


def _fsdp_candidates(
    logical: PartitionSpec, mesh_spec: PartitionSpec, shape: Sequence[int], sizes: Mapping
) -> tuple[list, int, list[int]]:
    """(mesh spec as a list with the WEIGHT_EMBED dim cleared, that dim, the other dims no mesh
    axis splits: never the stacked layers axis, or the scan would gather every layer at once)."""
    spec = list(mesh_spec) + [None] * (len(shape) - len(mesh_spec))
    i = list(logical).index(WEIGHT_EMBED)
    spec[i] = None
    free = [
        j
        for j in range(len(shape))
        if j != i and logical[j] != "layers" and _axes_size(spec[j], sizes) == 1
    ]
    return spec, i, free


# The batch shards (data x expert, in mesh order) viewed as two axes, for weights whose batch
# shards fit only over two dims (`split_fsdp`).
FSDP_SPLIT_AXES = ("fsdp_rows", "fsdp_cols")


def split_fsdp(
    logical: PartitionSpec, mesh_spec: PartitionSpec, shape: Sequence[int], sizes: Mapping
) -> tuple[int, PartitionSpec] | None:
    """Two dims that together take all data x expert batch shards, when no single dim does.

    Switch-C on 2048 devices: attention `[15, 2080, 1920]` splits as 2080 / 32 x 1920 / 64, the
    embeddings `[32128, 2080]` as 32128 / 64 x 2080 / 32. The batch shards are viewed as a
    `(rows, cols)` grid (`fsdp_mesh`); the WEIGHT_EMBED dim is preferred, then the larger dims.

    Returns:
      (rows, spec over `fsdp_mesh(mesh, rows)`), or None (a single dim fits, no two dims do, or
      the weight already uses a batch axis elsewhere).
    """
    if WEIGHT_EMBED not in logical:
        return None
    spec, i, free = _fsdp_candidates(logical, mesh_spec, shape, sizes)
    shards = math.prod(sizes[a] for a in FSDP_AXES)
    used = _spec_axes(spec)
    if shards == 1 or used & set(FSDP_AXES) or any(shape[j] % shards == 0 for j in [i, *free]):
        return None
    dims = [i, *sorted(free, key=lambda j: -shape[j])]
    for n, j in enumerate(dims):
        for k in dims[n + 1 :]:
            for rows in sorted(_divisors(shards), reverse=True):
                if shape[j] % rows == 0 and shape[k] % (shards // rows) == 0:
                    spec[j], spec[k] = FSDP_SPLIT_AXES
                    return rows, PartitionSpec(*spec)
    return None


def _divisors(n: int) -> list[int]:
    return [d for d in range(2, n) if n % d == 0]


@functools.cache
def fsdp_mesh(mesh: Mesh, rows: int) -> Mesh:
    """`mesh` with its batch shards (data x expert) viewed as `rows` x (shards / rows): the same
    devices in the same order, so arrays on it mix with arrays on `mesh` in one jitted step."""
    if tuple(mesh.axis_names) != MESH_AXES:
        raise ValueError(f"expected a {MESH_AXES} mesh, got axes {mesh.axis_names}")
    data, expert, model = (mesh.shape[a] for a in MESH_AXES)
    devices = mesh.devices.reshape(rows, data * expert // rows, model)
    names = (*FSDP_SPLIT_AXES, "model")
    return Mesh(devices, names, axis_types=(AxisType.Auto,) * len(names))


def fsdp_sharding(logical: PartitionSpec, mesh: Mesh, shape: Sequence[int]) -> NamedSharding:
    """The NamedSharding of one param: the rules table's mesh axes, with an FSDP weight's batch
    shards placed where its shape allows (`split_fsdp` over two dims, else `fit_fsdp`)."""
    mesh_spec = nn.logical_to_mesh_axes(logical, LOGICAL_AXIS_RULES)
    sizes = dict(mesh.shape)
    split = split_fsdp(logical, mesh_spec, shape, sizes)
    if split is not None:
        rows, spec = split
        return NamedSharding(fsdp_mesh(mesh, rows), spec)
    return NamedSharding(mesh, fit_fsdp(logical, mesh_spec, shape, sizes))


def run_mesh(shardings) -> Mesh:
    """The (data, expert, model) mesh of a tree of NamedShardings (some FSDP weights live on a
    view of it, `fsdp_mesh`)."""
    for s in jax.tree.leaves(shardings):
        if isinstance(s, NamedSharding) and tuple(s.mesh.axis_names) == MESH_AXES:
            return s.mesh
    raise ValueError(f"no NamedSharding on a {MESH_AXES} mesh in this tree")


def fsdp_whole_params(logical_specs, shardings, shapes) -> int:
    """Parameters of the FSDP weights that stay whole over the batch axes: no dim, or pair of
    dims, of theirs divides into the batch shards (`fsdp_sharding`)."""
    total = 0
    for logical, sharding, leaf in zip(
        jax.tree.leaves(logical_specs, is_leaf=_is_spec),
        jax.tree.leaves(shardings),
        jax.tree.leaves(shapes),
    ):
        if WEIGHT_EMBED not in logical:
            continue
        sizes = dict(sharding.mesh.shape)
        batch_axes = _spec_axes(sharding.spec) & {*FSDP_AXES, *FSDP_SPLIT_AXES}
        if not any(sizes[a] > 1 for a in batch_axes):
            total += math.prod(leaf.shape)
    return total


def _entry_axes(entry) -> tuple[str, ...]:
    """The mesh axes of one PartitionSpec entry (None, a name, or a tuple of names)."""
    if entry is None:
        return ()
    return entry if isinstance(entry, tuple) else (entry,)


def _spec_axes(spec) -> set[str]:
    """Every mesh axis a PartitionSpec (or list of entries) uses."""
    return {a for entry in spec for a in _entry_axes(entry)}


def _axes_size(entry, sizes: Mapping) -> int:
    return math.prod(sizes[n] for n in _entry_axes(entry))


def logical_to_sharding(logical_spec, mesh: Mesh, shapes=None):
    """Maps a pytree of logical PartitionSpecs to NamedShardings on `mesh` (some FSDP weights on
    a view of it, `fsdp_mesh`).

    Args:
      logical_spec: logical PartitionSpecs (`nn.get_partition_spec` of boxed params).
      mesh: the (data, expert, model) mesh.
      shapes: the same tree of arrays or ShapeDtypeStructs; with it, FSDP weights are laid out
        where their shapes allow (`fsdp_sharding`). Without it, WEIGHT_EMBED maps as the rules say.
    """
    if shapes is None:
        return nn.logical_to_mesh_sharding(logical_spec, mesh, LOGICAL_AXIS_RULES)

    def one(logical, leaf):
        return fsdp_sharding(logical, mesh, leaf.shape)

    return jax.tree.map(one, logical_spec, shapes, is_leaf=_is_spec)


def params_shardings(abstract_variables, mesh: Mesh):
    """NamedShardings of a (boxed) variables tree from `jax.eval_shape(model.init, ...)`."""
    # The boxed values' shapes, without `nn.unbox`'s sharding constraints (which fail on
    # ShapeDtypeStructs under an active mesh).
    shapes = jax.tree.map(
        lambda x: x.value if isinstance(x, nn.Partitioned) else x,
        abstract_variables,
        is_leaf=lambda x: isinstance(x, nn.Partitioned),
    )
    return logical_to_sharding(nn.get_partition_spec(abstract_variables), mesh, shapes)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Sharding of [batch, length] input features: batch over (data, expert)."""
    return NamedSharding(mesh, PartitionSpec(("data", "expert")))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def axis_rules():
    """Context manager activating the rules table for `nn.with_logical_constraint`."""
    return nn.logical_axis_rules(LOGICAL_AXIS_RULES)
