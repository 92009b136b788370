"""Plan a model before running it: parameter counts, then the compiled train step's memory.

  python -m switch_t5.plan --gin_file=configs/models/switch_base_8.gin [--gin.NUM_EXPERTS=64]
  python -m switch_t5.plan --gin_file=configs/models/switch_c_2048.gin --devices=2048 \
      [--mesh=data:D,expert:E,model:M] [--hbm_gib=16] [--accelerator=tpu|gpu]
      [--batch=2048 --inputs_length=512 --targets_length=114] [--num_microbatches=1]

Without --devices/--mesh/--hbm_gib only the parameter counts are printed: the model is
initialised abstractly (`jax.eval_shape`), so even Switch-C (1.6T parameters) is counted on a
laptop in seconds.

With them, the REAL train step (`trainer.make_train_step`: forward, loss, backward, the
optimizer update, with the state and batch shardings training uses) is compiled for N simulated
CPU devices in a subprocess that sets `--xla_force_host_platform_device_count=N` before jax is
imported. Nothing is allocated: inputs are `ShapeDtypeStruct`s. The report gives, per device,
the parameter and optimizer-state bytes (exact, from the shardings), the compiler's temporary
bytes and the total (`per_device_gib`: an estimate by XLA's CPU compiler; TPU/GPU compilers fuse
and schedule differently), train FLOPs per token, and the collectives the partitioned program
runs per step (ops inside the scanned layer loop counted once per iteration).

Without --mesh a mesh is recommended: the smallest model (tensor) axis whose estimated memory
fits, then as many expert partitions as the experts allow. Big configs are compiled with
`scan_layers` (one dense/sparse block compiled, not every layer) unless --scan=off.

Exits non-zero, naming the fix, when the mesh does not fit the config or the batch, or when the
total exceeds --hbm_gib (on GPUs, of which XLA preallocates only --gpu_mem_fraction, default
0.75 as XLA_PYTHON_CLIENT_MEM_FRACTION).

Library functions return plain data (`ModelPlan`, `StepPlan`); `main` only formats it.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import os
import re
import subprocess
import sys
import threading
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from switch_t5 import errors, gin_utils, network
from switch_t5 import flops as flops_lib
from switch_t5.config import REMAT_POLICIES, SwitchConfig


@dataclasses.dataclass(frozen=True)
class ModelPlan:
    """Parameter counts of one model config.

    Attributes:
      total_params: every parameter.
      active_params_per_token: what one token touches (all non-expert params, embeddings,
        routers and shared experts included, plus `num_selected_experts` routed experts of width
        `expert_width` per sparse layer).
      expert_params: parameters inside the routed experts, all layers and experts together
        (shared experts, which every token uses, are not among them).
      embedding_params: the token embedding (and the untied output projection).
      encoder_sparse_layers: sparse encoder layer indices.
      decoder_sparse_layers: sparse decoder layer indices.
      param_bytes: total_params in the config's param dtype.
    """

    total_params: int
    active_params_per_token: int
    expert_params: int
    embedding_params: int
    encoder_sparse_layers: tuple[int, ...]
    decoder_sparse_layers: tuple[int, ...]
    param_bytes: int


def plan_model(config: SwitchConfig) -> ModelPlan:
    """Counts the parameters of `config`'s model from its abstractly initialised param tree."""
    params = network.init_abstract(config)["params"]
    embedding = network.param_count(params["token_embedder"])
    if "logits_dense" in params["decoder"]:
        embedding += network.param_count(params["decoder"]["logits_dense"])
    total = network.param_count(params)
    return ModelPlan(
        total_params=total,
        active_params_per_token=network.active_params_per_token(config, params),
        expert_params=network.expert_param_count(params, config),
        embedding_params=embedding,
        encoder_sparse_layers=config.sparse_layers("encoder"),
        decoder_sparse_layers=config.sparse_layers("decoder"),
        param_bytes=total * np.dtype(config.param_dtype).itemsize,
    )


def _human(n: float) -> str:
    for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.4g}{unit}"
    return str(n)


def _expert_shape(c: SwitchConfig) -> str:
    """ ", top-3 of width 64, 1 shared": what differs from Switch's top-1 experts of width d_ff."""
    if not c.num_experts:
        return ""
    text = f", top-{c.num_selected_experts}" if c.num_selected_experts != 1 else ""
    text += f" of width {c.expert_width}" if c.expert_width != c.d_ff else ""
    return text + (f", {c.num_shared_experts} shared" if c.num_shared_experts else "")


def format_model_plan(config: SwitchConfig, plan: ModelPlan) -> list[str]:
    """`key: value` lines; exact integers first so that scripts can parse them."""
    c = config
    return [
        f"total_params: {plan.total_params}",
        f"active_params_per_token: {plan.active_params_per_token}",
        f"expert_params: {plan.expert_params}",
        f"embedding_params: {plan.embedding_params}",
        f"param_bytes: {plan.param_bytes}",
        f"summary: {_human(plan.total_params)} params, {_human(plan.active_params_per_token)} "
        f"active per token, {plan.param_bytes / 2**30:.1f} GiB of {c.param_dtype} weights",
        f"layers: encoder {c.num_encoder_layers}, decoder {c.num_decoder_layers}; d_model "
        f"{c.d_model}, heads {c.num_heads} x {c.head_dim}, d_ff {c.d_ff}, "
        f"activations {'-'.join(c.mlp_activations)}, vocab {c.vocab_size}, "
        f"logits {'tied' if c.logits_via_embedding else 'untied'}",
        f"experts: {c.num_experts}{_expert_shape(c)}; sparse encoder layers "
        f"{list(plan.encoder_sparse_layers)}, sparse decoder layers "
        f"{list(plan.decoder_sparse_layers)}",
    ]


# ---------------------------------------------------------------------------------------------
# The compiled train step: mesh checks, recommendation, memory and collectives.
# ---------------------------------------------------------------------------------------------

MESH_AXES = ("data", "expert", "model")
# The paper's batch: 2048 sequences, 2^20 input tokens per step (arXiv 2101.03961 sec. 2.4),
# with T5's span-corruption target length.
PAPER_BATCH, PAPER_INPUTS_LENGTH, PAPER_TARGETS_LENGTH = 2048, 512, 114
# XLA preallocates this fraction of each GPU's memory (XLA_PYTHON_CLIENT_MEM_FRACTION).
GPU_DEFAULT_MEM_FRACTION = 0.75
COLLECTIVES = ("all-to-all", "all-gather", "reduce-scatter", "all-reduce", "collective-permute")
_WORKER_TAG = "SWITCH_T5_PLAN_RESULT "
_ERROR_TAG = "SWITCH_T5_PLAN_ERROR "


