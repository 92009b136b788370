"""gin_utils: unused (misspelt) macros are refused, bare string values get the quoted form, and
the entry points report setting errors as one `error:` line with exit status 2."""

import glob
import os
import subprocess
import sys

import gin
import pytest

from switch_t5 import (
    data_gin,
    errors,
    evaluation,
    gin_utils,
)

QUICKSTART = "configs/experiments/quickstart.gin"
SHIPPED = sorted(
    os.path.relpath(f, gin_utils.REPO_ROOT)
    for f in glob.glob(os.path.join(gin_utils.CONFIGS_DIR, "**", "*.gin"), recursive=True)
)


@pytest.fixture(autouse=True)
def clean_gin():
    gin.clear_config()
    yield
    gin.clear_config()


def _macro(name):
    return gin.query_parameter(f"{name}/macro.value")


def test_a_misspelt_macro_on_the_command_line_is_refused_with_the_closest_name():
    with pytest.raises(
        gin_utils.GinConfigError,
        match=r"TRAIN_STEP is set on the command line but no binding uses it; did you mean "
        r"TRAIN_STEPS\?",
    ):
        gin_utils.parse_gin([QUICKSTART], ["TRAIN_STEP = 3"])


def test_a_misspelt_macro_in_a_gin_file_is_refused(tmp_path):
    path = tmp_path / "mine.gin"
    path.write_text(f"include '{QUICKSTART}'\nBATCH_SIZ = 4\nLOG_EVRY = 5\n")
    with pytest.raises(gin_utils.GinConfigError) as e:
        gin_utils.parse_gin([str(path)])
    message = str(e.value)
    assert message.startswith("2 gin macros are set but unused")
    assert "  BATCH_SIZ is set in a gin file but no binding uses it; did you mean BATCH_SIZE?" in (
        message.splitlines()
    )
    assert "did you mean LOG_EVERY?" in message


def test_a_correct_macro_still_sets_its_binding():
    gin_utils.parse_gin([QUICKSTART], ["TRAIN_STEPS = 3"])
    assert _macro("TRAIN_STEPS") == 3


def test_references_count_nested_in_lists_and_dicts_and_through_other_macros(tmp_path):
    path = tmp_path / "nested.gin"
    path.write_text(
        f"include '{QUICKSTART}'\n"
        "INPUTS = 32\n"
        "LENGTHS = {'inputs': %INPUTS, 'targets': 8}\n"
        "TASK_FEATURE_LENGTHS = %LENGTHS\n"
        "SEEDS = [%RANDOM_SEED]\n"
        "RANDOM_SEED = 3\n"
        "train.profile_steps = %SEEDS\n"
    )
    gin_utils.parse_gin([str(path)], finalize=False)
    assert _macro("INPUTS") == 32


def test_a_macro_whose_binding_a_flag_overrides_is_not_refused(tmp_path):
    """tiny.gin's NUM_EXPERTS is used by a binding the flag replaces: not the user's mistake.
    The same holds for an override inside a gin file."""
    bind_parameter = gin.config.bind_parameter
    gin_utils.parse_gin(["configs/models/tiny.gin"], ["switch_t5.SwitchConfig.num_experts = 2"])
    assert gin_utils.make_model_config().num_experts == 2
    path = tmp_path / "dense.gin"
    path.write_text("include 'configs/models/tiny.gin'\nswitch_t5.SwitchConfig.num_experts = 0\n")
    gin_utils.parse_gin([str(path)])
    assert gin_utils.make_model_config().num_experts == 0
    assert gin.config.bind_parameter is bind_parameter  # gin's own again after parsing


def test_macros_the_data_pipeline_reads_by_name_count_as_used():
    """TEXT_FILES etc. appear in no binding: `data_gin.macro` reads them."""
    bindings = [f"{name} = 'x'" for name in data_gin.MACROS]
    gin_utils.parse_gin([QUICKSTART], bindings)
    assert _macro("TEXT_FILES") == "x"
    with pytest.raises(AssertionError, match=r"missing from data_gin\.MACROS"):
        data_gin.macro("NOT_DECLARED", None)


def test_a_macro_used_only_by_a_configurable_this_command_does_not_call_is_used():
    """eval parses a run's train.* bindings: their macros are used, not refused."""
    gin_utils.parse_gin(
        [QUICKSTART, "configs/runs/eval.gin"],
        ["MODEL_DIR = '/tmp/m'", "MIXTURE_OR_TASK_NAME = 'embedded_span_corruption'"],
    )
    assert _macro("CHECKPOINT_PERIOD") == 200  # only train.checkpoint_period uses it


