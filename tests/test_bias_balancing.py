"""Auxiliary-loss-free load balancing (after DeepSeek-V3, arXiv 2412.19437 sec. 2.1.2):
`SwitchConfig.router_bias_update_rate`, its +-u update, the choice bias in routing (never in the
gates), the bias in the train state (checkpointed, resumed bitwise, old checkpoints load with
bias 0), HF export's refusal, and the DeepSeek-V3 routing options (sigmoid scores, renormalised
top-k gates, the sequence-wise balance loss). Train steps on one device and on the (2, 2, 2)
mesh."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from tiny import random_batch, tiny_config, tiny_train_step

from switch_t5 import (
    checkpoints,
    convert,
    decoding,
    errors,
    init_checkpoint,
    network,
    partitioning,
    routing,
    run_builder,
    train_state,
)
from switch_t5.interop import hf

U = 0.1
# One encoder and one decoder layer, both sparse; no dropout or jitter (deterministic steps); the
# load-balancing loss off, so that only the bias can even the load out. `_skew` makes the start
# deliberately skewed towards expert 0.
SKEWED = tiny_config(
    num_encoder_layers=1,
    num_decoder_layers=1,
    moe_layer_interval=1,
    dropout_rate=0.0,
    router_jitter_noise=0.0,
    router_init_stddev=0.5,
    load_balancing_loss_weight=0.0,
    group_size=16,
)
BIASED = dataclasses.replace(SKEWED, router_bias_update_rate=U)
LAYERS = ("decoder/layers_0/mlp/expert_bias", "encoder/layers_0/mlp/expert_bias")


def _mesh(shape):
    devices = jax.devices()[: int(np.prod(shape))]
    return partitioning.make_mesh(*shape, num_experts=4, devices=devices)


def _flat(tree) -> dict[str, np.ndarray]:
    flat = jax.tree_util.tree_flatten_with_path(jax.device_get(tree))[0]
    return {"/".join(k.key for k in path): np.asarray(x) for path, x in flat}


def _bitwise(a, b) -> bool:
    a, b = _flat(a), _flat(b)
    return a.keys() == b.keys() and all(
        a[k].dtype == b[k].dtype and a[k].tobytes() == b[k].tobytes() for k in a
    )


# --- the update rule and the routing ----------------------------------------------------------


def test_update_moves_each_bias_by_u_towards_the_mean_load():
    bias = jnp.array([[0.5, 0.0, -0.25, 0.0], [0.0, 0.0, 0.0, 0.0]], jnp.float32)
    # Row 0: mean load 5 -> over, under, at the mean, under; row 1 (another layer): mean 3.
    load = jnp.array([[10.0, 2.0, 5.0, 3.0], [3.0, 3.0, 0.0, 6.0]], jnp.float32)
    new = np.asarray(routing.update_choice_bias(bias, load, 0.125))
    np.testing.assert_array_equal(new, [[0.375, 0.125, -0.25, 0.125], [0.0, 0.0, 0.125, -0.125]])
    assert new.dtype == np.float32


@pytest.mark.parametrize("score", ["softmax", "sigmoid"])
def test_bias_changes_the_choice_and_never_the_gate(score):
    logits = jax.random.normal(jax.random.key(0), (2, 6, 4))
    valid = jnp.ones((2, 6), bool)
    kw = dict(num_selected_experts=2, capacity=6, score=score)
    plain = routing.route(logits, valid, **kw)
    # A bias far above any score difference makes experts 3 and 1 every token's choices.
    bias = jnp.array([0.0, 50.0, 0.0, 100.0])
    biased = routing.route(logits, valid, choice_bias=bias, **kw)
    np.testing.assert_array_equal(np.asarray(biased.expert_index[..., 0]), 3)
    np.testing.assert_array_equal(np.asarray(biased.expert_index[..., 1]), 1)
    scores = np.asarray(routing.router_scores(logits, score))
    np.testing.assert_array_equal(np.asarray(biased.gate), scores[..., [3, 1]])
    np.testing.assert_array_equal(np.asarray(biased.router_probs), np.asarray(plain.router_probs))
    # A zero bias chooses as no bias does.
    zero = routing.route(logits, valid, choice_bias=jnp.zeros(4), **kw)
    np.testing.assert_array_equal(np.asarray(zero.expert_index), np.asarray(plain.expert_index))


def test_renormalised_gates_sum_to_one_and_sigmoid_scores_are_independent():
    logits = jax.random.normal(jax.random.key(1), (1, 5, 4))
    r = routing.route(
        logits,
        jnp.ones((1, 5), bool),
        num_selected_experts=2,
        capacity=5,
        score="sigmoid",
        renormalize_gates=True,
    )
    np.testing.assert_allclose(np.asarray(r.gate).sum(-1), 1.0, rtol=1e-6)
    np.testing.assert_array_equal(np.asarray(r.router_probs), np.asarray(jax.nn.sigmoid(logits)))


def test_sequence_balance_loss_is_one_when_uniform_and_e_under_collapse():
    e, length = 4, 8
    probs = jnp.full((2, length, e), 0.25)
    uniform = jnp.tile(jnp.arange(length, dtype=jnp.int32)[None, :, None] % e, (2, 1, 1))
    valid = jnp.ones((2, length), bool)
    loss = routing.sequence_balance_loss(probs, uniform, valid, length)
    np.testing.assert_allclose(float(loss), 1.0, rtol=1e-6)
    onehot = jax.nn.one_hot(jnp.zeros((2, length), jnp.int32), e)
    collapsed = routing.sequence_balance_loss(
        onehot, jnp.zeros((2, length, 1), jnp.int32), valid, 4
    )
    np.testing.assert_allclose(float(collapsed), e, rtol=1e-6)


# --- the config ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "fields, words",
    [
        (dict(router_bias_update_rate=-0.1), "router_bias_update_rate=-0.1 must be"),
        (dict(router_score="tanh"), "router_score='tanh'"),
        (dict(router_renormalize_gates=True), "needs num_selected_experts > 1"),
        (
            dict(
                router_type="experts_choose", router_bias_update_rate=0.01, decoder_sparse_layers=()
            ),
            "balances load by construction",
        ),
    ],
)
def test_config_refuses_what_makes_no_sense(fields, words):
    with pytest.raises(errors.UserError, match=words.replace("(", r"\(")):
        tiny_config(**fields)


def test_default_is_off_and_the_state_keeps_its_old_tree():
    config = tiny_config()
    assert config.router_bias_update_rate == 0.0
    assert config.router_score == "softmax" and not config.router_renormalize_gates
    state = train_state.TrainState(jnp.int32(0), {"w": jnp.ones(2)}, (), jax.random.key(0))
    paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(state)[0]]
    assert paths == [".step", ".params['w']", ".rng"]


# --- training -----------------------------------------------------------------------------------


def _skew(params):
    """Every token embedding gets +3 on coordinate 0 and both routers' expert-0 logit +1.5 per
    unit of it: every token leans towards expert 0 by about 3 logits (the other logits vary by
    token with stddev about 1.4)."""

    def edit(path, x):
        name = "/".join(k.key for k in path)
        if name == "token_embedder/embedding":
            return jax.device_put(x.at[:, 0].add(3.0), x.sharding)
        if name.endswith("router/w/kernel"):
            return jax.device_put(x.at[0, 0].add(1.5), x.sharding)
        return x

    return jax.tree_util.tree_map_with_path(edit, params)


def _train(config, mesh, steps):
    run, batch = tiny_train_step(config, mesh, random_batch())
    state = run.setup.init_fn()
    state = state.replace(params=_skew(state.params))
    loads = []
    for _ in range(steps):
        state, metrics = run.train_step(state, batch)
        loads.append(np.asarray(metrics["max_load_over_mean"]))
    return run, state, np.stack(loads)


@pytest.mark.parametrize("shape", [(1, 1, 1), (2, 2, 2)])
def test_bias_evens_out_a_skewed_router_where_the_control_does_not(shape):
    mesh = _mesh(shape)
    _, control_state, control = _train(SKEWED, mesh, 50)
    run, state, biased = _train(BIASED, mesh, 50)
    assert control_state.router_bias is None
    # Per layer max/mean load (4 = every token on one expert): both start skewed; on the average
    # of steps 41-50 the biased run is balanced better in every layer (measured on one device:
    # control 3.7 and 2.1, biased 1.1 and 1.3).
    assert control.shape == biased.shape == (50, 2)
    np.testing.assert_array_equal(control[0], biased[0])
    assert np.all(control[0] > 2.5), control[0]
    late_control, late_biased = control[-10:].mean(0), biased[-10:].mean(0)
    assert np.all(late_biased < late_control), (late_biased, late_control)
    assert np.all(late_biased < 1.5), late_biased
    # Every bias moved by multiples of u (float32 sums of +-u).
    bias = _flat(state.router_bias)
    assert sorted(bias) == sorted(LAYERS)
    for value in bias.values():
        assert value.shape == (4,) and np.abs(value).max() > 0
        assert np.all(np.abs(value) <= 50 * U + 1e-5)
    # The eval step routes with the biases.
    _, batch = tiny_train_step(BIASED, mesh, random_batch())
    out = run.eval_step(state.params, batch, state.router_bias)
    assert np.isfinite(float(out["cross_entropy_sum"]))


def test_resume_reproduces_the_bias_bitwise_and_old_checkpoints_load_with_bias_zero(tmp_path):
    mesh = _mesh((1, 1, 1))
    run, batch = tiny_train_step(BIASED, mesh, random_batch())
    state = run.setup.init_fn()
    for _ in range(3):
        state, _ = run.train_step(state, batch)
    meta = checkpoints.make_meta(BIASED)
    ckpt = checkpoints.Checkpointer(str(tmp_path / "run"), async_save=False)
    ckpt.save(3, state, {}, meta)
    ckpt.wait()
    saved_bias = jax.device_get(state.router_bias)
    restored = ckpt.restore(run.setup.abstract_state, expected_meta=meta).state
    assert _bitwise(restored.router_bias, state.router_bias)
    assert _bitwise(restored.params, state.params)
    # Continuing from the restored state takes the same steps as the uninterrupted run.
    for _ in range(2):
        state, _ = run.train_step(state, batch)
        restored, _ = run.train_step(restored, batch)
    assert _bitwise(restored.router_bias, state.router_bias)
    ckpt.close()
    # `convert orbax-to-hf` refuses the checkpoint by name, before writing anything.
    with pytest.raises(errors.UserError, match=f"router_bias_update_rate={U}"):
        convert.main(["orbax-to-hf", f"--src={tmp_path / 'run'}", f"--dst={tmp_path / 'hf'}"])
    assert not (tmp_path / "hf").exists() or not any((tmp_path / "hf").iterdir())
    _check_decoding_routes_with_the_checkpoints_biases(str(tmp_path / "run"), saved_bias)

    # A checkpoint without biases (balancing off) resumes with balancing on: biases start at 0.
    plain_run, _ = tiny_train_step(SKEWED, mesh, random_batch())
    plain = plain_run.setup.init_fn()
    old = checkpoints.Checkpointer(str(tmp_path / "old"), async_save=False)
    old.save(0, plain, {}, checkpoints.make_meta(SKEWED))
    old.wait()
    resumed = old.restore(run.setup.abstract_state, expected_meta=meta).state
    assert _bitwise(resumed.params, plain.params)
    assert all(np.all(v == 0) for v in _flat(resumed.router_bias).values())
    assert sorted(_flat(resumed.router_bias)) == sorted(LAYERS)
    old.close()
    # Fine-tuning from it (INITIAL_CHECKPOINT_PATH) starts the biases at 0 too, and trains.
    tuned, _ = init_checkpoint.initial_train_state(run.setup, str(tmp_path / "old"), seed=0)
    assert _bitwise(tuned.params, plain.params)
    assert all(np.all(v == 0) for v in _flat(tuned.router_bias).values())
    tuned, _ = run.train_step(tuned, batch)
    assert any(np.any(v != 0) for v in _flat(tuned.router_bias).values())


def _check_decoding_routes_with_the_checkpoints_biases(model_dir, saved_bias):
    """What eval and infer load (`run_builder.load_model`) carries the biases, and decoding
    routes with them: a bias far above the logits on expert 3 sends every encoder token there
    (half of them dropped by the eval capacity, cf 2 x 16 tokens / 4 experts = 8 slots)."""
    ref = init_checkpoint.find_checkpoint(model_dir)
    model, params, _, mesh = run_builder.load_model(ref)
    assert _bitwise(params[train_state.BIAS_FIELD], saved_bias)
    decode = jax.jit(
        lambda p, b: decoding.decode_batch(model, p, b, max_decode_length=4).fraction_dropped
    )
    tokens = {"encoder_input_tokens": random_batch()["encoder_input_tokens"]}
    onto_3 = jax.tree.map(
        lambda b: b + jnp.array([0.0, 0.0, 0.0, 1e3]), params[train_state.BIAS_FIELD]
    )
    with jax.set_mesh(mesh), partitioning.axis_rules():
        dropped = float(decode(params, tokens))
        forced = float(decode({**params, train_state.BIAS_FIELD: onto_3}, tokens))
    assert forced == 0.5 and dropped < 0.5, (forced, dropped)


def test_scanned_biases_convert_to_the_unscanned_decoding_layout():
    scanned = dataclasses.replace(
        BIASED, num_encoder_layers=4, moe_layer_interval=2, scan_layers=True
    )
    flat = network.init_abstract(scanned)[train_state.BIAS_FIELD]
    bias = jax.tree.map(
        lambda a: jnp.arange(np.prod(a.shape), dtype=a.dtype).reshape(a.shape), flat
    )
    out = run_builder.unscanned_router_bias(bias, scanned)
    unscanned = dataclasses.replace(scanned, scan_layers=False)
    want = network.init_abstract(unscanned)[train_state.BIAS_FIELD]
    assert jax.tree.structure(out) == jax.tree.structure(want)
    # Encoder blocks 0 and 1 of subblock 1 are layers 1 and 3.
    enc = bias["encoder"]["layers"]["subblock_1"]["mlp"]["expert_bias"]
    np.testing.assert_array_equal(out["encoder"]["layers_3"]["mlp"]["expert_bias"], enc[1])
    np.testing.assert_array_equal(out["encoder"]["layers_1"]["mlp"]["expert_bias"], enc[0])


def test_hf_export_refuses_a_model_with_router_biases():
    with pytest.raises(hf.UnsupportedFeatureError, match=f"router_bias_update_rate={U}") as e:
        hf.hf_config_from_ours(BIASED)
    assert "\n" not in str(e.value)
    assert isinstance(e.value, errors.UserError)
    with pytest.raises(hf.UnsupportedFeatureError, match="router_score='sigmoid'"):
        hf.hf_config_from_ours(dataclasses.replace(SKEWED, router_score="sigmoid"))


def test_a_checkpoint_written_before_the_new_fields_resumes():
    meta = checkpoints.make_meta(BIASED)
    old = {**meta, "model_config": dict(meta["model_config"])}
    for name in ("router_bias_update_rate", "router_score", "router_renormalize_gates"):
        del old["model_config"][name]
    old["model_config"]["sequence_balance_loss_weight"] = 0.0
    # The missing fields had their defaults; turning balancing on is a runtime change.
    checkpoints.check_meta(old, meta, "old")
    with pytest.raises(checkpoints.CheckpointMismatchError, match="router_score"):
        checkpoints.check_meta(
            old, checkpoints.make_meta(dataclasses.replace(BIASED, router_score="sigmoid")), "old"
        )


@pytest.mark.slow
def test_training_run_with_balancing_evaluates_decodes_and_plots(tmp_path):
    """`switch_t5.train.train` with the bias on, on the (2, 2, 2) mesh: eval, decoded samples
    and plots all run with the biases, and the checkpoint holds them."""
    import gin
    import orbax.checkpoint as ocp
    from test_router_control import RUN, RUN_MODEL

    from switch_t5 import train as train_lib
    from switch_t5.config import SwitchConfig

    gin.clear_config()
    d = tmp_path / "model"
    result = train_lib.train(
        model_dir=str(d),
        train_steps=2,
        model_config=SwitchConfig(**RUN_MODEL, router_bias_update_rate=U),
        **{**RUN, "eval_period": 2, "num_samples": 2, "make_plots": True},
    )
    assert result.step == 2 and len(result.samples) == 2 and result.eval_losses
    assert result.plots
    ref = init_checkpoint.find_checkpoint(str(d))
    metadata = ocp.PyTreeCheckpointer().metadata(ref.step_dir / "state")
    tree = getattr(metadata, "item_metadata", metadata)
    assert train_state.BIAS_FIELD in getattr(tree, "tree", tree)
