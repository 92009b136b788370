"""Fine-tuning: initial params from a checkpoint (strict, partial, assignment map, fallback),
the architecture-mismatch error, and a tiny end-to-end run (pretrain -> fine-tune -> evaluate).
"""

import dataclasses
import json
import re

import jax
import numpy as np
import pytest
from tiny import tiny_config

from switch_t5 import (
    checkpoints,
    evaluation,
    init_checkpoint,
    network,
    optim,
    train_state,
)

TINY = tiny_config(moe_layer_interval=2, dropout_rate=0.0, router_jitter_noise=0.0, group_size=8)
VOCAB = {"path": "/vocab/a.model", "hash": "aaaa"}


def _setup(config, mesh, seed=0):
    return train_state.setup_train_state(
        lambda rng: network.init_variables(config, rng),
        lambda specs: optim.make_optimizer("adafactor", optim.rsqrt_schedule(), specs),
        mesh,
        seed=seed,
    )


def _leaves(tree):
    return init_checkpoint.flatten(tree)


@pytest.fixture(scope="module")
def saved(mesh_222, tmp_path_factory):
    """A MODEL_DIR with steps 5 and 9 of a 'pretrained' state: params from seed 1 (unlike the
    seed-0 scratch init of the runs below), a non-zero optimizer state, a non-zero step."""
    model_dir = str(tmp_path_factory.mktemp("pretrained"))
    setup = _setup(TINY, mesh_222, seed=1)
    state = setup.init_fn()
    state = state.replace(
        step=state.step + 5,
        opt_state=jax.tree.map(lambda x: x + 1 if x.dtype.kind == "f" else x, state.opt_state),
    )
    later = state.replace(step=state.step + 4, params=jax.tree.map(lambda x: x * 2.0, state.params))
    ckpt = checkpoints.Checkpointer(model_dir, async_save=False)
    meta = checkpoints.make_meta(TINY, VOCAB)
    ckpt.save(5, state, {}, meta)
    ckpt.save(9, later, {}, meta)
    ckpt.close()
    return model_dir, jax.device_get(state), jax.device_get(later)


@pytest.fixture(scope="module")
def setup0(mesh_222):
    return _setup(TINY, mesh_222, seed=0)


def test_initial_state_has_checkpoint_params_bitwise_and_a_fresh_optimizer(saved, setup0):
    model_dir, _, latest = saved
    state, loaded = init_checkpoint.initial_train_state(setup0, model_dir, seed=0)
    assert loaded.source.step == 9 and not loaded.fresh and not loaded.unused
    assert checkpoints.tree_equal(state.params, latest.params)
    scratch = setup0.init_fn()
    assert not checkpoints.tree_equal(scratch.params, latest.params)
    # Fresh optimizer state (Adafactor's zeros), step 0, the scratch run's rng.
    assert checkpoints.tree_equal(state.opt_state, scratch.opt_state)
    assert not checkpoints.tree_equal(state.opt_state, latest.opt_state)
    assert int(state.step) == 0
    assert np.array_equal(np.asarray(state.rng), np.asarray(scratch.rng))
    for got, want in zip(jax.tree.leaves(state), jax.tree.leaves(setup0.shardings)):
        assert got.sharding == want


@pytest.mark.parametrize("form", ["model_dir_step", "checkpoints_dir", "step_dir"])
def test_path_forms_and_step(saved, setup0, form):
    model_dir, first, _ = saved
    path = {
        "model_dir_step": model_dir,
        "checkpoints_dir": f"{model_dir}/checkpoints",
        "step_dir": f"{model_dir}/checkpoints/5",
    }[form]
    step = None if form == "step_dir" else 5
    loaded = init_checkpoint.load_initial_params(
        path, setup0.abstract_state.params, step=step, expected_vocabulary=VOCAB
    )
    assert loaded.source.step == 5
    assert checkpoints.tree_equal(loaded.params, first.params)


