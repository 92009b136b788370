"""Metrics for text-to-text evaluation: GLUE, SuperGLUE and user tasks.

Every metric follows seqio's `metric_fns` convention: `fn(targets: list, predictions: list) ->
dict[str, float]`, where targets and predictions are what the task's postprocessor returned.
Values are percentages (0-100), the scale T5 reports (arXiv 1910.10683, tables 14-16), and the
dictionary keys are T5's, so `glue_average` can combine results of either framework.

The math is scikit-learn's and scipy's; this module only adds T5's conventions:

* `f1_score_with_invalid`: a prediction that is neither 0 nor 1 (a postprocessor returns -1 for
  text that is no label) counts as wrong, not as a third class.
* MultiRC: F1a over all answer options, and exact match per question averaged over questions.
* ReCoRD and SQuAD-style tasks: SQuAD normalisation (lower case, no punctuation, no articles,
  single spaces), then the maximum over the gold answers of exact match and token F1.
* Correlations are undefined when predictions are constant; they are reported as NaN then,
  which is what scipy returns, rather than a made-up number.

This module imports neither TensorFlow nor seqio so that evaluation summaries stay cheap.
"""

from __future__ import annotations

import collections
import re
import string
from collections.abc import Callable, Hashable, Mapping, Sequence
from typing import Any

import numpy as np
import scipy.stats
import sklearn.metrics

from switch_t5 import errors

MetricFn = Callable[[Sequence[Any], Sequence[Any]], dict[str, float]]


def _check_pairs(targets: Sequence[Any], predictions: Sequence[Any], metric: str) -> None:
    if len(targets) != len(predictions):
        raise ValueError(
            f"{metric}: got {len(targets)} targets but {len(predictions)} predictions; "
            "pass one prediction per target, in the same order."
        )
    if not targets:
        raise errors.UserError(
            f"{metric}: no examples to score (targets and predictions are empty)."
        )


def accuracy(targets: Sequence[Any], predictions: Sequence[Any]) -> dict[str, float]:
    """Percentage of predictions equal to their target (class ids or strings)."""
    _check_pairs(targets, predictions, "accuracy")
    return {"accuracy": 100.0 * float(sklearn.metrics.accuracy_score(targets, predictions))}


def f1_score_with_invalid(targets: Sequence[int], predictions: Sequence[int]) -> dict[str, float]:
    """Binary F1 of class 1, where a prediction other than 0 or 1 counts as wrong.

    Args:
      targets: class ids, each 0 or 1.
      predictions: class ids; -1 (or any other value) marks text that was not a label and is
        scored as the opposite of its target, as in T5.

    Returns:
      `{"f1": ...}` in percent.
    """
    _check_pairs(targets, predictions, "f1")
    targets_arr = np.asarray(targets, dtype=np.int64)
    predictions_arr = np.array(predictions, dtype=np.int64)
    if not np.isin(targets_arr, (0, 1)).all():
        raise errors.UserError(
            f"f1: targets must be class ids 0 or 1, got {sorted(set(targets_arr.tolist()))}; "
            "for more than two classes use 'macro_f1' or 'accuracy'."
        )
    invalid = ~np.isin(predictions_arr, (0, 1))
    predictions_arr[invalid] = 1 - targets_arr[invalid]
    return {
        "f1": 100.0 * float(sklearn.metrics.f1_score(targets_arr, predictions_arr, zero_division=0))
    }


def matthews_corrcoef(targets: Sequence[Any], predictions: Sequence[Any]) -> dict[str, float]:
    """Matthews correlation coefficient (CoLA's metric), times 100."""
    _check_pairs(targets, predictions, "matthews_corrcoef")
    value = sklearn.metrics.matthews_corrcoef(targets, predictions)
    return {"matthews_corrcoef": 100.0 * float(value)}


def _correlation(
    name: str,
    correlate: Callable[[np.ndarray, np.ndarray], Any],
    targets: Sequence[float],
    predictions: Sequence[float],
) -> dict[str, float]:
    """{name: 100 * correlate(targets, predictions)[0]}; NaN when either side is constant."""
    _check_pairs(targets, predictions, name)
    if len(targets) < 2:
        raise errors.UserError(f"{name}: needs at least 2 examples.")
    t, p = np.asarray(targets, np.float64), np.asarray(predictions, np.float64)
    if np.ptp(t) == 0 or np.ptp(p) == 0:
        return {name: float("nan")}
    return {name: 100.0 * float(correlate(t, p)[0])}


