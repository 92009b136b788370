"""The training loop: a plain step loop plus periodic actions.

`run_loop` feeds batches to the jitted train step; after every step each `Action` whose period
is due runs, in order: stop a profile, log, save-and-stop on preemption, checkpoint, evaluate,
infer-evaluate. An action is a small object with its own period; a new one (say, a custom
metric dump every N steps) is a subclass passed in the list, with no edit here.

Metrics stay on the device until they are needed: `PendingMetrics` fetches them at log and
checkpoint time, and stops the run at the first NaN/Inf loss (never saving parameters after it).
"""

from __future__ import annotations

import dataclasses
import math
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import jax
import numpy as np

from switch_t5 import errors, faults, trainer


class NonFiniteLossError(errors.UserError, FloatingPointError):
    """The loss (or the parameters) became NaN or Inf; the message names the step."""


def progress_line(text: str) -> None:
    """A short line on stderr (main process) of what the first minute of a run is doing."""
    if jax.process_index() == 0:
        print(text, file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------
# Loop state.
# ---------------------------------------------------------------------------------------------


class PendingMetrics:
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


@dataclasses.dataclass
class LoopState:
    """What the actions see and update.

    Attributes:
      state: the TrainState after `step`.
      step: the number of steps done.
      start_step: the step the run started (or resumed) at.
      train_steps: the last step.
      pending: device metrics not yet logged.
      data_state: the input pipeline's position (for checkpoints).
      stopping: a preemption (SIGTERM, first Ctrl-C, a coordinator's notice) asked to stop.
      t_log: when the current log interval's clock started.
      tokens, seconds: non-padding tokens and wall time of the logged intervals after the first
        (the first includes compilation).
      eval_losses: [(step, eval loss)].
      stop_signal: "SIGTERM", "SIGINT" or "preemption notice" once stopped by one.
    """

    state: Any
    step: int
    start_step: int
    train_steps: int
    data_state: Callable[[], dict]
    pending: PendingMetrics = dataclasses.field(default_factory=PendingMetrics)
    stopping: bool = False
    t_log: float = dataclasses.field(default_factory=time.perf_counter)
    tokens: int = 0
    seconds: float = 0.0
    eval_losses: list[tuple[int, float]] = dataclasses.field(default_factory=list)
    stop_signal: str | None = None
    t_start: float = dataclasses.field(default_factory=time.perf_counter)

    def elapsed(self) -> float:
        """Wall time since the loop state was made (compilation included)."""
        return time.perf_counter() - self.t_start

    @property
    def last(self) -> bool:
        return self.step == self.train_steps

    def restart_clock(self) -> None:
        """Time spent outside training (saving, evaluating) is not training time."""
        self.t_log = time.perf_counter()


class Action:
    """Runs after a step every `period` steps and at the last one (0 = never)."""

    period: int

    def due(self, loop: LoopState) -> bool:
        if loop.stopping or not self.period:
            return False
        return loop.step % self.period == 0 or loop.last

    def before_step(self, loop: LoopState) -> None:
        """Called before each step (e.g. to start a profile)."""

    def __call__(self, loop: LoopState) -> None:
        raise NotImplementedError

    def close(self, loop: LoopState) -> None:
        """Called once after the loop (also after a preemption; not after an error)."""


# ---------------------------------------------------------------------------------------------
# The actions.
# ---------------------------------------------------------------------------------------------


def summarise(items, seconds: float, flops_per_step: float, peak_flops: float | None):
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


@dataclasses.dataclass
class LogMetrics(Action):
    """Every `period` steps, at the last one and when stopping: metrics.jsonl, TensorBoard and
    the progress line (split "train"); fetching the metrics checks them for NaN/Inf."""

    period: int
    logger: Any
    flops_per_step: float
    peak_flops: float | None

    def due(self, loop: LoopState) -> bool:
        return loop.step % self.period == 0 or loop.last or loop.stopping

    def __call__(self, loop: LoopState) -> None:
        items = loop.pending.flush()
        jax.block_until_ready(loop.state.step)
        now = time.perf_counter()
        summary = summarise(items, now - loop.t_log, self.flops_per_step, self.peak_flops)
        # Throughput leaves out the first interval (compilation).
        if loop.step - len(items) > loop.start_step:
            loop.tokens += sum(t for _, _, t in items)
            loop.seconds += now - loop.t_log
        loop.t_log = now
        self.logger.write(loop.step, "train", summary)
        self.logger.progress(loop.step, summary)


@dataclasses.dataclass
class SaveCheckpoint(Action):
    """Every `period` steps and at the last one; never after a NaN/Inf step."""

    period: int
    checkpointer: Any
    meta: Mapping[str, Any]

    def save(self, loop: LoopState) -> None:
        loop.pending.check()
        self.checkpointer.save(loop.step, loop.state, loop.data_state(), self.meta)

    def __call__(self, loop: LoopState) -> None:
        self.save(loop)
        loop.restart_clock()  # nor is the blocking part of a save training time

    def close(self, loop: LoopState) -> None:
        self.checkpointer.wait()


@dataclasses.dataclass
class SaveAndStop(Action):
    """On a preemption request: saves at the current step, waits for the write, says how to
    resume; the loop then ends."""

    saver: SaveCheckpoint
    logger: Any
    signal_name: Callable[[], str | None]

    def due(self, loop: LoopState) -> bool:
        return loop.stopping

    def __call__(self, loop: LoopState) -> None:
        self.saver.save(loop)
        self.saver.checkpointer.wait()
        loop.stop_signal = self.signal_name() or "preemption notice"
        self.logger.message(
            f"{loop.stop_signal}: saved checkpoint {loop.step} in "
            f"{self.saver.checkpointer.directory}; exiting (rerun the same command to resume)"
        )


@dataclasses.dataclass
class Evaluate(Action):
    """Teacher-forced eval metrics (split "eval"); `evaluate(state) -> {"loss": ..., ...}`."""

    period: int
    evaluate: Callable[[Any], dict[str, float]]
    logger: Any

    def __call__(self, loop: LoopState) -> None:
        result = self.evaluate(loop.state)
        loop.eval_losses.append((loop.step, result["loss"]))
        self.logger.write(loop.step, "eval", result)
        self.logger.progress(loop.step, result, split="eval")
        loop.restart_clock()


@dataclasses.dataclass
class InferEvaluate(Action):
    """Decodes and scores the validation split (split "infer_eval"); `evaluate(state, step)`.
    Never runs on parameters after a NaN/Inf step."""

    period: int
    evaluate: Callable[[Any, int], dict[str, float]]
    logger: Any
    on_close: Callable[[], None] | None = None

    def __call__(self, loop: LoopState) -> None:
        loop.pending.check()
        self.logger.write(loop.step, "infer_eval", self.evaluate(loop.state, loop.step))
        loop.restart_clock()

    def close(self, loop: LoopState) -> None:
        if self.on_close is not None:
            self.on_close()


@dataclasses.dataclass
class Profile(Action):
    """A jax.profiler trace of steps first..last into `logdir`."""

    first: int
    last_step: int
    logdir: str
    active: bool = False

    def before_step(self, loop: LoopState) -> None:
        if loop.step == self.first and not self.active:
            jax.profiler.start_trace(self.logdir)
            self.active = True

    def due(self, loop: LoopState) -> bool:
        return self.active and loop.step >= self.last_step

    def __call__(self, loop: LoopState) -> None:
        jax.block_until_ready(loop.state)
        self.close(loop)

    def close(self, loop: LoopState) -> None:
        if self.active:
            jax.profiler.stop_trace()
            self.active = False


# ---------------------------------------------------------------------------------------------
# Preemption.
# ---------------------------------------------------------------------------------------------


class Preemption:
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
        if threading.current_thread() is threading.main_thread():
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


# ---------------------------------------------------------------------------------------------
# The loop.
# ---------------------------------------------------------------------------------------------


def global_batch(local: Mapping[str, np.ndarray], shardings: Mapping[str, Any], rows: int):
    """This process's rows -> global jax.Arrays laid out by `shardings`."""
    return {
        k: jax.make_array_from_process_local_data(shardings[k], v, (rows, *v.shape[1:]))
        for k, v in local.items()
    }


def batches(pipeline, shardings: Mapping[str, Any]) -> Iterator[tuple[dict, int]]:
    """(global batch, non-padding tokens over all processes) from an input pipeline."""
    for local in pipeline:
        tokens = int(
            np.count_nonzero(local["encoder_input_tokens"])
            + np.count_nonzero(local["decoder_target_tokens"])
        )
        yield (
            global_batch(local, shardings, pipeline.global_batch_size),
            tokens * (jax.process_count()),
        )


def evaluate_batches(
    eval_step, params, pipeline, shardings, losses, eval_steps: int | None, router_bias=None
):
    """Eval metrics over the first `eval_steps` batches of a pipeline (all if None);
    `router_bias`: the state's choice biases (auxiliary-loss-free balancing), or None."""
    acc = trainer.EvalAccumulator(losses)
    pipeline.reset()
    for i, local in enumerate(pipeline):
        if eval_steps is not None and i >= eval_steps:
            break
        batch = global_batch(local, shardings, pipeline.global_batch_size)
        acc.add(eval_step(params, batch, router_bias))
        faults.maybe_kill("during_eval", faults.current_step())
    return acc.result()


def _first_step(train_step, state, batch):
    progress_line("compiling the train step ...")
    t0 = time.perf_counter()
    state, metrics = train_step(state, batch)
    jax.block_until_ready(state.step)
    progress_line(f"compiling the train step ... done in {time.perf_counter() - t0:.0f} s")
    return state, metrics


def run_loop(
    loop: LoopState,
    train_step: Callable,
    data: Iterator[tuple[Any, int]],
    actions: Sequence[Action],
    preemption: Preemption,
) -> LoopState:
    """Steps until `loop.train_steps` (or a preemption), running the due actions after each.

    Actions are closed after a normal end or a preemption; an error (a NaN loss, a failed save)
    propagates at once, and the caller closes the checkpointer.
    """
    while loop.step < loop.train_steps:
        for action in actions:
            action.before_step(loop)
        batch, tokens = next(data)
        step_fn = _first_step if loop.step == loop.start_step else _call
        loop.state, metrics = step_fn(train_step, loop.state, batch)
        loop.step += 1
        faults.at_step(loop.step)  # fault-injection hooks (SWITCH_T5_FAULT); no-ops when unset
        loop.pending.add(loop.step, metrics, tokens)
        loop.stopping = preemption.reached(loop.step)
        for action in actions:
            if action.due(loop):
                action(loop)
        if loop.stopping:
            break
    for action in actions:
        action.close(loop)
    return loop


def _call(train_step, state, batch):
    return train_step(state, batch)