def test_missing_step_and_missing_checkpoint(saved, setup0, tmp_path):
    model_dir, _, _ = saved
    with pytest.raises(init_checkpoint.InitialCheckpointError, match=r"step 7 .*\[5, 9\]"):
        init_checkpoint.load_initial_params(model_dir, setup0.abstract_state.params, step=7)
    with pytest.raises(init_checkpoint.InitialCheckpointError, match="fallback_to_scratch"):
        init_checkpoint.load_initial_params(str(tmp_path), setup0.abstract_state.params)


def test_fallback_to_scratch(setup0, tmp_path):
    state, loaded = init_checkpoint.initial_train_state(
        setup0, str(tmp_path), seed=0, fallback_to_scratch=True
    )
    assert loaded.source is None
    assert checkpoints.tree_equal(state, setup0.init_fn())


def test_other_vocabulary_is_an_error(saved, setup0):
    model_dir, _, _ = saved
    with pytest.raises(init_checkpoint.InitialCheckpointError, match="VOCABULARY_PATH"):
        init_checkpoint.load_initial_params(
            model_dir,
            setup0.abstract_state.params,
            expected_vocabulary={"path": "/vocab/b.model", "hash": "bbbb"},
        )


def test_architecture_mismatch_names_first_param_and_both_shapes(saved, mesh_222):
    model_dir, _, latest = saved
    wider = dataclasses.replace(TINY, d_ff=20)
    setup = _setup(wider, mesh_222)
    ours = _leaves(setup.abstract_state.params)
    theirs = _leaves(latest.params)
    first = next(n for n in sorted(ours) if ours[n].shape != theirs[n].shape)
    with pytest.raises(init_checkpoint.ArchitectureMismatchError) as e:
        init_checkpoint.initial_train_state(setup, model_dir, seed=0)
    message = str(e.value)
    assert f"parameter {first!r}" in message
    assert str(tuple(ours[first].shape)) in message and str(theirs[first].shape) in message
    # Only the first mismatch is named.
    assert len(re.findall(r"parameter '", message)) == 1


@pytest.fixture(scope="module")
def deeper(mesh_222):
    """A model with a third (dense) encoder layer the checkpoint lacks."""
    return _setup(dataclasses.replace(TINY, num_encoder_layers=3), mesh_222)


def test_strict_restore_names_the_missing_param(saved, deeper):
    model_dir, _, _ = saved
    with pytest.raises(init_checkpoint.ArchitectureMismatchError, match=r"encoder/layers_2/.*not"):
        init_checkpoint.initial_train_state(deeper, model_dir, seed=0)


def test_partial_restore_keeps_fresh_init_for_missing_params(saved, deeper):
    model_dir, _, latest = saved
    state, loaded = init_checkpoint.initial_train_state(deeper, model_dir, seed=0, strict=False)
    got, want, scratch = (
        _leaves(state.params),
        _leaves(latest.params),
        _leaves(deeper.init_fn().params),
    )
    assert loaded.fresh and all(n.startswith("encoder/layers_2/") for n in loaded.fresh)
    for name, value in got.items():
        expected = scratch[name] if name.startswith("encoder/layers_2/") else want[name]
        assert np.array_equal(np.asarray(value), np.asarray(expected)), name


def test_assignment_map_copies_and_skips(saved, deeper):
    model_dir, _, latest = saved
    rules = (
        (r"encoder/layers_2/(.*)", r"encoder/layers_0/\1"),  # the new layer starts as layer 0
        (r"decoder/.*", None),  # the decoder is trained from scratch
    )
    state, loaded = init_checkpoint.initial_train_state(
        deeper, model_dir, seed=0, strict=True, assignment_map=rules
    )
    got, want = _leaves(state.params), _leaves(latest.params)
    scratch = _leaves(deeper.init_fn().params)
    assert loaded.unused and all(n.startswith("decoder/") for n in loaded.unused)
    for name, value in got.items():
        if name.startswith("encoder/layers_2/"):
            expected = want[name.replace("layers_2", "layers_0")]
        elif name.startswith("decoder/"):
            expected = scratch[name]
        else:
            expected = want[name]
        assert np.array_equal(np.asarray(value), np.asarray(expected)), name
    # The copies are separate arrays on the target's sharding.
    for got_leaf, sharding in zip(
        jax.tree.leaves(state.params), jax.tree.leaves(deeper.shardings.params)
    ):
        assert got_leaf.sharding == sharding


