"""Metrics on small cases computed by hand (values in percent, T5's scale)."""

import math

import pytest

from switch_t5.data import metrics

REL, ABS = 1e-12, 1e-12  # float64 arithmetic on a handful of numbers


def test_accuracy_on_ids_and_strings():
    assert metrics.accuracy([0, 1, 1, 0], [0, 1, 0, 0]) == {"accuracy": 75.0}
    assert metrics.accuracy(["a", "b"], ["a", "c"]) == {"accuracy": 50.0}


def test_f1_counts_invalid_predictions_as_wrong():
    # -1 at index 1 (target 1) becomes 0: TP=2 (idx 0, 4), FP=1 (idx 3), FN=1 (idx 1) -> F1 2/3.
    out = metrics.f1_score_with_invalid([1, 1, 0, 0, 1], [1, -1, 0, 1, 1])
    assert out["f1"] == pytest.approx(200 / 3, rel=REL, abs=ABS)
    # -1 for a target 0 becomes a false positive: TP=1, FP=1 -> F1 2/3.
    out = metrics.f1_score_with_invalid([1, 0], [1, -1])
    assert out["f1"] == pytest.approx(200 / 3, rel=REL, abs=ABS)


def test_f1_rejects_multiclass_targets():
    with pytest.raises(ValueError, match="macro_f1"):
        metrics.f1_score_with_invalid([0, 2], [0, 2])


def test_matthews_corrcoef():
    # TP=1, TN=2, FP=0, FN=1: (1*2 - 0*1) / sqrt(1*2*2*3) = 2/sqrt(12).
    out = metrics.matthews_corrcoef([1, 1, 0, 0, 0], [1, 0, 0, 0, 0])
    tp, tn, fp, fn = 1, 3, 0, 1
    expected = (tp * tn - fp * fn) / math.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
    assert out["matthews_corrcoef"] == pytest.approx(100 * expected, rel=1e-12)
    out = metrics.matthews_corrcoef([1, 1, 0, 0], [1, 0, 0, 0])
    assert out["matthews_corrcoef"] == pytest.approx(100 * 2 / math.sqrt(12), rel=1e-12)


def test_pearson_and_spearman():
    # Deviations [-1,0,1] and [-4/3,-1/3,5/3]: cov 3, var 2 and 42/9 -> r = 9/sqrt(84).
    out = metrics.pearson_corrcoef([1.0, 2.0, 3.0], [1.0, 2.0, 4.0])
    assert out["pearson_corrcoef"] == pytest.approx(100 * 9 / math.sqrt(84), rel=1e-12)
    # Rank differences [0,-1,1,0]: rho = 1 - 6*2/(4*15) = 0.8.
    out = metrics.spearman_corrcoef([1.0, 2.0, 3.0, 4.0], [1.0, 3.0, 2.0, 4.0])
    assert out["spearman_corrcoef"] == pytest.approx(80.0, rel=1e-12)
    assert math.isnan(metrics.pearson_corrcoef([1.0, 2.0], [3.0, 3.0])["pearson_corrcoef"])
    assert math.isnan(metrics.spearman_corrcoef([1.0, 2.0], [3.0, 3.0])["spearman_corrcoef"])


def test_cb_macro_f1_and_accuracy():
    targets, predictions = [0, 1, 2, 0], [0, 2, 2, -1]
    # Class 0: P=1, R=1/2 -> 2/3; class 1: no TP -> 0; class 2: P=1/2, R=1 -> 2/3. Mean 4/9.
    out = metrics.mean_multiclass_f1(3)(targets, predictions)
    assert out == {"mean_3class_f1": pytest.approx(400 / 9, rel=1e-12)}
    assert metrics.accuracy(targets, predictions) == {"accuracy": 50.0}


def test_multirc_f1a_and_exact_match():
    targets = [
        {"group": 0, "value": 1},
        {"group": 0, "value": 0},
        {"group": 1, "value": 1},
        {"group": 2, "value": 0},
    ]
    predictions = [{"value": 1}, {"value": 0}, {"value": 0}, {"value": -1}]
    # F1a over [1,0,1,0] vs [1,0,0,1(-1 -> wrong)]: TP=1, FP=1, FN=1 -> 1/2.
    assert metrics.multirc_f1_over_all_answers(targets, predictions)["f1"] == pytest.approx(50.0)
    # Questions: 0 all right, 1 wrong, 2 wrong -> 1/3.
    out = metrics.multirc_exact_match(targets, predictions)
    assert out["exact_match"] == pytest.approx(100 / 3, rel=1e-12)


