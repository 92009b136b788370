"""Distillation (switch_t5.distill): the mixed loss, the frozen teacher inside the train step,
the student's initialisation from the teacher, the vocabulary check, and short runs of
`switch_t5.train` (span corruption, and a user TSV task) with a teacher."""

import dataclasses
import json
import os

import gin
import jax
import numpy as np
import pytest
from tiny import EMBEDDED_FIELDS, EMBEDDED_RUN, tiny_config

from switch_t5 import checkpoints, distill, init_checkpoint, optim, partitioning
from switch_t5 import train as train_lib

# Deterministic teacher and student (no dropout, no jitter); routing groups a batch fills.
TEACHER = tiny_config(moe_layer_interval=2, dropout_rate=0.0, router_jitter_noise=0.0, group_size=8)
STUDENT = dataclasses.replace(TEACHER, num_experts=0)
VOCAB = {"path": "/vocab/a.model", "hash": "aaaa"}


def _make_optimizer(specs):
    return optim.make_optimizer("adafactor", optim.rsqrt_schedule(), specs)


def _batch(seed=0, b=8, li=8, lt=4):
    rng = np.random.default_rng(seed)
    targets = rng.integers(1, 128, (b, lt), dtype=np.int32)
    targets[:, -1] = 0  # padding, weight 0
    inputs = rng.integers(1, 128, (b, li), dtype=np.int32)
    return {
        "encoder_input_tokens": inputs,
        "decoder_input_tokens": np.concatenate([np.zeros((b, 1), np.int32), targets[:, :-1]], 1),
        "decoder_target_tokens": targets,
    }


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory, mesh_222):
    """A saved sparse teacher (seed 1 params) with its model config and vocabulary record."""
    from switch_t5 import network, train_state

    model_dir = str(tmp_path_factory.mktemp("teacher"))
    setup = train_state.setup_train_state(
        lambda rng: network.init_variables(TEACHER, rng), _make_optimizer, mesh_222, seed=1
    )
    ckpt = checkpoints.Checkpointer(model_dir, async_save=False)
    ckpt.save(4, setup.init_fn(), {}, checkpoints.make_meta(TEACHER, VOCAB))
    ckpt.close()
    return model_dir


def _teacher(path, mesh, **settings):
    spec = distill.resolve_teacher(
        distill.DistillationConfig(teacher_checkpoint_path=path, **settings), STUDENT, VOCAB
    )
    return distill.load_teacher(spec, mesh)


def _run(mesh, teacher=None, batch=None):
    from tiny import tiny_train_step

    batch = batch or _batch()
    run, placed = tiny_train_step(STUDENT, mesh, batch, _make_optimizer)
    if teacher is not None:
        run = dataclasses.replace(run, teacher=teacher)
    return run, placed


def test_alpha_zero_is_exactly_the_plain_loss(teacher_dir, mesh_222):
    plain, batch = _run(mesh_222)
    distilled, _ = _run(mesh_222, _teacher(teacher_dir, mesh_222, distillation_alpha=0.0))
    state_a, metrics_a = plain.train_step(plain.setup.init_fn(), batch)
    state_b, metrics_b = distilled.train_step(distilled.setup.init_fn(), batch)
    assert float(metrics_a["loss"]) == float(metrics_b["loss"])
    assert checkpoints.tree_equal(jax.device_get(state_a), jax.device_get(state_b))
    # The teacher's quality and the soft-target CE are reported all the same.
    assert metrics_b[distill.TEACHER_CROSS_ENTROPY] > 0
    assert metrics_b[distill.SOFT_CROSS_ENTROPY] > 0


def test_teacher_is_frozen_and_gets_no_optimizer_state(teacher_dir, mesh_222):
    teacher = _teacher(teacher_dir, mesh_222, distillation_alpha=0.5)
    before = jax.device_get(teacher.params)
    run, batch = _run(mesh_222, teacher)
    state = run.setup.init_fn()
    plain_opt = jax.tree.structure(state.opt_state)
    for _ in range(2):
        state, metrics = run.train_step(state, batch)
    assert checkpoints.tree_equal(jax.device_get(teacher.params), before)
    assert jax.tree.structure(state.opt_state) == plain_opt
    assert (
        init_checkpoint.flatten(state.params).keys()
        == init_checkpoint.flatten(run.setup.abstract_state.params).keys()
    )
    # loss = (1 - a) CE(truth) + a CE(teacher, student) + z-loss (a dense student: no router
    # losses), each per target token.
    want = 0.5 * metrics["cross_entropy"] + 0.5 * metrics[distill.SOFT_CROSS_ENTROPY]
    np.testing.assert_allclose(
        float(metrics["loss"]), float(want + metrics["z_loss"]), rtol=1e-5, atol=1e-6
    )


