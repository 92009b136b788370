"""The tokenizer of an HF export, and the vocabulary of an HF import.

This project's vocabulary is a seqio `SentencePieceVocabulary` with 100 extra ids: T5's ids (pad
0, EOS 1, UNK 2), the SentencePiece pieces, then `<extra_id_99>` ... `<extra_id_0>` (the last id);
seqio appends no EOS when encoding. HF's T5 tokenizer has the same layout, so an export writes

  spiece.model            the run's SentencePiece model (the file its checkpoint records)
  tokenizer_config.json   T5Tokenizer, legacy=False (no extra dummy prefix after special
                          tokens), the extra ids as additional special tokens, T5's
                          eos/pad/unk, clean_up_tokenization_spaces=False (decode as
                          SentencePiece does)
  tokenizer.json          built by transformers' own converter (T5Tokenizer from spiece.model)

and checks, before any weight is written, that the tokenizer transformers loads from them gives
the SentencePiece model's ids on text made of every piece, and the sentinel ids seqio gives.
`AutoTokenizer.from_pretrained(export_dir)(text, add_special_tokens=False)` then gives the ids
the run was trained on. (Decoding follows HF's T5 convention: no space before a sentinel.)

An import records the HF directory's `spiece.model` as the run's vocabulary (copied into the
MODEL_DIR), when it has T5's ids and 100 extra ids.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from typing import Any

from switch_t5.errors import UserError
from switch_t5.interop.destination import VOCABULARY_FILE

EXTRA_IDS = 100  # seqio's extra ids of every vocabulary of this project (vocab.DEFAULT_EXTRA_IDS)
# T5's special pieces and their ids (vocab.PAD_ID, EOS_ID, UNK_ID).
T5_SPECIAL = {"pad": (0, "<pad>"), "eos": (1, "</s>"), "unk": (2, "<unk>")}
TOKENIZER_FILES = (VOCABULARY_FILE, "tokenizer_config.json", "tokenizer.json")


def _read_bytes(path: str) -> bytes:
    if "://" in path:
        from etils import epath

        return epath.Path(path).read_bytes()
    with open(path, "rb") as f:
        return f.read()


def _extra_ids_of(record: dict[str, Any]) -> int:
    m = re.search(r"\|extra_ids=(\d+)", record.get("fingerprint") or "")
    return int(m.group(1)) if m else EXTRA_IDS


def _processor(model_bytes: bytes):
    import sentencepiece as spm

    return spm.SentencePieceProcessor(model_proto=model_bytes)


def _t5_special_problem(sp) -> str | None:
    got = {"pad": sp.pad_id(), "eos": sp.eos_id(), "unk": sp.unk_id()}
    for name, (want, _) in T5_SPECIAL.items():
        if got[name] != want:
            return f"its {name} id is {got[name]}, T5's is {want}"
    return None


def resolve_vocabulary(
    record: dict[str, Any] | None, vocabulary_path: str | None, where: str
) -> tuple[bytes, int, str]:
    """(SentencePiece model bytes, extra ids, path) of the vocabulary an export writes.

    Args:
      record: the checkpoint's vocabulary record (path, hash, fingerprint), or None/{}.
      vocabulary_path: a SentencePiece model given by the user (wins over the record's path;
        must have the recorded hash when there is one).
      where: the checkpoint, for messages.

    Raises:
      UserError: no vocabulary is known, the file is missing, or its hash differs.
    """
    record = record or {}
    path = vocabulary_path or record.get("path")
    if not path:
        raise UserError(
            f"the checkpoint {where} records no vocabulary, so the export would have no "
            "tokenizer (AutoTokenizer would build a 104-id one that maps text to <unk>); pass "
            "--vocabulary_path=SPM_MODEL (the SentencePiece model it was trained with), or "
            "--no_tokenizer to export the weights alone"
        )
    try:
        model_bytes = _read_bytes(path)
    except (FileNotFoundError, OSError) as e:
        raise UserError(
            f"the vocabulary {path!r} of the checkpoint {where} cannot be read ({e}); pass "
            "--vocabulary_path=SPM_MODEL (the SentencePiece model it was trained with), or "
            "--no_tokenizer"
        ) from e
    digest = hashlib.sha256(model_bytes).hexdigest()
    if record.get("hash") and record["hash"] != digest:
        raise UserError(
            f"the vocabulary file {path!r} (sha256 {digest}) is not the one the checkpoint "
            f"{where} was trained with ({record.get('path')!r}, sha256 {record['hash']}); pass "
            "--vocabulary_path with that SentencePiece model"
        )
    return model_bytes, _extra_ids_of(record), path


def tokenizer_config(sp, extra_ids: int) -> dict[str, Any]:
    """tokenizer_config.json of a T5 tokenizer for the SentencePiece model `sp`."""
    return {
        "tokenizer_class": "T5Tokenizer",
        "legacy": False,
        "extra_ids": extra_ids,
        "additional_special_tokens": [f"<extra_id_{i}>" for i in range(extra_ids)],
        "eos_token": sp.id_to_piece(T5_SPECIAL["eos"][0]),
        "pad_token": sp.id_to_piece(T5_SPECIAL["pad"][0]),
        "unk_token": sp.id_to_piece(T5_SPECIAL["unk"][0]),
        "clean_up_tokenization_spaces": False,
    }


def write_tokenizer(
    model_bytes: bytes, extra_ids: int, out_dir: str, hf_vocab_size: int, name: str
) -> None:
    """Writes spiece.model, tokenizer_config.json and tokenizer.json into `out_dir` and checks
    that transformers' tokenizer loaded from them reproduces the vocabulary's ids.

    Raises:
      UserError: the model has not T5's special ids, has more ids than the model's embedding,
        transformers is missing, or its tokenizer gives other ids (names the text).
    """
    try:
        sp = _processor(model_bytes)
    except RuntimeError as e:
        raise UserError(
            f"the vocabulary {name} is not a SentencePiece model ({e}); pass --vocabulary_path "
            "with the .model file the run was trained with, or --no_tokenizer"
        ) from e
    problem = _t5_special_problem(sp)
    if problem:
        raise UserError(
            f"the vocabulary {name} is not a T5 vocabulary ({problem}); export with --no_tokenizer"
        )
    total = sp.get_piece_size() + extra_ids
    if total > hf_vocab_size:
        raise UserError(
            f"the vocabulary {name} has {total} ids ({extra_ids} extra ids included) but the "
            f"exported model has {hf_vocab_size} embedding rows; pass --vocab_size={total} or "
            "the vocabulary the model was trained with"
        )
    try:
        import transformers
    except ImportError as e:
        raise UserError(
            "writing the HF tokenizer needs transformers (pip install 'switch_t5[hf]'); or "
            "pass --no_tokenizer to export the weights alone"
        ) from e
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, VOCABULARY_FILE), "wb") as f:
        f.write(model_bytes)
    with open(os.path.join(out_dir, "tokenizer_config.json"), "w") as f:
        json.dump(tokenizer_config(sp, extra_ids), f, indent=2)
    # transformers' own SentencePiece -> tokenizers conversion (T5Converter), saved as is.
    converted = transformers.T5Tokenizer.from_pretrained(out_dir, local_files_only=True)
    converted.backend_tokenizer.save(os.path.join(out_dir, "tokenizer.json"))
    loaded = transformers.AutoTokenizer.from_pretrained(out_dir, local_files_only=True)
    check_tokenizer(loaded, sp, extra_ids, name)


def _probe_texts(sp) -> list[str]:
    """Every piece as a word of its own, then with leading spaces."""
    words = " ".join(sp.decode([i]) for i in range(len(T5_SPECIAL), sp.get_piece_size()))
    return [words, "  " + words]


def check_tokenizer(tokenizer, sp, extra_ids: int, name: str) -> None:
    """Raises UserError unless `tokenizer` encodes like the SentencePiece model `sp` plus seqio's
    extra ids (`<extra_id_i>` = pieces + extra_ids - 1 - i)."""
    total = sp.get_piece_size() + extra_ids
    if len(tokenizer) != total:
        raise UserError(
            f"transformers' tokenizer for {name} has {len(tokenizer)} ids, the vocabulary "
            f"{total}; export with --no_tokenizer"
        )
    for i in sorted({0, extra_ids - 1}) if extra_ids else ():
        got = tokenizer.convert_tokens_to_ids(f"<extra_id_{i}>")
        if got != total - 1 - i:
            raise UserError(
                f"transformers' tokenizer for {name} gives <extra_id_{i}> the id {got}, seqio "
                f"{total - 1 - i}; export with --no_tokenizer"
            )
    for text in _probe_texts(sp):
        want = sp.encode(text)
        got = tokenizer(text, add_special_tokens=False)["input_ids"]
        if got != want:
            first = next(
                (k for k, (a, b) in enumerate(zip(want, got)) if a != b), min(len(want), len(got))
            )
            raise UserError(
                f"transformers' tokenizer for {name} does not reproduce its ids (first "
                f"difference at token {first}: {want[first : first + 3]} != "
                f"{got[first : first + 3]}); export with --no_tokenizer and ship the "
                "SentencePiece model separately"
            )


def hf_vocabulary(src: str, hf_vocab_size: int) -> tuple[str | None, str]:
    """(the HF directory's SentencePiece model to record, or None; a note for the user).

    Recorded when `spiece.model` exists, has T5's special ids and 100 extra ids (seqio's, which
    every command of this project uses), and fits the model's embedding.
    """
    path = os.path.join(src, VOCABULARY_FILE)
    if not os.path.exists(path):
        return None, (
            f"no vocabulary recorded: {src} has no {VOCABULARY_FILE}; pass --vocabulary_path "
            "(the SentencePiece model) to infer, and VOCABULARY_PATH to eval and train"
        )
    extra_ids = EXTRA_IDS
    config_file = os.path.join(src, "tokenizer_config.json")
    if os.path.exists(config_file):
        with open(config_file) as f:
            cfg = json.load(f)
        sentinels = {
            t
            for key in ("additional_special_tokens", "extra_special_tokens")
            for t in (cfg.get(key) or [])
            if isinstance(t, str) and re.fullmatch(r"<extra_id_\d+>", t)
        }
        extra_ids = int(cfg.get("extra_ids") or len(sentinels) or EXTRA_IDS)
    try:
        sp = _processor(_read_bytes(path))
    except (RuntimeError, OSError) as e:
        return None, f"no vocabulary recorded: {path} is not a SentencePiece model ({e})"
    problem = _t5_special_problem(sp)
    total = sp.get_piece_size() + extra_ids
    if problem or extra_ids != EXTRA_IDS or total > hf_vocab_size:
        why = problem or (
            f"{extra_ids} extra ids, this project's vocabularies have {EXTRA_IDS}"
            if extra_ids != EXTRA_IDS
            else f"{total} ids for {hf_vocab_size} embedding rows"
        )
        return None, f"no vocabulary recorded: {path} does not fit ({why})"
    return path, ""


def copy_files(from_dir: str, dst: str) -> list[str]:
    """Copies the tokenizer files written by `write_tokenizer` into `dst`; returns their names."""
    for name in TOKENIZER_FILES:
        shutil.copyfile(os.path.join(from_dir, name), os.path.join(dst, name))
    return list(TOKENIZER_FILES)
