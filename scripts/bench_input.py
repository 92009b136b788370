"""Input-pipeline throughput: packed span-corruption tokens per second.

    python scripts/bench_input.py [--task=embedded_span_corruption] \\
        [--feature_lengths=inputs:512,targets:114] [--batch_size=32] [--steps=50] \\
        [--gin.TEXT_FILES=...]

Prints one JSON line: encoder/decoder slots and real (non-padding) tokens per second over
`--steps` batches after `--warmup` batches (which include filling the shuffle buffer), plus the
time to the first batch and to save/restore the iterator state. The training side divides its
own tokens-per-step rate by this to report how much of a train step the input pipeline could
feed. Not a test: nothing is asserted.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--task", default="embedded_span_corruption")
    parser.add_argument("--split", default="train")
    parser.add_argument("--feature_lengths", default="inputs:512,targets:114")
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)


def main(argv: list[str]) -> None:
    from switch_t5 import data_gin, gin_utils
    from switch_t5.data import pipeline, show

    flags = gin_utils.parse_flags(argv, _add_arguments)
    gin_utils.parse_gin(flags.gin_files, flags.gin_bindings)
    args = flags.rest
    lengths = show.parse_feature_lengths(args.feature_lengths)
    t0 = time.perf_counter()
    data_gin.register_tasks(args.task)
    t_register = time.perf_counter() - t0
    p = pipeline.InputPipeline(
        args.task, args.split, lengths, args.batch_size, seed=args.seed, host_index=0, num_hosts=1
    )
    t0 = time.perf_counter()
    next(p)
    t_first = time.perf_counter() - t0
    for _ in range(args.warmup - 1):
        next(p)
    real_enc = real_dec = 0
    t0 = time.perf_counter()
    for _ in range(args.steps):
        b = next(p)
        real_enc += int((b["encoder_input_tokens"] != 0).sum())
        real_dec += int((b["decoder_target_tokens"] != 0).sum())
    elapsed = time.perf_counter() - t0
    t0 = time.perf_counter()
    state = json.dumps(p.get_state())
    t_save = time.perf_counter() - t0
    t0 = time.perf_counter()
    p.set_state(json.loads(state))
    next(p)
    t_restore = time.perf_counter() - t0
    slots = args.steps * args.batch_size * (lengths["inputs"] + lengths["targets"])
    print(
        json.dumps(
            {
                "task": args.task,
                "feature_lengths": lengths,
                "batch_size": args.batch_size,
                "steps": args.steps,
                "register_s": round(t_register, 2),
                "first_batch_s": round(t_first, 2),
                "batches_per_s": round(args.steps / elapsed, 2),
                "slot_tokens_per_s": round(slots / elapsed),
                "real_tokens_per_s": round((real_enc + real_dec) / elapsed),
                "encoder_fill": round(
                    real_enc / (args.steps * args.batch_size * lengths["inputs"]), 4
                ),
                "decoder_fill": round(
                    real_dec / (args.steps * args.batch_size * lengths["targets"]), 4
                ),
                "state_bytes": len(state),
                "state_save_s": round(t_save, 2),
                "state_restore_and_next_s": round(t_restore, 2),
            }
        )
    )


if __name__ == "__main__":
    from switch_t5 import gin_utils

    gin_utils.run_console_main(main)
