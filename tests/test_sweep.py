"""scripts/sweep_experts.py: the commands of a sweep and its comparison report."""

import importlib.util
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _load_sweep():
    spec = importlib.util.spec_from_file_location(
        "sweep_experts", os.path.join(ROOT, "scripts", "sweep_experts.py")
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_one_train_command_per_expert_count_plus_the_dense_baseline(tmp_path):
    sweep = _load_sweep()
    runs = sweep.commands(
        ["configs/experiments/quickstart.gin"], ["TRAIN_STEPS=50"], [2, 8], str(tmp_path)
    )
    assert [name for name, _ in runs] == ["dense", "experts_2", "experts_8"]
    for (name, cmd), n in zip(runs, (0, 2, 8)):
        assert cmd[:3] == [sys.executable, "-m", "switch_t5.train"]
        assert "--gin_file=configs/experiments/quickstart.gin" in cmd
        assert "--gin.TRAIN_STEPS=50" in cmd
        assert f"--gin.NUM_EXPERTS={n}" in cmd
        assert f"--gin.MODEL_DIR='{tmp_path / name}'" in cmd


def test_report_tabulates_first_and_last_eval_loss_and_plots(tmp_path):
    sweep = _load_sweep()
    for name, final in (("dense", 5.0), ("experts_8", 4.0)):
        d = tmp_path / name
        d.mkdir()
        records = [
            {"step": 10, "split": "train", "loss": 7.0, "tokens_per_sec": 100.0},
            {"step": 20, "split": "train", "loss": 6.0, "tokens_per_sec": 300.0},
            {"step": 10, "split": "eval", "loss": 6.5},
            {"step": 20, "split": "eval", "loss": final},
        ]
        (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    table = sweep.report(str(tmp_path), ["dense", "experts_8", "experts_32"])
    lines = table.strip().splitlines()
    assert lines[2] == "| dense | 20 | 6.5000 | 5.0000 | 300 |"
    assert lines[3] == "| experts_8 | 20 | 6.5000 | 4.0000 | 300 |"
    assert lines[4] == "| experts_32 | - | - | - | - |"  # a run that has not written metrics yet
    assert (tmp_path / "comparison.md").read_text() == table
    assert (tmp_path / "eval_loss.png").stat().st_size > 0
