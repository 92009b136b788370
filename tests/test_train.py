"""End-to-end pretraining: the library train() on the simulated (2, 2, 2) mesh, exact resume,
restore on another mesh, SIGTERM, NaN stop, bad gin, the lock, shipped run configs.

One tiny run (6 steps) is shared by the module; later runs reuse its compiled step through the
persistent compilation cache (same program), so only the other-mesh test compiles anew.
"""

import json
import os
import re
import shutil
import signal
import subprocess
import sys

import gin
import jax
import numpy as np
import pytest
from tiny import EMBEDDED_FIELDS, EMBEDDED_RUN

from switch_t5 import (
    checkpoints,
    errors,
    gin_utils,
    network,
    optim,
    partitioning,
    run_builder,
    train_state,
    training,
)
from switch_t5 import loop as loop_lib
from switch_t5 import train as train_lib
from switch_t5.config import SwitchConfig

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

TINY = EMBEDDED_FIELDS
RUN = {**EMBEDDED_RUN, "eval_period": 3, "eval_steps": 2, "checkpoint_period": 3, "random_seed": 0}


def _train(model_dir, train_steps, mesh=(2, 2, 2), config_overrides=None, **kw):
    # `train` is gin-configurable and eval's model loading applies `switch_t5.SwitchConfig.*`
    # bindings: bindings an earlier test parsed would silently change this run.
    gin.clear_config()
    args = {**RUN, "mesh_data": mesh[0], "mesh_expert": mesh[1], "mesh_model": mesh[2], **kw}
    return train_lib.train(
        model_dir=str(model_dir),
        train_steps=train_steps,
        model_config=SwitchConfig(**{**TINY, **(config_overrides or {})}),
        **args,
    )


def _losses(model_dir, split="train"):
    with open(os.path.join(model_dir, "metrics.jsonl")) as f:
        records = [json.loads(line) for line in f]
    return {r["step"]: r["loss"] for r in records if r["split"] == split}


@pytest.fixture(scope="module")
def run_a(tmp_path_factory):
    """The uninterrupted reference run: 6 steps, checkpoints at 3 and 6."""
    d = tmp_path_factory.mktemp("run_a")
    result = _train(d, 6, num_samples=2)
    return str(d), result


@pytest.fixture(scope="module")
def run_b_half(tmp_path_factory, run_a):
    """The same run stopped after 3 steps (a copy is kept for the other-mesh restore)."""
    d = tmp_path_factory.mktemp("run_b")
    _train(d, 3)
    copy = str(tmp_path_factory.mktemp("run_b_copy") / "model")
    shutil.copytree(d, copy)
    return str(d), copy


def test_end_to_end_run_writes_everything(run_a):
    d, result = run_a
    assert result.step == 6 and not result.preempted
    with open(os.path.join(d, "metrics.jsonl")) as f:
        records = [json.loads(line) for line in f]
    train_recs = [r for r in records if r["split"] == "train"]
    assert [r["step"] for r in train_recs] == [1, 2, 3, 4, 5, 6]
    for key in (
        "loss",
        "cross_entropy",
        "accuracy",
        "z_loss",
        "load_balancing_loss",
        "router_z_loss",
        "fraction_dropped",
        "router_confidence",
        "learning_rate",
        "tokens_per_sec",
        "step_time",
    ):
        assert key in train_recs[-1], key
    assert np.asarray(train_recs[-1]["expert_usage"]).shape == (2, 4)
    assert [r["step"] for r in records if r["split"] == "eval"] == [3, 6]
    assert [s for s, _ in result.eval_losses] == [3, 6]
    # Near chance (log 4096 = 8.3) after 6 steps of a tiny model.
    assert all(5.0 < loss < 12.0 for loss in _losses(d).values())
    assert sorted(int(s) for s in os.listdir(os.path.join(d, "checkpoints")) if s.isdigit()) == [
        3,
        6,
    ]
    assert os.path.exists(os.path.join(d, "config.gin"))
    assert os.path.getsize(os.path.join(d, "plots", "loss.png")) > 1000
    assert os.path.getsize(os.path.join(d, "plots", "expert_load.png")) > 1000
    events = os.listdir(os.path.join(d, "tensorboard", "train"))
    assert any(e.startswith("events.out.tfevents") for e in events)
    assert len(result.samples) == 2 and all(s["prediction"] for s in result.samples)


