"""`files_text_to_text` on generated TSV/JSONL/CSV files, and every kind of bad input."""

import gzip
import json
import string

import numpy as np
import pytest

seqio = pytest.importorskip("seqio")

from switch_t5.data import user_tasks, vocab  # noqa: E402
from switch_t5.data.readers import DataFileError  # noqa: E402

RTE_TEMPLATE = "rte sentence1: {sentence1} sentence2: {sentence2}"
RTE_LABELS = ["entailment", "not_entailment"]

# GLUE's RTE dev.tsv layout: index, sentence1, sentence2, label (label names, no quoting).
RTE_TRAIN = [
    ("0", "Ann is tall.", "Ann is not short.", "entailment"),
    ("1", 'He said "hi.', "He spoke.", "entailment"),  # unbalanced quote: text, not quoting
    ("2", "It rains.", "It is dry.", "not_entailment"),
]
RTE_DEV = [
    ("0", "Bob runs fast.", "Bob moves.", "entailment"),
    ("1", "The cup is full.", "The cup is empty.", "not_entailment"),
    ("2", "Cats purr.", "Dogs purr.", "not_entailment"),
]


def _write_tsv(path, header, rows):
    lines = ["\t".join(header)] if header else []
    lines += ["\t".join(r) for r in rows]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return str(path)


@pytest.fixture(scope="module")
def vocabulary(tmp_path_factory):
    chars = list(string.ascii_letters + string.digits + string.punctuation)
    words = ["rte", "sentence", "entailment", "not", "the", "cup", "is", "cats", "review", "good"]
    rng = np.random.default_rng(1)
    docs = [" ".join([*rng.choice(words, 8), *rng.choice(chars, 6)]) for _ in range(300)]
    path = vocab.train_sentencepiece(
        docs, str(tmp_path_factory.mktemp("spm") / "user.model"), vocab_size=100 + 150
    )
    return vocab.get_vocabulary(path)


@pytest.fixture(scope="module")
def rte_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("rte")
    header = ("index", "sentence1", "sentence2", "label")
    return (
        _write_tsv(d / "train.tsv", header, RTE_TRAIN),
        _write_tsv(d / "dev.tsv", header, RTE_DEV),
    )


def _pairs(task, split):
    ds = task.get_dataset(
        sequence_length=None, split=split, shuffle=False, use_cached=False, try_in_mem_cache=False
    )
    return [
        (ex["inputs_pretokenized"].decode(), ex["targets_pretokenized"].decode(), ex)
        for ex in ds.as_numpy_iterator()
    ]


def test_rte_tsv_train_and_validation(vocabulary, rte_files):
    train, dev = rte_files
    task = user_tasks.register_files_text_to_text(
        train_files=train,
        validation_files=dev,
        vocabulary=vocabulary,
        input_template=RTE_TEMPLATE,
        target_column="label",
        label_names=RTE_LABELS,
    )
    assert task.name == "files_text_to_text"
    assert seqio.get_mixture_or_task("files_text_to_text") is task
    assert set(task.splits) == {"train", "validation"}
    got = [(i, t) for i, t, _ in _pairs(task, "train")]
    assert got == [
        ("rte sentence1: Ann is tall. sentence2: Ann is not short.", "entailment"),
        ('rte sentence1: He said "hi. sentence2: He spoke.', "entailment"),
        ("rte sentence1: It rains. sentence2: It is dry.", "not_entailment"),
    ]
    rows = _pairs(task, "validation")
    assert [t for _, t, _ in rows] == ["entailment", "not_entailment", "not_entailment"]
    inputs, _, ex = rows[0]
    assert ex["inputs"][-1] == 1 and ex["targets"][-1] == 1  # EOS
    assert vocabulary.decode(ex["inputs"][:-1].tolist()) == inputs

    # Evaluation: label text -> class id; text that is no label -> -1 (wrong).
    targets = [task.postprocess_fn(t, example=ex, is_target=True) for _, t, ex in rows]
    predictions = [task.postprocess_fn(p) for p in ("entailment", "entailment", "garbage")]
    assert targets == [0, 1, 1] and predictions == [0, 0, -1]
    (accuracy,) = task.predict_metric_fns
    assert accuracy(targets, predictions) == {"accuracy": pytest.approx(100 / 3, rel=1e-12)}


