"""Multilingual span-corruption mixtures: mC4 (TFDS or the released JSON files) and user files.

Each language is a span-corruption task of its own (`tasks.register_span_corruption_task`,
named `<mixture>.<language>`, `-` written `_`), and the mixture samples them with mT5's
p(L) ~ n(L)^alpha (`multilingual.sampling_rates`), n(L) the language's training documents. The
mixture is a `seqio.Mixture`: the input pipeline's `seqio.get_dataset` draws each example from
one language's stream (`tf.data.Dataset.sample_from_datasets`) with those probabilities.

- `register_mc4_tasks`: `mc4_span_corruption` (107 tasks, mC4's languages) and
  `mc4_span_corruption.<language>`. Data from TFDS `c4/multilingual:3.0.1` (split `<language>`
  and `<language>-validation`; n(L) from the prepared dataset's split sizes, as mT5 reads them)
  or, since TFDS builds mC4 only with Apache Beam over Common Crawl, from the released JSON files
  (`c4-<language>.tfrecord-*.json.gz`, one JSON object with a `text` field per line) through a
  file mapping, with n(L) from a document-count file. The files are streamed as they are (no
  conversion: mC4 is terabytes); validation files per language, or else one document in 1,000 of
  the training files (by a hash of its text) is held out.
- `register_multilingual_text_files`: `text_files_span_corruption` over `{language: glob}`, each
  language converted and split like the single-glob task (`tasks.prepare_text_files`), so n(L)
  is counted exactly.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import seqio
import tensorflow as tf

from switch_t5.data import hide_gpus_from_tf, tasks
from switch_t5.data import multilingual as ml
from switch_t5.data import vocab as vocab_lib

hide_gpus_from_tf()  # tf.data runs on the host CPU only.

# Held out of a language's training files for validation when it has no validation files: as
# TFDS's c4 builder does (0.1% of the pages, by a hash).
HELD_OUT_BUCKETS = 1000


def _json_text(line: tf.Tensor) -> bytes:
    import json

    return json.loads(line.numpy().decode("utf-8"))["text"].encode("utf-8")


class JsonLinesTextSource(seqio.FileDataSource):
    """`{"text": <string>}` from gzip-compressed (`.gz`) or plain JSON-lines files, streamed.

    Args:
      split_files: split -> files (all gzip-compressed, or all plain).
      held_out_from: a split read from these same files keeps only the documents whose text
        hashes into bucket 0 of HELD_OUT_BUCKETS, and "train" drops them (None: no hold-out).
    """

    def __init__(self, split_files: Mapping[str, Sequence[str]], held_out_from: str | None = None):
        compressed = {f.endswith(".gz") for files in split_files.values() for f in files}
        if len(compressed) > 1:
            raise ml.MultilingualError(
                f"files {sorted(f for v in split_files.values() for f in v)[:4]}...: a "
                "language's files must be all gzip-compressed (.json.gz) or all plain (.json)"
            )
        compression = "GZIP" if compressed == {True} else ""

        def read_file(path: tf.Tensor) -> tf.data.Dataset:
            lines = tf.data.TextLineDataset(path, compression_type=compression)
            # JSON strings (escapes, \\uXXXX pairs) are decoded by Python's json, a pure function.
            return lines.map(
                lambda s: {"text": tf.ensure_shape(tf.py_function(_json_text, [s], tf.string), [])},
                num_parallel_calls=tf.data.AUTOTUNE,
            )

        super().__init__(read_file, {k: list(v) for k, v in split_files.items()})
        self._held_out_from = held_out_from

    def get_dataset(self, split="train", shuffle=True, seed=None, shard_info=None, **kwargs):
        ds = super().get_dataset(split, shuffle, seed, shard_info, **kwargs)
        if self._held_out_from is not None:
            keep_held_out = split != "train"

            def keep(ex):
                held_out = tf.strings.to_hash_bucket_fast(ex["text"], HELD_OUT_BUCKETS) == 0
                return held_out if keep_held_out else tf.logical_not(held_out)

            ds = ds.filter(keep)
        options = tf.data.Options()
        # The py_function above is stateless (it only parses a line), but tf.data cannot know:
        # without this the input pipeline's iterator checkpoint (exact resume) is refused.
        options.experimental_external_state_policy = tf.data.experimental.ExternalStatePolicy.IGNORE
        return ds.with_options(options)


def _glob(patterns: Sequence[str], what: str) -> list[str]:
    files: list[str] = []
    for pattern in patterns:
        matches = sorted(tf.io.gfile.glob(pattern))
        if not matches:
            raise ml.MultilingualFileNotFoundError(
                f"{what}: {pattern!r} matches no file; fix the path or the glob template"
            )
        files += matches
    return sorted(dict.fromkeys(files))


def mc4_file_source(
    language: str, train: Sequence[str], validation: Sequence[str] | None
) -> JsonLinesTextSource:
    """The JSON-files source of one mC4 language (validation held out when None)."""
    files = {"train": _glob(train, f"MC4_FILES[{language!r}]")}
    if validation is None:
        return JsonLinesTextSource({**files, "validation": files["train"]}, held_out_from="train")
    files["validation"] = _glob(validation, f"MC4_VALIDATION_FILES[{language!r}]")
    return JsonLinesTextSource(files)


def _replace_mixture(name: str) -> None:
    if name in seqio.TaskRegistry.names():  # the single-glob text-files task of that name
        seqio.TaskRegistry.remove(name)
    if name in seqio.MixtureRegistry.names():
        seqio.MixtureRegistry.remove(name)


Rate = float | Callable[[seqio.Task], float]


def register_language_mixture(
    name: str,
    sources: Mapping[str, seqio.DataSource],
    vocabulary: seqio.Vocabulary,
    rates: Mapping[str, Rate],
    shuffle_buffer_size: int = tasks.DEFAULT_SHUFFLE_BUFFER_SIZE,
) -> seqio.Mixture:
    """Registers one span-corruption task per language and the mixture `name` of them.

    Args:
      name: the mixture; the tasks are `multilingual.language_task_name(name, language)`.
      sources: language -> its seqio source (splits "train", "validation").
      vocabulary: of every task.
      rates: language -> its sampling rate (normalised by seqio), or a function of the task.
      shuffle_buffer_size: span-corrupted pieces in each language's shuffle buffer.
    """
    register_language_tasks(name, sources, vocabulary, shuffle_buffer_size)
    _replace_mixture(name)
    return seqio.MixtureRegistry.add(
        name, [(ml.language_task_name(name, lang), rates[lang]) for lang in sources]
    )


def register_language_tasks(
    name: str,
    sources: Mapping[str, seqio.DataSource],
    vocabulary: seqio.Vocabulary,
    shuffle_buffer_size: int = tasks.DEFAULT_SHUFFLE_BUFFER_SIZE,
) -> None:
    """Registers the task `<name>.<language>` of each language of `sources` (no mixture)."""
    for language, source in sources.items():
        tasks.register_span_corruption_task(
            ml.language_task_name(name, language),
            source,
            vocabulary,
            shuffle_buffer_size=shuffle_buffer_size,
        )


def _tfds_rate(alpha: float) -> Callable[[seqio.Task], float]:
    def rate(task: seqio.Task) -> float:
        # n(L)^alpha from the prepared dataset's split size, read when the mixture is built
        # (multilingual_t5's rate_num_examples with temperature 1/alpha).
        return float(task.num_input_examples("train")) ** alpha

    return rate


def register_mc4_tasks(
    name: str = ml.MC4_TASK,
    vocabulary_path: str = ml.MC4_VOCABULARY_PATH,
    languages: Sequence[str] | None = None,
    alpha: float = ml.DEFAULT_ALPHA,
    files: str | Mapping | None = None,
    validation_files: str | Mapping | None = None,
    counts: str | Mapping[str, int] | None = None,
    tfds_data_dir: str | None = None,
    shuffle_buffer_size: int = tasks.DEFAULT_SHUFFLE_BUFFER_SIZE,
) -> None:
    """Registers `mc4_span_corruption` and its language tasks, or one language's task.

    Args:
      name: the mixture (`mc4_span_corruption`), or one language's task
        (`mc4_span_corruption.de`), which needs no counts.
      vocabulary_path: mT5's 250,100-id vocabulary by default (read when registering).
      languages: the mixture's languages (None: the 107 of `multilingual.MC4_LANGUAGES`).
      alpha: p(L) ~ n(L)^alpha.
      files: None reads TFDS `c4/multilingual:3.0.1`; else the released JSON files, as a mapping
        `{language: glob}` or a template with `{lang}` (`multilingual.language_patterns`).
      validation_files: as `files`; None holds one document in 1,000 of `files` out.
      counts: the count file's path (`multilingual.read_counts`) or `{language: documents}`;
        needed with `files`; with TFDS, None reads the split sizes.
      tfds_data_dir: where TFDS's `c4/multilingual` is prepared (None: ~/tensorflow_datasets).
      shuffle_buffer_size: span-corrupted pieces in each language's shuffle buffer.

    Raises:
      MultilingualError (and its FileNotFoundError), VocabularyFileError: UserErrors naming the
        setting and the fix.
    """
    alpha = ml.check_alpha(alpha)
    single = name != ml.MC4_TASK
    if single:
        by_task = {ml.language_task_name(ml.MC4_TASK, lang): lang for lang in ml.MC4_LANGUAGES}
        by_task[ml.language_task_name(ml.MC4_TASK, ml.MC4_UNDETERMINED)] = ml.MC4_UNDETERMINED
        if name not in by_task:
            raise ml.MultilingualError(
                f"MIXTURE_OR_TASK_NAME={name!r} is not an mC4 task: use {ml.MC4_TASK!r} (the "
                f"mixture) or {ml.MC4_TASK}.<language>, e.g. {ml.MC4_TASK}.de or "
                f"{ml.MC4_TASK}.ru_Latn"
            )
        languages = (by_task[name],)
    languages = ml.check_mc4_languages(languages)
    if counts is None and files is not None and not single:
        raise ml.MultilingualError(
            "MC4_FILES is set but MC4_COUNTS is not: the language sampling rates need each "
            "language's training documents; set MC4_COUNTS to a JSON file "
            '{"en": 3928733374, ...} (`python -m switch_t5.data.multilingual` counts them)'
        )
    counts_of = None
    if counts is not None and not single:
        table = ml.read_counts(counts) if isinstance(counts, str) else counts
        source = f"MC4_COUNTS file {counts!r}" if isinstance(counts, str) else "MC4_COUNTS"
        counts_of = ml.counts_for(languages, table, source)
    vocabulary = vocab_lib.get_vocabulary(vocabulary_path)
    sources = _mc4_sources(languages, files, validation_files, tfds_data_dir)
    if single:
        register_language_tasks(ml.MC4_TASK, sources, vocabulary, shuffle_buffer_size)
        return
    rates = ml.sampling_rates(counts_of, alpha) if counts_of else None
    rates = rates or {lang: _tfds_rate(alpha) for lang in languages}
    register_language_mixture(ml.MC4_TASK, sources, vocabulary, rates, shuffle_buffer_size)


def _mc4_sources(languages, files, validation_files, tfds_data_dir) -> dict[str, seqio.DataSource]:
    if files is None:
        if validation_files is not None:
            raise ml.MultilingualError(
                "MC4_VALIDATION_FILES is set without MC4_FILES; set both (JSON files) or "
                "neither (TFDS c4/multilingual)"
            )
        return {
            lang: seqio.TfdsDataSource(
                tfds_name=ml.MC4_TFDS_NAME,
                tfds_data_dir=tfds_data_dir,
                splits={"train": lang, "validation": f"{lang}-validation"},
            )
            for lang in languages
        }
    train = ml.language_patterns(files, languages, "MC4_FILES")
    validation = (
        ml.language_patterns(validation_files, languages, "MC4_VALIDATION_FILES")
        if validation_files is not None
        else {}
    )
    return {lang: mc4_file_source(lang, train[lang], validation.get(lang)) for lang in languages}


def register_multilingual_text_files(
    name: str,
    files: Mapping[str, str | Sequence[str]],
    vocabulary_path: str,
    validation_files: Mapping[str, str | Sequence[str]] | None = None,
    alpha: float = ml.DEFAULT_ALPHA,
    validation_fraction: float = tasks.DEFAULT_TEXT_VALIDATION_FRACTION,
    txt_documents: str = "line",
    cache_dir: str | None = None,
    shuffle_buffer_size: int = tasks.DEFAULT_SHUFFLE_BUFFER_SIZE,
) -> dict[str, int]:
    """Registers the mixture `name` over `{language: glob}` and its tasks `<name>.<language>`.

    Each language's files are converted and split as `tasks.prepare_text_files` does (its own
    validation files, or `validation_fraction` of its documents held out); n(L) is the number
    of its training documents.

    Returns:
      language -> training documents.

    Raises:
      MultilingualError, readers.DataFileError, FileNotFoundError: naming the language's files.
    """
    alpha = ml.check_alpha(alpha)
    patterns = ml.language_patterns(files, None, "TEXT_FILES")
    held = {}
    if validation_files is not None:
        held = ml.language_patterns(validation_files, None, "VALIDATION_FILES")
    unknown = sorted(set(held) - set(patterns))
    if unknown:
        raise ml.MultilingualError(
            f"VALIDATION_FILES maps {unknown[0]!r}, which TEXT_FILES does not; use the same "
            "languages in both"
        )
    vocabulary = vocab_lib.get_vocabulary(vocabulary_path)
    sources, counts = {}, {}
    for language, globs in patterns.items():
        try:
            meta = tasks.prepare_text_files(
                globs, held.get(language), validation_fraction, txt_documents, cache_dir
            )
        except FileNotFoundError as e:
            raise ml.MultilingualFileNotFoundError(f"language {language!r}: {e}") from None
        sources[language] = tasks.tfrecord_text_source(meta["paths"])
        counts[language] = meta["train_documents"]
    rates = ml.sampling_rates(counts, alpha)
    register_language_mixture(name, sources, vocabulary, rates, shuffle_buffer_size)
    return counts
