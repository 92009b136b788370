"""SentencePiece vocabularies with T5's ids, their fingerprints, and an offline trainer.

T5 ids: pad 0, EOS 1, UNK 2, no BOS; 100 extra ids (`<extra_id_0>` = vocab_size - 1, the first
span-corruption sentinel) appended after the SentencePiece pieces. The C4 tasks default to T5's
`cc_all.32000` model (32,000 pieces + 100 extra ids = 32,100; embeddings padded to 32,128).

Train a vocabulary on local text (offline, same formats as the text-files task):

    python -m switch_t5.data.vocab --input='/data/*.txt' --output=/tmp/my_spm.model \\
        --vocab_size=8000

`--vocab_size` counts everything the model embeds, extra ids included (7,900 pieces + 100 here).
"""

from __future__ import annotations

import argparse
import hashlib
import io
import os
import sys
from collections.abc import Iterable, Sequence

from switch_t5 import errors
from switch_t5.config import pad_vocab_size
from switch_t5.data import readers

DEFAULT_SPM_PATH = "gs://t5-data/vocabs/cc_all.32000/sentencepiece.model"
DEFAULT_EXTRA_IDS = 100
PAD_ID, EOS_ID, UNK_ID = 0, 1, 2
# SentencePiece skips training sentences longer than this (bytes); docs are split into lines.
_MAX_SENTENCE_BYTES = 1 << 16


class VocabularyMismatchError(errors.UserError):
    """A task's vocabulary disagrees with a model or checkpoint."""


class VocabularyFileError(errors.UserError):
    """A vocabulary file is missing, empty, unreadable or not a T5-style SentencePiece model."""


class VocabularyFileNotFoundError(VocabularyFileError, FileNotFoundError):
    """A local vocabulary file does not exist (also a FileNotFoundError)."""


_WANTED = (
    "VOCABULARY_PATH must be a SentencePiece .model file with T5's ids (pad 0, EOS 1, UNK 2), "
    "e.g. T5's gs://t5-data/vocabs/cc_all.32000/sentencepiece.model copied to a local path, or "
    "one trained on your text with `python -m switch_t5.data.vocab --input=GLOB "
    "--output=PATH.model`"
)


def _read_model_bytes(path: str) -> bytes:
    if "://" not in path:
        if not os.path.isfile(path):
            what = "is a directory, not a file" if os.path.isdir(path) else "does not exist"
            cls = VocabularyFileError if os.path.isdir(path) else VocabularyFileNotFoundError
            raise cls(f"vocabulary file {path!r} {what}; {_WANTED}")
        try:
            with open(path, "rb") as f:
                return f.read()
        except OSError as e:
            raise VocabularyFileError(
                f"cannot read vocabulary file {path!r} ({e}); {_WANTED}"
            ) from e
    import tensorflow as tf

    from switch_t5.data import hide_gpus_from_tf

    hide_gpus_from_tf()
    try:
        with tf.io.gfile.GFile(path, "rb") as f:
            return f.read()
    except (tf.errors.OpError, OSError) as e:
        detail = " ".join(str(e).split())
        raise VocabularyFileError(
            f"cannot read vocabulary file {path!r} ({type(e).__name__}: {detail[:300]}); without "
            "network access or credentials for it, copy the file to a local path (e.g. `gsutil "
            "cp PATH /data/spm.model` on a machine that can read it) and set VOCABULARY_PATH to "
            "that path"
        ) from None


def check_sentencepiece_file(path: str) -> bytes:
    """Reads a vocabulary file and checks it is a SentencePiece model with T5's ids.

    Args:
      path: a local path (absolute or not) or a URL tf.io.gfile reads (gs://...).

    Returns:
      The file's bytes.

    Raises:
      VocabularyFileNotFoundError: a local path that does not exist.
      VocabularyFileError: an empty, unreadable or non-SentencePiece file, a model whose EOS or
        padding id is not T5's, or a URL that cannot be read (e.g. offline); each names the path.
    """
    import sentencepiece as spm

    model_bytes = _read_model_bytes(path)
    if not model_bytes:
        raise VocabularyFileError(f"vocabulary file {path!r} is empty; {_WANTED}")
    processor = spm.SentencePieceProcessor()
    try:
        processor.LoadFromSerializedProto(model_bytes)
    except RuntimeError:
        start = model_bytes[:40]
        raise VocabularyFileError(
            f"vocabulary file {path!r} ({len(model_bytes):,} bytes, starting {start!r}) is not a "
            f"SentencePiece model; {_WANTED}"
        ) from None
    ids = {"pad": processor.pad_id(), "EOS": processor.eos_id(), "UNK": processor.unk_id()}
    if (ids["pad"], ids["EOS"]) != (PAD_ID, EOS_ID):
        raise VocabularyFileError(
            f"vocabulary file {path!r} is a SentencePiece model with ids "
            f"{', '.join(f'{k} {v}' for k, v in ids.items())} (-1: none), but T5 models need pad "
            f"{PAD_ID} and EOS {EOS_ID}; {_WANTED}"
        )
    return model_bytes