class PlanError(errors.UserError):
    """The mesh does not fit the config or the batch, or the step does not fit in memory."""


@dataclasses.dataclass(frozen=True)
class StepSpec:
    """What one train step processes, and with which optimizer.

    Attributes:
      batch: global sequences per step.
      inputs_length: encoder tokens per sequence.
      targets_length: decoder tokens per sequence.
      num_microbatches: gradient accumulation steps per optimizer step.
      optimizer: "adafactor" or "adamw".
      optimizer_state_dtype: "float32" or "bfloat16" (see `optim.make_optimizer`).
    """

    batch: int = PAPER_BATCH
    inputs_length: int = PAPER_INPUTS_LENGTH
    targets_length: int = PAPER_TARGETS_LENGTH
    num_microbatches: int = 1
    optimizer: str = "adafactor"
    optimizer_state_dtype: str = "float32"


@dataclasses.dataclass(frozen=True)
class StepPlan:
    """What the compiled train step needs per device (bytes) and runs per step.

    Attributes:
      mesh: {"data": D, "expert": E, "model": M}.
      devices: simulated devices it was compiled for.
      param_bytes: parameters on one device (exact, from the shardings).
      optimizer_bytes: optimizer state on one device (exact, from the shardings).
      argument_bytes: all inputs of the step on one device (state and batch).
      output_bytes: outputs (the new state is donated: aliased to the inputs).
      alias_bytes: outputs that reuse input buffers.
      temp_bytes: the CPU compiler's temporaries (activations, gradients, workspace).
      total_bytes: argument + output - alias + temp.
      collectives: per op kind, how many the partitioned program runs per step.
      all_to_all_dtypes: element types of the all-to-alls (the MoE dispatch and combine).
      expert_kernel_all_gathers: all-gathers that rebuild (part of) an expert kernel beyond the
        device's own slice (`count_expert_kernel_gathers`); 0 = every device keeps its experts.
      compile_seconds: wall time of lowering and compiling.
      gradient_bytes: the gradients on one device (the params' shardings, in the param dtype);
        they live among the temporaries.
      fsdp: whether the non-expert weights were sharded over the batch axes (`SwitchConfig.fsdp`).
      collective_bytes: per op kind, the bytes its results move per step (one device's view);
        "reduce-scatter" counts XLA:CPU's all-reduce + dynamic-slice pairs (it emits no
        reduce-scatter), which are then left out of "all-reduce".
      setup_seconds, lower_seconds, xla_compile_seconds: the split of the wall time.
      teacher_param_bytes: distillation's frozen teacher on one device (an input of the step,
        counted in argument_bytes and the total); 0 without a teacher.
      fsdp_whole_params: FSDP weights' parameters that stay whole over the batch axes (no dim
        divides into the batch shards; `partitioning.fsdp_whole_params`).
    """

    mesh: dict[str, int]
    devices: int
    param_bytes: int
    optimizer_bytes: int
    argument_bytes: int
    output_bytes: int
    alias_bytes: int
    temp_bytes: int
    total_bytes: int
    collectives: dict[str, int]
    all_to_all_dtypes: list[str]
    expert_kernel_all_gathers: int
    compile_seconds: float
    gradient_bytes: int = 0
    fsdp: bool = False
    collective_bytes: dict[str, int] = dataclasses.field(default_factory=dict)
    setup_seconds: float = 0.0
    lower_seconds: float = 0.0
    xla_compile_seconds: float = 0.0
    teacher_param_bytes: int = 0
    fsdp_whole_params: int = 0


def parse_mesh(text: str) -> dict[str, int]:
    """ "data:8,expert:64,model:4" -> sizes; axes left out are 1; one axis may be -1 (the rest)."""
    sizes = {a: 1 for a in MESH_AXES}
    seen = set()
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, sep, value = part.partition(":")
        name = name.strip()
        if not sep or name not in sizes or name in seen:
            raise PlanError(
                f"--mesh={text!r}: write data:D,expert:E,model:M (each axis at most once)"
            )
        try:
            sizes[name] = int(value)
        except ValueError:
            raise PlanError(f"--mesh={text!r}: {name} size {value!r} is not an integer") from None
        seen.add(name)
    return sizes


def resolve_mesh(sizes: Mapping[str, int], devices: int | None) -> tuple[dict[str, int], int]:
    """Fills a -1 axis and checks the product against the device count
    (`partitioning.MeshConfig.resolve`)."""
    from switch_t5 import partitioning

    try:
        mesh_config = partitioning.MeshConfig(**sizes)
        if devices is None:
            if -1 in sizes.values():
                raise PlanError(f"mesh {dict(sizes)}: a -1 axis needs --devices=N")
            return dict(sizes), math.prod(sizes.values())
        product = math.prod(sizes.values())
        if -1 not in sizes.values() and product != devices:
            raise PlanError(
                f"mesh data:{sizes['data']},expert:{sizes['expert']},model:{sizes['model']} has "
                f"{product} devices but --devices={devices}; make the product {devices}"
            )
        resolved = dict(zip(MESH_AXES, mesh_config.resolve(devices)))
    except partitioning.MeshConfigError as e:
        raise PlanError(str(e)) from None
    return resolved, devices


def _fit_problems(config: SwitchConfig, mesh: Mapping[str, int], spec: StepSpec) -> list[str]:
    """`partitioning.mesh_problems` for a StepSpec's batch."""
    from switch_t5 import partitioning

    lengths = {"inputs": spec.inputs_length, "targets": spec.targets_length}
    return partitioning.mesh_problems(config, mesh, spec.batch, spec.num_microbatches, lengths)


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def estimate_state_bytes(
    config: SwitchConfig, model_plan: ModelPlan, mesh: Mapping[str, int], optimizer: str
) -> int:
    """A quick per-device estimate of params + optimizer state, used to rank meshes.

    Experts split over expert x model, everything else over model (embed stays whole), and with
    FSDP over data x expert too (as if every weight split evenly); Adafactor keeps ~1/d_model of a
    matrix, AdamW two float32 moments.
    """
    from switch_t5 import partitioning

    itemsize = np.dtype(config.param_dtype).itemsize
    dense = model_plan.total_params - model_plan.expert_params
    if partitioning.fsdp_enabled(config, mesh):
        dense /= mesh["data"] * mesh["expert"]
    per_device = dense / mesh["model"] + model_plan.expert_params / (mesh["expert"] * mesh["model"])
    state = per_device * (8 if optimizer == "adamw" else 4 / min(config.d_model, config.d_ff) * 2)
    return int(per_device * itemsize + state)


