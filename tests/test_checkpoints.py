"""Checkpoint save/restore (also onto other meshes), meta checks and the MODEL_DIR lock."""

import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from tiny import toy_setup

from switch_t5 import checkpoints, config, partitioning


@pytest.fixture(scope="module")
def saved(tmp_path_factory, mesh_222):
    model_dir = str(tmp_path_factory.mktemp("ckpt"))
    setup = toy_setup(mesh_222)
    state = setup.init_fn()
    # Make the optimizer state non-trivial.
    grads = jax.tree.map(lambda p: jnp.cos(p * 7.0), state.params)
    state = jax.jit(lambda s, g: s.apply_gradients(g, setup.optimizer.tx))(state, grads)
    meta = checkpoints.make_meta(config.SwitchConfig(), {"path": "v.model", "hash": "abc"})
    ckpt = checkpoints.Checkpointer(model_dir, max_to_keep=2)
    for step in (1, 2, 3):
        ckpt.save(step, state, {"position": step * 10}, meta)
    ckpt.close()
    return model_dir, state, meta


def test_restore_same_mesh_is_bitwise_and_keeps_last_k(saved, mesh_222):
    model_dir, state, meta = saved
    ckpt = checkpoints.Checkpointer(model_dir, max_to_keep=2)
    assert ckpt.all_steps() == [2, 3]
    assert ckpt.latest_step() == 3
    restored = ckpt.restore(toy_setup(mesh_222).abstract_state, expected_meta=meta)
    assert restored.step == 3 and restored.data_state == {"position": 30}
    assert checkpoints.tree_equal(restored.state, state)
    wi = restored.state.params["expert_wi"]
    assert wi.sharding.spec == jax.sharding.PartitionSpec("expert", None, "model")
    ckpt.close()


@pytest.mark.parametrize("sizes", [(8, 1, 1), (4, 1, 2)])
def test_restore_onto_another_mesh(saved, sizes):
    model_dir, state, meta = saved
    mesh = partitioning.make_mesh(*sizes, num_experts=4)
    setup = toy_setup(mesh)
    ckpt = checkpoints.Checkpointer(model_dir)
    restored = ckpt.restore(setup.abstract_state, step=3, expected_meta=meta)
    ckpt.close()
    assert checkpoints.tree_equal(restored.state, state)
    assert restored.state.params["expert_wi"].sharding.mesh.devices.shape == sizes
    # The restored optimizer state works on the new mesh.
    grads = jax.tree.map(jnp.ones_like, restored.state.params)
    with jax.set_mesh(mesh):
        nxt = jax.jit(lambda s, g: s.apply_gradients(g, setup.optimizer.tx))(restored.state, grads)
    assert int(nxt.step) == 2


def test_mismatched_config_or_vocabulary_fails_clearly(saved, mesh_222):
    model_dir, _, _ = saved
    other = checkpoints.make_meta(
        config.SwitchConfig(num_experts=16), {"path": "other.model", "hash": "zzz"}
    )
    ckpt = checkpoints.Checkpointer(model_dir)
    with pytest.raises(checkpoints.CheckpointMismatchError) as e:
        ckpt.restore(toy_setup(mesh_222).abstract_state, expected_meta=other)
    ckpt.close()
    msg = str(e.value)
    assert "model_config.num_experts: checkpoint 8 != now 16" in msg
    assert "vocabulary" in msg and "other.model" in msg


def test_lock_refuses_second_run_and_dies_with_its_process(tmp_path):
    d = str(tmp_path)
    with (
        checkpoints.ModelDirLock(d),
        pytest.raises(checkpoints.ModelDirLockedError, match="in use by another training"),
    ):
        checkpoints.ModelDirLock(d).acquire()
    checkpoints.ModelDirLock(d).acquire().release()
    # A process holding the lock is SIGKILLed: the lock is gone with it.
    code = (
        "import os, sys; from switch_t5 import checkpoints; "
        f"checkpoints.ModelDirLock({d!r}).acquire(); print('locked', flush=True); "
        "os.kill(os.getpid(), 9)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert "locked" in out.stdout and out.returncode == -9
    checkpoints.ModelDirLock(d).acquire().release()


def test_all_finite():
    assert checkpoints.all_finite({"a": jnp.ones(3), "b": jnp.arange(3)})
    assert not checkpoints.all_finite({"a": jnp.array([1.0, np.nan])})


def test_model_dir_that_is_a_file_is_named(tmp_path):
    """A regular file as MODEL_DIR (or above it) once ended in FileExistsError from makedirs."""
    from switch_t5.errors import UserError

    file = tmp_path / "run"
    file.write_text("not a folder")
    with pytest.raises(checkpoints.ModelDirIsFileError, match=f"MODEL_DIR {file} is a file") as e:
        checkpoints.check_model_dir(str(file))
    assert isinstance(e.value, UserError) and "give a folder" in str(e.value)
    with pytest.raises(checkpoints.ModelDirIsFileError, match=f"inside {file}, which is a file"):
        checkpoints.check_model_dir(str(file / "sub" / "run"), "--checkpoint_dir")
    checkpoints.check_model_dir(str(tmp_path / "new" / "run"))  # to be created: fine
    checkpoints.check_model_dir(str(tmp_path))


def test_recorded_feature_lengths(saved, tmp_path):
    """The meta records the training lengths; older checkpoints have them in the data item's
    pipeline settings; a checkpoint with neither gives None."""
    model_dir, _, meta = saved
    step_dir = f"{model_dir}/checkpoints/3"
    assert checkpoints.recorded_feature_lengths(meta, step_dir) is None  # data {"position": 30}
    lengths = {"inputs": 64, "targets": 16}
    with_lengths = checkpoints.make_meta(config.SwitchConfig(), {}, lengths)
    assert checkpoints.recorded_feature_lengths(with_lengths, step_dir) == lengths
    old = tmp_path / "old"
    (old / "data").mkdir(parents=True)
    (old / "data" / "metadata").write_text(
        '{"version": 1, "config": {"feature_lengths": {"inputs": 32, "targets": 8}}}'
    )
    assert checkpoints.recorded_feature_lengths(meta, str(old)) == {"inputs": 32, "targets": 8}