def test_assignment_map_to_a_wrong_shape_names_the_source(saved, deeper):
    model_dir, _, _ = saved
    rules = ((r"encoder/layers_2/mlp/wi/kernel", "encoder/layers_0/attention/query/kernel"),)
    with pytest.raises(init_checkpoint.ArchitectureMismatchError, match="read from"):
        init_checkpoint.initial_train_state(
            deeper, model_dir, seed=0, strict=False, assignment_map=rules
        )


# ---------------------------------------------------------------------------------------------
# End to end: pretrain a few steps -> fine-tune on a generated file -> evaluate -> infer.
# ---------------------------------------------------------------------------------------------

_WORDS = [
    "apple",
    "river",
    "stone",
    "cloud",
    "green",
    "music",
    "table",
    "window",
    "silver",
    "garden",
    "paper",
    "light",
]
_KEYWORD = "apple"
# A 16-wide model with odd sizes; float32 so that decoding is exact.
_MODEL_GIN = """
switch_t5.SwitchConfig.d_model = 16
switch_t5.SwitchConfig.num_heads = 2
switch_t5.SwitchConfig.head_dim = 5
switch_t5.SwitchConfig.d_ff = 24
switch_t5.SwitchConfig.num_encoder_layers = 2
switch_t5.SwitchConfig.num_decoder_layers = 2
switch_t5.SwitchConfig.num_experts = 4
switch_t5.SwitchConfig.moe_layer_interval = 2
switch_t5.SwitchConfig.group_size = 16
switch_t5.SwitchConfig.dtype = "float32"
"""
_FT_STEPS = 400


def _sentences(rng, n):
    """(sentence, label): the label says whether the keyword occurs (fully determined)."""
    out = []
    for _ in range(n):
        words = list(rng.choice(_WORDS, size=6))
        out.append((" ".join(words), "yes" if _KEYWORD in words else "no"))
    return out


def _write_tsv(path, rows):
    with open(path, "w") as f:
        f.write("sentence\tlabel\n")
        for sentence, label in rows:
            f.write(f"{sentence}\t{label}\n")


