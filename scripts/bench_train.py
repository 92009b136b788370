"""Train-step throughput of a Switch model over its dense twin, side by side, on one mesh.

    PYTHONPATH=. python scripts/bench_train.py --quick           # about two minutes on 2 CPUs
    PYTHONPATH=. python scripts/bench_train.py                   # a larger CPU-sized model
    PYTHONPATH=. python scripts/bench_train.py --preset=switch_base_8 --dtype=bfloat16 \\
        --batch=64 --peak_tflops=989 --input_bench=none          # one GPU (H100/H200 bf16 peak)

Both models are `switch_t5.network.EncoderDecoder` with the same d_model, d_ff, heads and layers;
the Switch model makes every other feed-forward layer an MoE layer (top-1, `dispatch="auto"`,
train capacity factor `--capacity_factor`), the dense twin has `num_experts=0`. Each runs the
real jitted train step (`switch_t5.trainer.make_train_step`: forward, backward with dropout and
router jitter, Adafactor update) on synthetic token batches (uniform random ids, no padding, no
TensorFlow), with the same mesh (`partitioning.make_mesh` over all devices) and batch sharding.
Steps alternate between the two models in interleaved rounds (`scripts/bench_utils.py`); the
ratio is the median over rounds of dense step time / Switch step time, i.e. Switch tokens/s over
dense tokens/s (wall clock; the CPU-time ratio is printed too).

MFU counts model FLOPs (`switch_t5.flops.train_flops_per_step`: 6 x the weights a token
multiplies, experts at k / E, plus the attention score and value matmuls); with `--peak_tflops`
(per device) it prints model FLOPs/s over the peak.

The input pipeline's rate comes from scripts/bench_input.py (TensorFlow/seqio) with the same
batch and feature lengths, run as a separate process (`--input_bench=run`), read from its JSON
line (`--input_bench=FILE`), or skipped (`--input_bench=none`, e.g. on a GPU machine without
TensorFlow); it is printed as input slot tokens/s over train-step slot tokens/s (above 1: the
pipeline keeps up).

The last line is `switch_over_dense_throughput: X.XX`. Prints times; asserts nothing.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import bench_utils

from switch_t5 import flops as flops_lib
from switch_t5 import moe, network, optim, partitioning, run_builder, trainer
from switch_t5.config import SwitchConfig

# name -> (SwitchConfig fields, batch, inputs length, targets length)
PRESETS: dict[str, tuple[dict[str, Any], int, int, int]] = {
    # FFN-heavy tiny model; an 8k vocabulary so the output projection does not hide the FFNs.
    "quick": (
        dict(
            vocab_size=8192,
            d_model=128,
            num_heads=4,
            head_dim=32,
            d_ff=512,
            num_encoder_layers=4,
            num_decoder_layers=4,
            num_experts=32,
            group_size=1024,
        ),
        8,
        256,
        64,
    ),
    "small": (
        dict(
            vocab_size=32128,
            d_model=256,
            num_heads=4,
            head_dim=64,
            d_ff=1024,
            num_encoder_layers=6,
            num_decoder_layers=6,
            num_experts=32,
            group_size=2048,
        ),
        16,
        512,
        114,
    ),
    # arXiv 2101.03961 Table 9 Switch-Base with 8 experts (T5-Base shape), T5 span lengths.
    "switch_base_8": (
        dict(
            vocab_size=32128,
            d_model=768,
            num_heads=12,
            head_dim=64,
            d_ff=3072,
            num_encoder_layers=12,
            num_decoder_layers=12,
            num_experts=8,
            group_size=8192,
        ),
        64,
        512,
        114,
    ),
}


def _batch(config: SwitchConfig, batch: int, inputs: int, targets: int, seed: int):
    rng = np.random.default_rng(seed)
    ids = lambda n: rng.integers(2, config.vocab_size, (batch, n), dtype=np.int32)
    targets_ids = ids(targets)
    decoder_inputs = np.concatenate([np.zeros((batch, 1), np.int32), targets_ids[:, :-1]], 1)
    # Every feature the input pipeline yields: one unpacked example per row.
    return {
        "encoder_input_tokens": ids(inputs),
        "encoder_segment_ids": np.ones((batch, inputs), np.int32),
        "encoder_positions": np.broadcast_to(np.arange(inputs, dtype=np.int32), (batch, inputs)),
        "decoder_input_tokens": decoder_inputs,
        "decoder_target_tokens": targets_ids,
        "decoder_loss_weights": np.ones((batch, targets), np.int32),
        "decoder_segment_ids": np.ones((batch, targets), np.int32),
        "decoder_positions": np.broadcast_to(np.arange(targets, dtype=np.int32), (batch, targets)),
    }


class Runner:
    """One model's jitted train step with its state; each call runs `steps` steps."""

    def __init__(self, config, mesh, batch_np, steps: int, seed: int = 0):
        # The train step `switch_t5.train` runs (`run_builder.build_run`).
        optimizer = optim.OptimizerConfig(lr_schedule="constant", base_learning_rate=0.01)
        run = run_builder.build_run(
            config,
            mesh,
            lambda specs: optim.make_optimizer(optimizer, logical_specs=specs),
            trainer.LossConfig(z_loss=0.0, router_z_loss_weight=0.0).for_model(config),
            seed=seed,
        )
        setup, shardings = run.setup, run.batch_shardings
        self.step_fn = run.train_step
        self.batch = {k: jax.device_put(v, shardings[k]) for k, v in batch_np.items()}
        self.state = setup.init_fn()
        self.params = sum(int(np.prod(p.shape)) for p in jax.tree.leaves(self.state.params))
        self.steps = steps
        self.metrics = None

    def __call__(self):
        for _ in range(self.steps):
            self.state, self.metrics = self.step_fn(self.state, self.batch)
        return self.metrics["loss"]


