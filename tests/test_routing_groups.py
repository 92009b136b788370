"""Routing group sizes: chosen once from the batch and lengths when unset, recorded with the run
and reused; every shipped experiment fits 1, 2, 4 and 8 devices; the quickstart trains on each."""

import dataclasses
import glob
import json
import os

import gin
import jax
import numpy as np
import pytest
from test_configs import REQUIRED_BINDINGS
from tiny import tiny_config, tiny_train_step

from switch_t5 import gin_utils, init_checkpoint, moe, partitioning, plan, training
from switch_t5.config import SwitchConfig


def test_auto_group_size_makes_group_counts_that_split_over_16_shards():
    # The quickstart: 16 x 64 encoder and 16 x 16 decoder tokens -> 16 groups each.
    assert moe.auto_group_size(16, 64, 8192) == 64
    assert moe.auto_group_size(16, 16, 8192) == 16
    # T5 pretraining (256 x (512 + 114)): the largest group that makes a multiple of 16.
    assert moe.auto_group_size(256, 512, 8192) == 8192
    assert moe.auto_group_size(256, 114, 8192) == 1824
    assert moe.auto_group_size(256, 512, 2048) == 2048  # a smaller cap
    # More batch shards than 16: the count is a multiple of both.
    assert moe.auto_group_size(2048, 512, 2048, shards=2048) == 512
    assert moe.auto_group_size(2048, 114, 2048, shards=2048) == 114
    # No multiple of 16 groups (3 x 10 tokens): one group per sequence.
    assert moe.auto_group_size(3, 10, 8192) == 10


def test_resolution_fills_only_unset_sizes():
    config = tiny_config()
    assert config.group_size is None and config.stack_group_size("decoder") == 8192
    lengths = {"inputs": 64, "targets": 16}
    resolved = moe.resolve_group_sizes(config, 16, lengths)
    assert (resolved.group_size, resolved.decoder_group_size) == (64, 16)
    assert moe.call_groups(resolved, 16, 64, "encoder") == (16, 64)
    assert moe.call_groups(resolved, 16, 16, "decoder") == (16, 16)
    # An explicit group_size is kept, for both stacks, exactly as before.
    explicit = tiny_config(group_size=512)
    assert moe.resolve_group_sizes(explicit, 16, lengths) is explicit
    assert moe.call_groups(explicit, 16, 64, "encoder") == (2, 512)
    assert moe.call_groups(explicit, 16, 16, "decoder") == (1, 256)
    # An explicit decoder size is kept; a dense model has nothing to resolve.
    decoder = moe.resolve_group_sizes(tiny_config(decoder_group_size=32), 16, lengths)
    assert (decoder.group_size, decoder.decoder_group_size) == (64, 32)
    dense = tiny_config(num_experts=0)
    assert moe.resolve_group_sizes(dense, 16, lengths) is dense
    with pytest.raises(ValueError, match="decoder_group_size=0 must be a positive integer"):
        tiny_config(decoder_group_size=0)


def test_recorded_sizes_are_reused_and_old_checkpoints_route_as_before():
    new = {"group_size": 64, "decoder_group_size": 16}
    reused = tiny_config().with_recorded_groups(new)
    assert (reused.group_size, reused.decoder_group_size) == (64, 16)
    # A checkpoint from before per-stack sizes records one int: both stacks use it.
    old = tiny_config().with_recorded_groups({"group_size": 512})
    assert (old.stack_group_size("encoder"), old.stack_group_size("decoder")) == (512, 512)
    # An explicit group_size wins over the record, for both stacks.
    mine = tiny_config(group_size=128).with_recorded_groups(new)
    assert (mine.stack_group_size("encoder"), mine.stack_group_size("decoder")) == (128, 128)
    assert reused.with_fields(group_size=128).stack_group_size("decoder") == 128


def _checkpoint_dir(root, model_config: dict) -> str:
    """A MODEL_DIR whose step 10 records `model_config` (the meta only: nothing is restored)."""
    step = root / "checkpoints" / "10"
    (step / "state").mkdir(parents=True)
    (step / "meta").mkdir()
    (step / "meta" / "metadata").write_text(json.dumps({"model_config": model_config}))
    return str(root)


