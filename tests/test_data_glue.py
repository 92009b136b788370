"""GLUE/SuperGLUE tasks on hand-made TFDS examples: exact T5 strings, postprocessors, mixtures.

TFDS is mocked (`tfds.testing.mock_data` with our own `as_dataset`), so nothing is downloaded.
Each raw example below is paired with the exact `inputs`/`targets` T5's preprocessors produce.
"""

import string

import numpy as np
import pytest

seqio = pytest.importorskip("seqio")
tf = pytest.importorskip("tensorflow")
tfds = pytest.importorskip("tensorflow_datasets")

from switch_t5.data import glue, metrics, tasks, vocab  # noqa: E402

_WSC_TEXT = (
    "Mark told Pete many lies about himself , which Pete included in his book . "
    "He should have been more truthful ."
)
_WSC_FIXED_TEXT = (
    "When they had eventually calmed down a bit , and had gotten home, Mr. Farley put the magic "
    "pebble in an iron safe . Some day they might want to use it , but really for now, what more "
    "could they wish for?"
)

# (builder, config, split) -> raw examples.
RAW = {
    ("glue", "cola", "validation"): [
        {"sentence": "The book was read by John.", "label": 1, "idx": 7}
    ],
    ("glue", "sst2", "validation"): [{"sentence": "a gripping film", "label": 1, "idx": 0}],
    ("glue", "mrpc", "validation"): [
        {"sentence1": "He left.", "sentence2": "He stayed.", "label": 0, "idx": 3}
    ],
    ("glue", "qqp", "validation"): [
        {"question1": "Why sky blue?", "question2": "Why is the sky blue?", "label": 1, "idx": 1}
    ],
    ("glue", "stsb", "validation"): [
        # 2.5*5 = 12.5 rounds half to even -> 12 -> "2.4"; 4.93*5 = 24.65 -> 25 -> "5.0".
        {"sentence1": "A man sings.", "sentence2": "A man is singing.", "label": 2.5, "idx": 0},
        {"sentence1": "A cat.", "sentence2": "A cat!", "label": 4.93, "idx": 1},
    ],
    ("glue", "mnli", "validation_mismatched"): [
        {"premise": "It rains.", "hypothesis": "It is dry.", "label": 2, "idx": 5}
    ],
    ("glue", "mnli", "test_matched"): [
        {"premise": "It rains.", "hypothesis": "It is wet.", "label": -1, "idx": 6}
    ],
    ("glue", "mnli_matched", "validation"): [
        {"premise": "It rains.", "hypothesis": "It is wet.", "label": 0, "idx": 9}
    ],
    ("glue", "mnli_mismatched", "validation"): [
        {"premise": "Dogs bark.", "hypothesis": "Dogs sing.", "label": 1, "idx": 2}
    ],
    ("glue", "qnli", "validation"): [
        {"question": "Who wrote it?", "sentence": "Ann wrote it.", "label": 0, "idx": 4}
    ],
    ("glue", "rte", "validation"): [
        {"sentence1": "Ann is tall.", "sentence2": "Ann is short.", "label": 1, "idx": 8}
    ],
    ("glue", "wnli", "validation"): [
        {
            "sentence1": "The cup fell. It broke.",
            "sentence2": "The cup broke.",
            "label": 1,
            "idx": 0,
        }
    ],
    ("glue", "ax", "test"): [{"premise": "P.", "hypothesis": "H.", "label": -1, "idx": 0}],
    ("super_glue", "boolq", "validation"): [
        {"question": "is it hot", "passage": "It is hot.", "label": 1, "idx": 0}
    ],
    ("super_glue", "cb", "validation"): [
        {"premise": "Maybe so.", "hypothesis": "So.", "label": 2, "idx": 0}
    ],
    ("super_glue", "copa", "validation"): [
        {
            "premise": "The man fell.",
            "choice1": "He slipped.",
            "choice2": "He laughed.",
            "question": "cause",
            "label": 0,
            "idx": 0,
        }
    ],
    ("super_glue", "multirc", "validation"): [
        {
            "paragraph": "Intro <b>Sent 1: </b>One.<br><b>Sent 2: </b>Two.",
            "question": "How many?",
            "answer": "Two",
            "idx": {"paragraph": 3, "question": 5, "answer": 1},
            "label": 1,
        }
    ],
    ("super_glue", "record", "validation"): [
        {
            "passage": "The cat sat.\n@highlight\nCats rule\n@highlight\nDogs drool",
            "query": "@placeholder likes fish.",
            "entities": ["cat", "dog"],
            "answers": ["cat", "Cat"],
            "idx": {"passage": 0, "query": 4},
        }
    ],
    ("super_glue", "record", "test"): [
        {
            "passage": "Hi!\n@highlight\nBye",
            "query": "@placeholder.",
            "entities": ["x"],
            "answers": [],
            "idx": {"passage": 1, "query": 2},
        }
    ],
    ("super_glue", "rte", "validation"): [
        {"premise": "Ann is tall.", "hypothesis": "Ann is short.", "label": 1, "idx": 0}
    ],
    ("super_glue", "wic", "validation"): [
        {
            "word": "bank",
            "sentence1": "The river bank.",
            "sentence2": "The bank account.",
            "start1": 10,
            "start2": 4,
            "end1": 14,
            "end2": 8,
            "label": 0,
            "idx": 0,
        }
    ],
    ("super_glue", "axb", "test"): [
        {"sentence1": "S one.", "sentence2": "S two.", "label": -1, "idx": 0}
    ],
    ("super_glue", "axg", "test"): [
        {"premise": "P one.", "hypothesis": "H one.", "label": -1, "idx": 0}
    ],
    ("super_glue", "wsc.fixed", "train"): [
        {
            "text": _WSC_TEXT,
            "span1_index": 0,
            "span2_index": 15,
            "span1_text": "Mark",
            "span2_text": "He",
            "label": 1,
            "idx": 0,
        },
        {  # a wrong referent: dropped from training
            "text": _WSC_TEXT,
            "span1_index": 2,
            "span2_index": 15,
            "span1_text": "Pete",
            "span2_text": "He",
            "label": 0,
            "idx": 1,
        },
    ],
    ("super_glue", "wsc.fixed", "validation"): [
        {
            "text": _WSC_TEXT,
            "span1_index": 2,
            "span2_index": 15,
            "span1_text": "Pete",
            "span2_text": "He",
            "label": 0,
            "idx": 1,
        },
        {  # span2_index points at "use", not "it": T5's hard-coded fix
            "text": _WSC_FIXED_TEXT,
            "span1_index": 18,
            "span2_index": 30,
            "span1_text": "the magic pebble",
            "span2_text": "it",
            "label": 1,
            "idx": 2,
        },
    ],
    ("definite_pronoun_resolution", None, "train"): [
        {
            "sentence": "Bob asked Tom if he can lend some money.",
            "pronoun": "he",
            "candidates": ["Bob", "Tom"],
            "label": 1,
        }
    ],
}

