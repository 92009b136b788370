"""`files_text_to_text`: fine-tune and evaluate on your own labelled TSV, CSV or JSONL files.

Each row becomes one text-to-text example:

* `inputs`: `input_template` (a Python format string over column names) filled from the row,
  e.g. `"rte sentence1: {sentence1} sentence2: {sentence2}"`.
* `targets`: with `label_names`, the label's name: a value equal to a name is that label, else an
  integer `i` (0-based) means `label_names[i]`; so GLUE's `dev.tsv` (names) and TFDS-style
  exports (ids) both work. Without `label_names` the target column's text is the target.

File formats, chosen by the name (optionally `.gz`-compressed):

* `.tsv`: tab-separated, no quoting (GLUE's format: quotes are part of the text).
* `.csv`: comma-separated with standard double-quote quoting (multi-line fields allowed).
* `.jsonl` / `.json`: one JSON object per line; columns are its keys.

The first row of a TSV/CSV is its header (`has_header=True`); for files without one, give
`column_names` and `has_header=False`.

Bad input, always an error naming the file (and line, 1-based, where there is one):
a glob matching nothing, an unknown extension, an empty file or one with no rows, invalid UTF-8,
a truncated gzip stream, a header lacking a column the template or target needs, a malformed
JSON line. Per-row problems (a label not in `label_names`, a row with the wrong number of fields,
a missing or empty value, a non-numeric target for a correlation metric) are errors too, unless
`skip_invalid_rows=True`: then those rows are skipped, counted per reason and logged, which suits
files whose unlabelled rows should simply be left out.

Targets must fit TASK_FEATURE_LENGTHS' targets length, EOS included (`switch_t5.data.lengths`):
every label of `label_names` is checked, and for free-text targets the first
`target_scan_examples` (default 1000) examples of the split, when a dataset is requested with
feature lengths; one that would be cut is a `TargetLengthError` naming the length to set.

Rows are read into memory when a split is first requested (fine-tuning sets are small: 100k
TSV rows read in about 2 s on a busy 2-core machine) and the result is cached for the process.
"""

from __future__ import annotations

import collections
import csv
import dataclasses
import functools
import gzip
import io
import json
import logging
import string
import zlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import seqio
import tensorflow as tf

from switch_t5 import errors
from switch_t5.data import builtin_tasks, glue, hide_gpus_from_tf, lengths, readers, tasks, vocab
from switch_t5.data import metrics as metrics_lib
from switch_t5.data.readers import DataFileError

hide_gpus_from_tf()  # tf.data runs on the host CPU only.

DEFAULT_TASK_NAME = builtin_tasks.FILES_TEXT_TO_TEXT_TASK
_FORMATS = {".tsv": "tsv", ".csv": "csv", ".jsonl": "jsonl", ".json": "jsonl"}


@dataclasses.dataclass
class RowStats:
    """What one read of a split saw.

    Attributes:
      files: files read.
      examples: rows turned into examples.
      skipped: rows skipped (only with `skip_invalid_rows=True`), by reason.
    """

    files: int = 0
    examples: int = 0
    skipped: collections.Counter = dataclasses.field(default_factory=collections.Counter)


@dataclasses.dataclass(frozen=True)
class RowFormat:
    """How rows become examples (the validated arguments of `register_files_text_to_text`)."""

    input_template: str
    template_columns: tuple[str, ...]
    target_column: str
    label_names: tuple[str, ...] | None
    numeric_targets: bool
    has_header: bool
    column_names: tuple[str, ...] | None
    skip_invalid_rows: bool


class _RowError(Exception):
    """A per-row problem; becomes a DataFileError or a counted skip."""

    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason = reason


def _file_format(path: str) -> tuple[str, bool]:
    name = path.lower()
    gz = name.endswith(".gz")
    if gz:
        name = name[:-3]
    for ext, fmt in _FORMATS.items():
        if name.endswith(ext):
            return fmt, gz
    raise DataFileError(
        f"{path}: unknown format; name files .tsv, .csv, .jsonl or .json (optionally .gz)"
    )


