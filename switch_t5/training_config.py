"""TrainingConfig: what a training run does (steps, batch, periods, checkpoints, logging).

Frozen and self-validating like `SwitchConfig`: every problem is listed in one error. The other
settings of a run have their own configs beside it: `SwitchConfig` (the network),
`optim.OptimizerConfig`, `trainer.LossConfig`, `partitioning.MeshConfig` and
`decoding.DecodingConfig`. `switch_t5.train` builds them from its gin bindings (`train.*`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

from switch_t5 import errors, run_dir

# T5's pretraining lengths (arXiv 1910.10683 sec. 3.1).
DEFAULT_FEATURE_LENGTHS = {"inputs": 512, "targets": 114}
PROGRESS_STYLES = ("auto", "tqdm", "lines", "none")
# No default: a run names its folder, its length and its data.
REQUIRED = ("model_dir", "train_steps", "mixture_or_task_name")


class TrainConfigError(errors.UserError):
    """A train setting is missing, of the wrong type or out of range (raised before compiling)."""


@dataclasses.dataclass(frozen=True)
class TrainingConfig:
    """What a training run does.

    Attributes:
      model_dir: MODEL_DIR, local path or gs:// URL (layout: `switch_t5.run_dir`).
      train_steps: TRAIN_STEPS, the total number of optimizer steps (a resumed run continues to
        it).
      mixture_or_task_name: MIXTURE_OR_TASK_NAME, a seqio task or mixture.
      task_feature_lengths: TASK_FEATURE_LENGTHS, {"inputs": N, "targets": M}; None = T5's
        {"inputs": 512, "targets": 114}.
      batch_size: BATCH_SIZE, global examples (packed rows) per step.
      eval_period: EVAL_PERIOD: evaluate every N steps and at the end; 0 = never.
      eval_steps: validation batches per evaluation; None = the whole split.
      checkpoint_period: CHECKPOINT_PERIOD: save every N steps and at the end.
      keep_checkpoints: keep the last K checkpoints.
      async_checkpointing: write checkpoints in the background.
      checkpoint_checksums: record SHA-256 checksums of every checkpoint file (verified on
        restore; catches bit flips; costs one re-read per save).
      log_every: LOG_EVERY: log (metrics.jsonl, TensorBoard, progress) every N steps.
      random_seed: RANDOM_SEED for the init, dropout, router jitter and the data order.
      num_microbatches: gradient accumulation over this many microbatches per step.
      pack: pack several examples per row.
      profile_steps: (N, M): record a jax.profiler trace of steps N..M into MODEL_DIR/profile.
      compilation_cache_dir: JAX persistent compilation cache; None =
        ~/.cache/switch_t5/jax_cache unless already configured, "" = off.
      peak_flops_per_device: peak FLOP/s of one device for the MFU estimate; None = known
        TPU/GPU kinds only.
      num_samples: decode this many validation examples greedily at the end and print them.
      make_plots: write MODEL_DIR/plots/{loss,expert_load}.png at the end.
      progress: "auto", "tqdm", "lines" or "none".
      infer_eval_period: INFER_EVAL_PERIOD: every N steps and at the end, decode the validation
        split greedily and score it (MODEL_DIR/eval/step_N/, metrics.jsonl split
        "infer_eval"), keeping the best state in MODEL_DIR/best; 0 = never.
      keep_best_by: the metric key ranking checkpoints ("task/metric" or an average); None =
        the task's first metric or the mixture's average.
      restart_data_stream: resuming with data settings that changed since the checkpoint
        (batch size, seed, lengths, task) keeps its params, optimizer state and step and starts
        a new data stream with the new settings (from the beginning of the data, in the order
        of the new seed). False: such a resume is refused. A stream whose settings did not
        change always continues exactly, so the flag may stay set across restarts.
    """

    model_dir: str
    train_steps: int
    mixture_or_task_name: str
    task_feature_lengths: Mapping[str, int] | None = None
    batch_size: int = 256
    eval_period: int = 1000
    eval_steps: int | None = 20
    checkpoint_period: int = 1000
    keep_checkpoints: int = 3
    async_checkpointing: bool = True
    checkpoint_checksums: bool = False
    log_every: int = 100
    random_seed: int = 0
    num_microbatches: int = 1
    pack: bool = True
    profile_steps: tuple[int, int] | None = None
    compilation_cache_dir: str | None = None
    peak_flops_per_device: float | None = None
    num_samples: int = 0
    make_plots: bool = True
    progress: str = "auto"
    infer_eval_period: int = 0
    keep_best_by: str | None = None
    restart_data_stream: bool = False

    def __post_init__(self):
        if self.task_feature_lengths is None:
            object.__setattr__(self, "task_feature_lengths", dict(DEFAULT_FEATURE_LENGTHS))
        problems = self._type_problems()
        if not problems:
            problems = self._value_problems()
        if problems:
            raise TrainConfigError("bad train settings: " + "; ".join(problems))

    @property
    def lengths(self) -> dict[str, int]:
        return dict(self.task_feature_lengths)

    @property
    def folder(self) -> run_dir.RunDir:
        """MODEL_DIR's layout (checkpoints, metrics, plots, ...)."""
        return run_dir.RunDir(self.model_dir)

    def _type_problems(self) -> list[str]:
        problems = []
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            types = _TYPES.get(f.name)
            if value is None and f.name in REQUIRED:
                problems.append(f"train.{f.name} is required (e.g. --gin.{f.name.upper()}=...)")
            elif types is not None and (
                (isinstance(value, bool) and bool not in types) or not isinstance(value, types)
            ):
                problems.append(
                    f"train.{f.name}={value!r} is a {type(value).__name__}; expected "
                    f"{' or '.join(t.__name__ for t in types if t is not type(None))}"
                )
        return problems

    def _value_problems(self) -> list[str]:
        problems = []
        for name in ("train_steps", "batch_size", "log_every", "checkpoint_period"):
            if getattr(self, name) <= 0:
                problems.append(f"{name}={getattr(self, name)} must be positive")
        if self.num_microbatches <= 0:
            problems.append(f"num_microbatches={self.num_microbatches} must be positive")
        for name in ("eval_period", "infer_eval_period"):
            if getattr(self, name) < 0:
                problems.append(f"{name}={getattr(self, name)} must be >= 0 (0 = no evaluation)")
        lengths = self.task_feature_lengths
        if not isinstance(lengths, Mapping) or set(lengths) != {"inputs", "targets"}:
            problems.append(
                f"task_feature_lengths={lengths!r}: give {{'inputs': N, 'targets': M}} "
                "(TASK_FEATURE_LENGTHS)"
            )
        if self.num_microbatches > 0 and self.batch_size % self.num_microbatches:
            problems.append(
                f"batch_size={self.batch_size} is not divisible by "
                f"num_microbatches={self.num_microbatches}"
            )
        profile = self.profile_steps
        if profile is not None and (len(profile) != 2 or not 0 <= profile[0] < profile[1]):
            problems.append(
                f"profile_steps={profile!r}: give (first_step, last_step), first < last"
            )
        if self.progress not in PROGRESS_STYLES:
            problems.append(
                f"progress={self.progress!r}: use one of {', '.join(map(repr, PROGRESS_STYLES))}"
            )
        return problems


_TYPES: dict[str, tuple[type, ...]] = {
    "model_dir": (str,),
    "train_steps": (int,),
    "mixture_or_task_name": (str,),
    "batch_size": (int,),
    "eval_period": (int,),
    "eval_steps": (int, type(None)),
    "checkpoint_period": (int,),
    "keep_checkpoints": (int,),
    "async_checkpointing": (bool,),
    "checkpoint_checksums": (bool,),
    "log_every": (int,),
    "random_seed": (int,),
    "num_microbatches": (int,),
    "pack": (bool,),
    "num_samples": (int,),
    "make_plots": (bool,),
    "progress": (str,),
    "infer_eval_period": (int,),
    "restart_data_stream": (bool,),
}
