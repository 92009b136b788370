"""Pretraining entry point: `python -m switch_t5.train --gin_file=... --gin.X=...`.

    python -m switch_t5.train \\
      --gin_file=configs/models/switch_base_8.gin --gin_file=configs/runs/pretrain.gin \\
      --gin.MODEL_DIR="'/tmp/switch_base_8'" --gin.MIXTURE_OR_TASK_NAME="'c4_span_corruption'"

`train(...)` is the gin-configurable library function (defaults in its signature); the run gin
files bind it through T5X-named macros (MODEL_DIR, TRAIN_STEPS, BATCH_SIZE, TASK_FEATURE_LENGTHS,
MIXTURE_OR_TASK_NAME, CHECKPOINT_PERIOD, EVAL_PERIOD, LOG_EVERY, RANDOM_SEED; NUM_EXPERTS comes
from the model gin). Restarting the same command with the same MODEL_DIR resumes exactly.

Vocabulary rule: the embedding has `pad_vocab_size(task vocabulary size)` rows. When the gin
files do not bind `SwitchConfig.vocab_size`, the task's padded size is used; when they do, it must
equal it, or the run stops before compiling, naming both sizes.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import math
import os
import signal
import sys
import time
from collections.abc import Mapping, Sequence
from typing import Any

import gin
import jax
import numpy as np

from switch_t5 import (
    checkpoints,
    errors,
    faults,
    gin_utils,
    init_checkpoint,
    metrics_logging,
    multihost,
    network,
    optim,
    partitioning,
    scan_utils,
    train_state,
    trainer,
)
from switch_t5 import eval as eval_lib  # registers its gin configurables before parsing
from switch_t5.config import SwitchConfig, pad_vocab_size

log = logging.getLogger(__name__)

DEFAULT_COMPILATION_CACHE_DIR = os.path.join("~", ".cache", "switch_t5", "jax_cache")
# Macros a run gin file may leave as %gin.REQUIRED; checked before anything runs.
REQUIRED_MACROS = ("MODEL_DIR", "MIXTURE_OR_TASK_NAME", "TRAIN_STEPS")


def _progress(text: str) -> None:
    """A short line on stderr (main process) of what the first minute of a run is doing."""
    if jax.process_index() == 0:
        print(text, file=sys.stderr, flush=True)


class TrainConfigError(errors.UserError):
    """A train setting is missing, of the wrong type or out of range (raised before compiling)."""


class DataStreamChangedError(TrainConfigError):
    """Resuming: the checkpoint's data stream was saved with other data settings (batch size,
    seed, lengths, task); the message names them and `train.restart_data_stream`."""


class NonFiniteLossError(errors.UserError, FloatingPointError):
    """The loss (or the parameters) became NaN or Inf; the message names the step."""


@dataclasses.dataclass
class TrainResult:
    """What a run did.

    Attributes:
      step: the step the run stopped at.
      start_step: the step it started (or resumed) at.
      preempted: stopped early by SIGTERM or a first Ctrl-C (a checkpoint at `step` was
        written).
      stop_signal: "SIGTERM" or "SIGINT" when preempted, else None.
      eval_losses: [(step, eval loss)] of this run.
      model_dir: MODEL_DIR.
      checkpoint_dir: where the checkpoints are.
      tensorboard_dir: where the TensorBoard event files are.
      plots: {"loss": path, "expert_load": path}.
      train_seconds: wall time of the training loop (compilation included).
      train_tokens_per_sec: non-padding tokens per second over the run's logged steps.
      samples: [{"inputs", "targets", "prediction"}] decoded validation examples.
    """

    step: int
    start_step: int
    preempted: bool
    eval_losses: list[tuple[int, float]]
    model_dir: str
    checkpoint_dir: str
    tensorboard_dir: str
    plots: dict[str, str]
    train_seconds: float
    train_tokens_per_sec: float | None
    samples: list[dict[str, str]]
    stop_signal: str | None = None


# ---------------------------------------------------------------------------------------------
# Checks before anything is compiled.
# ---------------------------------------------------------------------------------------------

_ARG_TYPES: dict[str, tuple[type, ...]] = {
    "model_dir": (str,),
    "train_steps": (int,),
    "mixture_or_task_name": (str,),
    "batch_size": (int,),
    "eval_period": (int,),
    "checkpoint_period": (int,),
    "log_every": (int,),
    "random_seed": (int,),
    "num_microbatches": (int,),
    "keep_checkpoints": (int,),
    "base_learning_rate": (int, float),
    "warmup_steps": (int,),
    "z_loss": (int, float),
    "infer_eval_period": (int,),
    "optimizer": (str,),
    "optimizer_state_dtype": (str,),
}


def _check_args(args: Mapping[str, Any]) -> None:
    problems = []
    for name, types in _ARG_TYPES.items():
        value = args[name]
        if value is gin.REQUIRED or (
            value is None and name in ("model_dir", "mixture_or_task_name")
        ):
            problems.append(f"train.{name} is required (e.g. --gin.{name.upper()}=...)")
        elif isinstance(value, bool) or not isinstance(value, types):
            problems.append(
                f"train.{name}={value!r} is a {type(value).__name__}; expected "
                f"{' or '.join(t.__name__ for t in types)}"
            )
    if problems:
        raise TrainConfigError("bad train settings: " + "; ".join(problems))
    for name in ("train_steps", "batch_size", "log_every", "checkpoint_period", "num_microbatches"):
        if args[name] <= 0:
            problems.append(f"{name}={args[name]} must be positive")
    if args["eval_period"] < 0:
        problems.append(f"eval_period={args['eval_period']} must be >= 0 (0 = no evaluation)")
    if args["infer_eval_period"] < 0:
        problems.append(
            f"infer_eval_period={args['infer_eval_period']} must be >= 0 (0 = no evaluation)"
        )
    lengths = args["task_feature_lengths"]
    if not isinstance(lengths, Mapping) or set(lengths) != {"inputs", "targets"}:
        problems.append(
            f"task_feature_lengths={lengths!r}: give {{'inputs': N, 'targets': M}} "
            "(TASK_FEATURE_LENGTHS)"
        )
    if args["batch_size"] % args["num_microbatches"]:
        problems.append(
            f"batch_size={args['batch_size']} is not divisible by "
            f"num_microbatches={args['num_microbatches']}"
        )
    for name, allowed in (
        ("optimizer", optim.OPTIMIZERS),
        ("optimizer_state_dtype", optim.STATE_DTYPES),
    ):
        if args[name] not in allowed:
            problems.append(f"{name}={args[name]!r}: use {' or '.join(map(repr, allowed))}")
    if not isinstance(args["restart_data_stream"], bool):
        problems.append(f"restart_data_stream={args['restart_data_stream']!r}: use True or False")
    profile = args["profile_steps"]
    if profile is not None and (len(profile) != 2 or not 0 <= profile[0] < profile[1]):
        problems.append(f"profile_steps={profile!r}: give (first_step, last_step), first < last")
    if problems:
        raise TrainConfigError("bad train settings: " + "; ".join(problems))


def check_required_macros(names: Sequence[str] = REQUIRED_MACROS) -> None:
    """Raises GinConfigError naming a run macro left at %gin.REQUIRED."""
    for name in names:
        try:
            value = gin.query_parameter(f"{name}/macro.value")
        except ValueError:
            continue
        # `NAME = %gin.REQUIRED` is stored as a reference to the REQUIRED constant.
        for _ in range(16):
            if not isinstance(value, gin.config.ConfigurableReference):
                break
            value = value.scoped_configurable_fn()
        if value is gin.REQUIRED:
            raise gin_utils.GinConfigError(
                f"gin macro {name} is required but not set: pass --gin.{name}=... "
                f"(or set `{name} = ...` in a gin file)"
            )


def resolve_model_config(
    config: SwitchConfig | None,
    vocabulary: Any,
    task: str,
    initial: init_checkpoint.CheckpointRef | None = None,
    reshape: bool = False,
) -> SwitchConfig:
    """The model config with the vocabulary rule of the module docstring applied.

    Fine-tuning (`initial`, a checkpoint whose meta records its model config) with `config`
    None: the checkpoint's config, with the runtime fields gin binds explicitly
    (`init_checkpoint.model_config_from_checkpoint`; an architecture field bound to another
    value is an error, unless `reshape`: a non-strict restore or an assignment map), so a run
    gin file needs no model gin.
    """
    from switch_t5.data import vocab as vocab_lib

    padded = pad_vocab_size(vocabulary.vocab_size)
    if config is None and initial is not None and initial.meta.get("model_config"):
        gin_utils.register_configurables()
        bindings = gin.get_bindings("switch_t5.SwitchConfig")
        config = init_checkpoint.model_config_from_checkpoint(initial, bindings, reshape)
    if config is None:
        config = gin_utils.make_model_config()
        try:
            gin.query_parameter("switch_t5.SwitchConfig.vocab_size")
            bound = True
        except ValueError:
            bound = False
        if not bound:
            return dataclasses.replace(config, vocab_size=padded)
    vocab_lib.check_model_vocab_size(vocabulary, config.vocab_size, task)
    return config


def configure_compilation_cache(cache_dir: str | None) -> str | None:
    """Turns on JAX's persistent compilation cache so restarts and reruns do not recompile.

    None: `~/.cache/switch_t5/jax_cache`, unless a cache dir is already configured (e.g. by the
    tests); "": leave it off.
    """
    current = jax.config.jax_compilation_cache_dir
    if cache_dir is None:
        if current:
            return current
        cache_dir = DEFAULT_COMPILATION_CACHE_DIR
    if cache_dir == "":
        return None
    cache_dir = os.path.expanduser(cache_dir)
    jax.config.update("jax_compilation_cache_dir", cache_dir)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
    return cache_dir


def maybe_initialize_distributed(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
) -> None:
    """`jax.distributed.initialize()` when launched multi-process (TPU pod or coordinator)."""
    if jax.distributed.is_initialized():
        return
    if coordinator_address:
        jax.distributed.initialize(coordinator_address, num_processes, process_id)
        return
    # JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID (scripts/launch_slurm_gpu.sh).
    if multihost.initialize_from_env():
        return
    hosts = os.environ.get("TPU_WORKER_HOSTNAMES", "")
    if len([h for h in hosts.split(",") if h]) > 1:
        jax.distributed.initialize()


# ---------------------------------------------------------------------------------------------
# Pieces of the loop.
# ---------------------------------------------------------------------------------------------


def _flops_per_step(abstract_params: Any, config: SwitchConfig, batch: int, lengths) -> float:
    """6 x (params each token touches) per token, encoder params on encoder tokens, decoder
    params and the (tied) output projection on decoder tokens; one expert per MoE layer."""
    enc, dec = 0.0, 0.0
    flat = jax.tree_util.tree_flatten_with_path(abstract_params)[0]
    k_over_e = config.num_selected_experts / max(config.num_experts, 1)
    for path, leaf in flat:
        names = [str(getattr(p, "key", p)) for p in path]
        n = float(np.prod(leaf.shape)) * (k_over_e if "expert" in names[:-1] else 1.0)
        if names[0] == "encoder":
            enc += n
        else:
            dec += n
    return 6.0 * batch * (enc * lengths["inputs"] + dec * lengths["targets"])


def _global_batch(local: Mapping[str, np.ndarray], shardings: Mapping[str, Any], global_rows: int):
    out = {}
    for k, v in local.items():
        out[k] = jax.make_array_from_process_local_data(
            shardings[k], v, (global_rows, *v.shape[1:])
        )
    return out


class _Preemption:
    """SIGTERM (preemption) and a first SIGINT (Ctrl-C) set a flag; the loop then saves at the
    current step and exits cleanly. After the first SIGINT a second one aborts at once: SIGINT
    is reset to the operating system's default action (terminate), which needs no Python code to
    run, so it also interrupts a long compilation or a checkpoint write (a half-written
    checkpoint is never restored, see `checkpoints`)."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.requested = False
        self.signal_name: str | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self):
        if threading_is_main():
            for signum in self.SIGNALS:
                # An ignored signal stays ignored (`nohup`, a background job of a shell).
                if signal.getsignal(signum) != signal.SIG_IGN:
                    self._previous[signum] = signal.signal(signum, self._handler)
        return self

    def _handler(self, signum, frame):
        if not self.requested:
            self.signal_name = signal.Signals(signum).name
        self.requested = True
        if signum == signal.SIGINT:
            signal.signal(signal.SIGINT, signal.SIG_DFL)
            sys.stderr.write(
                "\nCtrl-C: saving a checkpoint after the current step, then exiting "
                "(press Ctrl-C again to abort at once without saving)\n"
            )
            sys.stderr.flush()

    def reached(self, step: int) -> bool:
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            # Every host must stop at the same step (the coordinator's preemption notice).
            return self.requested or multihost_utils.reached_preemption_sync_point(step)
        return self.requested

    def __exit__(self, *exc):
        for signum, previous in self._previous.items():
            if previous is not None:
                signal.signal(signum, previous)
        self._previous = {}


