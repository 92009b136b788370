"""Tasks (text files, C4 on mock TFDS, embedded), the input pipeline with exact resume, the gin
edge and the `show` command, on a small corpus of Python's own documentation paragraphs."""

import json
import os
import sysconfig

import gin
import numpy as np
import pytest
import seqio
import tensorflow_datasets as tfds

from switch_t5 import data_gin, gin_utils
from switch_t5.data import corpus, pipeline, readers, show, tasks
from switch_t5.data import vocab as vocab_lib

LENGTHS = {"inputs": 64, "targets": 16}  # Raw pieces of 70 tokens -> targets 14.
TASK = tasks.TEXT_FILES_TASK


@pytest.fixture(scope="module")
def text_setup(tmp_path_factory):
    """~3,000 paragraphs of pydoc topics in a .jsonl and a .txt file, and a 612-id vocabulary."""
    root = tmp_path_factory.mktemp("text")
    topics = list(corpus._pydoc_topics(sysconfig.get_paths()["stdlib"]))
    paragraphs = [p.strip() for t in topics for p in t.split("\n\n") if len(p.strip()) > 40]
    half = len(paragraphs) // 2
    (root / "a.jsonl").write_text(
        "".join(json.dumps({"text": p}) + "\n" for p in paragraphs[:half])
    )
    (root / "b.txt").write_text("".join(p.replace("\n", " ") + "\n" for p in paragraphs[half:]))
    spm = vocab_lib.train_sentencepiece(paragraphs, str(root / "spm.model"), vocab_size=612)
    cache = str(root / "cache")
    tasks.register_text_files_task(
        [str(root / "*.jsonl"), str(root / "*.txt")],
        spm,
        validation_fraction=0.05,
        cache_dir=cache,
        shuffle_buffer_size=64,
    )
    return {"root": root, "spm": spm, "cache": cache, "num_docs": len(paragraphs)}


def _pipe(split="train", **kwargs):
    args = dict(global_batch_size=8, seed=3, host_index=0, num_hosts=1)
    args.update(kwargs)
    return pipeline.InputPipeline(TASK, split, LENGTHS, **args)


@pytest.fixture(scope="module")
def train_batches(text_setup):
    p = _pipe()
    first = [next(p) for _ in range(3)]
    state = json.loads(json.dumps(p.get_state()))
    rest = [next(p) for _ in range(3)]
    return first, state, rest


def test_text_files_task_splits_and_examples(text_setup):
    meta = tasks.prepare_text_files(
        [str(text_setup["root"] / "*.jsonl"), str(text_setup["root"] / "*.txt")],
        validation_fraction=0.05,
        cache_dir=text_setup["cache"],
    )
    assert meta["train_documents"] + meta["validation_documents"] == text_setup["num_docs"]
    assert 0.03 < meta["validation_documents"] / text_setup["num_docs"] < 0.07
    val = set(readers.read_tfrecord(meta["paths"]["validation"]))
    assert not val & set(readers.read_tfrecord(meta["paths"]["train"]))
    task = seqio.get_mixture_or_task(TASK)
    examples = list(task.get_dataset(LENGTHS, "validation", shuffle=False).as_numpy_iterator())
    assert examples and all(ex["inputs"][-1] == 1 and ex["targets"][-1] == 1 for ex in examples)
    full = [ex for ex in examples if len(ex["inputs"]) == 64]
    assert len(full) > len(examples) // 2
    assert all(len(ex["targets"]) == 14 for ex in full)
    vocab = data_gin.get_vocabulary(TASK)
    assert vocab.vocab_size == 612 and vocab.decode(full[0]["inputs"][:5].tolist())


