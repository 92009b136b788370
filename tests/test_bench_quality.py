"""Pure functions of scripts/bench_quality.py: smoothing, steps-to-reach, the speedup, overrides,
the routing-variant rows.

No TensorFlow (the script imports it only inside its functions); one test trains tiny populations
for two steps (the bias row's state and eval).
"""

from __future__ import annotations

import importlib.util
import os

import numpy as np
import pytest

_PATH = os.path.join(os.path.dirname(os.path.dirname(__file__)), "scripts", "bench_quality.py")
_spec = importlib.util.spec_from_file_location("bench_quality", _PATH)
bq = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bq)


def test_smooth_is_a_centred_three_point_mean_with_raw_ends():
    y = [4.0, 1.0, 7.0, 1.0, 10.0]
    np.testing.assert_allclose(bq._smooth(y), [4.0, 4.0, 3.0, 6.0, 10.0], rtol=1e-12)
    # Too short to smooth: returned as is.
    np.testing.assert_allclose(bq._smooth([3.0, 2.0]), [3.0, 2.0], rtol=1e-12)


def test_steps_to_reach_interpolates_between_evals():
    steps = [10, 20, 30]
    losses = [5.0, 4.0, 3.0]
    # 3.5 lies halfway between the evals at steps 20 (4.0) and 30 (3.0).
    assert bq.steps_to_reach(steps, losses, 3.5) == pytest.approx(25.0, rel=1e-12)
    # Reached exactly at an eval.
    assert bq.steps_to_reach(steps, losses, 4.0) == pytest.approx(20.0, rel=1e-12)
    # Already below the target at the first eval: that eval's step (no extrapolation to 0).
    assert bq.steps_to_reach(steps, losses, 6.0) == pytest.approx(10.0, rel=1e-12)
    # Never reached.
    assert bq.steps_to_reach(steps, losses, 2.9) is None


def test_steps_to_reach_takes_the_first_crossing():
    # The curve dips below the target, rises above it, and falls again: the first crossing counts.
    steps = [10, 20, 30, 40]
    losses = [5.0, 3.0, 4.5, 2.0]
    assert bq.steps_to_reach(steps, losses, 4.0) == pytest.approx(15.0, rel=1e-12)


def _population(members, curves, steps=(10, 20, 30, 40)):
    return {"members": members, "steps": list(steps), "eval_loss": np.asarray(curves).tolist()}


def test_speedup_uses_seed_means_at_the_given_learning_rates():
    # Dense: two seeds at lr 0.3 (mean 5, 4, 3, 2), and a worse lr 1.0 that must be ignored.
    dense = _population(
        [(0.3, 0), (0.3, 1), (1.0, 0)],
        [[5.5, 4.5, 0.0], [4.5, 3.5, 0.0], [3.5, 2.5, 0.0], [2.5, 1.5, 0.0]],
    )
    # Smoothed dense mean ends at its raw last value 2.0 (the ends are not smoothed).
    switch = _population([(0.3, 0), (0.3, 1)], [[4, 4], [2, 2], [2, 2], [2, 2]])
    # Switch smoothed mean: [4, 8/3, 2, 2]: reaches 2.0 at step 30 -> 40 / 30.
    reach, speedup, final, target = bq._speedup(dense, switch, 0.3, 0.3, 40)
    assert target == pytest.approx(2.0, rel=1e-12)
    assert final == pytest.approx(2.0, rel=1e-12)
    assert reach == pytest.approx(30.0, rel=1e-12)
    assert speedup == pytest.approx(40.0 / 30.0, rel=1e-12)
    # A Switch curve that never reaches the dense final loss gives 0 (printed as 0.0).
    worse = _population([(0.3, 0)], [[6], [5], [4], [3]])
    reach, speedup, _, _ = bq._speedup(dense, worse, 0.3, 0.3, 40)
    assert reach is None and speedup == 0.0


