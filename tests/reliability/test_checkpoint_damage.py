"""Damaged checkpoints in-process: truncated, deleted or bit-flipped array files, half-written
directories, leftovers of a killed write, all damaged, another architecture; checksums.

A small train state (the param names and logical axes of the real model) on the (2, 2, 2) mesh;
each test copies a directory of saved steps 1, 2, 3 and damages it.
"""

import logging
import os
import shutil
import time

import jax
import numpy as np
import pytest
from fault_runs import array_files, committed_steps
from tiny import toy_setup

from switch_t5 import checkpoints, config, run_dir

META = checkpoints.make_meta(config.SwitchConfig(), {"path": "v.model", "hash": "abc"})


def _state_at(state, step):
    """A distinct, bitwise-known state per step."""
    return state.replace(params=jax.tree.map(lambda p: p + step, state.params))


@pytest.fixture(scope="module")
def saved(tmp_path_factory, mesh_222):
    setup = toy_setup(mesh_222, dense=False)
    state = setup.init_fn()
    out = {}
    for sums in (False, True):
        d = str(tmp_path_factory.mktemp("saved") / "model")
        ckpt = checkpoints.Checkpointer(d, max_to_keep=None, checksums=sums)
        for step in (1, 2, 3):
            ckpt.save(step, _state_at(state, step), {"position": step}, META)
        ckpt.close()
        out[sums] = d
    return setup, state, out


@pytest.fixture
def model_dir(saved, tmp_path):
    d = str(tmp_path / "model")
    shutil.copytree(saved[2][False], d)
    return d


def _step_dir(d, step):
    return os.path.join(d, "checkpoints", str(step))


def _resume(setup, d, **kw):
    ckpt = checkpoints.Checkpointer(d, max_to_keep=None, **kw)
    try:
        return ckpt, ckpt.restore_latest(setup.abstract_state, expected_meta=META)
    except BaseException:
        ckpt.close()
        raise


def _check_fell_back_to_2(saved, d, caplog, **kw):
    setup, state, _ = saved
    with caplog.at_level(logging.WARNING, logger="switch_t5.checkpoints"):
        ckpt, restored = _resume(setup, d, **kw)
    assert restored.step == 2 and restored.data_state == {"position": 2}
    assert checkpoints.tree_equal(restored.state, _state_at(state, 2))
    assert f"{_step_dir(d, 3)} is not usable" in caplog.text
    moved = os.listdir(os.path.join(d, run_dir.QUARANTINE))
    assert len(moved) == 1 and moved[0].startswith("3.damaged-")
    # Step 3 can be saved again: nothing is left that orbax would refuse to overwrite.
    assert ckpt.save(3, restored.state, {"position": 3}, META)
    ckpt.close()
    assert committed_steps(d) == [1, 2, 3]


def test_truncated_array_files(saved, model_dir, caplog):
    # Every data file: a step can hold a chunk in more than one data file (per-process and merged
    # OCDBT stores), so damaging one alone may leave a readable copy.
    for victim in array_files(_step_dir(model_dir, 3)):
        with open(victim, "r+b") as f:
            f.truncate(os.path.getsize(victim) - 7)
    _check_fell_back_to_2(saved, model_dir, caplog)


def test_deleted_array_file(saved, model_dir, caplog):
    for f in array_files(_step_dir(model_dir, 3)):
        os.remove(f)
    _check_fell_back_to_2(saved, model_dir, caplog)


def test_half_written_step_directory(saved, model_dir, caplog):
    """A step directory holding only part of its items (a copy interrupted by hand)."""
    shutil.rmtree(os.path.join(_step_dir(model_dir, 3), "state"))
    _check_fell_back_to_2(saved, model_dir, caplog)


def test_corrupt_meta(saved, model_dir, caplog):
    with open(os.path.join(_step_dir(model_dir, 3), "meta", "metadata"), "w") as f:
        f.write('{"model_config": ')
    _check_fell_back_to_2(saved, model_dir, caplog)


