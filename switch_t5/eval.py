"""Decode-and-score evaluation: `python -m switch_t5.eval --gin.MODEL_DIR=... [--gin.X=...]`.

    python -m switch_t5.eval --gin.MODEL_DIR="'/tmp/rte_finetune'"
    python -m switch_t5.eval --gin.MODEL_DIR="'/tmp/rte_finetune'" \\
      --gin.MIXTURE_OR_TASK_NAME="'files_text_to_text'" --gin.VALIDATION_FILES="'other.tsv'"

A run knows what it is: the checkpoint's meta records the task, its data macros
(`switch_t5.data_gin.MACROS`) and the feature lengths (`checkpoints.make_meta`), and an unset
MIXTURE_OR_TASK_NAME, data macro or TASK_FEATURE_LENGTHS is taken from there. A macro given on
the command line replaces the recorded one; a task flag naming another task keeps only the
recorded VOCABULARY_PATH. Without --gin_file the defaults are `run_eval`'s signature defaults
(configs/runs/eval.gin may still be given).

A task without metric functions (span corruption) is scored teacher-forced instead, with the
trainer's eval step: its validation loss, `cross_entropy` and token `accuracy` (percent, as
in the training log and T5's metrics), `trainer.CROSS_ENTROPY` being the main metric.

Decodes a task's (or every task of a mixture's) validation split, each example exactly once (the
last batch padded with empty rows whose outputs are dropped), maps predicted and target text
through the task's postprocessor, and scores them with the task's metric functions
(`switch_t5.data.metrics`; values in percent, T5's scale). Postprocessors see the raw task
example (MultiRC's `idx/question`, ReCoRD's `answers`, WSC's `targets_pretokenized`), so the
examples are kept beside the decoder inputs built from them.

Written to EVAL_OUTPUT_DIR (default MODEL_DIR/eval):
  predictions.jsonl: {"task", "input", "target", "prediction"} per example, in dataset order;
  metrics.json: {"step", "checkpoint", "metrics": {"task/metric": value, ..., averages}}
    (a correlation of constant predictions is NaN, written as JSON `NaN`);
  tensorboard/: the metrics as scalars at the checkpoint's step (tensorboardX);
  config.gin: the operative gin config of the evaluation.
Averages: `glue_average` / `super_glue_average` (T5's benchmark scores) for the GLUE/SuperGLUE
mixtures, `mixture_average` (mean over tasks of each task's mean metric) for other mixtures.

Which checkpoint: the latest in MODEL_DIR by default, CHECKPOINT_STEP=N for step N, or
CHECKPOINT_STEP="best" for the best one a fine-tuning run kept (MODEL_DIR/best). The model
config is the one stored in the checkpoint; `switch_t5.SwitchConfig.*` gin bindings override
its fields (e.g. `eval_capacity_factor`), and a model gin file whose shapes differ fails with the
first mismatching parameter.
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping, Sequence
from typing import Any

import gin
import jax

from switch_t5 import checkpoints, decoding, fileio, gin_utils, run_builder, run_dir
from switch_t5.evaluation import (
    EvalConfigError,
    EvalResult,
    Evaluator,
    has_metrics,
    resolve_checkpoint,
    teacher_forced_eval,
    write_outputs,
    write_tensorboard,
)


def apply_recorded_task(
    recorded: Mapping[str, Any] | None, mixture_or_task_name: str | None
) -> str:
    """The task to evaluate: MIXTURE_OR_TASK_NAME when given, else the recorded one. The
    recorded data macros that are not set are bound (only VOCABULARY_PATH when another task
    is named), so a flag given replaces the recorded value.

    Raises:
      EvalConfigError: no task given and none recorded (a converted checkpoint).
    """
    from switch_t5 import data_gin

    if recorded is None:
        if not mixture_or_task_name:
            raise EvalConfigError(
                "the checkpoint records no task (it was converted or written by an older "
                "version); set --gin.MIXTURE_OR_TASK_NAME=... and the task's data macros"
            )
        return mixture_or_task_name
    name = mixture_or_task_name or recorded["name"]
    data = recorded["data"]
    if name != recorded["name"]:
        data = {k: v for k, v in data.items() if k == "VOCABULARY_PATH"}
    data_gin.bind_unset_macros(data)
    return name


@gin.configurable("evaluate", module="switch_t5")
def run_eval(
    model_dir: str = gin.REQUIRED,
    mixture_or_task_name: str | None = None,
    checkpoint_step: int | str | None = None,
    eval_output_dir: str | None = None,
    task_feature_lengths: Mapping[str, int] | None = None,
    batch_size: int = 32,
    split: str = "validation",
    method: decoding.DecodeMethod = "greedy",
    max_decode_length: int | None = None,
    num_beams: int = 4,
    alpha: float = 0.6,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 0.0,
    seed: int = 0,
    max_examples: int | None = None,
    mesh_data: int = -1,
    mesh_expert: int | None = None,
    mesh_model: int = 1,
) -> EvalResult:
    """Evaluates one checkpoint of MODEL_DIR on a task or mixture; see the module docstring.

    Args:
      model_dir: MODEL_DIR (or its checkpoints/ folder, or one step's folder).
      mixture_or_task_name: MIXTURE_OR_TASK_NAME (registered from gin macros by
        `switch_t5.data_gin.register_tasks`); None = the task the checkpoint records.
      checkpoint_step: CHECKPOINT_STEP: None = latest, a step, or "best".
      eval_output_dir: EVAL_OUTPUT_DIR; None = MODEL_DIR/eval.
      task_feature_lengths: TASK_FEATURE_LENGTHS; None = the checkpoint's recorded lengths,
        else {"inputs": 512, "targets": 62}.
      batch_size: BATCH_SIZE, rows per decode batch (multiple of data x expert mesh size).
      split: the split to score.
      method, max_decode_length, num_beams, alpha, temperature, top_k, top_p, seed: decoding
        (`decoding.DecodingConfig`; max_decode_length None = the targets length).
      max_examples: score the first N examples of each task only (None = all).
      mesh_data, mesh_expert, mesh_model: the mesh (see `partitioning.make_mesh`).

    Returns:
      An EvalResult (also written to EVAL_OUTPUT_DIR).
    """
    if model_dir is gin.REQUIRED or not model_dir:
        raise EvalConfigError("MODEL_DIR is required: --gin.MODEL_DIR=\"'/path/to/run'\"")
    # Checked before anything is loaded; max_decode_length None = the targets length.
    settings = decoding.DecodingConfig(
        method, max_decode_length, num_beams, alpha, temperature, top_k, top_p, seed
    )
    checkpoints.check_model_dir(
        model_dir, fix="give the folder a training run wrote (it holds checkpoints/)"
    )
    ref = _checkpoint(model_dir, checkpoint_step, mixture_or_task_name)
    mixture_or_task_name, vocabulary, lengths = _task(
        ref, mixture_or_task_name, task_feature_lengths, split
    )
    model, params, config, mesh = run_builder.load_model(
        ref, (mesh_data, mesh_expert, mesh_model), vocabulary, gin_utils.model_overrides()
    )
    where = dict(split=split, max_examples=max_examples)
    if has_metrics(mixture_or_task_name, split):
        evaluator = Evaluator(
            model, mixture_or_task_name, lengths, batch_size, mesh, settings=settings, **where
        )
        result = evaluator.evaluate(params, step=ref.step)
    else:
        result = teacher_forced_eval(
            model,
            params,
            config,
            mesh,
            mixture_or_task_name,
            lengths,
            batch_size,
            **where,
            step=ref.step,
        )
    _write(result, eval_output_dir or str(run_dir.RunDir(model_dir).eval_dir()), ref)
    return result


def _task(ref, mixture_or_task_name, task_feature_lengths, split: str):
    """(task name, vocabulary, checked lengths): the flags given, else what the run recorded."""
    from switch_t5 import data_gin

    name = apply_recorded_task(checkpoints.recorded_task(ref.meta), mixture_or_task_name)
    if task_feature_lengths is None:
        task_feature_lengths = checkpoints.recorded_feature_lengths(ref.meta, ref.step_dir)
    data_gin.register_tasks(name)
    lengths = data_gin.check_lengths(
        name, task_feature_lengths or {"inputs": 512, "targets": 62}, [split]
    )
    return name, data_gin.get_vocabulary(name), lengths


def _checkpoint(model_dir: str, checkpoint_step, mixture_or_task_name: str | None):
    """The checkpoint CHECKPOINT_STEP names; without one, a wrong task name is named first."""
    try:
        return resolve_checkpoint(model_dir, checkpoint_step)
    except FileNotFoundError:
        if mixture_or_task_name:
            # Without a checkpoint no recorded setting can help: a wrong task name (or a
            # missing data macro) is named first, as the first thing to fix.
            from switch_t5 import data_gin

            data_gin.register_tasks(mixture_or_task_name)
        raise


def _write(result: EvalResult, out_dir: str, ref) -> None:
    """predictions.jsonl, metrics.json, tensorboard/ and config.gin into `out_dir`."""
    result.output_dir = out_dir
    if jax.process_index() == 0:
        write_outputs(result, out_dir, checkpoint=str(ref.step_dir))
        write_tensorboard(result, str(fileio.path(out_dir, run_dir.TENSORBOARD)), ref.step)
        fileio.write_text(fileio.path(out_dir, run_dir.CONFIG_FILE), gin.config_str())


def print_summary(result: EvalResult) -> None:
    step = "" if result.step is None else f" (checkpoint step {result.step})"
    print(f"Evaluation{step}: {sum(result.num_examples.values())} examples")
    for key in sorted(result.metrics):
        print(f"  {key}: {result.metrics[key]:.4f}")
    print(f"Main metric {result.main_metric}: {result.main_value:.4f}")
    if result.output_dir:
        print(f"Predictions and metrics: {result.output_dir}")


def _add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = (
        "Decode and score a checkpoint. Common macros: MODEL_DIR, MIXTURE_OR_TASK_NAME, "
        "CHECKPOINT_STEP (None, N or 'best'), EVAL_OUTPUT_DIR, TASK_FEATURE_LENGTHS, BATCH_SIZE."
    )


# The macros of `python -m switch_t5.eval` without a gin file, each bound to its `run_eval`
# parameter and defaulting to that parameter's signature default (one home for defaults).
EVAL_MACROS = {
    "MODEL_DIR": "model_dir",
    "MIXTURE_OR_TASK_NAME": "mixture_or_task_name",
    "CHECKPOINT_STEP": "checkpoint_step",
    "EVAL_OUTPUT_DIR": "eval_output_dir",
    "TASK_FEATURE_LENGTHS": "task_feature_lengths",
    "BATCH_SIZE": "batch_size",
}


def default_bindings() -> list[str]:
    """The gin lines used when no --gin_file is given: each EVAL_MACROS macro set to its
    parameter's signature default and wired to `switch_t5.evaluate.<parameter>`."""
    import inspect

    params = inspect.signature(run_eval.__wrapped__).parameters
    lines = []
    for macro, param in EVAL_MACROS.items():
        default = params[param].default
        lines.append(
            f"{macro} = " + ("%gin.REQUIRED" if default is gin.REQUIRED else repr(default))
        )
        lines.append(f"switch_t5.evaluate.{param} = %{macro}")
    return lines


def main(argv: Sequence[str]) -> EvalResult:
    flags = gin_utils.parse_flags(argv, _add_arguments)
    import switch_t5.data_gin  # noqa: F401  (registers its configurables before parsing)

    bindings = list(flags.gin_bindings)
    if not flags.gin_files:
        bindings = default_bindings() + bindings
    gin_utils.parse_gin(flags.gin_files, bindings)
    result = run_eval()
    if jax.process_index() == 0:
        print_summary(result)
    return result


def console_main() -> None:
    """The `python -m switch_t5.eval` command."""
    gin_utils.run_console_main(main)


if __name__ == "__main__":
    console_main()
