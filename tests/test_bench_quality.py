"""Pure functions of scripts/bench_quality.py: smoothing, steps-to-reach, the speedup, overrides.

No training and no TensorFlow: the script imports both only inside its functions.
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
