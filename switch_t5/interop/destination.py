"""Conversion destinations: a non-empty one is refused unless `overwrite`, which first removes
what the conversion would otherwise leave beside its output.

Old files in a destination are not harmless: `from_pretrained` loads an old `model.safetensors`
lying next to new shards (the index file is only read when the single file is absent), and a
converted `checkpoints/0` under a trained run's newer steps is never used (every command takes
the newest step). So every conversion writes into an empty (or new) directory, or, with
`overwrite`, into one from which the files of its kind were removed first:

- an HF model directory: weights in every format HF loads (single files, shards, index files),
  `config.json`, `generation_config.json` and the tokenizer files;
- a MODEL_DIR: the checkpoints (`checkpoints/`, `checkpoints_quarantine/`, `best/`), the run's
  config and metadata (`config.gin`, `model.gin`, the vocabulary copy `spiece.model`) and what the
  old run wrote about itself (`metrics.jsonl`, `tensorboard/`, `plots/`, `eval/`, `profile/`).

Other files (a README, the user's notes) stay. The source is never removed: a destination that
is the source, or whose removed entries hold it, is refused.
"""

from __future__ import annotations

import fnmatch
import os
import shutil
from typing import Literal

from switch_t5 import fileio, run_dir
from switch_t5.errors import UserError

Kind = Literal["hf", "orbax"]

STAGING_DIR = ".convert-staging"
# The SentencePiece model a converted MODEL_DIR records as its vocabulary (HF's file name).
VOCABULARY_FILE = "spiece.model"
HF_TOKENIZER_FILES = (
    VOCABULARY_FILE,
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
)
HF_PATTERNS = (
    "model.safetensors",
    "model-*-of-*.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model-*-of-*.bin",
    "pytorch_model.bin.index.json",
    "tf_model.h5",
    "tf_model-*-of-*.h5",
    "tf_model.h5.index.json",
    "flax_model.msgpack",
    "flax_model-*-of-*.msgpack",
    "flax_model.msgpack.index.json",
    "config.json",
    "generation_config.json",
    *HF_TOKENIZER_FILES,
)


def _orbax_patterns() -> tuple[str, ...]:
    """What a run or a converted checkpoint writes at the top of its folder."""
    return (*run_dir.RUN_ENTRIES, "model.gin", VOCABULARY_FILE, STAGING_DIR)


def _ignored() -> set[str]:
    # Left by an earlier (possibly interrupted) conversion; neither holds a model.
    return {run_dir.LOCK_FILE, STAGING_DIR}


def _listing(dst: str, names: list[str], limit: int = 8) -> str:
    shown = [n + ("/" if os.path.isdir(os.path.join(dst, n)) else "") for n in names[:limit]]
    more = f" and {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(shown) + more


def _inside(path: str, parent: str) -> bool:
    path, parent = os.path.realpath(path), os.path.realpath(parent)
    return path == parent or path.startswith(parent.rstrip(os.sep) + os.sep)


def check_path(dst: str, src: str | None = None) -> None:
    """Raises UserError when `dst` cannot be a conversion's output directory at all."""

    if fileio.is_remote(dst):
        raise UserError(f"--dst {dst}: conversions write local directories only")
    if os.path.exists(dst) and not os.path.isdir(dst):
        raise UserError(f"--dst {dst} is a file; give a directory (new or empty)")
    if src is not None and os.path.exists(dst) and os.path.realpath(src) == os.path.realpath(dst):
        raise UserError(f"--dst {dst} is the source; write the conversion to another directory")


def prepare(dst: str, kind: Kind, *, overwrite: bool = False, src: str | None = None) -> list[str]:
    """Checks (and with `overwrite` clears) a conversion's destination directory.

    Args:
      dst: the directory the conversion writes (created if missing).
      kind: "hf" (an HF model directory) or "orbax" (a MODEL_DIR of this project).
      overwrite: remove the files of this kind first instead of refusing a non-empty `dst`.
      src: the conversion's source, which is never removed.

    Returns:
      The names removed from `dst` (directories end with "/").

    Raises:
      UserError: `dst` is a file, the source itself, or not empty without `overwrite`; or
        `overwrite` would remove the source.
    """
    check_path(dst, src)
    os.makedirs(dst, exist_ok=True)
    entries = sorted(set(os.listdir(dst)) - _ignored())
    if not entries:
        return []
    patterns = HF_PATTERNS if kind == "hf" else _orbax_patterns()
    shadowed = sorted(
        {n for n in os.listdir(dst) if any(fnmatch.fnmatchcase(n, p) for p in patterns)}
    )
    what = (
        "the old weights, index, config and tokenizer files"
        if kind == "hf"
        else "the old checkpoints and run files (checkpoints/, best/, config.gin, metrics, ...)"
    )
    if not overwrite:
        risk = (
            "the new files would sit beside the old ones and transformers may load the old weights"
            if kind == "hf"
            else "the converted step-0 checkpoint would sit under the old steps and every "
            "command would keep using the newest one"
        )
        raise UserError(
            f"--dst {dst} is not empty (it holds {_listing(dst, entries)}): {risk}. Choose a new "
            f"or empty --dst, or pass --overwrite to remove {what} first (other files stay)"
        )
    if src is not None:
        for name in shadowed:
            if _inside(src, os.path.join(dst, name)):
                raise UserError(
                    f"--overwrite would remove {os.path.join(dst, name)}, which holds the source "
                    f"{src}; convert into another directory"
                )
    removed = []
    for name in shadowed:
        path = os.path.join(dst, name)
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path)
            removed.append(name + "/")
        else:
            os.remove(path)
            removed.append(name)
    return removed
