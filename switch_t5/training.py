"""A training run from typed configs: prepare, build, start, loop, finish.

`run_training` is what `python -m switch_t5.train` calls once its gin bindings are turned into
configs. It reads no gin. Each stage is a small function:

  prepare   the task's vocabulary and feature lengths (checked), the model config's vocabulary
            size, the checkpoint meta: everything that can fail does so before compiling;
  build     mesh, model, optimizer, train state, jitted steps (`run_builder`), pipelines;
  start     the newest readable checkpoint in MODEL_DIR, else the fine-tuning checkpoint, else a
            fresh init; then config.gin and the metrics log are brought in line with it;
  loop      `loop.run_loop` with the periodic actions (log, checkpoint, eval, infer-eval,
            profile, save-and-stop on preemption; NaN stop);
  finish    plots, decoded samples, the `TrainResult`.
"""

from __future__ import annotations

import dataclasses
import logging
import sys
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np

from switch_t5 import (
    checkpoints,
    distill,
    fileio,
    init_checkpoint,
    metrics_logging,
    multihost,
    network,
    optim,
    partitioning,
    run_builder,
    trainer,
)
from switch_t5 import flops as flops_lib
from switch_t5 import loop as loop_lib
from switch_t5.config import SwitchConfig, pad_vocab_size
from switch_t5.training_config import TrainConfigError, TrainingConfig

log = logging.getLogger(__name__)


class DataStreamChangedError(TrainConfigError):
    """Resuming: the checkpoint's data stream was saved with other data settings (batch size,
    seed, lengths, task); the message names them and `train.restart_data_stream`."""


@dataclasses.dataclass(frozen=True)
class RunSettings:
    """Everything a training run is built from, besides the network config.

    Attributes:
      training: what the run does.
      optimizer: the optimizer and its learning-rate schedule.
      losses: the loss weights; the router weights left None come from the model config.
      mesh: the (data, expert, model) axis sizes.
      initial_checkpoint: fine-tuning: where the params start from (a checkpoint already in
        MODEL_DIR wins: the run resumes).
      distillation: the teacher the model learns from (`switch_t5.distill`), if any.
    """

    training: TrainingConfig
    optimizer: optim.OptimizerConfig = dataclasses.field(default_factory=optim.OptimizerConfig)
    losses: trainer.LossConfig = dataclasses.field(default_factory=trainer.LossConfig)
    mesh: partitioning.MeshConfig = dataclasses.field(default_factory=partitioning.MeshConfig)
    initial_checkpoint: init_checkpoint.InitialCheckpoint | None = None
    distillation: distill.DistillationConfig = dataclasses.field(
        default_factory=distill.DistillationConfig
    )


