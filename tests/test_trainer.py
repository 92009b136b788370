"""The loss, the sharded train step (incl. gradient accumulation) and the eval step."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from tiny import random_batch, tiny_config

from switch_t5 import network, optim, partitioning, train_state, trainer

RTOL, ATOL = 1e-5, 1e-6

# No dropout/jitter, so that microbatched and full-batch gradients can be compared. group_size 8 =
# one decoder example (and half an encoder example) per routing group, so groups are the same
# with or without microbatches.
TINY = tiny_config(
    moe_layer_interval=2,
    dropout_rate=0.0,
    router_jitter_noise=0.0,
    train_capacity_factor=4.0,
    eval_capacity_factor=4.0,
    group_size=8,
    load_balancing_loss_weight=0.01,
    router_z_loss_weight=0.001,
)


def _batch(seed=0, batch=8, inputs=16, targets=8):
    # Different numbers of real target tokens per example (normalisation by the real tokens).
    return random_batch(seed, batch, inputs, targets, ragged=True)


@pytest.fixture(scope="module")
def setup(mesh_222):
    module = network.EncoderDecoder(TINY)
    st = train_state.setup_train_state(
        lambda rng: network.init_variables(TINY, rng),
        lambda specs: optim.make_optimizer("adafactor", optim.rsqrt_schedule(), specs),
        mesh_222,
        seed=0,
    )
    loss_config = trainer.LossConfig(
        1e-4, TINY.load_balancing_loss_weight, TINY.router_z_loss_weight
    )
    shardings = trainer.batch_shardings(_batch(), mesh_222)
    return module, st, loss_config, shardings


def test_token_losses_match_optax():
    k1, k2 = jax.random.split(jax.random.PRNGKey(0))
    logits = jax.random.normal(k1, (3, 5, 11)) * 3
    targets = jax.random.randint(k2, (3, 5), 0, 11)
    weights = (jnp.arange(5)[None] < jnp.array([[5], [2], [0]])).astype(jnp.float32)
    out = trainer.token_losses(logits, targets, weights, z_loss=1e-4)
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
    np.testing.assert_allclose(out["cross_entropy_sum"], jnp.sum(ce * weights), rtol=RTOL)
    lse = jax.nn.logsumexp(logits, -1)
    np.testing.assert_allclose(out["z_loss_sum"], 1e-4 * jnp.sum(lse**2 * weights), rtol=RTOL)
    assert float(out["weight_sum"]) == 7.0
    correct = (jnp.argmax(logits, -1) == targets) * weights
    assert float(out["correct_sum"]) == float(jnp.sum(correct))


def test_train_step_on_222_mesh_learns_and_keeps_shardings(setup, mesh_222):
    module, st, loss_config, shardings = setup
    step = trainer.make_train_step(
        module, st.optimizer, loss_config, st.shardings, shardings, mesh_222
    )
    state = st.init_fn()
    batch = {k: jax.device_put(v, shardings[k]) for k, v in _batch().items()}
    losses = []
    for _ in range(4):
        state, metrics = step(state, batch)
        losses.append(float(metrics["loss"]))
    assert int(state.step) == 4
    assert losses[-1] < losses[0], losses
    m = jax.device_get(metrics)
    assert m["expert_usage"].shape == (2, 4)  # one MoE layer in the encoder, one in the decoder
    np.testing.assert_allclose(m["expert_usage"].sum(-1), 1.0, rtol=RTOL)
    assert bool(m["params_finite"])
    # The loss is the sum of its terms.
    expected = (
        m["cross_entropy"]
        + m["z_loss"]
        + TINY.load_balancing_loss_weight * m["load_balancing_loss"]
        + TINY.router_z_loss_weight * m["router_z_loss"]
    )
    np.testing.assert_allclose(m["loss"], expected, rtol=RTOL)
    assert float(m["target_tokens"]) == float(_batch()["decoder_loss_weights"].sum())
    np.testing.assert_allclose(m["learning_rate"], 0.01, rtol=RTOL)
    wi = state.params["encoder"]["layers_1"]["mlp"]["expert"]["wi"]["kernel"]
    assert (
        wi.sharding == st.shardings.params["encoder"]["layers_1"]["mlp"]["expert"]["wi"]["kernel"]
    )
    assert wi.sharding.spec[0] == "expert"


@pytest.mark.slow
def test_gradient_accumulation_matches_full_batch(setup, mesh_222):
    module, st, _, shardings = setup
    # The MoE losses are per microbatch (see trainer's docstring): compare the token terms only.
    loss_config = trainer.LossConfig(1e-4, 0.0, 0.0)
    batch = _batch(seed=1)
    state = st.init_fn()
    full = trainer.make_train_step(
        module, st.optimizer, loss_config, st.shardings, shardings, mesh_222
    )
    micro = trainer.make_train_step(
        module, st.optimizer, loss_config, st.shardings, shardings, mesh_222, num_microbatches=2
    )
    s_full, m_full = full(jax.tree.map(jnp.copy, state), batch)
    s_micro, m_micro = micro(state, batch)
    for key in ("loss", "cross_entropy", "z_loss", "accuracy", "grad_norm"):
        np.testing.assert_allclose(m_micro[key], m_full[key], rtol=RTOL, atol=ATOL, err_msg=key)
    # Adafactor normalises the step, so compare the parameters after it.
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=RTOL, atol=ATOL),
        s_micro.params,
        s_full.params,
    )


def test_eval_step_and_accumulator(setup, mesh_222):
    module, st, loss_config, shardings = setup
    state = st.init_fn()
    ev = trainer.make_eval_step(module, loss_config, st.shardings.params, shardings, mesh_222)
    acc = trainer.EvalAccumulator(loss_config)
    b1, b2 = _batch(seed=2), _batch(seed=3)
    o1, o2 = ev(state.params, b1), ev(state.params, b2)
    acc.add(o1)
    acc.add(o2)
    r = acc.result()
    w = float(o1["weight_sum"] + o2["weight_sum"])
    np.testing.assert_allclose(
        r["cross_entropy"], float(o1["cross_entropy_sum"] + o2["cross_entropy_sum"]) / w, rtol=RTOL
    )
    assert r["batches"] == 2 and r["expert_usage"].shape == (2, 4)
    # Near log(vocab) at init: the model starts from chance.
    assert 0.8 * np.log(128) < r["cross_entropy"] < 1.2 * np.log(128)
    with pytest.raises(ValueError, match="no batches"):
        trainer.EvalAccumulator(loss_config).result()


def test_moe_layer_names(setup):
    module, st, _, _ = setup
    names = trainer.moe_layer_names(
        module, st.abstract_state.params, {k: jnp.asarray(v) for k, v in _batch().items()}
    )
    assert len(names) == 2 and "encoder" in names[0] and "decoder" in names[1]


def test_partitioning_rules_used():
    assert ("batch", ("data", "expert")) in partitioning.LOGICAL_AXIS_RULES
