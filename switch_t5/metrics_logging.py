"""Training metrics: MODEL_DIR/metrics.jsonl, TensorBoard event files, progress output, plots.

metrics.jsonl holds one JSON object per line with at least `step`, `split` ("train"/"eval") and
`loss`; a per-layer MoE metric (expert usage, tokens per expert) is a nested list
[moe_layers][experts]. TensorBoard events go to MODEL_DIR/tensorboard/{train,eval} (the same
tags, so TensorBoard overlays them). On an interactive terminal a tqdm bar shows step, loss and
tokens/s; otherwise plain log lines. Where each MoE metric is shown (metrics.jsonl, TensorBoard,
progress line, plots) is declared in `switch_t5.moe_metrics`. Only process 0 writes.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from switch_t5 import fileio, moe_metrics, run_dir

# Dense bf16 peak FLOP/s per chip, for the MFU estimate (vendor figures).
PEAK_FLOPS_BY_DEVICE_KIND = {
    "TPU v2": 45e12,
    "TPU v3": 123e12,
    "TPU v4": 275e12,
    "TPU v5 lite": 197e12,
    "TPU v5e": 197e12,
    "TPU v5p": 459e12,
    "TPU v6 lite": 918e12,
    "NVIDIA A100-SXM4-40GB": 312e12,
    "NVIDIA A100-SXM4-80GB": 312e12,
    "NVIDIA H100 80GB HBM3": 989e12,
    "NVIDIA H200": 989e12,
}


def peak_flops_per_device(device_kind: str) -> float | None:
    """Known peak FLOP/s of a device kind (None for CPUs and unknown kinds)."""
    for kind, flops in PEAK_FLOPS_BY_DEVICE_KIND.items():
        if device_kind.startswith(kind):
            return flops
    return None


def _to_json(value: Any) -> Any:
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    return value


def _shown(key: str, where: str) -> bool:
    """Whether metric `key` goes to `where` (`moe_metrics.SHOWN_IN`); non-MoE metrics go
    everywhere they fit."""
    declared = moe_metrics.present([key])
    return not declared or where in declared[0].shown


def _write_moe_tensorboard(writer, metrics: Mapping[str, Any], step: int) -> None:
    """The non-scalar MoE metrics: one histogram (or scalar) per MoE layer, and their summaries."""
    for metric in moe_metrics.present(metrics):
        arr = np.asarray(metrics[metric.name])
        if arr.ndim == 0 or not arr.size or moe_metrics.TENSORBOARD not in metric.shown:
            continue
        if metric.over_layers != "stack":
            writer.add_histogram(metric.name, arr, step)
            continue
        for tag, fn in metric.summary:
            writer.add_scalar(tag, fn(arr), step)
        for i, row in enumerate(arr):
            if row.ndim == 0:
                writer.add_scalar(f"{metric.name}/layer_{i}", float(row), step)
            else:
                writer.add_histogram(f"{metric.name}/layer_{i}", row, step)


def read_metrics(model_dir: str) -> list[dict[str, Any]]:
    """All records of MODEL_DIR/metrics.jsonl (an empty list when there is none).

    A last line without its newline is what a process killed mid-write leaves: it is dropped
    (the resumed run logs that step again). Any other unreadable line is an error naming it.
    """
    p = run_dir.RunDir(model_dir).metrics_file
    if not p.exists():
        return []
    text = p.read_text()
    lines = text.split("\n")
    records = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as e:
            if i == len(lines) - 1:  # the unterminated tail of an interrupted write
                break
            raise ValueError(
                f"{p}, line {i + 1}: not a JSON record ({e}); fix or delete that line"
            ) from e
    return records


def truncate_metrics(model_dir: str, last_step: int) -> None:
    """Drops records after `last_step` (a run resumed from that checkpoint redoes those steps)."""
    records = read_metrics(model_dir)
    kept = [r for r in records if r["step"] <= last_step]
    if len(kept) != len(records):
        fileio.write_text(
            run_dir.RunDir(model_dir).metrics_file,
            "".join(json.dumps(r) + "\n" for r in kept),
        )


class MetricsLogger:
    """Writes metrics to metrics.jsonl and TensorBoard; prints progress.

    Args:
      model_dir: MODEL_DIR (local path or gs:// URL).
      total_steps: the run's last step (for the progress bar).
      start_step: the step the run starts (or resumes) at.
      enabled: False on processes other than 0 (they write nothing).
      progress: "auto" (tqdm on a terminal, plain lines otherwise), "tqdm", "lines" or "none".
    """

    def __init__(
        self,
        model_dir: str,
        total_steps: int,
        start_step: int = 0,
        *,
        enabled: bool = True,
        progress: str = "auto",
    ):
        if progress not in ("auto", "tqdm", "lines", "none"):
            raise ValueError(f"progress={progress!r}: use 'auto', 'tqdm', 'lines' or 'none'")
        self.model_dir = str(model_dir)
        self.enabled = enabled
        self._writers: dict[str, Any] = {}
        self._bar = None
        self._lines = False
        if not enabled:
            return
        fileio.makedirs(self.model_dir)
        if progress == "auto":
            progress = "tqdm" if sys.stderr.isatty() else "lines"
        if progress == "tqdm":
            from tqdm import tqdm

            self._bar = tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True)
        self._lines = progress == "lines"

    def _writer(self, split: str):
        if split not in self._writers:
            from tensorboardX import SummaryWriter

            self._writers[split] = SummaryWriter(
                str(run_dir.RunDir(self.model_dir).tensorboard(split))
            )
        return self._writers[split]

    def write(self, step: int, split: str, metrics: Mapping[str, Any]) -> None:
        """Writes one record (scalars and the per-layer MoE matrices) for `step`."""
        if not self.enabled:
            return
        record = {"step": int(step), "split": split}
        record.update({k: _to_json(v) for k, v in metrics.items() if _shown(k, moe_metrics.JSONL)})
        fileio.append_text(run_dir.RunDir(self.model_dir).metrics_file, json.dumps(record) + "\n")
        writer = self._writer(split)
        for key, value in metrics.items():
            arr = np.asarray(value)
            if (
                arr.ndim == 0
                and np.issubdtype(arr.dtype, np.number)
                and _shown(key, moe_metrics.TENSORBOARD)
            ):
                writer.add_scalar(key, float(arr), step)
        _write_moe_tensorboard(writer, metrics, step)
        writer.flush()

    def progress(self, step: int, metrics: Mapping[str, Any], split: str = "train") -> None:
        """Advances the bar (or prints one line) after a log step."""
        if not self.enabled:
            return
        loss = float(metrics.get("loss", math.nan))
        tps = metrics.get("tokens_per_sec")
        moe = {
            m.name: f"{float(metrics[m.name]):.4g}"
            for m in moe_metrics.present(metrics)
            if moe_metrics.PROGRESS in m.shown and np.ndim(metrics[m.name]) == 0
        }
        if self._bar is not None:
            self._bar.n = step
            post = {"loss": f"{loss:.4f}"}
            if tps is not None:
                post["tok/s"] = f"{float(tps):,.0f}"
            post.update(moe)
            self._bar.set_postfix(post, refresh=False)
            self._bar.refresh()
            if split == "eval":
                self._bar.write(f"step {step}: eval loss {loss:.4f}")
        elif self._lines:
            extra = f" {float(tps):,.0f} tokens/s" if tps is not None else ""
            lr = metrics.get("learning_rate")
            extra += f" lr {float(lr):.2e}" if lr is not None else ""
            extra += "".join(f" {name} {value}" for name, value in moe.items())
            print(
                f"[{time.strftime('%H:%M:%S')}] step {step} {split} loss {loss:.4f}{extra}",
                flush=True,
            )

    def message(self, text: str) -> None:
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.write(text)
        else:
            print(text, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        for w in self._writers.values():
            w.close()
        self._writers = {}


def make_plots(model_dir: str, layer_names: Sequence[str] | None = None) -> dict[str, str]:
    """Writes MODEL_DIR/plots/loss.png and the MoE heatmaps from metrics.jsonl.

    loss.png: train and eval loss vs step. Every per-layer MoE metric declared with a plot
    (`moe_metrics`; expert_load.png: fraction of tokens routed, tokens_per_expert.png): a
    heatmap, MoE layers x experts, from the latest train record (skipped for a dense model).

    Returns:
      {"loss": path, "expert_load": path, ...} for the plots written.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    records = read_metrics(model_dir)
    if not records:
        raise FileNotFoundError(f"no metrics in {model_dir}/{run_dir.METRICS_FILE} to plot")
    plots_dir = run_dir.RunDir(model_dir).plots
    fileio.makedirs(plots_dir)
    written = {}

    fig, ax = plt.subplots(figsize=(7, 4))
    for split, style in (("train", "-"), ("eval", "o-")):
        pts = [(r["step"], r["loss"]) for r in records if r["split"] == split]
        if pts:
            label = f"{split} loss (last {pts[-1][1]:.4g})"
            ax.plot(*zip(*pts), style, label=label, markersize=4)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    # Log scale (early losses are large), labelled in plain numbers on every tick, minor ones
    # included, so the axis reads down to the final value.
    ax.set_yscale("log")
    plain = matplotlib.ticker.FormatStrFormatter("%.3g")
    ax.yaxis.set_major_formatter(plain)
    ax.yaxis.set_minor_formatter(plain)
    ax.tick_params(axis="y", which="minor", labelsize=7)
    losses = [r["loss"] for r in records if r["split"] in ("train", "eval") and r["loss"] > 0]
    if losses:  # down to the integer below the lowest loss, so a tick lies under it
        low = min(losses)
        ax.set_ylim(bottom=math.floor(low) if low >= 2 else low * 0.9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    ax.set_title("loss")
    written["loss"] = _save(fig, plots_dir / "loss.png")
    plt.close(fig)

    for metric in moe_metrics.all_metrics():
        if moe_metrics.PLOT in metric.shown:
            with_values = [r for r in records if r["split"] == "train" and r.get(metric.name)]
            if with_values:
                path = _plot_layers(plt, metric, with_values[-1], layer_names, plots_dir)
                written[metric.plot_file] = path
    return written


def _plot_layers(plt, metric, record: Mapping[str, Any], layer_names, plots_dir) -> str:
    """The heatmap, MoE layers x experts, of one per-layer metric in `record`."""
    values = np.asarray(record[metric.name], np.float32)
    values = values.reshape(values.shape[0], -1)
    fig, ax = plt.subplots(
        figsize=(max(5, 0.35 * values.shape[1] + 3), max(2.5, 0.4 * values.shape[0] + 1.5))
    )
    im = ax.imshow(values, aspect="auto", cmap="viridis", vmin=0.0)
    ax.set_xlabel("expert")
    ax.set_ylabel("MoE layer")
    names = layer_names if layer_names and len(layer_names) == values.shape[0] else None
    ax.set_yticks(range(values.shape[0]))
    ax.set_yticklabels(names or [str(i) for i in range(values.shape[0])], fontsize=7)
    ax.set_title(metric.plot_title.format(step=record["step"], balanced=1 / values.shape[1]))
    fig.colorbar(im, ax=ax)
    path = _save(fig, plots_dir / f"{metric.plot_file}.png")
    plt.close(fig)
    return path


def _save(fig, p) -> str:
    if fileio.is_remote(str(p)):
        import io

        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
        fileio.path(p).write_bytes(buf.getvalue())
    else:
        fig.savefig(os.fspath(p), dpi=110, bbox_inches="tight")
    return str(p)
