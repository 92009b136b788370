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
import inspect
import logging
import os
import shutil
import signal
from collections.abc import Sequence
from typing import Any

import gin
import jax

from switch_t5 import (
    distill,
    errors,
    gin_utils,
    init_checkpoint,
    multihost,
    optim,
    partitioning,
    run_dir,
    training,
)
from switch_t5.config import SwitchConfig
from switch_t5.trainer import LossConfig
from switch_t5.training import TrainResult
from switch_t5.training_config import REQUIRED, TrainConfigError, TrainingConfig

log = logging.getLogger(__name__)

# Macros a run gin file may leave as %gin.REQUIRED; checked before anything runs.
REQUIRED_MACROS = ("MODEL_DIR", "MIXTURE_OR_TASK_NAME", "TRAIN_STEPS", "TEACHER_CHECKPOINT_PATH")


# ---------------------------------------------------------------------------------------------
# `train.*`: the gin names users write, mapped onto the typed configs.
# ---------------------------------------------------------------------------------------------

# `train.<name>` -> OptimizerConfig field where the names differ; its other fields keep theirs.
_OPTIMIZER_RENAMES = {"optimizer": "name", "optimizer_state_dtype": "state_dtype"}
# `train.mesh_*` -> MeshConfig field.
_MESH_NAMES = {"mesh_data": "data", "mesh_expert": "expert", "mesh_model": "model"}


def _flat_names() -> dict[str, tuple[type, str]]:
    """{train.<name>: (config class, field)}: every field of the typed configs `train` builds."""
    out = {f.name: (TrainingConfig, f.name) for f in dataclasses.fields(TrainingConfig)}
    to_flat = {v: k for k, v in _OPTIMIZER_RENAMES.items()}
    for f in dataclasses.fields(optim.OptimizerConfig):
        out[to_flat.get(f.name, f.name)] = (optim.OptimizerConfig, f.name)
    out.update({k: (partitioning.MeshConfig, v) for k, v in _MESH_NAMES.items()})
    out["z_loss"] = (LossConfig, "z_loss")
    for f in dataclasses.fields(distill.DistillationConfig):
        out[f.name] = (distill.DistillationConfig, f.name)
    return out


def _flat_defaults() -> dict[str, Any]:
    """{train.<name>: default}; each default lives in its config class."""
    out: dict[str, Any] = {}
    for flat, (cls, field) in _flat_names().items():
        default = {f.name: f.default for f in dataclasses.fields(cls)}[field]
        out[flat] = gin.REQUIRED if cls is TrainingConfig and field in REQUIRED else default
    out["initial_checkpoint"] = None
    out["model_config"] = None
    return out


def _settings(values: dict[str, Any]) -> training.RunSettings:
    """The typed configs from `train.*` values (each lists all its problems at once)."""
    fields: dict[type, dict[str, Any]] = {}
    for flat, (cls, field) in _flat_names().items():
        value = values[flat]
        fields.setdefault(cls, {})[field] = None if value is gin.REQUIRED else value
    built, problems = {}, []
    for cls, kwargs in fields.items():
        try:
            built[cls] = cls(**kwargs)
        except errors.UserError as e:
            problems.append(str(e))
    if problems:  # every config's problems in one error
        raise TrainConfigError("; ".join(problems))
    return training.RunSettings(
        training=built[TrainingConfig],
        optimizer=built[optim.OptimizerConfig],
        losses=built[LossConfig],
        mesh=built[partitioning.MeshConfig],
        initial_checkpoint=values["initial_checkpoint"],
        distillation=built[distill.DistillationConfig],
    )


def train(**kwargs: Any) -> TrainResult:
    """Pretrains or fine-tunes (or resumes) a Switch Transformer: `train.*` gin bindings ->
    `training.run_training`. Every keyword is a field of `TrainingConfig` (documented there),
    of `optim.OptimizerConfig` (`optimizer` and `optimizer_state_dtype` are its `name` and
    `state_dtype`; AdamW's b1/b2/eps, Adafactor's decay_rate, clipping_threshold, ...), of
    `partitioning.MeshConfig` (mesh_data, mesh_expert, mesh_model), `z_loss`
    (`trainer.LossConfig`), of `distill.DistillationConfig` (teacher_checkpoint_path,
    distillation_alpha, distillation_temperature, student_mlp_init, teacher_step),
    `initial_checkpoint` (an `init_checkpoint.
    InitialCheckpoint`: fine-tuning) or `model_config` (a SwitchConfig; None = from gin, or from
    the initial checkpoint when its meta records one)."""
    values = {**_flat_defaults(), **kwargs}
    settings = _settings(values)
    ref = _initial_checkpoint_ref(settings.initial_checkpoint)
    if ref is None and settings.distillation.enabled:
        _default_vocabulary_from(_teacher_ref(settings.distillation), "the teacher")
    from switch_t5 import data_gin

    data_gin.register_tasks(settings.training.mixture_or_task_name)
    config, from_task = _model_config(values["model_config"], ref, settings.initial_checkpoint)
    return training.run_training(
        settings,
        config,
        vocab_size_from_task=from_task,
        task_macros=data_gin.task_record(settings.training.mixture_or_task_name)["data"],
        operative_config=gin.config_str(),
    )