def threading_is_main() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


class _PendingMetrics:
    """Device metrics of the steps since the last log; fetched at log and checkpoint time."""

    def __init__(self):
        self.items: list[tuple[int, dict[str, Any], int]] = []
        self._checked = 0

    def add(self, step: int, metrics: dict[str, Any], tokens: int) -> None:
        self.items.append((step, metrics, tokens))

    def check(self) -> None:
        """Fetches them; raises NonFiniteLossError at the first NaN/Inf loss or parameters."""
        for i in range(self._checked, len(self.items)):
            step, metrics, tokens = self.items[i]
            m = jax.device_get(metrics)
            self.items[i] = (step, m, tokens)
            loss = float(m["loss"])
            if not math.isfinite(loss) or not bool(m["params_finite"]):
                what = f"loss is {loss}" if not math.isfinite(loss) else "parameters are not finite"
                raise NonFiniteLossError(
                    f"training diverged at step {step}: {what} (grad norm "
                    f"{float(m['grad_norm'])}, learning rate {float(m['learning_rate']):.3g}). No "
                    "checkpoint holding it was written; lower the learning rate, check the data, "
                    "or resume from the last checkpoint."
                )
        self._checked = len(self.items)

    def flush(self) -> list[tuple[int, dict[str, Any], int]]:
        """Checks, returns and forgets them."""
        self.check()
        out, self.items, self._checked = self.items, [], 0
        return out


