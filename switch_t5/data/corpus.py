"""The embedded default corpus: English documentation text that ships with Python itself.

Every fresh machine with Python has it, so the quickstart pretrains on real natural language with
no download. Documents, in this order:

1. pydoc's topic texts (`pydoc_data/topics.py`, the Language Reference sections `help()` shows),
   read with `ast.literal_eval`;
2. docstrings (modules, classes, functions) of the standard library's `.py` files, parsed with
   `ast` (never imported), from a sorted file list (test, idle-test and site-packages folders
   excluded).

Cleaning: `inspect.cleandoc`-style indentation removal, doctest lines (`>>>`, `...`) dropped,
documents under 200 characters or under 60% letters/spaces dropped, exact duplicates dropped
(first kept). Each document goes to validation when the first 8 bytes of its sha256, read as a
fraction of 2**64, are below `validation_fraction` (at least one document), else to train.

The same Python installation gives the same corpus: `CorpusInfo.sha256` hashes every document in
order. Everything is cached under `<cache_dir>/embedded_corpus/<key>/` (cache_dir:
`SWITCH_T5_CACHE_DIR`, else `~/.cache/switch_t5`): `train.tfrecord`, `validation.tfrecord`
(raw UTF-8 records), `meta.json`, and the SentencePiece models trained on the train split
(`spm_<vocab_size>.model`), so a second run starts in well under a second.
"""

from __future__ import annotations

import ast
import dataclasses
import hashlib
import json
import os
import sys
import sysconfig
from collections.abc import Iterator

from switch_t5.data import readers