def test_resume_gives_the_same_losses_exactly(run_a, run_b_half):
    d_a, _ = run_a
    d_b, _ = run_b_half
    result = _train(d_b, 6)
    assert result.start_step == 3 and result.step == 6
    assert _losses(d_b) == _losses(d_a)  # bitwise, every step 1..6
    assert _losses(d_b, "eval") == _losses(d_a, "eval")


@pytest.mark.slow
def test_restore_on_another_mesh(run_a, run_b_half):
    """Saved on (2, 2, 2), continued on (4, 1, 2): params bitwise, losses within 1e-5."""
    d_a, _ = run_a
    _, copy = run_b_half
    cfg = SwitchConfig(**TINY)
    setups = {}
    for sizes in ((2, 2, 2), (4, 1, 2)):
        mesh = partitioning.make_mesh(*sizes, num_experts=4)
        setups[sizes] = train_state.setup_train_state(
            lambda rng: network.init_variables(cfg, rng),
            lambda specs: optim.make_optimizer("adafactor", optim.rsqrt_schedule(), specs),
            mesh,
            0,
        )
    ckpt = checkpoints.Checkpointer(copy)
    saved = ckpt.restore(setups[(2, 2, 2)].abstract_state, 3).state
    moved = ckpt.restore(setups[(4, 1, 2)].abstract_state, 3).state
    ckpt.close()
    assert checkpoints.tree_equal(saved, moved)
    leaf = moved.params["encoder"]["layers_1"]["mlp"]["expert"]["wi"]["kernel"]
    assert leaf.sharding.mesh.devices.shape == (4, 1, 2)

    result = _train(copy, 6, mesh=(4, 1, 2))
    assert result.start_step == 3
    ref, got = _losses(d_a), _losses(copy)
    for step in (4, 5, 6):
        np.testing.assert_allclose(got[step], ref[step], rtol=1e-5, err_msg=f"step {step}")


@pytest.mark.slow
def test_resume_in_bfloat16_with_other_runtime_settings(run_a, tmp_path):
    """Saved in float32, resumed with bfloat16 params and optimizer state and full remat: the
    state is cast on restore and training continues from step 3 (not from scratch)."""
    from switch_t5 import init_checkpoint

    d_a, _ = run_a
    d = str(tmp_path / "model")
    shutil.copytree(d_a, d)
    shutil.rmtree(os.path.join(d, "checkpoints", "6"))
    result = _train(
        d,
        6,
        config_overrides={"param_dtype": "bfloat16", "remat_policy": "full"},
        optimizer_state_dtype="bfloat16",
    )
    assert result.start_step == 3 and result.step == 6
    saved = init_checkpoint.saved_params(init_checkpoint.find_checkpoint(d, 6))
    assert {str(dtype) for _, dtype in saved.values()} == {"bfloat16"}
    ref, got = _losses(d_a), _losses(d)
    assert [got[s] for s in (1, 2, 3)] == [ref[s] for s in (1, 2, 3)]
    # Rounding the params to bfloat16 (8 significant bits: 0.4% relative at most) moves the
    # loss of this near-chance model by far less than 1%.
    for step in (4, 5, 6):
        np.testing.assert_allclose(got[step], ref[step], rtol=1e-2, err_msg=f"step {step}")
        assert got[step] != ref[step]  # the run really computed in bfloat16


@pytest.mark.slow
def test_scanned_run_decodes_and_serves_unscanned(tmp_path):
    """A scan_layers run decodes its samples through the unscanned twin; eval/infer load its
    scanned checkpoint into unscanned params (the KV cache is per layer)."""
    from switch_t5 import init_checkpoint, scan_utils

    d = str(tmp_path / "scanned")
    result = _train(
        d,
        2,
        config_overrides={"scan_layers": True, "remat_policy": "full"},
        eval_period=0,
        checkpoint_period=2,
        num_samples=2,
        make_plots=False,
    )
    assert result.step == 2 and len(result.samples) == 2
    assert all(s["prediction"] for s in result.samples)
    ref = init_checkpoint.find_checkpoint(d)
    assert any("/layers/subblock_1/" in n for n in init_checkpoint.saved_params(ref))
    _, params, cfg, _ = run_builder.load_model(ref, (2, 2, 2))
    assert not cfg.scan_layers and "layers_1" in params["encoder"]
    scanned = SwitchConfig(**{**TINY, "scan_layers": True, "remat_policy": "full"})
    setup = train_state.setup_train_state(
        lambda rng: network.init_variables(scanned, rng),
        lambda specs: optim.make_optimizer("adafactor", optim.rsqrt_schedule(), specs),
        partitioning.make_mesh(2, 2, 2, num_experts=4),
        0,
    )
    ckpt = checkpoints.Checkpointer(d)
    saved = ckpt.restore(setup.abstract_state, 2).state.params
    ckpt.close()
    assert checkpoints.tree_equal(params, scan_utils.unscan_params(saved, scanned))