def test_overrides_are_typed_like_the_config_field():
    got = bq._parse_overrides(
        [
            "train_capacity_factor=2",
            "moe_layer_interval=1",
            "batch_prioritized_routing=true",
            "router_z_loss_weight=1e-3",
            "expert_dropout_rate=0.1",
            "encoder_sparse_layers=0,1",
            "dispatch=dropless",
        ]
    )
    assert got == {
        "train_capacity_factor": 2.0,
        "moe_layer_interval": 1,
        "batch_prioritized_routing": True,
        "router_z_loss_weight": 1e-3,
        # Optional fields (default None) are typed by their annotation.
        "expert_dropout_rate": 0.1,
        "encoder_sparse_layers": (0, 1),
        "dispatch": "dropless",
    }
    assert isinstance(got["train_capacity_factor"], float)
    assert isinstance(got["moe_layer_interval"], int)


@pytest.mark.parametrize("bad", ["no_such_field=1", "train_capacity_factor"])
def test_bad_overrides_name_the_fix(bad):
    with pytest.raises(SystemExit, match="KEY=VALUE with KEY a SwitchConfig field"):
        bq._parse_overrides([bad])


def test_speedup_by_horizon_reads_every_shorter_budget():
    dense_steps, dense = [10, 20, 30, 40], [5.0, 4.0, 3.0, 2.5]
    switch_steps, switch = [10, 20, 30, 40], [4.0, 3.0, 2.5, 2.4]
    got = bq.speedup_by_horizon(dense_steps, dense, switch_steps, switch)
    # Dense loss 5.0 at T=10: the Switch model is already below it at its first eval (step 10).
    # 4.0 at T=20: Switch step 10; 3.0 at T=30: step 20; 2.5 at T=40: step 30.
    assert [t for t, _, _ in got] == [10, 20, 30, 40]
    np.testing.assert_allclose([r for _, r, _ in got], [10.0, 10.0, 20.0, 30.0], rtol=1e-12)
    np.testing.assert_allclose([s for _, _, s in got], [1.0, 2.0, 1.5, 40.0 / 30.0], rtol=1e-12)
    # A dense loss the Switch curve never reaches gives (T, None, None).
    assert bq.speedup_by_horizon([10], [2.0], switch_steps, switch) == [(10, None, None)]


def test_variant_rows_are_configs_of_the_same_budget_or_a_skip_note():
    import dataclasses

    from switch_t5.config import SwitchConfig

    fields = {f.name for f in dataclasses.fields(SwitchConfig)}
    base = dict(d_model=64, num_heads=4, head_dim=16, d_ff=256, num_experts=8)
    fine, note = bq.variant_fields("shared_fine_grained", 256, 1e-3, fields)
    assert note is None
    c = SwitchConfig(**{**base, **fine})
    # Active width d_ff (1 shared + 3 routed quarters); routed params those of 8 full experts.
    assert (c.num_shared_experts + c.num_selected_experts) * c.expert_width == 256
    assert c.num_experts * c.expert_width == 8 * 256
    ec, _ = bq.variant_fields("expert_choice_encoder", 256, 1e-3, fields)
    c = SwitchConfig(**{**base, **ec})
    assert c.stack_config("decoder").router_type == "switch"
    # The bias row needs SwitchConfig.router_bias_update_rate; without it, a note, no config.
    got, note = bq.variant_fields("bias_balancing", 256, 1e-3, fields - {bq.BIAS_FIELD})
    assert got == {} and bq.BIAS_FIELD in note
    got, note = bq.variant_fields("bias_balancing", 256, 1e-3, fields | {bq.BIAS_FIELD})
    assert got == {bq.BIAS_FIELD: 1e-3, "load_balancing_loss_weight": 0.0} and note is None
    # Optional int fields (default None) parse as ints.
    assert bq._parse_overrides(["expert_d_ff=64"]) == {"expert_d_ff": 64}


