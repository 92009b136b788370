"""metrics.jsonl survives a process killed in the middle of writing a line."""

import json

import pytest

from switch_t5 import metrics_logging, run_dir


def _write(model_dir, text):
    (model_dir / run_dir.METRICS_FILE).write_text(text)


def test_unterminated_last_line_is_dropped_and_truncate_rewrites_cleanly(tmp_path):
    records = [{"step": s, "split": "train", "loss": 1.0 / s} for s in (1, 2, 3)]
    full = "".join(json.dumps(r) + "\n" for r in records)
    _write(tmp_path, full + '{"step": 4, "split": "tr')
    assert metrics_logging.read_metrics(str(tmp_path)) == records
    metrics_logging.truncate_metrics(str(tmp_path), 2)
    assert (tmp_path / run_dir.METRICS_FILE).read_text() == "".join(
        json.dumps(r) + "\n" for r in records[:2]
    )


def test_a_corrupt_line_in_the_middle_is_an_error_naming_it(tmp_path):
    _write(tmp_path, '{"step": 1, "split": "train", "loss": 2.0}\n{oops\n{"step": 2}\n')
    with pytest.raises(ValueError, match=r"metrics.jsonl, line 2: not a JSON record"):
        metrics_logging.read_metrics(str(tmp_path))