def _tiny_bindings():
    out = [f"switch_t5.SwitchConfig.{k} = {v!r}" for k, v in TINY.items() if k != "num_experts"]
    return [*out, "NUM_EXPERTS = 4"]


def _cli_args(model_dir, *extra):
    bindings = [
        *_tiny_bindings(),
        f"MODEL_DIR = '{model_dir}'",
        "MIXTURE_OR_TASK_NAME = 'embedded_span_corruption'",
        "TASK_FEATURE_LENGTHS = {'inputs': 32, 'targets': 8}",
        "BATCH_SIZE = 8",
        "train.mesh_data = 2",
        "train.mesh_expert = 2",
        "train.mesh_model = 2",
        "train.eval_steps = 2",
        "train.progress = 'lines'",
        "train.make_plots = False",
        *extra,
    ]
    return [
        "--gin_file=configs/models/tiny.gin",
        "--gin_file=configs/runs/pretrain.gin",
        *[f"--gin_bindings={b}" for b in bindings],
    ]


@pytest.fixture
def clean_gin():
    gin.clear_config()
    yield
    gin.clear_config()


@pytest.mark.slow
def test_nan_loss_stops_naming_the_step_and_saves_no_nan(tmp_path, clean_gin):
    """Forced through a gin binding: a huge learning rate blows the parameters up."""
    d = str(tmp_path / "nan")
    argv = _cli_args(
        d,
        "train.base_learning_rate = 1e38",
        "TRAIN_STEPS = 6",
        "CHECKPOINT_PERIOD = 1",
        "EVAL_PERIOD = 0",
        "LOG_EVERY = 3",
    )
    with pytest.raises(loop_lib.NonFiniteLossError) as e:
        train_lib.main(argv)
    m = re.search(
        r"diverged at step (\d+): (loss is (nan|inf)|parameters are not finite)", str(e.value)
    )
    assert m, str(e.value)
    bad_step = int(m.group(1))
    ckpt = checkpoints.Checkpointer(d)
    steps = ckpt.all_steps()
    assert all(s < bad_step for s in steps), (steps, bad_step)
    cfg = SwitchConfig(**TINY)
    setup = train_state.setup_train_state(
        lambda rng: network.init_variables(cfg, rng),
        lambda specs: optim.make_optimizer("adafactor", optim.rsqrt_schedule(), specs),
        partitioning.make_mesh(2, 2, 2, num_experts=4),
        0,
    )
    for s in steps:
        assert checkpoints.all_finite(ckpt.restore(setup.abstract_state, s).state)
    ckpt.close()
    # The lock died with the failed run.
    checkpoints.ModelDirLock(d).acquire().release()


@pytest.mark.parametrize(
    "binding, message",
    [
        ("train.train_stepz = 3", "train_stepz"),  # unknown parameter (gin names near matches)
        ("TRAIN_STEPS = 'ten'", "train.train_steps='ten' is a str; expected int"),
        ("BATCH_SIZE = 7", "cannot be split over the data x expert = 2 x 2 = 4 batch shards"),
        ("switch_t5.SwitchConfig.vocab_size = 32128", "vocab_size=32128"),
        ("train.optimizer_state_dtype = 'float16'", "use 'float32' or 'bfloat16'"),
    ],
)
def test_bad_gin_fails_before_compiling(tmp_path, clean_gin, monkeypatch, binding, message):
    def never(*args, **kwargs):
        raise AssertionError("the bad setting was not caught before building the model")

    monkeypatch.setattr(train_state, "setup_train_state", never)
    d = str(tmp_path / "bad")
    with pytest.raises(Exception, match=message) as e:
        train_lib.main(_cli_args(d, "TRAIN_STEPS = 3", binding))
    assert isinstance(e.value, errors.UserError), type(e.value)
    assert not os.path.exists(os.path.join(d, "checkpoints"))


