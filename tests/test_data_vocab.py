"""Readers (bad input), SentencePiece training with T5 ids, fingerprints, the embedded corpus."""

import gzip
import hashlib
import json
import re
import shutil

import pytest
import sentencepiece

from switch_t5.data import corpus, readers
from switch_t5.data import vocab as vocab_lib

ENGLISH = (
    "The quick brown fox jumps over the lazy dog near the river bank. "
    "A journey of a thousand miles begins with a single step, said the old teacher. "
    "Python is a programming language that lets you work quickly and integrate systems. "
)


@pytest.fixture(scope="module")
def spm_path(tmp_path_factory):
    docs = [f"{ENGLISH} Document number {i} talks about item {i * 7}." for i in range(200)]
    path = tmp_path_factory.mktemp("spm") / "tiny.model"
    return vocab_lib.train_sentencepiece(docs, str(path), vocab_size=227, extra_ids=100)


def _write(path, data: bytes):
    path.write_bytes(data)
    return str(path)


# ---------------------------------------------------------------- readers


def test_resolve_files_sorts_and_names_unmatched_glob(tmp_path):
    b = _write(tmp_path / "b.txt", b"x\n")
    a = _write(tmp_path / "a.txt", b"y\n")
    assert readers.resolve_files(str(tmp_path / "*.txt")) == [a, b]
    assert readers.resolve_files([b, str(tmp_path / "?.txt")]) == [a, b]
    with pytest.raises(FileNotFoundError, match=r"TEXT_FILES: '.*nothing\*\.jsonl' matches no"):
        readers.resolve_files([a, str(tmp_path / "nothing*.jsonl")])


def test_txt_lines_and_paragraphs_skip_and_count_blanks(tmp_path):
    path = _write(tmp_path / "t.txt", b"first doc\n\nsecond\nstill second\n   \n\nthird\n")
    stats = readers.ReadStats()
    assert list(readers.iter_file_documents(path, "line", stats)) == [
        "first doc",
        "second",
        "still second",
        "third",
    ]
    assert (stats.documents, stats.skipped_blank) == (4, 3)
    stats = readers.ReadStats()
    assert list(readers.iter_file_documents(path, "paragraph", stats)) == [
        "first doc",
        "second\nstill second",
        "third",
    ]
    assert stats.skipped_blank == 1  # The second blank line in a row.


def test_jsonl_and_json_gz(tmp_path):
    lines = [json.dumps({"text": "alpha\nbeta", "url": "u"}), "", json.dumps({"text": "gamma"})]
    data = ("\n".join(lines) + "\n").encode()
    plain = _write(tmp_path / "d.jsonl", data)
    packed = _write(tmp_path / "d.json.gz", gzip.compress(data))
    expected = ["alpha\nbeta", "gamma"]
    assert list(readers.iter_file_documents(plain)) == expected
    assert list(readers.iter_documents([packed, plain])) == expected * 2


@pytest.mark.parametrize(
    "name, data, message",
    [
        ("empty.txt", b"", r"empty\.txt: the file is empty"),
        ("blank.txt", b"\n  \n", r"blank\.txt: contains no document"),
        ("bad.txt", b"ok\nbad \xff byte\n", r"bad\.txt:2: invalid UTF-8 at byte 4"),
        ("nofield.jsonl", b'{"text": "a"}\n{"body": "b"}\n', r"nofield\.jsonl:2: no string field"),
        ("broken.jsonl", b'{"text": "a"}\n{"text": \n', r"broken\.jsonl:2: not a JSON object"),
        ("notgz.json.gz", b"plain text\n", r"notgz\.json\.gz: truncated or corrupt gzip"),
        ("doc.pdf", b"%PDF", r"doc\.pdf: unknown text format"),
    ],
)
def test_bad_files_name_file_and_line(tmp_path, name, data, message):
    path = _write(tmp_path / name, data)
    with pytest.raises(readers.DataFileError, match=message):
        list(readers.iter_file_documents(path))