def recommend_meshes(
    config: SwitchConfig,
    model_plan: ModelPlan,
    devices: int,
    spec: StepSpec,
    usable_bytes: float | None,
) -> list[dict[str, int]]:
    """Meshes that fit the config, best first.

    Order: estimated params + optimizer state within half the usable memory first (the other
    half is left to activations and temporaries), then the smallest model axis (tensor
    parallelism adds per-layer all-reduces), then the largest expert axis (experts spread, fewer
    per device), then whatever is left as data parallelism.

    Raises:
      PlanError: no mesh of `devices` devices fits (with the reasons for the plain ones).
    """
    found = []
    for model in _divisors(devices):
        for expert in _divisors(devices // model):
            mesh = {"data": devices // (model * expert), "expert": expert, "model": model}
            if not _fit_problems(config, mesh, spec):
                found.append(mesh)
    if not found:
        plain = {"data": devices, "expert": 1, "model": 1}
        if config.num_experts:
            plain = {
                "data": devices // math.gcd(devices, config.num_experts),
                "expert": math.gcd(devices, config.num_experts),
                "model": 1,
            }
        raise PlanError(
            f"no (data, expert, model) mesh of {devices} devices fits this config and batch; "
            f"e.g. data:{plain['data']},expert:{plain['expert']},model:1: "
            + "; ".join(_fit_problems(config, plain, spec))
        )

    def key(mesh):
        estimate = estimate_state_bytes(config, model_plan, mesh, spec.optimizer)
        fits = usable_bytes is None or estimate <= usable_bytes / 2
        return (not fits, mesh["model"], -mesh["expert"])

    return sorted(found, key=key)


def split_computations(hlo_text: str) -> tuple[dict[str, list[str]], str]:
    """The computations of an HLO module's text ({name: body lines}) and the ENTRY one's name."""
    computations: dict[str, list[str]] = {}
    entry, current = None, None
    for line in hlo_text.splitlines():
        head = re.match(r"^(ENTRY\s+)?%?([\w.\-]+)\s.*\{\s*$", line)
        if head and not line.startswith(" "):
            current = head.group(2)
            computations[current] = []
            if head.group(1):
                entry = current
        elif current is not None:
            computations[current].append(line)
    if entry is None:
        raise ValueError("no ENTRY computation in the HLO text")
    return computations, entry


def count_collectives(hlo_text: str) -> tuple[dict[str, int], list[str]]:
    """Collectives executed per step by a compiled (SPMD-partitioned) HLO module.

    Ops in a while body (the scanned layers, microbatch accumulation) count once per iteration
    (XLA's `known_trip_count`); async pairs count once (`-start`). XLA:CPU emits no
    reduce-scatter: its all-reduce + slice pairs count as one (`scattered_all_reduces`).

    Returns:
      ({op kind: count}, sorted element types of the all-to-alls).
    """
    op_re = re.compile(
        r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(\(?[a-z0-9]+)\[.*?\s("
        + "|".join(COLLECTIVES)
        + r")(-start)?\("
    )
    computations, entry = split_computations(hlo_text)
    dtypes: set[str] = set()
    memo: dict[str, dict[str, int]] = {}

    def count(name: str, depth: int = 0) -> dict[str, int]:
        if name in memo:
            return memo[name]
        totals = dict.fromkeys(COLLECTIVES, 0)
        if depth > 64 or name not in computations:
            return totals
        scattered = scattered_all_reduces(computations[name], computations)
        for line in computations[name]:
            op = op_re.search(line)
            if op:
                kind = op.group(3)
                if op.group(1) in scattered:
                    # A combined all-reduce counts as the kind that moves most of its bytes.
                    split = _split_bytes(line.split("=", 1)[1], scattered[op.group(1)])
                    kind = "reduce-scatter" if split[0] >= split[1] else kind
                totals[kind] += 1
                if kind == "all-to-all":
                    dtypes.add(op.group(2).lstrip("("))
            trips = 1
            trip = re.search(r'"known_trip_count":\{"n":"(\d+)"', line)
            if trip:
                trips = int(trip.group(1))
            for callee in re.findall(r"(?:body|calls)=%?([\w.\-]+)", line):
                for k, v in count(callee, depth + 1).items():
                    totals[k] += v * (trips if f"body=%{callee}" in line else 1)
            for group in re.findall(r"branch_computations=\{([^}]*)\}", line):
                for callee in re.findall(r"%?([\w.\-]+)", group):
                    for k, v in count(callee, depth + 1).items():
                        totals[k] += v
        memo[name] = totals
        return totals

    return count(entry), sorted(dtypes)


def count_expert_kernel_gathers(
    hlo_text: str, config: SwitchConfig, mesh: Mapping[str, int]
) -> int:
    """All-gather ops (static count) whose result is an expert kernel larger than the local slice.

    An expert kernel is [E', d_model, F'] (wi) or [E', F', d_model] (wo), optionally behind a
    stacked layers axis; its device slice is E / expert x d_ff / model. A gather to any larger
    E' (<= E) or F' (<= d_ff) rebuilds experts the device does not own (what a dispatch that
    indexes the expert axis by data can make the partitioner do).
    """
    if not config.num_experts:
        return 0
    e, d, f = config.num_experts, config.d_model, config.expert_width
    e_local, f_local = e // mesh["expert"], f // mesh["model"]
    count = 0
    gather_re = r"=\s*\(?[a-z0-9]+\[([\d,]*)\][^\n]*?\sall-gather(?:-start)?\("
    for shape in re.findall(gather_re, hlo_text):
        dims = [int(s) for s in shape.split(",") if s]
        if len(dims) < 3:
            continue
        e2, a, b = dims[-3:]
        f2 = b if a == d else a if b == d else None
        if f2 is None or not (e_local <= e2 <= e and f_local <= f2 <= f):
            continue
        if e2 > e_local or f2 > f_local:
            count += 1
    return count


_DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "bf16": 2, "f16": 2, "s16": 2, "u16": 2}


def _shape_bytes(text: str) -> int:
    """Bytes of the HLO shapes in `text` ("f32[8,3]" or a tuple of them)."""
    total = 0
    for dtype, dims in re.findall(r"([a-z]+\d*)\[([\d,]*)\]", text):
        size = int(np.prod([int(d) for d in dims.split(",") if d])) if dims else 1
        total += size * _DTYPE_BYTES.get(dtype, 8 if dtype.endswith("64") else 4)
    return total


def _group_size(line: str) -> int | None:
    """Devices per replica group of a collective's HLO line (None: not stated)."""
    iota = re.search(r"replica_groups=\[(\d+),(\d+)\]<=", line)
    if iota:
        return int(iota.group(2))
    listed = re.search(r"replica_groups=\{\{([\d,]*)\}", line)
    if listed:
        return len(listed.group(1).split(","))
    named = re.search(r"replica_groups=mesh\[([^\]]*)\]\s*\{([^}]*)\}", line)
    if named:
        sizes = dict(re.findall(r"'(\w+)'=(\d+)", named.group(1)))
        return math.prod(int(sizes[a]) for a in re.findall(r"'(\w+)'", named.group(2)))
    return None


def _elements(shape_text: str) -> int:
    dims = re.match(r"\(?[a-z0-9]+\[([\d,]*)\]", shape_text)
    return int(np.prod([int(d) for d in dims.group(1).split(",") if d])) if dims else 0


def _operands(line: str) -> list[str]:
    """Operand names of an HLO instruction line, in order."""
    args = line.split("(", 1)[1] if "(" in line else ""
    return re.findall(r"%([\w.\-]+)", args.split("), ")[0])


def _keeps_part(
    user: str, operand: str, ops: Mapping, computations: Mapping, keep: Callable[[int], bool]
) -> bool:
    """Whether `user` only takes a dynamic-slice of `operand` (directly, or inside its fusion,
    behind converts) whose element count `keep` accepts."""
    shape, opcode, line = ops[user]
    if opcode == "dynamic-slice":
        return _operands(line)[:1] == [operand] and keep(_elements(shape))
    callee = re.search(r"calls=%?([\w.\-]+)", line)
    if opcode != "fusion" or not callee:
        return False
    fused, fused_users = _index(computations.get(callee.group(1), []))
    params = {
        int(m.group(1)): name
        for name, (_, op, text) in fused.items()
        if op == "parameter" and (m := re.search(r"parameter\((\d+)\)", text))
    }
    names = [params.get(i) for i, o in enumerate(_operands(line)) if o == operand]
    return bool(names) and all(
        n and _uses_keep_part(n, fused, fused_users, computations, keep, inside=True) for n in names
    )


_PASS_THROUGH = frozenset({"parameter", "convert", "bitcast", "copy"})


def _passes_through(user: str, operand: str, ops: Mapping, computations: Mapping) -> bool:
    """Whether `user` only re-types or re-lays `operand` (a convert, bitcast or copy, or a
    fusion of those): the dtype converts XLA:CPU puts around its float32 collectives."""
    _, opcode, line = ops[user]
    if opcode in ("convert", "bitcast", "copy"):
        return True
    callee = re.search(r"calls=%?([\w.\-]+)", line)
    if opcode != "fusion" or _operands(line) != [operand] or not callee:
        return False
    body = "\n".join(computations.get(callee.group(1), []))
    return set(re.findall(r"= \S+ ([a-z\-]+)\(", body)) <= _PASS_THROUGH


def _uses_keep_part(
    name: str,
    ops: Mapping,
    users: Mapping,
    computations: Mapping,
    keep,
    depth: int = 0,
    inside: bool = False,
) -> bool:
    """Whether every use of `name` keeps one device's part of it (`_keeps_part`), looking
    through converts and bitcasts (`inside` a fusion: through its converts, bitcasts and
    copies to a dynamic-slice)."""
    uses = users.get(name, [])
    if not uses or depth > 6:
        return False
    for user in uses:
        _, opcode, line = ops[user]
        if inside and opcode == "dynamic-slice":
            if _operands(line)[:1] != [name] or not keep(_elements(ops[user][0])):
                return False
        elif (inside and opcode in ("convert", "bitcast", "copy")) or (
            not inside and _passes_through(user, name, ops, computations)
        ):
            if not _uses_keep_part(user, ops, users, computations, keep, depth + 1, inside):
                return False
        elif inside or not _keeps_part(user, name, ops, computations, keep):
            return False
    return True


def _index(lines: Sequence[str]) -> tuple[dict, dict]:
    """({name: (shape, opcode, line)}, {name: [users]}) of one computation's instructions."""
    defined = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(\([^()]*\)|\S+)\s+([\w\-]+)\(")
    ops, users = {}, {}
    for line in lines:
        m = defined.match(line)
        if m:
            ops[m.group(1)] = (m.group(2), m.group(3), line)
            for operand in set(_operands(line)):
                users.setdefault(operand, []).append(m.group(1))
    return ops, users


def scattered_all_reduces(lines: Sequence[str], computations: Mapping[str, list[str]]) -> dict:
    """The all-reduces of one computation that act as reduce-scatters: {name: indexes of the
    scattered results} (index 0 for a single result, tuple indexes for combined all-reduces).

    XLA:CPU never emits reduce-scatter: a gradient reduced onto sharded weights (FSDP) becomes
    an all-reduce whose every use keeps one device's part: a dynamic-slice, directly or inside
    a fusion, of 1/(devices per replica group) of it (some smaller exact part when the HLO text
    does not state the group), possibly behind the converts that XLA:CPU adds because it runs
    bfloat16 collectives in float32.
    """
    ops, users = _index(lines)
    found = {}
    for name, (shape, opcode, line) in ops.items():
        if opcode != "all-reduce":
            continue
        group = _group_size(line)
        parts = {0: name}
        if shape.startswith("("):
            parts = {}
            for u in users.get(name, []):
                index = re.search(r"index=(\d+)", ops[u][2])
                if ops[u][1] == "get-tuple-element" and index:
                    parts[int(index.group(1))] = u
        scattered = set()
        for i, part in parts.items():
            n = _elements(ops[part][0]) if part != name else _elements(shape)

            def keep(k: int, n: int = n, group: int | None = group) -> bool:
                return k * group == n if group else 0 < k < n and n % k == 0

            if _uses_keep_part(part, ops, users, computations, keep):
                scattered.add(i)
        if scattered:
            found[name] = scattered
    return found


def _split_bytes(shape_text: str, indexes: set) -> tuple[int, int]:
    """(bytes of the results at `indexes`, bytes of the others) of a (tuple) result shape."""
    shapes = re.findall(r"[a-z]+\d*\[[\d,]*\]", shape_text.split(" all-reduce(")[0])
    sizes = [_shape_bytes(x) for x in shapes]
    chosen = sum(n for i, n in enumerate(sizes) if i in indexes)
    return chosen, sum(sizes) - chosen


def collective_bytes(hlo_text: str) -> dict[str, int]:
    """Bytes the collectives of a compiled HLO module produce per step, per op kind (results of
    ops in while bodies count once per iteration). XLA:CPU's all-reduce + slice pairs
    (`scattered_all_reduces`) count as "reduce-scatter", at the all-reduce's (unscattered) size.
    """
    op_re = re.compile(
        r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(.*?)\s(" + "|".join(COLLECTIVES) + r")(-start)?\("
    )
    computations, entry = split_computations(hlo_text)
    memo: dict[str, dict[str, int]] = {}

    def walk(name: str, depth: int = 0) -> dict[str, int]:
        if name in memo:
            return memo[name]
        totals: dict[str, int] = {}
        if depth > 64 or name not in computations:
            return totals
        lines = computations[name]
        scattered = scattered_all_reduces(lines, computations)
        for line in lines:
            op = op_re.search(line)
            if op:
                moved = {op.group(3): _shape_bytes(op.group(2))}
                if op.group(1) in scattered:
                    split = _split_bytes(op.group(2), scattered[op.group(1)])
                    moved = {"reduce-scatter": split[0], "all-reduce": split[1]}
                for kind, n in moved.items():
                    if n:
                        totals[kind] = totals.get(kind, 0) + n
            trip = re.search(r'"known_trip_count":\{"n":"(\d+)"', line)
            trips = int(trip.group(1)) if trip else 1
            for callee in re.findall(r"(?:body|calls)=%?([\w.\-]+)", line):
                times = trips if f"body=%{callee}" in line else 1
                for k, v in walk(callee, depth + 1).items():
                    totals[k] = totals.get(k, 0) + v * times
            for group in re.findall(r"branch_computations=\{([^}]*)\}", line):
                for callee in re.findall(r"%?([\w.\-]+)", group):
                    for k, v in walk(callee, depth + 1).items():
                        totals[k] = totals.get(k, 0) + v
        memo[name] = totals
        return totals

    return walk(entry)


def _sharded_bytes(tree: Any) -> int:
    import jax

    total = 0
    for leaf in jax.tree.leaves(tree):
        shape = leaf.sharding.shard_shape(leaf.shape) if leaf.sharding is not None else leaf.shape
        total += int(np.prod(shape)) * np.dtype(leaf.dtype).itemsize
    return total


def _rss_gb() -> float:
    """This process's resident memory in GB (0 where /proc is missing)."""
    try:
        with open("/proc/self/status") as f:
            kb = next(int(x.split()[1]) for x in f if x.startswith("VmRSS:"))
    except (OSError, StopIteration):
        return 0.0
    return kb / 1e6


@contextlib.contextmanager
def _progress(what: str, since: float, every: float = 60.0):
    """Prints "plan: <what>, N s so far (RSS G GB)" every `every` seconds until the block ends:
    a Switch-C compile for 2048 devices takes tens of minutes."""
    import time

    done = threading.Event()

    def beat() -> None:
        while not done.wait(every):
            print(
                f"plan: {what}, {time.perf_counter() - since:.0f} s so far "
                f"(RSS {_rss_gb():.1f} GB)",
                file=sys.stderr,
                flush=True,
            )

    thread = threading.Thread(target=beat, daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join()


def _lower_and_compile(run: Any, batch: Any, mesh: Any, t1: float):
    """(compiled step, time lowering ended, time compiling ended) of `run`'s train step."""
    import time

    import jax

    from switch_t5 import partitioning

    with jax.set_mesh(mesh), partitioning.axis_rules():
        lowered = run.train_step.jitted.lower(*run.abstract_step_inputs(batch))
        t2 = time.perf_counter()
        print(f"plan: lowering {t2 - t1:.1f} s; XLA compiling", file=sys.stderr, flush=True)
        # The program never runs: skip LLVM's optimisations (buffer assignment, hence the
        # memory analysis, and the partitioned collectives do not depend on them).
        with _progress("XLA compiling", t2):
            compiled = lowered.compile(compiler_options={"xla_backend_optimization_level": 0})
    t3 = time.perf_counter()
    print(f"plan: compile {t3 - t2:.1f} s", file=sys.stderr, flush=True)
    return compiled, t2, t3


def compile_train_step(
    config: SwitchConfig, mesh_sizes: Mapping[str, int], spec: StepSpec, teacher: Any = None
):
    """Compiles the real train step for `mesh_sizes` on this process's devices (abstractly).

    Needs `prod(mesh_sizes)` devices: run it where XLA_FLAGS simulates them (`main` does so in a
    subprocess). `teacher`: distillation's `distill.TeacherSpec` (its params are inputs of the
    step). Returns a StepPlan.
    """
    import time

    import jax

    from switch_t5 import distill, optim, partitioning, run_builder, trainer

    n = math.prod(mesh_sizes.values())
    if jax.device_count() < n:
        raise PlanError(f"the mesh needs {n} devices but this process has {jax.device_count()}")
    mesh = partitioning.make_mesh(
        *(mesh_sizes[a] for a in MESH_AXES),
        num_experts=config.num_experts,
        devices=jax.devices()[:n],
    )
    t0 = time.perf_counter()
    print("plan: setting up the abstract train state", file=sys.stderr, flush=True)
    # The step `switch_t5.train` runs (`run_builder.build_run`), with the planned optimizer.
    optimizer = optim.OptimizerConfig(name=spec.optimizer, state_dtype=spec.optimizer_state_dtype)
    run = run_builder.build_run(
        config,
        mesh,
        lambda specs: optim.make_optimizer(optimizer, logical_specs=specs),
        trainer.LossConfig().for_model(config),
        num_microbatches=spec.num_microbatches,
        teacher=distill.abstract_teacher(teacher, mesh) if teacher is not None else None,
    )
    setup = run.setup
    lengths = {"inputs": spec.inputs_length, "targets": spec.targets_length}
    batch = run.abstract_batch(spec.batch, lengths)
    t1 = time.perf_counter()
    print(f"plan: setup {t1 - t0:.1f} s; lowering", file=sys.stderr, flush=True)
    compiled, t2, t3 = _lower_and_compile(run, batch, mesh, t1)
    seconds = t3 - t0
    memory = compiled.memory_analysis()
    hlo_text = compiled.as_text()
    collectives, a2a_dtypes = count_collectives(hlo_text)
    total = (
        memory.argument_size_in_bytes
        + memory.output_size_in_bytes
        - memory.alias_size_in_bytes
        + memory.temp_size_in_bytes
    )
    return StepPlan(
        mesh=dict(mesh_sizes),
        devices=n,
        param_bytes=_sharded_bytes(setup.abstract_state.params),
        optimizer_bytes=_sharded_bytes(setup.abstract_state.opt_state),
        argument_bytes=int(memory.argument_size_in_bytes),
        output_bytes=int(memory.output_size_in_bytes),
        alias_bytes=int(memory.alias_size_in_bytes),
        temp_bytes=int(memory.temp_size_in_bytes),
        total_bytes=int(total),
        collectives=collectives,
        all_to_all_dtypes=a2a_dtypes,
        expert_kernel_all_gathers=count_expert_kernel_gathers(hlo_text, config, mesh_sizes),
        compile_seconds=round(seconds, 1),
        gradient_bytes=_sharded_bytes(setup.abstract_state.params),
        fsdp=run.config.fsdp,
        fsdp_whole_params=partitioning.fsdp_whole_params(
            setup.logical_specs, setup.shardings.params, setup.abstract_state.params
        ),
        collective_bytes=collective_bytes(hlo_text),
        setup_seconds=round(t1 - t0, 1),
        lower_seconds=round(t2 - t1, 1),
        xla_compile_seconds=round(t3 - t2, 1),
        teacher_param_bytes=_sharded_bytes(run.teacher.abstract_params) if run.teacher else 0,
    )


def _worker(request_json: str) -> None:
    """Subprocess side of `compile_in_subprocess`: prints one tagged JSON line."""
    request = json.loads(request_json)
    try:
        gin_utils.parse_gin(request["gin_files"], request["gin_bindings"])
        config = dataclasses.replace(gin_utils.make_model_config(), **request["overrides"])
        teacher = _teacher_from_gin(config)
        result = compile_train_step(config, request["mesh"], StepSpec(**request["spec"]), teacher)
    except (PlanError, ValueError) as e:
        print(_ERROR_TAG + json.dumps(str(e)), flush=True)
        sys.exit(2)
    print(_WORKER_TAG + json.dumps(dataclasses.asdict(result)), flush=True)


def _teacher_from_gin(config: SwitchConfig):
    """Distillation's teacher (`train.teacher_checkpoint_path`) when the gin config sets one."""
    from switch_t5 import distill, train

    return distill.resolve_teacher(train.distillation_from_gin(), config)


def compile_in_subprocess(
    gin_files: Sequence[str],
    gin_bindings: Sequence[str],
    overrides: Mapping[str, Any],
    mesh: Mapping[str, int],
    spec: StepSpec,
    timeout: float | None = None,
) -> StepPlan:
    """`compile_train_step` in a fresh Python with prod(mesh) simulated CPU devices.

    The device count is fixed when jax initialises its backend, hence the subprocess:
    XLA_FLAGS=--xla_force_host_platform_device_count=N is set before it imports jax.
    """
    n = math.prod(mesh.values())
    flags = re.sub(
        r"--xla_force_host_platform_device_count=\d+", "", os.environ.get("XLA_FLAGS", "")
    )
    env = {
        **os.environ,
        "XLA_FLAGS": f"{flags} --xla_force_host_platform_device_count={n}".strip(),
        "JAX_PLATFORMS": "cpu",
        "PYTHONPATH": os.pathsep.join(
            [gin_utils.REPO_ROOT, *filter(None, [os.environ.get("PYTHONPATH")])]
        ),
    }
    request = {
        "gin_files": list(gin_files),
        "gin_bindings": list(gin_bindings),
        "overrides": dict(overrides),
        "mesh": dict(mesh),
        "spec": dataclasses.asdict(spec),
    }
    code = "import sys; from switch_t5 import plan; plan._worker(sys.argv[1])"
    proc = subprocess.Popen(
        [sys.executable, "-c", code, json.dumps(request)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    stdout, err_lines, timed_out = _run_worker(proc, timeout)
    if timed_out.is_set():
        raise subprocess.TimeoutExpired(proc.args, timeout)
    stderr = "".join(err_lines)
    for line in stdout.splitlines():
        if line.startswith(_WORKER_TAG):
            return StepPlan(**json.loads(line[len(_WORKER_TAG) :]))
        if line.startswith(_ERROR_TAG):
            raise PlanError(json.loads(line[len(_ERROR_TAG) :]))
    raise RuntimeError(
        f"compiling the train step for {n} simulated devices failed (exit {proc.returncode}):\n"
        + stderr[-4000:]
    )


def _run_worker(proc: subprocess.Popen, timeout: float | None):
    """(stdout, stderr lines, timed out) of the worker; its progress ("plan: ..." lines) goes
    to our stderr as it comes, the rest of its stderr is kept for errors."""
    err_lines: list[str] = []

    def pump() -> None:
        for line in proc.stderr:
            # (a warning printed without its newline may precede the progress text)
            head, tag, rest = line.partition("plan: ")
            if tag:
                print(tag + rest.rstrip(), file=sys.stderr, flush=True)
                line = head + "\n" if head.strip() else ""
            err_lines.append(line)

    pumper = threading.Thread(target=pump, daemon=True)
    pumper.start()
    # Only this thread reads stdout (communicate() would race the pump for stderr).
    timed_out = threading.Event()

    def kill() -> None:
        timed_out.set()
        proc.kill()

    killer = threading.Timer(timeout, kill) if timeout else None
    if killer:
        killer.start()
    try:
        stdout = proc.stdout.read()
        proc.wait()
        pumper.join()
    finally:
        if killer:
            killer.cancel()
    return stdout, err_lines, timed_out


# ---------------------------------------------------------------------------------------------
# Command line.
# ---------------------------------------------------------------------------------------------


def _add_arguments(parser: argparse.ArgumentParser) -> None:
    from switch_t5 import optim

    parser.add_argument("--devices", type=int, default=None, help="simulated devices N")
    parser.add_argument("--mesh", default=None, help="data:D,expert:E,model:M (default: recommend)")
    parser.add_argument("--hbm_gib", type=float, default=None, help="memory per device, GiB")
    parser.add_argument("--accelerator", choices=("tpu", "gpu"), default="tpu")
    parser.add_argument(
        "--gpu_mem_fraction",
        type=float,
        default=GPU_DEFAULT_MEM_FRACTION,
        help="fraction of GPU memory XLA preallocates (XLA_PYTHON_CLIENT_MEM_FRACTION)",
    )
    parser.add_argument("--batch", type=int, default=PAPER_BATCH)
    parser.add_argument("--inputs_length", type=int, default=PAPER_INPUTS_LENGTH)
    parser.add_argument("--targets_length", type=int, default=PAPER_TARGETS_LENGTH)
    parser.add_argument("--num_microbatches", type=int, default=1)
    parser.add_argument("--optimizer", choices=optim.OPTIMIZERS, default="adafactor")
    parser.add_argument("--optimizer_state_dtype", choices=optim.STATE_DTYPES, default="float32")
    parser.add_argument(
        "--scan", choices=("auto", "on", "off"), default="auto", help="scan_layers for compiling"
    )
    parser.add_argument("--remat", choices=REMAT_POLICIES, default=None)
    parser.add_argument(
        "--max_compiles", type=int, default=3, help="recommended meshes to try before giving up"
    )
    parser.add_argument("--compile_timeout", type=float, default=None, help="seconds")


def partitioning_non_expert(config: SwitchConfig) -> str:
    from switch_t5 import partitioning

    return _human(partitioning.non_expert_params(config))


def _gib(n: float) -> str:
    return f"{n / 2**30:.2f}"


def _dispatch(config: SwitchConfig) -> str:
    from switch_t5 import moe

    if config.dispatch == "auto":
        # Resolved by the CPU compiler's backend; on TPU "auto" is the einsum dispatch.
        return f"auto->{moe.resolve_dispatch('auto')} (TPU: einsum)"
    return config.dispatch


def format_step_plan(
    config: SwitchConfig, spec: StepSpec, step: StepPlan, flops: float, recommended: bool
) -> list[str]:
    m = step.mesh
    tokens = spec.batch * (spec.inputs_length + spec.targets_length)
    teacher = step.teacher_param_bytes
    batch = step.argument_bytes - step.param_bytes - step.optimizer_bytes - teacher
    return [
        f"mesh: data:{m['data']},expert:{m['expert']},model:{m['model']}"
        + (" (recommended)" if recommended else ""),
        f"devices: {step.devices}",
        f"compiled: the real train step ({spec.optimizer} with {spec.optimizer_state_dtype} "
        f"state, {spec.num_microbatches} "
        f"microbatch(es)), scan_layers={config.scan_layers}, remat_policy={config.remat_policy}, "
        f"param_dtype={config.param_dtype}, dtype={config.dtype}, "
        f"moe_dtype={config.moe_dtype or config.dtype}, dispatch={_dispatch(config)}; "
        f"{step.compile_seconds:.0f} s",
        f"batch: {spec.batch} x ({spec.inputs_length} inputs + {spec.targets_length} targets) "
        f"= {tokens} tokens per step",
        f"train_flops_per_step: {flops:.4g}",
        f"train_flops_per_token: {flops / tokens:.4g}",
        f"per_device_param_bytes: {step.param_bytes}",
        f"per_device_optimizer_bytes: {step.optimizer_bytes}",
        f"per_device_argument_bytes: {step.argument_bytes}",
        f"per_device_temp_bytes: {step.temp_bytes}",
        f"per_device_total_bytes: {step.total_bytes}",
        f"per_device_gib: {_gib(step.total_bytes)}  (an estimate by XLA's CPU compiler: "
        f"params {_gib(step.param_bytes)} + optimizer {_gib(step.optimizer_bytes)} + "
        + (f"distillation teacher {_gib(teacher)} + " if teacher else "")
        + f"batch {_gib(batch)} + temporaries "
        f"{_gib(step.temp_bytes)} GiB; TPU/GPU compilers schedule differently)",
        f"per_device_breakdown_gib: params {_gib(step.param_bytes)}, optimizer state "
        f"{_gib(step.optimizer_bytes)}, gradients {_gib(step.gradient_bytes)} (in the "
        f"temporaries), activations and other temporaries "
        f"{_gib(max(step.temp_bytes - step.gradient_bytes, 0))}, batch {_gib(batch)}"
        + (f", distillation teacher {_gib(teacher)}" if teacher else ""),
        f"fsdp: {'on' if step.fsdp else 'off'}  (non-expert weights, gradients and optimizer "
        f"state {'sharded over data x expert' if step.fsdp else 'replicated over data x expert'}"
        f"; {partitioning_non_expert(config)} non-expert params"
        + (
            f"; {_human(step.fsdp_whole_params)} of them stay whole: no dim, or pair of dims, "
            "of their weights divides into the batch shards)"
            if step.fsdp and step.fsdp_whole_params
            else ")"
        ),
        "collective_bytes_per_step: "
        + (", ".join(f"{k} {_gib(v)} GiB" for k, v in sorted(step.collective_bytes.items())) or "-")
        + (
            "  (reduce-scatter = XLA:CPU's all-reduce + dynamic-slice)"
            if "reduce-scatter" in step.collective_bytes
            else ""
        ),
        f"compile_wall_seconds: setup {step.setup_seconds:.1f}, lowering "
        f"{step.lower_seconds:.1f}, compile {step.xla_compile_seconds:.1f}",
        "collectives_per_step: "
        + ", ".join(f"{k} {v}" for k, v in step.collectives.items() if k != "collective-permute")
        + f" (collective-permute {step.collectives.get('collective-permute', 0)})",
        f"all_to_all_dtypes: {','.join(step.all_to_all_dtypes) or '-'}"
        + (
            "  (XLA:CPU widens bfloat16 collectives; the partitioned program's are bf16)"
            if "f32" in step.all_to_all_dtypes and (config.moe_dtype or config.dtype) == "bfloat16"
            else ""
        ),
        f"expert_kernel_all_gathers: {step.expert_kernel_all_gathers}  (0: every device keeps "
        "only its own experts' kernel slice)",
    ]


_GROUP_FIELDS = ("group_size", "decoder_group_size")


def resolve_groups(config: SwitchConfig, mesh: Mapping[str, int], spec: StepSpec) -> SwitchConfig:
    """The config with the routing group sizes a run of this batch on this mesh uses: unset
    ones chosen as training chooses them (`moe.resolve_group_sizes`)."""
    from switch_t5 import moe

    lengths = {"inputs": spec.inputs_length, "targets": spec.targets_length}
    rows = max(spec.batch // spec.num_microbatches, 1)
    return moe.resolve_group_sizes(config, rows, lengths, mesh["data"] * mesh["expert"])


def group_size_line(config: SwitchConfig, grouped: SwitchConfig) -> str:
    """The `routing_group_size:` report line: each sparse stack's tokens per routing group and,
    when the planner chose them, the gin flags that fix them for training."""
    if not config.is_sparse:
        return "routing_group_size: - (dense model)"
    if grouped.groups_per_sequence:
        return "routing_group_size: one group per sequence (routing_groups='sequence')"
    sizes = ", ".join(
        f"{stack} {grouped.stack_group_size(stack)}"
        for stack in ("encoder", "decoder")
        if grouped.sparse_layers(stack)
    )
    if config.group_size is not None:
        return f"routing_group_size: {sizes} tokens (set by group_size)"
    from switch_t5 import moe

    return (
        f"routing_group_size: {sizes} tokens (chosen for this batch and mesh, as training "
        f"chooses them; to use exactly these: {moe.group_size_gin(grouped)})"
    )


def _compile_on(flags, config: SwitchConfig, overrides, mesh, spec: StepSpec):
    """(StepPlan, config with the group sizes it used): the step compiled on `mesh`, the routing
    group sizes the config leaves unset chosen for that mesh (`resolve_groups`)."""
    grouped = resolve_groups(config, mesh, spec)
    groups = {k: getattr(grouped, k) for k in _GROUP_FIELDS if getattr(config, k) is None}
    step = compile_in_subprocess(
        flags.gin_files,
        flags.gin_bindings,
        {**overrides, **groups},
        mesh,
        spec,
        flags.rest.compile_timeout,
    )
    return step, grouped


def _compile_overrides(config: SwitchConfig, model_plan: ModelPlan, rest) -> dict[str, Any]:
    overrides: dict[str, Any] = {}
    if rest.scan == "on":
        overrides["scan_layers"] = True
    elif rest.scan == "off":
        overrides["scan_layers"] = False
    elif (
        not config.scan_layers
        and model_plan.total_params >= 1e9
        and any(config.scan_period(s) < config.num_layers(s) for s in ("encoder", "decoder"))
    ):
        # Big configs: compile one dense/sparse block instead of every layer.
        overrides["scan_layers"] = True
    if rest.remat is not None:
        overrides["remat_policy"] = rest.remat
    return overrides


def main(argv: Sequence[str]) -> None:
    flags = gin_utils.parse_flags(argv, _add_arguments)
    if not flags.gin_files:
        raise errors.UserError(
            "pass a model config, e.g. --gin_file=configs/models/switch_base_8.gin"
        )
    gin_utils.parse_gin(flags.gin_files, flags.gin_bindings)
    config = gin_utils.make_model_config()
    model_plan = plan_model(config)
    for line in format_model_plan(config, model_plan):
        print(line)
    rest = flags.rest
    if rest.devices is None and rest.mesh is None and rest.hbm_gib is None:
        return
    _plan_step(flags, config, model_plan)


def _plan_step(flags, config: SwitchConfig, model_plan: ModelPlan) -> None:
    rest = flags.rest
    spec = StepSpec(
        rest.batch,
        rest.inputs_length,
        rest.targets_length,
        rest.num_microbatches,
        rest.optimizer,
        rest.optimizer_state_dtype,
    )
    usable = None
    if rest.hbm_gib is not None:
        fraction = rest.gpu_mem_fraction if rest.accelerator == "gpu" else 1.0
        if not 0 < fraction <= 1:
            raise PlanError(f"--gpu_mem_fraction={fraction} must be in (0, 1]")
        usable = rest.hbm_gib * 2**30 * fraction
    overrides = _compile_overrides(config, model_plan, rest)
    config = dataclasses.replace(config, **overrides)
    if rest.mesh is not None:
        mesh, _ = resolve_mesh(parse_mesh(rest.mesh), rest.devices)
        problems = _fit_problems(config, mesh, spec)
        if problems:
            raise PlanError(f"the mesh {rest.mesh} does not fit: " + "; ".join(problems))
        candidates, recommended = [mesh], False
    else:
        if rest.devices is None:
            raise PlanError("pass --devices=N (or --mesh=data:D,expert:E,model:M)")
        candidates = recommend_meshes(config, model_plan, rest.devices, spec, usable)
        candidates, recommended = candidates[: max(rest.max_compiles, 1)], True
    flops = flops_lib.train_flops_per_step(
        network.init_abstract(config)["params"],
        config,
        spec.batch,
        {"inputs": spec.inputs_length, "targets": spec.targets_length},
    )
    for i, mesh in enumerate(candidates):
        step, grouped = _compile_on(flags, config, overrides, mesh, spec)
        fits = usable is None or step.total_bytes <= usable
        if fits or i == len(candidates) - 1:
            break
        print(
            f"tried mesh data:{mesh['data']},expert:{mesh['expert']},model:{mesh['model']}: "
            f"per_device_gib {_gib(step.total_bytes)} > usable {_gib(usable)}; next candidate"
        )
    for line in format_step_plan(config, spec, step, flops, recommended):
        print(line)
    print(group_size_line(config, grouped))
    if usable is not None:
        where = (
            f"{rest.hbm_gib:g} GiB x XLA's GPU preallocation {rest.gpu_mem_fraction:g}"
            if rest.accelerator == "gpu"
            else f"{rest.hbm_gib:g} GiB"
        )
        print(f"usable_hbm_gib: {_gib(usable)}  ({where})")
        if step.total_bytes > usable:
            # Suggest only what this plan does not already use.
            fixes = ["more devices or model parallelism (--mesh ...,model:M)"]
            if config.param_dtype != "bfloat16":
                fixes.append(
                    "bfloat16 params (--gin.switch_t5.SwitchConfig.param_dtype='bfloat16')"
                )
            if spec.optimizer_state_dtype != "bfloat16":
                fixes.append("bfloat16 optimizer state (--optimizer_state_dtype=bfloat16)")
            if config.remat_policy != "full":
                fixes.append("a remat policy (--remat=full)")
            fixes.append(
                f"more microbatches (--num_microbatches={2 * spec.num_microbatches}; the batch "
                "per microbatch must still split over the data x expert shards)"
            )
            raise PlanError(
                f"per_device_gib {_gib(step.total_bytes)} exceeds the usable {_gib(usable)} GiB "
                f"({where}); use " + ", ".join(fixes[:-1]) + " or " + fixes[-1]
            )
        print("fits: yes")


def console_main() -> None:
    """The `python -m switch_t5.plan` command."""
    gin_utils.run_console_main(main)


if __name__ == "__main__":
    console_main()