def _summarise(items, seconds: float, flops_per_step: float, peak_flops: float | None):
    """Means over the steps of one log interval, plus throughput."""
    ms = [m for _, m, _ in items]
    out = {}
    for key in ms[-1]:
        if key == "params_finite":
            continue
        out[key] = np.mean([np.asarray(m[key], np.float64) for m in ms], axis=0)
    tokens = sum(t for _, _, t in items)
    out["learning_rate"] = float(ms[-1]["learning_rate"])
    out["steps"] = len(items)
    out["step_time"] = seconds / len(items)
    out["tokens_per_sec"] = tokens / seconds if seconds > 0 else float("nan")
    if peak_flops:
        out["mfu"] = flops_per_step * len(items) / seconds / (peak_flops * jax.device_count())
    return out


def evaluate(eval_step, params, pipeline, shardings, loss_config, eval_steps: int | None):
    """Eval metrics over the first `eval_steps` batches of the validation split (all if None)."""
    acc = trainer.EvalAccumulator(loss_config)
    pipeline.reset()
    for i, local in enumerate(pipeline):
        if eval_steps is not None and i >= eval_steps:
            break
        acc.add(eval_step(params, _global_batch(local, shardings, pipeline.global_batch_size)))
        faults.maybe_kill("during_eval", faults.current_step())
    return acc.result()


def _pad_rows(ids: Sequence[int], length: int) -> np.ndarray:
    out = np.zeros((length,), np.int32)
    ids = list(ids)[:length]
    out[: len(ids)] = ids
    return out


def _for_decoding(config: SwitchConfig):
    """(module, params converter) for decoding: the model as inference runs it
    (`SwitchConfig.for_inference`: each sequence its own routing group). The KV cache is per
    layer, so a scanned model decodes as its unscanned twin with converted params (a copy, made
    per evaluation)."""
    decoder = network.EncoderDecoder(dataclasses.replace(config.for_inference(), scan_layers=False))
    if not config.scan_layers:
        return decoder, lambda params: params
    return decoder, lambda params: scan_utils.unscan_params(params, config)


def decode_samples(
    module, params, task: str, lengths: Mapping[str, int], num: int, mesh
) -> list[dict[str, str]]:
    """Greedy span predictions (on the KV cache) for the first `num` validation examples."""
    from switch_t5 import decoding
    from switch_t5.data import show as show_lib
    from switch_t5.data import vocab as vocab_lib

    rows = show_lib.show(task, "validation", num, dict(lengths))
    if not rows:
        return []
    vocabulary = gin_free_vocabulary(task)
    # Replicated tiny batch: the sample is a few rows, whatever the mesh.
    enc = np.stack([_pad_rows(r["inputs"], lengths["inputs"]) for r in rows])
    with jax.set_mesh(mesh), partitioning.axis_rules():
        out = jax.jit(
            lambda p, b: (
                decoding.decode_batch(
                    module, p, b, method="greedy", max_decode_length=lengths["targets"]
                ).tokens
            )
        )(params, {"encoder_input_tokens": enc})
    out = np.asarray(out)
    samples = []
    for r, pred in zip(rows, out):
        samples.append(
            {
                "inputs": r["inputs_text"],
                "targets": r["targets_text"],
                "prediction": vocab_lib.decode_with_sentinels(vocabulary, [int(t) for t in pred]),
            }
        )
    return samples