# task, split -> [(inputs, targets)] exactly as T5 writes them.
EXPECTED = {
    ("glue_cola_v002", "validation"): [("cola sentence: The book was read by John.", "acceptable")],
    ("glue_sst2_v002", "validation"): [("sst2 sentence: a gripping film", "positive")],
    ("glue_mrpc_v002", "validation"): [
        ("mrpc sentence1: He left. sentence2: He stayed.", "not_equivalent")
    ],
    ("glue_qqp_v002", "validation"): [
        ("qqp question1: Why sky blue? question2: Why is the sky blue?", "duplicate")
    ],
    ("glue_stsb_v002", "validation"): [
        ("stsb sentence1: A man sings. sentence2: A man is singing.", "2.4"),
        ("stsb sentence1: A cat. sentence2: A cat!", "5.0"),
    ],
    ("glue_mnli_v002", "validation_mismatched"): [
        ("mnli hypothesis: It is dry. premise: It rains.", "contradiction")
    ],
    ("glue_mnli_v002", "test_matched"): [
        ("mnli hypothesis: It is wet. premise: It rains.", "<unk>")
    ],
    ("glue_mnli_matched_v002", "validation"): [
        ("mnli hypothesis: It is wet. premise: It rains.", "entailment")
    ],
    ("glue_mnli_mismatched_v002", "validation"): [
        ("mnli hypothesis: Dogs sing. premise: Dogs bark.", "neutral")
    ],
    ("glue_qnli_v002", "validation"): [
        ("qnli question: Who wrote it? sentence: Ann wrote it.", "entailment")
    ],
    ("glue_rte_v002", "validation"): [
        ("rte sentence1: Ann is tall. sentence2: Ann is short.", "not_entailment")
    ],
    ("glue_wnli_v002", "validation"): [
        ("wnli sentence1: The cup fell. It broke. sentence2: The cup broke.", "entailment")
    ],
    ("glue_ax_v002", "test"): [("mnli hypothesis: H. premise: P.", "<unk>")],
    ("super_glue_boolq_v102", "validation"): [
        ("boolq passage: It is hot. question: is it hot", "True")
    ],
    ("super_glue_cb_v102", "validation"): [("cb hypothesis: So. premise: Maybe so.", "neutral")],
    ("super_glue_copa_v102", "validation"): [
        (
            "copa choice1: He slipped. choice2: He laughed. premise: The man fell. question: cause",
            "choice1",
        )
    ],
    ("super_glue_multirc_v102", "validation"): [
        (
            "multirc question: How many? answer: Two paragraph: Intro Sent 1: One. Sent 2: Two.",
            "True",
        )
    ],
    ("super_glue_record_v102", "validation"): [
        (
            "record query: @placeholder likes fish. entities: cat, dog passage: "
            "The cat sat. Cats rule. Dogs drool",
            target,
        )
        for target in ("cat", "Cat")
    ],
    ("super_glue_record_v102", "test"): [
        ("record query: @placeholder. entities: x passage: Hi! Bye", "<unk>")
    ],
    ("super_glue_rte_v102", "validation"): [
        ("rte hypothesis: Ann is short. premise: Ann is tall.", "not_entailment")
    ],
    ("super_glue_wic_v102", "validation"): [
        ("wic sentence1: The river bank. sentence2: The bank account. word: bank", "False")
    ],
    ("super_glue_axb_v102", "test"): [("rte hypothesis: S two. premise: S one.", "<unk>")],
    ("super_glue_axg_v102", "test"): [("rte hypothesis: H one. premise: P one.", "<unk>")],
    ("super_glue_wsc_v102_simple_train", "train"): [
        (
            "wsc: Mark told Pete many lies about himself , which Pete included in his book . "
            "*He* should have been more truthful .",
            "Mark",
        )
    ],
    ("super_glue_wsc_v102_simple_eval", "validation"): [
        (
            "wsc: Mark told Pete many lies about himself , which Pete included in his book . "
            "*He* should have been more truthful .",
            "Pete",
        ),
        (
            "wsc: When they had eventually calmed down a bit , and had gotten home, Mr. Farley "
            "put the magic pebble in an iron safe . Some day they might want to use *it* , but "
            "really for now, what more could they wish for?",
            "the magic pebble",
        ),
    ],
    ("dpr_v001_simple", "train"): [("wsc: Bob asked Tom if *he* can lend some money.", "Tom")],
}


