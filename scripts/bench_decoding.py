"""Decoding cost of beam search as a ratio to greedy, measured side by side in one run.

    PYTHONPATH=. python scripts/bench_decoding.py --batch 8 --inputs_length 32 --decode_length 16

The model has the sizes of configs/models/tiny.gin (random init, float32). EOS is disabled
(eos_id=-1) so that every method runs the full decode length: the ratio is the per-step cost of
k beams (k times the rows, plus the top-k and cache reordering) against one greedy row. Prints
wall-clock times; asserts nothing.
"""

from __future__ import annotations

import argparse
import functools
import time

import jax
import numpy as np

from switch_t5 import decoding, network
from switch_t5.config import SwitchConfig

# configs/models/tiny.gin, in float32 without dropout.
TINY = SwitchConfig(
    vocab_size=32128,
    d_model=128,
    num_heads=4,
    head_dim=24,
    d_ff=320,
    num_encoder_layers=2,
    num_decoder_layers=2,
    num_experts=4,
    moe_layer_interval=2,
    group_size=512,
    dropout_rate=0.0,
    dtype="float32",
)


def _time(fn, repeats: int) -> tuple[float, float]:
    """(first call incl. compilation, best of `repeats` later calls) in seconds."""
    start = time.perf_counter()
    jax.block_until_ready(fn())
    first = time.perf_counter() - start
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        best = min(best, time.perf_counter() - start)
    return first, best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--inputs_length", type=int, default=32)
    parser.add_argument("--decode_length", type=int, default=16)
    parser.add_argument("--num_beams", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    model = network.EncoderDecoder(TINY)
    params = network.init_variables(TINY, jax.random.key(0))["params"]
    rng = np.random.default_rng(0)
    tokens = rng.integers(2, TINY.vocab_size, (args.batch, args.inputs_length)).astype(np.int32)
    batch = {"encoder_input_tokens": tokens}
    common = dict(max_decode_length=args.decode_length, eos_id=-1)
    runs = {
        "greedy": dict(method="greedy"),
        f"beam{args.num_beams}": dict(method="beam", num_beams=args.num_beams, alpha=0.6),
    }
    results = {}
    for name, kwargs in runs.items():
        fn = jax.jit(functools.partial(decoding.decode_batch, model, **common, **kwargs))
        results[name] = _time(lambda fn=fn: fn(params, batch), args.repeats)

    print(
        f"backend={jax.default_backend()} batch={args.batch} inputs={args.inputs_length} "
        f"decode_length={args.decode_length}"
    )
    greedy = results["greedy"][1]
    for name, (first, best) in results.items():
        print(
            f"{name:>8}: {best * 1e3:8.1f} ms/batch (first call incl. compile {first:5.1f} s), "
            f"{best / greedy:5.2f}x greedy"
        )


if __name__ == "__main__":
    main()