@pytest.fixture(scope="module")
def e2e(tmp_path_factory):
    import gin

    from switch_t5 import train
    from switch_t5.data import vocab

    root = tmp_path_factory.mktemp("e2e")
    rng = np.random.default_rng(0)
    train_rows, val_rows = _sentences(rng, 512), _sentences(rng, 96)
    _write_tsv(root / "train.tsv", train_rows)
    _write_tsv(root / "dev.tsv", val_rows)
    text = root / "pretrain.txt"
    text.write_text("".join(s + "\n" for s, _ in _sentences(rng, 300)))
    spm = vocab.train_sentencepiece(
        [s for s, _ in train_rows] + ["yes no contains"] * 20, str(root / "spm.model"), 100 + 36
    )
    model_gin = root / "model.gin"
    model_gin.write_text(_MODEL_GIN)
    data_flags = [
        f"--gin_file={model_gin}",
        f"--gin.VOCABULARY_PATH='{spm}'",
        f"--gin.switch_t5.data_gin.register_tasks.cache_dir='{root / 'cache'}'",
        "--gin.switch_t5.data_gin.register_tasks.shuffle_buffer_size=64",
    ]
    common = [*data_flags, "--gin.train.progress='none'", "--gin.train.make_plots=False"]
    pre_dir, ft_dir = str(root / "pretrain"), str(root / "finetune")
    gin.clear_config()
    train.main(
        [
            *common,
            "--gin_file=configs/runs/pretrain.gin",
            f"--gin.MODEL_DIR='{pre_dir}'",
            "--gin.MIXTURE_OR_TASK_NAME='text_files_span_corruption'",
            f"--gin.TEXT_FILES='{text}'",
            "--gin.TASK_FEATURE_LENGTHS={'inputs': 16, 'targets': 16}",
            "--gin.BATCH_SIZE=8",
            "--gin.TRAIN_STEPS=3",
            "--gin.EVAL_PERIOD=0",
            "--gin.CHECKPOINT_PERIOD=3",
            "--gin.LOG_EVERY=3",
        ]
    )
    # The fine-tuning run's initial state, copied to the host before training donates it.
    captured = {}
    original = init_checkpoint.initial_train_state

    def capture(*args, **kwargs):
        state, loaded = original(*args, **kwargs)
        captured["state"] = jax.device_get(state)
        return state, loaded

    data = [
        "--gin.MIXTURE_OR_TASK_NAME='files_text_to_text'",
        f"--gin.TRAIN_FILES='{root / 'train.tsv'}'",
        f"--gin.VALIDATION_FILES='{root / 'dev.tsv'}'",
        "--gin.INPUT_TEMPLATE='{sentence}'",  # 6 words: 7 tokens with EOS
        "--gin.TARGET_COLUMN='label'",
        "--gin.LABEL_NAMES=['no', 'yes']",
        "--gin.METRICS=['accuracy']",
        "--gin.TASK_FEATURE_LENGTHS={'inputs': 16, 'targets': 8}",
    ]
    gin.clear_config()
    init_checkpoint.initial_train_state = capture
    try:
        result = train.main(
            [
                *common,
                *data,
                "--gin_file=configs/runs/finetune.gin",
                f"--gin.MODEL_DIR='{ft_dir}'",
                f"--gin.INITIAL_CHECKPOINT_PATH='{pre_dir}'",
                f"--gin.TRAIN_STEPS={_FT_STEPS}",
                "--gin.BATCH_SIZE=16",
                f"--gin.CHECKPOINT_PERIOD={_FT_STEPS}",
                f"--gin.EVAL_PERIOD={_FT_STEPS}",
                f"--gin.INFER_EVAL_PERIOD={_FT_STEPS // 2}",
                f"--gin.LOG_EVERY={_FT_STEPS // 4}",
                "--gin.train.eval_steps=2",
                # A 3-step "pretrained" model is still nearly random: it needs a pretraining-sized
                # learning rate to learn the task in 400 steps, not the recipe's 1e-3.
                "--gin.train.base_learning_rate=0.05",
            ]
        )
    finally:
        init_checkpoint.initial_train_state = original
    gin.clear_config()
    return {
        "root": root,
        "pre_dir": pre_dir,
        "ft_dir": ft_dir,
        "val_rows": val_rows,
        "initial": captured["state"],
        "result": result,
        "data": [*data_flags, *data],
        "spm": spm,
    }


@pytest.mark.slow
def test_finetune_starts_from_the_pretrained_params_with_a_fresh_optimizer(e2e):
    from switch_t5.interop import checkpoint_io

    _, pretrained = checkpoint_io.load_params(e2e["pre_dir"])
    initial = e2e["initial"]
    assert checkpoints.tree_equal(initial.params, pretrained)
    assert int(initial.step) == 0
    assert all(not np.any(np.asarray(x)) for x in jax.tree.leaves(initial.opt_state))
    assert e2e["result"].start_step == 0 and e2e["result"].step == _FT_STEPS


@pytest.mark.slow
def test_eval_entry_point_scores_the_best_checkpoint(e2e):
    import gin

    from switch_t5 import eval as eval_lib

    gin.clear_config()
    result = eval_lib.main(
        [
            *e2e["data"],
            "--gin_file=configs/runs/eval.gin",
            f"--gin.MODEL_DIR='{e2e['ft_dir']}'",
            "--gin.CHECKPOINT_STEP='best'",
            "--gin.TASK_FEATURE_LENGTHS={'inputs': 16, 'targets': 8}",
            "--gin.BATCH_SIZE=16",
        ]
    )
    gin.clear_config()
    accuracy = result.metrics["files_text_to_text/accuracy"]
    print(f"tiny end-to-end fine-tuning: validation accuracy {accuracy:.2f}%")
    assert accuracy >= 95.0
    out = e2e["ft_dir"] + "/eval"
    with open(f"{out}/{evaluation.PREDICTIONS_FILE}") as f:
        predictions = [json.loads(line) for line in f]
    # Every validation example exactly once, in file order.
    assert [p["input"] for p in predictions] == [s for s, _ in e2e["val_rows"]]
    assert [p["target"] for p in predictions] == [label for _, label in e2e["val_rows"]]
    with open(f"{out}/{evaluation.METRICS_FILE}") as f:
        assert json.load(f)["metrics"] == result.metrics
    with open(f"{out}/config.gin") as f:
        assert "CHECKPOINT_STEP = 'best'" in f.read()
    # The kept best checkpoint is the one the run scored best, with the same accuracy.
    with open(e2e["ft_dir"] + "/best/best.json") as f:
        best = json.load(f)
    assert result.step == best["step"] and best["value"] == pytest.approx(accuracy, abs=1e-9)