def test_a_run_records_its_sizes_and_a_resume_reuses_them(tmp_path):
    config = tiny_config()
    lengths = {"inputs": 64, "targets": 16}
    t = dataclasses.replace(_training(tmp_path / "run"), batch_size=16)
    prepared = training.Prepared(config, lengths, {}, {"model_config": {}})
    mesh = {"data": 2, "expert": 2, "model": 2}
    fresh = training.resolve_groups(prepared, t, mesh)
    assert (fresh.config.group_size, fresh.config.decoder_group_size) == (64, 16)
    assert fresh.meta["model_config"]["group_size"] == 64
    assert fresh.meta["model_config"]["decoder_group_size"] == 16
    # Resumed with another batch size: the recorded sizes, not new ones.
    model_dir = _checkpoint_dir(tmp_path / "resumed", fresh.meta["model_config"])
    t2 = dataclasses.replace(t, model_dir=model_dir, batch_size=64)
    resumed = training.resolve_groups(prepared, t2, mesh)
    assert (resumed.config.group_size, resumed.config.decoder_group_size) == (64, 16)
    # Fine-tuning from it keeps them too, unless group_size is bound (then for both stacks).
    ref = init_checkpoint.find_checkpoint(model_dir)
    tuned = init_checkpoint.model_config_from_checkpoint(ref, {})
    assert (tuned.group_size, tuned.decoder_group_size) == (64, 16)
    bound = init_checkpoint.model_config_from_checkpoint(ref, {"group_size": 256})
    assert (bound.stack_group_size("encoder"), bound.stack_group_size("decoder")) == (256, 256)


def _training(model_dir):
    from switch_t5.training_config import TrainingConfig

    return TrainingConfig(
        model_dir=str(model_dir),
        mixture_or_task_name="t",
        task_feature_lengths={"inputs": 64, "targets": 16},
        train_steps=1,
    )


# ---------------------------------------------------------------------------------------------
# Every shipped experiment fits 1, 2, 4 and 8 devices (the planner's checks, nothing compiled).
# ---------------------------------------------------------------------------------------------

EXPERIMENTS = sorted(glob.glob(os.path.join(gin_utils.CONFIGS_DIR, "experiments", "*.gin")))


def _experiment(path):
    """(model config, StepSpec) of an experiment gin as the planner sees it."""
    gin.clear_config()
    try:
        # The macros each experiment leaves required: test_configs' table, their one home.
        gin_utils.parse_gin([path], REQUIRED_BINDINGS[f"experiments/{os.path.basename(path)}"])
        config = gin_utils.make_model_config()
        lengths = gin.query_parameter("TASK_FEATURE_LENGTHS/macro.value")
        batch = gin.query_parameter("BATCH_SIZE/macro.value")
    finally:
        gin.clear_config()
    return config, plan.StepSpec(batch, lengths["inputs"], lengths["targets"])