@dataclasses.dataclass
class TrainResult:
    """What a run did.

    Attributes:
      step: the step the run stopped at.
      start_step: the step it started (or resumed) at.
      preempted: stopped early by SIGTERM or a first Ctrl-C (a checkpoint at `step` was
        written).
      eval_losses: [(step, eval loss)] of this run.
      model_dir: MODEL_DIR.
      checkpoint_dir: where the checkpoints are.
      tensorboard_dir: where the TensorBoard event files are.
      plots: {"loss": path, "expert_load": path}.
      train_seconds: wall time of the training loop (compilation included).
      train_tokens_per_sec: non-padding tokens per second over the run's logged steps.
      samples: [{"inputs", "targets", "prediction"}] decoded validation examples.
      stop_signal: "SIGTERM" or "SIGINT" when preempted, else None.
      train_steps: TRAIN_STEPS (a rerun of a finished run starts at or past it).
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
    train_steps: int | None = None


@dataclasses.dataclass(frozen=True)
class Prepared:
    """What `prepare` checked: the model config, the feature lengths, the checkpoint meta, and
    the distillation teacher (None: none)."""

    config: SwitchConfig
    lengths: dict[str, int]
    vocabulary: dict[str, Any]
    meta: dict[str, Any]
    teacher: distill.TeacherSpec | None = None


def prepare(
    training: TrainingConfig,
    model_config: SwitchConfig,
    vocab_size_from_task: bool,
    task_macros: Mapping[str, Any],
    distillation: distill.DistillationConfig | None = None,
) -> Prepared:
    """Vocabulary, lengths and meta of a registered task (see `switch_t5.data_gin`).

    `vocab_size_from_task`: the embedding gets `pad_vocab_size(task vocabulary size)` rows;
    otherwise the model's vocab_size must equal that, or one error names both sizes.
    `task_macros`: the data macros the task was built from (recorded with the checkpoints).
    `distillation`: its teacher checkpoint is found and checked against the student here.
    """
    from switch_t5 import data_gin
    from switch_t5.data import vocab as vocab_lib

    task = training.mixture_or_task_name
    loop_lib.progress_line(f"loading the task {task} and its vocabulary ...")
    vocabulary = data_gin.get_vocabulary(task)
    lengths = data_gin.check_lengths(task, training.task_feature_lengths)
    config = model_config
    if vocab_size_from_task:
        config = dataclasses.replace(config, vocab_size=pad_vocab_size(vocabulary.vocab_size))
    vocab_lib.check_model_vocab_size(vocabulary, config.vocab_size, task)
    record = vocab_lib.vocabulary_record(vocabulary)
    task_record = {"name": task, "data": dict(task_macros)}
    meta = checkpoints.make_meta(config, record, lengths, task_record)
    teacher = distill.resolve_teacher(distillation, config, record) if distillation else None
    return Prepared(config, lengths, record, meta, teacher)


def make_mesh(settings: RunSettings, prepared: Prepared) -> tuple[jax.sharding.Mesh, Prepared]:
    """The job's mesh (several slices/nodes: expert and model axes inside each) and the run's
    routing group sizes (`resolve_groups`), checked by the one mesh-fit rule
    (`partitioning.mesh_problems`) against the model and the batch, and against the
    distillation teacher, which runs on the same mesh (a dense student keeps the expert axis at
    1: the teacher's expert weights are then not split over it)."""
    t, m = settings.training, settings.mesh
    num_experts = prepared.config.num_experts
    mesh = multihost.make_mesh_for_job(m.data, m.expert, m.model, num_experts=num_experts)
    prepared = resolve_groups(prepared, t, dict(mesh.shape))
    models = [prepared.config] + ([prepared.teacher.config] if prepared.teacher else [])
    problems = [
        p
        for c in models
        for p in partitioning.mesh_problems(
            c, dict(mesh.shape), t.batch_size, t.num_microbatches, prepared.lengths
        )
    ]
    if problems:
        raise partitioning.MeshConfigError(
            f"mesh {dict(mesh.shape)} does not fit this run: " + "; ".join(problems)
        )
    return mesh, prepared


def recorded_model_config(model_dir: str) -> dict[str, Any]:
    """The model config MODEL_DIR's newest complete checkpoint records ({} when none does)."""
    try:
        ref = init_checkpoint.find_checkpoint(model_dir)
    except (init_checkpoint.InitialCheckpointError, OSError, ValueError):
        return {}  # unreadable: the restore reports (or quarantines) it
    return dict((ref.meta if ref is not None else {}).get("model_config") or {})


def resolve_groups(prepared: Prepared, t: TrainingConfig, mesh_sizes) -> Prepared:
    """The routing group sizes of the run, in its config and checkpoint meta: resuming, those
    the checkpoint recorded (`SwitchConfig.with_recorded_groups`); else, when the config leaves
    group_size unset, chosen from the global batch and lengths (`moe.resolve_group_sizes`), then
    recorded, so that neither a resume nor another mesh changes how the run routes."""
    from switch_t5 import moe

    config = prepared.config.with_recorded_groups(recorded_model_config(t.model_dir))
    shards = mesh_sizes["data"] * mesh_sizes["expert"]
    rows = max(t.batch_size // t.num_microbatches, 1)
    config = moe.resolve_group_sizes(config, rows, prepared.lengths, shards)
    if config == prepared.config:
        return prepared
    meta = {**prepared.meta, "model_config": checkpoints.make_meta(config)["model_config"]}
    return dataclasses.replace(prepared, config=config, meta=meta)


def run_training(
    settings: RunSettings,
    model_config: SwitchConfig,
    *,
    vocab_size_from_task: bool = False,
    task_macros: Mapping[str, Any] | None = None,
    operative_config: str = "",
) -> TrainResult:
    """Trains (or resumes training) in `settings.training.model_dir`; see the module docstring.

    Args:
      settings: the run's configs.
      model_config: the network config.
      vocab_size_from_task: take the model's vocab_size from the task (see `prepare`).
      task_macros: the data macros the task was built from, recorded with the checkpoints so
        that eval and infer can rebuild it (`data_gin.task_record`).
      operative_config: the gin text that configured the run, written (with the resolved
        configs) to MODEL_DIR/config.gin once the run is accepted.

    Raises:
      TrainConfigError: bad settings (before anything is compiled).
      checkpoints.ModelDirLockedError: another run is training in model_dir.
      checkpoints.CheckpointMismatchError: model_dir holds a checkpoint of another model.
      checkpoints.ModelDirIsFileError: model_dir is a file.
      DataStreamChangedError: resuming with other data settings without restart_data_stream.
      loop.NonFiniteLossError: the loss became NaN/Inf (names the step).
    """
    t = settings.training
    checkpoints.check_model_dir(t.model_dir)
    cache_dir = run_builder.configure_compilation_cache(t.compilation_cache_dir)
    prepared = prepare(
        t, model_config, vocab_size_from_task, task_macros or {}, settings.distillation
    )
    mesh, prepared = make_mesh(settings, prepared)
    is_main = jax.process_index() == 0
    lock = checkpoints.ModelDirLock(t.model_dir) if is_main else None
    if lock is not None:
        lock.acquire()
    session = _Session(cache_dir=cache_dir, operative_config=operative_config)
    try:
        return _train(settings, prepared, mesh, session)
    finally:
        session.close()
        if lock is not None:
            lock.release()


@dataclasses.dataclass
class _Session:
    """What a run opens (closed whatever happens) and the text it records."""

    cache_dir: str | None
    operative_config: str
    checkpointer: checkpoints.Checkpointer | None = None
    logger: metrics_logging.MetricsLogger | None = None

    def close(self) -> None:
        if self.checkpointer is not None:
            self.checkpointer.close()
        if self.logger is not None:
            try:
                self.logger.close()
            except OSError as e:
                # A full disk also fails the last log flush: never hide the error that stopped
                # the run (e.g. CheckpointSaveError) behind it.
                if sys.exc_info()[1] is None:
                    raise
                log.warning("closing the metrics logs failed too: %s", e)


def _train(settings: RunSettings, prepared: Prepared, mesh, session: _Session) -> TrainResult:
    t, config = settings.training, prepared.config
    is_main = jax.process_index() == 0
    if is_main:
        fileio.makedirs(t.model_dir)
    loop_lib.progress_line("initializing the model and the data pipeline ...")
    teacher = distill.load_teacher(prepared.teacher, mesh) if prepared.teacher else None
    run = run_builder.build_run(
        config,
        mesh,
        lambda specs: optim.make_optimizer(settings.optimizer, logical_specs=specs),
        settings.losses.for_model(config),
        seed=t.random_seed,
        num_microbatches=t.num_microbatches,
        teacher=teacher,
    )
    train_pipe = _pipeline(t, prepared.lengths, "train")
    session.checkpointer = checkpoints.Checkpointer(
        t.model_dir, t.keep_checkpoints, t.async_checkpointing, t.checkpoint_checksums
    )
    state, resumed, init_message = starting_state(
        session.checkpointer, run.setup, prepared, train_pipe, settings, teacher
    )
    start_step = int(jax.device_get(state.step))  # the restored checkpoint's step, or 0
    if is_main:
        # Only now: a refused resume (another model, changed data settings) leaves the
        # config.gin of the run it refused to continue as it was.
        write_config(session.operative_config, settings, config)
        # Steps logged after the checkpoint (or, killed before the first one committed,
        # after the start) are redone now.
        metrics_logging.truncate_metrics(t.model_dir, start_step)
    session.logger = metrics_logging.MetricsLogger(
        t.model_dir, t.train_steps, start_step, enabled=is_main, progress=t.progress
    )
    session.logger.message(
        _first_line(run, start_step, t.train_steps, resumed, init_message, session.cache_dir)
    )
    if start_step >= t.train_steps:
        session.logger.message(
            f"checkpoint {start_step} is at or past TRAIN_STEPS={t.train_steps}: nothing to "
            "train (raise TRAIN_STEPS to continue this run)"
        )
    preemption = loop_lib.Preemption()
    actions = make_actions(settings, run, prepared, session, train_pipe, preemption)
    loop = loop_lib.LoopState(
        state, start_step, start_step, t.train_steps, data_state=train_pipe.get_state
    )
    with preemption:
        loop = loop_lib.run_loop(
            loop,
            run.train_step,
            loop_lib.batches(train_pipe, run.batch_shardings),
            actions,
            preemption,
        )
    return finish(settings, run, prepared, loop, session.checkpointer)


def _pipeline(t: TrainingConfig, lengths, split: str):
    train = split == "train"
    return run_builder.input_pipeline(
        t.mixture_or_task_name,
        split,
        lengths,
        t.batch_size,
        t.random_seed,
        shuffle=train,
        pack=t.pack,
        repeat=train,
    )


def _first_line(run, start_step, train_steps, resumed, init_message, cache_dir) -> str:
    params = run.setup.abstract_state.params
    return (
        f"switch_t5.train: {network.param_count(params):,} params "
        f"({run.config.num_experts} experts), mesh {dict(run.mesh.shape)}, steps {start_step} -> "
        f"{train_steps}"
        + (f", resumed from checkpoint {start_step}" if resumed is not None else "")
        + init_message
        + (distill.describe(run.teacher) if run.teacher is not None else "")
        + (f", compilation cache {cache_dir}" if cache_dir else "")
    )


# ---------------------------------------------------------------------------------------------
# Start: resume, fine-tune or initialise.
# ---------------------------------------------------------------------------------------------


def starting_state(
    ckpt, setup, prepared: Prepared, train_pipe, settings: RunSettings, teacher=None
):
    """(state, restored step or None, log text): the newest readable checkpoint in MODEL_DIR
    (damaged newer ones are moved aside with a warning; the data position is restored too), else
    the fine-tuning initial checkpoint, else, distilling, the student initialised from the
    `teacher` (`distill.init_student`), else a fresh initialisation."""
    restored = ckpt.restore_latest(setup.abstract_state, expected_meta=prepared.meta)
    if restored is not None:
        restart = settings.training.restart_data_stream
        message = _resume_data_stream(train_pipe, restored, ckpt, restart)
        return restored.state, restored.step, message
    initial = settings.initial_checkpoint
    if initial is None and teacher is not None:
        state = distill.init_student(setup, prepared.config, teacher)
        return state, None, ", " + distill.student_init_text(teacher)
    if initial is None:
        return setup.init_fn(), None, ""
    state, loaded = init_checkpoint.initial_train_state(
        setup,
        initial.path,
        seed=settings.training.random_seed,
        step=initial.step,
        strict=initial.strict,
        assignment_map=initial.assignment_map,
        fallback_to_scratch=initial.fallback_to_scratch,
        expected_vocabulary=prepared.vocabulary,
    )
    message = (
        f", params from {loaded.source.step_dir} ({len(loaded.fresh)} fresh)"
        if loaded.source is not None
        else f", from scratch (no checkpoint under {initial.path})"
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


def write_config(operative: str, settings: RunSettings, config: SwitchConfig) -> None:
    """MODEL_DIR/config.gin: the operative gin config, then the resolved configs as comments."""
    lines = [operative.rstrip(), "", "# Resolved by switch_t5.train:"]
    for name, value in (
        ("train", settings.training),
        ("LossConfig", settings.losses.for_model(config)),
        ("SwitchConfig", config),
    ):
        lines += [f"#   {name}.{k} = {v!r}" for k, v in dataclasses.asdict(value).items()]
    lines.append(f"#   {settings.optimizer!r}")
    lines.append(f"#   {settings.mesh!r}")
    if settings.distillation.enabled:
        lines.append(f"#   {settings.distillation!r}")
    fileio.write_text(settings.training.folder.config_file, "\n".join(lines) + "\n")


# ---------------------------------------------------------------------------------------------
# The periodic actions of a run.
# ---------------------------------------------------------------------------------------------


def make_actions(
    settings: RunSettings, run, prepared: Prepared, session: _Session, train_pipe, preemption
) -> list[loop_lib.Action]:
    """Profile, log, save-and-stop, checkpoint, eval, infer-eval (in this order)."""
    t, logger = settings.training, session.logger
    actions: list[loop_lib.Action] = []
    if t.profile_steps:
        actions.append(loop_lib.Profile(*t.profile_steps, logdir=str(t.folder.profile)))
    peak = t.peak_flops_per_device or metrics_logging.peak_flops_per_device(
        jax.devices()[0].device_kind
    )
    flops = flops_lib.train_flops_per_step(
        run.setup.abstract_state.params, run.config, t.batch_size, prepared.lengths
    )
    actions.append(loop_lib.LogMetrics(t.log_every, logger, flops, peak))
    saver = loop_lib.SaveCheckpoint(t.checkpoint_period, session.checkpointer, prepared.meta)
    actions += [loop_lib.SaveAndStop(saver, logger, lambda: preemption.signal_name), saver]
    if t.eval_period:
        eval_pipe = _pipeline(t, prepared.lengths, "validation")

        def evaluate(state):
            return loop_lib.evaluate_batches(
                run.eval_step,
                state.params,
                eval_pipe,
                run.batch_shardings,
                run.losses,
                t.eval_steps,
                state.router_bias,
            )

        actions.append(loop_lib.Evaluate(t.eval_period, evaluate, logger))
    if t.infer_eval_period:
        actions.append(_infer_eval_action(t, run, prepared, logger, train_pipe))
    return actions


def _infer_eval_action(t: TrainingConfig, run, prepared: Prepared, logger, train_pipe):
    """Decodes the validation split, scores it, keeps the best state in MODEL_DIR/best."""
    from switch_t5 import evaluation

    module, to_decoding = run_builder.decoding_model(run.config)
    evaluator = evaluation.Evaluator(
        module, t.mixture_or_task_name, prepared.lengths, t.batch_size, run.mesh
    )
    best = evaluation.BestCheckpointKeeper(t.model_dir, t.keep_best_by)

    def evaluate(state, at: int) -> dict[str, float]:
        out = evaluator.evaluate(
            to_decoding(state.params, state.router_bias),
            step=at,
            output_dir=str(t.folder.eval_dir(at)),
        )
        improved = best.update(at, out, state, train_pipe.get_state(), prepared.meta)
        logger.message(
            f"step {at}: {out.main_metric} = {out.main_value:.4f}"
            + (" (best so far, kept)" if improved else "")
        )
        return out.metrics

    return loop_lib.InferEvaluate(t.infer_eval_period, evaluate, logger, on_close=best.close)


# ---------------------------------------------------------------------------------------------
# Finish.
# ---------------------------------------------------------------------------------------------


def finish(settings: RunSettings, run, prepared: Prepared, loop, ckpt) -> TrainResult:
    """Plots and decoded samples (not after a preemption), and the result."""
    t = settings.training
    preempted = loop.stop_signal is not None
    plots = {}
    if t.make_plots and jax.process_index() == 0 and not preempted:
        layers = run.moe_layer_names(t.batch_size, prepared.lengths)
        plots = metrics_logging.make_plots(t.model_dir, layers)
    samples = []
    if t.num_samples and not preempted:
        module, to_decoding = run_builder.decoding_model(run.config)
        samples = decode_samples(
            module,
            to_decoding(loop.state.params, loop.state.router_bias),
            t,
            prepared.lengths,
            run.mesh,
        )
    return TrainResult(
        step=loop.step,
        start_step=loop.start_step,
        preempted=preempted,
        eval_losses=loop.eval_losses,
        model_dir=str(t.model_dir),
        checkpoint_dir=str(ckpt.directory),
        tensorboard_dir=str(t.folder.tensorboard()),
        plots=plots,
        train_seconds=loop.elapsed(),
        train_tokens_per_sec=loop.tokens / loop.seconds if loop.seconds > 0 else None,
        samples=samples,
        stop_signal=loop.stop_signal,
        train_steps=t.train_steps,
    )


def decode_samples(module, params, t: TrainingConfig, lengths: Mapping[str, int], mesh):
    """Greedy span predictions (on the KV cache) for the first validation examples."""
    from switch_t5 import decoding, partitioning
    from switch_t5.data import show as show_lib
    from switch_t5.data import tasks as tasks_lib
    from switch_t5.data import vocab as vocab_lib

    rows = show_lib.show(t.mixture_or_task_name, "validation", t.num_samples, dict(lengths))
    if not rows:
        return []
    vocabulary = tasks_lib.get_vocabulary(t.mixture_or_task_name)
    # Replicated tiny batch: the sample is a few rows, whatever the mesh.
    enc = np.zeros((len(rows), lengths["inputs"]), np.int32)
    for i, r in enumerate(rows):
        ids = list(r["inputs"])[: lengths["inputs"]]
        enc[i, : len(ids)] = ids
    # Greedy (DecodingConfig's default method) up to the targets length.
    settings = decoding.DecodingConfig(max_decode_length=lengths["targets"]).decode_kwargs()
    with jax.set_mesh(mesh), partitioning.axis_rules():
        out = jax.jit(lambda p, b: decoding.decode_batch(module, p, b, **settings).tokens)(
            params, {"encoder_input_tokens": enc}
        )
    return [
        {
            "inputs": r["inputs_text"],
            "targets": r["targets_text"],
            "prediction": vocab_lib.decode_with_sentinels(vocabulary, [int(x) for x in pred]),
        }
        for r, pred in zip(rows, np.asarray(out))
    ]