def test_jsonl_with_integer_and_bool_labels(vocabulary, tmp_path):
    path = tmp_path / "reviews.jsonl"
    rows = [
        {"text": "good film", "stars": 5, "label": 1},
        {"text": "bad film", "stars": 1, "label": False},
        {"text": "ok", "stars": 3, "label": "positive"},
    ]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n", encoding="utf-8")
    task = user_tasks.register_files_text_to_text(
        "reviews",
        validation_files=str(path),
        vocabulary=vocabulary,
        input_template="review ({stars} stars): {text}",
        target_column="label",
        label_names=["negative", "positive"],
        metrics=["accuracy", "f1", "matthews_corrcoef"],
    )
    assert task.splits == ("validation",)
    assert [(i, t) for i, t, _ in _pairs(task, "validation")] == [
        ("review (5 stars): good film", "positive"),
        ("review (1 stars): bad film", "negative"),
        ("review (3 stars): ok", "positive"),
    ]
    names = [f.__name__ for f in task.predict_metric_fns]
    assert names == ["accuracy", "f1_score_with_invalid", "matthews_corrcoef"]


def test_headerless_csv_with_quoted_fields_and_numeric_targets(vocabulary, tmp_path):
    path = tmp_path / "sts.csv.gz"
    content = 'A man sings.,"A man, singing",4.2\n"Two\nlines",One line,1.0\nx,y,0.5\n'
    with gzip.open(path, "wt", encoding="utf-8") as f:
        f.write(content)
    task = user_tasks.register_files_text_to_text(
        "sts_csv",
        train_files=str(tmp_path / "*.csv.gz"),
        vocabulary=vocabulary,
        input_template="stsb sentence1: {a} sentence2: {b}",
        target_column="score",
        metrics=["pearson", "spearman"],
        has_header=False,
        column_names=["a", "b", "score"],
    )
    assert [(i, t) for i, t, _ in _pairs(task, "train")] == [
        ("stsb sentence1: A man sings. sentence2: A man, singing", "4.2"),
        ("stsb sentence1: Two\nlines sentence2: One line", "1.0"),
        ("stsb sentence1: x sentence2: y", "0.5"),
    ]
    assert task.postprocess_fn("3.5") == 3.5
    assert task.postprocess_fn("n/a") == -1.0


def test_vocabulary_path_is_loaded(vocabulary, rte_files):
    task = user_tasks.register_files_text_to_text(
        "rte_from_path",
        validation_files=rte_files[1],
        vocabulary_path=vocabulary.sentencepiece_model_file,
        input_template=RTE_TEMPLATE,
        target_column="label",
        label_names=RTE_LABELS,
    )
    assert task.output_features["targets"].vocabulary.vocab_size == vocabulary.vocab_size


# ------------------------------------------------------------------ bad input


def _fmt(**overrides):
    kwargs = dict(
        input_template=RTE_TEMPLATE,
        template_columns=("sentence1", "sentence2"),
        target_column="label",
        label_names=tuple(RTE_LABELS),
        numeric_targets=False,
        has_header=True,
        column_names=None,
        skip_invalid_rows=False,
    )
    kwargs.update(overrides)
    return user_tasks.RowFormat(**kwargs)


def test_glob_matching_nothing_names_the_setting(vocabulary, tmp_path):
    with pytest.raises(FileNotFoundError, match=r"VALIDATION_FILES: .*nothing\*\.tsv.*matches no"):
        user_tasks.register_files_text_to_text(
            validation_files=str(tmp_path / "nothing*.tsv"),
            vocabulary=vocabulary,
            input_template=RTE_TEMPLATE,
            target_column="label",
        )