def _read_text(path: str, gz: bool) -> str:
    try:
        if gz:
            with gzip.open(path, "rb") as f:
                raw = f.read()
        else:
            with open(path, "rb") as f:
                raw = f.read()
    except (EOFError, gzip.BadGzipFile, zlib.error) as e:
        raise DataFileError(
            f"{path}: truncated or corrupt gzip stream ({e}); re-download or re-compress the file"
        ) from e
    if not raw.strip():
        raise DataFileError(f"{path}: the file is empty; remove it from the file list")
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        raise DataFileError(
            f"{path}:{line}: invalid UTF-8 ({e.reason} at byte {e.start} of the file); "
            "re-encode the file as UTF-8"
        ) from e


def _iter_raw_rows(path: str, fmt: RowFormat) -> Iterator[tuple[int, Any]]:
    """(line, row) where row is a dict of column -> value, or a `_RowError` for a bad row."""
    kind, gz = _file_format(path)
    text = _read_text(path, gz)
    if kind == "jsonl":
        for line_no, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataFileError(f"{path}:{line_no}: not valid JSON ({e.msg})") from e
            if not isinstance(row, dict):
                raise DataFileError(
                    f"{path}:{line_no}: expected a JSON object per line, got {type(row).__name__}"
                )
            yield line_no, row
        return
    if kind == "tsv":
        reader = csv.reader(io.StringIO(text, newline=""), delimiter="\t", quoting=csv.QUOTE_NONE)
    else:
        reader = csv.reader(io.StringIO(text, newline=""))
    columns = fmt.column_names
    try:
        for record in reader:
            if not record or (len(record) == 1 and not record[0].strip()):
                continue  # blank line
            line_no = reader.line_num
            if columns is None:
                columns = tuple(c.strip() for c in record)
                _check_header(path, line_no, columns, fmt)
                continue
            if len(record) != len(columns):
                yield (
                    line_no,
                    _RowError(
                        "wrong number of fields",
                        f"{path}:{line_no}: {len(record)} fields, expected {len(columns)} "
                        f"({', '.join(columns)})",
                    ),
                )
                continue
            yield line_no, dict(zip(columns, record))
    except csv.Error as e:
        raise DataFileError(f"{path}:{reader.line_num}: malformed {kind.upper()} ({e})") from e
    if columns is None:
        raise DataFileError(f"{path}: the file has no header row")


def _check_header(path: str, line_no: int, columns: Sequence[str], fmt: RowFormat) -> None:
    needed = [*fmt.template_columns, fmt.target_column]
    missing = [c for c in dict.fromkeys(needed) if c not in columns]
    if missing:
        raise DataFileError(
            f"{path}:{line_no}: the header has no column {', '.join(map(repr, missing))} "
            f"(columns: {', '.join(columns)}); fix INPUT_TEMPLATE/TARGET_COLUMN, or for a file "
            "without a header row set HAS_HEADER=False and COLUMN_NAMES"
        )
    duplicated = sorted({c for c in columns if list(columns).count(c) > 1})
    if duplicated:
        raise DataFileError(f"{path}:{line_no}: duplicated column names {duplicated} in header")


def _cell(row: Mapping[str, Any], column: str, where: str) -> str:
    if column not in row or row[column] is None:
        raise _RowError("missing value", f"{where}: no value for column {column!r}")
    value = row[column]
    if isinstance(value, (dict, list)):
        raise _RowError(
            "non-scalar value", f"{where}: column {column!r} holds a JSON {type(value).__name__}"
        )
    return str(value)


