"""Console noise: TensorFlow's native log lines, hidden from a command unless `--verbose`.

`gin_utils.configure_console_logging` turns this on for every command; library code wraps calls
that make TensorFlow's C++ side log (device setup) in `native_stderr_filtered()`, which does
nothing unless it is on.
"""

from __future__ import annotations

import contextlib
import importlib.abc
import importlib.machinery
import os
import re
import sys
import tempfile

_QUIET = False


def quiet_native_logs() -> None:
    """Hides TensorFlow's native INFO lines at import and its CUDA probe errors on a machine
    without a GPU, from now on in this process."""
    global _QUIET
    _QUIET = True
    if "tensorflow" not in sys.modules and not any(
        isinstance(f, _QuietTensorFlowImport) for f in sys.meta_path
    ):
        sys.meta_path.insert(0, _QuietTensorFlowImport())


# TensorFlow's native libraries log at load time, before they read TF_CPP_MIN_LOG_LEVEL:
# `I0000 ... cudart_stub.cc:31] Could not find cuda drivers ...` and absl's banner.
# Setting up devices without a GPU: `E0000 ... cuda_platform.cc:52] failed call to cuInit: ...`.
_NATIVE_IMPORT_NOISE = re.compile(
    r"^(I\d{4} \d|WARNING: All log messages before absl::InitializeLog\(\) is called"
    r"|E\d{4} .*failed call to cuInit)"
)


class _QuietTensorFlowImport(importlib.abc.MetaPathFinder):
    """While `tensorflow` is first imported, its native INFO lines are dropped from stderr (fd 2);
    every other line written meanwhile (errors, warnings, tracebacks) is written back."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname != "tensorflow":
            return None
        # Not removed yet: a library may look for the spec (is TensorFlow installed?) long
        # before importing it.
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        exec_module = spec.loader.exec_module

        def quiet_exec_module(module):
            if self in sys.meta_path:
                sys.meta_path.remove(self)
            with native_stderr_filtered():
                exec_module(module)

        spec.loader.exec_module = quiet_exec_module
        return spec


@contextlib.contextmanager
def native_stderr_filtered():
    """Sends fd 2 to a temporary file, then writes its lines back less `_NATIVE_IMPORT_NOISE`
    (nothing changes unless `quiet_native_logs()` was called)."""
    if not _QUIET:
        yield
        return
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as captured:
        os.dup2(captured.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            captured.seek(0)
            text = captured.read().decode(errors="replace")
            kept = [
                line
                for line in text.splitlines(keepends=True)
                if not _NATIVE_IMPORT_NOISE.match(line)
            ]
            if kept:
                sys.stderr.write("".join(kept))
                sys.stderr.flush()
