"""Per-expert Adafactor, its state shardings, AdamW shardings and the schedules."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding, PartitionSpec
from tiny import ToyModel

from switch_t5 import optim, train_state

RTOL, ATOL = 1e-5, 1e-6


def _expert_problem(E=256, M=128, N=512, steps=3):
    """Params whose experts differ in scale, and gradients whose experts differ in size."""
    k = jax.random.split(jax.random.PRNGKey(0), steps + 1)
    expert_scale = (1.0 + jnp.arange(E, dtype=jnp.float32) / 8.0)[:, None, None]
    params = jax.random.normal(k[0], (E, M, N)) * 0.05 * expert_scale
    # Some experts get gradients 100x larger, so a shared clipping/scale would couple them.
    grads = [
        jax.random.normal(k[i + 1], (E, M, N)) * jnp.where(expert_scale > 10.0, 100.0, 0.01)
        for i in range(steps)
    ]
    return params, grads


def _run(tx, params, grads):
    state = tx.init(params)
    update = jax.jit(tx.update)
    for g in grads:
        updates, state = update(g, state, params)
        params = optax.apply_updates(params, updates)
    return params, state


@pytest.fixture(scope="module")
def expert_problem():
    return _expert_problem()


def test_per_expert_adafactor_equals_adafactor_on_each_expert(expert_problem):
    params, grads = expert_problem
    schedule = optim.rsqrt_schedule(1.0, 10_000)
    ours = optim.adafactor(schedule, {"w": (0,)})
    new_params, state = _run(ours, {"w": params}, [{"w": g} for g in grads])
    # Factored per expert: states [E, d_model] and [E, d_ff].
    assert state.v_row["w"].shape == (256, 128)
    assert state.v_col["w"].shape == (256, 512)
    assert state.v["w"].shape == (1,)

    # Reference: optax's plain Adafactor run on every [128, 512] expert matrix separately.
    ref = optax.adafactor(schedule, decay_rate=0.8, clipping_threshold=1.0)

    def one_expert(p, gs):
        s = ref.init(p)
        for g in gs:
            u, s = ref.update(g, s, p)
            p = optax.apply_updates(p, u)
        return p, s

    ref_params, ref_state = jax.jit(jax.vmap(one_expert))(params, grads)
    np.testing.assert_allclose(new_params["w"], ref_params, rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(state.v_row["w"], ref_state[0].v_row, rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(state.v_col["w"], ref_state[0].v_col, rtol=RTOL, atol=ATOL)
    assert int(state.count) == 3


def test_optax_adafactor_couples_experts(expert_problem):
    """The pitfall the per-expert version avoids: optax averages over the expert axis."""
    params, grads = expert_problem
    schedule = optim.rsqrt_schedule(1.0, 10_000)
    plain_params, plain_state = _run(optax.adafactor(schedule), params, grads)
    # optax factors the two largest dims (256 experts, 512): a [128, 512] state shared by experts.
    assert plain_state[0].v_col.shape == (128, 512)
    ours, _ = _run(optim.adafactor(schedule, {"w": (0,)}), {"w": params}, [{"w": g} for g in grads])
    step_ours = np.asarray(ours["w"] - params)
    step_plain = np.asarray(plain_params - params)
    # Per expert, our step size follows that expert's own parameter scale: the update RMS of the
    # last expert (scale 32.9x) is ~30x the first expert's; the coupled optax step is not.
    rms = lambda x: np.sqrt(np.mean(x**2, axis=(1, 2)))
    ratio_ours = rms(step_ours)[-1] / rms(step_ours)[0]
    ratio_plain = rms(step_plain)[-1] / rms(step_plain)[0]
    assert 25.0 < ratio_ours < 40.0, ratio_ours
    assert abs(ratio_plain - ratio_ours) > 5.0, (ratio_plain, ratio_ours)


def test_unfactored_and_batch_axes_without_matrix():
    """A per-expert bias [E, F] keeps a full moment, with per-expert scale and clipping."""
    k1, k2 = jax.random.split(jax.random.PRNGKey(1))
    bias = jax.random.normal(k1, (4, 16)) * jnp.array([0.01, 0.1, 1.0, 10.0])[:, None]
    grad = jax.random.normal(k2, (4, 16))
    tx = optim.adafactor(0.01, {"b": (0,)})
    new, state = _run(tx, {"b": bias}, [{"b": grad}])
    assert state.v["b"].shape == (4, 16)
    ref = optax.adafactor(0.01)
    for e in range(4):
        p_ref, _ = _run(ref, bias[e], [grad[e]])
        np.testing.assert_allclose(new["b"][e], p_ref, rtol=RTOL, atol=ATOL)


def test_state_shardings_follow_param_shardings(mesh_222):
    # An expert kernel [experts=4, embed=8, mlp=16] sharded (expert, None, model).
    specs = {"wi": PartitionSpec("expert", None, "model"), "emb": PartitionSpec("model", None)}
    shapes = {"wi": (4, 8, 16), "emb": (256, 8)}
    logical = {
        "wi": PartitionSpec("expert", "embed", "mlp"),
        "emb": PartitionSpec("vocab", "embed"),
    }
    shardings = {k: NamedSharding(mesh_222, s) for k, s in specs.items()}
    params = {k: jax.device_put(jnp.ones(s, jnp.float32), shardings[k]) for k, s in shapes.items()}
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params)
    opt = optim.make_optimizer(
        "adafactor", optim.rsqrt_schedule(), logical, min_dim_size_to_factor=4
    )
    st = opt.state_shardings(shardings, abstract)
    assert st.v_row["wi"].spec == PartitionSpec("expert", None)
    assert st.v_col["wi"].spec == PartitionSpec("expert", "model")
    assert st.v["wi"].spec == PartitionSpec()
    # emb [256, 8]: rows = 8 (second largest), columns = 256.
    assert st.v_row["emb"].spec == PartitionSpec(None)
    assert st.v_col["emb"].spec == PartitionSpec("model")
    state = jax.jit(opt.tx.init, out_shardings=st)(params)
    assert state.v_col["wi"].shape == (4, 16)
    updates, state2 = jax.jit(opt.tx.update, out_shardings=(shardings, st))(params, state, params)
    assert state2.v_row["wi"].sharding.spec == PartitionSpec("expert", None)
    assert np.all(np.isfinite(np.asarray(updates["wi"])))


def test_adamw_state_shardings(mesh_222):
    shardings = {"w": NamedSharding(mesh_222, PartitionSpec("expert", None, "model"))}
    abstract = {"w": jax.ShapeDtypeStruct((4, 8, 16), jnp.float32)}
    opt = optim.make_optimizer("adamw", optim.make_schedule("constant", 1e-3))
    st = opt.state_shardings(shardings, abstract)
    adam = st[0]
    assert adam.mu["w"].spec == PartitionSpec("expert", None, "model")
    assert adam.nu["w"].spec == PartitionSpec("expert", None, "model")
    assert adam.count.spec == PartitionSpec()


def test_rsqrt_schedule_is_t5s():
    s = optim.make_schedule("rsqrt", 1.0, 10_000)
    np.testing.assert_allclose(s(0), 0.01, rtol=RTOL)
    np.testing.assert_allclose(s(9_999), 0.01, rtol=RTOL)
    np.testing.assert_allclose(s(40_000), 0.005, rtol=RTOL)
    lin = optim.make_schedule("linear_rsqrt", 1.0, 100)
    np.testing.assert_allclose(lin(49), 0.05, rtol=RTOL)
    np.testing.assert_allclose(lin(399), 0.05, rtol=RTOL)


def test_bad_names_fail_clearly():
    with pytest.raises(ValueError, match="unknown optimizer 'adam'"):
        optim.make_optimizer("adam", optim.rsqrt_schedule())
    with pytest.raises(ValueError, match="unknown learning-rate schedule 'rsqr'"):
        optim.make_schedule("rsqr")
    with pytest.raises(ValueError, match="decay_steps"):
        optim.make_schedule("cosine", 1.0, 10)


def test_optimizer_config_defaults_are_trains():
    """The config's defaults are `train`'s (so a run built from it trains bitwise as before)."""
    import inspect

    from switch_t5 import train

    params = inspect.signature(train.train.__wrapped__).parameters
    mapping = {
        "optimizer": "name",
        "optimizer_state_dtype": "state_dtype",
        "lr_schedule": "lr_schedule",
        "base_learning_rate": "base_learning_rate",
        "warmup_steps": "warmup_steps",
        "decay_steps": "decay_steps",
        "weight_decay": "weight_decay",
    }
    config = optim.OptimizerConfig()
    for train_name, field in mapping.items():
        assert getattr(config, field) == params[train_name].default, train_name


def test_optimizer_config_lists_every_problem():
    with pytest.raises(optim.OptimizerConfigError) as info:
        optim.OptimizerConfig(
            name="adam", state_dtype="int8", b2=1.0, lr_schedule="cosine", decay_steps=5
        )
    message = str(info.value)
    assert message.count(";") == 3, message
    for part in ("unknown optimizer 'adam'", "state_dtype='int8'", "b2=1.0", "decay_steps=5"):
        assert part in message
    with pytest.raises(optim.OptimizerConfigError, match="warmup_steps=0 must be positive"):
        optim.OptimizerConfig(warmup_steps=0)


def test_make_optimizer_from_config_equals_the_name_form():
    """Config and name + keyword forms build the same update, and the config's own settings
    (AdamW's b1/b2/eps, once fixed) reach the optimizer."""
    params = {"w": jnp.linspace(-1.0, 1.0, 24).reshape(4, 6)}
    grads = [{"w": jnp.cos(params["w"] * (i + 1))} for i in range(2)]
    config = optim.OptimizerConfig(
        name="adamw", lr_schedule="constant", base_learning_rate=1e-2, b1=0.5, b2=0.9, eps=1e-3
    )
    from_config = optim.make_optimizer(config)
    by_name = optim.make_optimizer(
        "adamw", optim.make_schedule("constant", 1e-2), b1=0.5, b2=0.9, eps=1e-3
    )
    a, _ = _run(from_config.tx, params, grads)
    b, _ = _run(by_name.tx, params, grads)
    np.testing.assert_array_equal(np.asarray(a["w"]), np.asarray(b["w"]))
    want, _ = _run(optax.adamw(1e-2, b1=0.5, b2=0.9, eps=1e-3, weight_decay=0.01), params, grads)
    np.testing.assert_allclose(np.asarray(a["w"]), np.asarray(want["w"]), rtol=RTOL, atol=ATOL)
    with pytest.raises(TypeError, match="OptimizerConfig and settings"):
        optim.make_optimizer(config, b1=0.1)


def _build_sgd(config, schedule, logical_specs):
    del logical_specs
    tx = optax.sgd(schedule, momentum=0.5)
    return optim.Optimizer(config.name, tx, schedule, optim.optax_state_shardings(tx))


def test_a_registered_optimizer_trains(mesh_222):
    """An optimizer registered outside switch_t5 is built by name and steps a sharded state."""
    optim.register_optimizer("test_sgd", _build_sgd)
    try:
        assert "test_sgd" in optim.OPTIMIZERS
        config = optim.OptimizerConfig(
            name="test_sgd", lr_schedule="constant", base_learning_rate=0.1
        )
        model = ToyModel(128, True)
        setup = train_state.setup_train_state(
            lambda rng: model.init(rng, jnp.zeros((2,), jnp.int32)),
            lambda specs: optim.make_optimizer(config, None, specs),
            mesh_222,
            seed=3,
        )
        state = setup.init_fn()
        params0 = jax.device_get(state.params)
        grads = jax.tree.map(jnp.ones_like, state.params)
        step = jax.jit(
            lambda s, g: s.apply_gradients(g, setup.optimizer.tx),
            out_shardings=setup.shardings,
        )
        for _ in range(2):
            state = step(state, grads)
    finally:
        optim._OPTIMIZER_BUILDERS.pop("test_sgd")
        optim.OPTIMIZERS = tuple(optim._OPTIMIZER_BUILDERS)
    assert int(state.step) == 2
    # SGD with momentum 0.5 and lr 0.1 on a gradient of ones: -0.1 - 0.15 = -0.25 per entry.
    for before, after in zip(
        jax.tree.leaves(params0), jax.tree.leaves(jax.device_get(state.params))
    ):
        np.testing.assert_allclose(after, before - 0.25, rtol=RTOL, atol=ATOL)
    wi = jax.tree.leaves(state.opt_state)
    assert any(
        getattr(x.sharding, "spec", None) == PartitionSpec("expert", None, "model") for x in wi
    )
