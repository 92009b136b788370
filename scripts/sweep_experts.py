"""Expert-count sweep: one experiment over several NUM_EXPERTS values, plus the dense baseline.

    python scripts/sweep_experts.py --gin_file=configs/experiments/quickstart.gin \\
        --experts=1,2,4,8 --out=/tmp/sweep [--gin.TRAIN_STEPS=200] [--dry_run]

Each value runs `python -m switch_t5.train` with `--gin.NUM_EXPERTS=N` and its own MODEL_DIR
(`OUT/experts_N`); the FLOP-matched dense run (`OUT/dense`, NUM_EXPERTS=0: top-1 routing makes a
Switch layer cost one expert's FLOPs, so the dense model with the same d_ff matches every expert
count, arXiv 2101.03961 sec. 3) runs beside them. Here the runs go one after another; on a
cluster print the commands with --dry_run and submit one job per line. Afterwards, or with
--report_only, it reads every MODEL_DIR/metrics.jsonl and writes OUT/comparison.md (a table) and
OUT/eval_loss.png (eval cross-entropy vs step, one line per expert count).

Runs are compared by eval cross-entropy (`trainer.CROSS_ENTROPY`), not by `loss`: `loss` adds
the Switch runs' load-balancing loss (0.01 x about 1) and the dense run has none, so it would
favour the dense baseline by an amount that has nothing to do with how well the models predict.
The gin files and overrides are checked once before the first run (a misspelt macro stops the
sweep, not each run).
"""

from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def commands(gin_files, bindings, experts, out, dense=True) -> list[tuple[str, list[str]]]:
    runs = [("dense", 0)] if dense else []
    runs += [(f"experts_{n}", n) for n in experts]
    out_cmds = []
    for name, n in runs:
        cmd = [sys.executable, "-m", "switch_t5.train"]
        cmd += [f"--gin_file={f}" for f in gin_files]
        cmd += [f"--gin.{b}" for b in bindings]
        cmd += [f"--gin.NUM_EXPERTS={n}", f"--gin.MODEL_DIR='{os.path.join(out, name)}'"]
        out_cmds.append((name, cmd))
    return out_cmds


def report(out: str, names: list[str]) -> str:
    import matplotlib

    from switch_t5 import metrics_logging
    from switch_t5.trainer import CROSS_ENTROPY

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [
        f"Eval cross-entropy (`{CROSS_ENTROPY}` in metrics.jsonl): the token loss without the "
        "z-loss and the Switch runs' load-balancing loss, so dense and Switch runs compare like "
        "for like.",
        "",
        "| run | steps | first eval cross-entropy | last eval cross-entropy | train tokens/s |",
        "|---|---|---|---|---|",
    ]
    fig, ax = plt.subplots(figsize=(7, 4))
    for name in names:
        recs = metrics_logging.read_metrics(os.path.join(out, name))
        evals = [
            (r["step"], r[CROSS_ENTROPY])
            for r in recs
            if r["split"] == "eval" and CROSS_ENTROPY in r
        ]
        trains = [r for r in recs if r["split"] == "train"]
        if not evals:
            rows.append(f"| {name} | - | - | - | - |")
            continue
        tps = [r["tokens_per_sec"] for r in trains[1:] if "tokens_per_sec" in r]
        rows.append(
            f"| {name} | {trains[-1]['step'] if trains else '-'} | {evals[0][1]:.4f} | "
            f"{evals[-1][1]:.4f} | {sum(tps) / len(tps) if tps else float('nan'):,.0f} |"
        )
        ax.plot(*zip(*evals), "o-" if name != "dense" else "k--", label=name, markersize=3)
    ax.set_xlabel("step")
    ax.set_ylabel("eval cross-entropy")
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.savefig(os.path.join(out, "eval_loss.png"), dpi=110, bbox_inches="tight")
    table = "\n".join(rows) + "\n"
    with open(os.path.join(out, "comparison.md"), "w") as f:
        f.write(table)
    return table


def check_gin(gin_files: list[str], bindings: list[str], out: str) -> None:
    """Parses the sweep's gin as its runs will (a misspelt macro, a bad value or a missing
    required macro is a `UserError` here, before any run starts)."""
    from switch_t5 import gin_utils

    run_bindings = [*bindings, "NUM_EXPERTS = 1", f"MODEL_DIR = {os.path.join(out, 'check')!r}"]
    gin_utils.parse_gin(gin_files, run_bindings)


def main(argv=None) -> None:
    from switch_t5 import errors, gin_utils

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    gin_utils.add_debug_flag(parser)
    parser.add_argument("--gin_file", action="append", default=[], required=True)
    parser.add_argument("--experts", default="1,2,4,8", help="comma-separated NUM_EXPERTS values")
    parser.add_argument("--out", required=True, help="parent folder of the MODEL_DIRs")
    parser.add_argument("--no_dense", action="store_true", help="skip the dense baseline")
    parser.add_argument("--dry_run", action="store_true", help="print the commands only")
    parser.add_argument("--report_only", action="store_true", help="only write the comparison")
    args, rest = parser.parse_known_args(argv)
    bindings = []
    for r in rest:
        if not r.startswith("--gin."):
            parser.error(f"unknown argument {r!r} (gin overrides are --gin.NAME=VALUE)")
        bindings.append(r[len("--gin.") :])
    try:
        experts = [int(x) for x in args.experts.split(",") if x]
    except ValueError:
        parser.error(f"--experts={args.experts!r}: give integers, e.g. --experts=1,2,4,8")
    if any(n < 1 for n in experts):
        parser.error("--experts values must be >= 1 (the dense baseline is added automatically)")
    runs = commands(args.gin_file, bindings, experts, args.out, dense=not args.no_dense)
    if not args.report_only:
        check_gin(args.gin_file, bindings, args.out)
    if args.dry_run:
        for _, cmd in runs:
            print(shlex.join(cmd))
        return
    os.makedirs(args.out, exist_ok=True)
    if not args.report_only:
        env = {**os.environ, "PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", "")}
        for name, cmd in runs:
            print(f"== {name}: {shlex.join(cmd)}", flush=True)
            code = subprocess.run(cmd, cwd=REPO, env=env, check=False).returncode
            if code:
                raise errors.UserError(f"the {name} run exited with status {code} (see above)")
    print(report(args.out, [name for name, _ in runs]))
    table_path = os.path.join(args.out, "comparison.md")
    print(f"wrote {table_path} and {os.path.join(args.out, 'eval_loss.png')}")


if __name__ == "__main__":
    sys.path.insert(0, REPO)
    from switch_t5 import gin_utils

    gin_utils.run_console_main(main)
