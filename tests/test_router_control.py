"""Router control for fine-tuning: `freeze_router`, `router_learning_rate_multiplier` and
`trainable_params` (optim.OptimizerConfig, `train.<field>` gin names), through the real train
step on one device and on the (2, 2, 2) mesh, and a resume with the flag toggled through
`switch_t5.train.train`."""

import dataclasses
import functools

import gin
import jax
import numpy as np
import optax
import pytest
from flax import linen as nn
from tiny import EMBEDDED_FIELDS, EMBEDDED_RUN, random_batch, tiny_config, tiny_train_step

from switch_t5 import checkpoints, network, optim, partitioning, train_state
from switch_t5 import train as train_lib
from switch_t5.config import SwitchConfig

# No dropout or jitter: the steps are deterministic. One encoder and one decoder layer, both
# sparse (two router kernels), so that the train step compiles fast.
TINY = tiny_config(
    num_encoder_layers=1,
    num_decoder_layers=1,
    moe_layer_interval=1,
    dropout_rate=0.0,
    router_jitter_noise=0.0,
    group_size=8,
)
ROUTER_KERNELS = {"encoder/layers_0/mlp/router/w/kernel", "decoder/layers_0/mlp/router/w/kernel"}
# A constant learning rate large enough that every trained param visibly moves in a few steps,
# and weight decay so that a frozen param would move even where its gradient is zero.
FREEZE = dict(freeze_router=True, lr_schedule="constant", weight_decay=0.1)
ADAMW = dict(name="adamw", base_learning_rate=0.01)
ADAFACTOR = dict(name="adafactor", base_learning_rate=0.01, min_dim_size_to_factor=4)


def _flat(params) -> dict[str, np.ndarray]:
    flat = jax.tree_util.tree_flatten_with_path(jax.device_get(params))[0]
    return {optim.param_path(p): np.asarray(x) for p, x in flat}


def _bitwise_equal(a: np.ndarray, b: np.ndarray) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()


def _train_steps(mesh, config: optim.OptimizerConfig, steps: int = 5):
    """{path: param} before and after `steps` train steps of TINY with `config`."""
    run, batch = tiny_train_step(
        TINY, mesh, random_batch(), lambda specs: optim.make_optimizer(config, logical_specs=specs)
    )
    st, step = run.setup, run.train_step
    state = st.init_fn()
    before = _flat(state.params)  # before the step donates the state
    for _ in range(steps):
        state, _ = step(state, batch)
    return before, _flat(state.params)


def _mesh(shape):
    devices = jax.devices()[: int(np.prod(shape))]  # (1, 1, 1): one of the 8 devices
    return partitioning.make_mesh(*shape, num_experts=4, devices=devices)


def test_router_selector_picks_exactly_the_router_kernels():
    for config in (TINY, dataclasses.replace(TINY, scan_layers=True)):
        abstract = jax.eval_shape(
            lambda r, c=config: network.init_variables(c, r), jax.random.key(0)
        )
        paths = _flat_abstract(abstract["params"])
        routers = {p for p in paths if optim.update_scale(optim.OptimizerConfig(**FREEZE), p) == 0}
        expected = (
            ROUTER_KERNELS
            if not config.scan_layers
            else {p.replace("layers_0", "layers/subblock_0") for p in ROUTER_KERNELS}
        )
        assert routers == expected


def _flat_abstract(params) -> list[str]:
    flat = jax.tree_util.tree_flatten_with_path(nn.unbox(params))[0]
    return [optim.param_path(p) for p, _ in flat]


# Each optimizer and each mesh once (a train step compiles in ~10 s): the freezing is a final
# transform of the updates, the same code whatever the optimizer and the mesh.
@pytest.mark.parametrize(
    "settings, mesh_shape",
    [(ADAMW, (1, 1, 1)), (ADAFACTOR, (2, 2, 2))],
    ids=["adamw-1dev", "adafactor-222"],
)
def test_frozen_router_is_bitwise_unchanged_while_the_rest_trains(settings, mesh_shape):
    before, after = _train_steps(_mesh(mesh_shape), optim.OptimizerConfig(**FREEZE, **settings))
    assert set(before) >= ROUTER_KERNELS
    for path in before:
        if path in ROUTER_KERNELS:
            assert _bitwise_equal(before[path], after[path]), path
        else:  # weight decay moves every other param, gradient or not
            assert not np.array_equal(before[path], after[path]), path


