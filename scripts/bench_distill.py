"""Distilling the quickstart's Switch model into its dense twin: the teacher-dense gap and the
share of it the student keeps (arXiv 2101.03961 sec. 4.2, Table 6), in miniature.

    PYTHONPATH=. python scripts/bench_distill.py --out=/tmp/distill_bench
    PYTHONPATH=. python scripts/bench_distill.py --out=/tmp/d --steps=200 --seeds=2 --reuse

Every run is `python -m switch_t5.train` on configs/experiments/quickstart.gin (the teacher, and
the dense baseline with NUM_EXPERTS=0) or configs/experiments/distill_quickstart.gin (the
students), on the embedded corpus, one process after another on this machine's CPU:

- teacher: the 8-expert quickstart model (--teacher_experts), trained --teacher_steps;
- dense: its dense twin trained alone, --steps;
- student: the dense twin trained --steps from teacher seed i (its non-expert weights, the
  sparse layers' MLP per student_mlp_init), for each DISTILLATION_ALPHA in --alphas and each
  student_mlp_init, seed i.

Quality is the eval cross-entropy only (`cross_entropy` of the last eval record in
metrics.jsonl: the token CE without z-loss or router losses), over the same --eval_steps
validation batches for every run. The teacher-dense gap is the mean over seeds with its spread
sigma = sqrt(var_teacher / n + var_dense / n) (sample variances over the seeds); only where the
gap exceeds 3 sigma is the paper's "percent of quality gain preserved" printed:
100 * (dense CE - student CE) / (dense CE - teacher CE), student and dense at the same steps.

--reuse skips a run whose MODEL_DIR already holds its final eval. Results: --out/distill.json.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QUICKSTART = "configs/experiments/quickstart.gin"
DISTILL = "configs/experiments/distill_quickstart.gin"
INITS = ("random", "expert_0", "mean")


def final_eval(model_dir: str, steps: int) -> float | None:
    """The eval cross-entropy at `steps` in a run's metrics.jsonl (None: not there)."""
    path = os.path.join(model_dir, "metrics.jsonl")
    if not os.path.exists(path):
        return None
    with open(path) as f:
        records = [json.loads(line) for line in f]
    evals = [r for r in records if r["split"] == "eval" and r["step"] == steps]
    return float(evals[-1]["cross_entropy"]) if evals else None


def train(model_dir: str, gin_file: str, steps: int, seed: int, args, *extra: str) -> float:
    """Runs one training to `steps` (evaluated once, at the end) and returns its eval CE."""
    if args.reuse:
        done = final_eval(model_dir, steps)
        if done is not None:
            return done
    command = [
        sys.executable,
        "-m",
        "switch_t5.train",
        f"--gin_file={gin_file}",
        f"--gin.MODEL_DIR='{model_dir}'",
        f"--gin.TRAIN_STEPS={steps}",
        f"--gin.RANDOM_SEED={seed}",
        f"--gin.EVAL_PERIOD={steps}",
        f"--gin.CHECKPOINT_PERIOD={steps}",
        f"--gin.LOG_EVERY={max(steps // 4, 1)}",
        f"--gin.train.eval_steps={args.eval_steps}",
        "--gin.train.num_samples=0",
        "--gin.train.make_plots=False",
        "--gin.train.progress='none'",
        *extra,
    ]
    t0 = time.perf_counter()
    subprocess.run(command, cwd=REPO, check=True, stdout=subprocess.DEVNULL)
    ce = final_eval(model_dir, steps)
    seconds = time.perf_counter() - t0
    print(f"  {os.path.basename(model_dir)}: eval CE {ce:.4f} ({seconds:.0f} s)", flush=True)
    return ce


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for one value)."""
    m = sum(values) / len(values)
    if len(values) < 2:
        return m, 0.0
    return m, math.sqrt(sum((v - m) ** 2 for v in values) / (len(values) - 1))


def run_all(args) -> dict:
    out, seeds = args.out, range(args.seeds)
    teacher_dirs = [os.path.join(out, f"teacher_s{s}") for s in seeds]
    ce = {"teacher": [], "dense": [], "student": {}}
    print(f"teacher: {args.teacher_experts} experts, {args.teacher_steps} steps")
    for s, d in zip(seeds, teacher_dirs):
        experts = f"--gin.NUM_EXPERTS={args.teacher_experts}"
        ce["teacher"].append(train(d, QUICKSTART, args.teacher_steps, s, args, experts))
    print(f"dense: {args.steps} steps")
    for s in seeds:
        d = os.path.join(out, f"dense_s{s}")
        ce["dense"].append(train(d, QUICKSTART, args.steps, s, args, "--gin.NUM_EXPERTS=0"))
    print(f"students: {args.steps} steps")
    for alpha, init in itertools.product(args.alphas, args.inits):
        key = f"alpha={alpha} init={init}"
        ce["student"][key] = []
        for s, teacher in zip(seeds, teacher_dirs):
            d = os.path.join(out, f"student_a{alpha}_{init}_s{s}")
            flags = (
                f"--gin.TEACHER_CHECKPOINT_PATH='{teacher}'",
                f"--gin.DISTILLATION_ALPHA={alpha}",
                f"--gin.train.student_mlp_init='{init}'",
            )
            ce["student"][key].append(train(d, DISTILL, args.steps, s, args, *flags))
    return ce


def table(ce: dict) -> list[str]:
    """The printed report: teacher-dense gap with its spread, then one row per student."""
    n = len(ce["dense"])
    (t, t_sd), (d, d_sd) = mean_std(ce["teacher"]), mean_std(ce["dense"])
    gap = d - t
    sigma = math.sqrt(t_sd**2 / n + d_sd**2 / n)
    real = gap > 3 * sigma and gap > 0
    lines = [
        f"teacher eval CE {t:.4f} (sd {t_sd:.4f}), dense {d:.4f} (sd {d_sd:.4f}), {n} seeds",
        f"teacher-dense gap {gap:.4f} +- {sigma:.4f} (1 sigma): "
        + ("over 3 sigma" if real else "NOT over 3 sigma: no preserved-gain figures"),
        f"{'student':<28} {'eval CE':>9} {'sd':>7} {'gain preserved':>15}",
    ]
    for key, values in ce["student"].items():
        m, sd = mean_std(values)
        kept = f"{100 * (d - m) / gap:14.0f}%" if real else f"{'-':>15}"
        lines.append(f"{key:<28} {m:9.4f} {sd:7.4f} {kept}")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="/tmp/switch_t5_bench_distill")
    parser.add_argument("--steps", type=int, default=300, help="dense and student steps")
    parser.add_argument("--teacher_steps", type=int, default=600)
    parser.add_argument("--teacher_experts", type=int, default=8)
    parser.add_argument("--seeds", type=int, default=2)
    # The paper's alpha first: a run cut short still has it for every initialisation.
    parser.add_argument("--alphas", type=float, nargs="+", default=[0.25, 0.0, 0.5])
    parser.add_argument("--inits", nargs="+", choices=INITS, default=list(INITS))
    parser.add_argument("--eval_steps", type=int, default=16)
    parser.add_argument("--reuse", action="store_true", help="keep finished runs under --out")
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)
    ce = run_all(args)
    with open(os.path.join(args.out, "distill.json"), "w") as f:
        json.dump({"settings": vars(args), "eval_cross_entropy": ce}, f, indent=1)
    print()
    for line in table(ce):
        print(line)


if __name__ == "__main__":
    main()