def test_text_files_validation_files_and_bad_input(text_setup, tmp_path):
    root = text_setup["root"]
    meta = tasks.prepare_text_files(
        str(root / "a.jsonl"), validation_files=str(root / "b.txt"), cache_dir=str(tmp_path)
    )
    assert meta["validation_documents"] == text_setup["num_docs"] - meta["train_documents"]
    with pytest.raises(FileNotFoundError, match=r"VALIDATION_FILES: .*matches no file"):
        tasks.prepare_text_files(str(root / "a.jsonl"), validation_files=str(root / "no*.txt"))
    (tmp_path / "bad.jsonl").write_bytes(b'{"text": "fine"}\n{"txt": "oops"}\n')
    with pytest.raises(readers.DataFileError, match=r"bad\.jsonl:2: no string field 'text'"):
        tasks.register_text_files_task(str(tmp_path / "bad.jsonl"), text_setup["spm"])


def test_packed_batches(train_batches):
    batch = train_batches[0][0]
    assert set(batch) == set(pipeline.FEATURE_KEYS)
    for key, value in batch.items():
        length = 64 if key.startswith("encoder") else 16
        assert value.shape == (8, length) and value.dtype == np.int32, key
    seg, pos = batch["decoder_segment_ids"], batch["decoder_positions"]
    starts = (pos == 0) & (seg > 0)
    assert np.array_equal(starts.sum(1), seg.max(1))
    np.testing.assert_array_equal(batch["decoder_loss_weights"], batch["decoder_target_tokens"] > 0)
    # Teacher forcing: decoder inputs are the targets shifted right within each segment.
    row_t, row_i = batch["decoder_target_tokens"][0], batch["decoder_input_tokens"][0]
    inside = (seg[0] > 0) & (pos[0] > 0)
    np.testing.assert_array_equal(row_i[1:][inside[1:]], row_t[:-1][inside[1:]])


def test_same_seed_same_stream_other_seed_differs(train_batches):
    first, _, _ = train_batches
    again = _pipe()
    for expected in first:
        got = next(again)
        for k in got:
            np.testing.assert_array_equal(got[k], expected[k])
    other = next(_pipe(seed=4))
    assert not np.array_equal(other["encoder_input_tokens"], first[0]["encoder_input_tokens"])


def test_hosts_read_slices_of_one_global_stream(train_batches):
    first, _, _ = train_batches
    second_half = _pipe(host_index=1, num_hosts=2)
    for expected in first[:2]:
        got = next(second_half)
        for k in expected:
            np.testing.assert_array_equal(got[k], expected[k][4:])


def test_exact_resume_on_another_host_count(train_batches):
    _, state, rest = train_batches
    assert state["step"] == 3
    resumed = _pipe(host_index=2, num_hosts=4)
    resumed.set_state(state)
    assert resumed.step == 3
    for expected in rest:
        got = next(resumed)
        for k in got:
            np.testing.assert_array_equal(got[k], expected[k][4:6])
    assert resumed.step == 6


def test_resume_with_other_settings_is_refused(train_batches):
    _, state, _ = train_batches
    with pytest.raises(ValueError, match=r"seed: saved 3, now 5"):
        _pipe(seed=5).set_state(state)
    with pytest.raises(ValueError, match="multiple of num_hosts=3"):
        _pipe(num_hosts=3)