def test_unset_required_macro_is_named(clean_gin):
    with pytest.raises(gin_utils.GinConfigError, match="macro MODEL_DIR is required"):
        train_lib.main(
            ["--gin_file=configs/models/tiny.gin", "--gin_file=configs/runs/pretrain.gin"]
        )


def test_second_run_on_a_locked_model_dir_is_refused(tmp_path):
    d = str(tmp_path / "locked")
    with (
        checkpoints.ModelDirLock(d),
        pytest.raises(checkpoints.ModelDirLockedError, match="in use by another training run"),
    ):
        _train(d, 3)


def test_shipped_run_configs_parse(clean_gin):
    import switch_t5.data_gin  # noqa: F401

    gin_utils.parse_gin(
        ["configs/models/switch_base_8.gin", "configs/runs/pretrain.gin"],
        ["MODEL_DIR = '/tmp/x'", "NUM_EXPERTS = 16"],
    )
    assert gin.query_parameter("train.batch_size") is not None
    assert gin_utils.make_model_config().num_experts == 16
    gin.clear_config()
    gin_utils.parse_gin(["configs/experiments/quickstart.gin"])
    train_lib.check_required_macros()
    cfg = gin_utils.make_model_config()
    assert cfg.num_experts == 8 and cfg.vocab_size == 4096