def test_variant_row_reads_the_seeds_and_the_second_half_of_training():
    def pop(curves, share, processed):
        stats = [
            {
                "step": s,
                "max_expert_share": share,
                "processed_share_by_layer": processed,
                "fraction_dropped": [0.1, 0.3],
                "eval_fraction_dropped": [0.05, 0.07],
            }
            for s in (10, 20, 30, 40)
        ]
        members = [(0.3, 0), (0.3, 1)]
        return {**_population(members, curves), "train_stats": stats, "encoder_moe_layers": 1}

    base = pop([[5, 5], [4, 4], [3, 3], [2.5, 2.7]], [1.5, 1.7], [[1.2, 1.4], [1.4, 1.6]])
    ec = pop([[5, 5], [3, 3], [2.5, 2.5], [2.4, 2.4]], [2.0, 2.0], [[1.0, 3.0], [1.0, 3.0]])
    row = bq.variant_row(base, ec, 0.3, 40)
    assert row["eval_ce"] == [2.4, 2.4]
    # Base final (smoothed mean, raw end) 2.6; the variant's smoothed mean [5, 3.5, 7.9 / 3, 2.4]
    # crosses it between steps 30 and 40.
    reach = 30 + 10 * (7.9 / 3 - 2.6) / (7.9 / 3 - 2.4)
    assert row["steps_to_base_final"] == pytest.approx(reach, rel=1e-9)
    assert row["speedup"] == pytest.approx(40 / reach, rel=1e-9)
    assert row["busiest_processed_encoder"] == pytest.approx(1.0)
    assert row["busiest_processed_decoder"] == pytest.approx(3.0)
    assert row["dropped_train"] == pytest.approx(0.2) and row["dropped_eval"] == pytest.approx(0.06)
    assert bq.variant_row(base, base, 0.3, 40)["speedup"] == pytest.approx(1.0)


def _tiny_batches(n, batch=4, inputs=8, targets=4, seed=0):
    """[n, batch, length] features of every model input, random tokens in one segment."""
    from switch_t5.trainer import MODEL_FEATURES

    rng = np.random.default_rng(seed)
    out = {}
    for key in MODEL_FEATURES:
        length = inputs if key.startswith("encoder_") else targets
        if key.endswith("segment_ids"):
            v = np.ones((n, batch, length))
        elif key.endswith("positions"):
            v = np.broadcast_to(np.arange(length), (n, batch, length))
        else:
            v = rng.integers(2, 100, (n, batch, length))
        out[key] = np.asarray(v, np.int32)
    return out


def test_bias_row_trains_with_the_trainers_step_and_evaluates_with_its_biases():
    # Before: the population built its TrainState from "params" only and evaluated
    # `eval_step(params, batch)`, so a model with router_bias_update_rate > 0 failed with
    # "applied without its 'router_bias' variables".
    from tiny import tiny_config

    train, evals = _tiny_batches(2), _tiny_batches(1, seed=1)
    args = ((0.3,), 1, 1, train, evals, 2, 1)

    def eval_loss(rate):
        fields = dict(load_balancing_loss_weight=0.0, group_size=8, router_jitter_noise=0.0)
        config = tiny_config(router_bias_update_rate=rate, **fields)
        return np.asarray(bq._population(config, *args, f"u={rate}")["eval_loss"])

    moved, fixed = eval_loss(0.5), eval_loss(0.0)
    assert np.all(np.isfinite(moved))
    # Step 1 is the same update (the biases start at 0); eval after it routes with the biases
    # the trainer's step moved, so the losses part.
    assert not np.allclose(moved, fixed, rtol=0, atol=1e-6)


def test_dense_population_trains_with_the_models_loss_weights():
    # Before: the script's LossConfig left sequence_balance_loss_weight unset, and the dense
    # model (whose MoE metrics are all zeros) failed with "LossConfig.sequence_balance_loss_weight
    # unset; use loss_config.for_model".
    from tiny import tiny_config

    train, evals = _tiny_batches(2), _tiny_batches(1, seed=1)
    res = bq._population(tiny_config(num_experts=0), (0.3,), 1, 1, train, evals, 2, 2, "dense")
    assert np.all(np.isfinite(res["eval_loss"])) and res["steps"] == [2]