def test_empty_file_and_header_only_file(tmp_path):
    empty = tmp_path / "empty.tsv"
    empty.write_bytes(b"")
    with pytest.raises(DataFileError, match=r"empty\.tsv: the file is empty"):
        user_tasks.read_examples([str(empty)], _fmt())
    header_only = _write_tsv(tmp_path / "h.tsv", ("sentence1", "sentence2", "label"), [])
    with pytest.raises(DataFileError, match=r"h\.tsv: no data rows"):
        user_tasks.read_examples([header_only], _fmt())


def test_invalid_utf8_names_the_line(tmp_path):
    path = tmp_path / "bad.tsv"
    path.write_bytes(b"sentence1\tsentence2\tlabel\nok\tfine\t0\nbad \xff byte\tx\t1\n")
    with pytest.raises(DataFileError, match=r"bad\.tsv:3: invalid UTF-8"):
        user_tasks.read_examples([str(path)], _fmt())


def test_truncated_gzip(tmp_path):
    data = gzip.compress(("sentence1\tsentence2\tlabel\n" + "a\tb\t0\n" * 200).encode())
    path = tmp_path / "cut.tsv.gz"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(DataFileError, match=r"cut\.tsv\.gz: truncated or corrupt gzip"):
        user_tasks.read_examples([str(path)], _fmt())


def test_tsv_missing_a_named_column_fails_at_the_header(vocabulary, tmp_path):
    path = _write_tsv(tmp_path / "dev.tsv", ("index", "premise", "hypothesis", "label"), RTE_DEV)
    task = user_tasks.register_files_text_to_text(
        "rte_bad_header",
        validation_files=path,
        vocabulary=vocabulary,
        input_template=RTE_TEMPLATE,
        target_column="label",
        label_names=RTE_LABELS,
    )
    # The error surfaces as a Python exception when the split is first read.
    with pytest.raises(DataFileError, match=r"dev\.tsv:1: the header has no column 'sentence1', "):
        _pairs(task, "validation")


def test_label_not_in_label_names_error_or_skip_and_count(tmp_path):
    rows = [*RTE_DEV, ("3", "A.", "B.", "neutral"), ("4", "C.", "D.", "7"), ("5", "E.", "F.")]
    path = _write_tsv(tmp_path / "dev.tsv", ("index", "sentence1", "sentence2", "label"), rows)
    with pytest.raises(DataFileError, match=r"dev\.tsv:5: label 'neutral' is not one of"):
        user_tasks.read_examples([path], _fmt())
    stats = user_tasks.RowStats()
    examples = user_tasks.read_examples([path], _fmt(skip_invalid_rows=True), stats)
    assert len(examples) == stats.examples == 3
    assert stats.skipped == {"label not in LABEL_NAMES": 2, "wrong number of fields": 1}


def test_wrong_field_count_and_malformed_json(tmp_path):
    path = _write_tsv(tmp_path / "t.tsv", ("sentence1", "sentence2", "label"), [("a", "b")])
    with pytest.raises(DataFileError, match=r"t\.tsv:2: 2 fields, expected 3"):
        user_tasks.read_examples([path], _fmt())
    bad = tmp_path / "x.jsonl"
    bad.write_text('{"sentence1": "a", "sentence2": "b", "label": 0}\n{"sentence1": oops}\n')
    with pytest.raises(DataFileError, match=r"x\.jsonl:2: not valid JSON"):
        user_tasks.read_examples([str(bad)], _fmt())
    missing = tmp_path / "m.jsonl"
    missing.write_text('{"sentence1": "a", "label": 0}\n')
    with pytest.raises(DataFileError, match=r"m\.jsonl:1: no value for column 'sentence2'"):
        user_tasks.read_examples([str(missing)], _fmt())


