"""What the optional per-checkpoint SHA-256 checksums cost: save + commit with and without them,
and the verification on restore, measured side by side in one run.

    python scripts/bench_checkpoint_checksums.py --mib 256 --repeats 3

The state is float32 arrays totalling --mib MiB on one device, written to a local temporary
directory (or --dir). Checksums re-read every file of a committed step once (SHA-256 at roughly
disk/page-cache read speed), so their cost grows with the checkpoint size, not the model's FLOPs.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time

import jax
import jax.numpy as jnp

from switch_t5 import checkpoints


def _state(mib: int) -> dict:
    n = mib * (1 << 20) // 4 // 8
    keys = jax.random.split(jax.random.key(0), 8)
    return {f"w{i}": jax.random.normal(k, (n,), jnp.float32) for i, k in enumerate(keys)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mib", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dir", default=None)
    args = parser.parse_args()
    state = _state(args.mib)
    abstract = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state
    )
    meta = {"model_config": {}, "vocabulary": {}}
    root = args.dir or tempfile.mkdtemp(prefix="bench_checksums_")
    rows = []
    for sums in (False, True):
        d = os.path.join(root, f"checksums_{sums}")
        shutil.rmtree(d, ignore_errors=True)
        ckpt = checkpoints.Checkpointer(d, max_to_keep=2, checksums=sums)
        save_s = []
        for step in range(1, args.repeats + 1):
            t = time.perf_counter()
            ckpt.save(step, state, {}, meta)
            ckpt.wait()
            save_s.append(time.perf_counter() - t)
        t = time.perf_counter()
        ckpt.write_checksums(args.repeats)  # the hashing alone, once more
        hash_s = time.perf_counter() - t
        t = time.perf_counter()
        ckpt.restore(abstract, args.repeats, expected_meta=meta)
        restore_s = time.perf_counter() - t
        ckpt.close()
        rows.append((sums, min(save_s), restore_s, hash_s))
        shutil.rmtree(d, ignore_errors=True)
    base_save, base_restore = rows[0][1], rows[0][2]
    print(f"state {args.mib} MiB, best of {args.repeats} saves (save + commit), one restore")
    print(f"hashing one checkpoint alone: {rows[1][3]:.2f} s ({args.mib / rows[1][3]:.0f} MiB/s)")
    print("checksums  save_s  restore_s  save_ratio  restore_ratio")
    for sums, save, restore, _ in rows:
        print(
            f"{'on' if sums else 'off':9}  {save:6.2f}  {restore:9.2f}  {save / base_save:10.2f}"
            f"  {restore / base_restore:13.2f}"
        )


if __name__ == "__main__":
    main()