def test_freezing_keeps_the_optimizer_state_tree_and_shardings():
    """Flags toggled on resume must restore the same state: the tree and its layout are the
    unflagged optimizer's."""
    mesh = _mesh((2, 2, 2))

    def abstract(**flags):
        return train_state.setup_train_state(
            lambda rng: network.init_variables(TINY, rng),
            lambda specs: optim.make_optimizer(
                optim.OptimizerConfig(**ADAFACTOR, **flags), logical_specs=specs
            ),
            mesh,
            seed=0,
        ).abstract_state.opt_state

    plain = abstract()
    controlled = abstract(freeze_router=True, trainable_params="decoder/")
    assert jax.tree.structure(plain) == jax.tree.structure(controlled)
    assert jax.tree.leaves(plain) == jax.tree.leaves(controlled)  # shapes, dtypes, shardings


def _register_sgd():
    def build_sgd(config, schedule, logical_specs):
        tx = optax.sgd(schedule)
        return optim.Optimizer(config.name, tx, schedule, optim.optax_state_shardings(tx))

    optim.register_optimizer("router_control_sgd", build_sgd)


@pytest.fixture
def sgd():
    _register_sgd()
    yield "router_control_sgd"
    optim.unregister_optimizer("router_control_sgd")


@functools.cache
def _params_and_grads(seed=1):
    """Random params with TINY's param tree (paths, shapes) and random gradients for them."""
    abstract = jax.eval_shape(lambda r: network.init_variables(TINY, r), jax.random.key(0))
    leaves, treedef = jax.tree.flatten(nn.unbox(abstract["params"]))
    keys = jax.random.split(jax.random.key(seed), 2 * len(leaves))
    params = [jax.random.normal(k, x.shape) for k, x in zip(keys[::2], leaves)]
    grads = [jax.random.normal(k, x.shape) for k, x in zip(keys[1::2], leaves)]
    return treedef.unflatten(params), treedef.unflatten(grads)


def _updates(config: optim.OptimizerConfig):
    """The optimizer's first updates of TINY's params for random gradients, by path."""
    params, grads = _params_and_grads()
    tx = optim.make_optimizer(config).tx
    updates, _ = jax.jit(tx.update)(grads, tx.init(params), params)
    return _flat(updates), _flat(grads)


@pytest.mark.parametrize("multiplier", [0.25, 3.0])
def test_router_multiplier_scales_the_router_step_of_a_registered_sgd(sgd, multiplier):
    # SGD's update is exactly -lr * grad; x 0.25 is exact in float32, x 3 rounds once.
    config = optim.OptimizerConfig(
        name=sgd,
        lr_schedule="constant",
        base_learning_rate=0.5,
        router_learning_rate_multiplier=multiplier,
    )
    updates, grads = _updates(config)
    for path, u in updates.items():
        scale = multiplier if path in ROUTER_KERNELS else 1.0
        expected = (np.float32(-0.5) * grads[path]) * np.float32(scale)
        assert _bitwise_equal(u, expected.astype(np.float32)), path


def test_router_multiplier_scales_adamw_step_and_weight_decay():
    base = dict(ADAMW, lr_schedule="constant", weight_decay=0.1)
    plain, _ = _updates(optim.OptimizerConfig(**base))
    quarter, _ = _updates(optim.OptimizerConfig(**base, router_learning_rate_multiplier=0.25))
    zero, _ = _updates(optim.OptimizerConfig(**base, router_learning_rate_multiplier=0.0))
    frozen, _ = _updates(optim.OptimizerConfig(**base, freeze_router=True))
    for path in plain:
        if path in ROUTER_KERNELS:
            assert _bitwise_equal(quarter[path], plain[path] * np.float32(0.25)), path
            # Multiplier 0 is frozen: -0.0 everywhere, so param + update is the param exactly.
            assert _bitwise_equal(zero[path], frozen[path]), path
            assert np.all(np.signbit(frozen[path])) and not np.any(frozen[path]), path
        else:
            for other in (quarter, zero, frozen):
                assert _bitwise_equal(other[path], plain[path]), path


def test_defaults_leave_the_optimizer_itself():
    config = optim.OptimizerConfig()
    assert not config.controls_updates
    built = optim.make_optimizer(config)
    assert optim.control_updates(built.tx, config) is built.tx