train.__signature__ = inspect.Signature(
    [
        inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=default)
        for name, default in _flat_defaults().items()
    ],
    return_annotation=TrainResult,
)
train = gin.configurable("train", module="switch_t5", denylist=["model_config"])(train)


def _model_config(
    config: SwitchConfig | None,
    initial: init_checkpoint.CheckpointRef | None,
    initial_checkpoint: init_checkpoint.InitialCheckpoint | None,
) -> tuple[SwitchConfig, bool]:
    """(model config, whether its vocab_size comes from the task).

    Fine-tuning from a checkpoint whose meta records its model config, with no config given:
    the checkpoint's config, with the runtime fields gin binds explicitly
    (`init_checkpoint.model_config_from_checkpoint`; an architecture field bound to another
    value is an error, unless the restore reshapes: non-strict or an assignment map), so a run
    gin file needs no model gin. Otherwise the gin-bound SwitchConfig; when gin leaves its
    vocab_size unset, the task's padded vocabulary size is used.
    """
    if config is not None:
        return config, False
    gin_utils.register_configurables()
    if initial is not None and initial.meta.get("model_config"):
        reshape = not initial_checkpoint.strict or bool(initial_checkpoint.assignment_map)
        bindings = gin.get_bindings("switch_t5.SwitchConfig")
        return init_checkpoint.model_config_from_checkpoint(initial, bindings, reshape), False
    bound = "vocab_size" in gin.get_bindings("switch_t5.SwitchConfig")
    return gin_utils.make_model_config(), not bound


def _macro_value(value):
    """A binding's value through its macros (a macro of a macro included): `%NAME` is stored
    as a reference to the macro's value."""
    for _ in range(16):
        if not isinstance(value, gin.config.ConfigurableReference):
            break
        value = value.scoped_configurable_fn()
    return value


def check_required_macros(names: Sequence[str] = REQUIRED_MACROS) -> None:
    """Raises GinConfigError naming a run macro left at %gin.REQUIRED."""
    for name in names:
        try:
            value = gin.query_parameter(f"{name}/macro.value")
        except ValueError:
            continue
        # `NAME = %gin.REQUIRED` is stored as a reference to the REQUIRED constant.
        if _macro_value(value) is gin.REQUIRED:
            raise gin_utils.GinConfigError(
                f"gin macro {name} is required but not set: pass --gin.{name}=... "
                f"(or set `{name} = ...` in a gin file)"
            )


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
    _default_vocabulary_from(ref, "the initial checkpoint")
    return ref


def _default_vocabulary_from(ref: init_checkpoint.CheckpointRef | None, what: str) -> None:
    """Binds VOCABULARY_PATH to the vocabulary `ref` records, when gin does not set it."""
    if ref is None:
        return
    try:
        gin.query_parameter("VOCABULARY_PATH/macro.value")
    except ValueError:
        path = init_checkpoint.recorded_vocabulary_path(ref)
        if path is not None:
            log.info("VOCABULARY_PATH from %s: %s", what, path)
            with gin.unlock_config():
                gin.bind_parameter("VOCABULARY_PATH/macro.value", path)


def _teacher_ref(settings: distill.DistillationConfig) -> init_checkpoint.CheckpointRef | None:
    return init_checkpoint.find_checkpoint(settings.teacher_checkpoint_path, settings.teacher_step)


def distillation_from_gin() -> distill.DistillationConfig:
    """The `train.*` distillation bindings of the parsed gin config (`switch_t5.plan` counts the
    teacher in its memory figure); no teacher when none is bound."""
    bindings = gin.get_bindings("switch_t5.train")
    kwargs = {}
    for f in dataclasses.fields(distill.DistillationConfig):
        if f.name in bindings:
            value = _macro_value(bindings[f.name])
            if value is gin.REQUIRED:
                raise gin_utils.GinConfigError(
                    f"train.{f.name} is required but not set (e.g. "
                    "--gin.TEACHER_CHECKPOINT_PATH=...)"
                )
            kwargs[f.name] = value
    return distill.DistillationConfig(**kwargs)


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
    elif result.train_steps is not None and result.start_step >= result.train_steps:
        print(
            f"Nothing to train: {result.model_dir} already holds the checkpoint of step "
            f"{result.start_step} and TRAIN_STEPS is {result.train_steps}. To continue this "
            "run, rerun with a larger --gin.TRAIN_STEPS; to start over, give another MODEL_DIR."
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
    # tensorboardX writes the event files; the `tensorboard` viewer is not a dependency.
    view = "tensorboard" if shutil.which("tensorboard") else "pip install tensorboard; tensorboard"
    print(f"TensorBoard logs: {result.tensorboard_dir}  ({view} --logdir {result.tensorboard_dir})")
    print(f"Metrics:          {run_dir.RunDir(result.model_dir).metrics_file}")
    for name, p in result.plots.items():
        print(f"Plot ({name}):".ljust(17) + " " + p)
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