@pytest.mark.slow
def test_infer_cli_on_the_finetuned_checkpoint(e2e, capsys):
    import gin

    from switch_t5 import infer

    rows = e2e["val_rows"][:8]
    gin.clear_config()
    predictions = infer.main(
        [
            f"--checkpoint_dir={e2e['ft_dir']}/best",
            *(f"--input={s}" for s, _ in rows),
            # 8 rows x 16 tokens: routing groups fit the 8 batch shards (see test_infer.py).
            "--inputs_length=16",
            "--max_decode_length=16",
        ]
    )
    gin.clear_config()
    with open(e2e["ft_dir"] + "/eval/predictions.jsonl") as f:
        evaluated = [json.loads(line)["prediction"] for line in f][:8]
    assert [p.prediction for p in predictions] == evaluated
    assert capsys.readouterr().out.splitlines()[-8:] == evaluated


@pytest.mark.parametrize("experiment", ["finetune_glue", "finetune_superglue", "finetune_user_tsv"])
def test_finetune_experiments_parse_with_the_recipe(experiment):
    import gin

    import switch_t5.data_gin  # noqa: F401  (registers its configurables)
    from switch_t5 import gin_utils, train  # noqa: F401  (train registers `train`)

    gin.clear_config()
    try:
        gin_utils.parse_gin(
            [f"configs/experiments/{experiment}.gin"],
            [
                "MODEL_DIR = '/tmp/ft'",
                "INITIAL_CHECKPOINT_PATH = '/tmp/pretrained'",
                "TRAIN_FILES = 'train.tsv'",
                "VALIDATION_FILES = 'dev.tsv'",
            ],
        )
        config = gin_utils.make_model_config()
        # No model gin: the architecture comes from the initial checkpoint's record.
        assert set(gin.get_bindings("switch_t5.SwitchConfig")) == {
            "dropout_rate",
            "expert_dropout_rate",
        }
        assert config.dropout_rate == 0.1 and config.expert_dropout == 0.4
        assert gin.query_parameter("train.lr_schedule") == "constant"
        assert gin.query_parameter("train.base_learning_rate") == 1e-3
        # Adafactor is the default (OptimizerConfig.name), so the recipe does not restate it.
        assert "optimizer" not in gin.get_bindings("train")
        assert optim.OptimizerConfig().name == "adafactor"
        initial = gin.get_configurable("switch_t5.InitialCheckpoint")()
        assert initial == init_checkpoint.InitialCheckpoint("/tmp/pretrained")
    finally:
        gin.clear_config()


def test_eval_and_infer_run_gins_parse():
    import gin

    import switch_t5.data_gin  # noqa: F401
    from switch_t5 import eval as eval_lib  # noqa: F401
    from switch_t5 import gin_utils, infer  # noqa: F401

    gin.clear_config()
    try:
        gin_utils.parse_gin(
            ["configs/runs/eval.gin", "configs/runs/infer.gin"],
            ["MODEL_DIR = '/tmp/ft'", "MIXTURE_OR_TASK_NAME = 'glue_rte_v002'"],
        )
        assert gin.query_parameter("CHECKPOINT_STEP/macro.value") is None
        assert gin.query_parameter("EVAL_OUTPUT_DIR/macro.value") is None
        assert gin.query_parameter("switch_t5.infer.method") == "beam"
    finally:
        gin.clear_config()


