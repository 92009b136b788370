"""Side-by-side timing shared by the benchmarks in scripts/ (no TensorFlow, GPU-ready).

Benchmarks here compare implementations by ratios measured in one process, interleaved: every
round runs the reference once and each candidate once, in the same order, so that a burst of load
from other processes hits the candidates and the reference alike. A ratio is the median over
rounds of (candidate time / reference time in the same round). Besides wall-clock time the
process CPU time is recorded: on a CPU shared with other jobs, CPU seconds measure the work done
and suffer far less from the contention than wall time does (on an accelerator it is meaningless
and wall time is what counts). Nothing here asserts a time.
"""

from __future__ import annotations

import dataclasses
import os
import statistics
import time
from collections.abc import Callable, Mapping

import jax


@dataclasses.dataclass
class Timing:
    """Per-round times of one callable, in seconds."""

    wall: list[float] = dataclasses.field(default_factory=list)
    cpu: list[float] = dataclasses.field(default_factory=list)

    @property
    def wall_median(self) -> float:
        return statistics.median(self.wall)

    @property
    def cpu_median(self) -> float:
        return statistics.median(self.cpu)


def time_once(fn: Callable[[], object]) -> tuple[float, float]:
    """(wall, process CPU) seconds of one call, waiting for its device work."""
    wall, cpu = time.perf_counter(), time.process_time()
    jax.block_until_ready(fn())
    return time.perf_counter() - wall, time.process_time() - cpu


def interleaved(fns: Mapping[str, Callable[[], object]], rounds: int) -> dict[str, Timing]:
    """Times every callable once per round, in order, after one warm-up (compile) call each."""
    for fn in fns.values():
        jax.block_until_ready(fn())
    out = {name: Timing() for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            wall, cpu = time_once(fn)
            out[name].wall.append(wall)
            out[name].cpu.append(cpu)
    return out


def ratio(candidate: Timing, reference: Timing, kind: str = "wall") -> float:
    """Median over rounds of candidate / reference ("wall" or "cpu" seconds)."""
    a, b = getattr(candidate, kind), getattr(reference, kind)
    return statistics.median(x / y for x, y in zip(a, b))


def load_note() -> str:
    """The machine's load, to print next to the numbers (others' jobs skew wall time)."""
    try:
        one, five, _ = os.getloadavg()
    except OSError:
        return "load average unknown"
    return f"load average {one:.1f} (1 min) {five:.1f} (5 min) on {os.cpu_count()} CPUs"


def backend_note() -> str:
    devices = jax.devices()
    return f"backend={jax.default_backend()} devices={len(devices)} ({devices[0].device_kind})"