def test_truncated_gzip_names_last_good_line(tmp_path):
    data = b"".join(json.dumps({"text": f"doc {i} " * 50}).encode() + b"\n" for i in range(200))
    blob = gzip.compress(data)
    path = _write(tmp_path / "cut.json.gz", blob[: len(blob) // 2])
    with pytest.raises(readers.DataFileError, match=r"cut\.json\.gz: truncated .* after line \d+"):
        list(readers.iter_file_documents(path))


# ---------------------------------------------------------------- vocabularies


def test_trained_vocabulary_has_t5_ids_and_is_deterministic(spm_path, tmp_path):
    vocab = vocab_lib.get_vocabulary(spm_path)
    assert vocab.vocab_size == 227 and vocab.extra_ids == 100
    sp = sentencepiece.SentencePieceProcessor(model_file=spm_path)
    assert (sp.pad_id(), sp.eos_id(), sp.unk_id(), sp.bos_id()) == (0, 1, 2, -1)
    assert sp.get_piece_size() == 127  # seqio appends the 100 extra ids.
    ids = vocab.encode("The quick brown fox")
    assert vocab.decode(ids) == "The quick brown fox"
    docs = [f"{ENGLISH} Document number {i} talks about item {i * 7}." for i in range(200)]
    again = vocab_lib.train_sentencepiece(docs, str(tmp_path / "again.model"), 227, 100)
    with open(spm_path, "rb") as f1, open(again, "rb") as f2:
        assert f1.read() == f2.read()
    with pytest.raises(ValueError, match="leaves 5 pieces"):
        vocab_lib.train_sentencepiece(docs, str(tmp_path / "x.model"), 105, 100)


def test_fingerprint_and_size_checks(spm_path, tmp_path):
    vocab = vocab_lib.get_vocabulary(spm_path)
    fp = vocab_lib.vocab_fingerprint(vocab)
    with open(spm_path, "rb") as f:
        digest = hashlib.sha256(f.read()).hexdigest()
    assert fp == f"{spm_path}|extra_ids=100|sha256={digest}"
    moved = shutil.copy(spm_path, tmp_path / "moved.model")
    vocab_lib.check_fingerprint(fp, vocab_lib.vocab_fingerprint(vocab_lib.get_vocabulary(moved)))
    other = vocab_lib.vocab_fingerprint(vocab_lib.get_vocabulary(moved, extra_ids=50))
    with pytest.raises(vocab_lib.VocabularyMismatchError, match="vocabulary mismatch"):
        vocab_lib.check_fingerprint(fp, other)
    vocab_lib.check_model_vocab_size(vocab, 256)
    with pytest.raises(vocab_lib.VocabularyMismatchError, match=r"vocab_size = 256"):
        vocab_lib.check_model_vocab_size(vocab, 32128, "my_task")
    with pytest.raises(FileNotFoundError, match="VOCABULARY_PATH"):
        vocab_lib.get_vocabulary(str(tmp_path / "missing.model"))


def test_bad_vocabulary_files_name_the_path_and_what_it_should_be(tmp_path):
    """A text file used to end in protobuf's `DecodeError: Wire format was corrupt`."""
    from switch_t5.errors import UserError

    wanted = r"must be a SentencePiece \.model file .*`python -m switch_t5\.data\.vocab"
    not_spm = _write(tmp_path / "vocab.txt", b"the\nquick\nbrown fox\n")
    cases = [
        (not_spm, r"vocab\.txt' \(20 bytes, starting b'the\\nquick.*is not a SentencePiece model"),
        (_write(tmp_path / "empty.model", b""), r"empty\.model' is empty"),
        (str(tmp_path / "missing.model"), r"missing\.model' does not exist"),
        (str(tmp_path), "is a directory, not a file"),
    ]
    for path, message in cases:
        with pytest.raises(vocab_lib.VocabularyFileError, match=message) as info:
            vocab_lib.get_vocabulary(path)
        assert isinstance(info.value, UserError)
        assert re.search(wanted, str(info.value)), str(info.value)
    assert issubclass(vocab_lib.VocabularyFileNotFoundError, FileNotFoundError)


def test_sentencepiece_model_without_t5_ids_is_refused(tmp_path):
    """SentencePiece's default ids (unk 0, bos 1, eos 2, no pad) would make EOS a word piece."""
    model = tmp_path / "default_ids.model"
    with open(model, "wb") as f:
        sentencepiece.SentencePieceTrainer.train(
            sentence_iterator=iter([ENGLISH] * 50),
            model_writer=f,
            vocab_size=60,
            minloglevel=2,
        )
    with pytest.raises(vocab_lib.VocabularyFileError, match=r"pad -1, EOS 2, UNK 0 .* need pad 0"):
        vocab_lib.get_vocabulary(str(model))


def test_unreadable_url_names_the_path():
    """Offline (or without access), a gs:// vocabulary is one error naming it, no traceback."""
    path = "gs://switch-t5-no-such-bucket-7f3a/vocabs/spm.model"
    with pytest.raises(vocab_lib.VocabularyFileError, match=r"cannot read vocabulary file 'gs://"):
        vocab_lib.get_vocabulary(path)


def test_decode_with_sentinels(spm_path):
    vocab = vocab_lib.get_vocabulary(spm_path)
    ids = [*vocab.encode("The quick"), 226, *vocab.encode("fox"), 225, 1, 55, 0]
    assert vocab_lib.decode_with_sentinels(vocab, ids) == "The quick <extra_id_0> fox <extra_id_1>"


def test_vocab_command(tmp_path, capsys):
    src = tmp_path / "corpus.txt"
    src.write_text("\n".join(f"{ENGLISH} line {i}" for i in range(100)) + "\n")
    out = tmp_path / "cli.model"
    vocab_lib.main(["--input", str(tmp_path / "*.txt"), "--output", str(out), "--vocab_size=170"])
    assert vocab_lib.get_vocabulary(str(out)).vocab_size == 170
    assert "70 pieces + 100 extra ids from 100 documents" in capsys.readouterr().err


# ---------------------------------------------------------------- embedded corpus


@pytest.fixture
def fake_stdlib(tmp_path):
    root = tmp_path / "lib"
    (root / "pydoc_data").mkdir(parents=True)
    long_topic = "Assignment statements bind names to values in the current scope. " * 5
    (root / "pydoc_data" / "topics.py").write_text(
        f"topics = {{'b': {long_topic!r}, 'a': 'too short'}}\n"
    )
    doc = "Return the sum of the numbers, starting from zero, in the natural reading order. " * 3
    docstring = f'"""{doc}\n\n>>> mod.total([1, 2])\n3\n"""'
    (root / "mod.py").write_text(
        f"{docstring}\n\n"
        f"def f():\n    {docstring}\n\n"  # A duplicate: dropped.
        f'def g():\n    """{"=" * 300}"""\n'  # Not prose: dropped.
    )
    (root / "bad_syntax.py").write_text("def (:\n")
    (root / "test").mkdir()
    (root / "test" / "test_x.py").write_text(f'"""{doc} in tests"""\n')
    return str(root)


def test_harvest_cleans_dedups_and_skips_tests(fake_stdlib):
    docs = corpus.harvest_documents(fake_stdlib)
    assert len(docs) == 2
    assert docs[0].startswith("Assignment statements")
    assert docs[1].startswith("Return the sum") and ">>>" not in docs[1]
    assert docs[1].endswith("3")  # Doctest output lines stay; only prompts are dropped.


def test_prepare_caches_and_splits(fake_stdlib, tmp_path, monkeypatch):
    info = corpus.prepare_embedded_corpus(str(tmp_path / "c"), 0.5, stdlib_dir=fake_stdlib)
    assert info.train_documents + info.validation_documents == 2
    assert info.validation_documents >= 1
    train = list(readers.read_tfrecord(info.train_path))
    val = list(readers.read_tfrecord(info.validation_path))
    assert sorted(train + val) == sorted(corpus.harvest_documents(fake_stdlib))
    expected = hashlib.sha256()
    for d in corpus.harvest_documents(fake_stdlib):
        expected.update(d.encode() + b"\x1e")
    assert info.sha256 == expected.hexdigest()
    # Second call: served from the cache, no harvesting.
    monkeypatch.setattr(corpus, "harvest_documents", lambda *a: pytest.fail("re-harvested"))
    assert corpus.prepare_embedded_corpus(str(tmp_path / "c"), 0.5, fake_stdlib) == info


def test_too_small_text_for_vocab_size_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="too small for 400 SentencePiece pieces"):
        vocab_lib.train_sentencepiece([ENGLISH], str(tmp_path / "x.model"), 500, 100)
