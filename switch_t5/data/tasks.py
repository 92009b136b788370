"""Span-corruption seqio tasks: C4 (TFDS), user text files, and the embedded default corpus.

Plain Python factories (no gin; `switch_t5.data.builtin_tasks` registers them as task builders,
which `switch_t5.data_gin` calls with the gin macros' values). Each registers
(or re-registers) one seqio Task whose features `inputs`/`targets` use the task's vocabulary:

- `c4_span_corruption`: TFDS `c4/en:3.1.0`; `c4_v220_span_corruption`: `c4/en:2.2.0` (the name
  T5/T5X use). Splits `train`, `validation`. `register_c4_tasks` registers both.
- `text_files_span_corruption`: `.txt` / `.jsonl` / `.json.gz` files (formats and bad-input
  rules in `switch_t5.data.readers`); validation is a held-out fraction of documents (by a hash
  of each document) unless validation files are given. The files are converted once into a
  cached TFRecord store (keyed by file names, sizes and modification times), which makes the
  tf.data pipeline checkpointable for exact resume.
- `embedded_span_corruption`: the embedded default corpus (`switch_t5.data.corpus`, Python's own
  documentation) with a SentencePiece vocabulary trained on it on first use (default 4,096 ids
  incl. 100 extra ids; both cached). This is what the quickstart pretrains on, offline.

Preprocessing (T5's order): text -> tokenize `targets` -> (cache point) -> span corruption
(`switch_t5.data.span_corruption`) -> append EOS. Stochastic steps come after the cache point, so
each epoch of a repeated dataset sees new noise.

The tasks of this package are `LengthCheckedTask`s: requesting a dataset validates the feature
lengths and refuses a targets length that would cut the task's targets (span-corruption targets
here; labels and free text in `glue` and `user_tasks`). `check_lengths` runs the same checks for
a task or mixture without building anything (the input pipeline calls it first).
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
from collections.abc import Callable, Mapping, Sequence

import seqio
import tensorflow as tf

from switch_t5.data import builtin_tasks, hide_gpus_from_tf, lengths, readers
from switch_t5.data import corpus as corpus_lib
from switch_t5.data import span_corruption as sc
from switch_t5.data import vocab as vocab_lib
from switch_t5.data.registry import DataSettings

hide_gpus_from_tf()  # tf.data runs on the host CPU only.

C4_TASK = builtin_tasks.C4_TASK
C4_V220_TASK = builtin_tasks.C4_V220_TASK
TEXT_FILES_TASK = builtin_tasks.TEXT_FILES_TASK
EMBEDDED_TASK = builtin_tasks.EMBEDDED_TASK
DEFAULT_EMBEDDED_VOCAB_SIZE = corpus_lib.DEFAULT_VOCAB_SIZE
DEFAULT_TEXT_VALIDATION_FRACTION = DataSettings.text_validation_fraction
# seqio's default; the buffer holds span-corrupted pieces (shuffles across documents).
DEFAULT_SHUFFLE_BUFFER_SIZE = DataSettings.shuffle_buffer_size


# Called with (split, validated feature lengths) before a dataset is built; raises
# lengths.TargetLengthError when targets would be cut.
TargetsCheck = Callable[[str, Mapping[str, int]], None]


class LengthCheckedTask(seqio.Task):
    """A seqio Task that checks its feature lengths (and targets) before building a dataset.

    `get_dataset(sequence_length, split=...)` first validates `sequence_length`
    (`lengths.check_feature_lengths`) and calls `targets_check(split, lengths)`, which refuses
    labels or targets that the targets length would cut; then it builds the dataset as seqio
    does. Every consumer (the training pipeline, evaluation, mixtures, `data.show`) goes through
    `get_dataset`, so none can train or score on cut targets. `sequence_length=None` (no
    trimming) skips the checks.

    Register with `seqio.TaskRegistry.add(..., task_cls=LengthCheckedTask, targets_check=fn)`.
    """

    def __init__(self, *args, targets_check: TargetsCheck | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self._targets_check = targets_check
        self._passed: set[tuple[str, tuple[tuple[str, int], ...]]] = set()

    def check_lengths(self, sequence_length: Mapping[str, int], split: str) -> dict[str, int]:
        """The validated lengths; raises a `switch_t5.errors.UserError` subclass if bad."""
        checked = lengths.check_feature_lengths(sequence_length)
        key = (split, tuple(sorted(checked.items())))
        if self._targets_check is not None and key not in self._passed:
            self._targets_check(split, checked)
            self._passed.add(key)  # the files are read once per process: no need to rescan
        return checked

    def get_dataset(self, sequence_length=None, split="train", *args, **kwargs):
        if sequence_length is not None:
            self.check_lengths(sequence_length, split)
        return super().get_dataset(sequence_length, split, *args, **kwargs)


def check_lengths(
    task_or_mixture_name: str, split: str, feature_lengths: Mapping[str, int]
) -> dict[str, int]:
    """Validates feature lengths for a task or mixture, before any dataset is built.

    The lengths must pass `lengths.check_feature_lengths`; the task (or each member of the
    mixture), if a `LengthCheckedTask` with `split`, also checks that its targets fit. A name
    that is not registered gets the first check only (building its dataset then fails with
    seqio's error).

    Returns:
      The lengths as a `{"inputs": int, "targets": int}` dict.

    Raises:
      lengths.FeatureLengthsError, lengths.TargetLengthError (both `UserError`s).
    """
    checked = lengths.check_feature_lengths(feature_lengths)
    names = set(seqio.TaskRegistry.names()) | set(seqio.MixtureRegistry.names())
    if task_or_mixture_name not in names:
        return checked
    provider = seqio.get_mixture_or_task(task_or_mixture_name)
    members = provider.tasks if isinstance(provider, seqio.Mixture) else [provider]
    errors = []
    for task in members:
        if isinstance(task, LengthCheckedTask) and split in task.splits:
            try:
                task.check_lengths(checked, split)
            except lengths.TargetLengthError as e:
                errors.append(e)
    if errors:
        raise lengths.combine_target_errors(errors, checked, task_or_mixture_name)
    return checked


def labels_check(labels: Sequence[str], vocabulary: seqio.Vocabulary, task: str) -> TargetsCheck:
    """A `targets_check` for a task whose targets are one of `labels` (EOS appended)."""

    def check(split: str, feature_lengths: Mapping[str, int]) -> None:
        del split  # every label must fit: decoding may produce any of them
        lengths.check_labels_fit(labels, vocabulary, feature_lengths, task)

    return check


def span_corruption_targets_check(
    task: str,
    noise_density: float = sc.DEFAULT_NOISE_DENSITY,
    mean_noise_span_length: float = sc.DEFAULT_MEAN_NOISE_SPAN_LENGTH,
) -> TargetsCheck:
    """A `targets_check` refusing a targets length that would cut span-corruption targets.

    Every full piece corrupted to fill the inputs length gives targets of exactly
    `span_corruption_lengths(inputs)[1]` tokens (noise tokens, one sentinel per span, EOS):
    inputs 512 -> 114, inputs 64 -> 14.
    """

    def check(split: str, feature_lengths: Mapping[str, int]) -> None:
        del split
        inputs = feature_lengths["inputs"]
        if inputs < 3:
            raise lengths.FeatureLengthsError(
                f"task {task!r}: TASK_FEATURE_LENGTHS['inputs']={inputs} is too small for span "
                "corruption (at least 3 tokens: a kept token, a sentinel and EOS); T5 uses 512"
            )
        _, needed = sc.span_corruption_lengths(inputs, noise_density, mean_noise_span_length)
        if feature_lengths["targets"] < needed:
            fixed = {**feature_lengths, "targets": needed}
            raise lengths.TargetLengthError(
                f"task {task!r}: span corruption of {inputs}-token inputs (noise density "
                f"{noise_density}, mean span {mean_noise_span_length}) makes targets of {needed} "
                f"tokens including sentinels and EOS, but TASK_FEATURE_LENGTHS targets="
                f"{feature_lengths['targets']} would cut them; set targets to at least {needed}, "
                f"e.g. TASK_FEATURE_LENGTHS={fixed!r}",
                needed,
            )

    return check


def output_features(vocabulary: seqio.Vocabulary) -> dict[str, seqio.Feature]:
    """T5's features: `inputs` and `targets`, both with EOS, one vocabulary."""
    return {
        "inputs": seqio.Feature(vocabulary=vocabulary, add_eos=True, required=False),
        "targets": seqio.Feature(vocabulary=vocabulary, add_eos=True),
    }


def _replace_task(name: str) -> None:
    if name in seqio.TaskRegistry.names():
        seqio.TaskRegistry.remove(name)
    if name in seqio.MixtureRegistry.names():  # a multilingual mixture of that name
        seqio.MixtureRegistry.remove(name)


def register_span_corruption_task(
    name: str,
    source: seqio.DataSource,
    vocabulary: seqio.Vocabulary,
    noise_density: float = sc.DEFAULT_NOISE_DENSITY,
    mean_noise_span_length: float = sc.DEFAULT_MEAN_NOISE_SPAN_LENGTH,
    shuffle_buffer_size: int = DEFAULT_SHUFFLE_BUFFER_SIZE,
) -> seqio.Task:
    """Registers (replacing any task of that name) a span-corruption task over `source`'s `text`.

    Requesting a dataset checks the lengths: inputs of at least 3 tokens, and targets long enough
    for the targets that corrupting a full inputs-length piece produces (`span_corruption_targets
    _check`).
    """
    _replace_task(name)
    return seqio.TaskRegistry.add(
        name,
        task_cls=LengthCheckedTask,
        targets_check=span_corruption_targets_check(name, noise_density, mean_noise_span_length),
        source=source,
        preprocessors=[
            functools.partial(seqio.preprocessors.rekey, key_map={"targets": "text"}),
            seqio.preprocessors.tokenize,
            seqio.CacheDatasetPlaceholder(),
            functools.partial(
                sc.span_corruption,
                noise_density=noise_density,
                mean_noise_span_length=mean_noise_span_length,
            ),
            seqio.preprocessors.append_eos_after_trim,
        ],
        output_features=output_features(vocabulary),
        metric_fns=[],
        shuffle_buffer_size=shuffle_buffer_size,
    )


def register_c4_tasks(
    vocabulary: seqio.Vocabulary | None = None, tfds_data_dir: str | None = None
) -> None:
    """Registers `c4_span_corruption` (c4/en:3.1.0) and `c4_v220_span_corruption` (c4/en:2.2.0).

    Args:
      vocabulary: defaults to T5's cc_all.32000 model (`vocab.DEFAULT_SPM_PATH`, read lazily).
      tfds_data_dir: where the prepared TFDS `c4` lives (None: ~/tensorflow_datasets).
    """
    vocabulary = vocabulary or vocab_lib.get_vocabulary(vocab_lib.DEFAULT_SPM_PATH)
    for name, version in ((C4_TASK, "3.1.0"), (C4_V220_TASK, "2.2.0")):
        register_span_corruption_task(
            name,
            seqio.TfdsDataSource(tfds_name=f"c4/en:{version}", tfds_data_dir=tfds_data_dir),
            vocabulary,
        )


def tfrecord_text_source(paths: dict[str, str]) -> seqio.DataSource:
    """A seqio source of `{"text": <string>}` from one raw-UTF-8 TFRecord file per split."""

    def read_file(path: tf.Tensor) -> tf.data.Dataset:
        return tf.data.TFRecordDataset(path).map(
            lambda s: {"text": s}, num_parallel_calls=tf.data.AUTOTUNE
        )

    return seqio.FileDataSource(read_file_fn=read_file, split_to_filepattern=dict(paths))


def _files_key(files: Sequence[str], *extra) -> str:
    h = hashlib.sha256(repr(extra).encode())
    for path in files:
        st = os.stat(path)
        h.update(f"|{path}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()[:16]


def prepare_text_files(
    files: str | Sequence[str],
    validation_files: str | Sequence[str] | None = None,
    validation_fraction: float = DEFAULT_TEXT_VALIDATION_FRACTION,
    txt_documents: str = "line",
    cache_dir: str | None = None,
) -> dict:
    """Converts text files into the cached TFRecord store (once); returns its `meta.json` dict.

    Raises:
      FileNotFoundError, readers.DataFileError: bad input, naming the file and line.
    """
    train_files = readers.resolve_files(files, what="TEXT_FILES")
    val_files = (
        readers.resolve_files(validation_files, what="VALIDATION_FILES") if validation_files else []
    )
    if not val_files and not 0.0 < validation_fraction < 1.0:
        raise ValueError(
            f"validation_fraction={validation_fraction} must be in (0, 1) when no "
            "VALIDATION_FILES are given"
        )
    key = _files_key(
        train_files + val_files, len(train_files), validation_fraction, txt_documents, 1
    )
    directory = os.path.join(
        os.path.expanduser(cache_dir or corpus_lib.default_cache_dir()), "text_files", key
    )
    meta_path = os.path.join(directory, "meta.json")
    if os.path.isfile(meta_path):
        with open(meta_path) as f:
            return json.load(f)
    stats = readers.ReadStats()
    train_docs: list[str] = []
    val_docs: list[str] = []
    for doc in readers.iter_documents(train_files, txt_documents, stats):
        held_out = not val_files and corpus_lib.is_validation(doc, validation_fraction)
        (val_docs if held_out else train_docs).append(doc)
    if val_files:
        val_docs = list(readers.iter_documents(val_files, txt_documents, stats))
    elif not val_docs:
        # Too few documents for the fraction to pick any: hold out the last one.
        val_docs.append(train_docs.pop())
    if not train_docs:
        raise readers.DataFileError(
            f"TEXT_FILES {train_files}: only {len(val_docs)} document(s), none left for training"
        )
    paths = {
        "train": os.path.join(directory, "train.tfrecord"),
        "validation": os.path.join(directory, "validation.tfrecord"),
    }
    readers.write_tfrecord(paths["train"], train_docs)
    readers.write_tfrecord(paths["validation"], val_docs)
    meta = {
        "paths": paths,
        "train_files": train_files,
        "validation_files": val_files,
        "train_documents": len(train_docs),
        "validation_documents": len(val_docs),
        "skipped_blank": stats.skipped_blank,
    }
    tmp = f"{meta_path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(meta, f, indent=1)
    os.replace(tmp, meta_path)
    return meta


def register_text_files_task(
    files: str | Sequence[str],
    vocabulary_path: str,
    validation_files: str | Sequence[str] | None = None,
    validation_fraction: float = DEFAULT_TEXT_VALIDATION_FRACTION,
    txt_documents: str = "line",
    cache_dir: str | None = None,
    name: str = TEXT_FILES_TASK,
    shuffle_buffer_size: int = DEFAULT_SHUFFLE_BUFFER_SIZE,
) -> seqio.Task:
    """Registers `text_files_span_corruption` over user files (module docstring)."""
    vocabulary = vocab_lib.get_vocabulary(vocabulary_path)
    meta = prepare_text_files(
        files, validation_files, validation_fraction, txt_documents, cache_dir
    )
    return register_span_corruption_task(
        name,
        tfrecord_text_source(meta["paths"]),
        vocabulary,
        shuffle_buffer_size=shuffle_buffer_size,
    )


def register_embedded_task(
    vocab_size: int = DEFAULT_EMBEDDED_VOCAB_SIZE,
    cache_dir: str | None = None,
    validation_fraction: float = corpus_lib.DEFAULT_VALIDATION_FRACTION,
    name: str = EMBEDDED_TASK,
    shuffle_buffer_size: int = DEFAULT_SHUFFLE_BUFFER_SIZE,
) -> seqio.Task:
    """Registers `embedded_span_corruption` (harvests the corpus and trains its vocabulary once).

    Args:
      vocab_size: ids of the trained vocabulary including 100 extra ids (a multiple of 128
        avoids padding rows).
      cache_dir: cache root (default `corpus.default_cache_dir()`).
      validation_fraction: documents held out for validation.
      name: the task name.
      shuffle_buffer_size: span-corrupted pieces in the shuffle buffer.
    """
    info = corpus_lib.prepare_embedded_corpus(cache_dir, validation_fraction)
    vocabulary = vocab_lib.get_vocabulary(corpus_lib.embedded_vocabulary_path(info, vocab_size))
    source = tfrecord_text_source({"train": info.train_path, "validation": info.validation_path})
    return register_span_corruption_task(
        name, source, vocabulary, shuffle_buffer_size=shuffle_buffer_size
    )


def get_vocabulary(task_or_mixture_name: str) -> seqio.Vocabulary:
    """The vocabulary of a registered task or mixture (its `targets` feature)."""
    provider = seqio.get_mixture_or_task(task_or_mixture_name)
    return provider.output_features["targets"].vocabulary