def get_vocabulary(path: str | os.PathLike = DEFAULT_SPM_PATH, extra_ids: int = DEFAULT_EXTRA_IDS):
    """A `seqio.SentencePieceVocabulary`, after checking the file (`check_sentencepiece_file`).

    The file is read and parsed once here (milliseconds), so that a wrong VOCABULARY_PATH fails
    when the task is registered, naming the path, rather than deep inside the input pipeline.

    Raises:
      VocabularyFileNotFoundError, VocabularyFileError: see `check_sentencepiece_file`.
    """
    import seqio

    path = os.fspath(path)
    if "://" not in path:
        path = os.path.abspath(os.path.expanduser(path))
    check_sentencepiece_file(path)
    return seqio.SentencePieceVocabulary(path, extra_ids=extra_ids)


def vocab_fingerprint(vocabulary) -> str:
    """`"<path>|extra_ids=<n>|sha256=<hex of the model file>"` of a SentencePiece vocabulary.

    Checkpoints record it; `check_fingerprint` compares the parts that matter (the model bytes
    and the extra ids), so a moved model file still matches.
    """
    path = vocabulary.sentencepiece_model_file
    if "://" in path:
        import tensorflow as tf

        from switch_t5.data import hide_gpus_from_tf

        hide_gpus_from_tf()
        with tf.io.gfile.GFile(path, "rb") as f:
            model_bytes = f.read()
    else:
        with open(path, "rb") as f:
            model_bytes = f.read()
    # The file's bytes (seqio's `sp_model` is the model with the extra ids added).
    digest = hashlib.sha256(model_bytes).hexdigest()
    return f"{path}|extra_ids={vocabulary.extra_ids}|sha256={digest}"


def vocabulary_record(vocabulary) -> dict:
    """The vocabulary record a checkpoint's meta stores (`checkpoints.make_meta`):
    {"path": model file, "hash": sha256 of its bytes, "fingerprint": `vocab_fingerprint`,
    "size": ids incl. extra ids}. Evaluation, inference and fine-tuning compare it with theirs."""
    fingerprint = vocab_fingerprint(vocabulary)
    return {
        "path": getattr(vocabulary, "sentencepiece_model_file", ""),
        "hash": fingerprint.split("sha256=")[-1],
        "fingerprint": fingerprint,
        "size": int(vocabulary.vocab_size),
    }


def _fingerprint_key(fingerprint: str) -> tuple[str, str]:
    parts = dict(p.split("=", 1) for p in fingerprint.split("|")[1:] if "=" in p)
    if "sha256" not in parts or "extra_ids" not in parts:
        raise ValueError(f"{fingerprint!r} is not a vocabulary fingerprint (see vocab_fingerprint)")
    return parts["sha256"], parts["extra_ids"]


def check_fingerprint(expected: str, actual: str, what: str = "checkpoint") -> None:
    """Raises VocabularyMismatchError unless both fingerprints name the same vocabulary."""
    if _fingerprint_key(expected) != _fingerprint_key(actual):
        raise VocabularyMismatchError(
            f"vocabulary mismatch: the {what} was made with {expected.split('|')[0]!r} "
            f"({expected}), but the task uses {actual.split('|')[0]!r} ({actual}). "
            "Use the task whose vocabulary the checkpoint was trained with, or start from scratch."
        )


def check_model_vocab_size(vocabulary, model_vocab_size: int, task_name: str = "") -> None:
    """Raises VocabularyMismatchError unless the embedding rows equal the padded vocabulary size.

    The model's `vocab_size` must be `pad_vocab_size(vocabulary.vocab_size)` (a multiple of 128).
    """
    expected = pad_vocab_size(vocabulary.vocab_size)
    if model_vocab_size != expected:
        raise VocabularyMismatchError(
            f"model vocab_size={model_vocab_size} but task {task_name!r} uses a vocabulary of "
            f"{vocabulary.vocab_size} ids (padded: {expected}); set SwitchConfig.vocab_size = "
            f"{expected}"
        )


