"""Reading user text files into documents, with errors that name the file and line.

Formats, chosen by the file name:

- `.txt`: one document per line (`txt_documents="line"`) or per blank-line-separated paragraph
  (`txt_documents="paragraph"`).
- `.jsonl` / `.json`: one JSON object per line with a string field `text` (other fields ignored).
- `.jsonl.gz` / `.json.gz`: the same, gzip-compressed (the C4 release files,
  `c4-train.00000-of-01024.json.gz`).

Bad input (`DataFileError` / `FileNotFoundError`, always naming the file, and the line where there
is one): a glob that matches nothing, a missing file, a file with no document at all, invalid
UTF-8, a truncated or corrupt gzip stream, a JSON line that does not parse or has no string `text`.
Skipped and counted (a user wants these tolerated): blank lines and whitespace-only documents.

No TensorFlow here: the vocabulary trainer and the corpus harvester use these readers too.
"""

from __future__ import annotations

import dataclasses
import glob
import gzip
import json
import os
import zlib
from collections.abc import Iterator, Sequence

from switch_t5 import errors

TXT_MODES = ("line", "paragraph")


class DataFileError(errors.UserError):
    """A data file is unreadable or malformed; the message names the file (and line) and fix."""


@dataclasses.dataclass
class ReadStats:
    """Counts of one read, for logs and tests.

    Attributes:
      documents: documents yielded.
      skipped_blank: blank lines / whitespace-only documents skipped.
      files: files read.
    """

    documents: int = 0
    skipped_blank: int = 0
    files: int = 0


def resolve_files(patterns: str | Sequence[str], what: str = "TEXT_FILES") -> list[str]:
    """Expands globs (a string, or a list of strings) into a sorted, de-duplicated file list.

    Raises:
      FileNotFoundError: naming the pattern that matched nothing (and `what`, the setting it came
        from).
    """
    if isinstance(patterns, str):
        patterns = [patterns]
    if not patterns:
        raise FileNotFoundError(f"{what} is empty: give a glob or a list of files")
    files: list[str] = []
    for pattern in patterns:
        if not isinstance(pattern, str):
            raise TypeError(f"{what}: {pattern!r} is not a string path or glob")
        pattern = os.path.expanduser(pattern)
        matches = sorted(glob.glob(pattern, recursive=True))
        matches = [m for m in matches if os.path.isfile(m)]
        if not matches:
            raise FileNotFoundError(
                f"{what}: {pattern!r} matches no file (checked from {os.getcwd()}); "
                "fix the path or glob"
            )
        files.extend(matches)
    return sorted(dict.fromkeys(os.path.abspath(f) for f in files))


def _file_kind(path: str) -> str:
    name = path.lower()
    if name.endswith((".jsonl.gz", ".json.gz")):
        return "jsonl.gz"
    if name.endswith((".jsonl", ".json")):
        return "jsonl"
    if name.endswith(".txt"):
        return "txt"
    raise DataFileError(
        f"{path}: unknown text format; use .txt (one document per line or paragraph), "
        ".jsonl or .json.gz (JSON lines with a 'text' field)"
    )


def _lines(path: str, gz: bool) -> Iterator[tuple[int, str]]:
    """(line number from 1, decoded line without newline)."""
    opener = gzip.open if gz else open
    line_no = 0
    try:
        with opener(path, "rb") as f:
            for line_no, raw in enumerate(f, start=1):
                try:
                    text = raw.decode("utf-8")
                except UnicodeDecodeError as e:
                    raise DataFileError(
                        f"{path}:{line_no}: invalid UTF-8 at byte {e.start} of the line; "
                        "re-encode the file as UTF-8"
                    ) from e
                yield line_no, text.rstrip("\r\n")
    except (EOFError, gzip.BadGzipFile, zlib.error) as e:
        raise DataFileError(
            f"{path}: truncated or corrupt gzip stream after line {line_no} ({e}); "
            "re-download or re-compress the file"
        ) from e


def iter_file_documents(
    path: str, txt_documents: str = "line", stats: ReadStats | None = None
) -> Iterator[str]:
    """Yields the documents of one file (see the module docstring for formats and errors)."""
    if txt_documents not in TXT_MODES:
        raise ValueError(f"txt_documents={txt_documents!r}: use one of {TXT_MODES}")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such file")
    stats = stats if stats is not None else ReadStats()
    kind = _file_kind(path)
    if os.path.getsize(path) == 0:
        raise DataFileError(f"{path}: the file is empty; remove it from the file list")
    stats.files += 1
    before = stats.documents
    if kind == "txt":
        paragraph: list[str] = []
        for _, line in _lines(path, gz=False):
            if txt_documents == "line":
                if line.strip():
                    stats.documents += 1
                    yield line
                else:
                    stats.skipped_blank += 1
            elif line.strip():
                paragraph.append(line)
            elif paragraph:
                stats.documents += 1
                yield "\n".join(paragraph)
                paragraph = []
            else:
                stats.skipped_blank += 1
        if paragraph:
            stats.documents += 1
            yield "\n".join(paragraph)
    else:
        for line_no, line in _lines(path, gz=kind == "jsonl.gz"):
            if not line.strip():
                stats.skipped_blank += 1
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataFileError(f"{path}:{line_no}: not a JSON object ({e.msg})") from e
            text = record.get("text") if isinstance(record, dict) else None
            if not isinstance(text, str):
                raise DataFileError(
                    f"{path}:{line_no}: no string field 'text' (keys: "
                    f"{sorted(record) if isinstance(record, dict) else type(record).__name__})"
                )
            if not text.strip():
                stats.skipped_blank += 1
                continue
            stats.documents += 1
            yield text
    if stats.documents == before:
        raise DataFileError(f"{path}: contains no document (only blank lines); remove it")


def iter_documents(
    files: Sequence[str], txt_documents: str = "line", stats: ReadStats | None = None
) -> Iterator[str]:
    """Yields the documents of several files, in the given order."""
    for path in files:
        yield from iter_file_documents(path, txt_documents, stats)


def write_tfrecord(path: str, documents: Sequence[str]) -> None:
    """Writes documents as raw UTF-8 TFRecords, atomically (temporary name, then rename)."""
    import tensorflow as tf

    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    with tf.io.TFRecordWriter(tmp) as writer:
        for doc in documents:
            writer.write(doc.encode("utf-8"))
    os.replace(tmp, path)


def read_tfrecord(path: str) -> Iterator[str]:
    """The documents written by `write_tfrecord`."""
    import tensorflow as tf

    for record in tf.data.TFRecordDataset(path).as_numpy_iterator():
        yield record.decode("utf-8")