def _label(value: Any, fmt: RowFormat, where: str) -> str:
    names = fmt.label_names
    assert names is not None
    if isinstance(value, bool):
        value = int(value)
    text = str(value).strip() if value is not None else ""
    if text in names:
        return text
    try:
        index = int(text)
    except ValueError:
        index = None
    if index is not None and 0 <= index < len(names):
        return names[index]
    raise _RowError(
        "label not in LABEL_NAMES",
        f"{where}: label {text!r} is not one of LABEL_NAMES {list(names)} nor an index "
        f"0..{len(names) - 1}",
    )


def _example(row: Mapping[str, Any], fmt: RowFormat, where: str) -> tuple[str, str]:
    values = {c: _cell(row, c, where) for c in fmt.template_columns}
    inputs = fmt.input_template.format_map(values)
    if fmt.label_names is not None:
        if fmt.target_column not in row:
            raise _RowError("missing value", f"{where}: no value for column {fmt.target_column!r}")
        return inputs, _label(row[fmt.target_column], fmt, where)
    target = _cell(row, fmt.target_column, where)
    if not target.strip():
        raise _RowError("empty target", f"{where}: empty target in column {fmt.target_column!r}")
    if fmt.numeric_targets:
        try:
            float(target)
        except ValueError:
            raise _RowError(
                "non-numeric target",
                f"{where}: target {target!r} is not a number (the metrics are correlations)",
            ) from None
    return inputs, target


def read_examples(
    files: Sequence[str], fmt: RowFormat, stats: RowStats | None = None
) -> list[tuple[str, str]]:
    """Reads `(inputs, targets)` pairs from files (see the module docstring for errors)."""
    stats = stats if stats is not None else RowStats()
    examples: list[tuple[str, str]] = []
    for path in files:
        before = len(examples)
        had_rows = False
        for line_no, row in _iter_raw_rows(path, fmt):
            had_rows = True
            where = f"{path}:{line_no}"
            try:
                if isinstance(row, _RowError):
                    raise row
                examples.append(_example(row, fmt, where))
            except _RowError as e:
                if not fmt.skip_invalid_rows:
                    hint = " (or set skip_invalid_rows=True to skip such rows)"
                    raise DataFileError(f"{e}{hint}") from None
                stats.skipped[e.reason] += 1
        stats.files += 1
        if not had_rows:
            raise DataFileError(f"{path}: no data rows; remove the file or add rows")
        if len(examples) == before:
            raise DataFileError(
                f"{path}: every row was skipped as invalid ({dict(stats.skipped)}); "
                "check TARGET_COLUMN and LABEL_NAMES"
            )
    stats.examples = len(examples)
    return examples


def _template_columns(template: str) -> tuple[str, ...]:
    if not isinstance(template, str) or not template:
        raise errors.UserError(
            "INPUT_TEMPLATE must be a non-empty format string over column names."
        )
    columns = []
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as e:
        raise errors.UserError(
            f"INPUT_TEMPLATE {template!r} is not a valid format string ({e}); write literal "
            "braces as {{ and }}"
        ) from e
    for _, field, _, _ in parsed:
        if field is None:
            continue
        name = field.split(".")[0].split("[")[0]
        if not name or name.isdigit():
            raise errors.UserError(
                f"INPUT_TEMPLATE {template!r} has a positional field {{{field}}}; name the "
                "column, e.g. {sentence1}"
            )
        columns.append(name)
    if not columns:
        raise errors.UserError(
            f"INPUT_TEMPLATE {template!r} uses no column; e.g. 'rte: {{sentence}}'"
        )
    return tuple(dict.fromkeys(columns))