# ---------------------------------------------------------------------------------------------
# finetune_user_tsv.gin from any checkpoint: architecture and vocabulary from its record.
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_pretrained(tmp_path_factory):
    """A 2-step pretraining run with a generated vocabulary, and an RTE-like TSV pair."""
    import gin

    from switch_t5 import train
    from switch_t5.data import vocab

    root = tmp_path_factory.mktemp("any_ckpt")
    rng = np.random.default_rng(1)
    sentences = [" ".join(rng.choice(_WORDS, size=6)) for _ in range(40)]
    for name, rows in (("train", sentences[:32]), ("dev", sentences[32:])):
        with open(root / f"{name}.tsv", "w") as f:
            f.write("index\tsentence1\tsentence2\tlabel\n")
            for i, s in enumerate(rows):
                label = ("entailment", "not_entailment")[i % 2]
                f.write(f"{i}\t{s}\t{s[:20]}\t{label}\n")
    text = root / "pretrain.txt"
    text.write_text("".join(s + "\n" for s in sentences))
    spm = vocab.train_sentencepiece(
        sentences + ["rte sentence1: sentence2: entailment not_entailment"] * 20,
        str(root / "spm.model"),
        100 + 40,
    )
    model_gin = root / "model.gin"
    model_gin.write_text(_MODEL_GIN)
    pre_dir = str(root / "pretrain")
    gin.clear_config()
    try:
        train.main(
            [
                f"--gin_file={model_gin}",
                "--gin_file=configs/runs/pretrain.gin",
                f"--gin.VOCABULARY_PATH='{spm}'",
                f"--gin.switch_t5.data_gin.register_tasks.cache_dir='{root / 'cache'}'",
                "--gin.train.progress='none'",
                "--gin.train.make_plots=False",
                f"--gin.MODEL_DIR='{pre_dir}'",
                "--gin.MIXTURE_OR_TASK_NAME='text_files_span_corruption'",
                f"--gin.TEXT_FILES='{text}'",
                "--gin.TASK_FEATURE_LENGTHS={'inputs': 16, 'targets': 16}",
                "--gin.BATCH_SIZE=8",
                "--gin.TRAIN_STEPS=2",
                "--gin.EVAL_PERIOD=0",
                "--gin.CHECKPOINT_PERIOD=2",
            ]
        )
    finally:
        gin.clear_config()
    return {"root": root, "pre_dir": pre_dir, "spm": spm}


def _finetune_user_tsv(tiny_pretrained, model_dir, *extra, initial=None):
    import gin

    from switch_t5 import train

    root = tiny_pretrained["root"]
    gin.clear_config()
    try:
        return train.main(
            [
                "--gin_file=configs/experiments/finetune_user_tsv.gin",
                f"--gin.MODEL_DIR='{model_dir}'",
                f"--gin.INITIAL_CHECKPOINT_PATH='{initial or tiny_pretrained['pre_dir']}'",
                f"--gin.TRAIN_FILES='{root / 'train.tsv'}'",
                f"--gin.VALIDATION_FILES='{root / 'dev.tsv'}'",
                "--gin.TRAIN_STEPS=2",
                # Only to keep the test fast on a CPU: the rest is the experiment's own recipe.
                "--gin.BATCH_SIZE=16",
                "--gin.TASK_FEATURE_LENGTHS={'inputs': 32, 'targets': 8}",
                "--gin.train.progress='none'",
                "--gin.train.make_plots=False",
                "--gin.EVAL_PERIOD=0",
                "--gin.INFER_EVAL_PERIOD=0",
                *extra,
            ]
        )
    finally:
        gin.clear_config()


def test_finetune_user_tsv_takes_model_and_vocabulary_from_the_checkpoint(tiny_pretrained):
    ft_dir = tiny_pretrained["root"] / "ft"
    result = _finetune_user_tsv(tiny_pretrained, ft_dir)
    assert (result.start_step, result.step) == (0, 2)
    written = (ft_dir / "config.gin").read_text()
    # The checkpoint's architecture and vocabulary; the recipe's runtime dropout.
    assert "#   SwitchConfig.d_model = 16" in written
    assert "#   SwitchConfig.expert_dropout_rate = 0.4" in written
    assert repr(tiny_pretrained["spm"]) in written
    meta = json.loads(next((ft_dir / "checkpoints").glob("*/meta/metadata")).read_text())
    assert meta["vocabulary"]["path"] == tiny_pretrained["spm"]