# Bump when harvesting or cleaning changes: old caches are then ignored.
HARVEST_VERSION = 1
MIN_DOCUMENT_CHARS = 200
MIN_LETTER_FRACTION = 0.6
DEFAULT_VALIDATION_FRACTION = 0.02
# Ids of the corpus's SentencePiece vocabulary, 100 extra ids included (a multiple of 128).
DEFAULT_VOCAB_SIZE = 4096
# VOCABULARY_PATH = "embedded" names the corpus's vocabulary (to fine-tune or run a model
# pretrained on `embedded_span_corruption`).
EMBEDDED_VOCABULARY = "embedded"
_EXCLUDED_DIRS = frozenset(
    {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__", "turtledemo"}
)


def default_cache_dir() -> str:
    """`$SWITCH_T5_CACHE_DIR`, else `~/.cache/switch_t5`."""
    return os.environ.get("SWITCH_T5_CACHE_DIR") or os.path.join(
        os.path.expanduser("~"), ".cache", "switch_t5"
    )


@dataclasses.dataclass(frozen=True)
class CorpusInfo:
    """Where the embedded corpus lies and what it holds.

    Attributes:
      directory: the cache folder of this corpus.
      train_path: TFRecord of train documents.
      validation_path: TFRecord of validation documents.
      train_documents: number of train documents.
      validation_documents: number of validation documents.
      characters: characters of all documents.
      utf8_bytes: UTF-8 bytes of all documents.
      sha256: hash of all documents in order (each followed by a 0x1e separator).
      python_version: `sys.version` of the harvested installation.
    """

    directory: str
    train_path: str
    validation_path: str
    train_documents: int
    validation_documents: int
    characters: int
    utf8_bytes: int
    sha256: str
    python_version: str


def _stdlib_files(stdlib_dir: str) -> list[str]:
    files = []
    for root, dirs, names in os.walk(stdlib_dir):
        dirs[:] = sorted(d for d in dirs if d not in _EXCLUDED_DIRS and not d.startswith("."))
        files.extend(os.path.join(root, n) for n in sorted(names) if n.endswith(".py"))
    return sorted(files, key=lambda p: os.path.relpath(p, stdlib_dir))


def _clean(text: str) -> str | None:
    lines = [ln for ln in text.split("\n") if not ln.lstrip().startswith((">>>", "..."))]
    text = "\n".join(lines).strip()
    # Collapse runs of blank lines left by the removed doctest lines.
    while "\n\n\n" in text:
        text = text.replace("\n\n\n", "\n\n")
    if len(text) < MIN_DOCUMENT_CHARS:
        return None
    letters = sum(c.isalpha() or c == " " for c in text)
    if letters < MIN_LETTER_FRACTION * len(text):
        return None
    return text


def _pydoc_topics(stdlib_dir: str) -> Iterator[str]:
    path = os.path.join(stdlib_dir, "pydoc_data", "topics.py")
    if not os.path.isfile(path):
        return
    with open(path, "rb") as f:
        tree = ast.parse(f.read(), filename=path)
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(
            isinstance(t, ast.Name) and t.id == "topics" for t in node.targets
        ):
            topics = ast.literal_eval(node.value)
            for key in sorted(topics):
                yield topics[key]


def _docstrings(path: str) -> Iterator[str]:
    try:
        with open(path, "rb") as f:
            tree = ast.parse(f.read(), filename=path)
    except (SyntaxError, ValueError, UnicodeDecodeError):
        # A few stdlib files are deliberately invalid (bad-syntax fixtures); they hold no prose.
        return
    for node in ast.walk(tree):
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
            doc = ast.get_docstring(node, clean=True)
            if doc:
                yield doc


def harvest_documents(stdlib_dir: str | None = None) -> list[str]:
    """The cleaned, de-duplicated documents of this Python installation (module docstring)."""
    stdlib_dir = stdlib_dir or sysconfig.get_paths()["stdlib"]
    seen: set[str] = set()
    docs: list[str] = []

    def add(text: str) -> None:
        text = _clean(text)
        if text is not None and text not in seen:
            seen.add(text)
            docs.append(text)

    for topic in _pydoc_topics(stdlib_dir):
        add(topic)
    for path in _stdlib_files(stdlib_dir):
        for doc in _docstrings(path):
            add(doc)
    if not docs:
        raise RuntimeError(
            f"found no documentation text under {stdlib_dir!r}; this Python installation has no "
            "standard-library sources. Use the text_files_span_corruption task with TEXT_FILES."
        )
    return docs


def is_validation(document: str, validation_fraction: float) -> bool:
    """The deterministic per-document split (module docstring)."""
    bucket = int.from_bytes(hashlib.sha256(document.encode("utf-8")).digest()[:8], "big")
    return bucket < validation_fraction * 2**64


def _cache_key(stdlib_dir: str, validation_fraction: float) -> str:
    h = hashlib.sha256()
    h.update(f"{HARVEST_VERSION}|{sys.version}|{stdlib_dir}|{validation_fraction}".encode())
    topics = os.path.join(stdlib_dir, "pydoc_data", "topics.py")
    for path in [topics, *_stdlib_files(stdlib_dir)]:
        if os.path.isfile(path):
            st = os.stat(path)
            h.update(f"|{os.path.relpath(path, stdlib_dir)}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()[:16]


def prepare_embedded_corpus(
    cache_dir: str | None = None,
    validation_fraction: float = DEFAULT_VALIDATION_FRACTION,
    stdlib_dir: str | None = None,
) -> CorpusInfo:
    """Harvests and caches the corpus on first use; afterwards reads `meta.json` only."""
    if not 0.0 < validation_fraction < 1.0:
        raise ValueError(f"validation_fraction={validation_fraction} must be in (0, 1)")
    stdlib_dir = stdlib_dir or sysconfig.get_paths()["stdlib"]
    cache_dir = os.path.expanduser(cache_dir or default_cache_dir())
    directory = os.path.join(
        cache_dir, "embedded_corpus", _cache_key(stdlib_dir, validation_fraction)
    )
    meta_path = os.path.join(directory, "meta.json")
    if os.path.isfile(meta_path):
        with open(meta_path) as f:
            info = CorpusInfo(**json.load(f))
        if os.path.isfile(info.train_path) and os.path.isfile(info.validation_path):
            return info
    docs = harvest_documents(stdlib_dir)
    validation = [d for d in docs if is_validation(d, validation_fraction)]
    if not validation:
        # Tiny installations: hold out the document with the smallest hash bucket.
        validation = [min(docs, key=lambda d: hashlib.sha256(d.encode()).digest())]
    held_out = set(validation)
    train = [d for d in docs if d not in held_out]
    digest = hashlib.sha256()
    for d in docs:
        digest.update(d.encode("utf-8") + b"\x1e")
    info = CorpusInfo(
        directory=directory,
        train_path=os.path.join(directory, "train.tfrecord"),
        validation_path=os.path.join(directory, "validation.tfrecord"),
        train_documents=len(train),
        validation_documents=len(validation),
        characters=sum(len(d) for d in docs),
        utf8_bytes=sum(len(d.encode("utf-8")) for d in docs),
        sha256=digest.hexdigest(),
        python_version=sys.version,
    )
    readers.write_tfrecord(info.train_path, train)
    readers.write_tfrecord(info.validation_path, validation)
    tmp = f"{meta_path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(dataclasses.asdict(info), f, indent=1)
    os.replace(tmp, meta_path)
    return info


def embedded_vocabulary_path(info: CorpusInfo, vocab_size: int, extra_ids: int = 100) -> str:
    """The SentencePiece model of the corpus (trained on its train split on first use, ~seconds).

    Args:
      info: from `prepare_embedded_corpus`.
      vocab_size: ids including the extra ids (the model has vocab_size - extra_ids pieces).
      extra_ids: sentinel ids.
    """
    from switch_t5.data import vocab as vocab_lib

    path = os.path.join(info.directory, f"spm_{vocab_size}_extra{extra_ids}.model")
    if not os.path.isfile(path):
        vocab_lib.train_sentencepiece(
            readers.read_tfrecord(info.train_path), path, vocab_size=vocab_size, extra_ids=extra_ids
        )
    return path


def resolve_vocabulary_path(
    path: str, cache_dir: str | None = None, vocab_size: int = DEFAULT_VOCAB_SIZE
) -> str:
    """`path`, or for `EMBEDDED_VOCABULARY` the corpus's `vocab_size` vocabulary file (the
    corpus harvested and the vocabulary trained on first use, under `cache_dir`)."""
    if path != EMBEDDED_VOCABULARY:
        return path
    return embedded_vocabulary_path(prepare_embedded_corpus(cache_dir), vocab_size)