def _as_dataset(self, split, decoders=None, read_config=None, **kwargs):
    del decoders, read_config, kwargs
    config = self.builder_config.name if self.builder_config else None
    key = (self.name, config, str(split))
    if key not in RAW and str(split) == "train":
        # Training mixtures: reuse the config's evaluation examples as its training set.
        key = next(k for k in RAW if k[:2] == key[:2])
    if key not in RAW:
        raise AssertionError(f"test has no mock examples for {key}")
    spec = self.info.features.get_tensor_spec()

    def gen():
        yield from RAW[key]

    return tf.data.Dataset.from_generator(gen, output_signature=spec)


@pytest.fixture(scope="module")
def vocabulary(tmp_path_factory):
    words = [
        "the",
        "a",
        "cat",
        "dog",
        "man",
        "sings",
        "sky",
        "blue",
        "rains",
        "wet",
        "dry",
        "premise",
        "hypothesis",
        "sentence",
        "question",
        "answer",
        "paragraph",
        "passage",
        "entities",
        "record",
        "query",
        "wsc",
        "mnli",
        "rte",
        "cola",
        "True",
        "False",
        "choice",
        "entailment",
        "neutral",
        "contradiction",
    ]
    # Every printable ASCII character appears often, so that decoding round-trips exactly.
    chars = list(string.ascii_letters + string.digits + string.punctuation)
    rng = np.random.default_rng(0)
    docs = [" ".join([*rng.choice(words, size=10), *rng.choice(chars, size=6)]) for _ in range(400)]
    path = vocab.train_sentencepiece(
        docs, str(tmp_path_factory.mktemp("spm") / "glue.model"), vocab_size=100 + 160
    )
    return vocab.get_vocabulary(path)


