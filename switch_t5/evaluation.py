"""Evaluating a checkpoint: decode-and-score and teacher-forced metrics, the outputs they
write, and the best-checkpoint keeper (the model comes from `run_builder.load_model`).

The library behind `python -m switch_t5.eval` (its command line and gin live in `eval.py`),
training's infer-eval and `switch_t5.infer`. No gin here: a caller passes the SwitchConfig
overrides it was given (`run_builder.load_model(..., overrides=...)`).

Decode-and-score decodes a task's (or every task of a mixture's) validation split, each example
exactly once (the last batch padded with empty rows whose outputs are dropped), maps predicted
and target text through the task's postprocessor, and scores them with the task's metric
functions (`switch_t5.data.metrics`; values in percent, T5's scale). Postprocessors see the raw
task example (MultiRC's `idx/question`, ReCoRD's `answers`, WSC's `targets_pretokenized`), so
the examples are kept beside the decoder inputs built from them.

A task without metric functions (span corruption) is scored teacher-forced instead, with the
trainer's eval step: its validation loss, `cross_entropy` and token `accuracy` (percent, as
in the training log and T5's metrics), `trainer.CROSS_ENTROPY` being the main metric.

Averages: `glue_average` / `super_glue_average` (T5's benchmark scores) for the GLUE/SuperGLUE
mixtures, `mixture_average` (mean over tasks of each task's mean metric) for other mixtures.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np
from flax import linen as nn
from jax.sharding import Mesh

from switch_t5 import (
    checkpoints,
    decoding,
    errors,
    fileio,
    init_checkpoint,
    partitioning,
    run_dir,
    trainer,
)
from switch_t5.config import SwitchConfig

log = logging.getLogger(__name__)

PREDICTIONS_FILE = run_dir.PREDICTIONS_FILE


METRICS_FILE = run_dir.EVAL_METRICS_FILE


BEST_SUBDIR = run_dir.BEST


BEST_RECORD = run_dir.BEST_RECORD


GLUE_AVERAGE = "glue_average"


SUPER_GLUE_AVERAGE = "super_glue_average"


MIXTURE_AVERAGE = "mixture_average"


class EvalConfigError(errors.UserError):
    """An evaluation setting does not fit the task, mesh or checkpoint."""


@dataclasses.dataclass
class EvalResult:
    """What one evaluation produced.

    Attributes:
      metrics: {"task/metric": value} plus the averages (module docstring).
      task_metrics: {task: {metric: value}}.
      main_metric: the key of `metrics` that ranks checkpoints (the only task's first metric,
        or the mixture's average).
      num_examples: {task: examples scored}.
      predictions: [{"task", "input", "target", "prediction"}] in dataset order.
      step: the step of the evaluated params, when known.
      output_dir: where predictions.jsonl and metrics.json were written (None: not written).
    """

    metrics: dict[str, float]
    task_metrics: dict[str, dict[str, float]]
    main_metric: str
    num_examples: dict[str, int]
    predictions: list[dict[str, str]]
    step: int | None = None
    output_dir: str | None = None

    @property
    def main_value(self) -> float:
        return self.metrics[self.main_metric]


def _text(value: Any) -> str:
    if isinstance(value, bytes):
        return value.decode("utf-8")
    if isinstance(value, np.ndarray) and value.dtype.kind in ("S", "O") and value.ndim == 0:
        return _text(value.item())
    return str(value)


def output_ids(tokens: Sequence[int], eos_id: int = decoding.EOS_ID) -> list[int]:
    """The ids of one decoded row up to (not including) EOS, PAD dropped."""
    out = []
    for t in tokens:
        t = int(t)
        if t == eos_id:
            break
        if t != decoding.PAD_ID:
            out.append(t)
    return out


def eval_tasks(mixture_or_task_name: str, split: str) -> list[Any]:
    """The seqio tasks to score: the task itself, or the mixture's tasks with `split` and metrics.

    Raises:
      EvalConfigError: the task lacks the split or metrics, or no task of the mixture has both.
    """
    import seqio

    provider = seqio.get_mixture_or_task(mixture_or_task_name)
    if isinstance(provider, seqio.Mixture):
        tasks = [t for t in provider.tasks if split in t.splits and t.predict_metric_fns]
        if not tasks:
            raise EvalConfigError(
                f"no task of mixture {mixture_or_task_name!r} has a {split!r} split and metrics; "
                "choose another split or task"
            )
        return sorted(tasks, key=lambda t: t.name)
    if split not in provider.splits:
        raise EvalConfigError(
            f"task {mixture_or_task_name!r} has no {split!r} split (it has "
            f"{list(provider.splits)}); set the split or VALIDATION_FILES"
        )
    if not provider.predict_metric_fns:
        raise EvalConfigError(
            f"task {mixture_or_task_name!r} has no metric functions; for a user task set METRICS"
        )
    return [provider]


def _averages(
    name: str, task_metrics: Mapping[str, Mapping[str, float]], is_mixture: bool
) -> dict[str, float]:
    from switch_t5.data import glue
    from switch_t5.data import metrics as metrics_lib

    if name == glue.GLUE_MIXTURE:
        return {GLUE_AVERAGE: metrics_lib.glue_average(task_metrics)}
    if name == glue.SUPER_GLUE_MIXTURE:
        return {SUPER_GLUE_AVERAGE: metrics_lib.super_glue_average(task_metrics)}
    if is_mixture:
        means = [float(np.mean(list(m.values()))) for m in task_metrics.values()]
        return {MIXTURE_AVERAGE: float(np.mean(means))}
    return {}


class BatchDecoder:
    """Decodes rows of encoder inputs in fixed-size, batch-sharded batches (one compilation).

    Args:
      model: the `network.EncoderDecoder` (dropout off and the eval capacity factor are used).
      mesh: the (data, expert, model) mesh the params live on.
      batch_size: global rows per decode batch; a multiple of the mesh's data x expert size.
      max_decode_length: output tokens; None = `settings.max_decode_length`.
      settings: how to decode (`decoding.DecodingConfig`; default greedy). With method "sample",
        batch i samples with fold_in(key(settings.seed), i).
    """

    def __init__(
        self,
        model: nn.Module,
        mesh: Mesh,
        batch_size: int,
        max_decode_length: int | None = None,
        *,
        settings: decoding.DecodingConfig | None = None,
    ):
        settings = settings or decoding.DecodingConfig()
        shards = mesh.shape["data"] * mesh.shape["expert"]
        if batch_size <= 0 or batch_size % shards:
            raise EvalConfigError(
                f"decode batch_size={batch_size} must be a positive multiple of the {shards} "
                f"batch shards (data x expert = {mesh.shape['data']} x {mesh.shape['expert']})"
            )
        if max_decode_length is not None:
            settings = dataclasses.replace(settings, max_decode_length=max_decode_length)
        kwargs = settings.decode_kwargs()
        self.mesh = mesh
        self.batch_size = batch_size
        self.settings = settings
        self.max_decode_length = settings.max_decode_length
        self._rng = jax.random.PRNGKey(settings.seed)
        sample = settings.method == "sample"

        def decode(params, tokens, rng):
            out = decoding.decode_batch(
                model,
                params,
                {"encoder_input_tokens": tokens},
                rng=rng if sample else None,
                **kwargs,
            )
            return out.tokens, out.scores, out.fraction_dropped

        self._batch_sharding = partitioning.batch_sharding(mesh)
        replicated = partitioning.replicated(mesh)
        self._decode = jax.jit(decode, out_shardings=(replicated, replicated, replicated))
        # The MoE drops of the last call (see `__call__`).
        self.fraction_dropped = 0.0

    def __call__(self, params: Any, inputs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Decodes <int32>[rows, inputs_length] encoder inputs (0 = PAD).

        Rows are decoded `batch_size` at a time; the last batch is padded with all-PAD rows and
        their outputs are dropped.

        Sets `self.fraction_dropped`: the encoder's dropped (token, expert) choices / real ones
        over all rows (`decoding.DecodeOutput.fraction_dropped`, weighted by real tokens).

        Returns:
          tokens: <int32>[rows, max_decode_length], EOS then PAD.
          scores: <float32>[rows] (see `decoding.DecodeOutput.scores`).
        """
        tokens_out, scores_out = [], []
        dropped, real = 0.0, 0
        b = self.batch_size
        for i, start in enumerate(range(0, len(inputs), b)):
            chunk = np.asarray(inputs[start : start + b], np.int32)
            rows = len(chunk)
            if rows < b:
                chunk = np.concatenate([chunk, np.zeros((b - rows, chunk.shape[1]), np.int32)])
            batch = jax.make_array_from_callback(
                chunk.shape, self._batch_sharding, lambda idx, c=chunk: c[idx]
            )
            with jax.set_mesh(self.mesh), partitioning.axis_rules():
                tokens, scores, fraction = self._decode(
                    params, batch, jax.random.fold_in(self._rng, i)
                )
            # Replicated outputs: every process holds all rows.
            tokens_out.append(np.asarray(tokens.addressable_shards[0].data)[:rows])
            scores_out.append(np.asarray(scores.addressable_shards[0].data)[:rows])
            n = int(np.count_nonzero(chunk))
            dropped += float(fraction.addressable_shards[0].data) * n
            real += n
        self.fraction_dropped = dropped / max(real, 1)
        return np.concatenate(tokens_out), np.concatenate(scores_out)


class Evaluator:
    """Prepares a task's (or mixture's) examples once; decodes and scores any params.

    Args:
      model: the `network.EncoderDecoder` (dropout off and the eval capacity factor are used).
      mixture_or_task_name: a registered seqio task or mixture.
      feature_lengths: {"inputs": N, "targets": M}; inputs are truncated to N tokens (EOS kept,
        as in training) and M is the default decode length.
      batch_size: global rows per decode batch; a multiple of the mesh's data x expert size.
      mesh: the (data, expert, model) mesh the params live on.
      split: the split to score.
      max_examples: score only the first N examples of each task (None = all).
      settings: how to decode (`decoding.DecodingConfig`; default greedy); its
        max_decode_length None = M.
    """

    def __init__(
        self,
        model: nn.Module,
        mixture_or_task_name: str,
        feature_lengths: Mapping[str, int],
        batch_size: int,
        mesh: Mesh,
        *,
        split: str = "validation",
        max_examples: int | None = None,
        settings: decoding.DecodingConfig | None = None,
    ):
        import seqio

        settings = settings or decoding.DecodingConfig()
        if set(feature_lengths) != {"inputs", "targets"}:
            raise EvalConfigError(
                f"feature_lengths={dict(feature_lengths)}: give {{'inputs': N, 'targets': M}}"
            )
        self.name = mixture_or_task_name
        self.feature_lengths = {k: int(v) for k, v in feature_lengths.items()}
        self.split = split
        self.decoder = BatchDecoder(
            model,
            mesh,
            batch_size,
            settings=settings.with_default_length(self.feature_lengths["targets"]),
        )
        self.tasks = eval_tasks(mixture_or_task_name, split)
        self.is_mixture = isinstance(seqio.get_mixture_or_task(mixture_or_task_name), seqio.Mixture)
        self.examples: dict[str, list[dict[str, Any]]] = {}
        for task in self.tasks:
            ds = task.get_dataset(
                sequence_length=self.feature_lengths,
                split=split,
                shuffle=False,
                num_epochs=1,
                use_cached=False,
            )
            if max_examples is not None:
                ds = ds.take(max_examples)
            examples = list(ds.as_numpy_iterator())
            if not examples:
                raise EvalConfigError(f"task {task.name!r} has no {split!r} examples")
            self.examples[task.name] = examples

    def _encoder_inputs(self, examples: Sequence[Mapping[str, Any]]) -> np.ndarray:
        n = self.feature_lengths["inputs"]
        out = np.zeros((len(examples), n), np.int32)
        for i, ex in enumerate(examples):
            ids = np.asarray(ex["inputs"], np.int32)[:n]
            out[i, : len(ids)] = ids
        return out

    def evaluate(
        self, params: Any, *, step: int | None = None, output_dir: str | None = None
    ) -> EvalResult:
        """Decodes, postprocesses and scores; writes the outputs when `output_dir` is given."""
        task_metrics: dict[str, dict[str, float]] = {}
        predictions: list[dict[str, str]] = []
        counts: dict[str, int] = {}
        for task in self.tasks:
            examples = self.examples[task.name]
            vocabulary = task.output_features["targets"].vocabulary
            decoded, _ = self.decoder(params, self._encoder_inputs(examples))
            targets, preds = [], []
            for ex, row in zip(examples, decoded):
                pred_text = vocabulary.decode(output_ids(row))
                if "targets_pretokenized" in ex:
                    target_text = _text(ex["targets_pretokenized"])
                else:
                    target_text = vocabulary.decode(output_ids(ex["targets"]))
                if "inputs_pretokenized" in ex:
                    input_text = _text(ex["inputs_pretokenized"])
                else:
                    input_text = vocabulary.decode(output_ids(ex["inputs"]))
                targets.append(task.postprocess_fn(target_text, example=ex, is_target=True))
                preds.append(task.postprocess_fn(pred_text, example=ex, is_target=False))
                predictions.append(
                    {
                        "task": task.name,
                        "input": input_text,
                        "target": target_text,
                        "prediction": pred_text,
                    }
                )
            scores: dict[str, float] = {}
            for fn in task.predict_metric_fns:
                for key, value in fn(targets, preds).items():
                    scores[key] = float(getattr(value, "value", value))
            if task.score_metric_fns or task.predict_with_aux_metric_fns:
                log.warning(
                    "task %s: its scoring / aux metric functions need model scores and are not "
                    "computed by decode-and-score evaluation",
                    task.name,
                )
            task_metrics[task.name] = scores
            counts[task.name] = len(examples)
        metrics = {f"{t}/{k}": v for t, m in task_metrics.items() for k, v in m.items()}
        averages = _averages(self.name, task_metrics, self.is_mixture)
        metrics.update(averages)
        if averages:
            main = next(iter(averages))
        else:
            task = self.tasks[0].name
            main = f"{task}/{next(iter(task_metrics[task]))}"
        result = EvalResult(metrics, task_metrics, main, counts, predictions, step)
        if output_dir is not None:
            result.output_dir = str(output_dir)
            if jax.process_index() == 0:
                write_outputs(result, output_dir)
        return result


def write_outputs(result: EvalResult, output_dir: str, checkpoint: str | None = None) -> None:
    """Writes predictions.jsonl and metrics.json into `output_dir`."""
    fileio.makedirs(output_dir)
    lines = "".join(json.dumps(p, ensure_ascii=False) + "\n" for p in result.predictions)
    fileio.write_text(fileio.path(output_dir, PREDICTIONS_FILE), lines)
    record = {
        "step": result.step,
        "checkpoint": checkpoint,
        "main_metric": result.main_metric,
        "num_examples": result.num_examples,
        "metrics": result.metrics,
    }
    fileio.write_text(fileio.path(output_dir, METRICS_FILE), json.dumps(record, indent=1) + "\n")


def write_tensorboard(result: EvalResult, logdir: str, step: int) -> None:
    """The metrics as TensorBoard scalars at `step` (finite values only)."""
    from tensorboardX import SummaryWriter

    writer = SummaryWriter(str(logdir))
    try:
        for key, value in result.metrics.items():
            if math.isfinite(value):
                writer.add_scalar(key, value, step)
    finally:
        writer.close()


class BestCheckpointKeeper:
    """Keeps the state with the best main metric in MODEL_DIR/best (a MODEL_DIR-like folder).

    MODEL_DIR/best/checkpoints/N is a normal checkpoint (restorable like any other), and
    MODEL_DIR/best/best.json records {"step", "metric", "value", "metrics"}. Higher is better
    (every metric of `switch_t5.data.metrics` is). A resumed run continues from the record.

    Args:
      model_dir: MODEL_DIR.
      metric: the metric key to rank by; None = the evaluation's main metric.
    """

    def __init__(self, model_dir: str, metric: str | None = None):
        self.directory = str(fileio.path(model_dir, BEST_SUBDIR))
        self.metric = metric
        self._ckpt: checkpoints.Checkpointer | None = None
        record_path = fileio.path(self.directory, BEST_RECORD)
        self.best: dict[str, Any] | None = (
            json.loads(fileio.read_text(record_path)) if fileio.exists(record_path) else None
        )

    def update(self, step: int, result: EvalResult, state: Any, data_state: Any, meta: Any) -> bool:
        """Saves `state` when `result` beats the best so far; returns whether it did."""
        key = self.metric or result.main_metric
        if key not in result.metrics:
            raise EvalConfigError(
                f"keep_best_by={key!r} is not an evaluation metric; known: "
                f"{', '.join(sorted(result.metrics))}"
            )
        value = result.metrics[key]
        if not math.isfinite(value):
            return False
        if self.best is not None and value <= float(self.best["value"]):
            return False
        if self._ckpt is None:
            self._ckpt = checkpoints.Checkpointer(self.directory, max_to_keep=1)
        self._ckpt.save(step, state, data_state, meta)
        self.best = {"step": int(step), "metric": key, "value": value, "metrics": result.metrics}
        if jax.process_index() == 0:
            fileio.write_text(
                fileio.path(self.directory, BEST_RECORD), json.dumps(self.best, indent=1)
            )
        return True

    def close(self) -> None:
        if self._ckpt is not None:
            self._ckpt.close()
            self._ckpt = None


def has_metrics(mixture_or_task_name: str, split: str) -> bool:
    """Whether decode-and-score applies: the task (or a task of the mixture) has metrics."""
    import seqio

    provider = seqio.get_mixture_or_task(mixture_or_task_name)
    if isinstance(provider, seqio.Mixture):
        return any(split in t.splits and t.predict_metric_fns for t in provider.tasks)
    return bool(provider.predict_metric_fns)


def teacher_forced_eval(
    model: nn.Module,
    params: Any,
    config: SwitchConfig,
    mesh: Mesh,
    mixture_or_task_name: str,
    feature_lengths: Mapping[str, int],
    batch_size: int,
    *,
    split: str = "validation",
    max_examples: int | None = None,
    step: int | None = None,
) -> EvalResult:
    """Loss and token accuracy of a task without metric functions (span corruption), with the
    trainer's eval step over the split (unpacked, one pass; with `max_examples`, the first
    batches holding at least that many examples). Metric names are the trainer's
    (`trainer.EvalAccumulator`), prefixed by the task name; the main metric is
    `trainer.CROSS_ENTROPY`."""
    from switch_t5.data import pipeline as pipeline_lib

    shards = mesh.shape["data"] * mesh.shape["expert"]
    if batch_size <= 0 or batch_size % shards:
        raise EvalConfigError(
            f"batch_size={batch_size} must be a positive multiple of the {shards} batch shards"
        )
    pipe = pipeline_lib.InputPipeline(
        mixture_or_task_name,
        split,
        feature_lengths,
        batch_size,
        shuffle=False,
        pack=False,
        repeat=False,
    )
    loss_config = trainer.LossConfig(
        load_balancing_loss_weight=config.load_balancing_loss_weight,
        router_z_loss_weight=config.router_z_loss_weight,
    )
    param_shardings = jax.tree.map(lambda p: p.sharding, params)
    acc = trainer.EvalAccumulator(loss_config)
    eval_step, rows = None, 0
    for local in pipe:
        if max_examples is not None and rows >= max_examples:
            break
        if eval_step is None:
            b_shardings = trainer.batch_shardings(dict(local), mesh)
            eval_step = trainer.make_eval_step(
                model, loss_config, param_shardings, b_shardings, mesh
            )
        rows += int(np.sum(np.any(np.asarray(local["decoder_target_tokens"]) != 0, axis=-1)))
        batch = {
            k: jax.make_array_from_process_local_data(b_shardings[k], v, (batch_size, *v.shape[1:]))
            for k, v in local.items()
        }
        acc.add(eval_step(params, batch))
    if not acc.batches:
        raise EvalConfigError(f"task {mixture_or_task_name!r} has no {split!r} examples")
    scalars = {k: float(v) for k, v in acc.result().items() if np.ndim(v) == 0 and k != "batches"}
    metrics = {f"{mixture_or_task_name}/{k}": v for k, v in scalars.items()}
    main = f"{mixture_or_task_name}/{trainer.CROSS_ENTROPY}"
    return EvalResult(
        metrics, {mixture_or_task_name: scalars}, main, {mixture_or_task_name: rows}, [], step
    )


def resolve_checkpoint(
    model_dir: str, checkpoint_step: int | str | None
) -> init_checkpoint.CheckpointRef:
    """The checkpoint CHECKPOINT_STEP names: None = latest, N, or "best" (MODEL_DIR/best)."""
    if checkpoint_step == "best":
        best_dir = fileio.path(model_dir, BEST_SUBDIR)
        ref = init_checkpoint.find_checkpoint(str(best_dir))
        if ref is None:
            raise FileNotFoundError(
                f"no best checkpoint under {best_dir}: the fine-tuning run kept none (it needs "
                "INFER_EVAL_PERIOD > 0); evaluate the latest (CHECKPOINT_STEP=None) or a step"
            )
        return ref
    if checkpoint_step is not None and not errors.is_int(checkpoint_step):
        raise EvalConfigError(
            f"CHECKPOINT_STEP={checkpoint_step!r}: give None (latest), a step number or 'best'"
        )
    ref = init_checkpoint.find_checkpoint(model_dir, checkpoint_step)
    if ref is None:
        raise FileNotFoundError(
            f"no complete checkpoint under {model_dir}; give the fine-tuning MODEL_DIR, its "
            "checkpoints/ folder or one step's folder"
        )
    return ref