def _check_metrics(
    names: Sequence[str], label_names: Sequence[str] | None
) -> tuple[list[Any], bool]:
    """The metric functions, and whether the targets must be numbers."""
    fns = metrics_lib.get_metric_fns(names, num_classes=len(label_names) if label_names else None)
    kinds = {n: metrics_lib.metric_target_kind(n) for n in names}
    if label_names is not None:
        bad = [n for n, k in kinds.items() if k in ("numbers", "text")]
        if bad:
            raise errors.UserError(
                f"METRICS {bad} score free-text or numeric targets; with LABEL_NAMES use "
                "accuracy, f1, macro_f1 or matthews_corrcoef, or omit LABEL_NAMES"
            )
        return fns, False
    need_labels = [n for n, k in kinds.items() if k == "class ids"]
    if need_labels:
        raise errors.UserError(f"METRICS {need_labels} need class labels; set LABEL_NAMES")
    numeric = [n for n, k in kinds.items() if k == "numbers"]
    if numeric and len(numeric) != len(kinds):
        raise errors.UserError(
            f"METRICS {list(names)} mix correlations (numeric targets) with text metrics; "
            "use either pearson/spearman or accuracy/squad"
        )
    return fns, bool(numeric)


def register_files_text_to_text(
    name: str = DEFAULT_TASK_NAME,
    *,
    train_files: str | Sequence[str] | None = None,
    validation_files: str | Sequence[str] | None = None,
    vocabulary: seqio.Vocabulary | None = None,
    vocabulary_path: str | None = None,
    input_template: str,
    target_column: str,
    label_names: Sequence[str] | None = None,
    metrics: Sequence[str] = ("accuracy",),
    has_header: bool = True,
    column_names: Sequence[str] | None = None,
    skip_invalid_rows: bool = False,
    target_scan_examples: int = lengths.DEFAULT_TARGET_SCAN_EXAMPLES,
) -> seqio.Task:
    """Registers a text-to-text task over TSV/CSV/JSONL files (see the module docstring).

    Args:
      name: the task name.
      train_files: glob or list of globs for the `train` split (None: no train split).
      validation_files: glob or list of globs for the `validation` split (None: none).
      vocabulary: the model's vocabulary; or give `vocabulary_path` (a SentencePiece model).
      vocabulary_path: SentencePiece model path, used when `vocabulary` is None.
      input_template: format string over column names, e.g. "cola sentence: {sentence}".
      target_column: the column with the label or target text.
      label_names: names of labels 0..n-1; None for free-text targets.
      metrics: metric names (`switch_t5.data.metrics.METRIC_NAMES`), e.g. ["accuracy"].
      has_header: whether TSV/CSV files start with a header row.
      column_names: the columns of header-less TSV/CSV files (requires has_header=False).
      skip_invalid_rows: skip and count rows with a bad label/value instead of failing.
      target_scan_examples: free-text targets: how many examples of a split are tokenized to
        refuse a targets length that would cut them (0: no scan). Labels are always checked.

    Returns:
      The registered task (registering the same name again replaces it). Requesting a dataset
      with feature lengths raises `lengths.TargetLengthError` if a label, or one of the first
      `target_scan_examples` free-text targets of the split, would be cut.
    """
    # Every argument is checked here, in this order, so a bad setting fails at registration
    # with one message, before any file is read.
    vocabulary = _resolve_vocabulary(vocabulary, vocabulary_path)
    if train_files is None and validation_files is None:
        raise errors.UserError(
            "Give TRAIN_FILES and/or VALIDATION_FILES (globs of TSV/CSV/JSONL files)."
        )
    fmt, metric_fns = _row_format(
        input_template,
        target_column,
        label_names,
        metrics,
        has_header=has_header,
        column_names=column_names,
        skip_invalid_rows=skip_invalid_rows,
    )
    split_files = _split_files(train_files, validation_files)
    read_split = _split_reader(name, split_files, fmt)
    if fmt.label_names is not None:
        targets_check = tasks.labels_check(fmt.label_names, vocabulary, name)
    else:
        targets_check = _free_text_targets_check(
            name, split_files, read_split, vocabulary, target_scan_examples
        )
    return _add_task(
        name,
        source=seqio.FunctionDataSource(_dataset_fn(read_split), splits=list(split_files)),
        vocabulary=vocabulary,
        fmt=fmt,
        metric_fns=metric_fns,
        targets_check=targets_check,
    )