def test_unknown_extension_fails_at_registration(vocabulary, tmp_path):
    path = tmp_path / "data.xlsx"
    path.write_text("x")
    with pytest.raises(DataFileError, match=r"data\.xlsx: unknown format"):
        user_tasks.register_files_text_to_text(
            train_files=str(path),
            vocabulary=vocabulary,
            input_template="{x}",
            target_column="y",
        )


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(input_template="rte {}"), "positional field"),
        (dict(input_template="no columns"), "uses no column"),
        (dict(input_template="bad {sentence1"), "not a valid format string"),
        (dict(label_names="entailment"), "non-empty list"),
        (dict(label_names=["a", "a"]), "duplicates"),
        (dict(metrics=["pearson"]), "with LABEL_NAMES use"),
        (dict(label_names=None, metrics=["f1"]), "need class labels"),
        (dict(label_names=None, metrics=["pearson", "accuracy"]), "mix correlations"),
        (dict(metrics=["acc"]), "Unknown metric 'acc'"),
        (dict(column_names=["a"]), "set HAS_HEADER=False"),
        (dict(has_header=False), "needs COLUMN_NAMES"),
        (dict(has_header=False, column_names=["sentence1", "label"]), r"lacks \['sentence2'\]"),
        (dict(vocabulary=None), "VOCABULARY_PATH"),
        (dict(validation_files=None), "TRAIN_FILES and/or VALIDATION_FILES"),
    ],
)
def test_bad_arguments(vocabulary, rte_files, kwargs, message):
    args = dict(
        validation_files=rte_files[1],
        vocabulary=vocabulary,
        input_template=RTE_TEMPLATE,
        target_column="label",
        label_names=RTE_LABELS,
    )
    args.update(kwargs)
    with pytest.raises(ValueError, match=message):
        user_tasks.register_files_text_to_text("bad_args", **args)


def test_gin_macros_register_the_task(vocabulary, rte_files):
    """The fine-tuning config a user writes: macros only, no Python."""
    gin = pytest.importorskip("gin")
    from switch_t5 import data_gin

    train, dev = rte_files
    gin.clear_config()
    try:
        gin.parse_config(
            [
                'MIXTURE_OR_TASK_NAME = "files_text_to_text"',
                f'TRAIN_FILES = "{train}"',
                f'VALIDATION_FILES = ["{dev}"]',
                f'VOCABULARY_PATH = "{vocabulary.sentencepiece_model_file}"',
                f'INPUT_TEMPLATE = "{RTE_TEMPLATE}"',
                'TARGET_COLUMN = "label"',
                'LABEL_NAMES = ["entailment", "not_entailment"]',
                'METRICS = ["accuracy", "matthews_corrcoef"]',
            ]
        )
        data_gin.register_tasks()
    finally:
        gin.clear_config()
    task = seqio.get_mixture_or_task("files_text_to_text")
    (inputs, target, _), *_ = _pairs(task, "validation")
    assert (inputs, target) == ("rte sentence1: Bob runs fast. sentence2: Bob moves.", "entailment")
    assert [f.__name__ for f in task.predict_metric_fns] == ["accuracy", "matthews_corrcoef"]


# ------------------------------------------------------------------ targets that do not fit


def _pipeline_targets(name, split, lengths):
    """The decoder targets of the training pipeline's first batch, decoded (EOS dropped)."""
    from switch_t5.data import pipeline

    pipe = pipeline.InputPipeline(
        name, split, lengths, 4, shuffle=False, pack=False, repeat=False, host_index=0, num_hosts=1
    )
    return next(iter(pipe))["decoder_target_tokens"]


def test_label_longer_than_the_targets_length_is_refused(vocabulary, rte_files):
    """A targets length that fits "entailment" but not "not_entailment" used to cut the latter
    silently (training looks perfect, decoding never produces the whole label); now it is
    refused before TensorFlow builds anything."""
    from switch_t5.data import lengths, pipeline
    from switch_t5.errors import UserError

    train, dev = rte_files
    user_tasks.register_files_text_to_text(
        train_files=train,
        validation_files=dev,
        vocabulary=vocabulary,
        input_template=RTE_TEMPLATE,
        target_column="label",
        label_names=RTE_LABELS,
    )
    needed = len(vocabulary.encode("not_entailment")) + 1  # seqio appends EOS
    short = len(vocabulary.encode("entailment")) + 1  # fits "entailment" only
    assert short < needed
    for split in ("train", "validation"):
        with pytest.raises(lengths.TargetLengthError) as info:
            pipeline.InputPipeline("files_text_to_text", split, {"inputs": 32, "targets": short}, 4)
        message = str(info.value)
        assert isinstance(info.value, UserError)
        assert f"'not_entailment' is {needed} tokens including EOS" in message
        assert "'entailment' is" not in message  # it fits
        assert f"targets to at least {needed}" in message
    # seqio's own get_dataset (evaluation, data.show, mixtures) is refused the same way.
    task = seqio.get_mixture_or_task("files_text_to_text")
    with pytest.raises(lengths.TargetLengthError, match="'not_entailment'"):
        task.get_dataset({"inputs": 32, "targets": needed - 1}, split="validation")
    # The length the message asks for keeps the whole label, EOS included.
    targets = _pipeline_targets(
        "files_text_to_text", "validation", {"inputs": 32, "targets": needed}
    )
    rows = [row[row > 0].tolist() for row in targets if row.any()]
    assert all(ids[-1] == 1 for ids in rows)
    assert {vocabulary.decode(ids[:-1]) for ids in rows} == set(RTE_LABELS)