@pytest.fixture(scope="module")
def registered(vocabulary):
    names = glue.register_glue_tasks(vocabulary, tfds_data_dir="/nonexistent/tfds")
    with tfds.testing.mock_data(as_dataset_fn=_as_dataset):
        yield names


def _texts(task_name, split):
    task = seqio.get_mixture_or_task(task_name)
    ds = task.get_dataset(
        sequence_length=None, split=split, shuffle=False, use_cached=False, try_in_mem_cache=False
    )
    return [
        (ex["inputs_pretokenized"].decode(), ex["targets_pretokenized"].decode(), ex)
        for ex in ds.as_numpy_iterator()
    ]


def test_registers_t5_names(registered):
    assert len(registered) == len(set(registered)) == 12 + 12 + 2
    for name in ("glue_mnli_v002", "super_glue_wsc_v102_simple_eval", "glue_v002_proportional"):
        assert name in registered
    mnli = seqio.get_mixture_or_task("glue_mnli_v002")
    assert set(mnli.splits) == {
        "train",
        "validation_matched",
        "validation_mismatched",
        "test_matched",
        "test_mismatched",
    }
    assert mnli.source.tfds_dataset.name == "glue/mnli:2.0.0"


@pytest.mark.parametrize(("task_name", "split"), sorted(EXPECTED))
def test_exact_t5_format(registered, task_name, split):
    got = [(i, t) for i, t, _ in _texts(task_name, split)]
    assert got == EXPECTED[(task_name, split)]


def test_tokenized_features_end_in_eos(registered, vocabulary):
    (inputs, targets, ex), *_ = _texts("glue_rte_v002", "validation")
    assert ex["inputs"][-1] == 1 and ex["targets"][-1] == 1
    assert vocabulary.decode(ex["inputs"][:-1].tolist()) == inputs
    assert vocabulary.decode(ex["targets"][:-1].tolist()) == targets


def test_class_label_postprocess_and_metrics(registered):
    task = seqio.get_mixture_or_task("glue_mrpc_v002")
    assert task.postprocess_fn("equivalent", example={}, is_target=False) == 1
    assert task.postprocess_fn("not_equivalent", example={}, is_target=True) == 0
    assert task.postprocess_fn("maybe", example={}, is_target=False) == -1
    stsb = seqio.get_mixture_or_task("glue_stsb_v002")
    assert stsb.postprocess_fn("3.8", example={}) == 3.8
    assert stsb.postprocess_fn("three", example={}) == -1.0
    cb = seqio.get_mixture_or_task("super_glue_cb_v102")
    names = [f.__name__ for f in cb.predict_metric_fns]
    assert names == ["mean_3class_f1", "accuracy"]


def test_multirc_and_record_evaluate_end_to_end(registered):
    (_, target, ex), *_ = _texts("super_glue_multirc_v102", "validation")
    task = seqio.get_mixture_or_task("super_glue_multirc_v102")
    t = task.postprocess_fn(target, example=ex, is_target=True)
    p = task.postprocess_fn("True", example=ex, is_target=False)
    assert t == {"value": 1, "group": 5} and p == {"value": 1}
    assert metrics.multirc_exact_match([t], [p]) == {"exact_match": 100.0}

    record = seqio.get_mixture_or_task("super_glue_record_v102")
    rows = _texts("super_glue_record_v102", "validation")
    targets = [record.postprocess_fn(t, example=ex, is_target=True) for _, t, ex in rows]
    assert targets == [{"value": ["cat", "Cat"], "group": (0, 4)}] * 2
    predictions = [record.postprocess_fn(p, example=ex) for p in ("The cat.", "dog")]
    # One copy per query counts: "the cat." normalises to "cat" -> EM 100.
    assert metrics.record(targets, predictions) == {"em": 100.0, "f1": 100.0}


def test_wsc_simple_postprocess(registered):
    rows = _texts("super_glue_wsc_v102_simple_eval", "validation")
    post = glue.wsc_simple_postprocess
    _, _, pete = rows[0]
    _, _, pebble = rows[1]
    assert post("Pete", example=pete, is_target=True) == 0  # the label, not the text
    assert post("the Pete", example=pete) == 1  # determiners ignored
    assert post("Mark", example=pete) == 0
    assert post("pebble", example=pebble) == 1  # subset of the referent's words
    assert post("the magic pebble's", example=pebble) == 0  # possessive never matches


