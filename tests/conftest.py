"""Test setup: 8 simulated CPU devices and a persistent compilation cache.

XLA_FLAGS must be set before jax is imported anywhere, so it is done at the top of this file.
"""

import os

# Tiny test models spend their time compiling, not running: skipping LLVM's optimisation passes
# halves the suite's CPU time (measured on tests/test_moe.py: 84 s -> 43 s of CPU). Subprocesses
# started by tests inherit these flags.
_flags = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in _flags:
    _flags += " --xla_force_host_platform_device_count=8"
if "xla_backend_optimization_level" not in _flags:
    _flags += " --xla_backend_optimization_level=0"
os.environ["XLA_FLAGS"] = _flags.strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# TensorFlow (data pipeline only) must never take an accelerator from JAX.
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import signal  # noqa: E402

import jax  # noqa: E402  (XLA_FLAGS first)
import pytest  # noqa: E402

# A suite started in the background of a non-interactive shell (`bash .ci/run &`) inherits SIGINT
# ignored, and so would every training subprocess: the Ctrl-C tests need Python's own handler
# (the program itself rightly leaves an ignored SIGINT ignored, as under nohup).
if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)

_CACHE_DIR = os.environ.get(
    "SWITCH_T5_TEST_COMPILATION_CACHE",
    os.path.join(os.path.expanduser("~"), ".cache", "switch_t5", "jax_test_cache"),
)
jax.config.update("jax_compilation_cache_dir", _CACHE_DIR)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


@pytest.fixture(scope="session")
def mesh_222():
    """The (data=2, expert=2, model=2) mesh on 8 simulated CPU devices."""
    from switch_t5 import partitioning

    assert jax.device_count() == 8, "tests expect 8 simulated CPU devices (see conftest.py)"
    return partitioning.make_mesh(2, 2, 2, num_experts=4)


@pytest.fixture(scope="session")
def c4_sample_path():
    """The real 1,000-document C4 sample, when this machine has it; skips otherwise."""
    here = os.path.dirname(os.path.abspath(__file__))
    path = os.path.join(
        here, "..", "..", "shared", "data", "c4", "c4-sample.00000-of-00001.json.gz"
    )
    if not os.path.exists(path):
        pytest.skip("the C4 sample (../shared/data/c4) is not on this machine")
    return os.path.abspath(path)
