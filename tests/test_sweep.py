"""scripts/sweep_experts.py: the commands of a sweep and its comparison report."""

import importlib.util
import json
import os
import sys

import numpy as np
import pytest

from switch_t5 import gin_utils

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


def test_report_compares_eval_cross_entropy_not_the_loss_with_aux_losses(tmp_path):
    """`loss` holds the Switch run's load-balancing loss and not the dense run's: the table
    and the plot use the pure cross-entropy, so equal cross-entropies tie."""
    from switch_t5.trainer import CROSS_ENTROPY

    sweep = _load_sweep()
    # Equal cross-entropy; the Switch run's loss is higher by 0.01 x its load-balancing loss.
    for name, aux in (("dense", 0.0), ("experts_8", 0.0125)):
        d = tmp_path / name
        d.mkdir()
        records = [
            {"step": 10, "split": "train", "loss": 7.0, "tokens_per_sec": 100.0},
            {"step": 20, "split": "train", "loss": 6.0, "tokens_per_sec": 300.0},
            {"step": 10, "split": "eval", "loss": 6.5 + aux, CROSS_ENTROPY: 6.5},
            {"step": 20, "split": "eval", "loss": 5.0 + aux, CROSS_ENTROPY: 5.0},
        ]
        (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    table = sweep.report(str(tmp_path), ["dense", "experts_8", "experts_32"])
    lines = table.strip().splitlines()
    assert f"`{CROSS_ENTROPY}`" in lines[0] and "load-balancing loss" in lines[0]
    assert lines[2] == (
        "| run | steps | first eval cross-entropy | last eval cross-entropy | train tokens/s |"
    )
    assert lines[4] == "| dense | 20 | 6.5000 | 5.0000 | 300 |"
    assert lines[5] == "| experts_8 | 20 | 6.5000 | 5.0000 | 300 |"
    assert lines[6] == "| experts_32 | - | - | - | - |"  # a run that has not written metrics yet
    assert (tmp_path / "comparison.md").read_text() == table
    assert (tmp_path / "eval_loss.png").stat().st_size > 0


def test_the_trainer_logs_the_cross_entropy_under_that_name():
    """The name the sweep reads is the one the eval metrics carry."""
    from switch_t5 import trainer

    acc = trainer.EvalAccumulator(
        trainer.LossConfig(load_balancing_loss_weight=0.01, router_z_loss_weight=0.0)
    )
    acc.add(
        {
            "cross_entropy_sum": 6.0,
            "z_loss_sum": 0.0,
            "correct_sum": 1.0,
            "weight_sum": 3.0,
            "load_balancing_loss": 1.0,
            "router_z_loss": 0.0,
            "fraction_dropped": 0.0,
            "router_confidence": 0.5,
            "expert_usage": np.array([[0.5, 0.5]]),
        }
    )
    result = acc.result()
    assert result[trainer.CROSS_ENTROPY] == 2.0
    assert result["loss"] == 2.0 + 0.01
    assert result["accuracy"] == pytest.approx(100.0 / 3, rel=1e-12)  # percent, as T5's metrics


def test_a_misspelt_macro_stops_the_sweep_before_any_run(tmp_path):
    sweep = _load_sweep()
    with pytest.raises(gin_utils.GinConfigError, match="did you mean TRAIN_STEPS"):
        sweep.main(
            [
                "--gin_file=configs/experiments/quickstart.gin",
                "--experts=2",
                f"--out={tmp_path}",
                "--gin.TRAIN_STEP=3",
                "--dry_run",
            ]
        )
