"""Fault injection for the reliability tests: kill (or starve) the process at a named point.

`SWITCH_T5_FAULT=<point>[:<step>]` arms one fault; unset (the normal case) every hook is a dict
lookup that does nothing. The points, each reached by `switch_t5.train` / `checkpoints`:

  mid_step              SIGKILL after the train step of <step> was dispatched, before its metrics
                        are logged or anything is saved.
  mid_checkpoint_write  SIGKILL while checkpoint <step> is being written: after its array files
                        are on disk in orbax's temporary directory, before the atomic rename that
                        commits it (`AtomicRenameTemporaryPath.finalize`). The hook prints the
                        files it saw, so a test can assert that the half-written state existed.
  after_save            SIGKILL right after checkpoint <step> is committed (renamed).
  after_restore         SIGKILL right after checkpoint <step> was restored, before any step.
  during_eval           SIGKILL in the middle of the evaluation at <step> (after its first batch).
  sigterm               SIGTERM to itself after the train step of <step>: the real preemption path
                        (save at the current step, exit 0).
  sigint                SIGINT (Ctrl-C) to itself after the train step of <step>: the same path
                        (save at the current step), exit status 130.
  no_space              Before checkpoint <step> is written, limit the size of any file this
                        process writes (RLIMIT_FSIZE) to a few bytes: the kernel then fails the
                        array writes with EFBIG, as a full disk fails them with ENOSPC.

Without `:<step>` a point fires the first time it is reached. Hooks print one line
`FAULT <point> at step <step>: ...` to stderr before acting, so a test can tell which window it hit.
"""

from __future__ import annotations

import os
import signal
import sys

ENV_VAR = "SWITCH_T5_FAULT"
POINTS = (
    "mid_step",
    "mid_checkpoint_write",
    "after_save",
    "after_restore",
    "during_eval",
    "sigterm",
    "sigint",
    "no_space",
)
# The file-size limit of `no_space`: large enough for a log line, far below any array file.
NO_SPACE_FILE_LIMIT = 64


def armed() -> tuple[str, int | None] | None:
    """The fault named by SWITCH_T5_FAULT as (point, step or None), or None.

    Raises:
      ValueError: an unknown point or a step that is not an integer.
    """
    spec = os.environ.get(ENV_VAR, "").strip()
    if not spec:
        return None
    point, _, step = spec.partition(":")
    if point not in POINTS:
        raise ValueError(f"{ENV_VAR}={spec!r}: unknown point {point!r}; choose one of {POINTS}")
    try:
        return point, int(step) if step else None
    except ValueError:
        raise ValueError(f"{ENV_VAR}={spec!r}: the step after ':' must be an integer") from None


_current_step: int | None = None


def at_step(step: int) -> None:
    """Called by the training loop after each dispatched step: records it, runs the step hooks."""
    global _current_step
    _current_step = step
    if armed() is None:
        return
    maybe_kill("mid_step", step)
    maybe_signal(step)


def current_step() -> int | None:
    """The last step `at_step` saw (for hooks that do not know it, e.g. inside evaluation)."""
    return _current_step


def fires(point: str, step: int | None) -> bool:
    """True when the armed fault is `point` and its step is `step` (or it has no step)."""
    fault = armed()
    return fault is not None and fault[0] == point and (fault[1] is None or fault[1] == step)


def _announce(point: str, step: int | None, what: str) -> None:
    sys.stderr.write(f"FAULT {point} at step {step}: {what}\n")
    sys.stderr.flush()


def kill(point: str, step: int | None, what: str = "SIGKILL") -> None:
    """SIGKILLs this process (no cleanup, no atexit, no finally) after announcing it."""
    _announce(point, step, what)
    os.kill(os.getpid(), signal.SIGKILL)


def maybe_kill(point: str, step: int | None) -> None:
    """The hook for the plain SIGKILL points (mid_step, after_restore, during_eval)."""
    if fires(point, step):
        kill(point, step)


def maybe_signal(step: int) -> None:
    """The `sigterm` and `sigint` hooks: deliver the signal to this process (the training loop's
    handler sets a flag; it saves and exits after this step)."""
    for point, signum in (("sigterm", signal.SIGTERM), ("sigint", signal.SIGINT)):
        if fires(point, step):
            _announce(point, step, signal.Signals(signum).name)
            os.kill(os.getpid(), signum)


def maybe_limit_file_size(step: int) -> None:
    """The `no_space` hook: from now on every write past NO_SPACE_FILE_LIMIT bytes fails.

    SIGXFSZ would kill the process, so it is ignored: the write then returns EFBIG, which is what
    the save path sees (a full disk returns ENOSPC through the same calls).
    """
    if fires("no_space", step):
        import resource

        _announce("no_space", step, f"RLIMIT_FSIZE = {NO_SPACE_FILE_LIMIT} bytes")
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (NO_SPACE_FILE_LIMIT, NO_SPACE_FILE_LIMIT))


def install_checkpoint_write_hook() -> None:
    """Arms `mid_checkpoint_write`: orbax's commit (the atomic rename) of the step SIGKILLs.

    A no-op unless that point is armed. The temporary directory and the files already written
    into it are printed first (the evidence that the checkpoint was half-written).
    """
    fault = armed()
    if fault is None or fault[0] != "mid_checkpoint_write":
        return
    from orbax.checkpoint._src.path import atomicity

    cls = atomicity.AtomicRenameTemporaryPath
    if getattr(cls.finalize, "_switch_t5_fault", False):
        return
    original = cls.finalize

    async def finalize(self, *args, **kwargs):
        final = self.get_final()
        step = int(final.name) if final.name.isdigit() else None
        if fires("mid_checkpoint_write", step):
            tmp = self.get()
            files = sorted(
                os.path.relpath(os.path.join(root, f), tmp)
                for root, _, names in os.walk(tmp)
                for f in names
            )
            kill("mid_checkpoint_write", step, f"SIGKILL before commit; {tmp} holds {files}")
        return await original(self, *args, **kwargs)

    finalize._switch_t5_fault = True
    cls.finalize = finalize
