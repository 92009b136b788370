"""SIGKILL at 5 points, SIGTERM, damaged checkpoints, no space, another mesh: one reference run.

Each case starts `python -m switch_t5.train` subprocesses on the tiny config of fault_runs.py;
faults are armed with SWITCH_T5_FAULT (switch_t5/faults.py), so no window is left to timing.
Two process chains run side by side (the suite must fit 2 CPU cores), sharing the persistent
compilation cache; the tests then check what each step of them left behind.

  reference: 10 uninterrupted steps (checkpoints every 2, evaluation every 3).
  chain:     one MODEL_DIR killed at mid_step:3, during_eval:3, mid_checkpoint_write:4,
             after_save:4, after_restore:4, then its newest checkpoints damaged, then finished:
             every train and eval loss equals the reference's bitwise.
  combo:     no_space:4 (the save of 4 fails, 2 stays), then the run continues on 2 devices
             (mesh data=2), SIGTERM at 6, resumes again on 2 devices to 10.
"""

import concurrent.futures
import os
import shutil

import numpy as np
import pytest
from fault_runs import TRAIN_STEPS, array_files, complete_steps, losses, run

from switch_t5 import checkpoints, run_dir

pytestmark = pytest.mark.slow


def _chain(d: str) -> list[dict]:
    """Kills one MODEL_DIR at each point in turn; records what each process left behind."""
    ckpt_dir = os.path.join(d, "checkpoints")
    out = []

    def record(r, **kw):
        out.append({"run": r, "steps": complete_steps(d), **kw})

    for fault in ("mid_step:3", "during_eval:3", "mid_checkpoint_write:4"):
        r = run(d, fault=fault)
        tmp = sorted(x for x in os.listdir(ckpt_dir) if ".orbax-checkpoint-tmp" in x)
        half = {x: array_files(os.path.join(ckpt_dir, x)) for x in tmp}
        record(r, tmp=half)
    record(run(d, fault="after_save:4"))
    record(run(d, fault="after_restore:4"))
    # Damage: truncate the array files of 4 (the newest; all of them: a chunk can be in more
    # than one data file, per-process and merged OCDBT stores), and leave a half-copied step 6
    # (a `meta` item only), as a copy interrupted by hand would.
    victims = array_files(os.path.join(ckpt_dir, "4"))
    for victim in victims:
        with open(victim, "r+b") as f:
            f.truncate(os.path.getsize(victim) // 2)
    os.makedirs(os.path.join(ckpt_dir, "6"))
    shutil.copytree(os.path.join(ckpt_dir, "4", "meta"), os.path.join(ckpt_dir, "6", "meta"))
    record(run(d), victims=victims)
    return out


def _combo(d: str) -> list[dict]:
    out = []
    no_eval = "EVAL_PERIOD = 0"
    r = run(d, no_eval, fault="no_space:4", steps=4)
    out.append({"run": r, "steps": complete_steps(d), "losses": losses(d)})
    r = run(d, no_eval, fault="sigterm:6", devices=2)
    out.append({"run": r, "steps": complete_steps(d)})
    r = run(d, no_eval, devices=2)
    out.append({"run": r, "steps": complete_steps(d)})
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    base = tmp_path_factory.mktemp("faults")
    dirs = {k: str(base / k) for k in ("reference", "chain", "combo")}
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        chain = pool.submit(_chain, dirs["chain"])
        reference = pool.submit(run, dirs["reference"])
        combo = pool.submit(lambda: (reference.result(), _combo(dirs["combo"]))[1])
        return {
            "dirs": dirs,
            "reference": reference.result(),
            "chain": chain.result(),
            "combo": combo.result(),
        }


def _ok(r):
    assert r.returncode == 0, r.output[-3000:]


def _killed(r, point: str, step: int) -> None:
    assert r.returncode == -9, f"expected SIGKILL at {point}:{step}\n{r.output[-3000:]}"
    assert r.fault_line().startswith(f"FAULT {point} at step {step}"), r.output[-3000:]


def test_reference_run(runs):
    r, d = runs["reference"], runs["dirs"]["reference"]
    _ok(r)
    assert r.start_step == 0
    assert sorted(losses(d)) == list(range(1, TRAIN_STEPS + 1))
    assert sorted(losses(d, "eval")) == [3, 6, 9, 10]


def test_sigkill_mid_step_and_during_eval(runs):
    (mid, during, *_) = runs["chain"]
    _killed(mid["run"], "mid_step", 3)
    # Checkpoint 2 may still have been in its async write at the kill: either way, the restart
    # resumes from what was committed (never from a partial step).
    assert mid["steps"] in ([], [2])
    assert during["run"].start_step == (mid["steps"] or [0])[-1]
    _killed(during["run"], "during_eval", 3)
    assert during["steps"] in ([], [2])


def test_sigkill_mid_checkpoint_write_leaves_only_an_uncommitted_directory(runs):
    before, write = runs["chain"][1], runs["chain"][2]
    assert write["run"].start_step == (before["steps"] or [0])[-1]
    _killed(write["run"], "mid_checkpoint_write", 4)
    # Saving 4 first waits for 2, so 2 is committed and 4 is not.
    assert write["steps"] == [2]
    (_name, files), *rest = [(k, v) for k, v in write["tmp"].items() if k.startswith("4.")]
    assert not rest
    assert files, "the half-written checkpoint held no array files when the process died"
    assert "state/" in write["run"].fault_line()


def test_sigkill_after_save_and_after_restore(runs):
    write, after_save, after_restore = runs["chain"][2:5]
    r = after_save["run"]
    assert r.start_step == 2
    _killed(r, "after_save", 4)
    # The half-written 4 was moved aside with a warning naming it, and 4 was written anew.
    (half,) = write["tmp"]
    assert half in r.output and "is not usable" in r.output
    assert after_save["steps"] == [2, 4]
    _killed(after_restore["run"], "after_restore", 4)
    assert after_restore["steps"] == [2, 4]


def test_damaged_checkpoints_are_quarantined_and_the_run_finishes_exactly(runs):
    final = runs["chain"][-1]
    r, d = final["run"], runs["dirs"]["chain"]
    _ok(r)
    assert r.start_step == 2
    for step in (6, 4):
        assert f"checkpoints/{step} is not usable" in r.output, r.output[-3000:]
    quarantine = os.listdir(os.path.join(d, run_dir.QUARANTINE))
    damaged = [q for q in quarantine if checkpoints.DAMAGED_TAG in q]
    assert sorted(q.split(".")[0] for q in damaged) == ["4", "6"], quarantine
    # With the half-written 4 of mid_checkpoint_write (and maybe a 2 cut by mid_step).
    assert any(q.startswith("4.orbax-checkpoint-tmp") for q in quarantine), quarantine
    # Steps 4 and 6 were saved again, not skipped as "already exists".
    assert complete_steps(d) == [6, 8, 10]
    ref = runs["dirs"]["reference"]
    assert losses(d) == losses(ref)  # bitwise, steps 1..10
    assert losses(d, "eval") == losses(ref, "eval")  # steps 3, 6, 9, 10


def test_same_seed_and_config_give_identical_losses(runs):
    """The combo's first process repeats steps 1..4 of the reference in another process."""
    ref = losses(runs["dirs"]["reference"])
    first = runs["combo"][0]["losses"]
    assert first == {s: ref[s] for s in (1, 2, 3, 4)}


def test_no_space_during_a_save_keeps_the_earlier_checkpoint(runs):
    """RLIMIT_FSIZE makes the kernel refuse the array writes of checkpoint 4 (EFBIG)."""
    full, resumed = runs["combo"][:2]
    r = full["run"]
    assert r.returncode == 2, r.output[-3000:]  # a setting error: one error line, status 2
    assert r.fault_line().startswith("FAULT no_space at step 4")
    assert "error: writing checkpoint 4" in r.output, r.output[-3000:]
    assert "file system is full" in r.output
    assert full["steps"] == [2]
    # Checkpoint 2 was intact: the next process resumed from it.
    assert resumed["run"].start_step == 2


def test_sigterm_and_resume_on_another_mesh(runs):
    """From 1 device (mesh 1x1x1) to 2 (data=2): losses within 1e-5 relative (the data-parallel
    gradient reduction adds in another order); SIGTERM saves 6 and exits 0 on the way."""
    _, term, final = runs["combo"]
    r = term["run"]
    _ok(r)
    assert "SIGTERM: saved checkpoint 6" in r.output
    assert term["steps"] == [2, 4, 6]
    _ok(final["run"])
    assert final["run"].start_step == 6
    ref, got = losses(runs["dirs"]["reference"]), losses(runs["dirs"]["combo"])
    assert sorted(got) == list(range(1, TRAIN_STEPS + 1))
    for step in range(3, TRAIN_STEPS + 1):
        np.testing.assert_allclose(got[step], ref[step], rtol=1e-5, err_msg=f"step {step}")
