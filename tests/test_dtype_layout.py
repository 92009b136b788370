"""Checkpoints across dtypes and layer layouts: bfloat16 <-> float32 params and optimizer state on
resume, scanned <-> unscanned params when fine-tuning (or serving) from a checkpoint."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from tiny import tiny_config

from switch_t5 import checkpoints, init_checkpoint, network, optim, scan_utils, train_state

# 4 layers per stack, sparse layers 1 and 3: two dense/sparse blocks per stack when scanned.
UNSCANNED = tiny_config(num_encoder_layers=4, num_decoder_layers=4, moe_layer_interval=2)
SCANNED = dataclasses.replace(UNSCANNED, scan_layers=True)
VOCAB = {"path": "v.model", "hash": "abc"}


def _setup(config, mesh, state_dtype="float32"):
    return train_state.setup_train_state(
        lambda rng: network.init_variables(config, rng),
        lambda specs: optim.make_optimizer(
            "adafactor", optim.rsqrt_schedule(), specs, state_dtype=state_dtype
        ),
        mesh,
        seed=5,
    )


def _save(model_dir, config, mesh, state_dtype="float32"):
    setup = _setup(config, mesh, state_dtype)
    state = setup.init_fn()
    # A non-trivial optimizer state: one update.
    grads = jax.tree.map(lambda p: jnp.cos(p * 7.0), state.params)
    state = jax.jit(lambda s, g: s.apply_gradients(g, setup.optimizer.tx))(state, grads)
    ckpt = checkpoints.Checkpointer(model_dir)
    ckpt.save(1, state, {"position": 1}, checkpoints.make_meta(config, VOCAB))
    ckpt.close()
    return jax.device_get(state)


@pytest.fixture(scope="module")
def scanned_ckpt(tmp_path_factory, mesh_222):
    d = str(tmp_path_factory.mktemp("scanned"))
    return d, _save(d, SCANNED, mesh_222)


@pytest.fixture(scope="module")
def unscanned_ckpt(tmp_path_factory, mesh_222):
    d = str(tmp_path_factory.mktemp("unscanned"))
    return d, _save(d, UNSCANNED, mesh_222)


def _exact(a, b):
    a, b = jax.device_get(a), jax.device_get(b)
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        assert x.dtype == y.dtype and x.shape == y.shape
        np.testing.assert_array_equal(x, y)


@pytest.mark.parametrize("source, target", [("scanned", UNSCANNED), ("unscanned", SCANNED)])
def test_fine_tuning_converts_the_layer_layout(
    source, target, scanned_ckpt, unscanned_ckpt, mesh_222
):
    model_dir, saved = scanned_ckpt if source == "scanned" else unscanned_ckpt
    setup = _setup(target, mesh_222)
    state, loaded = init_checkpoint.initial_train_state(setup, model_dir, seed=0, strict=True)
    assert loaded.fresh == [] and loaded.unused == []
    _exact(state.params, scan_utils.match_layout(saved.params, target))
    # On the run's shardings, with a fresh optimizer state.
    for got, want in zip(
        jax.tree.leaves(state.params), jax.tree.leaves(setup.shardings.params), strict=True
    ):
        assert got.sharding.is_equivalent_to(want, got.ndim)
    assert int(state.step) == 0


def test_layout_conversion_keeps_assignment_maps_and_partial_restores(scanned_ckpt, mesh_222):
    """Rules name the model's (unscanned) params; a layer the checkpoint lacks stays fresh."""
    model_dir, saved = scanned_ckpt
    deeper = dataclasses.replace(UNSCANNED, num_encoder_layers=6)
    setup = _setup(deeper, mesh_222)
    state, loaded = init_checkpoint.initial_train_state(
        setup,
        model_dir,
        seed=0,
        strict=False,
        assignment_map=((r"decoder/layers_0/(.*)", r"decoder/layers_2/\1"),),
    )
    assert sorted({n.split("/")[1] for n in loaded.fresh}) == ["layers_4", "layers_5"]
    want = scan_utils.unscan_params(saved.params, UNSCANNED)
    _exact(state.params["encoder"]["layers_3"], want["encoder"]["layers_3"])
    _exact(state.params["decoder"]["layers_0"], want["decoder"]["layers_2"])


