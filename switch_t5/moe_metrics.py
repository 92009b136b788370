"""The MoE losses and metrics: one declaration per metric, read everywhere it travels.

A router computes its losses and metrics by name (`routing.RouterOutput`); each MoE layer sows
them into the "intermediates" collection (`moe.MoeLayer`); `moe.collect_moe_intermediates`
reduces them over the MoE layer calls; the train step averages them over microbatches and
returns them, `trainer.EvalAccumulator` over eval batches; `metrics_logging` writes them to
metrics.jsonl, TensorBoard, the progress line and the plots. Each of those steps reads the
declarations below, so a new metric is one `MoeMetric` here (or one `register` call) plus the
router that computes it.

The train loop averages every step metric over the steps of a log interval
(`switch_t5.train`), whatever `over_steps` says.

Shape legend: L = MoE layer calls, e = experts.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable

import numpy as np

# Where a metric is shown.
JSONL = "jsonl"  # MODEL_DIR/metrics.jsonl (a per-layer metric as nested lists [L][...])
TENSORBOARD = "tensorboard"  # a scalar tag, or one histogram per layer (`name/layer_i`)
PROGRESS = "progress"  # the plain progress line (`... name 0.123`); scalars only
PLOT = "plot"  # MODEL_DIR/plots/<plot_file>.png: heatmap MoE layers x last axis (per-layer only)
SHOWN_IN = (JSONL, TENSORBOARD, PROGRESS, PLOT)
OVER_LAYERS = ("mean", "stack")
OVER_STEPS = ("mean", "sum")


@dataclasses.dataclass(frozen=True)
class MoeMetric:
    """How one MoE loss or metric is reduced and where it is shown.

    Attributes:
      name: the key everywhere: sown intermediates, step metrics, metrics.jsonl, TensorBoard.
      ndim: dimensions of one layer call's value (0: <float32>[]; 1: e.g. <float32>[e]); extra
        leading axes (`nn.scan`'s stacked layers) count as more layer calls.
      over_layers: "mean" over the MoE layer calls (-> the call's shape) or "stack" them
        (-> [L, ...], rows in encoder-then-decoder layer order, `trainer.moe_layer_names`).
      over_steps: "mean" or "sum" over the microbatches of a train step and the batches of an
        evaluation.
      splits: where it is computed and logged ("train", "eval").
      shown: a subset of `SHOWN_IN`.
      loss_weight: the `trainer.LossConfig` field that weights this auxiliary loss in the
        objective (None: a metric, not in the loss).
      empty: the reduced value's shape when the model has no MoE layer (a dense model logs
        zeros / empty rows under the same names).
      plot_file: file stem of the PLOT heatmap.
      plot_title: its title; `{step}` and `{balanced}` (1 / last-axis size) are filled in.
      summary: TensorBoard scalars derived from a stacked value: tag -> fn(<float>[L, ...]).
      description: one line for docs and plots.
    """

    name: str
    ndim: int = 0
    over_layers: str = "mean"
    over_steps: str = "mean"
    splits: tuple[str, ...] = ("train", "eval")
    shown: frozenset[str] = frozenset({JSONL, TENSORBOARD})
    loss_weight: str | None = None
    empty: tuple[int, ...] = ()
    plot_file: str | None = None
    plot_title: str = ""
    summary: tuple[tuple[str, Callable[[np.ndarray], float]], ...] = ()
    description: str = ""

    def __post_init__(self):
        problems = []
        if self.over_layers not in OVER_LAYERS:
            problems.append(f"over_layers={self.over_layers!r}: use one of {OVER_LAYERS}")
        if self.over_steps not in OVER_STEPS:
            problems.append(f"over_steps={self.over_steps!r}: use one of {OVER_STEPS}")
        if not set(self.shown) <= set(SHOWN_IN):
            problems.append(f"shown={sorted(self.shown)}: use a subset of {SHOWN_IN}")
        if PLOT in self.shown and (self.over_layers != "stack" or not self.plot_file):
            problems.append("a plotted metric needs over_layers='stack' and a plot_file")
        if problems:
            raise ValueError(f"MoeMetric {self.name!r}: " + "; ".join(problems))


def _load_imbalance(usage: np.ndarray) -> float:
    # max load / mean load per layer, averaged: 1.0 = perfectly balanced experts.
    return float(np.mean(usage.max(-1) * usage.shape[-1]))


_BUILTIN = (
    MoeMetric(
        "load_balancing_loss",
        loss_weight="load_balancing_loss_weight",
        description="Switch auxiliary loss N sum_i f_i P_i (arXiv 2101.03961 eq. 4); 1 = uniform",
    ),
    MoeMetric(
        "router_z_loss",
        loss_weight="router_z_loss_weight",
        description="ST-MoE router z-loss, mean logsumexp(router logits)^2 (arXiv 2202.08906)",
    ),
    MoeMetric(
        "sequence_balance_loss",
        loss_weight="sequence_balance_loss_weight",
        splits=("train",),
        description="DeepSeek-V3 sequence-wise balance loss (arXiv 2412.19437 eq. 17); "
        "1 = uniform; only with SwitchConfig.sequence_balance_loss_weight > 0",
    ),
    MoeMetric(
        "fraction_dropped",
        description="dropped (token, choice) pairs / real pairs (expert choice: real tokens no "
        "expert took)",
    ),
    MoeMetric(
        "fraction_multi_routed",
        description="real tokens that more than one expert took / real tokens (expert choice)",
    ),
    MoeMetric("router_confidence", description="mean top-1 router probability"),
    MoeMetric(
        "expert_usage",
        ndim=1,
        over_layers="stack",
        shown=frozenset({JSONL, TENSORBOARD, PLOT}),
        empty=(0, 0),
        plot_file="expert_load",
        plot_title="fraction of tokens routed (step {step}; balanced = {balanced:.3f})",
        summary=(("expert_load_imbalance", _load_imbalance),),
        description="fraction of real (token, choice) pairs routed to each expert, before capacity",
    ),
    MoeMetric(
        "max_load_over_mean",
        over_layers="stack",
        empty=(0,),
        description="per MoE layer: the busiest expert's pre-capacity load over the mean load "
        "(1 = balanced; token-choice routers)",
    ),
    MoeMetric(
        "tokens_per_expert",
        ndim=1,
        over_layers="stack",
        shown=frozenset({JSONL, TENSORBOARD, PLOT}),
        empty=(0, 0),
        plot_file="tokens_per_expert",
        plot_title="tokens each expert processed (step {step})",
        description="tokens each expert actually processed (kept after capacity), all groups",
    ),
)

_METRICS: dict[str, MoeMetric] = {m.name: m for m in _BUILTIN}


def register(metric: MoeMetric) -> None:
    """Declares a metric that a router returns (its name must be new)."""
    if metric.name in _METRICS:
        raise ValueError(f"MoE metric {metric.name!r} is already declared")
    _METRICS[metric.name] = metric


def unregister(name: str) -> None:
    """Removes a metric declared with `register` (the built-in ones stay)."""
    if name in {m.name for m in _BUILTIN}:
        raise ValueError(f"{name!r} is a built-in MoE metric")
    _METRICS.pop(name, None)


def get(name: str) -> MoeMetric:
    """The declaration of `name`; a ValueError names the declared ones."""
    if name not in _METRICS:
        raise ValueError(
            f"MoE metric {name!r} is not declared; declare it with "
            f"switch_t5.moe_metrics.register (declared: {', '.join(_METRICS)})"
        )
    return _METRICS[name]


def all_metrics(split: str | None = None) -> tuple[MoeMetric, ...]:
    """Every declared metric in declaration order (those of `split` when given)."""
    return tuple(m for m in _METRICS.values() if split is None or split in m.splits)


def present(values: Iterable[str], split: str | None = None) -> tuple[MoeMetric, ...]:
    """The declared metrics (of `split`) among the keys `values`, in declaration order."""
    keys = set(values)
    return tuple(m for m in all_metrics(split) if m.name in keys)


def reduce_steps(metric: MoeMetric, total, count: int):
    """A sum over `count` microbatches or eval batches, reduced as `metric.over_steps` says."""
    return total / count if metric.over_steps == "mean" else total
