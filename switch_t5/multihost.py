"""Multi-host training over JAX's own multi-controller runtime (`jax.distributed`).

Every host runs the same program; `jax.distributed.initialize` connects them through a
coordinator, after which `jax.devices()` lists every device of the job and jitted steps on a
global mesh run SPMD across hosts. Each host feeds only its own slice of the batch
(`jax.make_array_from_process_local_data`), and orbax writes each host's shards of a checkpoint.

Environment variables (read by `initialize_from_env`; the SLURM launcher sets them):
  JAX_COORDINATOR_ADDRESS  host:port of process 0's coordinator service (all processes).
  JAX_NUM_PROCESSES        number of processes in the job.
  JAX_PROCESS_ID           this process's id, 0 ... JAX_NUM_PROCESSES - 1.
  JAX_LOCAL_DEVICE_IDS     optional: the local devices this process uses (read by JAX itself).
  SWITCH_T5_CPU_COLLECTIVES  optional: "gloo" (or "mpi") cross-process collectives for CPU
                           devices (tests, CPU clusters); accelerators use their own (ICI/DCN,
                           NCCL).
On Cloud TPU VMs none are needed: `jax.distributed.initialize()` finds the pod's workers itself
(TPU_WORKER_HOSTNAMES); with one host nothing is initialised.

Meshes spanning several TPU slices or GPU nodes are built with
`mesh_utils.create_hybrid_device_mesh` (`make_hybrid_mesh`): the expert and model axes stay
inside a slice/node (fast ICI/NVLink for the MoE all-to-all and tensor-parallel all-reduces);
only the data axis crosses the slower data-center network (gradient all-reduce).
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Mapping, Sequence

import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import Mesh

from switch_t5 import errors, partitioning

ENV_COORDINATOR = "JAX_COORDINATOR_ADDRESS"
ENV_NUM_PROCESSES = "JAX_NUM_PROCESSES"
ENV_PROCESS_ID = "JAX_PROCESS_ID"
ENV_CPU_COLLECTIVES = "SWITCH_T5_CPU_COLLECTIVES"


class MultiHostConfigError(errors.UserError):
    """The multi-process environment variables are incomplete or inconsistent."""


def distributed_args_from_env(
    environ: Mapping[str, str] | None = None,
) -> tuple[str, int, int] | None:
    """(coordinator_address, num_processes, process_id) from the environment, or None.

    Raises:
      MultiHostConfigError: some but not all are set, or they are not valid numbers.
    """
    env = os.environ if environ is None else environ
    names = (ENV_COORDINATOR, ENV_NUM_PROCESSES, ENV_PROCESS_ID)
    present = [n for n in names if env.get(n)]
    if not present:
        return None
    if len(present) != len(names):
        missing = [n for n in names if n not in present]
        raise MultiHostConfigError(
            f"multi-process launch: {', '.join(present)} set but {', '.join(missing)} missing; "
            "set all three (the launchers in scripts/ do) or none"
        )
    address = env[ENV_COORDINATOR]
    if ":" not in address:
        raise MultiHostConfigError(
            f"{ENV_COORDINATOR}={address!r} needs a port: write host:port (e.g. node0:12345)"
        )
    try:
        num_processes, process_id = int(env[ENV_NUM_PROCESSES]), int(env[ENV_PROCESS_ID])
    except ValueError:
        raise MultiHostConfigError(
            f"{ENV_NUM_PROCESSES}={env[ENV_NUM_PROCESSES]!r} and {ENV_PROCESS_ID}="
            f"{env[ENV_PROCESS_ID]!r} must be integers"
        ) from None
    if num_processes < 1 or not 0 <= process_id < num_processes:
        raise MultiHostConfigError(
            f"{ENV_PROCESS_ID}={process_id} must be in [0, {ENV_NUM_PROCESSES}={num_processes})"
        )
    return address, num_processes, process_id


def initialize_from_env(environ: Mapping[str, str] | None = None) -> bool:
    """Calls `jax.distributed.initialize` from the variables of the module docstring.

    Must run before anything touches the devices. Returns True when this process is now part of
    a multi-process job (also when it already was), False when no variables are set.
    """
    if jax.distributed.is_initialized():
        return True
    args = distributed_args_from_env(environ)
    if args is None:
        return False
    env = os.environ if environ is None else environ
    collectives = env.get(ENV_CPU_COLLECTIVES)
    if collectives:
        if collectives not in ("gloo", "mpi"):
            raise MultiHostConfigError(f"{ENV_CPU_COLLECTIVES}={collectives!r}: use gloo or mpi")
        jax.config.update("jax_cpu_collectives_implementation", collectives)
    address, num_processes, process_id = args
    jax.distributed.initialize(
        coordinator_address=address, num_processes=num_processes, process_id=process_id
    )
    return True


def make_hybrid_mesh(
    per_slice: Sequence[int],
    num_slices: int,
    *,
    num_experts: int = 0,
    devices: Sequence[jax.Device] | None = None,
) -> Mesh:
    """A (data, expert, model) mesh over `num_slices` TPU slices or GPU nodes.

    Args:
      per_slice: (data, expert, model) sizes within one slice/node (ICI/NVLink).
      num_slices: slices (TPU multislice) or nodes/processes (GPU, CPU); the data axis is
        multiplied by it across the data-center network, nothing else crosses it.
      num_experts: experts per MoE layer; the expert axis must divide it.
      devices: default all of `jax.devices()`.

    Raises:
      ValueError: sizes that do not match the devices or the experts.
    """
    devices = list(jax.devices() if devices is None else devices)
    per_slice = tuple(int(s) for s in per_slice)
    if len(per_slice) != 3 or any(s < 1 for s in per_slice):
        raise errors.UserError(f"per_slice={per_slice}: give positive (data, expert, model) sizes")
    if math.prod(per_slice) * num_slices != len(devices):
        raise errors.UserError(
            f"per_slice {per_slice} x {num_slices} slices = {math.prod(per_slice) * num_slices} "
            f"devices, but there are {len(devices)}; the per-slice sizes must multiply to "
            f"{len(devices) // max(num_slices, 1)}"
        )
    if num_experts and num_experts % per_slice[1]:
        raise errors.UserError(
            f"the expert axis ({per_slice[1]}) does not divide num_experts={num_experts}"
        )
    dcn = (num_slices, 1, 1)
    # Multi-slice TPU devices carry distinct slice indices; elsewhere (GPU nodes, CPU hosts)
    # each process is one granule.
    granule_is_process = len({getattr(d, "slice_index", 0) for d in devices}) == 1
    device_array = mesh_utils.create_hybrid_device_mesh(
        per_slice,
        dcn,
        devices=devices,
        process_is_granule=granule_is_process,
        allow_split_physical_axes=True,
    )
    return partitioning.mesh_of(device_array)


def _granules(devices: Sequence[jax.Device]) -> list[list[jax.Device]]:
    """Devices grouped by TPU slice when there are several, else by process (node/host)."""
    slices = {getattr(d, "slice_index", 0) for d in devices}
    key = (lambda d: d.slice_index) if len(slices) > 1 else (lambda d: d.process_index)
    groups: dict[int, list[jax.Device]] = {}
    for d in devices:
        groups.setdefault(key(d), []).append(d)
    return list(groups.values())


def make_mesh_for_job(
    data: int = -1,
    expert: int | None = None,
    model: int = 1,
    *,
    num_experts: int = 0,
    devices: Sequence[jax.Device] | None = None,
) -> Mesh:
    """The training mesh: `partitioning.make_mesh` on one slice/host, a hybrid mesh otherwise.

    With several TPU slices or several processes (GPU nodes, CPU hosts), the expert and model
    axes are laid inside each one and the data axis across them (`make_hybrid_mesh`); `data`
    (or -1) is the total over all of them, `expert=None` picks as many expert partitions as one
    slice and the experts allow.

    Raises:
      ValueError: expert x model does not fit inside one slice/node, or sizes do not match.
    """
    devices = list(jax.devices() if devices is None else devices)
    mesh_config = partitioning.MeshConfig(data, expert, model)  # validates the sizes
    granules = _granules(devices)
    if len(granules) == 1:
        return partitioning.make_mesh(data, expert, model, num_experts=num_experts, devices=devices)
    per = len(granules[0])
    if any(len(g) != per for g in granules):
        raise ValueError(
            f"slices/processes hold different device counts: {[len(g) for g in granules]}"
        )
    per_slice = per_slice_sizes(mesh_config, per, len(granules), num_experts)
    return make_hybrid_mesh(per_slice, len(granules), num_experts=num_experts, devices=devices)


def per_slice_sizes(
    mesh_config: partitioning.MeshConfig, per: int, num_slices: int, num_experts: int = 0
) -> tuple[int, int, int]:
    """(data, expert, model) inside one of `num_slices` slices/nodes of `per` devices each, for
    a job mesh whose data axis (`mesh_config.data`, -1 = the rest) spans all of them.

    Raises:
      UserError: expert x model does not fit inside one slice/node, or data is not the total.
    """
    data, expert, model = mesh_config.data, mesh_config.expert, mesh_config.model
    if expert is None:
        expert = partitioning.default_expert_size(per, num_experts, model)
    if -1 in (expert, model):
        raise errors.UserError(
            f"expert={expert}, model={model}: on {num_slices} slices/nodes give the expert and "
            "model sizes inside one of them (positive; only data may be -1)"
        )
    if per % (expert * model):
        raise errors.UserError(
            f"expert x model = {expert} x {model} does not fit inside one slice/node of {per} "
            f"devices; the expert all-to-all and model axis must stay on ICI/NVLink: use "
            f"expert x model dividing {per}"
        )
    # Inside one slice/node the data axis takes what expert x model leave.
    sizes = dataclasses.replace(mesh_config, data=-1, expert=expert).resolve(per, num_experts)
    if data not in (-1, sizes[0] * num_slices):
        raise errors.UserError(
            f"data={data}: with expert x model = {expert * model} per slice/node of {per} "
            f"devices and {num_slices} of them, data must be {sizes[0] * num_slices} (or -1)"
        )
    return sizes


def axis_stays_within_granules(mesh: Mesh, axis: str) -> bool:
    """True when every group of devices along `axis` lies inside one process (node/slice)."""
    names = list(mesh.axis_names)
    moved = np.moveaxis(np.asarray(mesh.devices), names.index(axis), -1)
    return all(
        len({d.process_index for d in group}) == 1 for group in moved.reshape(-1, moved.shape[-1])
    )
