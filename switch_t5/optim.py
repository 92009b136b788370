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
import re
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec

from switch_t5 import errors, partitioning

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


@dataclasses.dataclass(frozen=True)
class _AdafactorSettings:
    """The hyperparameters of `adafactor` (see its Args), shared by its init and update steps."""

    decay_rate: float
    clipping_threshold: float | None
    multiply_by_parameter_scale: bool
    epsilon1: float
    epsilon2: float
    factored: bool
    min_dim_size_to_factor: int
    weight_decay_rate: float | None
    state_dtype: Any

    def dims(self, shape: Sequence[int], axes: Sequence[int]) -> tuple[int, int] | None:
        return factored_dims(shape, axes, self.factored, self.min_dim_size_to_factor)


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
    settings = _AdafactorSettings(
        decay_rate=decay_rate,
        clipping_threshold=clipping_threshold,
        multiply_by_parameter_scale=multiply_by_parameter_scale,
        epsilon1=epsilon1,
        epsilon2=epsilon2,
        factored=factored,
        min_dim_size_to_factor=min_dim_size_to_factor,
        weight_decay_rate=weight_decay_rate,
        state_dtype=state_dtype,
    )

    def _axes(params):
        if batch_axes is None:
            return jax.tree.map(lambda _: (), params)
        return batch_axes

    def init_fn(params):
        return _adafactor_init(params, _axes(params), settings)

    def update_fn(grads, state, params):
        if params is None:
            raise ValueError("Adafactor needs the params (parameter scale): pass them to update")
        return _adafactor_update(grads, state, params, _axes(params), lr_fn, settings)

    return optax.GradientTransformation(init_fn, update_fn)


def _unzip_trees(treedef: Any, tuples: Sequence[tuple], n: int) -> list[Any]:
    """Per-leaf n-tuples -> n trees of `treedef`."""
    return [treedef.unflatten([t[i] for t in tuples]) for i in range(n)]


def _adafactor_init(params: Any, axes_tree: Any, settings: _AdafactorSettings) -> AdafactorState:
    """Zero second moments: factored (v_row, v_col) or full (v), placeholders elsewhere."""
    state_dtype = settings.state_dtype

    def init_one(p, axes):
        dims = settings.dims(p.shape, axes)
        placeholder = jnp.zeros((1,), state_dtype)
        if dims is None:
            return placeholder, placeholder, jnp.zeros(p.shape, state_dtype)
        d_row, d_col = dims
        row_shape = tuple(s for i, s in enumerate(p.shape) if i != d_col)
        col_shape = tuple(s for i, s in enumerate(p.shape) if i != d_row)
        return jnp.zeros(row_shape, state_dtype), jnp.zeros(col_shape, state_dtype), placeholder

    out = jax.tree.map(init_one, params, axes_tree, is_leaf=lambda x: x is None)
    treedef = jax.tree.structure(params)
    v_row, v_col, v = _unzip_trees(treedef, treedef.flatten_up_to(out), 3)
    return AdafactorState(count=jnp.zeros([], jnp.int32), v_row=v_row, v_col=v_col, v=v)


def _adafactor_update(
    grads: Any,
    state: AdafactorState,
    params: Any,
    axes_tree: Any,
    lr_fn: Schedule,
    settings: _AdafactorSettings,
) -> tuple[Any, AdafactorState]:
    """One Adafactor step over every param: (updates, new state)."""
    t = state.count.astype(jnp.float32) + 1.0
    beta2 = 1.0 - t ** (-settings.decay_rate)
    lr = lr_fn(state.count)
    treedef = jax.tree.structure(grads)
    out = [
        _update_one(g, v_row, v_col, v, p, axes, beta2, lr, settings)
        for g, v_row, v_col, v, p, axes in zip(
            treedef.flatten_up_to(grads),
            treedef.flatten_up_to(state.v_row),
            treedef.flatten_up_to(state.v_col),
            treedef.flatten_up_to(state.v),
            treedef.flatten_up_to(params),
            treedef.flatten_up_to(axes_tree),
        )
    ]
    updates, v_row, v_col, v = _unzip_trees(treedef, out, 4)
    new_state = AdafactorState(
        count=optax.safe_increment(state.count), v_row=v_row, v_col=v_col, v=v
    )
    return updates, new_state