@pytest.mark.slow
def test_sigterm_saves_and_exits_zero(tmp_path):
    d = str(tmp_path / "sigterm")
    cache = jax.config.jax_compilation_cache_dir
    argv = _cli_args(
        d,
        "TRAIN_STEPS = 100000",
        "CHECKPOINT_PERIOD = 1000",
        "EVAL_PERIOD = 0",
        "LOG_EVERY = 1",
        f"train.compilation_cache_dir = '{cache}'",
    )
    proc = subprocess.Popen(
        [sys.executable, "-m", "switch_t5.train", *argv],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": REPO},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if " step 3 train loss" in line:
            proc.send_signal(signal.SIGTERM)
            break
    out, _ = proc.communicate(timeout=300)
    lines.append(out)
    text = "".join(lines)
    assert proc.returncode == 0, text[-3000:]
    assert "SIGTERM: saved checkpoint" in text
    ckpt = checkpoints.Checkpointer(d)
    step = ckpt.latest_step()
    ckpt.close()
    assert step is not None and step >= 3
    assert max(_losses(d)) == step


def test_model_dir_that_is_a_file_is_refused(tmp_path):
    """It ended in a FileExistsError traceback from makedirs."""
    file = tmp_path / "model"
    file.write_text("notes")
    with pytest.raises(checkpoints.ModelDirIsFileError, match=f"MODEL_DIR {file} is a file"):
        _train(file, 3)
    assert file.read_text() == "notes"


def _abstract_state(seed=0):
    cfg = SwitchConfig(**TINY)
    return train_state.setup_train_state(
        lambda rng: network.init_variables(cfg, rng),
        lambda specs: optim.make_optimizer("adafactor", optim.rsqrt_schedule(), specs),
        partitioning.make_mesh(2, 2, 2, num_experts=4),
        seed,
    ).abstract_state


def test_refused_resume_keeps_config_gin_and_restart_data_stream(run_a, tmp_path, monkeypatch):
    """A refused resume (other seed, other d_model) overwrote config.gin with the settings it
    refused; the refusal suggested restarting the data stream, which no option did."""
    d_a, _ = run_a
    d = str(tmp_path / "model")
    shutil.copytree(d_a, d)
    config_gin = os.path.join(d, "config.gin")
    with open(config_gin, "rb") as f:
        before = f.read()
    quick = {"eval_period": 0, "make_plots": False}
    with pytest.raises(training.DataStreamChangedError) as e:
        _train(d, 8, random_seed=1, **quick)
    assert "seed saved 0, now 1" in str(e.value)
    assert "--gin.train.restart_data_stream=True" in str(e.value)
    with pytest.raises(checkpoints.CheckpointMismatchError, match="d_model"):
        _train(d, 8, config_overrides={"d_model": 16}, **quick)
    with open(config_gin, "rb") as f:
        assert f.read() == before

    # restart_data_stream: params, optimizer state and step of checkpoint 6, a new data order.
    starts, starting_state = [], training.starting_state

    def spy(*args, **kwargs):
        state, step, message = starting_state(*args, **kwargs)
        starts.append((jax.device_get(state), step, message))  # the train step donates state
        return state, step, message

    monkeypatch.setattr(training, "starting_state", spy)
    result = _train(d, 7, random_seed=1, restart_data_stream=True, **quick)
    assert result.start_step == 6 and result.step == 7
    state, step, message = starts[0]
    assert step == 6 and "new data stream" in message and "seed saved 0, now 1" in message
    ckpt = checkpoints.Checkpointer(d_a)
    saved = ckpt.restore(_abstract_state(), 6).state
    ckpt.close()
    assert checkpoints.tree_equal(state, saved)  # params, optimizer state, step, rng
    losses = _losses(d)
    assert sorted(losses) == [1, 2, 3, 4, 5, 6, 7]
    assert {s: losses[s] for s in range(1, 7)} == _losses(d_a)
    with open(config_gin) as f:
        assert "#   train.restart_data_stream = True" in f.read()
    # The new stream is saved with the new settings: the next resume (flag still set)
    # continues it exactly, without another restart.
    result = _train(d, 8, random_seed=1, restart_data_stream=True, **quick)
    assert result.start_step == 7 and starts[1][2] == ""


def test_first_sigint_requests_a_save_and_a_second_aborts():
    """The handler of the loop: SIGINT sets the flag SIGTERM sets and hands SIGINT back to the
    system's default action (terminate at once); leaving restores Python's handler."""
    preemption = loop_lib.Preemption()
    with preemption:
        assert not preemption.reached(1)
        os.kill(os.getpid(), signal.SIGINT)
        for _ in range(100):  # delivered between two bytecodes of the main thread
            if preemption.requested:
                break
        assert preemption.reached(1) and preemption.signal_name == "SIGINT"
        assert signal.getsignal(signal.SIGINT) == signal.SIG_DFL
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


@pytest.mark.slow
def test_sigint_saves_and_a_rerun_resumes(run_a, tmp_path):
    """Ctrl-C lost the steps since the last checkpoint (a KeyboardInterrupt traceback, no
    checkpoint); now the first one saves at the step reached and exits 130."""
    d_a, _ = run_a
    d = str(tmp_path / "sigint")
    cache = jax.config.jax_compilation_cache_dir
    argv = _cli_args(
        d,
        "TRAIN_STEPS = 6",
        "CHECKPOINT_PERIOD = 100",
        "EVAL_PERIOD = 0",
        "LOG_EVERY = 1",
        f"train.compilation_cache_dir = '{cache}'",
    )
    env = {**os.environ, "PYTHONPATH": REPO}
    cmd = [sys.executable, "-m", "switch_t5.train", *argv]
    first = subprocess.run(
        cmd,
        cwd=REPO,
        env={**env, "SWITCH_T5_FAULT": "sigint:4"},
        capture_output=True,
        text=True,
        timeout=600,
    )
    text = first.stdout + first.stderr
    assert first.returncode == 130, text[-3000:]
    assert "FAULT sigint at step 4" in text and "SIGINT: saved checkpoint 4" in text
    assert "Interrupted (Ctrl-C) at step 4" in text and "Traceback" not in text
    assert sorted(int(s) for s in os.listdir(os.path.join(d, "checkpoints"))) == [4]
    assert max(_losses(d)) == 4
    env.pop("SWITCH_T5_FAULT", None)
    second = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    text = second.stdout + second.stderr
    assert second.returncode == 0, text[-3000:]
    assert "steps 4 -> 6, resumed from checkpoint 4" in text
    # The same run as run_a (same model, data, seed and mesh): every loss equal.
    assert _losses(d) == _losses(d_a)


def test_a_rerun_of_a_finished_run_says_so_and_how_to_continue(capsys):
    result = training.TrainResult(
        step=30,
        start_step=30,
        preempted=False,
        eval_losses=[],
        model_dir="/runs/a",
        checkpoint_dir="/runs/a/checkpoints",
        tensorboard_dir="/runs/a/tensorboard",
        plots={},
        train_seconds=0.0,
        train_tokens_per_sec=None,
        samples=[],
        train_steps=30,
    )
    train_lib.print_summary(result)
    out = capsys.readouterr().out
    assert "Nothing to train: /runs/a already holds the checkpoint of step 30" in out
    assert "rerun with a larger --gin.TRAIN_STEPS" in out and "Trained steps" not in out