def test_finite_unpacked_eval_stream(text_setup):
    p = _pipe(split="validation", shuffle=False, pack=False, repeat=False, global_batch_size=16)
    batches = list(p)
    assert list(p) == []  # Exhausted until reset.
    task = seqio.get_mixture_or_task(TASK)
    count = sum(1 for _ in task.get_dataset(LENGTHS, "validation", shuffle=False, seed=3))
    assert len(batches) == -(-count // 16) and pipeline.num_batches(p) == len(batches)
    real = sum(int((b["decoder_loss_weights"].sum(1) > 0).sum()) for b in batches)
    assert real == count
    last = batches[-1]
    if count % 16:
        assert not last["encoder_input_tokens"][count % 16 :].any()
    for b in batches:
        assert set(b) == set(pipeline.FEATURE_KEYS)
        np.testing.assert_array_equal(b["encoder_segment_ids"], b["encoder_input_tokens"] > 0)
        assert b["decoder_segment_ids"].max() <= 1
    p.reset()
    np.testing.assert_array_equal(
        next(p)["encoder_input_tokens"], batches[0]["encoder_input_tokens"]
    )


def test_c4_tasks_on_mock_tfds(text_setup):
    vocab = vocab_lib.get_vocabulary(text_setup["spm"])
    tasks.register_c4_tasks(vocab, tfds_data_dir="/nonexistent/tfds")
    for name, version in ((tasks.C4_TASK, "3.1.0"), (tasks.C4_V220_TASK, "2.2.0")):
        source = seqio.get_mixture_or_task(name).source
        assert source.tfds_dataset.name == f"c4/en:{version}"
        assert source.tfds_dataset.data_dir == "/nonexistent/tfds"
    tasks.register_c4_tasks(vocab)
    with tfds.testing.mock_data(num_examples=40):
        # Mock TFDS metadata has no split sizes, which seqio's in-memory cache check reads.
        ds = seqio.get_mixture_or_task(tasks.C4_TASK).get_dataset(
            LENGTHS, "train", shuffle=False, try_in_mem_cache=False
        )
        examples = list(ds.as_numpy_iterator())
    assert examples
    for ex in examples:
        assert ex["inputs"][-1] == 1 and ex["targets"][-1] == 1
        assert ex["targets"][0] == 611  # <extra_id_0>


@pytest.fixture
def clean_gin():
    gin.clear_config()
    yield
    gin.clear_config()


def _bind(**macros):
    bindings = [f"{k} = {json.dumps(v)}" for k, v in macros.items()]
    gin_utils.parse_gin([], bindings, finalize=False)


def test_gin_registers_text_task_from_macros(text_setup, clean_gin):
    root = text_setup["root"]
    _bind(
        MIXTURE_OR_TASK_NAME=TASK,
        TEXT_FILES=[str(root / "a.jsonl")],
        VOCABULARY_PATH=text_setup["spm"],
    )
    gin.bind_parameter("switch_t5.data_gin.register_tasks.cache_dir", text_setup["cache"])
    data_gin.register_tasks()
    meta = seqio.get_mixture_or_task(TASK).source
    ds = meta.get_dataset("train", shuffle=False)
    first = next(ds.as_numpy_iterator())["text"].decode()
    assert first == next(readers.iter_file_documents(str(root / "a.jsonl")))
    assert data_gin.get_vocabulary(TASK).vocab_size == 612


def test_gin_missing_and_unknown(clean_gin, text_setup):
    _bind(MIXTURE_OR_TASK_NAME=TASK, TEXT_FILES=str(text_setup["root"] / "a.jsonl"))
    with pytest.raises(data_gin.MissingMacroError, match="VOCABULARY_PATH is not set"):
        data_gin.register_tasks()
    with pytest.raises(data_gin.MissingMacroError, match="MIXTURE_OR_TASK_NAME is not set"):
        gin.clear_config()
        data_gin.register_tasks()
    with pytest.raises(ValueError, match="'no_such_task' is not a known task"):
        data_gin.register_tasks("no_such_task")
    with pytest.raises(ValueError, match="is not registered"):
        data_gin.get_vocabulary("no_such_task")


def test_gin_registers_files_text_to_text(text_setup, clean_gin, tmp_path):
    dev = tmp_path / "dev.tsv"
    dev.write_text(
        "index\tsentence1\tsentence2\tlabel\n"
        "0\tIt rains.\tIt is wet.\tentailment\n"
        "1\tThe cat sleeps.\tThe dog barks.\tnot_entailment\n"
    )
    _bind(
        MIXTURE_OR_TASK_NAME="files_text_to_text",
        VALIDATION_FILES=str(dev),
        VOCABULARY_PATH=text_setup["spm"],
        INPUT_TEMPLATE="rte sentence1: {sentence1} sentence2: {sentence2}",
        TARGET_COLUMN="label",
        LABEL_NAMES=["entailment", "not_entailment"],
    )
    data_gin.register_tasks()
    rows = show.show("files_text_to_text", "validation", 2, {"inputs": 64, "targets": 8})
    assert [r["inputs_text"] for r in rows] == [
        "rte sentence1: It rains. sentence2: It is wet.",
        "rte sentence1: The cat sleeps. sentence2: The dog barks.",
    ]
    assert [r["targets_text"] for r in rows] == ["entailment", "not_entailment"]
    gin.clear_config()
    _bind(MIXTURE_OR_TASK_NAME="files_text_to_text", VOCABULARY_PATH=text_setup["spm"])
    with pytest.raises(data_gin.MissingMacroError, match="INPUT_TEMPLATE is not set"):
        data_gin.register_tasks()


def test_show_prints_examples_with_sentinels(text_setup, clean_gin, capsys):
    root = text_setup["root"]
    show.main(
        [
            f"--task={TASK}",
            "--split=validation",
            "--num_examples=3",
            "--feature_lengths=inputs:64,targets:16",
            f"--gin.TEXT_FILES={json.dumps([str(root / '*.jsonl'), str(root / '*.txt')])}",
            f"--gin.VOCABULARY_PATH={json.dumps(text_setup['spm'])}",
            f"--gin.switch_t5.data_gin.register_tasks.cache_dir={json.dumps(text_setup['cache'])}",
            "--gin.switch_t5.data_gin.register_tasks.text_validation_fraction=0.05",
        ]
    )
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["index"] for r in rows] == [0, 1, 2]
    vocab = vocab_lib.get_vocabulary(text_setup["spm"])
    for r in rows:
        assert r["inputs"][-1] == 1 and len(r["inputs"]) <= 64
        assert "<extra_id_0>" in r["inputs_text"] and r["targets_text"].startswith("<extra_id_0>")
        assert r["targets_text"] == vocab_lib.decode_with_sentinels(vocab, r["targets"])
    with pytest.raises(ValueError, match="NAME:LENGTH"):
        show.parse_feature_lengths("inputs=64")


