"""One tiny training run, started as `python -m switch_t5.train` subprocesses with faults armed.

Every run of the suite uses the same model and data config so that its train and eval steps
compile once and later processes read them from the shared JAX persistent compilation cache
(the one tests/conftest.py configures). A subprocess sets its own simulated device count
(default 1: mesh (1, 1, 1)); tests/conftest.py's 8 devices apply to this process only.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import os
import re
import subprocess
import sys

import jax

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# The house tiny model (odd sizes); the embedded corpus's vocabulary has 4096 ids.
TINY = {
    "vocab_size": 4096,
    "d_model": 8,
    "num_heads": 2,
    "head_dim": 3,
    "d_ff": 16,
    # One (sparse) layer per stack: the train step traces and compiles in seconds.
    "num_encoder_layers": 1,
    "num_decoder_layers": 1,
    "num_experts": 4,
    "moe_layer_interval": 1,
    "group_size": 64,
    "dtype": "float32",
}
TRAIN_STEPS = 10
# Checkpoints every 2 steps, evaluation every 3: faults hit steps with and without a save.
CHECKPOINT_PERIOD = 2
EVAL_PERIOD = 3


def tiny_bindings() -> list[str]:
    out = [f"switch_t5.SwitchConfig.{k} = {v!r}" for k, v in TINY.items() if k != "num_experts"]
    return [*out, "NUM_EXPERTS = 4"]


def cli_args(model_dir: str, *extra: str, steps: int = TRAIN_STEPS, devices: int = 1) -> list[str]:
    bindings = [
        *tiny_bindings(),
        f"MODEL_DIR = '{model_dir}'",
        "MIXTURE_OR_TASK_NAME = 'embedded_span_corruption'",
        "TASK_FEATURE_LENGTHS = {'inputs': 32, 'targets': 8}",
        "BATCH_SIZE = 4",
        f"TRAIN_STEPS = {steps}",
        f"CHECKPOINT_PERIOD = {CHECKPOINT_PERIOD}",
        f"EVAL_PERIOD = {EVAL_PERIOD}",
        "LOG_EVERY = 1",
        f"train.mesh_data = {devices}",
        "train.mesh_expert = 1",
        "train.mesh_model = 1",
        "train.eval_steps = 1",
        "train.progress = 'lines'",
        "train.make_plots = False",
        f"train.compilation_cache_dir = '{jax.config.jax_compilation_cache_dir}'",
        *extra,
    ]
    return [
        "--gin_file=configs/models/tiny.gin",
        "--gin_file=configs/runs/pretrain.gin",
        *[f"--gin_bindings={b}" for b in bindings],
    ]


@dataclasses.dataclass
class Run:
    returncode: int
    output: str  # stdout and stderr together
    start_step: int | None  # "steps N -> M" of the run's first log line

    def fault_line(self) -> str:
        lines = [x for x in self.output.splitlines() if x.startswith("FAULT ")]
        return lines[0] if lines else ""


def run(
    model_dir: str,
    *extra: str,
    fault: str | None = None,
    devices: int = 1,
    steps: int = TRAIN_STEPS,
    timeout: int = 600,
) -> Run:
    """Trains in a subprocess (SWITCH_T5_FAULT=fault), returns its exit code and output."""
    env = {
        **os.environ,
        "PYTHONPATH": REPO,
        # Tiny programs: LLVM's optimisations would double their compile time; every run of the
        # suite uses the same flags, so their losses stay bitwise comparable.
        "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices} "
        "--xla_backend_optimization_level=0",
        "JAX_PLATFORMS": "cpu",
        "CUDA_VISIBLE_DEVICES": "",
        "TF_CPP_MIN_LOG_LEVEL": "2",
    }
    env.pop("SWITCH_T5_FAULT", None)
    if fault:
        env["SWITCH_T5_FAULT"] = fault
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "switch_t5.train",
            *cli_args(model_dir, *extra, steps=steps, devices=devices),
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    output = proc.stdout + proc.stderr
    m = re.search(r"steps (\d+) -> \d+", output)
    return Run(proc.returncode, output, int(m.group(1)) if m else None)


def losses(model_dir: str, split: str = "train") -> dict[int, float]:
    """{step: loss} of metrics.jsonl (a resumed run truncates it to its checkpoint first)."""
    with open(os.path.join(model_dir, "metrics.jsonl")) as f:
        records = [json.loads(line) for line in f]
    out: dict[int, float] = {}
    for r in records:
        if r["split"] == split:
            assert r["step"] not in out, f"step {r['step']} logged twice in {model_dir}"
            out[r["step"]] = r["loss"]
    return out


def complete_steps(model_dir: str) -> list[int]:
    """Committed checkpoint steps (orbax renames a step directory only when it is complete)."""
    d = os.path.join(model_dir, "checkpoints")
    return sorted(int(s) for s in os.listdir(d) if s.isdigit()) if os.path.isdir(d) else []


def committed_steps(model_dir: str) -> list[int]:
    """The steps orbax lists (a Checkpointer opened and closed again)."""
    from switch_t5 import checkpoints

    ckpt = checkpoints.Checkpointer(model_dir)
    try:
        return ckpt.all_steps()
    finally:
        ckpt.close()


def array_files(step_dir: str) -> list[str]:
    """The array data files (tensorstore/OCDBT chunks) of a checkpoint's state item."""
    return sorted(
        p
        for p in glob.glob(os.path.join(step_dir, "state", "**", "d", "*"), recursive=True)
        if os.path.isfile(p)
    )