def gin_free_vocabulary(task: str):
    from switch_t5.data import tasks as tasks_lib

    return tasks_lib.get_vocabulary(task)


def _write_config(model_dir: str, config: SwitchConfig, args: Mapping[str, Any]) -> None:
    lines = [gin.config_str().rstrip(), "", "# Resolved by switch_t5.train:"]
    lines += [f"#   train.{k} = {v!r}" for k, v in args.items()]
    lines += [f"#   SwitchConfig.{k} = {v!r}" for k, v in dataclasses.asdict(config).items()]
    checkpoints.write_text(checkpoints.path(model_dir, "config.gin"), "\n".join(lines) + "\n")


# ---------------------------------------------------------------------------------------------
# The library function.
# ---------------------------------------------------------------------------------------------


@gin.configurable("train", module="switch_t5", denylist=["model_config"])
def train(
    model_dir: str = gin.REQUIRED,
    train_steps: int = gin.REQUIRED,
    mixture_or_task_name: str = gin.REQUIRED,
    task_feature_lengths: Mapping[str, int] | None = None,
    batch_size: int = 256,
    eval_period: int = 1000,
    eval_steps: int | None = 20,
    checkpoint_period: int = 1000,
    keep_checkpoints: int = 3,
    async_checkpointing: bool = True,
    checkpoint_checksums: bool = False,
    log_every: int = 100,
    random_seed: int = 0,
    mesh_data: int = -1,
    mesh_expert: int | None = None,
    mesh_model: int = 1,
    optimizer: str = "adafactor",
    optimizer_state_dtype: str = "float32",
    lr_schedule: str = "rsqrt",
    base_learning_rate: float = 1.0,
    warmup_steps: int = 10_000,
    decay_steps: int | None = None,
    weight_decay: float | None = None,
    num_microbatches: int = 1,
    z_loss: float = 1e-4,
    pack: bool = True,
    profile_steps: tuple[int, int] | None = None,
    compilation_cache_dir: str | None = None,
    peak_flops_per_device: float | None = None,
    num_samples: int = 0,
    make_plots: bool = True,
    progress: str = "auto",
    initial_checkpoint: Any = None,
    infer_eval_period: int = 0,
    keep_best_by: str | None = None,
    restart_data_stream: bool = False,
    model_config: SwitchConfig | None = None,
) -> TrainResult:
    """Pretrains (or resumes pretraining) a Switch Transformer; see the module docstring.

    Args:
      model_dir: MODEL_DIR, local path or gs:// URL: checkpoints, metrics.jsonl, tensorboard/,
        plots/, config.gin.
      train_steps: TRAIN_STEPS, the total number of optimizer steps (a resumed run continues to
        it).
      mixture_or_task_name: MIXTURE_OR_TASK_NAME, a seqio task (registered from gin macros by
        `switch_t5.data_gin.register_tasks`).
      task_feature_lengths: TASK_FEATURE_LENGTHS, {"inputs": N, "targets": M}; default T5's
        {"inputs": 512, "targets": 114}.
      batch_size: BATCH_SIZE, global examples (packed rows) per step.
      eval_period: EVAL_PERIOD: evaluate every N steps and at the end; 0 = never.
      eval_steps: validation batches per evaluation; None = the whole split.
      checkpoint_period: CHECKPOINT_PERIOD: save every N steps and at the end.
      keep_checkpoints: keep the last K checkpoints.
      async_checkpointing: write checkpoints in the background.
      checkpoint_checksums: record SHA-256 checksums of every checkpoint file (verified on
        restore; catches bit flips; costs one re-read per save, see README "Reliability").
      log_every: LOG_EVERY: log (metrics.jsonl, TensorBoard, progress) every N steps.
      random_seed: RANDOM_SEED for the init, dropout, router jitter and the data order.
      mesh_data: data-parallel mesh axis size (-1 = the rest).
      mesh_expert: expert mesh axis size; None = as many partitions as the experts allow.
      mesh_model: model (tensor) parallel axis size.
      optimizer: "adafactor" (T5X: factored, decay 0.8, param scaling, clipping 1.0) or "adamw".
      optimizer_state_dtype: "float32" or "bfloat16": the storage dtype of Adafactor's second
        moments (AdamW: first moment); updates are computed in float32. May change on resume
        (the state is cast), as may `SwitchConfig.param_dtype`.
      lr_schedule: "rsqrt" (T5), "constant", "linear_rsqrt" or "cosine" (`optim.make_schedule`).
      base_learning_rate: see the schedule (rsqrt: lr = base / sqrt(max(step, warmup))).
      warmup_steps: see the schedule (T5: 10k steps at 0.01).
      decay_steps: the cosine schedule's length.
      weight_decay: decoupled weight decay (Adafactor: none by default; AdamW: 0.01).
      num_microbatches: gradient accumulation over this many microbatches per step.
      z_loss: output-logit z-loss coefficient (T5X 1e-4).
      pack: pack several examples per row.
      profile_steps: (N, M): record a jax.profiler trace of steps N..M into MODEL_DIR/profile.
      compilation_cache_dir: JAX persistent compilation cache; None = ~/.cache/switch_t5/jax_cache
        unless already configured, "" = off.
      peak_flops_per_device: peak FLOP/s of one device for the MFU estimate; None = known TPU/GPU
        kinds only.
      num_samples: decode this many validation examples greedily at the end and print them.
      make_plots: write MODEL_DIR/plots/{loss,expert_load}.png at the end.
      progress: "auto", "tqdm", "lines" or "none".
      initial_checkpoint: fine-tuning: an `init_checkpoint.InitialCheckpoint` whose params start
        the run, with a fresh optimizer state at step 0 (a checkpoint already in model_dir wins:
        the run resumes).
      infer_eval_period: INFER_EVAL_PERIOD: every N steps and at the end, decode the validation
        split greedily and score it (`switch_t5.eval`; MODEL_DIR/eval/step_N/, metrics.jsonl
        split "infer_eval"), keeping the best state in MODEL_DIR/best; 0 = never.
      keep_best_by: the metric key ranking checkpoints ("task/metric" or an average); None =
        the task's first metric or the mixture's average.
      restart_data_stream: resuming with data settings that changed since the checkpoint
        (batch size, seed, lengths, task) keeps its params, optimizer state and step and starts
        a new data stream with the new settings (from the beginning of the data, in the order
        of the new seed). False: such a resume is refused. A stream whose settings did not
        change always continues exactly, so the flag may stay set across restarts.
      model_config: the network config; None = from gin (`SwitchConfig` bindings), vocabulary
        size from the task when gin leaves it unset.

    Returns:
      A TrainResult.

    Raises:
      TrainConfigError: bad settings (before anything is compiled).
      checkpoints.ModelDirLockedError: another run is training in model_dir.
      checkpoints.CheckpointMismatchError: model_dir holds a checkpoint of another model.
      checkpoints.ModelDirIsFileError: model_dir is a file.
      DataStreamChangedError: resuming with other data settings without restart_data_stream.
      NonFiniteLossError: the loss became NaN/Inf (names the step).
    """
    if task_feature_lengths is None:
        task_feature_lengths = {"inputs": 512, "targets": 114}
    args = {
        k: v for k, v in locals().items() if k not in ("model_config",) and not k.startswith("_")
    }
    _check_args(args)
    checkpoints.check_model_dir(model_dir)
    cache_dir = configure_compilation_cache(compilation_cache_dir)

    # Data and model config: every check that can fail does so before compiling.
    from switch_t5 import data_gin

    initial = _initial_checkpoint_ref(initial_checkpoint)
    _progress(f"loading the task {mixture_or_task_name} and its vocabulary ...")
    data_gin.register_tasks(mixture_or_task_name)
    vocabulary = data_gin.get_vocabulary(mixture_or_task_name)
    task_feature_lengths = data_gin.check_lengths(mixture_or_task_name, task_feature_lengths)
    reshape = initial_checkpoint is not None and (
        not initial_checkpoint.strict or bool(initial_checkpoint.assignment_map)
    )
    config = resolve_model_config(model_config, vocabulary, mixture_or_task_name, initial, reshape)
    from switch_t5.data import vocab as vocab_lib

    vocab_meta = {
        "path": getattr(vocabulary, "sentencepiece_model_file", ""),
        "hash": vocab_lib.vocab_fingerprint(vocabulary).split("sha256=")[-1],
        "fingerprint": vocab_lib.vocab_fingerprint(vocabulary),
        "size": int(vocabulary.vocab_size),
    }
    task = eval_lib.task_record(mixture_or_task_name)  # eval reads the run's task from it
    meta = checkpoints.make_meta(config, vocab_meta, task_feature_lengths, task)

    # Several TPU slices / GPU nodes: expert and model axes inside each (hybrid mesh).
    mesh = multihost.make_mesh_for_job(
        mesh_data, mesh_expert, mesh_model, num_experts=config.num_experts
    )
    batch_shards = mesh.shape["data"] * mesh.shape["expert"]
    micro_rows = batch_size // num_microbatches
    if micro_rows % batch_shards:
        raise TrainConfigError(
            f"batch_size={batch_size} / num_microbatches={num_microbatches} = {micro_rows} rows "
            f"cannot be split over the {batch_shards} batch shards (data x expert = "
            f"{mesh.shape['data']} x {mesh.shape['expert']}); use a multiple of {batch_shards}"
        )
    is_main = jax.process_index() == 0
    lock = checkpoints.ModelDirLock(model_dir) if is_main else None
    if lock is not None:
        lock.acquire()
    logger = None
    ckpt = None
    try:
        if is_main:
            checkpoints.makedirs(model_dir)

        _progress("initializing the model and the data pipeline ...")
        module = network.EncoderDecoder(config)
        schedule = optim.make_schedule(lr_schedule, base_learning_rate, warmup_steps, decay_steps)
        setup = train_state.setup_train_state(
            lambda rng: network.init_variables(config, rng),
            lambda specs: optim.make_optimizer(
                optimizer,
                schedule,
                specs,
                weight_decay=weight_decay,
                state_dtype=optimizer_state_dtype,
            ),
            mesh,
            random_seed,
        )
        loss_config = trainer.LossConfig(
            z_loss, config.load_balancing_loss_weight, config.router_z_loss_weight
        )
        train_pipe = _pipeline(
            mixture_or_task_name,
            "train",
            task_feature_lengths,
            batch_size,
            random_seed,
            shuffle=True,
            pack=pack,
            repeat=True,
        )
        ckpt = checkpoints.Checkpointer(
            model_dir, keep_checkpoints, async_checkpointing, checkpoint_checksums
        )
        state, latest, init_message = _starting_state(
            ckpt,
            setup,
            meta,
            train_pipe,
            initial_checkpoint,
            random_seed,
            vocab_meta,
            restart_data_stream,
        )
        start_step = int(jax.device_get(state.step))  # the restored checkpoint's step, or 0
        if is_main:
            # Only now: a refused resume (another model, changed data settings) leaves the
            # config.gin of the run it refused to continue as it was.
            _write_config(model_dir, config, args)
            # Steps logged after the checkpoint (or, killed before the first one committed,
            # after the start) are redone now.
            metrics_logging.truncate_metrics(model_dir, start_step)

        b_shardings = trainer.batch_shardings({k: None for k in _feature_keys()}, mesh)
        train_step = trainer.make_train_step(
            module,
            setup.optimizer,
            loss_config,
            setup.shardings,
            b_shardings,
            mesh,
            num_microbatches,
        )
        eval_step = eval_pipe = None
        if eval_period:
            eval_step = trainer.make_eval_step(
                module, loss_config, setup.shardings.params, b_shardings, mesh
            )
            eval_pipe = _pipeline(
                mixture_or_task_name,
                "validation",
                task_feature_lengths,
                batch_size,
                random_seed,
                shuffle=False,
                pack=pack,
                repeat=False,
            )

        abstract_params = setup.abstract_state.params
        flops = _flops_per_step(abstract_params, config, batch_size, task_feature_lengths)
        peak = peak_flops_per_device or metrics_logging.peak_flops_per_device(
            jax.devices()[0].device_kind
        )
        logger = metrics_logging.MetricsLogger(
            model_dir, train_steps, start_step, enabled=is_main, progress=progress
        )
        logger.message(
            f"switch_t5.train: {network.param_count(abstract_params):,} params "
            f"({config.num_experts} experts), mesh {dict(mesh.shape)}, steps {start_step} -> "
            f"{train_steps}"
            + (f", resumed from checkpoint {start_step}" if latest else "")
            + init_message
            + (f", compilation cache {cache_dir}" if cache_dir else "")
        )

        decode_module, decode_params = _for_decoding(config)
        infer_eval_fn, best_keeper = None, None
        if infer_eval_period:
            evaluator = eval_lib.Evaluator(
                decode_module, mixture_or_task_name, task_feature_lengths, batch_size, mesh
            )
            best_keeper = eval_lib.BestCheckpointKeeper(model_dir, keep_best_by)

            def infer_eval_fn(state, at: int) -> dict[str, float]:
                out = evaluator.evaluate(
                    decode_params(state.params),
                    step=at,
                    output_dir=str(checkpoints.path(model_dir, "eval", f"step_{at}")),
                )
                improved = best_keeper.update(at, out, state, train_pipe.get_state(), meta)
                logger.message(
                    f"step {at}: {out.main_metric} = {out.main_value:.4f}"
                    + (" (best so far, kept)" if improved else "")
                )
                return out.metrics

        result = _loop(
            state=state,
            start_step=start_step,
            train_steps=train_steps,
            train_step=train_step,
            train_pipe=train_pipe,
            b_shardings=b_shardings,
            eval_fn=(
                (
                    lambda params: evaluate(
                        eval_step, params, eval_pipe, b_shardings, loss_config, eval_steps
                    )
                )
                if eval_period
                else None
            ),
            eval_period=eval_period,
            checkpoint_period=checkpoint_period,
            log_every=log_every,
            ckpt=ckpt,
            meta=meta,
            logger=logger,
            flops=flops,
            peak=peak,
            profile_steps=profile_steps,
            model_dir=model_dir,
            infer_eval_fn=infer_eval_fn,
            infer_eval_period=infer_eval_period,
        )
        if best_keeper is not None:
            best_keeper.close()
        state, step, preempted, stop_signal, eval_losses, seconds, tps = result

        plots = {}
        if make_plots and is_main and not preempted:
            plots = _make_plots(
                module, abstract_params, model_dir, batch_size, task_feature_lengths
            )
        samples = []
        if num_samples and not preempted:
            samples = decode_samples(
                decode_module,
                decode_params(state.params),
                mixture_or_task_name,
                task_feature_lengths,
                num_samples,
                mesh,
            )
        return TrainResult(
            step=step,
            start_step=start_step,
            preempted=preempted,
            eval_losses=eval_losses,
            model_dir=str(model_dir),
            checkpoint_dir=str(ckpt.directory),
            tensorboard_dir=str(checkpoints.path(model_dir, metrics_logging.TENSORBOARD_DIR)),
            plots=plots,
            train_seconds=seconds,
            train_tokens_per_sec=tps,
            samples=samples,
            stop_signal=stop_signal,
        )
    finally:
        if ckpt is not None:
            ckpt.close()
        if logger is not None:
            try:
                logger.close()
            except OSError as e:
                # A full disk also fails the last log flush: never hide the error that stopped
                # the run (e.g. CheckpointSaveError) behind it.
                if sys.exc_info()[1] is None:
                    raise
                log.warning("closing the metrics logs failed too: %s", e)
        if lock is not None:
            lock.release()