def test_entry_points_check_lengths_after_registering(vocabulary, tmp_path):
    """train/eval call `data_gin.check_lengths` right after registering the task: before any
    model, MODEL_DIR or dataset exists. Each split the task has is checked (free text)."""
    from switch_t5 import data_gin
    from switch_t5.data import lengths

    long = "the cup is not the cup is good review"
    n_long = len(vocabulary.encode(long)) + 1
    user_tasks.register_files_text_to_text(
        "gen_splits",
        train_files=_write_tsv(tmp_path / "t.tsv", ("text", "summary"), [("a", "the cup")]),
        validation_files=_write_tsv(tmp_path / "v.tsv", ("text", "summary"), [("b", long)]),
        vocabulary=vocabulary,
        input_template="{text}",
        target_column="summary",
    )
    ok = {"inputs": 8, "targets": n_long - 1}
    assert data_gin.check_lengths("gen_splits", ok, ["train"]) == ok
    with pytest.raises(lengths.TargetLengthError, match="1 of the 1 'validation' examples"):
        data_gin.check_lengths("gen_splits", ok)
    with pytest.raises(lengths.FeatureLengthsError, match=r"\['targets'\]=16\.5 is a float"):
        data_gin.check_lengths("gen_splits", {"inputs": 8, "targets": 16.5})


def test_free_text_targets_are_scanned(vocabulary, tmp_path):
    from switch_t5.data import lengths

    short, long = "the cup", "the cup is not the cup is good review"
    rows = [(f"s{i}", long if i in (3, 5) else short) for i in range(8)]
    path = _write_tsv(tmp_path / "gen.tsv", ("text", "summary"), rows)
    n_long = len(vocabulary.encode(long)) + 1
    n_short = len(vocabulary.encode(short)) + 1
    assert n_short < n_long

    def register(**kwargs):
        return user_tasks.register_files_text_to_text(
            "gen",
            train_files=path,
            vocabulary=vocabulary,
            input_template="summarize: {text}",
            target_column="summary",
            **kwargs,
        )

    register()
    with pytest.raises(lengths.TargetLengthError) as info:
        _pipeline_targets("gen", "train", {"inputs": 16, "targets": n_long - 1})
    message = str(info.value)
    assert "2 of the 8 'train' examples have targets longer than" in message
    assert f"the longest is {n_long} tokens including EOS ('{long}')" in message
    assert f"targets to at least {n_long}" in message
    assert "target_scan_examples=0" in message
    # Only the first N examples are scanned: both long targets come after the first 3.
    register(target_scan_examples=3)
    _pipeline_targets("gen", "train", {"inputs": 16, "targets": n_short})
    register(target_scan_examples=4)
    with pytest.raises(lengths.TargetLengthError, match="1 of the first 4 'train' examples"):
        _pipeline_targets("gen", "train", {"inputs": 16, "targets": n_short})
    register(target_scan_examples=0)  # no scan: the user accepts cut targets
    _pipeline_targets("gen", "train", {"inputs": 16, "targets": n_short})
    register()
    _pipeline_targets("gen", "train", {"inputs": 16, "targets": n_long})