@pytest.mark.slow  # Harvests the standard library and trains a vocabulary: ~15-60 s.
def test_embedded_task_from_gin_on_real_python_docs(tmp_path_factory, clean_gin, monkeypatch):
    """The quickstart task: harvest + vocabulary on first use, cached, served from cache after."""
    cache = str(tmp_path_factory.mktemp("cache"))
    _bind(MIXTURE_OR_TASK_NAME=tasks.EMBEDDED_TASK)
    gin.bind_parameter("switch_t5.data_gin.register_tasks.cache_dir", cache)
    gin.bind_parameter("switch_t5.data_gin.register_tasks.embedded_vocab_size", 1024)
    data_gin.register_tasks()
    info = corpus.prepare_embedded_corpus(cache)
    assert info.train_documents > 1000 and info.validation_documents > 10
    assert info.characters > 1_000_000 and os.path.dirname(info.train_path).startswith(cache)
    val = list(readers.read_tfrecord(info.validation_path))
    assert all(corpus.is_validation(d, corpus.DEFAULT_VALIDATION_FRACTION) for d in val)
    train = readers.read_tfrecord(info.train_path)
    assert not any(corpus.is_validation(d, corpus.DEFAULT_VALIDATION_FRACTION) for d in train)
    vocab = data_gin.get_vocabulary(tasks.EMBEDDED_TASK)
    assert vocab.vocab_size == 1024
    ids = vocab.encode("The return statement leaves the current function call.")
    assert len(ids) < 15  # Real English words are whole pieces of this vocabulary.
    rows = show.show(tasks.EMBEDDED_TASK, "validation", 2, LENGTHS)
    assert len(rows) == 2 and "<extra_id_0>" in rows[0]["inputs_text"]
    # Second run: no harvesting, no vocabulary training.
    monkeypatch.setattr(corpus, "harvest_documents", lambda *a: pytest.fail("re-harvested"))
    monkeypatch.setattr(vocab_lib, "train_sentencepiece", lambda *a, **k: pytest.fail("trained"))
    data_gin.register_tasks()
    assert data_gin.get_vocabulary(tasks.EMBEDDED_TASK).vocab_size == 1024
