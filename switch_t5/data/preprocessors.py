"""Text-to-text preprocessors for GLUE, SuperGLUE and DPR in T5's formats.

Each function turns raw TFDS examples into `{"inputs": <tf.string>[], "targets": <tf.string>[]}`
plus the ids the evaluation needs, producing exactly T5's strings (arXiv 1910.10683, appendix D;
the format reference is T5's `t5/data/preprocessors.py`):

* GLUE/SuperGLUE classification: `"<benchmark> <key1>: <text1> <key2>: <text2> ..."` with the
  keys sorted by name unless an order is given (MultiRC, WiC), the target the label's name, and
  `"<unk>"` for unlabelled test examples (label -1).
* STS-B: the score rounded to the nearest 0.2 (round half to even, in float32) and printed with
  one decimal, e.g. `"3.8"`.
* ReCoRD: one example per gold answer, `"record query: ... entities: a, b passage: ..."`.
* WSC and DPR, T5's "simple" form: `"wsc: ... *pronoun* ..."` with the referent as target.

They run inside `tf.data` graphs (seqio's `map_over_dataset`), so they stay cacheable by seqio.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import seqio
import tensorflow as tf

from switch_t5.data import hide_gpus_from_tf

hide_gpus_from_tf()  # tf.data runs on the host CPU only.

AUTOTUNE = tf.data.AUTOTUNE


def _label_name(label: tf.Tensor, label_names: Sequence[str]) -> tf.Tensor:
    """`label_names[label]`, or "<unk>" for the unlabelled test examples (label -1)."""
    return tf.cond(
        tf.equal(label, -1),
        lambda: tf.constant("<unk>"),
        lambda: tf.gather(tf.constant(list(label_names)), label),
    )


@seqio.map_over_dataset
def rekey(x: Mapping[str, tf.Tensor], key_map: Mapping[str, str]) -> dict[str, tf.Tensor]:
    """Renames features: `{new_key: x[old_key]}` for each `new_key: old_key` of `key_map`."""
    return {new: x[old] for new, old in key_map.items()}


@seqio.map_over_dataset
def glue(
    x: Mapping[str, tf.Tensor],
    benchmark_name: str,
    label_names: Sequence[str],
    feature_names: Sequence[str] | None = None,
) -> dict[str, tf.Tensor]:
    """A GLUE/SuperGLUE classification example in T5's text-to-text format.

    Args:
      x: a TFDS example with text features, `label` <int64>[] and `idx`.
      benchmark_name: the prefix, e.g. "mnli" (also used for AX), "rte" (for AXb/AXg).
      label_names: the TFDS builder's class names; `targets` is `label_names[label]`.
      feature_names: the text features in output order; default: all but label/idx, sorted.

    Returns:
      `inputs` and `targets` <tf.string>[], and `idx` (MultiRC: `idx/paragraph`,
      `idx/question`, `idx/answer`) for evaluation.
    """
    keys = list(feature_names or sorted(set(x) - {"label", "idx"}))
    pieces = [tf.constant(benchmark_name)]
    for key in keys:
        pieces += [tf.constant(f"{key}:"), x[key]]
    inputs = tf.strings.join(pieces, separator=" ")
    out = {}
    if benchmark_name == "multirc":
        # MultiRC paragraphs carry HTML line breaks and bold markers (T5 strips them the same way).
        inputs = tf.strings.regex_replace(inputs, "<br>", " ")
        inputs = tf.strings.regex_replace(inputs, "<(/)?b>", "")
        for part in ("paragraph", "question", "answer"):
            out[f"idx/{part}"] = x["idx"][part]
    else:
        out["idx"] = x["idx"]
    out["inputs"] = inputs
    out["targets"] = _label_name(x["label"], label_names)
    return out


@seqio.map_over_dataset
def stsb(x: Mapping[str, tf.Tensor]) -> dict[str, tf.Tensor]:
    """STS-B as 26 classes: the score rounded to a multiple of 0.2, printed as e.g. "3.8"."""
    inputs = tf.strings.join(
        ["stsb sentence1:", x["sentence1"], "sentence2:", x["sentence2"]], separator=" "
    )
    # tf.round rounds half to even, in the label's float32, as T5 does.
    targets = tf.as_string(tf.round(x["label"] * 5) / 5, precision=1)
    return {"inputs": inputs, "targets": targets, "idx": x["idx"]}


def record(dataset: tf.data.Dataset) -> tf.data.Dataset:
    """ReCoRD: one example per gold answer (one "<unk>" example when there is none).

    Every copy keeps the full `answers` list and `idx/passage`, `idx/query`, so that evaluation
    scores each query once against all its answers.
    """

    def explode(x: Mapping[str, tf.Tensor]) -> dict[str, tf.Tensor]:
        passage = tf.strings.regex_replace(x["passage"], r"(\.|\?|\!|\"|\')\n@highlight\n", r"\1 ")
        passage = tf.strings.regex_replace(passage, r"\n@highlight\n", ". ")
        inputs = tf.strings.join(
            [
                "record query:",
                x["query"],
                "entities:",
                tf.strings.reduce_join(x["entities"], separator=", "),
                "passage:",
                passage,
            ],
            separator=" ",
        )
        targets = tf.cond(
            tf.size(x["answers"]) > 0, lambda: x["answers"], lambda: tf.constant(["<unk>"])
        )
        copies = tf.size(targets)
        # [] -> [copies]; answers [num_answers] -> [copies, num_answers]
        return {
            "inputs": tf.repeat(inputs[None], copies),
            "targets": targets,
            "answers": tf.tile(x["answers"][None], [copies, 1]),
            "idx/passage": tf.repeat(x["idx"]["passage"][None], copies),
            "idx/query": tf.repeat(x["idx"]["query"][None], copies),
        }

    return dataset.map(explode, num_parallel_calls=AUTOTUNE).unbatch()


# Two WSC texts whose span2_index does not point at the pronoun; T5 hard-codes their
# fill-in-the-blank form ("X" for the pronoun), and so do we to produce the same examples.
_WSC_FIXES = {
    "The boy continued to whip the pony , and eventually the pony threw him over. John laughed "
    'out quite loud. "Good for him," he said. ': "The boy continued to whip the pony , and "
    'eventually the pony threw him over. John laughed out quite loud. "Good for X ," he said.',
    "When they had eventually calmed down a bit , and had gotten home, Mr. Farley put the magic "
    "pebble in an iron safe . Some day they might want to use it , but really for now, what more "
    "could they wish for?": "When they had eventually calmed down a bit , and had gotten home, "
    "Mr. Farley put the magic pebble in an iron safe . Some day they might want to use X , but "
    "really for now, what more could they wish for?",
}


def _wsc_marked_text(x: Mapping[str, tf.Tensor]) -> tf.Tensor:
    """The WSC text with the pronoun at word `span2_index` written as `*pronoun*`."""
    fixed = tf.constant("")
    for text, blanked in _WSC_FIXES.items():
        fixed = tf.where(tf.equal(x["text"], text), tf.constant(blanked), fixed)
    marked_pronoun = tf.strings.join(["*", x["span2_text"], "*"])

    def from_index() -> tf.Tensor:
        words = tf.strings.split(x["text"], sep=" ")
        i = tf.cast(x["span2_index"], tf.int32)
        check = tf.debugging.assert_equal(
            words[i],
            x["span2_text"],
            message="WSC example: the word at span2_index is not span2_text",
        )
        with tf.control_dependencies([check]):
            return tf.strings.join(
                [
                    tf.strings.reduce_join(words[:i], separator=" "),
                    marked_pronoun,
                    tf.strings.reduce_join(words[i + 1 :], separator=" "),
                ],
                separator=" ",
            )

    return tf.cond(
        tf.not_equal(fixed, ""),
        lambda: tf.strings.regex_replace(fixed, " X ", tf.strings.join([" ", marked_pronoun, " "])),
        from_index,
    )


def wsc_simple(
    dataset: tf.data.Dataset, label: str = "wsc:", correct_referent_only: bool = False
) -> tf.data.Dataset:
    """SuperGLUE WSC in T5's simple form: `"wsc: ... *he* ..."` -> the candidate referent.

    The target is the candidate (`span1_text`) whether or not it is the right referent; for
    training pass `correct_referent_only=True` to keep only examples where it is. Evaluation
    compares the predicted referent with the candidate and the label (`wsc_simple_postprocess`).
    """
    if correct_referent_only:
        dataset = dataset.filter(lambda x: tf.equal(x["label"], 1))

    def to_text(x: Mapping[str, tf.Tensor]) -> dict[str, tf.Tensor]:
        return {
            "inputs": tf.strings.join([label, _wsc_marked_text(x)], separator=" "),
            "targets": x["span1_text"],
            "label": x["label"],
            "idx": x["idx"],
        }

    return dataset.map(to_text, num_parallel_calls=AUTOTUNE)


@seqio.map_over_dataset
def definite_pronoun_resolution_simple(
    x: Mapping[str, tf.Tensor], label: str = "wsc:"
) -> dict[str, tf.Tensor]:
    """DPR in WSC's simple form: the first occurrence of the pronoun marked `*he*`."""
    pattern = tf.strings.join([r" (", x["pronoun"], r")( |\.|,)"])
    sentence = tf.strings.regex_replace(x["sentence"], pattern, r" *\1*\2", replace_global=False)
    return {
        "inputs": tf.strings.join([label, sentence], separator=" "),
        "targets": x["candidates"][x["label"]],
    }