def test_record_max_over_answers_one_copy_per_query():
    targets = [
        {"group": (0, 0), "value": ["Obama", "Barack Obama"]},
        {"group": (0, 0), "value": ["Obama", "Barack Obama"]},  # duplicate copy: ignored
        {"group": (0, 1), "value": ["the Senate"]},
    ]
    predictions = [{"value": "barack Obama."}, {"value": "wrong"}, {"value": "Senate floor"}]
    out = metrics.record(targets, predictions)
    # Query 1: exact after normalisation. Query 2: "senate" vs "senate floor": P=1/2, R=1 -> 2/3.
    assert out["em"] == pytest.approx(50.0, rel=1e-12)
    assert out["f1"] == pytest.approx(100 * (1 + 2 / 3) / 2, rel=1e-12)


def test_normalize_squad():
    assert metrics.normalize_squad("  The  Quick, brown-fox! an Apple") == "quick brownfox apple"


def test_get_metric_fns_by_name():
    fns = metrics.get_metric_fns(["accuracy", "mcc", "macro_f1"], num_classes=3)
    assert [f.__name__ for f in fns] == ["accuracy", "matthews_corrcoef", "mean_3class_f1"]
    assert metrics.metric_target_kind("pearson_corrcoef") == "numbers"
    with pytest.raises(ValueError, match=r"Unknown metric 'acc'.*accuracy"):
        metrics.get_metric_fns(["acc"])
    with pytest.raises(ValueError, match="LABEL_NAMES"):
        metrics.get_metric_fns(["macro_f1"])
    with pytest.raises(TypeError, match=r"\['accuracy'\]"):
        metrics.get_metric_fns("accuracy")


def test_mismatched_or_empty_inputs_fail_clearly():
    with pytest.raises(ValueError, match="2 targets but 1 predictions"):
        metrics.accuracy([0, 1], [0])
    with pytest.raises(ValueError, match="no examples"):
        metrics.accuracy([], [])
    with pytest.raises(ValueError, match="'group' and 'value'"):
        metrics.multirc_exact_match([1], [{"value": 1}])


def _glue_results(**overrides):
    results = {
        "glue_cola_v002": {"matthews_corrcoef": 50.0},
        "glue_sst2_v002": {"accuracy": 90.0},
        "glue_mrpc_v002": {"f1": 90.0, "accuracy": 80.0},
        "glue_stsb_v002": {"pearson_corrcoef": 88.0, "spearman_corrcoef": 86.0},
        "glue_qqp_v002": {"f1": 70.0, "accuracy": 90.0},
        "glue_mnli_matched_v002": {"accuracy": 84.0},
        "glue_mnli_mismatched_v002": {"accuracy": 86.0},
        "glue_qnli_v002": {"accuracy": 91.0},
        "glue_rte_v002": {"accuracy": 71.0},
        "glue_wnli_v002": {"accuracy": 0.0},  # not part of the score
    }
    results.update(overrides)
    return results


def test_glue_average_averages_within_then_across_tasks():
    # Groups: 50, 90, 85, 87, 80, 85, 91, 71 -> 639 / 8.
    assert metrics.glue_average(_glue_results()) == pytest.approx(639 / 8, rel=1e-12)


def test_super_glue_average():
    results = {
        "super_glue_boolq_v102": {"accuracy": 80.0},
        "super_glue_cb_v102": {"mean_3class_f1": 90.0, "accuracy": 96.0},
        "super_glue_copa_v102": {"accuracy": 70.0},
        "super_glue_multirc_v102": {"f1": 80.0, "exact_match": 40.0},
        "super_glue_record_v102": {"f1": 80.0, "em": 78.0},
        "super_glue_rte_v102": {"accuracy": 85.0},
        "super_glue_wic_v102": {"accuracy": 70.0},
        "super_glue_wsc_v102_simple_eval": {"accuracy": 80.0},
    }
    # Groups: 80, 93, 70, 60, 79, 85, 70, 80 -> 617 / 8.
    assert metrics.super_glue_average(results) == pytest.approx(617 / 8, rel=1e-12)


def test_glue_average_names_missing_results():
    results = _glue_results()
    del results["glue_mnli_mismatched_v002"]
    with pytest.raises(ValueError, match="glue_mnli_mismatched_v002/accuracy"):
        metrics.glue_average(results)