def train_sentencepiece(
    documents: Iterable[str],
    output_path: str,
    vocab_size: int = 8000,
    extra_ids: int = DEFAULT_EXTRA_IDS,
    *,
    character_coverage: float = 0.9995,
    max_sentences: int = 2_000_000,
    seed: int = 0,
    num_threads: int = 2,
) -> str:
    """Trains a unigram SentencePiece model with T5's ids and writes it to `output_path`.

    Args:
      documents: text; each is split into lines (SentencePiece trains on sentences).
      output_path: the `.model` file written (atomically: written to a temporary name first).
      vocab_size: ids including `extra_ids`; the model gets `vocab_size - extra_ids` pieces.
      extra_ids: sentinel ids appended by seqio (not part of the model).
      character_coverage: SentencePiece's character coverage.
      max_sentences: training lines sampled at most (SentencePiece's input_sentence_size).
      seed: SentencePiece's sampling seed (the same text and seed give the same model).
      num_threads: trainer threads.

    Returns:
      output_path.

    Raises:
      ValueError: if vocab_size leaves no room for pieces, or there is no text.
    """
    import sentencepiece as spm

    pieces = vocab_size - extra_ids
    if pieces < 8:
        raise ValueError(
            f"vocab_size={vocab_size} with extra_ids={extra_ids} leaves {pieces} pieces; "
            "use a vocab_size of at least extra_ids + 8"
        )
    lines = []
    for doc in documents:
        for line in doc.split("\n"):
            line = line.strip()
            if line:
                lines.append(line.encode("utf-8")[:_MAX_SENTENCE_BYTES].decode("utf-8", "ignore"))
    if not lines:
        raise ValueError("no text to train a SentencePiece model on")
    spm.set_random_generator_seed(seed)
    model = io.BytesIO()
    try:
        _train(spm, lines, model, pieces, character_coverage, max_sentences, num_threads)
    except RuntimeError as e:
        if "Vocabulary size too high" not in str(e):
            raise
        raise ValueError(
            f"the text is too small for {pieces} SentencePiece pieces ({e}); lower vocab_size "
            "or give more text"
        ) from e
    output_path = os.path.abspath(os.path.expanduser(output_path))
    os.makedirs(os.path.dirname(output_path), exist_ok=True)
    tmp = f"{output_path}.tmp{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(model.getvalue())
    os.replace(tmp, output_path)
    return output_path


def _train(spm, lines, model, pieces, character_coverage, max_sentences, num_threads) -> None:
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines),
        model_writer=model,
        model_type="unigram",
        vocab_size=pieces,
        pad_id=PAD_ID,
        eos_id=EOS_ID,
        unk_id=UNK_ID,
        bos_id=-1,
        character_coverage=character_coverage,
        input_sentence_size=max_sentences,
        shuffle_input_sentence=True,
        max_sentence_length=_MAX_SENTENCE_BYTES,
        num_threads=num_threads,
        # Small corpora may not support `pieces` pieces; fail loudly instead of shrinking.
        hard_vocab_limit=True,
        minloglevel=2,
    )


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description="Train a T5-compatible SentencePiece model (pad 0, eos 1, unk 2) on local text."
    )
    parser.add_argument("--input", action="append", required=True, help="glob (repeatable)")
    parser.add_argument("--output", required=True, help="the .model file to write")
    parser.add_argument("--vocab_size", type=int, default=8000, help="ids incl. extra ids")
    parser.add_argument("--extra_ids", type=int, default=DEFAULT_EXTRA_IDS)
    parser.add_argument("--txt_documents", choices=readers.TXT_MODES, default="line")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    files = readers.resolve_files(args.input, what="--input")
    stats = readers.ReadStats()
    path = train_sentencepiece(
        readers.iter_documents(files, args.txt_documents, stats),
        args.output,
        vocab_size=args.vocab_size,
        extra_ids=args.extra_ids,
        seed=args.seed,
    )
    print(
        f"wrote {path}: {args.vocab_size - args.extra_ids} pieces + {args.extra_ids} extra ids "
        f"from {stats.documents} documents in {stats.files} files "
        f"({stats.skipped_blank} blank skipped)",
        file=sys.stderr,
    )


if __name__ == "__main__":
    main()


def decode_with_sentinels(vocabulary, ids) -> str:
    """Decodes ids to text, writing extra ids as `<extra_id_k>` and stopping at EOS.

    seqio's `decode` maps extra ids to UNK; span-corruption examples are only readable with the
    sentinels spelled out.
    """
    base = vocabulary.vocab_size - vocabulary.extra_ids
    parts: list[str] = []
    run: list[int] = []
    for i in (int(t) for t in ids):
        if i == EOS_ID:
            break
        if i == PAD_ID:
            continue
        if i >= base:
            if run:
                parts.append(vocabulary.decode(run))
                run = []
            parts.append(f"<extra_id_{vocabulary.vocab_size - 1 - i}>")
        else:
            run.append(i)
    if run:
        parts.append(vocabulary.decode(run))
    return " ".join(p for p in parts if p)