def test_trainable_params_regex_updates_only_what_it_matches():
    base = dict(ADAFACTOR, lr_schedule="constant", weight_decay=0.1)
    plain, _ = _updates(optim.OptimizerConfig(**base))
    decoder_only, _ = _updates(optim.OptimizerConfig(**base, trainable_params="^decoder/"))
    assert any(p.startswith("encoder/") for p in plain)
    for path, u in decoder_only.items():
        if path.startswith("decoder/"):
            assert _bitwise_equal(u, plain[path]), path
        else:  # the encoder, the shared token embedding: no update, weight decay included
            assert np.all(np.signbit(u)) and not np.any(u), path
    # Both apply: the router of a trained part is still frozen by freeze_router.
    frozen = optim.OptimizerConfig(trainable_params="^decoder/", freeze_router=True)
    router = "decoder/layers_0/mlp/router/w/kernel"
    assert optim.update_scale(optim.OptimizerConfig(trainable_params="^decoder/"), router) == 1
    assert optim.update_scale(frozen, router) == 0.0
    # re.search: an unanchored regex matches anywhere in the path.
    assert optim.update_scale(optim.OptimizerConfig(trainable_params="attention"), router) == 0
    path = "encoder/layers_0/attention/query/kernel"
    assert optim.update_scale(optim.OptimizerConfig(trainable_params="attention"), path) == 1


@pytest.mark.parametrize(
    "fields, message",
    [
        ({"trainable_params": "decoder/(layers"}, "trainable_params='decoder/(layers' is not a"),
        ({"trainable_params": 3}, "trainable_params=3 must be a regex string or None"),
        ({"router_learning_rate_multiplier": -1.0}, "router_learning_rate_multiplier=-1.0"),
        ({"freeze_router": "yes"}, "freeze_router='yes' must be True or False"),
    ],
)
def test_bad_settings_are_one_line_user_errors(fields, message):
    with pytest.raises(optim.OptimizerConfigError) as info:
        optim.OptimizerConfig(**fields)
    assert message in str(info.value)
    assert "\n" not in str(info.value)


def test_trainable_params_matching_nothing_is_refused_before_compiling():
    config = optim.OptimizerConfig(trainable_params="^encoder/layers_9/")
    with pytest.raises(optim.OptimizerConfigError, match="matches none of the model's params"):
        train_state.setup_train_state(
            lambda rng: network.init_variables(TINY, rng),
            lambda specs: optim.make_optimizer(config, logical_specs=specs),
            _mesh((1, 1, 1)),
            seed=0,
        )


# The train() run: tests/test_train.py's model and run (same train-step program: the
# persistent compilation cache serves both); the embedded corpus's vocabulary has 4096 ids.
RUN_MODEL = EMBEDDED_FIELDS
RUN_ROUTERS = {p.replace("layers_0", "layers_1") for p in ROUTER_KERNELS}
RUN = {
    **EMBEDDED_RUN,
    "eval_period": 0,
    "checkpoint_period": 2,
    "random_seed": 0,
    "make_plots": False,
    "mesh_data": 2,
    "mesh_expert": 2,
    "mesh_model": 2,
}


def _run_train(model_dir, train_steps, **kw):
    gin.clear_config()  # bindings an earlier test parsed would change the run
    return train_lib.train(
        model_dir=str(model_dir),
        train_steps=train_steps,
        model_config=SwitchConfig(**RUN_MODEL),
        **RUN,
        **kw,
    )


def test_resume_with_freeze_router_toggled_keeps_the_router_bitwise(tmp_path):
    """2 steps, then resumed to 4 with train.freeze_router=True: the state restores as it is
    (same tree), and the routers stay bit for bit what step 2 left."""
    d = tmp_path / "model"
    assert _run_train(d, 2).step == 2
    result = _run_train(d, 4, freeze_router=True)
    assert result.start_step == 2 and result.step == 4
    cfg = SwitchConfig(**RUN_MODEL)
    setup = train_state.setup_train_state(
        lambda rng: network.init_variables(cfg, rng),
        lambda specs: optim.make_optimizer("adafactor", logical_specs=specs),
        _mesh((2, 2, 2)),
        seed=RUN["random_seed"],
    )
    at_0 = _flat(setup.init_fn().params)  # the run's initial params (same seed, same init)
    ckpt = checkpoints.Checkpointer(str(d))
    at_2, at_4 = (_flat(ckpt.restore(setup.abstract_state, s).state.params) for s in (2, 4))
    ckpt.close()
    assert set(at_2) >= RUN_ROUTERS
    for path in at_2:
        if path in RUN_ROUTERS:
            assert not np.array_equal(at_0[path], at_2[path]), path  # trained before
            assert _bitwise_equal(at_2[path], at_4[path]), path  # frozen after
        elif path.endswith("expert/wi/kernel"):  # the experts keep training
            assert not np.array_equal(at_2[path], at_4[path]), path
    assert not np.array_equal(at_2["token_embedder/embedding"], at_4["token_embedder/embedding"])