def test_finetune_user_tsv_refuses_another_architecture_naming_both_values(tiny_pretrained):
    with pytest.raises(init_checkpoint.ArchitectureMismatchError) as e:
        _finetune_user_tsv(
            tiny_pretrained,
            tiny_pretrained["root"] / "ft_mismatch",
            "--gin.switch_t5.SwitchConfig.d_model=32",
        )
    from switch_t5 import gin_utils

    line = gin_utils.format_error(e.value)
    assert "d_model=32" in line and "d_model=16" in line and "\n" not in line


def test_finetune_user_tsv_names_an_unreadable_recorded_vocabulary(tiny_pretrained):
    import shutil

    copy = tiny_pretrained["root"] / "moved"
    shutil.copytree(tiny_pretrained["pre_dir"], copy)
    meta_file = next((copy / "checkpoints").glob("*/meta/metadata"))
    meta = json.loads(meta_file.read_text())
    meta["vocabulary"]["path"] = "/nonexistent/spm.model"
    meta_file.write_text(json.dumps(meta))
    with pytest.raises(init_checkpoint.InitialCheckpointError) as e:
        _finetune_user_tsv(tiny_pretrained, tiny_pretrained["root"] / "ft_novocab", initial=copy)
    from switch_t5 import gin_utils

    line = gin_utils.format_error(e.value)
    assert "/nonexistent/spm.model" in line and "VOCABULARY_PATH" in line and "\n" not in line


def test_model_config_from_checkpoint_overrides_runtime_fields_only():
    from etils import epath

    saved = tiny_config(scan_layers=False)
    ref = init_checkpoint.CheckpointRef(
        epath.Path("/ckpt/checkpoints/7"), 7, checkpoints.make_meta(saved)
    )
    config = init_checkpoint.model_config_from_checkpoint(
        ref,
        {"dropout_rate": 0.3, "scan_layers": True, "d_model": saved.d_model, "dtype": "float32"},
    )
    assert config == dataclasses.replace(saved, dropout_rate=0.3, scan_layers=True, dtype="float32")
    bindings = {"d_model": saved.d_model * 2, "num_experts": saved.num_experts + 1}
    with pytest.raises(init_checkpoint.ArchitectureMismatchError) as e:
        init_checkpoint.model_config_from_checkpoint(ref, bindings)
    msg = str(e.value)
    assert f"d_model={saved.d_model * 2} but the checkpoint has d_model={saved.d_model}" in msg
    assert f"num_experts={saved.num_experts + 1}" in msg and "/ckpt/checkpoints/7" in msg
    # A non-strict restore or an assignment map: the model is meant to differ.
    wider = init_checkpoint.model_config_from_checkpoint(ref, bindings, reshape=True)
    assert (wider.d_model, wider.num_experts) == (saved.d_model * 2, saved.num_experts + 1)


@pytest.mark.parametrize(
    "field,default,other",
    [("router_score", "softmax", "sigmoid"), ("num_shared_experts", 0, 1)],
)
def test_field_missing_from_an_old_meta_takes_its_default(field, default, other):
    """A checkpoint whose meta predates `field`: binding it to its default is no clash."""
    from etils import epath

    saved = tiny_config()
    meta = checkpoints.make_meta(saved)
    del meta["model_config"][field]
    ref = init_checkpoint.CheckpointRef(epath.Path("/ckpt/checkpoints/7"), 7, meta)
    config = init_checkpoint.model_config_from_checkpoint(ref, {field: default})
    assert config == saved
    with pytest.raises(init_checkpoint.ArchitectureMismatchError) as e:
        init_checkpoint.model_config_from_checkpoint(ref, {field: other})
    assert f"{field}={other!r} but the checkpoint has {field}={default!r}" in str(e.value)