def _combinations():
    models = [f for f in SHIPPED if "/models/" in f]
    runs = [f for f in SHIPPED if "/runs/" in f]
    experiments = [f for f in SHIPPED if "/experiments/" in f]
    combos = [[f] for f in SHIPPED]
    combos += [[m, r] for m in models for r in runs]
    combos += [[e, r] for e in experiments for r in runs]
    return combos


def test_no_shipped_gin_file_or_combination_has_an_unused_macro():
    assert len(SHIPPED) >= 21
    for files in _combinations():
        gin.clear_config()
        gin_utils.parse_gin(files, finalize=False)  # raises GinConfigError on a false positive


@pytest.mark.parametrize("value", ["/tmp/x", "gs://bucket/run", "tmp_x"])
def test_an_unquoted_string_value_names_the_quoted_form(value):
    with pytest.raises(gin_utils.GinConfigError) as e:
        gin_utils.parse_gin([QUICKSTART], [f"MODEL_DIR = {value}"])
    assert f"""--gin.MODEL_DIR="'{value}'\"""" in str(e.value)
    assert f"MODEL_DIR = '{value}'" in str(e.value)


def test_a_required_macro_left_unset_is_a_gin_config_error():
    with pytest.raises(gin_utils.GinConfigError, match="MODEL_DIR is required but not set"):
        gin_utils.parse_gin(["configs/models/tiny.gin", "configs/runs/pretrain.gin"])


def test_project_setting_errors_are_user_errors():
    from switch_t5 import checkpoints, init_checkpoint, loop, multihost, plan, train
    from switch_t5.data import readers, vocab
    from switch_t5.interop import hf

    for cls in (
        gin_utils.GinConfigError,
        train.TrainConfigError,
        loop.NonFiniteLossError,
        data_gin.MissingMacroError,
        vocab.VocabularyMismatchError,
        checkpoints.ModelDirLockedError,
        checkpoints.CheckpointMismatchError,
        checkpoints.CheckpointCorruptError,
        checkpoints.CheckpointSaveError,
        evaluation.EvalConfigError,
        init_checkpoint.InitialCheckpointError,
        readers.DataFileError,
        hf.UnsupportedFeatureError,
        plan.PlanError,
        multihost.MultiHostConfigError,
    ):
        assert issubclass(cls, errors.UserError), cls
    # Callers that caught the old bases keep working.
    assert issubclass(checkpoints.CheckpointSaveError, RuntimeError)
    assert issubclass(loop.NonFiniteLossError, FloatingPointError)


def _run_main(monkeypatch, argv, exc):
    def main(args):
        assert args == argv
        raise exc

    monkeypatch.setattr(sys, "argv", ["prog", *argv])
    gin_utils.run_console_main(main)


def test_run_console_main_prints_one_error_line_and_exits_2(monkeypatch, capsys):
    error = gin_utils.GinConfigError(
        "bad thing\n  In call to configurable 'train' (<function train at 0x7f>)\nsecond line"
    )
    with pytest.raises(SystemExit) as e:
        _run_main(monkeypatch, ["--gin.X=1"], error)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err == "error: bad thing\n  second line\n"


def test_run_console_main_keeps_the_traceback_with_debug(monkeypatch):
    with pytest.raises(gin_utils.GinConfigError, match="bad thing"):
        _run_main(monkeypatch, ["--debug"], gin_utils.GinConfigError("bad thing"))


def test_run_console_main_leaves_bugs_alone(monkeypatch):
    with pytest.raises(KeyError):
        _run_main(monkeypatch, [], KeyError("a bug"))


