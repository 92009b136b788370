"""GLUE and SuperGLUE as seqio tasks in T5's text-to-text formats, with T5's metrics.

`register_glue_tasks(vocabulary, tfds_data_dir=None)` registers (names as in T5 and T5X):

GLUE (TFDS `glue/<config>:2.0.0`; targets are the TFDS builder's label names; splits
train/validation/test unless noted):

    glue_cola_v002             cola sentence: ...
    glue_sst2_v002             sst2 sentence: ...
    glue_mrpc_v002             mrpc sentence1: ... sentence2: ...
    glue_qqp_v002              qqp question1: ... question2: ...
    glue_stsb_v002             stsb sentence1: ... sentence2: ...        -> e.g. "3.8"
    glue_mnli_v002             mnli hypothesis: ... premise: ...
                               (splits train, validation_matched, validation_mismatched,
                               test_matched, test_mismatched)
    glue_mnli_matched_v002     as MNLI (validation/test)
    glue_mnli_mismatched_v002  as MNLI (validation/test)
    glue_qnli_v002             qnli question: ... sentence: ...
    glue_rte_v002              rte sentence1: ... sentence2: ...
    glue_wnli_v002             wnli sentence1: ... sentence2: ...
    glue_ax_v002               as MNLI, the diagnostic set (test only)

SuperGLUE (TFDS `super_glue/<config>:1.0.2`):

    super_glue_boolq_v102      boolq passage: ... question: ...          -> False/True
    super_glue_cb_v102         cb hypothesis: ... premise: ...
    super_glue_copa_v102       copa choice1: ... choice2: ... premise: ... question: ...
                               -> choice1/choice2
    super_glue_multirc_v102    multirc question: ... answer: ... paragraph: ... (HTML removed)
    super_glue_record_v102     record query: ... entities: a, b passage: ...
                               (one example per gold answer)
    super_glue_rte_v102        rte hypothesis: ... premise: ...
    super_glue_wic_v102        wic sentence1: ... sentence2: ... word: ...
    super_glue_axb_v102        as RTE (test only)
    super_glue_axg_v102        as RTE (test only)
    super_glue_wsc_v102_simple_train  wsc: ... *pronoun* ...  -> the referent
                               (train split, correct referents only)
    super_glue_wsc_v102_simple_eval   the same on validation/test, scored by referent match
    dpr_v001_simple            DPR (`definite_pronoun_resolution:1.1.0`) in WSC's simple form,
                               trained on with WSC as in T5

Mixtures, rates proportional to training-set sizes (T5's `glue_utils` weights; zero-rate
members are evaluated but never trained on): `glue_v002_proportional` (GLUE without WNLI, whose
data T5 replaces with WSC/DPR) and `super_glue_v102_proportional`.

Metrics (percent, see `switch_t5.data.metrics`): CoLA Matthews correlation; MRPC/QQP F1 and
accuracy; STS-B Pearson and Spearman; CB macro-F1 over 3 classes and accuracy; MultiRC F1a and
per-question exact match; ReCoRD max-over-answers EM and F1; accuracy elsewhere; none for the
test-only diagnostics. Postprocessors map predicted text back to class ids (-1 for text that is
no label), to a float for STS-B, and to the dicts the MultiRC/ReCoRD metrics group by.

Every label string of a task (and STS-B's 26 scores "0.0" ... "5.0") must fit the targets length,
EOS included: a dataset requested with a shorter one raises `lengths.TargetLengthError` naming the
label and the length to set (`tasks.LengthCheckedTask`).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import seqio
import tensorflow_datasets as tfds

from switch_t5.data import hide_gpus_from_tf, metrics, preprocessors, tasks

hide_gpus_from_tf()  # tf.data runs on the host CPU only.

# The version the installed TFDS builds; 1.0.0, which T5 pinned, differs only in QQP's download
# URL (TFDS release notes), so results stay comparable.
GLUE_TFDS_VERSION = "2.0.0"
SUPER_GLUE_TFDS_VERSION = "1.0.2"
DPR_TFDS_VERSION = "1.1.0"

_SPLITS = ("train", "validation", "test")

# Mixing weights: training-set sizes, as in T5 (t5/data/glue_utils.py).
GLUE_WEIGHTS: dict[str, float] = {
    "glue_cola_v002": 8_551.0,
    "glue_sst2_v002": 67_349.0,
    "glue_mrpc_v002": 3_668.0,
    "glue_qqp_v002": 363_849.0,
    "glue_stsb_v002": 5_749.0,
    "glue_mnli_v002": 392_702.0,
    "glue_qnli_v002": 104_743.0,
    "glue_rte_v002": 2_490.0,
    "glue_mnli_mismatched_v002": 0.0,
    "glue_mnli_matched_v002": 0.0,
    "glue_ax_v002": 0.0,
}
SUPER_GLUE_WEIGHTS: dict[str, float] = {
    "dpr_v001_simple": 1_322.0,
    "super_glue_wsc_v102_simple_train": 259.0,
    "super_glue_wsc_v102_simple_eval": 0.0,
    "super_glue_boolq_v102": 9_427.0,
    "super_glue_cb_v102": 250.0,
    "super_glue_copa_v102": 400.0,
    "super_glue_multirc_v102": 27_243.0,
    "super_glue_record_v102": 138_854.0,
    "super_glue_rte_v102": 2_490.0,
    "super_glue_wic_v102": 5_428.0,
    "super_glue_axb_v102": 0.0,
    "super_glue_axg_v102": 0.0,
}
GLUE_MIXTURE = "glue_v002_proportional"
SUPER_GLUE_MIXTURE = "super_glue_v102_proportional"


# ---------------------------------------------------------------------------------------------
# Postprocessors: seqio calls `fn(decoded_text, example=..., is_target=...)`; `example` holds the
# task's features as numpy (strings as bytes).


def _text(value: Any) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def string_label_to_class_id(
    label: str | bytes,
    label_classes: Sequence[str],
    example: Mapping[str, Any] | None = None,
    is_target: bool = False,
) -> int:
    """The index of `label` in `label_classes`, or -1 for text that is no label."""
    del example, is_target
    label = _text(label)
    return list(label_classes).index(label) if label in label_classes else -1


def string_to_float(
    text: str | bytes, example: Mapping[str, Any] | None = None, is_target: bool = False
) -> float:
    """STS-B: the predicted score, or -1.0 for text that is no number (scored as very wrong)."""
    del example, is_target
    try:
        return float(_text(text))
    except ValueError:
        return -1.0


def multirc_postprocess(
    label: str | bytes, example: Mapping[str, Any] | None = None, is_target: bool = False
) -> dict[str, Any]:
    """`{"value": class id}`, plus `"group"` (the question id) for targets."""
    out: dict[str, Any] = {"value": string_label_to_class_id(label, ("False", "True"))}
    if is_target:
        out["group"] = int(example["idx/question"])
    return out


def record_postprocess(
    answer: str | bytes, example: Mapping[str, Any] | None = None, is_target: bool = False
) -> dict[str, Any]:
    """Targets: all gold answers and the (passage, query) group; predictions: the text."""
    if is_target:
        return {
            "value": [_text(a) for a in example["answers"]],
            "group": (int(example["idx/passage"]), int(example["idx/query"])),
        }
    return {"value": _text(answer)}


_DETERMINERS = frozenset(
    [
        "a",
        "an",
        "few",
        "her",
        "his",
        "each",
        "every",
        "many",
        "much",
        "my",
        "our",
        "some",
        "that",
        "the",
        "their",
        "these",
        "this",
        "those",
        "which",
        "whose",
        "your",
    ]
)


def wsc_simple_postprocess(
    prediction: str | bytes, example: Mapping[str, Any] | None = None, is_target: bool = False
) -> int:
    """WSC: targets are the label; a prediction is 1 if it names the candidate referent.

    As in T5: case and determiners are ignored, one name's words may be a subset of the other's
    ("fuzzy bunny" matches "bunny"), but a possessive never matches a non-possessive.
    """
    if is_target:
        return int(example["label"])

    def clean(text: str) -> str:
        return " ".join(w for w in text.strip().lower().split(" ") if w not in _DETERMINERS)

    referent = clean(_text(example["targets_pretokenized"]))
    predicted = clean(_text(prediction))
    if ("'" in predicted) != ("'" in referent):
        return 0
    predicted_words, referent_words = set(predicted.split(" ")), set(referent.split(" "))
    return int(predicted_words <= referent_words or referent_words <= predicted_words)


# ---------------------------------------------------------------------------------------------
# Task table.


@dataclasses.dataclass(frozen=True)
class _Spec:
    """How one TFDS config becomes a task."""

    task: str
    tfds_name: str
    splits: tuple[str, ...]
    preprocessors: tuple[Callable[..., Any], ...]
    metric_fns: tuple[Callable[..., Any], ...]
    postprocess_fn: Callable[..., Any] | None
    # The strings targets can be (class labels), checked against the targets length; None for
    # free-text targets (ReCoRD answers, WSC/DPR referents).
    target_strings: tuple[str, ...] | None = None


def _label_classes(builder: str, config: str) -> list[str]:
    return list(tfds.builder_cls(builder).builder_configs[config].label_classes)


def _classification(
    benchmark: str, labels: Sequence[str], feature_names: Sequence[str] | None = None
) -> tuple[tuple[Callable[..., Any], ...], Callable[..., Any]]:
    text_fn = functools.partial(
        preprocessors.glue,
        benchmark_name=benchmark,
        label_names=tuple(labels),
        feature_names=feature_names,
    )
    post = functools.partial(string_label_to_class_id, label_classes=tuple(labels))
    return (text_fn,), post


# STS-B's targets: the score rounded to a multiple of 0.2, "0.0" ... "5.0" (preprocessors.stsb).
STSB_TARGETS = tuple(f"{i / 5:.1f}" for i in range(26))


def _glue_specs() -> list[_Spec]:
    accuracy = (metrics.accuracy,)
    f1_acc = (metrics.f1_score_with_invalid, metrics.accuracy)
    table = {
        # config: (benchmark prefix, metric fns, splits)
        "cola": ("cola", (metrics.matthews_corrcoef,), _SPLITS),
        "sst2": ("sst2", accuracy, _SPLITS),
        "mrpc": ("mrpc", f1_acc, _SPLITS),
        "qqp": ("qqp", f1_acc, _SPLITS),
        "mnli": (
            "mnli",
            accuracy,
            (
                "train",
                "validation_matched",
                "validation_mismatched",
                "test_matched",
                "test_mismatched",
            ),
        ),
        "mnli_matched": ("mnli", accuracy, ("validation", "test")),
        "mnli_mismatched": ("mnli", accuracy, ("validation", "test")),
        "qnli": ("qnli", accuracy, _SPLITS),
        "rte": ("rte", accuracy, _SPLITS),
        "wnli": ("wnli", accuracy, _SPLITS),
        # The diagnostic set is cast as MNLI and only has (unlabelled) test examples.
        "ax": ("mnli", (), ("test",)),
    }
    specs = []
    for config, (benchmark, metric_fns, splits) in table.items():
        labels = _label_classes("glue", config)
        text_fns, post = _classification(benchmark, labels)
        specs.append(
            _Spec(
                f"glue_{config}_v002",
                f"glue/{config}:{GLUE_TFDS_VERSION}",
                splits,
                text_fns,
                metric_fns,
                post,
                tuple(labels),
            )
        )
    specs.append(
        _Spec(
            "glue_stsb_v002",
            f"glue/stsb:{GLUE_TFDS_VERSION}",
            _SPLITS,
            (preprocessors.stsb,),
            (metrics.pearson_corrcoef, metrics.spearman_corrcoef),
            string_to_float,
            STSB_TARGETS,
        )
    )
    return specs


def _sg(config: str) -> str:
    """The TFDS name of a SuperGLUE config."""
    return f"super_glue/{config}:{SUPER_GLUE_TFDS_VERSION}"


# SuperGLUE classification configs: (config, the columns T5 writes out or None for all of
# them, metric fns). WiC ignores the word's character offsets (start1/end1/...), as T5 does.
_SUPER_GLUE_CLASSIFICATION = (
    ("boolq", None, (metrics.accuracy,)),
    ("cb", None, (metrics.mean_multiclass_f1(3), metrics.accuracy)),
    ("copa", None, (metrics.accuracy,)),
    ("rte", None, (metrics.accuracy,)),
    ("wic", ("sentence1", "sentence2", "word"), (metrics.accuracy,)),
)

# ReCoRD: free-text answers, one example per gold answer.
_RECORD_SPEC = _Spec(
    "super_glue_record_v102",
    _sg("record"),
    _SPLITS,
    (preprocessors.record,),
    (metrics.record,),
    record_postprocess,
)

# WSC (and DPR, trained on with it as in T5) in the "simple" form: targets are the referent.
_REFERENT_SPECS = (
    _Spec(
        "super_glue_wsc_v102_simple_train",
        _sg("wsc.fixed"),
        ("train",),
        (functools.partial(preprocessors.wsc_simple, correct_referent_only=True),),
        (),
        None,
    ),
    _Spec(
        "super_glue_wsc_v102_simple_eval",
        _sg("wsc.fixed"),
        ("validation", "test"),
        (functools.partial(preprocessors.wsc_simple, correct_referent_only=False),),
        (metrics.accuracy,),
        wsc_simple_postprocess,
    ),
    _Spec(
        "dpr_v001_simple",
        f"definite_pronoun_resolution:{DPR_TFDS_VERSION}",
        ("train", "test"),
        (preprocessors.definite_pronoun_resolution_simple,),
        (metrics.accuracy,),
        None,
    ),
)


def _super_glue_specs() -> list[_Spec]:
    """Every SuperGLUE task (and DPR), in the order `register_glue_tasks` lists them."""
    return [
        *_super_glue_label_specs(),
        _RECORD_SPEC,
        *_super_glue_diagnostic_specs(),
        *_REFERENT_SPECS,
    ]


def _super_glue_label_specs() -> list[_Spec]:
    """The tasks whose targets are the TFDS builder's label names (and MultiRC's)."""
    specs = []
    for config, feature_names, metric_fns in _SUPER_GLUE_CLASSIFICATION:
        labels = tuple(_label_classes("super_glue", config))
        text_fns, post = _classification(config, labels, feature_names)
        specs.append(
            _Spec(
                f"super_glue_{config}_v102",
                _sg(config),
                _SPLITS,
                text_fns,
                metric_fns,
                post,
                labels,
            )
        )
    labels = tuple(_label_classes("super_glue", "multirc"))
    text_fns, _ = _classification("multirc", labels, ("question", "answer", "paragraph"))
    specs.append(
        _Spec(
            "super_glue_multirc_v102",
            _sg("multirc"),
            _SPLITS,
            text_fns,
            (metrics.multirc_f1_over_all_answers, metrics.multirc_exact_match),
            multirc_postprocess,
            labels,
        )
    )
    return specs


def _super_glue_diagnostic_specs() -> list[_Spec]:
    """AXb and AXg, test only, cast as RTE; AXb names its sentences sentence1/sentence2."""
    rte_labels = tuple(_label_classes("super_glue", "rte"))
    text_fns, post = _classification("rte", rte_labels)
    axb_rekey = functools.partial(
        preprocessors.rekey,
        key_map={"premise": "sentence1", "hypothesis": "sentence2", "label": "label", "idx": "idx"},
    )
    return [
        _Spec(
            "super_glue_axb_v102",
            _sg("axb"),
            ("test",),
            (axb_rekey, *text_fns),
            (),
            post,
            rte_labels,
        ),
        _Spec("super_glue_axg_v102", _sg("axg"), ("test",), text_fns, (), post, rte_labels),
    ]


def output_features(vocabulary: seqio.Vocabulary) -> dict[str, seqio.Feature]:
    """`inputs` and `targets`, both ending in EOS, in `vocabulary`."""
    return {
        "inputs": seqio.Feature(vocabulary=vocabulary, add_eos=True, required=False),
        "targets": seqio.Feature(vocabulary=vocabulary, add_eos=True),
    }


def _add_task(
    spec: _Spec, features: Mapping[str, seqio.Feature], tfds_data_dir: str | None
) -> None:
    if spec.task in seqio.TaskRegistry.names():
        seqio.TaskRegistry.remove(spec.task)
    targets_check = None
    if spec.target_strings is not None:
        targets_check = tasks.labels_check(
            spec.target_strings, features["targets"].vocabulary, spec.task
        )
    seqio.TaskRegistry.add(
        spec.task,
        task_cls=tasks.LengthCheckedTask,
        targets_check=targets_check,
        source=seqio.TfdsDataSource(
            tfds_name=spec.tfds_name, tfds_data_dir=tfds_data_dir, splits=list(spec.splits)
        ),
        preprocessors=[
            *spec.preprocessors,
            seqio.preprocessors.tokenize,
            seqio.CacheDatasetPlaceholder(),
            seqio.preprocessors.append_eos_after_trim,
        ],
        output_features=features,
        postprocess_fn=spec.postprocess_fn,
        metric_fns=list(spec.metric_fns),
    )


def _add_mixture(name: str, weights: Mapping[str, float]) -> None:
    if name in seqio.MixtureRegistry.names():
        seqio.MixtureRegistry.remove(name)
    seqio.MixtureRegistry.add(name, list(weights.items()))


def register_glue_tasks(
    vocabulary: seqio.Vocabulary, tfds_data_dir: str | None = None
) -> tuple[str, ...]:
    """Registers every GLUE/SuperGLUE task and both proportional mixtures (see module docstring).

    Registering again replaces the previous registration (e.g. with another vocabulary).

    Args:
      vocabulary: the vocabulary of `inputs` and `targets` (the model's).
      tfds_data_dir: where TFDS finds the prepared datasets; None for TFDS's default
        (`~/tensorflow_datasets` or `$TFDS_DATA_DIR`). Prepare them once with
        `tfds build glue super_glue definite_pronoun_resolution`.

    Returns:
      The names registered: the tasks, then the two mixtures.
    """
    if not isinstance(vocabulary, seqio.Vocabulary):
        raise TypeError(
            f"vocabulary must be a seqio.Vocabulary, got {type(vocabulary).__name__}; "
            "load one with switch_t5.data.vocab.get_vocabulary(path)."
        )
    features = output_features(vocabulary)
    specs = _glue_specs() + _super_glue_specs()
    for spec in specs:
        _add_task(spec, features, tfds_data_dir)
    _add_mixture(GLUE_MIXTURE, GLUE_WEIGHTS)
    _add_mixture(SUPER_GLUE_MIXTURE, SUPER_GLUE_WEIGHTS)
    return (*(s.task for s in specs), GLUE_MIXTURE, SUPER_GLUE_MIXTURE)