def _update_one(
    g: jax.Array,
    v_row: jax.Array,
    v_col: jax.Array,
    v: jax.Array,
    p: jax.Array,
    axes: Sequence[int],
    beta2: jax.Array,
    lr: jax.Array,
    settings: _AdafactorSettings,
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """One param's (update, v_row, v_col, v); the update in p's dtype, moments in state_dtype."""
    g = g.astype(jnp.float32)
    v_row, v_col, v = (x.astype(jnp.float32) for x in (v_row, v_col, v))
    g_sqr = jnp.square(g) + settings.epsilon1
    dims = settings.dims(p.shape, axes)
    if dims is None:
        v = beta2 * v + (1.0 - beta2) * g_sqr
        u = g * jax.lax.rsqrt(v)
    else:
        u, v_row, v_col = _factored_step(g, g_sqr, v_row, v_col, dims, beta2)
    if settings.clipping_threshold is not None:
        u = u / jnp.maximum(1.0, _rms(u, axes) / settings.clipping_threshold)
    u = u * lr
    if settings.multiply_by_parameter_scale:
        u = u * jnp.maximum(_rms(p.astype(jnp.float32), axes), settings.epsilon2)
    if settings.weight_decay_rate is not None:
        u = u + settings.weight_decay_rate * lr * p.astype(jnp.float32)
    state_dtype = settings.state_dtype
    return (
        (-u).astype(p.dtype),
        v_row.astype(state_dtype),
        v_col.astype(state_dtype),
        v.astype(state_dtype),
    )


def _factored_step(
    g: jax.Array,
    g_sqr: jax.Array,
    v_row: jax.Array,
    v_col: jax.Array,
    dims: tuple[int, int],
    beta2: jax.Array,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """The factored second-moment update and the unclipped step (u, v_row, v_col), in float32."""
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
    # [e, m] and [e, n] -> [e, m, n]
    u = g * jnp.expand_dims(row_factor, d_col) * jnp.expand_dims(col_factor, d_row)
    return u, v_row, v_col


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
    # FSDP weights may live on a view of the run's mesh (`partitioning.fsdp_mesh`): each moment
    # keeps its param's mesh.
    replicated = NamedSharding(partitioning.run_mesh(shardings), PartitionSpec())
    rows, cols, fulls = [], [], []
    for sharding, p, axes in zip(shardings, shapes, axes_list):
        dims = factored_dims(p.shape, axes, factored, min_dim_size_to_factor)
        if dims is None:
            rows.append(replicated)
            cols.append(replicated)
            fulls.append(sharding)
        else:
            d_row, d_col = dims
            mesh = sharding.mesh
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


STATE_DTYPES = ("float32", "bfloat16")
SCHEDULES = ("rsqrt", "constant", "linear_rsqrt", "cosine")
# The schedules that divide by sqrt(warmup_steps), hence need it positive.
_RSQRT_SCHEDULES = ("rsqrt", "linear_rsqrt")


class OptimizerConfigError(errors.UserError):
    """An OptimizerConfig field (or a combination of fields) is invalid; lists every problem."""


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
    """Every setting of the optimizer and its learning-rate schedule (defaults: T5X's Adafactor).

    Field names follow `switch_t5.train.train`'s parameters where those exist (`train.optimizer`
    is `name`, `train.optimizer_state_dtype` is `state_dtype`).

    Attributes:
      name: a registered optimizer (`register_optimizer`): "adafactor" or "adamw" built in.
      state_dtype: "float32" or "bfloat16": Adafactor's second moments, AdamW's first moment
        (optax keeps AdamW's second moment in the param dtype).
      lr_schedule: "rsqrt", "constant", "linear_rsqrt" or "cosine" (`make_schedule`).
      base_learning_rate: see the schedule (rsqrt: lr = base / sqrt(max(step, warmup))).
      warmup_steps: warm-up length (positive for the rsqrt schedules).
      decay_steps: the cosine schedule's length (> warmup_steps; cosine only).
      end_learning_rate: the cosine schedule's final value.
      weight_decay: decoupled weight decay: Adafactor's rate times lr (None = none, as T5X);
        AdamW's (None = 0.01).
      b1, b2, eps: AdamW's moment decays and denominator epsilon.
      decay_rate: Adafactor's second-moment decay exponent (beta2_t = 1 - t**-decay_rate).
      clipping_threshold: Adafactor's update clipping on the RMS per matrix (None = off).
      multiply_by_parameter_scale: Adafactor scales the step by the RMS of each matrix.
      epsilon1: Adafactor: added to the squared gradient.
      epsilon2: Adafactor: floor of the parameter scale.
      factored: Adafactor factors the second moments of large enough matrices.
      min_dim_size_to_factor: Adafactor factors matrices whose two largest free dims reach it.
      freeze_router: the router params (`ROUTER_PARAMS`) get no update at all, weight decay
        included (fine-tuning with the pretrained routing kept; see `control_updates`).
      router_learning_rate_multiplier: the router params' whole update (the optimizer's step,
        weight decay included) is multiplied by it; 0 = frozen.
      trainable_params: a regex searched (`re.search`) in each param's '/'-joined path, e.g.
        "decoder/" or "^encoder/.*/attention/"; params it does not match get no update at all.
        None = every param is trained.
    """

    name: str = "adafactor"
    state_dtype: str = "float32"
    lr_schedule: str = "rsqrt"
    base_learning_rate: float = 1.0
    warmup_steps: int = 10_000
    decay_steps: int | None = None
    end_learning_rate: float = 0.0
    weight_decay: float | None = None
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    decay_rate: float = 0.8
    clipping_threshold: float | None = 1.0
    multiply_by_parameter_scale: bool = True
    epsilon1: float = 1e-30
    epsilon2: float = 1e-3
    factored: bool = True
    min_dim_size_to_factor: int = 128
    freeze_router: bool = False
    router_learning_rate_multiplier: float = 1.0
    trainable_params: str | None = None

    def __post_init__(self):
        problems = self._name_problems() + self._schedule_problems() + self._setting_problems()
        problems += self._control_problems()
        if problems:
            raise OptimizerConfigError("Invalid OptimizerConfig: " + "; ".join(problems))

    def _name_problems(self) -> list[str]:
        problems = []
        if self.name not in _OPTIMIZER_BUILDERS:
            problems.append(
                f"unknown optimizer {self.name!r}: use {_quoted(_OPTIMIZER_BUILDERS)} (or "
                "register one with switch_t5.optim.register_optimizer)"
            )
        if self.state_dtype not in STATE_DTYPES:
            problems.append(f"state_dtype={self.state_dtype!r}: use {_quoted(STATE_DTYPES)}")
        return problems

    def _schedule_problems(self) -> list[str]:
        problems = []
        if self.lr_schedule not in SCHEDULES:
            problems.append(
                f"unknown learning-rate schedule {self.lr_schedule!r}: use {_quoted(SCHEDULES)}"
            )
        if not errors.is_number(self.base_learning_rate) or self.base_learning_rate < 0:
            problems.append(f"base_learning_rate={self.base_learning_rate!r} must be >= 0")
        if not errors.is_int(self.warmup_steps) or self.warmup_steps < 0:
            problems.append(f"warmup_steps={self.warmup_steps!r} must be an integer >= 0")
        elif self.lr_schedule in _RSQRT_SCHEDULES and self.warmup_steps == 0:
            problems.append(f"warmup_steps=0 must be positive for the {self.lr_schedule} schedule")
        if self.lr_schedule == "cosine" and (
            not errors.is_int(self.decay_steps)
            or not errors.is_int(self.warmup_steps)
            or self.decay_steps <= self.warmup_steps
        ):
            problems.append(
                f"the cosine schedule needs decay_steps > warmup_steps, got "
                f"decay_steps={self.decay_steps}, warmup_steps={self.warmup_steps}"
            )
        return problems

    def _setting_problems(self) -> list[str]:
        problems = []
        if self.weight_decay is not None and (
            not errors.is_number(self.weight_decay) or self.weight_decay < 0
        ):
            problems.append(f"weight_decay={self.weight_decay!r} must be >= 0 or None")
        for field in ("b1", "b2"):
            value = getattr(self, field)
            if not errors.is_number(value) or not 0 <= value < 1:
                problems.append(f"{field}={value!r} must be in [0, 1) (AdamW's moment decay)")
        for field in ("eps", "decay_rate", "epsilon1", "epsilon2"):
            value = getattr(self, field)
            if not errors.is_number(value) or value < 0:
                problems.append(f"{field}={value!r} must be >= 0")
        if self.clipping_threshold is not None and (
            not errors.is_number(self.clipping_threshold) or self.clipping_threshold <= 0
        ):
            problems.append(
                f"clipping_threshold={self.clipping_threshold!r} must be > 0 or None (no clipping)"
            )
        if not errors.is_int(self.min_dim_size_to_factor) or self.min_dim_size_to_factor < 1:
            problems.append(f"min_dim_size_to_factor={self.min_dim_size_to_factor!r} must be >= 1")
        return problems

    def _control_problems(self) -> list[str]:
        problems = []
        if not isinstance(self.freeze_router, bool):
            problems.append(f"freeze_router={self.freeze_router!r} must be True or False")
        multiplier = self.router_learning_rate_multiplier
        if not errors.is_number(multiplier) or not 0 <= multiplier < math.inf:
            problems.append(
                f"router_learning_rate_multiplier={multiplier!r} must be a number >= 0 "
                "(0 = frozen router)"
            )
        if self.trainable_params is not None:
            if not isinstance(self.trainable_params, str):
                problems.append(
                    f"trainable_params={self.trainable_params!r} must be a regex string or None"
                )
            else:
                try:
                    re.compile(self.trainable_params)
                except re.error as e:
                    problems.append(
                        f"trainable_params={self.trainable_params!r} is not a valid regex ({e}): "
                        "fix it, e.g. 'decoder/' trains only the decoder"
                    )
        return problems

    @property
    def controls_updates(self) -> bool:
        """Whether some params' updates are frozen or scaled (`control_updates`)."""
        return (
            self.freeze_router
            or self.router_learning_rate_multiplier != 1.0
            or self.trainable_params is not None
        )

    def make_schedule(self) -> Schedule:
        """The learning rate as a function of the step (`make_schedule` of these fields)."""
        return make_schedule(
            self.lr_schedule,
            self.base_learning_rate,
            self.warmup_steps,
            self.decay_steps,
            self.end_learning_rate,
        )


def _quoted(names) -> str:
    names = [repr(n) for n in names]
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " or " + names[-1]


# name -> builder(config, schedule, logical_specs) -> Optimizer.
OptimizerBuilder = Callable[[OptimizerConfig, Schedule, Any], Optimizer]
_OPTIMIZER_BUILDERS: dict[str, OptimizerBuilder] = {}
# The registered optimizer names (entry points validate against them before compiling); kept
# up to date by `register_optimizer`, so read it as `optim.OPTIMIZERS` at call time.
OPTIMIZERS: tuple[str, ...] = ()


def register_optimizer(name: str, builder: OptimizerBuilder) -> OptimizerBuilder:
    """Makes `OptimizerConfig(name=name)` build its Optimizer with `builder`.

    Args:
      name: the optimizer's name (`OptimizerConfig.name`, gin `train.optimizer`).
      builder: (config, schedule, logical_specs) -> Optimizer; logical_specs are the params'
        logical PartitionSpecs, or None (no per-expert structure known).

    Returns:
      `builder`, so that this can decorate it.
    """
    global OPTIMIZERS
    _OPTIMIZER_BUILDERS[name] = builder
    OPTIMIZERS = tuple(_OPTIMIZER_BUILDERS)
    return builder


def unregister_optimizer(name: str) -> None:
    """Forgets a registered optimizer (tests, or a module that replaces one)."""
    global OPTIMIZERS
    _OPTIMIZER_BUILDERS.pop(name, None)
    OPTIMIZERS = tuple(_OPTIMIZER_BUILDERS)


def optax_state_shardings(tx: optax.GradientTransformation) -> Callable[[Any, Any], Any]:
    """State shardings of an optax transformation whose per-param state mirrors the params
    (AdamW's moments, SGD's momentum): each like its param; counts and the rest replicated."""

    def shardings(param_shardings, abstract_params):
        state = jax.eval_shape(tx.init, abstract_params)
        mesh = partitioning.run_mesh(param_shardings)
        return optax.tree_map_params(
            tx,
            lambda _, s: s,
            state,
            param_shardings,
            transform_non_params=lambda _: NamedSharding(mesh, PartitionSpec()),
        )

    return shardings


def _build_adafactor(config: OptimizerConfig, schedule: Schedule, logical_specs: Any) -> Optimizer:
    batch_axes = None if logical_specs is None else batch_axes_from_logical(logical_specs)
    tx = adafactor(
        schedule,
        batch_axes,
        decay_rate=config.decay_rate,
        clipping_threshold=config.clipping_threshold,
        multiply_by_parameter_scale=config.multiply_by_parameter_scale,
        epsilon1=config.epsilon1,
        epsilon2=config.epsilon2,
        factored=config.factored,
        min_dim_size_to_factor=config.min_dim_size_to_factor,
        weight_decay_rate=config.weight_decay,
        state_dtype=jnp.dtype(config.state_dtype),
    )

    def shardings(param_shardings, abstract_params):
        return adafactor_state_shardings(
            param_shardings,
            abstract_params,
            batch_axes,
            factored=config.factored,
            min_dim_size_to_factor=config.min_dim_size_to_factor,
        )

    return Optimizer(config.name, tx, schedule, shardings)


def _build_adamw(config: OptimizerConfig, schedule: Schedule, logical_specs: Any) -> Optimizer:
    del logical_specs  # AdamW's moments are elementwise: no per-expert structure to mark
    tx = optax.adamw(
        schedule,
        b1=config.b1,
        b2=config.b2,
        eps=config.eps,
        weight_decay=0.01 if config.weight_decay is None else config.weight_decay,
        mu_dtype=jnp.dtype(config.state_dtype),
    )
    return Optimizer(config.name, tx, schedule, optax_state_shardings(tx))


register_optimizer("adafactor", _build_adafactor)
register_optimizer("adamw", _build_adamw)


# ---------------------------------------------------------------------------------------------
# Frozen and scaled params (fine-tuning's router control).
# ---------------------------------------------------------------------------------------------

# The router selector, the ONE place that says which params are the routers': every MoE layer's
# `.../mlp/router/w/kernel` (`routing.Router`, named "router" by `moe.MoeLayer`), scanned
# (`.../layers/subblock_1/mlp/router/...`) or not (`.../layers_1/mlp/router/...`).
ROUTER_PARAMS = r"(^|/)router/"


def param_path(key_path: Sequence[Any]) -> str:
    """The '/'-joined name of a param from its jax key path ("encoder/layers_1/mlp/...")."""
    return "/".join(
        str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in key_path
    )


def update_scale(config: OptimizerConfig, path: str) -> float:
    """What the optimizer's update of the param at `path` is multiplied by (0 = frozen)."""
    if config.trainable_params is not None and not re.search(config.trainable_params, path):
        return 0.0
    if re.search(ROUTER_PARAMS, path):
        return 0.0 if config.freeze_router else float(config.router_learning_rate_multiplier)
    return 1.0


def control_updates(
    tx: optax.GradientTransformation, config: OptimizerConfig
) -> optax.GradientTransformation:
    """`tx` whose updates are frozen or scaled per param (`update_scale`), its state unchanged.

    The whole update of a param (the optimizer's step, Adafactor's and AdamW's decoupled weight
    decay included) is multiplied by its scale, after `tx`; a scale of 0 replaces it by -0.0, so
    `param + update` is the param bit for bit (-0.0 keeps even a -0.0 param, and a NaN step of a
    frozen param cannot leak). Frozen params get no update at all.

    Why a final transform and not `optax.multi_transform` + `set_to_zero`: the optimizer state
    stays the same tree whatever the flags, so a run resumes with any of them toggled (frozen
    params stay bitwise fixed from the resumed step on; unfrozen ones continue with moments
    that kept tracking their gradients), an initial checkpoint or a checkpoint of another run
    restores unchanged, and the state shardings and `plan`'s memory estimate do not depend on
    them. The cost: the state of frozen params is still allocated and updated, and their
    gradients still computed. For the routers that is nothing (Adafactor: [embed] + [experts]
    per layer when factored, else [embed, experts]); with `trainable_params` freezing most of
    a model it is Adafactor's factored moments (rows + cols per matrix) or, with AdamW, two
    moments the size of the frozen params.

    Raises:
      OptimizerConfigError: (from init) `trainable_params` matches none of the params.
    """
    if not config.controls_updates:
        return tx  # the defaults: the optimizer itself, so its steps are unchanged bit for bit
    inner = optax.with_extra_args_support(tx)

    def init_fn(params):
        paths = [param_path(p) for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]]
        if config.trainable_params is not None and not any(
            re.search(config.trainable_params, p) for p in paths
        ):
            raise OptimizerConfigError(
                f"trainable_params={config.trainable_params!r} matches none of the model's "
                f"params (e.g. {paths[0]!r}): fix the regex or leave it None to train all"
            )
        return inner.init(params)

    def update_fn(updates, state, params=None, **extra_args):
        updates, state = inner.update(updates, state, params, **extra_args)

        def scaled(key_path, u):
            scale = update_scale(config, param_path(key_path))
            if scale == 0.0:
                return jnp.full_like(u, -0.0)
            return u if scale == 1.0 else (u * scale).astype(u.dtype)

        return jax.tree_util.tree_map_with_path(scaled, updates), state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def make_optimizer(
    config: OptimizerConfig | str = OptimizerConfig(),
    schedule: Schedule | None = None,
    logical_specs: Any = None,
    **settings: Any,
) -> Optimizer:
    """Builds the optimizer `config` names through the registry (`register_optimizer`).

    Args:
      config: an OptimizerConfig; or, as before it existed, an optimizer name, with the other
        OptimizerConfig fields given as keyword `settings` (e.g. `weight_decay=`, `b1=`,
        `state_dtype=`, `min_dim_size_to_factor=`).
      schedule: learning rate per step; None = `config.make_schedule()`.
      logical_specs: logical PartitionSpecs of the params (marks per-expert matrices).

    Returns:
      The registered builder's Optimizer; with `freeze_router`, a router multiplier or
      `trainable_params` set, its `tx` wrapped by `control_updates` (same state).

    Raises:
      OptimizerConfigError: an unknown name or invalid settings (all of them listed).
    """
    if isinstance(config, str):
        config = OptimizerConfig(name=config, **settings)
    elif settings:
        raise TypeError(
            f"make_optimizer got an OptimizerConfig and settings {sorted(settings)}: put them "
            "in the config (dataclasses.replace)"
        )
    if schedule is None:
        schedule = config.make_schedule()
    optimizer = _OPTIMIZER_BUILDERS[config.name](config, schedule, logical_specs)
    # Frozen / scaled params: a final transform; the state (and its shardings) are unchanged.
    return dataclasses.replace(optimizer, tx=control_updates(optimizer.tx, config))


def state_bytes(state: Any) -> int:
    """Bytes held by a state tree of arrays / ShapeDtypeStructs."""
    return int(sum(np.prod(x.shape) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(state)))
