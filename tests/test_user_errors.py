"""User-fixable settings raise `errors.UserError` (one `error:` line, exit 2, no traceback)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from switch_t5 import decoding, errors, gin_utils, moe, optim
from switch_t5.data import user_tasks


def test_unknown_optimizer_is_a_user_error():
    with pytest.raises(errors.UserError, match="unknown optimizer 'sgdx'"):
        optim.make_optimizer("sgdx", lambda step: 1.0)


def test_bad_schedule_setting_is_a_user_error():
    with pytest.raises(errors.UserError, match="warmup_steps=0"):
        optim.rsqrt_schedule(warmup_steps=0)


def test_num_beams_zero_is_a_user_error():
    with pytest.raises(errors.UserError, match="num_beams=0 must be positive"):
        decoding.beam_search(None, {}, batch_size=1, num_beams=0, max_decode_length=4)


def test_bad_temperature_is_a_user_error():
    with pytest.raises(errors.UserError, match="temperature=-1"):
        decoding.temperature_sample(
            None, {}, None, batch_size=1, max_decode_length=4, temperature=-1.0
        )


@pytest.mark.parametrize(
    ("metrics", "label_names", "match"),
    [(["nope"], None, "Unknown metric 'nope'"), (["pearson"], ["a", "b"], "METRICS")],
)
def test_bad_user_task_metrics_are_user_errors(metrics, label_names, match):
    with pytest.raises(errors.UserError, match=match):
        user_tasks.register_files_text_to_text(
            name="user_errors_task",
            train_files="unused.tsv",
            vocabulary=object(),
            input_template="s: {sentence}",
            target_column="label",
            label_names=label_names,
            metrics=metrics,
        )


def test_bad_group_size_is_a_user_error():
    with pytest.raises(errors.UserError, match="group_size=0"):
        moe.group_layout(16, 0)


def test_unknown_dispatch_is_a_user_error():
    with pytest.raises(errors.UserError, match="dispatch='nope'"):
        moe.resolve_dispatch("nope")


def test_infer_cli_prints_one_error_line_without_traceback(tmp_path):
    env = {**os.environ, "PYTHONPATH": gin_utils.REPO_ROOT, "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run(
        [sys.executable, "-m", "switch_t5.infer", f"--checkpoint_dir={tmp_path}"],
        capture_output=True,
        text=True,
        env=env,
        cwd=gin_utils.REPO_ROOT,
        timeout=300,
    )
    assert proc.returncode == 2, proc.stderr
    errs = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert errs == ["error: no inputs: pass --input=TEXT (repeatable) or --input_file=FILE"]
    assert "Traceback" not in proc.stderr
