"""Checkpoint conversion entry point.

    python -m switch_t5.convert hf-to-orbax --src=HF_DIR --dst=MODEL_DIR
    python -m switch_t5.convert t5x-to-orbax --src=T5X_DIR --dst=MODEL_DIR
    python -m switch_t5.convert orbax-to-hf --src=MODEL_DIR --dst=HF_DIR
    python -m switch_t5.convert upcycle --src=DENSE_MODEL_DIR --dst=MODEL_DIR \\
        --gin_file=configs/models/switch_base_8.gin

Imports write a checkpoint of this project (`MODEL_DIR/checkpoints/0`) plus `MODEL_DIR/model.gin`
(pass it as `--gin_file` to train, fine-tune or infer); hf-to-orbax also records the HF folder's
`spiece.model` as the run's vocabulary (copied to `MODEL_DIR/spiece.model`). orbax-to-hf writes
the weights, config.json and the tokenizer (spiece.model, tokenizer_config.json, tokenizer.json)
of the vocabulary the checkpoint records (`--vocabulary_path` to give it, `--no_tokenizer` to
export the weights alone). Every conversion streams tensors in chunks under `--memory_budget`
(default 1GiB). `--set FIELD=VALUE` overrides SwitchConfig fields of an import (e.g.
`--set eval_capacity_factor=4.0`).

`--dst` must be a new or empty directory: old weights or checkpoints beside the new ones would be
loaded instead of them. `--overwrite` removes them first (HF: weights, index, config and tokenizer
files; MODEL_DIR: checkpoints/, best/, config.gin, model.gin, metrics and the other run files);
other files stay.
"""

from __future__ import annotations

import argparse
import ast
import re
from collections.abc import Sequence
from typing import Any

from switch_t5 import errors, gin_utils
from switch_t5.interop import streaming

_UNITS = {"": 1, "b": 1, "kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30, "tib": 1 << 40}


def parse_bytes(text: str) -> int:
    """'1GiB', '64MiB', '4096' -> bytes."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", text)
    if not m or m.group(2).lower() not in _UNITS:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a size; use e.g. 1GiB, 512MiB or a number of bytes"
        )
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


def _overrides(items: Sequence[str]) -> dict:
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise errors.UserError(
                f"--set {item!r}: use FIELD=VALUE (e.g. eval_capacity_factor=4.0)"
            )
        try:
            out[key.strip()] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            out[key.strip()] = value
    return out


def peak_rss_bytes() -> int | None:
    """VmHWM of this process (Linux), or None."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m switch_t5.convert",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True)
    for name in ("hf-to-orbax", "t5x-to-orbax", "orbax-to-hf", "upcycle"):
        p = sub.add_parser(name)
        gin_utils.add_debug_flag(p)
        p.add_argument("--src", required=True)
        p.add_argument("--dst", required=True)
        p.add_argument(
            "--overwrite",
            action="store_true",
            help="convert into a non-empty --dst, removing what the conversion replaces first",
        )
        p.add_argument(
            "--memory_budget",
            type=parse_bytes,
            default=streaming.DEFAULT_BUDGET_BYTES,
            help="peak memory of the streamed copy, e.g. 1GiB (default)",
        )
        if name != "orbax-to-hf":
            p.add_argument("--dtype", default="bfloat16", help="compute dtype of the model config")
        if name in ("hf-to-orbax", "t5x-to-orbax"):
            p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE")
        if name in ("t5x-to-orbax", "orbax-to-hf", "upcycle"):
            p.add_argument("--step", type=int, default=None, help="source step (default latest)")
        if name == "orbax-to-hf":
            p.add_argument("--vocab_size", type=int, default=None)
            p.add_argument(
                "--expert_capacity",
                type=int,
                default=None,
                help="HF's fixed per-sequence expert capacity (default: the model's own "
                "expert_capacity, from an HF import, else 64)",
            )
            p.add_argument("--weights_dtype", default="float32")
            p.add_argument("--max_shard_size", type=parse_bytes, default=None)
            p.add_argument(
                "--vocabulary_path",
                default=None,
                help="SentencePiece model to export as the tokenizer (default: the checkpoint's)",
            )
            p.add_argument(
                "--no_tokenizer",
                action="store_true",
                help="export the weights without a tokenizer",
            )
        if name == "upcycle":
            p.add_argument("--gin_file", action="append", default=[], required=True)
            p.add_argument(
                "--gin",
                action="append",
                default=[],
                dest="gin_bindings",
                metavar="BINDING",
                help="e.g. --gin=SwitchConfig.num_experts=8",
            )
            p.add_argument("--seed", type=int, default=0)
    return parser


def main(argv: Sequence[str] | None = None) -> streaming.RunStats:
    args = build_parser().parse_args(argv)
    from switch_t5 import interop
    from switch_t5.interop import t5x, upcycle

    # Every conversion streams under --memory_budget; all but hf-to-orbax read a source step.
    common: dict[str, Any] = {"budget_bytes": args.memory_budget, "overwrite": args.overwrite}
    if args.command != "hf-to-orbax":
        common["step"] = args.step
    if args.command in ("hf-to-orbax", "t5x-to-orbax"):
        importer = interop.hf_to_orbax if args.command == "hf-to-orbax" else t5x.t5x_to_orbax
        stats = importer(args.src, args.dst, dtype=args.dtype, **common, **_overrides(args.set))
    elif args.command == "orbax-to-hf":
        stats = interop.orbax_to_hf(
            args.src,
            args.dst,
            vocab_size=args.vocab_size,
            expert_capacity=args.expert_capacity,
            dtype=args.weights_dtype,
            max_shard_bytes=args.max_shard_size,
            tokenizer=not args.no_tokenizer,
            vocabulary_path=args.vocabulary_path,
            **common,
        )
    else:
        gin_utils.parse_gin(args.gin_file, [b.removeprefix("--gin.") for b in args.gin_bindings])
        config = gin_utils.make_model_config()
        if config.dtype != args.dtype:
            import dataclasses

            config = dataclasses.replace(config, dtype=args.dtype)
        stats = upcycle.upcycle(args.src, args.dst, config, seed=args.seed, **common)
    peak = peak_rss_bytes()
    print(
        f"{args.command}: {stats.tensors} tensors, {stats.bytes_written / 2**20:.1f} MiB written "
        f"to {args.dst}; largest chunk {stats.max_chunk_bytes / 2**20:.1f} MiB (chunk budget "
        f"{stats.chunk_budget_bytes / 2**20:.1f} MiB)"
        + (f", peak RSS {peak / 2**20:.0f} MiB" if peak else "")
    )
    for note in stats.notes:
        print(f"  {note}")
    return stats


def console_main() -> None:
    """The `python -m switch_t5.convert` command."""
    # The converters name the fix in their ValueError / KeyError / FileExistsError messages.
    gin_utils.run_console_main(main, (ValueError, FileExistsError, KeyError))


if __name__ == "__main__":
    console_main()