def test_soft_cross_entropy_with_temperature():
    rng = np.random.default_rng(0)
    s, t = rng.normal(size=(2, 3, 7)), rng.normal(size=(2, 3, 7))
    w = np.array([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]], np.float32)
    got = distill.soft_cross_entropy_sum(s, t, w, 2.0)
    p = np.exp(t / 2) / np.exp(t / 2).sum(-1, keepdims=True)
    logq = s / 2 - np.log(np.exp(s / 2).sum(-1, keepdims=True))
    np.testing.assert_allclose(float(got), float((-(p * logq).sum(-1) * w).sum()), rtol=1e-5)


def test_one_device_step_matches_the_222_mesh(teacher_dir, mesh_222):
    one = partitioning.make_mesh(1, 1, 1, devices=jax.devices()[:1])
    losses = []
    for mesh in (mesh_222, one):
        run, batch = _run(mesh, _teacher(teacher_dir, mesh, distillation_alpha=0.25))
        _, metrics = run.train_step(run.setup.init_fn(), batch)
        losses.append(float(metrics["loss"]))
    np.testing.assert_allclose(losses[0], losses[1], rtol=1e-5)


@pytest.mark.parametrize("mode", distill.STUDENT_MLP_INITS)
def test_student_init_copies_the_teachers_non_expert_weights(teacher_dir, mesh_222, mode):
    teacher = _teacher(teacher_dir, mesh_222, student_mlp_init=mode)
    run, _ = _run(mesh_222, teacher)
    state = distill.init_student(run.setup, STUDENT, teacher)
    got = init_checkpoint.flatten(jax.device_get(state.params))
    t = init_checkpoint.flatten(jax.device_get(teacher.params))
    fresh = init_checkpoint.flatten(jax.device_get(run.setup.init_fn().params))
    sparse_mlp = {"encoder/layers_1/mlp/wi/kernel", "encoder/layers_1/mlp/wo/kernel"}
    sparse_mlp |= {n.replace("encoder", "decoder") for n in sparse_mlp}
    for name, value in got.items():
        if name not in sparse_mlp:
            np.testing.assert_array_equal(value, t[name], err_msg=name)
            continue
        experts = t[name.replace("/mlp/", "/mlp/expert/")]
        want = {"random": fresh[name], "expert_0": experts[0], "mean": experts.mean(0)}[mode]
        np.testing.assert_allclose(value, want, rtol=1e-6, atol=1e-7, err_msg=name)
        assert not np.array_equal(value, t[name.replace("/mlp/", "/mlp/expert/")][1])
    assert int(state.step) == 0
    assert checkpoints.tree_equal(jax.device_get(state.opt_state), run.setup.init_fn().opt_state)
    # The teacher's buffers are its own: the state can be donated to the step.
    run.train_step(state, _run(mesh_222)[1])
    assert checkpoints.tree_equal(
        jax.device_get(teacher.params), jax.device_get(_teacher(teacher_dir, mesh_222).params)
    )


def test_student_init_into_the_scanned_layout(teacher_dir, mesh_222):
    from switch_t5 import network, scan_utils, train_state

    student = dataclasses.replace(STUDENT, scan_layers=True)
    teacher = _teacher(teacher_dir, mesh_222, student_mlp_init="expert_0")
    setup = train_state.setup_train_state(
        lambda rng: network.init_variables(student, rng),
        _make_optimizer,
        mesh_222,
        seed=0,
    )
    state = distill.init_student(setup, student, teacher)
    got = init_checkpoint.flatten(scan_utils.unscan_params(jax.device_get(state.params), student))
    t = init_checkpoint.flatten(jax.device_get(teacher.params))
    np.testing.assert_array_equal(
        got["decoder/layers_1/mlp/wo/kernel"], t["decoder/layers_1/mlp/expert/wo/kernel"][0]
    )
    np.testing.assert_array_equal(
        got["encoder/layers_0/mlp/wi/kernel"], t["encoder/layers_0/mlp/wi/kernel"]
    )