def _meshes(devices: int, num_experts: int):
    # A dense model (the distillation student) keeps the expert axis at 1.
    for expert in (1, 2, 4, 8) if num_experts else (1,):
        if devices % expert == 0 and num_experts % expert == 0:
            yield {"data": devices // expert, "expert": expert, "model": 1}


@pytest.mark.parametrize("path", EXPERIMENTS, ids=os.path.basename)
def test_every_shipped_experiment_fits_1_2_4_and_8_devices(path):
    config, spec = _experiment(path)
    variants = {"gin": config}
    if os.path.basename(path).startswith("finetune"):
        # Fine-tuning takes the sizes the initial checkpoint recorded: the quickstart's, or a
        # fixed 8192 of a checkpoint written before sizes were chosen per run.
        variants["from the quickstart"] = dataclasses.replace(
            config, group_size=64, decoder_group_size=16
        )
        variants["from group_size=8192"] = dataclasses.replace(config, group_size=8192)
    for name, variant in variants.items():
        chosen = set()
        for devices in (1, 2, 4, 8):
            for mesh in _meshes(devices, variant.num_experts):
                assert plan._fit_problems(variant, mesh, spec) == [], (name, mesh)
                grouped = plan.resolve_groups(variant, mesh, spec)
                chosen.add((grouped.group_size, grouped.decoder_group_size))
        assert len(chosen) == 1, f"{name}: the group sizes depend on the mesh: {chosen}"


def test_plan_picks_group_sizes_for_switch_c_on_2048_devices():
    gin.clear_config()
    try:
        gin_utils.parse_gin(["configs/models/switch_c_2048.gin"], [])
        config = gin_utils.make_model_config()
    finally:
        gin.clear_config()
    spec = plan.StepSpec()  # the paper's 2048 x (512 + 114)
    mesh = {"data": 1, "expert": 2048, "model": 1}
    assert plan._fit_problems(config, mesh, spec) == []
    line = plan.group_size_line(config, plan.resolve_groups(config, mesh, spec))
    assert line == (
        "routing_group_size: encoder 512, decoder 114 tokens (chosen for this batch and mesh, as "
        "training chooses them; to use exactly these: --gin.switch_t5.SwitchConfig.group_size=512 "
        "--gin.switch_t5.SwitchConfig.decoder_group_size=114)"
    )
    # An explicit size is checked as before, and the error names one that fits.
    problems = plan._fit_problems(dataclasses.replace(config, group_size=2048), mesh, spec)
    assert "set --gin.switch_t5.SwitchConfig.group_size so that" in problems[0]
    assert "(e.g. group_size=512)" in problems[0]


# ---------------------------------------------------------------------------------------------
# The quickstart trains on 1, 2, 4 and 8 devices, routing identically.
# ---------------------------------------------------------------------------------------------


def _batch(rows, inputs, targets, vocab):
    rng = np.random.default_rng(0)
    enc = rng.integers(2, vocab, (rows, inputs)).astype(np.int32)
    tgt = rng.integers(2, vocab, (rows, targets)).astype(np.int32)
    dec_in = np.concatenate([np.zeros((rows, 1), np.int32), tgt[:, :-1]], axis=1)
    return {
        "encoder_input_tokens": enc,
        "decoder_input_tokens": dec_in,
        "decoder_target_tokens": tgt,
        "decoder_loss_weights": np.ones_like(tgt, np.float32),
    }


def test_quickstart_trains_5_steps_on_1_2_4_and_8_devices(tmp_path):
    config, spec = _experiment("configs/experiments/quickstart.gin")
    # The quickstart's batch, lengths, experts and grouping; a smaller network in float32, one
    # sparse layer per stack (the grouping, hence the routing, depends on none of these).
    small = dict(d_model=16, num_heads=2, head_dim=8, d_ff=32, vocab_size=256, dtype="float32")
    config = dataclasses.replace(
        config, **small, num_encoder_layers=1, num_decoder_layers=1, moe_layer_interval=1
    )
    lengths = {"inputs": spec.inputs_length, "targets": spec.targets_length}
    batch = _batch(spec.batch, spec.inputs_length, spec.targets_length, 256)
    t = dataclasses.replace(_training(tmp_path), batch_size=spec.batch)
    losses, start = {}, None
    for devices in (1, 2, 4, 8):
        mesh = partitioning.make_mesh(
            -1, None, 1, num_experts=config.num_experts, devices=jax.devices()[:devices]
        )
        prepared = training.Prepared(config, lengths, {}, {"model_config": {}})
        prepared = training.resolve_groups(prepared, t, dict(mesh.shape))
        assert (prepared.config.group_size, prepared.config.decoder_group_size) == (64, 16)
        run, placed = tiny_train_step(prepared.config, mesh, batch)
        if start is None:  # one initial state, laid out on each mesh
            start = jax.device_get(run.setup.init_fn())
        state, out = jax.device_put(start, run.setup.shardings), []
        for _ in range(5):
            state, metrics = run.train_step(state, placed)
            out.append(float(metrics["loss"]))
        losses[devices] = out
    assert all(np.isfinite(v).all() for v in losses.values())
    # Same groups on every mesh: the same losses up to float32 reduction order.
    for devices in (2, 4, 8):
        np.testing.assert_allclose(losses[devices], losses[1], rtol=1e-5)


def test_switch_config_default_leaves_group_size_unset():
    assert SwitchConfig().group_size is None
    assert SwitchConfig().max_group_size == 8192
