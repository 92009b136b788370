"""Optimizers and learning-rate schedules: T5X-style Adafactor with per-expert factoring, AdamW.

Why not `optax.adafactor`: it factors the two LARGEST dims of every tensor, so for an expert kernel
<float32>[experts, d_model, d_ff] with experts > min(d_model, d_ff) it averages second moments over
the expert axis, and it takes the parameter scale and the update clipping RMS over the whole
[experts, ...] tensor, coupling experts that never see the same tokens. Here each expert (and each
layer of a scanned stack) is its own matrix, as T5X's Adafactor factor rules do for axes marked
BATCH: second moments are factored per expert (states [experts, d_model] and [experts, d_ff]),
and parameter scale and clipping are per expert.

Axis legend for the comments: e = experts (a "batch" axis of the optimizer), m = rows,
n = columns of the factored matrix.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import linen as nn
from jax.sharding import NamedSharding, PartitionSpec

from switch_t5 import errors

# Logical axis names whose entries are independent matrices for the optimizer (T5X FactorDim.BATCH).
BATCH_LOGICAL_AXES: tuple[str, ...] = ("expert", "layers")

Schedule = Callable[[jax.Array], jax.Array]


# ---------------------------------------------------------------------------------------------
# Learning-rate schedules.
# ---------------------------------------------------------------------------------------------


def rsqrt_schedule(base_learning_rate: float = 1.0, warmup_steps: int = 10_000) -> Schedule:
    """T5's inverse square root schedule: base / sqrt(max(step, warmup_steps)).

    With base 1.0 and 10k warm-up steps this is the constant 0.01 for the first 10k steps, then
    1/sqrt(step) (T5, arXiv 1910.10683 sec. 3.1.2; T5X `constant * rsqrt_decay`).
    """
    if warmup_steps <= 0:
        raise errors.UserError(
            f"warmup_steps={warmup_steps} must be positive for the rsqrt schedule"
        )

    def schedule(step):
        step = jnp.asarray(step, jnp.float32)
        return base_learning_rate * jax.lax.rsqrt(jnp.maximum(step, float(warmup_steps)))

    return schedule


def make_schedule(
    name: str = "rsqrt",
    base_learning_rate: float = 1.0,
    warmup_steps: int = 10_000,
    decay_steps: int | None = None,
    end_learning_rate: float = 0.0,
) -> Schedule:
    """Builds a schedule by name.

    Args:
      name: "rsqrt" (T5: base / sqrt(max(step, warmup))), "constant" (base), "linear_rsqrt"
        (linear warm-up from 0 to base / sqrt(warmup) over warmup steps, then base / sqrt(step)),
        or "cosine" (linear warm-up to base, cosine decay to end_learning_rate at decay_steps).
      base_learning_rate: see `name`.
      warmup_steps: warm-up length.
      decay_steps: total steps of the cosine schedule (required for "cosine").
      end_learning_rate: final value of the cosine schedule.
    """
    if name == "rsqrt":
        return rsqrt_schedule(base_learning_rate, warmup_steps)
    if name == "constant":
        return lambda step: jnp.full((), base_learning_rate, jnp.float32)
    if name == "linear_rsqrt":
        if warmup_steps <= 0:
            raise errors.UserError(f"warmup_steps={warmup_steps} must be positive for linear_rsqrt")
        peak = base_learning_rate / math.sqrt(warmup_steps)

        def schedule(step):
            step = jnp.asarray(step, jnp.float32)
            warm = peak * (step + 1.0) / warmup_steps
            return jnp.where(
                step < warmup_steps, warm, base_learning_rate * jax.lax.rsqrt(step + 1.0)
            )

        return schedule
    if name == "cosine":
        if decay_steps is None or decay_steps <= warmup_steps:
            raise errors.UserError(
                f"the cosine schedule needs decay_steps > warmup_steps, got "
                f"decay_steps={decay_steps}, warmup_steps={warmup_steps}"
            )
        return optax.warmup_cosine_decay_schedule(
            0.0, base_learning_rate, max(warmup_steps, 1), decay_steps, end_learning_rate
        )
    raise errors.UserError(
        f"unknown learning-rate schedule {name!r}: use 'rsqrt', 'constant', 'linear_rsqrt' "
        "or 'cosine'"
    )


# ---------------------------------------------------------------------------------------------
# Per-expert Adafactor.
# ---------------------------------------------------------------------------------------------


def batch_axes_from_logical(logical_specs: Any) -> Any:
    """Per parameter, the tuple of axes that index independent matrices ("expert", "layers").

    Args:
      logical_specs: a tree of logical PartitionSpecs (`nn.get_partition_spec` of the boxed
        variables), one per parameter.
    """
    return jax.tree.map(
        lambda spec: tuple(i for i, name in enumerate(spec) if name in BATCH_LOGICAL_AXES),
        logical_specs,
        is_leaf=lambda x: isinstance(x, PartitionSpec),
    )


def factored_dims(
    shape: Sequence[int],
    batch_axes: Sequence[int],
    factored: bool = True,
    min_dim_size_to_factor: int = 128,
) -> tuple[int, int] | None:
    """The (second largest, largest) non-batch axes to factor over, or None for a full moment.

    Matches `optax.adafactor` on the matrix of one expert (ties go to the lower axis index).
    """
    if not factored:
        return None
    free = [i for i in range(len(shape)) if i not in batch_axes]
    if len(free) < 2:
        return None
    # Stable sort on size: the two largest, the lower index first among equals.
    order = sorted(free, key=lambda i: shape[i])
    d_row, d_col = order[-2], order[-1]
    if shape[d_row] < min_dim_size_to_factor:
        return None
    return d_row, d_col


def _reduce_axes(ndim: int, batch_axes: Sequence[int]) -> tuple[int, ...]:
    return tuple(i for i in range(ndim) if i not in batch_axes)


def _rms(x: jax.Array, batch_axes: Sequence[int]) -> jax.Array:
    """RMS over the non-batch axes, kept as size-1 dims so it broadcasts per expert."""
    return jnp.sqrt(jnp.mean(jnp.square(x), axis=_reduce_axes(x.ndim, batch_axes), keepdims=True))


class AdafactorState(NamedTuple):
    """Adafactor state; v_row/v_col/v hold a (1,) placeholder where a param does not use them.

    Attributes:
      count: <int32>[] updates applied so far.
      v_row: per param, the moment with the LARGEST factored axis averaged out.
      v_col: per param, the moment with the second largest factored axis averaged out.
      v: per param, the full second moment (unfactored params).
    """

    count: jax.Array
    v_row: Any
    v_col: Any
    v: Any


def adafactor(
    learning_rate: float | Schedule,
    batch_axes: Any = None,
    *,
    decay_rate: float = 0.8,
    clipping_threshold: float | None = 1.0,
    multiply_by_parameter_scale: bool = True,
    epsilon1: float = 1e-30,
    epsilon2: float = 1e-3,
    factored: bool = True,
    min_dim_size_to_factor: int = 128,
    weight_decay_rate: float | None = None,
    state_dtype: Any = jnp.float32,
) -> optax.GradientTransformation:
    """Adafactor (arXiv 1804.04235) as T5X uses it, with per-expert factoring.

    Args:
      learning_rate: a float or a schedule of the update count.
      batch_axes: a tree like the params of tuples of axes that index independent matrices
        (see `batch_axes_from_logical`); None means no batch axes (plain Adafactor).
      decay_rate: second-moment decay exponent: beta2_t = 1 - t**-decay_rate, t = count + 1.
      clipping_threshold: update clipping on the RMS of the update per matrix; None disables.
      multiply_by_parameter_scale: scale the step by max(epsilon2, RMS(param)) per matrix.
      epsilon1: added to the squared gradient.
      epsilon2: floor of the parameter scale.
      factored: factor second moments of matrices whose two largest free dims are >= the minimum.
      min_dim_size_to_factor: see `factored`.
      weight_decay_rate: decoupled weight decay times the learning rate (T5X semantics).
      state_dtype: storage dtype of the second moments (bfloat16 halves the state; the update
        is computed in float32 either way).
    """
    lr_fn = learning_rate if callable(learning_rate) else (lambda _: learning_rate)

    def _axes(params):
        if batch_axes is None:
            return jax.tree.map(lambda _: (), params)
        return batch_axes

    def init_fn(params):
        def init_one(p, axes):
            dims = factored_dims(p.shape, axes, factored, min_dim_size_to_factor)
            placeholder = jnp.zeros((1,), state_dtype)
            if dims is None:
                return placeholder, placeholder, jnp.zeros(p.shape, state_dtype)
            d_row, d_col = dims
            row_shape = tuple(s for i, s in enumerate(p.shape) if i != d_col)
            col_shape = tuple(s for i, s in enumerate(p.shape) if i != d_row)
            return jnp.zeros(row_shape, state_dtype), jnp.zeros(col_shape, state_dtype), placeholder

        out = jax.tree.map(init_one, params, _axes(params), is_leaf=lambda x: x is None)
        treedef = jax.tree.structure(params)
        leaves = treedef.flatten_up_to(out)
        return AdafactorState(
            count=jnp.zeros([], jnp.int32),
            v_row=treedef.unflatten([x[0] for x in leaves]),
            v_col=treedef.unflatten([x[1] for x in leaves]),
            v=treedef.unflatten([x[2] for x in leaves]),
        )

    def update_fn(grads, state, params):
        if params is None:
            raise ValueError("Adafactor needs the params (parameter scale): pass them to update")
        t = state.count.astype(jnp.float32) + 1.0
        beta2 = 1.0 - t ** (-decay_rate)
        lr = lr_fn(state.count)

        def update_one(g, v_row, v_col, v, p, axes):
            g = g.astype(jnp.float32)
            v_row, v_col, v = (x.astype(jnp.float32) for x in (v_row, v_col, v))
            g_sqr = jnp.square(g) + epsilon1
            dims = factored_dims(p.shape, axes, factored, min_dim_size_to_factor)
            if dims is None:
                v = beta2 * v + (1.0 - beta2) * g_sqr
                u = g * jax.lax.rsqrt(v)
            else:
                d_row, d_col = dims
                # [e, m, n] -> [e, m]: averaged over the largest axis (n).
                v_row = beta2 * v_row + (1.0 - beta2) * jnp.mean(g_sqr, axis=d_col)
                # [e, m, n] -> [e, n]: averaged over the second largest axis (m).
                v_col = beta2 * v_col + (1.0 - beta2) * jnp.mean(g_sqr, axis=d_row)
                # Normaliser per expert: mean of v_row over its m axis (position in v_row).
                row_axis_in_row = d_row - 1 if d_row > d_col else d_row
                row_mean = jnp.mean(v_row, axis=row_axis_in_row, keepdims=True)
                row_factor = jax.lax.rsqrt(v_row / row_mean)
                col_factor = jax.lax.rsqrt(v_col)
                u = g * jnp.expand_dims(row_factor, d_col) * jnp.expand_dims(col_factor, d_row)
            if clipping_threshold is not None:
                u = u / jnp.maximum(1.0, _rms(u, axes) / clipping_threshold)
            u = u * lr
            if multiply_by_parameter_scale:
                u = u * jnp.maximum(_rms(p.astype(jnp.float32), axes), epsilon2)
            if weight_decay_rate is not None:
                u = u + weight_decay_rate * lr * p.astype(jnp.float32)
            return (
                (-u).astype(p.dtype),
                v_row.astype(state_dtype),
                v_col.astype(state_dtype),
                v.astype(state_dtype),
            )

        treedef = jax.tree.structure(grads)
        out = [
            update_one(*args)
            for args in zip(
                treedef.flatten_up_to(grads),
                treedef.flatten_up_to(state.v_row),
                treedef.flatten_up_to(state.v_col),
                treedef.flatten_up_to(state.v),
                treedef.flatten_up_to(params),
                treedef.flatten_up_to(_axes(params)),
            )
        ]
        updates = treedef.unflatten([o[0] for o in out])
        new_state = AdafactorState(
            count=optax.safe_increment(state.count),
            v_row=treedef.unflatten([o[1] for o in out]),
            v_col=treedef.unflatten([o[2] for o in out]),
            v=treedef.unflatten([o[3] for o in out]),
        )
        return updates, new_state

    return optax.GradientTransformation(init_fn, update_fn)


def _drop_axis(spec: PartitionSpec, ndim: int, axis: int) -> PartitionSpec:
    entries = list(spec) + [None] * (ndim - len(spec))
    del entries[axis]
    return PartitionSpec(*entries)


def adafactor_state_shardings(
    param_shardings: Any,
    abstract_params: Any,
    batch_axes: Any = None,
    *,
    factored: bool = True,
    min_dim_size_to_factor: int = 128,
) -> AdafactorState:
    """Shardings of `AdafactorState`, derived from the params' NamedShardings.

    A factored moment keeps the param's mesh axes minus the averaged-out axis (an expert kernel
    sharded [expert, None, model] gives v_row [expert, None] and v_col [expert, model]); full
    moments take the param's sharding; placeholders and the count are replicated.
    """
    treedef = jax.tree.structure(abstract_params)
    shardings = treedef.flatten_up_to(param_shardings)
    shapes = treedef.flatten_up_to(abstract_params)
    axes_list = [()] * len(shapes) if batch_axes is None else treedef.flatten_up_to(batch_axes)
    mesh = shardings[0].mesh
    replicated = NamedSharding(mesh, PartitionSpec())
    rows, cols, fulls = [], [], []
    for sharding, p, axes in zip(shardings, shapes, axes_list):
        dims = factored_dims(p.shape, axes, factored, min_dim_size_to_factor)
        if dims is None:
            rows.append(replicated)
            cols.append(replicated)
            fulls.append(sharding)
        else:
            d_row, d_col = dims
            rows.append(NamedSharding(mesh, _drop_axis(sharding.spec, len(p.shape), d_col)))
            cols.append(NamedSharding(mesh, _drop_axis(sharding.spec, len(p.shape), d_row)))
            fulls.append(replicated)
    return AdafactorState(
        count=replicated,
        v_row=treedef.unflatten(rows),
        v_col=treedef.unflatten(cols),
        v=treedef.unflatten(fulls),
    )


# ---------------------------------------------------------------------------------------------
# The optimizer the trainer uses.
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Optimizer:
    """A gradient transformation plus the rule deriving its state shardings from the params'.

    Attributes:
      name: "adafactor" or "adamw".
      tx: the optax transformation (its updates are added to the params).
      schedule: the learning rate as a function of the step (for logging).
      state_shardings: (param NamedShardings, abstract params) -> state NamedShardings.
    """

    name: str
    tx: optax.GradientTransformation
    schedule: Schedule
    state_shardings: Callable[[Any, Any], Any]


# What `make_optimizer` accepts (entry points validate against these before compiling).
OPTIMIZERS = ("adafactor", "adamw")
STATE_DTYPES = ("float32", "bfloat16")


def make_optimizer(
    name: str,
    schedule: Schedule,
    logical_specs: Any = None,
    *,
    decay_rate: float = 0.8,
    clipping_threshold: float | None = 1.0,
    multiply_by_parameter_scale: bool = True,
    min_dim_size_to_factor: int = 128,
    weight_decay: float | None = None,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    state_dtype: str = "float32",
) -> Optimizer:
    """Adafactor (T5X defaults) or AdamW, with explicit state-sharding rules.

    Args:
      name: "adafactor" or "adamw".
      schedule: learning rate per step.
      logical_specs: logical PartitionSpecs of the params (marks per-expert matrices).
      decay_rate, clipping_threshold, multiply_by_parameter_scale, min_dim_size_to_factor:
        Adafactor settings (see `adafactor`).
      weight_decay: Adafactor: decoupled rate times lr (default none, as T5X); AdamW: default 0.01.
      b1, b2, eps: AdamW settings.
      state_dtype: "float32" or "bfloat16": Adafactor's second moments, AdamW's first moment
        (optax keeps AdamW's second moment in the param dtype).
    """
    if name == "adafactor":
        batch_axes = None if logical_specs is None else batch_axes_from_logical(logical_specs)
        tx = adafactor(
            schedule,
            batch_axes,
            decay_rate=decay_rate,
            clipping_threshold=clipping_threshold,
            multiply_by_parameter_scale=multiply_by_parameter_scale,
            min_dim_size_to_factor=min_dim_size_to_factor,
            weight_decay_rate=weight_decay,
            state_dtype=jnp.dtype(state_dtype),
        )

        def shardings(param_shardings, abstract_params):
            return adafactor_state_shardings(
                param_shardings,
                abstract_params,
                batch_axes,
                min_dim_size_to_factor=min_dim_size_to_factor,
            )

        return Optimizer(name, tx, schedule, shardings)
    if name == "adamw":
        tx = optax.adamw(
            schedule,
            b1=b1,
            b2=b2,
            eps=eps,
            weight_decay=0.01 if weight_decay is None else weight_decay,
            mu_dtype=jnp.dtype(state_dtype),
        )

        def shardings(param_shardings, abstract_params):
            state = jax.eval_shape(tx.init, abstract_params)
            mesh = jax.tree.leaves(param_shardings)[0].mesh
            return optax.tree_map_params(
                tx,
                lambda _, s: s,
                state,
                param_shardings,
                transform_non_params=lambda _: NamedSharding(mesh, PartitionSpec()),
            )

        return Optimizer(name, tx, schedule, shardings)
    raise errors.UserError(f"unknown optimizer {name!r}: use 'adafactor' or 'adamw'")


def logical_specs_of(boxed_variables: Any) -> Any:
    """Logical PartitionSpecs of the `params` of a boxed (nn.Partitioned) variables tree."""
    return nn.get_partition_spec(boxed_variables)


def state_bytes(state: Any) -> int:
    """Bytes held by a state tree of arrays / ShapeDtypeStructs."""
    return int(sum(np.prod(x.shape) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(state)))