def test_student_that_is_not_the_dense_twin_is_refused(teacher_dir):
    spec = distill.resolve_teacher(
        distill.DistillationConfig(teacher_checkpoint_path=teacher_dir), STUDENT, VOCAB
    )
    teacher = distill.abstract_teacher(
        spec, partitioning.make_mesh(1, 1, 1, devices=[jax.devices()[0]])
    )
    t = init_checkpoint.flatten(teacher.abstract_params)
    wide = {n: jax.ShapeDtypeStruct(v.shape, v.dtype) for n, v in t.items() if "expert" not in n}
    wide["encoder/layers_1/mlp/wi/kernel"] = jax.ShapeDtypeStruct((8, 32), np.float32)
    with pytest.raises(distill.DistillationError, match=r"shape \(8, 32\).*student_mlp_init"):
        distill.plan_student_init(wide, t, "mean")
    assert distill.plan_student_init(wide, t, "random")["encoder/layers_1/mlp/wi/kernel"][0] == (
        "random"
    )


def test_vocabulary_mismatch_is_one_error_naming_both(teacher_dir):
    settings = distill.DistillationConfig(teacher_checkpoint_path=teacher_dir)
    other = dataclasses.replace(STUDENT, vocab_size=256)
    with pytest.raises(distill.DistillationError, match=r"vocab_size=128.*vocab_size=256"):
        distill.resolve_teacher(settings, other, VOCAB)
    with pytest.raises(distill.DistillationError, match=r"a\.model.*aaaa.*b\.model.*bbbb"):
        distill.resolve_teacher(settings, STUDENT, {"path": "/vocab/b.model", "hash": "bbbb"})


def test_bad_settings_are_one_error():
    with pytest.raises(distill.DistillationError, match=r"alpha.*temperature.*student_mlp_init"):
        distill.DistillationConfig(
            distillation_alpha=1.5, distillation_temperature=0, student_mlp_init="best"
        )


def test_no_teacher_checkpoint_is_a_user_error(tmp_path):
    settings = distill.DistillationConfig(teacher_checkpoint_path=str(tmp_path))
    with pytest.raises(distill.DistillationError, match="TEACHER_CHECKPOINT_PATH"):
        distill.resolve_teacher(settings, STUDENT, VOCAB)


# ---------------------------------------------------------------------------------------------
# switch_t5.train with a teacher: pretraining (span corruption) and fine-tuning (a user TSV).
# ---------------------------------------------------------------------------------------------

EMBEDDED = EMBEDDED_FIELDS
RUN = {
    **EMBEDDED_RUN,
    "eval_period": 3,
    "eval_steps": 1,
    "checkpoint_period": 3,
    "make_plots": False,
    "num_samples": 0,
    "mesh_data": 4,
    "mesh_model": 2,
}