def pearson_corrcoef(targets: Sequence[float], predictions: Sequence[float]) -> dict[str, float]:
    """Pearson correlation (STS-B), times 100; NaN when either side is constant."""
    return _correlation("pearson_corrcoef", scipy.stats.pearsonr, targets, predictions)


def spearman_corrcoef(targets: Sequence[float], predictions: Sequence[float]) -> dict[str, float]:
    """Spearman rank correlation (STS-B), times 100; NaN when either side is constant."""
    return _correlation("spearman_corrcoef", scipy.stats.spearmanr, targets, predictions)


def mean_multiclass_f1(num_classes: int) -> MetricFn:
    """Returns the unweighted mean over classes `0..num_classes-1` of per-class F1 (CB's F1).

    A prediction outside the classes (-1) lowers the recall of its target's class and adds no
    true positive anywhere. The key is T5's: `mean_{num_classes}class_f1`.
    """
    if num_classes < 2:
        raise errors.UserError(f"mean_multiclass_f1 needs at least 2 classes, got {num_classes}.")
    key = f"mean_{num_classes}class_f1"

    def macro_f1(targets: Sequence[int], predictions: Sequence[int]) -> dict[str, float]:
        _check_pairs(targets, predictions, key)
        value = sklearn.metrics.f1_score(
            targets, predictions, labels=list(range(num_classes)), average="macro", zero_division=0
        )
        return {key: 100.0 * float(value)}

    macro_f1.__name__ = key
    return macro_f1


def _group_value(item: Any, metric: str) -> tuple[Hashable, Any]:
    if not isinstance(item, Mapping) or "group" not in item or "value" not in item:
        raise ValueError(
            f"{metric}: each target must be a dict with 'group' and 'value' (what the task's "
            f"postprocessor returns for targets), got {item!r}."
        )
    group = item["group"]
    if isinstance(group, np.ndarray):
        group = tuple(group.tolist())
    elif isinstance(group, np.generic):
        group = group.item()
    return group, item["value"]


def _values(items: Sequence[Any], metric: str) -> list[Any]:
    out = []
    for item in items:
        if not isinstance(item, Mapping) or "value" not in item:
            raise ValueError(
                f"{metric}: each prediction must be a dict with 'value', got {item!r}."
            )
        out.append(item["value"])
    return out


def multirc_f1_over_all_answers(
    targets: Sequence[Mapping[str, Any]], predictions: Sequence[Mapping[str, Any]]
) -> dict[str, float]:
    """MultiRC F1a: binary F1 over every (question, answer option) pair, key `f1`."""
    _check_pairs(targets, predictions, "multirc f1")
    return f1_score_with_invalid(_values(targets, "multirc f1"), _values(predictions, "multirc f1"))


def multirc_exact_match(
    targets: Sequence[Mapping[str, Any]], predictions: Sequence[Mapping[str, Any]]
) -> dict[str, float]:
    """MultiRC EM: per question, 100 if all its answer options are right; mean over questions."""
    _check_pairs(targets, predictions, "multirc exact_match")
    pred_values = _values(predictions, "multirc exact_match")
    grouped: dict[Hashable, tuple[list[Any], list[Any]]] = collections.defaultdict(lambda: ([], []))
    for target, prediction in zip(targets, pred_values):
        group, value = _group_value(target, "multirc exact_match")
        grouped[group][0].append(value)
        grouped[group][1].append(prediction)
    scores = [100.0 * float(t == p) for t, p in grouped.values()]
    return {"exact_match": float(np.mean(scores))}


def normalize_squad(text: str) -> str:
    """SQuAD v1.1 answer normalisation: lower case, drop punctuation and articles, fix spaces."""
    text = text.lower()
    text = "".join(ch for ch in text if ch not in _PUNCTUATION)
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


_PUNCTUATION = frozenset(string.punctuation)


