"""Fine-tuning: initial params from a checkpoint (strict, partial, assignment map, fallback),
the architecture-mismatch error, and a tiny end-to-end run (pretrain -> fine-tune -> evaluate).
"""

import dataclasses
import re

import jax
import numpy as np
import pytest

from switch_t5 import checkpoints, init_checkpoint, network, optim, train_state
from switch_t5.config import SwitchConfig

# Odd sizes so that a swapped axis fails loudly.
TINY = SwitchConfig(
    vocab_size=128,
    d_model=8,
    num_heads=2,
    head_dim=3,
    d_ff=16,
    num_encoder_layers=2,
    num_decoder_layers=2,
    num_experts=4,
    moe_layer_interval=2,
    dropout_rate=0.0,
    router_jitter_noise=0.0,
    group_size=8,
    dtype="float32",
)
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
    later = state.replace(
        step=state.step + 4, params=jax.tree.map(lambda x: x * 2.0, state.params)
    )
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
