"""Forward+backward time of the MoE layer over a dense MLP of the same width, side by side.

    PYTHONPATH=. python scripts/bench_moe.py --quick      # about three minutes on 2 CPU cores
    PYTHONPATH=. python scripts/bench_moe.py              # more experts and capacity factors
    PYTHONPATH=. python scripts/bench_moe.py --dtype=bfloat16 --d_model=768 --d_ff=3072  # GPU

Each row jits grad(sum(layer(x) * cotangent)) with respect to the params and the input, for the
MoE layer (`switch_t5.moe.MoeLayer`, one dispatch implementation) and for the dense
`switch_t5.layers.MlpBlock` with the same d_model, d_ff, dtype and precision. The rows run
interleaved with the dense MLP (`scripts/bench_utils.py`); a ratio is the median over rounds of
MoE time / dense time of the same round, in wall-clock seconds and in process CPU seconds (the
work done; on a CPU shared with other jobs it is far less noisy than wall time).

A capacity-based dispatch runs its experts on cf x tokens slots, so its FLOP ratio to the dense
MLP is at least cf ("floor"); what lies above the floor is routing and data movement. "dropless"
(block-sparse grouped matmul, `switch_t5.grouped_matmul`) processes k x tokens rows plus each
expert's padding to a multiple of the block size (floor about 1 + E x (block - 1) / 2 / tokens
on average, at most 1 + E x (block - 1) / tokens); one row per block size tried (impl
"dropless/B"). "ragged" is the same no-drop routing through `jax.lax.ragged_dot`, which on CPU
lowers to a masked dense dot (about E times the work). The "scaling" rows time the auto dispatch
at 1/4, 1/2 and all of the tokens with the same group size: cost grows linearly in tokens when
ms/token stays flat.

The last line, `best_moe_over_dense`, is the wall-clock ratio of the implementation that
`dispatch="auto"` picks on this backend (`moe.resolve_dispatch`), at 32 experts, capacity
factor 1.0 and 16k tokens, timed again alone against the dense MLP over 3x the rounds (the
"headline" line also gives its CPU-time ratio). `dropless_over_dense` is the CPU-time ratio of
"dropless" (default block size) to the dense MLP at 32 experts and 16k tokens, timed in its own
interleaved rounds together with the auto capacity dispatch (cf 1.0); the line gives the wall
ratio beside it, and `dropless_over_capacity` compares it with that dispatch (`dispatch="auto"`
would pick dropless on a platform where it is within 10%). Prints times; asserts nothing;
imports no TensorFlow.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys

import jax
import jax.numpy as jnp
from flax import linen as nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import bench_utils

from switch_t5 import layers, moe
from switch_t5.config import SwitchConfig


def _fwd_bwd(module: nn.Module, x: jax.Array, cot: jax.Array):
    variables = jax.jit(module.init)(jax.random.key(0), x)
    params = nn.unbox(variables)["params"]

    def loss(p, x):
        return jnp.sum(module.apply({"params": p}, x).astype(jnp.float32) * cot)

    step = jax.jit(jax.grad(loss, argnums=(0, 1)))
    return lambda: step(params, x)


def _inputs(tokens: int, length: int, d_model: int, dtype: str):
    batch = tokens // length
    x = jax.random.normal(jax.random.key(1), (batch, length, d_model), dtype)
    cot = jax.random.normal(jax.random.key(2), x.shape, jnp.float32)
    return x, cot


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sweep, ~2 min on 2 cores")
    parser.add_argument("--tokens", type=int, default=16384, help="batch * length")
    parser.add_argument("--length", type=int, default=512)
    parser.add_argument("--d_model", type=int, default=None)
    parser.add_argument("--d_ff", type=int, default=None)
    parser.add_argument("--group_size", type=int, default=2048)
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    parser.add_argument("--rounds", type=int, default=None, help="interleaved timing rounds")
    parser.add_argument(
        "--block_sizes",
        default="32,64,128",
        help="comma-separated dropless block sizes, one row each",
    )
    args = parser.parse_args()

    if args.quick:
        d_model, d_ff, experts, factors, rounds = 128, 512, (8, 32), (1.0, 1.25), 6
    else:
        d_model, d_ff, experts, factors, rounds = 512, 2048, (8, 32, 128), (1.0, 1.25, 2.0), 5
    d_model = args.d_model or d_model
    d_ff = args.d_ff or d_ff
    rounds = args.rounds or rounds
    if args.tokens % (4 * args.length):
        raise SystemExit(
            f"--tokens={args.tokens} must be a multiple of 4 x --length={args.length} "
            "(the scaling rows use a quarter of the tokens)"
        )
    auto = moe.resolve_dispatch("auto")
    block_sizes = [int(b) for b in args.block_sizes.split(",") if b.strip()]
    default_block = SwitchConfig.dropless_block_size
    if default_block not in block_sizes:
        block_sizes.append(default_block)
    base = SwitchConfig(
        d_model=d_model,
        d_ff=d_ff,
        dtype=args.dtype,
        dropout_rate=0.0,
        group_size=args.group_size,
        min_expert_capacity=4,
    )
    x, cot = _inputs(args.tokens, args.length, d_model, args.dtype)

    # name -> (callable, experts, cf, impl, flop floor, slow)
    rows: dict[str, tuple] = {}
    for num_experts in experts:
        for cf in factors:
            for impl in ("einsum", "scatter"):
                cfg = dataclasses.replace(
                    base, num_experts=num_experts, dispatch=impl, eval_capacity_factor=cf
                )
                # On CPU the masked einsum costs O(tokens x group x cf): a few rounds suffice.
                slow = impl == "einsum" and jax.default_backend() == "cpu"
                if args.quick and slow and (cf != factors[0] or num_experts != 32):
                    continue
                fn = _fwd_bwd(moe.MoeLayer(cfg), x, cot)
                rows[f"{num_experts}/{cf}/{impl}"] = (fn, num_experts, cf, impl, cf, slow)
        for block in block_sizes:
            if args.quick and num_experts != 32 and block != default_block:
                continue
            cfg = dataclasses.replace(
                base, num_experts=num_experts, dispatch="dropless", dropless_block_size=block
            )
            fn = _fwd_bwd(moe.MoeLayer(cfg), x, cot)
            # The static buffer's bound (the loop skips unused blocks on CPU).
            floor = 1.0 + num_experts * (min(block, args.tokens) - 1) / args.tokens
            name = f"{num_experts}/-/dropless/{block}"
            rows[name] = (fn, num_experts, None, f"dropless/{block}", floor, False)
        # On CPU ragged_dot costs about E dense MLPs: --quick times it at the smallest E only.
        if not args.quick or num_experts == experts[0]:
            cfg = dataclasses.replace(base, num_experts=num_experts, dispatch="ragged")
            fn = _fwd_bwd(moe.MoeLayer(cfg), x, cot)
            slow = jax.default_backend() == "cpu"
            rows[f"{num_experts}/-/ragged"] = (fn, num_experts, None, "ragged", 1.0, slow)

    dense = _fwd_bwd(layers.MlpBlock(base), x, cot)
    fast = {"dense": dense, **{n: row[0] for n, row in rows.items() if not row[-1]}}
    slow = {"dense": dense, **{n: row[0] for n, row in rows.items() if row[-1]}}
    print(f"{bench_utils.backend_note()} dtype={args.dtype} auto dispatch here = {auto}")
    print(
        f"tokens={args.tokens} (batch {args.tokens // args.length} x length {args.length}) "
        f"d_model={d_model} d_ff={d_ff} group_size={args.group_size} "
        f"activations={base.mlp_activations}; {rounds} interleaved rounds, medians"
    )
    print(f"before: {bench_utils.load_note()}", flush=True)
    timings = bench_utils.interleaved(fast, rounds)
    dense_t = timings["dense"]
    # Slow rows (marked *) run in their own interleaved rounds, ratios to the dense MLP's times
    # of those rounds.
    slow_rounds = 1 if args.quick else max(1, rounds // 3)
    slow_t = bench_utils.interleaved(slow, slow_rounds) if len(slow) > 1 else {}
    # Forward+backward of two [tokens, d] x [d, f] matmuls: 3 x 2 x 2 x tokens x d x f FLOPs.
    dense_flops = 12.0 * args.tokens * d_model * d_ff
    print(
        f"dense MLP fwd+bwd: {dense_t.wall_median * 1e3:.1f} ms wall, "
        f"{dense_t.cpu_median * 1e3:.1f} ms CPU, "
        f"{dense_flops / dense_t.wall_median / 1e9:.1f} GFLOP/s"
    )
    header = (
        f"{'experts':>7} {'cf':>5} {'impl':>12} {'ms':>8} {'moe/dense':>10} {'cpu ratio':>10} "
        f"{'flop floor':>10}"
    )
    print(header)
    best: float | None = None
    for name, (_, num_experts, cf, impl, floor, is_slow) in rows.items():
        t, ref = (slow_t[name], slow_t["dense"]) if is_slow else (timings[name], dense_t)
        wall_ratio = bench_utils.ratio(t, ref, "wall")
        cpu_ratio = bench_utils.ratio(t, ref, "cpu")
        cf_text = f"{cf:.2f}" if cf is not None else "-"
        print(
            f"{num_experts:>7} {cf_text:>5} {impl + ('*' if is_slow else ''):>12} "
            f"{t.wall_median * 1e3:>8.1f} {wall_ratio:>10.2f} {cpu_ratio:>10.2f} {floor:>10.2f}"
        )
        if num_experts == 32 and cf == 1.0 and impl == auto and args.tokens == 16384:
            best = name
    if slow_t:
        print(f"* timed in {slow_rounds} separate interleaved round(s) with the dense MLP")

    # Linear in tokens: the same layer (auto dispatch, 32 experts or the largest swept, cf 1.0)
    # at a quarter, half and all of the tokens, in one interleaved run.
    scale_experts = 32 if 32 in experts else experts[-1]
    cfg = dataclasses.replace(
        base, num_experts=scale_experts, dispatch=auto, eval_capacity_factor=factors[0]
    )
    sizes = (args.tokens // 4, args.tokens // 2, args.tokens)
    scale_fns = {}
    for n in sizes:
        xs, cs = _inputs(n, args.length, d_model, args.dtype)
        scale_fns[n] = _fwd_bwd(moe.MoeLayer(cfg), xs, cs)
    scale = bench_utils.interleaved(scale_fns, rounds)
    per_token = {n: scale[n].cpu_median / n for n in sizes}
    print(
        f"scaling ({auto}, {scale_experts} experts, cf {factors[0]}, groups of "
        f"{args.group_size}): "
        + ", ".join(
            f"{n} tokens {scale[n].wall_median * 1e3:.1f} ms "
            f"({per_token[n] / per_token[sizes[-1]]:.2f}x CPU/token of {sizes[-1]})"
            for n in sizes
        )
    )
    if best is not None:
        # The headline pair again, alone and with more rounds: wall time is what users see, and
        # on a shared CPU it needs many rounds for a stable median.
        pair = bench_utils.interleaved({"dense": dense, best: rows[best][0]}, 3 * rounds)
        wall_ratio = bench_utils.ratio(pair[best], pair["dense"], "wall")
        cpu_ratio = bench_utils.ratio(pair[best], pair["dense"], "cpu")
        print(
            f"headline ({auto}, 32 experts, cf 1.0, {args.tokens} tokens, {3 * rounds} rounds): "
            f"wall {wall_ratio:.2f}, CPU {cpu_ratio:.2f}"
        )
    dropless = f"32/-/dropless/{default_block}"
    if dropless in rows and args.tokens == 16384:
        # Dropless against the dense MLP and the capacity dispatch auto picks, in one set of
        # interleaved rounds: the figures behind `resolve_dispatch`'s choice.
        capacity = f"32/{factors[0]}/{auto if auto in ('einsum', 'scatter') else 'scatter'}"
        trio = {"dense": dense, dropless: rows[dropless][0]}
        if capacity in rows:
            trio[capacity] = rows[capacity][0]
        t3 = bench_utils.interleaved(trio, 3 * rounds)
        dl_cpu = bench_utils.ratio(t3[dropless], t3["dense"], "cpu")
        dl_wall = bench_utils.ratio(t3[dropless], t3["dense"], "wall")
        print(
            f"dropless (block {default_block}, 32 experts, {args.tokens} tokens, "
            f"{3 * rounds} rounds) over dense: CPU {dl_cpu:.2f}, wall {dl_wall:.2f}"
        )
        if capacity in t3:
            cap_cpu = bench_utils.ratio(t3[dropless], t3[capacity], "cpu")
            cap_wall = bench_utils.ratio(t3[dropless], t3[capacity], "wall")
            print(f"dropless_over_capacity: {cap_cpu:.2f} (wall {cap_wall:.2f}; vs {capacity})")
    print(f"after: {bench_utils.load_note()}")
    if best is not None:
        print(f"best_moe_over_dense: {wall_ratio:.2f}")
    if dropless in rows and args.tokens == 16384:
        print(f"dropless_over_dense: {dl_cpu:.2f} (wall {dl_wall:.2f})")


if __name__ == "__main__":
    main()