def _initial_checkpoint_ref(initial_checkpoint) -> init_checkpoint.CheckpointRef | None:
    """The fine-tuning checkpoint (None: none given, or none there with fallback_to_scratch).

    When its meta records a vocabulary and gin does not set VOCABULARY_PATH, the macro is set
    to the checkpoint's vocabulary file, so that the task tokenizes as the checkpoint was
    trained (and the run's config.gin records it for eval).
    """
    if initial_checkpoint is None:
        return None
    ref = init_checkpoint.find_checkpoint(initial_checkpoint.path, initial_checkpoint.step)
    if ref is None:
        if initial_checkpoint.fallback_to_scratch:
            return None
        raise init_checkpoint.InitialCheckpointError(
            f"no complete checkpoint under {initial_checkpoint.path}; give a MODEL_DIR, its "
            "checkpoints/ folder or one step's folder (.../checkpoints/N), or set "
            "fallback_to_scratch=True"
        )
    try:
        gin.query_parameter("VOCABULARY_PATH/macro.value")
    except ValueError:
        path = init_checkpoint.recorded_vocabulary_path(ref)
        if path is not None:
            log.info("VOCABULARY_PATH from the initial checkpoint: %s", path)
            with gin.unlock_config():
                gin.bind_parameter("VOCABULARY_PATH/macro.value", path)
    return ref