def test_bfloat16_checkpoint_loads_into_float32_model(tmp_path, mesh_222):
    """The released Switch-XXL/C weights are bfloat16; a float32 model reads them cast."""
    bf16 = dataclasses.replace(SCANNED, param_dtype="bfloat16")
    saved = _save(str(tmp_path), bf16, mesh_222)
    assert {x.dtype for x in jax.tree.leaves(saved.params)} == {jnp.dtype(jnp.bfloat16)}
    state, _ = init_checkpoint.initial_train_state(
        _setup(UNSCANNED, mesh_222), str(tmp_path), seed=0
    )
    want = jax.tree.map(
        lambda x: x.astype(np.float32), scan_utils.unscan_params(saved.params, bf16)
    )
    _exact(state.params, want)


def test_resume_casts_params_and_optimizer_state(unscanned_ckpt, mesh_222):
    """float32 -> bfloat16 params and Adafactor moments on resume, and back."""
    model_dir, saved = unscanned_ckpt
    bf16 = dataclasses.replace(UNSCANNED, param_dtype="bfloat16")
    setup = _setup(bf16, mesh_222, state_dtype="bfloat16")
    ckpt = checkpoints.Checkpointer(model_dir)
    restored = ckpt.restore(setup.abstract_state, expected_meta=checkpoints.make_meta(bf16, VOCAB))
    ckpt.close()
    want = jax.tree.map(
        lambda x, a: np.asarray(x).astype(a.dtype), saved, jax.device_get(setup.abstract_state)
    )
    _exact(restored.state, want)
    assert {x.dtype for x in jax.tree.leaves(restored.state.params)} == {jnp.dtype(jnp.bfloat16)}
    # The bfloat16 state trains: one update on the restored state.
    grads = jax.tree.map(jnp.ones_like, restored.state.params)
    nxt = jax.jit(lambda s, g: s.apply_gradients(g, setup.optimizer.tx))(restored.state, grads)
    assert int(nxt.step) == int(saved.step) + 1
    assert all(bool(jnp.isfinite(x).all()) for x in jax.tree.leaves(nxt.params))


def test_resume_with_another_layout_names_the_conversion(unscanned_ckpt, mesh_222):
    model_dir, _ = unscanned_ckpt
    ckpt = checkpoints.Checkpointer(model_dir)
    with pytest.raises(checkpoints.CheckpointMismatchError) as e:
        ckpt.restore(
            _setup(SCANNED, mesh_222).abstract_state,
            expected_meta=checkpoints.make_meta(SCANNED, VOCAB),
        )
    ckpt.close()
    msg = str(e.value)
    assert "model_config.scan_layers: checkpoint False != now True" in msg
    assert "INITIAL_CHECKPOINT_PATH" in msg


def test_runtime_fields_may_change_on_resume_architecture_may_not():
    saved = checkpoints.make_meta(UNSCANNED, VOCAB)
    runtime = dataclasses.replace(
        UNSCANNED, remat_policy="full", train_capacity_factor=2.0, dispatch="einsum"
    )
    checkpoints.check_meta(saved, checkpoints.make_meta(runtime, VOCAB), "here")
    with pytest.raises(checkpoints.CheckpointMismatchError, match=r"model_config\.d_ff"):
        checkpoints.check_meta(
            saved, checkpoints.make_meta(dataclasses.replace(UNSCANNED, d_ff=32), VOCAB), "here"
        )


def test_layout_view_names_and_shapes():
    """The pure name mapping: block b of subblock j is layer b * period + j."""
    saved = {
        "encoder/layers/subblock_0/mlp/wi/kernel": ((2, 8, 16), np.float32),
        "encoder/layers/subblock_1/mlp/expert/wi/kernel": ((2, 4, 8, 16), np.float32),
        "token_embedder/embedding": ((128, 8), np.float32),
    }
    target = {
        f"encoder/layers_{i}/{rest}": None
        for i, rest in enumerate(["mlp/wi/kernel", "mlp/expert/wi/kernel"] * 2)
    }
    view, pieces = init_checkpoint.layout_view(saved, target)
    assert view["encoder/layers_2/mlp/wi/kernel"] == ((8, 16), np.float32)
    assert view["encoder/layers_3/mlp/expert/wi/kernel"] == ((4, 8, 16), np.float32)
    assert pieces["encoder/layers_3/mlp/expert/wi/kernel"].index == 1
    assert pieces["encoder/layers_1/mlp/expert/wi/kernel"].sources == (
        "encoder/layers/subblock_1/mlp/expert/wi/kernel",
    )
    assert view["token_embedder/embedding"] == ((128, 8), np.float32)
    assert len(view) == 5