def _cli(module, *args):
    env = {
        **os.environ,
        "PYTHONPATH": gin_utils.REPO_ROOT,
        "JAX_PLATFORMS": "cpu",
        "TF_CPP_MIN_LOG_LEVEL": "3",
    }
    return subprocess.run(
        [sys.executable, "-m", module, *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=gin_utils.REPO_ROOT,
        timeout=300,
    )


def _error_lines(proc):
    return [line for line in proc.stderr.splitlines() if line.startswith("error:")]


def test_train_cli_refuses_a_misspelt_macro_before_training(tmp_path):
    model_dir = tmp_path / "run"
    argv = [f"--gin_file={QUICKSTART}", f"--gin.MODEL_DIR='{model_dir}'", "--gin.TRAIN_STEP=3"]
    proc = _cli("switch_t5.train", *argv)
    assert proc.returncode == 2, proc.stderr
    assert _error_lines(proc) == [
        "error: gin macro TRAIN_STEP is set on the command line but no binding uses it; did you "
        "mean TRAIN_STEPS? (its value would be ignored: fix the name or remove it)"
    ]
    assert "Traceback" not in proc.stderr
    assert not model_dir.exists()
    debug = _cli("switch_t5.train", *argv, "--debug")
    assert debug.returncode == 1
    assert "Traceback" in debug.stderr and "GinConfigError" in debug.stderr


@pytest.mark.parametrize(
    "module, argv, message",
    [
        ("switch_t5.train", ["--gin_file=no_such.gin"], "gin file 'no_such.gin' not found"),
        (
            "switch_t5.plan",
            ["--gin_file=configs/models/t5_base.gin", "--gin.NUM_EXPERTS=4"],
            "NUM_EXPERTS is set on the command line but no binding uses it",
        ),
        (
            "switch_t5.data.show",
            [f"--gin_file={QUICKSTART}", "--gin.MODEL_DIR=/tmp/x"],
            """--gin.MODEL_DIR="'/tmp/x'\"""",
        ),
    ],
)
def test_entry_points_print_one_error_line_with_status_2(module, argv, message):
    proc = _cli(module, *argv)
    assert proc.returncode == 2, proc.stderr
    lines = _error_lines(proc)
    assert len(lines) == 1 and message in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr


def test_eval_cli_loads_a_runs_config_gin_with_its_train_bindings(tmp_path):
    """The run's config.gin (train.* bindings included) parses in `python -m switch_t5.eval`;
    the command then stops at the unknown task, after gin."""
    from switch_t5 import config, training
    from switch_t5.training_config import TrainingConfig

    gin_utils.parse_gin([QUICKSTART], [f"MODEL_DIR = '{tmp_path}'"])
    settings = training.RunSettings(TrainingConfig(str(tmp_path), 2, "t"))
    training.write_config(gin.config_str(), settings, config.SwitchConfig())
    gin.clear_config()
    proc = _cli(
        "switch_t5.eval",
        f"--gin_file={tmp_path / 'config.gin'}",
        "--gin_file=configs/runs/eval.gin",
        f"--gin.MODEL_DIR='{tmp_path}'",
        "--gin.MIXTURE_OR_TASK_NAME='no_such_task'",
    )
    assert proc.returncode == 2, proc.stderr
    lines = _error_lines(proc)
    assert len(lines) == 1 and "'no_such_task' is not a known task" in lines[0], proc.stderr


def test_a_misspelt_parameter_names_the_closest_one():
    with pytest.raises(gin_utils.GinConfigError, match=r"Did you mean train\.batch_size\?"):
        gin_utils.parse_gin([QUICKSTART], ["train.batch_sizee = 3"])


_NOISE = ("cudart_stub", "cuInit", "I0000", "WARNING:absl", "absl::InitializeLog")
_LOG_SCRIPT = """
import logging, sys
from switch_t5 import gin_utils
gin_utils.configure_console_logging(verbose="--verbose" in sys.argv)
from switch_t5.data import hide_gpus_from_tf
hide_gpus_from_tf()  # imports TensorFlow, which logs natively at import and device setup
logging.getLogger("absl").warning("library noise")
logging.getLogger("switch_t5.infer").warning("our own warning")
logging.getLogger("absl").error("a library error")
"""


def _quiet_env():
    env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}
    return {**env, "PYTHONPATH": gin_utils.REPO_ROOT, "JAX_PLATFORMS": "cpu"}


_SHOW_ARGS = (
    "--task=embedded_span_corruption",
    "--num_examples=1",
    "--feature_lengths=inputs:64,targets:16",
)


def _run_quiet(*argv):
    """`python ARGV` from the repository root with TF_CPP_MIN_LOG_LEVEL unset."""
    return subprocess.run(
        [sys.executable, *argv],
        capture_output=True,
        text=True,
        env=_quiet_env(),
        cwd=gin_utils.REPO_ROOT,
        timeout=300,
    )


def test_commands_hide_library_log_noise_by_default():
    proc = _run_quiet("-m", "switch_t5.data.show", *_SHOW_ARGS)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip()
    assert not [line for line in proc.stderr.splitlines() if any(n in line for n in _NOISE)], (
        proc.stderr
    )


@pytest.mark.parametrize("verbose", [False, True])
def test_verbose_keeps_library_logs_and_our_warnings_and_errors_always_show(verbose):
    proc = _run_quiet("-c", _LOG_SCRIPT, *(["--verbose"] if verbose else []))
    assert proc.returncode == 0, proc.stderr
    assert "WARNING:switch_t5.infer:our own warning" in proc.stderr
    assert "ERROR:absl:a library error" in proc.stderr
    assert ("WARNING:absl:library noise" in proc.stderr) == verbose, proc.stderr
    assert ("cudart_stub" in proc.stderr) == verbose, proc.stderr