def _input_rate(args, batch: int, inputs: int, targets: int) -> dict[str, Any] | None:
    if args.input_bench == "none":
        return None
    if args.input_bench != "run":
        with open(args.input_bench) as f:
            return json.loads(f.read().strip().splitlines()[-1])
    cmd = [
        sys.executable,
        os.path.join(os.path.dirname(os.path.abspath(__file__)), "bench_input.py"),
        f"--feature_lengths=inputs:{inputs},targets:{targets}",
        f"--batch_size={batch}",
        f"--steps={args.input_steps}",
        "--warmup=3",
    ]
    env = dict(os.environ, PYTHONPATH=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    out = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if out.returncode:
        raise SystemExit(
            f"scripts/bench_input.py failed (exit {out.returncode}); run it alone to see why, or "
            f"pass --input_bench=none to skip the input ratio:\n{out.stderr[-2000:]}"
        )
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="= --preset=quick, fewer rounds")
    parser.add_argument("--preset", default=None, choices=sorted(PRESETS))
    parser.add_argument("--batch", type=int, default=None, help="examples per step")
    parser.add_argument("--num_experts", type=int, default=None)
    parser.add_argument("--capacity_factor", type=float, default=1.25)
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    parser.add_argument("--dispatch", default="auto")
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--steps_per_round", type=int, default=None)
    parser.add_argument("--peak_tflops", type=float, default=None, help="per-device peak")
    parser.add_argument(
        "--input_bench", default="run", help="'run', 'none' or a bench_input JSON file"
    )
    parser.add_argument("--input_steps", type=int, default=20)
    args = parser.parse_args()

    preset = args.preset or ("quick" if args.quick else "small")
    fields, batch, inputs, targets = PRESETS[preset]
    batch = args.batch or batch
    rounds = args.rounds or 5
    steps = args.steps_per_round or 1
    fields = dict(fields)
    if args.num_experts:
        fields["num_experts"] = args.num_experts
    switch = SwitchConfig(
        **fields,
        dtype=args.dtype,
        train_capacity_factor=args.capacity_factor,
        dispatch=args.dispatch,
    )
    dense = dataclasses.replace(switch, num_experts=0)
    mesh = partitioning.make_mesh(num_experts=switch.num_experts)
    batch_np = _batch(switch, batch, inputs, targets, seed=0)
    slots = batch * (inputs + targets)
    with jax.set_mesh(mesh), partitioning.axis_rules():
        impl = moe.resolve_dispatch(switch.dispatch)

    print(
        f"{bench_utils.backend_note()} mesh={dict(mesh.shape)} dtype={args.dtype} preset={preset}"
    )
    print(
        f"d_model={switch.d_model} d_ff={switch.d_ff} heads={switch.num_heads}x"
        f"{switch.head_dim} layers={switch.num_encoder_layers}+{switch.num_decoder_layers} "
        f"vocab={switch.vocab_size}; Switch: {switch.num_experts} experts in layers "
        f"enc{switch.sparse_layers('encoder')} dec{switch.sparse_layers('decoder')}, "
        f"train cf {switch.train_capacity_factor}, groups of {switch.group_size}, dispatch "
        f"{impl}"
    )
    print(
        f"batch {batch} x (inputs {inputs} + targets {targets}) = {slots} tokens/step; "
        f"{rounds} interleaved rounds of {steps} step(s) each, medians"
    )
    print(f"before: {bench_utils.load_note()}", flush=True)
    runners = {
        "switch": Runner(switch, mesh, batch_np, steps),
        "dense": Runner(dense, mesh, batch_np, steps),
    }
    timings = bench_utils.interleaved(runners, rounds)
    flops = {
        name: flops_lib.train_flops_per_step(
            network.init_abstract(config)["params"],
            config,
            batch,
            {"inputs": inputs, "targets": targets},
        )
        for name, config in (("switch", switch), ("dense", dense))
    }
    print(f"{'model':>7} {'params':>12} {'s/step':>8} {'tokens/s':>10} {'TFLOP/s':>8} {'MFU':>6}")
    for name, runner in runners.items():
        step_s = timings[name].wall_median / steps
        tflops = flops[name] / step_s / 1e12
        mfu = f"{tflops / (args.peak_tflops * jax.device_count()):.1%}" if args.peak_tflops else "-"
        print(
            f"{name:>7} {runner.params:>12,} {step_s:>8.3f} {slots / step_s:>10.0f} "
            f"{tflops:>8.3f} {mfu:>6}"
        )
    m = jax.device_get(runners["switch"].metrics)
    print(
        f"switch routing at the last step: fraction_dropped {float(m['fraction_dropped']):.3f}, "
        f"load_balancing_loss {float(m['load_balancing_loss']):.3f}"
    )
    wall_ratio = bench_utils.ratio(timings["dense"], timings["switch"], "wall")
    cpu_ratio = bench_utils.ratio(timings["dense"], timings["switch"], "cpu")
    print(f"switch/dense tokens/s: wall {wall_ratio:.2f}, CPU time {cpu_ratio:.2f}")
    print(f"after: {bench_utils.load_note()}", flush=True)

    rate = _input_rate(args, batch, inputs, targets)
    if rate is None:
        print("input pipeline: not measured (--input_bench=none)")
    else:
        train_rate = slots / (timings["switch"].wall_median / steps)
        print(
            f"input pipeline ({rate['task']}, batch {rate['batch_size']}, "
            f"{rate['feature_lengths']}): {rate['slot_tokens_per_s']:,} slot tokens/s = "
            f"{rate['slot_tokens_per_s'] / train_rate:.1f}x the Switch train step's "
            f"{train_rate:,.0f} (measured separately, same machine)"
        )
    print(f"switch_over_dense_throughput: {wall_ratio:.2f}")


if __name__ == "__main__":
    jnp.zeros(())  # initialise the backend before printing its name
    main()