def _starting_state(
    ckpt,
    setup,
    meta,
    train_pipe,
    initial_checkpoint,
    seed: int,
    vocab_meta,
    restart_data_stream: bool = False,
):
    """(state, restored step or None, log text): the newest readable checkpoint in MODEL_DIR
    (damaged newer ones are moved aside with a warning; the data position is restored too), else
    the fine-tuning initial checkpoint, else a fresh initialisation."""
    restored = ckpt.restore_latest(setup.abstract_state, expected_meta=meta)
    if restored is not None:
        message = _resume_data_stream(train_pipe, restored, ckpt, restart_data_stream)
        return restored.state, restored.step, message
    if initial_checkpoint is None:
        return setup.init_fn(), None, ""
    state, loaded = init_checkpoint.initial_train_state(
        setup,
        initial_checkpoint.path,
        seed=seed,
        step=initial_checkpoint.step,
        strict=initial_checkpoint.strict,
        assignment_map=initial_checkpoint.assignment_map,
        fallback_to_scratch=initial_checkpoint.fallback_to_scratch,
        expected_vocabulary=vocab_meta,
    )
    message = (
        f", params from {loaded.source.step_dir} ({len(loaded.fresh)} fresh)"
        if loaded.source is not None
        else f", from scratch (no checkpoint under {initial_checkpoint.path})"
    )
    return state, None, message