def _token_f1(target: str, prediction: str) -> float:
    target_tokens, prediction_tokens = target.split(), prediction.split()
    common = collections.Counter(target_tokens) & collections.Counter(prediction_tokens)
    num_same = sum(common.values())
    if num_same == 0:
        return 0.0
    precision = num_same / len(prediction_tokens)
    recall = num_same / len(target_tokens)
    return 2 * precision * recall / (precision + recall)


def squad(targets: Sequence[Sequence[str]], predictions: Sequence[str]) -> dict[str, float]:
    """Exact match and token F1, each the maximum over an example's gold answers.

    Args:
      targets: per example, the list of acceptable answers (at least one).
      predictions: per example, the predicted answer text.

    Returns:
      `{"em": ..., "f1": ...}` in percent, after `normalize_squad` on both sides.
    """
    _check_pairs(targets, predictions, "squad")
    em, f1 = [], []
    for answers, prediction in zip(targets, predictions):
        if isinstance(answers, str) or not answers:
            raise ValueError(
                f"squad: each target must be a non-empty list of answers, got {answers!r}."
            )
        gold = [normalize_squad(a) for a in answers]
        pred = normalize_squad(prediction)
        em.append(max(float(g == pred) for g in gold))
        f1.append(max(_token_f1(g, pred) for g in gold))
    return {"em": 100.0 * float(np.mean(em)), "f1": 100.0 * float(np.mean(f1))}


def record(
    targets: Sequence[Mapping[str, Any]], predictions: Sequence[Mapping[str, Any]]
) -> dict[str, float]:
    """ReCoRD: SQuAD EM/F1 over answers, one example per (passage, query) group.

    ReCoRD's training format repeats a query once per gold answer; at evaluation only the
    first copy of each group counts (T5's `deduplicate_metric`), with all answers as gold.
    """
    _check_pairs(targets, predictions, "record")
    pred_values = _values(predictions, "record")
    seen: set[Hashable] = set()
    answers, preds = [], []
    for target, prediction in zip(targets, pred_values):
        group, value = _group_value(target, "record")
        if group in seen:
            continue
        seen.add(group)
        answers.append(list(value))
        preds.append(prediction)
    return squad(answers, preds)


def squad_single_answer(targets: Sequence[str], predictions: Sequence[str]) -> dict[str, float]:
    """SQuAD EM/F1 against one free-text target per example."""
    return squad([[t] for t in targets], predictions)


# Metric names accepted by `get_metric_fns` (the `METRICS` gin macro of user tasks). Each entry:
# (function or factory, what its targets must be).
_CLASS_IDS, _NUMBERS, _TEXT, _ANY = "class ids", "numbers", "text", "class ids or text"
_NAMED_METRICS: dict[str, tuple[Callable[..., Any], str]] = {
    "accuracy": (accuracy, _ANY),
    "f1": (f1_score_with_invalid, _CLASS_IDS),
    "macro_f1": (mean_multiclass_f1, _CLASS_IDS),
    "matthews_corrcoef": (matthews_corrcoef, _CLASS_IDS),
    "pearson": (pearson_corrcoef, _NUMBERS),
    "spearman": (spearman_corrcoef, _NUMBERS),
    "squad": (squad_single_answer, _TEXT),
}
_ALIASES = {
    "mcc": "matthews_corrcoef",
    "pearson_corrcoef": "pearson",
    "spearman_corrcoef": "spearman",
    "mean_multiclass_f1": "macro_f1",
}
METRIC_NAMES: tuple[str, ...] = tuple(sorted(_NAMED_METRICS))


def metric_target_kind(name: str) -> str:
    """What the targets of metric `name` must be: 'class ids', 'numbers', 'text' or either."""
    return _NAMED_METRICS[_canonical(name)][1]


def _canonical(name: str) -> str:
    key = _ALIASES.get(name, name)
    if key not in _NAMED_METRICS:
        raise errors.UserError(
            f"Unknown metric {name!r}. Known metrics: {', '.join(METRIC_NAMES)} "
            f"(aliases: {', '.join(sorted(_ALIASES))})."
        )
    return key


