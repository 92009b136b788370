"""The device mesh (data, expert, model) and the ONE logical-axis rules table.

Every parameter and key activation carries logical axis names (flax `nn.with_logical_partitioning`
and `nn.with_logical_constraint`); this table is the only place that maps them onto mesh axes.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import numpy as np
from flax import linen as nn
from jax.experimental import mesh_utils
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from switch_t5 import errors

MESH_AXES = ("data", "expert", "model")

# d_model of a non-expert weight under FSDP (see the last rule).
WEIGHT_EMBED = "weight_embed"

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
    # logits), split over the batch axes; GSPMD all-gathers each layer's slice before use and
    # reduce-scatters its gradient. A name of its own: "embed" also names activations, expert
    # kernels and the all-to-all buffers, which must stay whole on d_model.
    (WEIGHT_EMBED, ("data", "expert")),
)


# FSDP turns itself on from this many non-expert parameters (`SwitchConfig.fsdp=None`).
FSDP_AUTO_MIN_PARAMS = 500_000_000


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
    return n


def fsdp_enabled(config) -> bool:
    """`config.fsdp`, or (None) whether the non-expert params reach FSDP_AUTO_MIN_PARAMS."""
    if config.fsdp is not None:
        return bool(config.fsdp)
    return non_expert_params(config) >= FSDP_AUTO_MIN_PARAMS


def weight_embed_axis(config) -> str:
    """The logical name of d_model on a non-expert weight: WEIGHT_EMBED with FSDP, else "embed"."""
    return WEIGHT_EMBED if fsdp_enabled(config) else "embed"


def logical_rules() -> tuple[tuple[str, str | tuple[str, ...] | None], ...]:
    return LOGICAL_AXIS_RULES


def _resolve_sizes(sizes: Sequence[int], num_devices: int) -> tuple[int, ...]:
    sizes = tuple(int(s) for s in sizes)
    unknown = [i for i, s in enumerate(sizes) if s == -1]
    if len(unknown) > 1:
        raise errors.UserError(
            f"mesh sizes {dict(zip(MESH_AXES, sizes))}: at most one axis may be -1"
        )
    if any(s == 0 or s < -1 for s in sizes):
        raise errors.UserError(
            f"mesh sizes {dict(zip(MESH_AXES, sizes))}: sizes must be positive "
            "(or -1 for 'the rest')"
        )
    known = math.prod(s for s in sizes if s != -1)
    if unknown:
        if num_devices % known:
            raise errors.UserError(
                f"mesh sizes {dict(zip(MESH_AXES, sizes))}: the fixed axes multiply to {known}, "
                f"which does not divide the {num_devices} devices; pick sizes whose product "
                f"divides {num_devices}"
            )
        sizes = tuple(num_devices // known if s == -1 else s for s in sizes)
    if math.prod(sizes) != num_devices:
        raise errors.UserError(
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
    n = len(devices)
    if expert is None:
        if model != -1 and n % max(model, 1):
            raise errors.UserError(
                f"model={model} does not divide the {n} devices; pick a divisor of {n}"
            )
        expert = default_expert_size(n, num_experts, model if model > 0 else 1)
    sizes = _resolve_sizes((data, expert, model), n)
    if num_experts and num_experts % sizes[1]:
        raise errors.UserError(
            f"the expert mesh axis ({sizes[1]}) does not divide num_experts={num_experts}; use an "
            f"expert axis size that divides {num_experts} (e.g. {math.gcd(sizes[1], num_experts)})"
        )
    try:
        device_array = mesh_utils.create_device_mesh(sizes, devices=devices)
    except (ValueError, NotImplementedError, AssertionError):
        # Simulated or irregular device sets have no physical topology to follow.
        device_array = np.asarray(devices).reshape(sizes)
    return mesh_of(device_array)


def logical_to_sharding(logical_spec, mesh: Mesh):
    """Maps a pytree of logical PartitionSpecs to NamedShardings on `mesh`."""
    return nn.logical_to_mesh_sharding(logical_spec, mesh, LOGICAL_AXIS_RULES)


def params_shardings(abstract_variables, mesh: Mesh):
    """NamedShardings of a (boxed) variables tree from `jax.eval_shape(model.init, ...)`."""
    return logical_to_sharding(nn.get_partition_spec(abstract_variables), mesh)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Sharding of [batch, length] input features: batch over (data, expert)."""
    return NamedSharding(mesh, PartitionSpec(("data", "expert")))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def axis_rules():
    """Context manager activating the rules table for `nn.with_logical_constraint`."""
    return nn.logical_axis_rules(LOGICAL_AXIS_RULES)