def _add_task(
    name: str,
    *,
    source: seqio.DataSource,
    vocabulary: seqio.Vocabulary,
    fmt: RowFormat,
    metric_fns: Sequence[Any],
    targets_check: Callable[[str, Mapping[str, int]], None],
) -> seqio.Task:
    """Registers (or replaces) the task: tokenize, cache, EOS, and the metrics' postprocessing."""
    if name in seqio.TaskRegistry.names():
        seqio.TaskRegistry.remove(name)
    return seqio.TaskRegistry.add(
        name,
        task_cls=tasks.LengthCheckedTask,
        targets_check=targets_check,
        source=source,
        preprocessors=[
            seqio.preprocessors.tokenize,
            seqio.CacheDatasetPlaceholder(),
            seqio.preprocessors.append_eos_after_trim,
        ],
        output_features=glue.output_features(vocabulary),
        postprocess_fn=_postprocess_fn(fmt.label_names, fmt.numeric_targets),
        metric_fns=metric_fns,
    )


def _resolve_vocabulary(
    vocabulary: seqio.Vocabulary | None, vocabulary_path: str | None
) -> seqio.Vocabulary:
    """The vocabulary given, or the one loaded from `vocabulary_path`; exactly one is needed."""
    if vocabulary is None:
        if not vocabulary_path:
            raise errors.UserError(
                "Give the vocabulary: set VOCABULARY_PATH to a SentencePiece model."
            )
        return vocab.get_vocabulary(vocabulary_path)
    if vocabulary_path:
        raise errors.UserError("Give either vocabulary or vocabulary_path, not both.")
    return vocabulary


def _row_format(
    input_template: str,
    target_column: str,
    label_names: Sequence[str] | None,
    metrics: Sequence[str],
    *,
    has_header: bool,
    column_names: Sequence[str] | None,
    skip_invalid_rows: bool,
) -> tuple[RowFormat, list[Any]]:
    """The checked row format and the metric functions (they decide if targets are numbers)."""
    template_columns = _template_columns(input_template)
    if not isinstance(target_column, str) or not target_column:
        raise errors.UserError(
            "TARGET_COLUMN must name the column holding the label or target text."
        )
    label_names = _check_label_names(label_names)
    column_names = _check_column_names(has_header, column_names, template_columns, target_column)
    metric_fns, numeric = _check_metrics(list(metrics), label_names)
    fmt = RowFormat(
        input_template=input_template,
        template_columns=template_columns,
        target_column=target_column,
        label_names=label_names,
        numeric_targets=numeric,
        has_header=has_header,
        column_names=column_names,
        skip_invalid_rows=skip_invalid_rows,
    )
    return fmt, metric_fns


def _check_label_names(label_names: Sequence[str] | None) -> tuple[str, ...] | None:
    """LABEL_NAMES as a tuple of distinct strings (a bare string would be split into letters)."""
    if label_names is None:
        return None
    if isinstance(label_names, str) or not label_names:
        raise errors.UserError(
            f"LABEL_NAMES must be a non-empty list such as ['entailment', 'not_entailment'], "
            f"got {label_names!r}"
        )
    label_names = tuple(str(n) for n in label_names)
    if len(set(label_names)) != len(label_names):
        raise errors.UserError(f"LABEL_NAMES {list(label_names)} has duplicates.")
    return label_names