def get_metric_fns(names: Sequence[str], num_classes: int | None = None) -> list[MetricFn]:
    """Metric functions by name, e.g. `get_metric_fns(["accuracy", "f1"])`.

    Args:
      names: names from `METRIC_NAMES` (or an alias such as "mcc", "pearson_corrcoef").
      num_classes: number of labels; required by "macro_f1".

    Returns:
      The metric functions in the order given.
    """
    if isinstance(names, str):
        raise TypeError(f"metric names must be a list such as [{names!r}], not a string.")
    if not names:
        raise errors.UserError("No metrics given; name at least one, e.g. ['accuracy'].")
    fns = []
    for name in names:
        key = _canonical(name)
        fn = _NAMED_METRICS[key][0]
        if key == "macro_f1":
            if num_classes is None:
                raise errors.UserError(
                    "'macro_f1' needs the label names (LABEL_NAMES) to count classes."
                )
            fn = mean_multiclass_f1(num_classes)
        fns.append(fn)
    return fns


# The benchmark scores, with T5's grouping (t5/evaluation/eval_utils.py METRIC_NAMES): a group's
# metrics are averaged first (MRPC F1 and accuracy; MNLI matched and mismatched), then groups are
# averaged. WNLI and the diagnostics (AX, AXb, AXg) do not count, as in T5's tables.
GLUE_SCORE_GROUPS: dict[str, tuple[tuple[str, str], ...]] = {
    "CoLA": (("glue_cola_v002", "matthews_corrcoef"),),
    "SST-2": (("glue_sst2_v002", "accuracy"),),
    "MRPC": (("glue_mrpc_v002", "f1"), ("glue_mrpc_v002", "accuracy")),
    "STS-B": (("glue_stsb_v002", "pearson_corrcoef"), ("glue_stsb_v002", "spearman_corrcoef")),
    "QQP": (("glue_qqp_v002", "f1"), ("glue_qqp_v002", "accuracy")),
    "MNLI": (("glue_mnli_matched_v002", "accuracy"), ("glue_mnli_mismatched_v002", "accuracy")),
    "QNLI": (("glue_qnli_v002", "accuracy"),),
    "RTE": (("glue_rte_v002", "accuracy"),),
}
SUPER_GLUE_SCORE_GROUPS: dict[str, tuple[tuple[str, str], ...]] = {
    "BoolQ": (("super_glue_boolq_v102", "accuracy"),),
    "CB": (("super_glue_cb_v102", "mean_3class_f1"), ("super_glue_cb_v102", "accuracy")),
    "COPA": (("super_glue_copa_v102", "accuracy"),),
    "MultiRC": (("super_glue_multirc_v102", "f1"), ("super_glue_multirc_v102", "exact_match")),
    "ReCoRD": (("super_glue_record_v102", "f1"), ("super_glue_record_v102", "em")),
    "RTE": (("super_glue_rte_v102", "accuracy"),),
    "WiC": (("super_glue_wic_v102", "accuracy"),),
    "WSC": (("super_glue_wsc_v102_simple_eval", "accuracy"),),
}


def benchmark_average(
    results: Mapping[str, Mapping[str, float]],
    groups: Mapping[str, Sequence[tuple[str, str]]],
) -> float:
    """Mean over groups of the mean of each group's metrics.

    Args:
      results: `{task_name: {metric_name: value}}`, e.g. what an evaluation of a mixture returns.
      groups: `{group: ((task_name, metric_name), ...)}`, e.g. `GLUE_SCORE_GROUPS`.

    Returns:
      The benchmark average, in the metrics' scale (percent).
    """
    missing = [
        f"{task}/{metric}"
        for members in groups.values()
        for task, metric in members
        if metric not in results.get(task, {})
    ]
    if missing:
        raise errors.UserError(
            f"Cannot compute the benchmark average: no result for {', '.join(missing)}. "
            "Evaluate every task of the mixture on its validation split first."
        )
    group_means = [
        float(np.mean([results[task][metric] for task, metric in members]))
        for members in groups.values()
    ]
    return float(np.mean(group_means))


def glue_average(results: Mapping[str, Mapping[str, float]]) -> float:
    """The GLUE score ("Average GLUE Score" in T5) from per-task validation metrics."""
    return benchmark_average(results, GLUE_SCORE_GROUPS)


def super_glue_average(results: Mapping[str, Mapping[str, float]]) -> float:
    """The SuperGLUE score ("Average SuperGLUE Score" in T5) from per-task validation metrics."""
    return benchmark_average(results, SUPER_GLUE_SCORE_GROUPS)