def test_mixtures_have_t5_proportional_rates(registered):
    mix = seqio.get_mixture_or_task("super_glue_v102_proportional")
    rates = {t.name: mix.get_rate(t) for t in mix.tasks}
    assert rates == glue.SUPER_GLUE_WEIGHTS
    glue_mix = seqio.get_mixture_or_task("glue_v002_proportional")
    assert "glue_wnli_v002" not in {t.name for t in glue_mix.tasks}
    assert glue_mix.get_rate(seqio.get_mixture_or_task("glue_qqp_v002")) == 363_849.0


def test_register_rejects_a_path_for_vocabulary():
    with pytest.raises(TypeError, match="get_vocabulary"):
        glue.register_glue_tasks("/tmp/spm.model")


def test_glue_mixture_trains_on_its_nonzero_tasks(registered, vocabulary):
    # Targets long enough for every label (in this small vocabulary labels are many tokens).
    longest = max(len(vocabulary.encode(s)) for s in _target_strings()) + 1
    lengths = {"inputs": 32, "targets": longest}
    mixture = seqio.get_mixture_or_task("glue_v002_proportional")
    ds = mixture.get_dataset(
        lengths, split="train", shuffle=False, seed=0, use_cached=False, try_in_mem_cache=False
    )
    ds = seqio.EncDecFeatureConverter(pack=False)(ds, lengths)
    prefixes = set()
    for ex in ds.take(60).as_numpy_iterator():
        assert ex["encoder_input_tokens"].shape == (32,)
        assert ex["decoder_target_tokens"].shape == (longest,)
        prefixes.add(vocabulary.decode(ex["encoder_input_tokens"].tolist()).split(" ")[0])
    # QQP and MNLI dominate by size; the zero-rate tasks have no train split.
    assert (
        {"qqp", "mnli"}
        <= prefixes
        <= {"cola", "sst2", "mrpc", "qqp", "stsb", "mnli", "qnli", "rte"}
    )


def _target_strings():
    specs = glue._glue_specs() + glue._super_glue_specs()
    return {s for spec in specs for s in spec.target_strings or ()}


def test_labels_longer_than_the_targets_length_are_refused(registered, vocabulary):
    """Every known label string (and STS-B's scores) must fit, EOS included, in every task."""
    from switch_t5.data import lengths

    assert {"not_entailment", "choice2", "True", "0.0", "5.0"} <= _target_strings()
    needed = len(vocabulary.encode("not_entailment")) + 1
    with pytest.raises(lengths.TargetLengthError) as info:
        seqio.get_mixture_or_task("glue_rte_v002").get_dataset(
            {"inputs": 32, "targets": needed - 1},
            split="validation",
            shuffle=False,
            try_in_mem_cache=False,
        )
    assert f"'not_entailment' is {needed} tokens including EOS" in str(info.value)
    assert info.value.needed == needed
    # A mixture: one error for all its tasks whose labels do not fit, and the length for all.
    longest = max(len(vocabulary.encode(s)) for s in _target_strings()) + 1
    with pytest.raises(lengths.TargetLengthError) as info:
        tasks.check_lengths("glue_v002_proportional", "train", {"inputs": 32, "targets": needed})
    message = str(info.value)
    assert "task 'glue_cola_v002'" in message and "task 'glue_rte_v002'" not in message
    assert f"targets to at least {longest}" in message
    assert tasks.check_lengths(
        "glue_v002_proportional", "train", {"inputs": 32, "targets": longest}
    ) == {"inputs": 32, "targets": longest}
    rte = seqio.get_mixture_or_task("glue_rte_v002").get_dataset(
        {"inputs": 32, "targets": needed}, split="validation", shuffle=False, try_in_mem_cache=False
    )
    (ex,) = list(rte.as_numpy_iterator())
    assert vocabulary.decode(ex["targets"][:-1].tolist()) == "not_entailment"
    stsb = max(len(vocabulary.encode(s)) + 1 for s in glue.STSB_TARGETS)
    with pytest.raises(lengths.TargetLengthError, match=f"targets to at least {stsb}"):
        seqio.get_mixture_or_task("glue_stsb_v002").get_dataset(
            {"inputs": 32, "targets": stsb - 1},
            split="validation",
            shuffle=False,
            try_in_mem_cache=False,
        )
    # Free-text targets (ReCoRD answers, WSC referents) are not label strings: no check.
    seqio.get_mixture_or_task("super_glue_record_v102").get_dataset(
        {"inputs": 32, "targets": 2}, split="validation", shuffle=False, try_in_mem_cache=False
    )