def _check_column_names(
    has_header: bool,
    column_names: Sequence[str] | None,
    template_columns: Sequence[str],
    target_column: str,
) -> tuple[str, ...] | None:
    """COLUMN_NAMES for header-less files (None with a header), holding every column used."""
    if has_header and column_names is not None:
        raise errors.UserError(
            "COLUMN_NAMES is for files without a header row; set HAS_HEADER=False with it, or "
            "drop COLUMN_NAMES to use the header."
        )
    if has_header:
        return column_names
    if not column_names or isinstance(column_names, str):
        raise errors.UserError("HAS_HEADER=False needs COLUMN_NAMES, the list of columns in order.")
    column_names = tuple(column_names)
    missing = [c for c in (*template_columns, target_column) if c not in column_names]
    if missing:
        raise errors.UserError(
            f"COLUMN_NAMES {list(column_names)} lacks {missing}, used by INPUT_TEMPLATE or "
            "TARGET_COLUMN."
        )
    return column_names


def _split_files(
    train_files: str | Sequence[str] | None, validation_files: str | Sequence[str] | None
) -> dict[str, list[str]]:
    """Each given split's files, resolved now so a bad glob or extension fails at registration."""
    split_files = {}
    for split, patterns, macro in (
        ("train", train_files, "TRAIN_FILES"),
        ("validation", validation_files, "VALIDATION_FILES"),
    ):
        if patterns is not None:
            split_files[split] = readers.resolve_files(patterns, what=macro)
            for path in split_files[split]:
                _file_format(path)  # unknown extensions fail now, not at the first batch
    return split_files


def _split_reader(
    name: str, split_files: Mapping[str, Sequence[str]], fmt: RowFormat
) -> Callable[[str], list[tuple[str, str]]]:
    """`read_split(split)`: the split's examples, read on first use and cached for the process."""
    cache: dict[str, list[tuple[str, str]]] = {}

    def read_split(split: str) -> list[tuple[str, str]]:
        if split not in split_files:
            raise errors.UserError(
                f"Task {name!r} has no {split!r} split; it has {list(split_files)}."
            )
        if split not in cache:
            stats = RowStats()
            cache[split] = read_examples(split_files[split], fmt, stats)
            logging.info(
                "%s/%s: %d examples from %d files; skipped %s",
                name,
                split,
                stats.examples,
                stats.files,
                dict(stats.skipped) or "none",
            )
        return cache[split]

    return read_split


def _dataset_fn(
    read_split: Callable[[str], list[tuple[str, str]]],
) -> Callable[..., tf.data.Dataset]:
    """seqio's `dataset_fn` over the cached examples of `read_split`."""

    def dataset_fn(split: str, shuffle_files: bool, seed: int | None = None) -> tf.data.Dataset:
        del shuffle_files, seed  # seqio shuffles examples; row order is the files' order
        pairs = read_split(split)
        return tf.data.Dataset.from_tensor_slices(
            {
                "inputs": [p[0] for p in pairs],
                "targets": [p[1] for p in pairs],
                "idx": list(range(len(pairs))),
            }
        )

    return dataset_fn


def _postprocess_fn(
    label_names: tuple[str, ...] | None, numeric: bool
) -> Callable[..., Any] | None:
    """Decoded text -> what the metrics score: a class id, a float, or the text itself (None)."""
    if label_names is not None:
        return functools.partial(glue.string_label_to_class_id, label_classes=label_names)
    if numeric:
        return glue.string_to_float
    return None


def _free_text_targets_check(
    name: str,
    split_files: Mapping[str, Sequence[str]],
    read_split: Callable[[str], list[tuple[str, str]]],
    vocabulary: seqio.Vocabulary,
    target_scan_examples: int,
) -> Callable[[str, Mapping[str, int]], None]:
    """Refuses targets lengths that would cut one of the first scanned free-text targets."""

    def targets_check(split: str, feature_lengths: Mapping[str, int]) -> None:
        if split not in split_files:
            return  # seqio's own error names the missing split
        lengths.check_targets_fit(
            (target for _, target in read_split(split)),
            vocabulary,
            feature_lengths,
            name,
            split,
            max_examples=target_scan_examples,
            skip_hint=(
                "switch_t5.data_gin.register_tasks.target_scan_examples=0 skips this check "
                "and lets such targets be cut"
            ),
        )

    return targets_check