def _records(model_dir):
    with open(os.path.join(model_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def test_plan_counts_the_teacher_in_the_memory_figure(teacher_dir):
    from switch_t5 import plan

    spec = plan.StepSpec(batch=8, inputs_length=8, targets_length=4)
    mesh = {"data": 4, "expert": 1, "model": 2}
    teacher = distill.resolve_teacher(
        distill.DistillationConfig(teacher_checkpoint_path=teacher_dir), STUDENT
    )
    alone = plan.compile_train_step(STUDENT, mesh, spec)
    taught = plan.compile_train_step(STUDENT, mesh, spec, teacher)
    assert alone.teacher_param_bytes == 0 < taught.teacher_param_bytes
    assert taught.argument_bytes - alone.argument_bytes == taught.teacher_param_bytes
    assert taught.param_bytes == alone.param_bytes
    assert taught.optimizer_bytes == alone.optimizer_bytes
    lines = plan.format_step_plan(STUDENT, spec, taught, 1.0, False)
    assert any("distillation teacher" in line for line in lines)


def test_distill_quickstart_gin_binds_the_teacher():
    from switch_t5 import gin_utils

    gin.clear_config()
    try:
        gin_utils.parse_gin(
            ["configs/experiments/distill_quickstart.gin"], ["TEACHER_CHECKPOINT_PATH = '/t'"]
        )
        settings = train_lib.distillation_from_gin()
        config = gin_utils.make_model_config()
    finally:
        gin.clear_config()
    assert settings == distill.DistillationConfig(teacher_checkpoint_path="/t")
    assert config.num_experts == 0 and config.vocab_size == 4096


@pytest.fixture(scope="module")
def trained_teacher(tmp_path_factory):
    """A 3-step Switch run of switch_t5.train on the embedded corpus."""
    from switch_t5.config import SwitchConfig

    d = str(tmp_path_factory.mktemp("switch"))
    gin.clear_config()
    run = {**RUN, "mesh_expert": 2, "mesh_data": 2}
    train_lib.train(model_dir=d, train_steps=3, model_config=SwitchConfig(**EMBEDDED), **run)
    return d


@pytest.mark.slow
def test_train_distils_span_corruption(trained_teacher, tmp_path, capsys):
    from switch_t5.config import SwitchConfig

    d = str(tmp_path / "student")
    gin.clear_config()
    dense = SwitchConfig(**{**EMBEDDED, "num_experts": 0})
    result = train_lib.train(
        model_dir=d,
        train_steps=3,
        model_config=dense,
        teacher_checkpoint_path=trained_teacher,
        student_mlp_init="mean",
        **RUN,
    )
    assert result.step == 3
    train = [r for r in _records(d) if r["split"] == "train"]
    assert all(np.isfinite(r["teacher_cross_entropy"]) for r in train)
    assert {"eval"} <= {r["split"] for r in _records(d)}
    with open(os.path.join(d, "config.gin")) as f:
        assert "student_mlp_init='mean'" in f.read()
    out = capsys.readouterr()
    assert "sparse-layer MLPs mean" in out.out + out.err
    assert "distilling teacher" in out.out + out.err


@pytest.mark.slow
def test_train_distils_while_fine_tuning_on_a_user_tsv(trained_teacher, tmp_path):
    rows = [("a b c d", "yes"), ("e f g", "no")] * 16
    for split in ("train", "dev"):
        with open(tmp_path / f"{split}.tsv", "w") as f:
            f.write("sentence\tlabel\n" + "".join(f"{s}\t{y}\n" for s, y in rows))
    model_gin = tmp_path / "dense.gin"
    model_gin.write_text(
        "".join(
            f"switch_t5.SwitchConfig.{k} = {v!r}\n"
            for k, v in {**EMBEDDED, "num_experts": 0}.items()
        )
    )
    d = str(tmp_path / "ft")
    gin.clear_config()
    result = train_lib.main(
        [
            f"--gin_file={model_gin}",
            "--gin_file=configs/runs/pretrain.gin",
            f"--gin.MODEL_DIR='{d}'",
            "--gin.MIXTURE_OR_TASK_NAME='files_text_to_text'",
            f"--gin.TRAIN_FILES='{tmp_path / 'train.tsv'}'",
            f"--gin.VALIDATION_FILES='{tmp_path / 'dev.tsv'}'",
            "--gin.VOCABULARY_PATH='embedded'",
            "--gin.INPUT_TEMPLATE='{sentence}'",
            "--gin.TARGET_COLUMN='label'",
            "--gin.LABEL_NAMES=['no', 'yes']",
            "--gin.METRICS=['accuracy']",
            "--gin.TASK_FEATURE_LENGTHS={'inputs': 8, 'targets': 4}",
            "--gin.BATCH_SIZE=8",
            "--gin.TRAIN_STEPS=2",
            "--gin.EVAL_PERIOD=0",
            "--gin.CHECKPOINT_PERIOD=2",
            "--gin.LOG_EVERY=1",
            "--gin.train.progress='none'",
            "--gin.train.make_plots=False",
            "--gin.train.num_samples=0",
            "--gin.train.mesh_model=2",
            f"--gin.train.teacher_checkpoint_path='{trained_teacher}'",
            "--gin.train.distillation_alpha=0.5",
        ]
    )
    gin.clear_config()
    assert result.step == 2
    train = [r for r in _records(d) if r["split"] == "train"]
    assert len(train) == 2 and all(np.isfinite(r["distillation_cross_entropy"]) for r in train)
