"""Forward+backward time of the MoE layer over a dense MLP of the same width, side by side.

    PYTHONPATH=. python scripts/bench_moe.py --quick      # about two minutes on 2 CPU cores
    PYTHONPATH=. python scripts/bench_moe.py              # more experts and capacity factors

Each row jits grad(sum(layer(x) * cotangent)) with respect to the params and the input, for the
MoE layer (`switch_t5.moe.MoeLayer`, one dispatch implementation) and for the dense
`switch_t5.layers.MlpBlock` with the same d_model, d_ff, dtype and precision, and prints the
ratio of their best wall-clock times. A capacity-based dispatch runs its experts on cf x tokens
slots, so its FLOP ratio to the dense MLP is at least cf ("floor"); dropless processes exactly
k x tokens rows (floor k), though on CPU `ragged_dot` lowers to a masked dense dot (about E
times the work). Prints times; asserts nothing. The last line, `best_moe_over_dense`, is the
fastest implementation at 32 experts, capacity factor 1.0 and 16k tokens.
"""

from __future__ import annotations

import argparse
import dataclasses
import time

import jax
import jax.numpy as jnp
from flax import linen as nn

from switch_t5 import layers, moe
from switch_t5.config import SwitchConfig


def _best_time(fn, repeats: int) -> float:
    """Best of `repeats` calls after one warm-up (compilation) call, in seconds."""
    jax.block_until_ready(fn())
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        best = min(best, time.perf_counter() - start)
    return best


def _fwd_bwd(module: nn.Module, x: jax.Array, cot: jax.Array):
    variables = jax.jit(module.init)(jax.random.key(0), x)
    params = nn.unbox(variables)["params"]

    def loss(p, x):
        return jnp.sum(module.apply({"params": p}, x).astype(jnp.float32) * cot)

    step = jax.jit(jax.grad(loss, argnums=(0, 1)))
    return lambda: step(params, x)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sweep, ~2 min on 2 cores")
    parser.add_argument("--tokens", type=int, default=16384, help="batch * length")
    parser.add_argument("--length", type=int, default=512)
    parser.add_argument("--d_model", type=int, default=None)
    parser.add_argument("--d_ff", type=int, default=None)
    parser.add_argument("--group_size", type=int, default=2048)
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    parser.add_argument("--repeats", type=int, default=None)
    args = parser.parse_args()

    if args.quick:
        d_model, d_ff, experts, factors, repeats = 128, 512, (8, 32), (1.0, 2.0), 2
    else:
        d_model, d_ff, experts, factors, repeats = 512, 2048, (8, 32, 128), (1.0, 1.25, 2.0), 3
    d_model = args.d_model or d_model
    d_ff = args.d_ff or d_ff
    repeats = args.repeats or repeats
    if args.tokens % args.length:
        raise SystemExit(f"--tokens={args.tokens} must be a multiple of --length={args.length}")
    batch = args.tokens // args.length
    base = SwitchConfig(
        d_model=d_model,
        d_ff=d_ff,
        dtype=args.dtype,
        dropout_rate=0.0,
        group_size=args.group_size,
        min_expert_capacity=4,
    )
    x = jax.random.normal(jax.random.key(1), (batch, args.length, d_model), args.dtype)
    cot = jax.random.normal(jax.random.key(2), x.shape, jnp.float32)

    dense_s = _best_time(_fwd_bwd(layers.MlpBlock(base), x, cot), repeats)
    # Forward+backward of two [tokens, d] x [d, f] matmuls: 3 x 2 x 2 x tokens x d x f FLOPs.
    dense_flops = 12.0 * args.tokens * d_model * d_ff
    print(
        f"backend={jax.default_backend()} devices={jax.device_count()} dtype={args.dtype} "
        f"tokens={args.tokens} (batch {batch} x length {args.length}) d_model={d_model} "
        f"d_ff={d_ff} group_size={args.group_size} activations={base.mlp_activations}"
    )
    print(
        f"dense MLP fwd+bwd: {dense_s * 1e3:.1f} ms, {dense_flops / dense_s / 1e9:.1f} GFLOP/s "
        f"(auto dispatch here = {moe.resolve_dispatch('auto')})"
    )
    print(f"{'experts':>7} {'cf':>5} {'impl':>9} {'ms':>9} {'moe/dense':>10} {'flop floor':>10}")
    best_32: float | None = None
    for num_experts in experts:
        runs = [(impl, cf) for cf in factors for impl in ("einsum", "scatter")]
        # On CPU dropless costs about E dense MLPs: --quick times it at the smallest E only.
        if not args.quick or num_experts == experts[0]:
            runs.append(("dropless", None))
        for impl, cf in runs:
            cfg = dataclasses.replace(
                base,
                num_experts=num_experts,
                dispatch=impl,
                eval_capacity_factor=cf if cf is not None else 1.0,
            )
            seconds = _best_time(_fwd_bwd(moe.MoeLayer(cfg), x, cot), repeats)
            ratio = seconds / dense_s
            floor = cf if cf is not None else 1.0
            cf_text = f"{cf:.2f}" if cf is not None else "-"
            print(
                f"{num_experts:>7} {cf_text:>5} {impl:>9} {seconds * 1e3:>9.1f} {ratio:>10.2f} "
                f"{floor:>10.2f}",
                flush=True,
            )
            if num_experts == 32 and cf == 1.0 and args.tokens == 16384:
                best_32 = ratio if best_32 is None else min(best_32, ratio)
    if best_32 is not None:
        print(f"best_moe_over_dense: {best_32:.2f}")


if __name__ == "__main__":
    main()
