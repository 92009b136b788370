"""The run folder (MODEL_DIR): the one place that knows where a run keeps each thing.

    MODEL_DIR/
      config.gin                 the operative gin config of the last accepted start
      checkpoints/<step>/        orbax checkpoints (state, data position, meta)
      checkpoints_quarantine/    damaged or half-written steps moved aside
      .train.lock                held by the process that trains in it
      metrics.jsonl              one JSON object per logged step and split
      tensorboard/<split>/       TensorBoard event files
      plots/                     loss.png, expert_load.png
      eval/step_<N>/             infer-eval outputs during training (predictions, metrics)
      eval/                      `switch_t5.eval`'s outputs for the run
      best/                      the best state by an infer-eval metric, with best.json
      profile/                   jax.profiler traces (train.profile_steps)

Paths are `etils.epath.Path`s, so a gs:// MODEL_DIR works the same as a local one.
"""

from __future__ import annotations

import dataclasses
import os

from etils import epath

from switch_t5 import fileio

CONFIG_FILE = "config.gin"
CHECKPOINTS = "checkpoints"
QUARANTINE = "checkpoints_quarantine"
LOCK_FILE = ".train.lock"
METRICS_FILE = "metrics.jsonl"
TENSORBOARD = "tensorboard"
PLOTS = "plots"
EVAL = "eval"
BEST = "best"
BEST_RECORD = "best.json"
PROFILE = "profile"
# Inside an eval output folder (eval/ or eval/step_<N>/).
PREDICTIONS_FILE = "predictions.jsonl"
EVAL_METRICS_FILE = "metrics.json"

# What a run writes at the top of MODEL_DIR (`convert --overwrite` clears these).
RUN_ENTRIES = (
    CONFIG_FILE,
    CHECKPOINTS,
    QUARANTINE,
    METRICS_FILE,
    TENSORBOARD,
    PLOTS,
    EVAL,
    BEST,
    PROFILE,
)


@dataclasses.dataclass(frozen=True)
class RunDir:
    """A run folder; see the module docstring for its layout."""

    root: str

    def __post_init__(self):
        object.__setattr__(self, "root", os.fspath(self.root))

    def _p(self, *parts: str) -> epath.Path:
        return fileio.path(self.root, *parts)

    @property
    def config_file(self) -> epath.Path:
        return self._p(CONFIG_FILE)

    @property
    def checkpoints(self) -> epath.Path:
        return self._p(CHECKPOINTS)

    @property
    def quarantine(self) -> epath.Path:
        return self._p(QUARANTINE)

    @property
    def lock_file(self) -> str:
        return os.path.join(self.root, LOCK_FILE)

    @property
    def metrics_file(self) -> epath.Path:
        return self._p(METRICS_FILE)

    def tensorboard(self, split: str | None = None) -> epath.Path:
        return self._p(TENSORBOARD, split) if split else self._p(TENSORBOARD)

    @property
    def plots(self) -> epath.Path:
        return self._p(PLOTS)

    def eval_dir(self, step: int | None = None) -> epath.Path:
        """`eval/` (`switch_t5.eval`), or `eval/step_<N>/` (infer-eval during training)."""
        return self._p(EVAL, f"step_{step}") if step is not None else self._p(EVAL)

    @property
    def best(self) -> epath.Path:
        return self._p(BEST)

    @property
    def profile(self) -> epath.Path:
        return self._p(PROFILE)
