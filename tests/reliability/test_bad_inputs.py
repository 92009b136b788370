"""Bad inputs through the real entry point (`switch_t5.train.main`), each refused before anything
is compiled, with a message naming the problem.

Covered elsewhere (not repeated here): unknown/mistyped gin binding, wrong type, a batch that
the mesh cannot split and a vocabulary size that does not match the task
(tests/test_train.py::test_bad_gin_fails_before_compiling), an unset required macro
(test_unset_required_macro_is_named), two runs on one MODEL_DIR
(test_second_run_on_a_locked_model_dir_is_refused; the lock dies with a SIGKILLed process:
tests/test_checkpoints.py::test_lock_refuses_second_run_and_dies_with_its_process, and the
restarts of tests/reliability/test_faults.py are never refused).
"""

import gzip
import os

import gin
import jax.numpy as jnp
import pytest
from fault_runs import TINY, cli_args, committed_steps

from switch_t5 import checkpoints, config, run_dir, train_state, trainer
from switch_t5 import train as train_lib

# In-process: the 8 simulated devices of tests/conftest.py on a (2, 2, 2) mesh.
MESH = ("train.mesh_data = 2", "train.mesh_expert = 2", "train.mesh_model = 2")


@pytest.fixture
def never_compile(monkeypatch):
    """Building the train state or the train step fails the test: the error must come first."""

    def never(*args, **kwargs):
        raise AssertionError("the bad input was not caught before building the model")

    monkeypatch.setattr(train_state, "setup_train_state", never)
    monkeypatch.setattr(trainer, "make_train_step", never)
    gin.clear_config()
    yield monkeypatch
    gin.clear_config()


def _main(model_dir, *bindings):
    return train_lib.main(cli_args(str(model_dir), *bindings))


@pytest.mark.parametrize(
    "bindings, error, message",
    [
        (
            ("train.mesh_data = 3", "train.mesh_expert = 2", "train.mesh_model = 2"),
            ValueError,
            r"data=3 x expert=2 x model=2 = 12 but there are 8 devices",
        ),
        (
            ("train.mesh_data = 1", "train.mesh_expert = 8", "train.mesh_model = 1"),
            ValueError,
            r"expert mesh axis \(8\) does not divide num_experts=4",
        ),
        (
            (*MESH, "switch_t5.SwitchConfig.train_capacity_factor = 0.0"),
            ValueError,
            r"train_capacity_factor=0.0 must be > 0",
        ),
        (
            (*MESH, "switch_t5.SwitchConfig.eval_capacity_factor = -1.0"),
            ValueError,
            r"eval_capacity_factor=-1.0 must be > 0",
        ),
    ],
    ids=["mesh_product", "expert_axis", "train_capacity", "eval_capacity"],
)
def test_bad_mesh_or_model_config(tmp_path, never_compile, bindings, error, message):
    with pytest.raises(error, match=message):
        _main(tmp_path / "m", *bindings)
    assert not os.path.exists(tmp_path / "m" / "checkpoints")


def _text_files(tmp_path, kind):
    d = tmp_path / "data"
    d.mkdir()
    if kind == "missing":
        return str(d / "nothing_here_*.txt")
    if kind == "empty":
        (d / "a.txt").write_text("")
        return str(d / "a.txt")
    path = d / "a.jsonl.gz"
    blob = gzip.compress(b'{"text": "some words"}\n' * 200)
    path.write_bytes(blob[: len(blob) // 2])  # truncated mid-stream
    return str(path)


@pytest.mark.parametrize(
    "kind, error, message",
    [
        ("missing", FileNotFoundError, r"TEXT_FILES: .*nothing_here_\*\.txt' matches no file"),
        ("empty", ValueError, r"a\.txt: the file is empty"),
        ("corrupt", ValueError, r"a\.jsonl\.gz: truncated or corrupt gzip stream"),
    ],
)
def test_bad_data_files(tmp_path, never_compile, kind, error, message):
    files = _text_files(tmp_path, kind)
    with pytest.raises(error, match=message):
        _main(
            tmp_path / "m",
            *MESH,
            "MIXTURE_OR_TASK_NAME = 'text_files_span_corruption'",
            f"TEXT_FILES = '{files}'",
            "VOCABULARY_PATH = 'embedded'",
        )


def test_checkpoint_of_another_architecture(tmp_path, monkeypatch):
    """MODEL_DIR holds a checkpoint whose config differs (d_ff): refused before the train step is
    built (the abstract train state is needed to restore), and the checkpoint stays in place."""

    def never(*args, **kwargs):
        raise AssertionError("the mismatch was not caught before building the train step")

    monkeypatch.setattr(trainer, "make_train_step", never)
    d = str(tmp_path / "m")
    other = config.SwitchConfig(**{**TINY, "d_ff": 32})
    ckpt = checkpoints.Checkpointer(d)
    ckpt.save(2, {"w": jnp.ones((3,))}, {}, checkpoints.make_meta(other, {"hash": "x"}))
    ckpt.close()
    gin.clear_config()
    try:
        with pytest.raises(
            checkpoints.CheckpointMismatchError,
            match=r"model_config\.d_ff: checkpoint 32 != now 16",
        ):
            # group_size 32: 4 routing groups split over the 4 batch shards (the run fits the
            # mesh, so the checkpoint is what stops it).
            _main(d, *MESH, "switch_t5.SwitchConfig.group_size = 32")
    finally:
        gin.clear_config()
    assert committed_steps(d) == [2]
    assert not os.path.exists(os.path.join(d, run_dir.QUARANTINE))
