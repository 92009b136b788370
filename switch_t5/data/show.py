"""Prints what the model sees: one JSON object per example of a task.

    python -m switch_t5.data.show --task=embedded_span_corruption --split=train \\
        --num_examples=3 --feature_lengths=inputs:512,targets:114 [--gin_file=F] [--gin.X=V]

Each line: {"index", "inputs": [ids], "targets": [ids], "inputs_text", "targets_text"} (text with
sentinels spelled `<extra_id_k>`, EOS and padding left out). The examples are the task's output
features (trimmed to the feature lengths, before packing), in the deterministic unshuffled order
for `--seed`. The task is registered from gin macros (`switch_t5.data_gin`), so `--task` may name
any task a run can name; `--gin.TEXT_FILES=...` etc. supply what it needs.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from switch_t5 import errors


def parse_feature_lengths(text: str) -> dict[str, int]:
    """`"inputs:512,targets:114"` -> {"inputs": 512, "targets": 114}."""
    lengths = {}
    for part in text.split(","):
        key, sep, value = part.partition(":")
        if not sep or not value.strip().isdigit():
            raise errors.UserError(
                f"--feature_lengths={text!r}: write NAME:LENGTH pairs, e.g. inputs:512,targets:114"
            )
        lengths[key.strip()] = int(value)
    return lengths


def _add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--task", default=None, help="task or mixture (default: the gin macro)")
    parser.add_argument("--split", default="train")
    parser.add_argument("--num_examples", type=int, default=5)
    parser.add_argument("--feature_lengths", default="inputs:512,targets:114")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--shuffle", action="store_true", help="shuffle as training does")


def show(
    task: str,
    split: str,
    num_examples: int,
    feature_lengths: dict[str, int],
    seed: int = 0,
    shuffle: bool = False,
) -> list[dict]:
    """The first `num_examples` examples of a registered task as JSON-ready dicts."""
    import seqio

    from switch_t5.data import vocab as vocab_lib

    provider = seqio.get_mixture_or_task(task)
    features = provider.output_features
    ds = provider.get_dataset(feature_lengths, split=split, shuffle=shuffle, seed=seed)
    rows = []
    for index, ex in enumerate(ds.take(num_examples).as_numpy_iterator()):
        row: dict = {"index": index}
        for key in ("inputs", "targets"):
            if key in ex:
                ids = [int(t) for t in ex[key]]
                row[key] = ids
                row[f"{key}_text"] = vocab_lib.decode_with_sentinels(features[key].vocabulary, ids)
        rows.append(row)
    return rows


def main(argv: Sequence[str] | None = None) -> None:
    from switch_t5 import data_gin, gin_utils

    flags = gin_utils.parse_flags(sys.argv[1:] if argv is None else argv, _add_arguments)
    gin_utils.parse_gin(flags.gin_files, flags.gin_bindings)
    args = flags.rest
    if args.num_examples < 1:
        raise errors.UserError("--num_examples must be at least 1")
    lengths = parse_feature_lengths(args.feature_lengths)
    data_gin.register_tasks(args.task)
    task = args.task or data_gin.macro("MIXTURE_OR_TASK_NAME")
    for row in show(task, args.split, args.num_examples, lengths, args.seed, args.shuffle):
        print(json.dumps(row, ensure_ascii=False), flush=True)


def console_main() -> None:
    """The `python -m switch_t5.data.show` command."""
    from switch_t5 import gin_utils

    gin_utils.run_console_main(main)


if __name__ == "__main__":
    console_main()