def _resume_data_stream(train_pipe, restored, ckpt, restart: bool) -> str:
    """Continues the checkpoint's data stream; when its settings changed, starts a new one
    (restart) or raises DataStreamChangedError. Returns the text for the first log line."""
    try:
        train_pipe.set_state(restored.data_state)
        return ""
    except ValueError as e:
        saved = (restored.data_state or {}).get("config") or {}
        now = train_pipe.get_state()["config"]  # a fresh stream: nothing read from it yet
        diffs = [
            f"{k} saved {saved.get(k)!r}, now {v!r}" for k, v in now.items() if saved.get(k) != v
        ]
        reason = "; ".join(diffs) if saved and diffs else str(e)
    where = ckpt.step_dir(restored.step)
    if not restart:
        raise DataStreamChangedError(
            f"cannot resume {where}: its data stream was saved with other settings ({reason}). "
            "Restore those settings to continue it exactly, or keep the params, optimizer state "
            f"and step {restored.step} and start a new data stream with this run's settings: "
            "train.restart_data_stream=True (on the command line "
            "--gin.train.restart_data_stream=True; the new stream starts from the beginning of "
            "the data, in the order of this run's seed)."
        )
    log.warning(
        "restart_data_stream=True: the data stream of %s is not continued (%s); a new one starts "
        "at step %d with this run's settings",
        where,
        reason,
        restored.step,
    )
    return f", new data stream (restart_data_stream=True; {reason})"


def _make_plots(module, abstract_params, model_dir: str, batch_size: int, lengths) -> dict:
    """MODEL_DIR/plots/{loss,expert_load}.png from metrics.jsonl."""
    shapes = {
        k: jax.ShapeDtypeStruct(
            (batch_size, lengths["inputs" if k.startswith("encoder") else "targets"]), np.int32
        )
        for k in _feature_keys()
    }
    layer_names = trainer.moe_layer_names(module, abstract_params, shapes)
    return metrics_logging.make_plots(model_dir, layer_names)


def _feature_keys() -> tuple[str, ...]:
    from switch_t5.data import pipeline as pipeline_lib

    return pipeline_lib.FEATURE_KEYS


def _pipeline(task, split, lengths, batch_size, seed, *, shuffle, pack, repeat):
    from switch_t5.data import pipeline as pipeline_lib

    return pipeline_lib.InputPipeline(
        task,
        split,
        lengths,
        batch_size,
        seed=seed,
        shuffle=shuffle,
        pack=pack,
        repeat=repeat,
    )