def test_leftover_of_a_killed_write_is_moved_aside(saved, model_dir, caplog):
    tmp = os.path.join(model_dir, "checkpoints", "4.orbax-checkpoint-tmp-123")
    shutil.copytree(_step_dir(model_dir, 3), tmp)
    with caplog.at_level(logging.WARNING, logger="switch_t5.checkpoints"):
        ckpt, restored = _resume(saved[0], model_dir)
    ckpt.close()
    assert restored.step == 3
    assert "4.orbax-checkpoint-tmp-123 is not usable" in caplog.text
    assert os.listdir(os.path.join(model_dir, run_dir.QUARANTINE)) == ["4.orbax-checkpoint-tmp-123"]


def test_only_a_killed_first_write_starts_from_scratch(saved, tmp_path):
    """Nothing was ever committed: starting from scratch loses nothing."""
    d = str(tmp_path / "first")
    os.makedirs(os.path.join(d, "checkpoints", "1.orbax-checkpoint-tmp-9", "state"))
    ckpt, restored = _resume(saved[0], d)
    ckpt.close()
    assert restored is None


def test_all_damaged_is_a_clear_error_also_on_the_next_start(saved, model_dir):
    for step in (1, 2, 3):
        shutil.rmtree(os.path.join(_step_dir(model_dir, step), "state"))
    for _ in range(2):  # the second start finds only the quarantine folder
        with pytest.raises(checkpoints.CheckpointCorruptError) as e:
            _resume(saved[0], model_dir)
        msg = str(e.value)
        assert "Refusing to start from scratch" in msg
        for step in (1, 2, 3):
            assert f"{step}.damaged-" in msg


def test_other_architecture_is_a_mismatch_and_nothing_is_moved(saved, model_dir, mesh_222):
    """Same meta, other array shapes (e.g. another vocabulary padding): a config error."""
    other = toy_setup(mesh_222, vocab=256, dense=False)
    ckpt = checkpoints.Checkpointer(model_dir)
    with pytest.raises(
        checkpoints.CheckpointMismatchError, match=r"params.embedding: .*\(128, 8\)"
    ):
        ckpt.restore_latest(other.abstract_state, expected_meta=META)
    ckpt.close()
    assert committed_steps(model_dir) == [1, 2, 3]
    assert not os.path.exists(os.path.join(model_dir, run_dir.QUARANTINE))


def _flip_a_bit(step_dir):
    victim = max(array_files(step_dir), key=os.path.getsize)
    with open(victim, "r+b") as f:
        f.seek(os.path.getsize(victim) // 2)
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 0x10]))


def test_checksums_catch_a_bit_flip(saved, tmp_path, caplog):
    d = str(tmp_path / "model")
    shutil.copytree(saved[2][True], d)
    assert os.path.exists(os.path.join(_step_dir(d, 3), checkpoints.CHECKSUM_FILE))
    _flip_a_bit(_step_dir(d, 3))
    _check_fell_back_to_2(saved, d, caplog, checksums=True)
    assert "does not match its SHA-256 checksum" in caplog.text


def test_checksums_are_off_by_default_and_cost_one_reread(saved, mesh_222, tmp_path):
    """Off: no checksum file. The cost (a re-read of each checkpoint) is printed, not asserted:
    wall times are not test material (see README "Reliability" for measured figures)."""
    assert not os.path.exists(
        os.path.join(_step_dir(saved[2][False], 3), checkpoints.CHECKSUM_FILE)
    )
    state = saved[0].init_fn()
    times = {}
    for sums in (False, True):
        ckpt = checkpoints.Checkpointer(str(tmp_path / f"sums_{sums}"), checksums=sums)
        t = time.perf_counter()
        for step in range(1, 6):
            ckpt.save(step, state, {}, META)
        ckpt.wait()
        times[sums] = time.perf_counter() - t
        ckpt.close()
    print(f"5 saves+waits: {times[False]:.3f} s without checksums, {times[True]:.3f} s with")
    np.testing.assert_equal(
        sorted(os.listdir(os.path.join(str(tmp_path / "sums_True"), "checkpoints", "5"))),
        sorted(
            [
                *os.listdir(os.path.join(str(tmp_path / "sums_False"), "checkpoints", "5")),
                checkpoints.CHECKSUM_FILE,
            ]
        ),
    )