def _loop(
    *,
    state,
    start_step,
    train_steps,
    train_step,
    train_pipe,
    b_shardings,
    eval_fn,
    eval_period,
    checkpoint_period,
    log_every,
    ckpt,
    meta,
    logger,
    flops,
    peak,
    profile_steps,
    model_dir,
    infer_eval_fn=None,
    infer_eval_period=0,
):
    """The training loop: step, log, evaluate, checkpoint, stop on SIGTERM or Ctrl-C."""
    pending = _PendingMetrics()
    eval_losses: list[tuple[int, float]] = []
    step = start_step
    t_start = time.perf_counter()
    t_log = t_start
    total_tokens, total_time = 0, 0.0
    preempted = False
    stop_signal = None
    profiling = False

    def save(at: int) -> None:
        ckpt.save(at, state, train_pipe.get_state(), meta)

    with _Preemption() as preemption:
        while step < train_steps:
            if profile_steps and step == profile_steps[0] and not profiling:
                jax.profiler.start_trace(str(checkpoints.path(model_dir, "profile")))
                profiling = True
            local = next(train_pipe)
            tokens = (
                int(
                    np.count_nonzero(local["encoder_input_tokens"])
                    + np.count_nonzero(local["decoder_target_tokens"])
                )
                * jax.process_count()
            )
            batch = _global_batch(local, b_shardings, train_pipe.global_batch_size)
            if step == start_step:
                _progress("compiling the train step ...")
                t_compile = time.perf_counter()
                state, metrics = train_step(state, batch)
                jax.block_until_ready(state.step)
                _progress(
                    f"compiling the train step ... done in {time.perf_counter() - t_compile:.0f} s"
                )
            else:
                state, metrics = train_step(state, batch)
            step += 1
            faults.at_step(step)  # fault-injection hooks (SWITCH_T5_FAULT); no-ops when unset
            pending.add(step, metrics, tokens)
            if profiling and step >= profile_steps[1]:
                jax.block_until_ready(state)
                jax.profiler.stop_trace()
                profiling = False

            stop = preemption.reached(step)
            last = step == train_steps
            if step % log_every == 0 or last or stop:
                items = pending.flush()
                jax.block_until_ready(state.step)
                now = time.perf_counter()
                summary = _summarise(items, now - t_log, flops, peak)
                # Throughput leaves out the first interval (compilation).
                if step - len(items) > start_step:
                    total_tokens += sum(t for _, _, t in items)
                    total_time += now - t_log
                t_log = now
                logger.write(step, "train", summary)
                logger.progress(step, summary)
            if stop:
                pending.check()
                save(step)
                ckpt.wait()
                stop_signal = preemption.signal_name or "preemption notice"
                logger.message(
                    f"{stop_signal}: saved checkpoint {step} in {ckpt.directory}; exiting "
                    "(rerun the same command to resume)"
                )
                preempted = True
                break
            if step % checkpoint_period == 0 or last:
                pending.check()  # never save parameters after a NaN/Inf step
                save(step)
                t_log = time.perf_counter()  # nor is the blocking part of a save
            if eval_fn is not None and (step % eval_period == 0 or last):
                result = eval_fn(state.params)
                eval_losses.append((step, result["loss"]))
                logger.write(step, "eval", result)
                logger.progress(step, result, split="eval")
                t_log = time.perf_counter()  # evaluation time is not training time
            if infer_eval_fn is not None and (step % infer_eval_period == 0 or last):
                pending.check()  # never keep parameters after a NaN/Inf step
                logger.write(step, "infer_eval", infer_eval_fn(state, step))
                t_log = time.perf_counter()
    if profiling:
        jax.profiler.stop_trace()
    ckpt.wait()
    seconds = time.perf_counter() - t_start
    tps = total_tokens / total_time if total_time > 0 else None
    return state, step, preempted, stop_signal, eval_losses, seconds, tps


# ---------------------------------------------------------------------------------------------
# Command line.
# ---------------------------------------------------------------------------------------------


def _add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--coordinator_address", default=None, help="multi-process: host:port")
    parser.add_argument("--num_processes", type=int, default=None)
    parser.add_argument("--process_id", type=int, default=None)
    parser.description = (
        "Pretrain a Switch Transformer. Common macros: MODEL_DIR, TRAIN_STEPS, BATCH_SIZE, "
        "TASK_FEATURE_LENGTHS, MIXTURE_OR_TASK_NAME, NUM_EXPERTS, CHECKPOINT_PERIOD, "
        "EVAL_PERIOD, LOG_EVERY, RANDOM_SEED (e.g. --gin.TRAIN_STEPS=1000)."
    )


def print_summary(result: TrainResult) -> None:
    """The closing lines of a run: where things are, eval losses, the sample."""
    print()
    if result.preempted:
        how = "Interrupted (Ctrl-C)" if result.stop_signal == "SIGINT" else "Preempted"
        print(
            f"{how} at step {result.step}: checkpoint {result.step} saved; rerun the same "
            "command to resume."
        )
    else:
        print(
            f"Trained steps {result.start_step} -> {result.step} in {result.train_seconds:.0f} s"
            + (
                f" ({result.train_tokens_per_sec:,.0f} tokens/s)"
                if result.train_tokens_per_sec
                else ""
            )
        )
    if result.eval_losses:
        first, last = result.eval_losses[0], result.eval_losses[-1]
        print(f"Eval loss: {first[1]:.4f} at step {first[0]} -> {last[1]:.4f} at step {last[0]}")
    print(f"Checkpoints:      {result.checkpoint_dir}")
    print(
        f"TensorBoard logs: {result.tensorboard_dir}  "
        f"(tensorboard --logdir {result.tensorboard_dir})"
    )
    print(f"Metrics:          {checkpoints.path(result.model_dir, metrics_logging.METRICS_FILE)}")
    for name, p in result.plots.items():
        print(f"Plot ({name}):".ljust(18) + p)
    for i, s in enumerate(result.samples):
        print(f"\nSample {i + 1} (greedy, KV cache)")
        print(f"  input:      {s['inputs']}")
        print(f"  target:     {s['targets']}")
        print(f"  prediction: {s['prediction']}")


def main(argv: Sequence[str]) -> TrainResult:
    flags = gin_utils.parse_flags(argv, _add_arguments)
    if not flags.gin_files:
        raise errors.UserError(
            "pass at least one --gin_file, e.g. --gin_file=configs/experiments/quickstart.gin"
        )
    import switch_t5.data_gin  # noqa: F401  (registers its configurables before parsing)

    gin_utils.parse_gin(flags.gin_files, flags.gin_bindings, finalize=False)
    check_required_macros()
    gin_utils.finalize_config()
    maybe_initialize_distributed(
        flags.rest.coordinator_address, flags.rest.num_processes, flags.rest.process_id
    )
    result = train()
    if jax.process_index() == 0:
        print_summary(result)
    if result.stop_signal == "SIGINT":
        # Interrupted, not finished: a shell stops `train && next` here (SIGTERM exits 0: the
        # scheduler that sent it restarts the job).
        raise SystemExit(128 + signal.SIGINT)
    return result


def console_main() -> None:
    """The `switch-t5-train` console script."""
    gin_utils.run_console_main(main)


if __name__ == "__main__":
    console_main()
