"""SE_ave / SE_peak / RT_peak on curves whose values are worked out by hand."""

from __future__ import annotations

import numpy as np
import pytest

from rlattr.eval.efficiency import (
    bootstrap_efficiency,
    efficiency,
    levels_between,
    mean_and_band,
    rounds_to_reach,
    seconds_to_reach,
    trailing_mean,
)

BASE = np.array([0.0, 0.25, 0.5, 0.75, 1.0])


def test_rounds_to_reach_counts_rounds_from_one_and_marks_never() -> None:
    m = rounds_to_reach(np.array([0.1, 0.6, 0.4, 0.9]), np.array([0.05, 0.5, 0.6, 0.7, 0.95]))
    assert m.tolist() == [1.0, 2.0, 2.0, 4.0, np.inf]


def test_levels_between_are_evenly_spaced_above_the_start() -> None:
    np.testing.assert_allclose(levels_between(BASE, 4), [0.25, 0.5, 0.75, 1.0])


def test_the_top_level_is_exactly_the_peak() -> None:
    # 0.02 + (0.9 - 0.02) * 20 / 20 is 0.9000000000000001 in floating point.
    base = np.array([0.02, 0.3, 0.9])
    assert 0.02 + (0.9 - 0.02) * np.arange(1, 21)[-1] / 20 > 0.9
    assert levels_between(base, 20)[-1] == 0.9
    eff = efficiency(np.array([0.02, 0.9, 0.9]), base, n_levels=20)
    assert eff.se_peak == pytest.approx(1 - 2 / 3)


def test_efficiency_matches_hand_computation() -> None:
    # levels 0.25, 0.5, 0.75, 1.0: base needs 2, 3, 4, 5 rounds, the method 1, 1, 2, 2.
    eff = efficiency(
        np.array([0.5, 1.0]),
        BASE,
        n_levels=4,
        method_seconds=np.array([2.0, 4.0]),
        base_seconds=np.arange(1.0, 6.0),
    )
    expected = np.mean([1 - 1 / 2, 1 - 1 / 3, 1 - 2 / 4, 1 - 2 / 5])
    assert eff.se_ave == pytest.approx(expected)
    assert eff.se_peak == pytest.approx(0.6)
    assert eff.rt_peak == pytest.approx(1 - 4 / 5)
    assert eff.levels_reached == 1.0


def test_unreached_levels_are_censored_at_the_budget() -> None:
    eff = efficiency(np.array([0.0, 0.3, 0.3]), BASE, n_levels=4)
    assert eff.se_ave == pytest.approx(np.mean([1 - 2 / 2, 1 - 3 / 3, 1 - 3 / 4, 1 - 3 / 5]))
    assert eff.levels_reached == 0.25


def test_same_curve_gives_zero() -> None:
    eff = efficiency(BASE, BASE, n_levels=7, method_seconds=BASE + 1, base_seconds=BASE + 1)
    assert (eff.se_ave, eff.se_peak, eff.rt_peak) == (0.0, 0.0, 0.0)


def test_seconds_to_reach() -> None:
    assert seconds_to_reach(BASE, np.arange(10.0, 15.0), 0.6) == 13.0
    assert seconds_to_reach(BASE, np.arange(10.0, 15.0), 2.0) == np.inf


def test_bootstrap_of_identical_seeds_has_no_spread() -> None:
    method = np.tile([0.5, 1.0, 1.0, 1.0, 1.0], (3, 1))
    base = np.tile(BASE, (4, 1))
    out = bootstrap_efficiency(method, base, n_levels=4, n_boot=50)
    assert out["se_ave"]["value"] == pytest.approx(np.mean([1 - 1 / 2, 1 - 1 / 3, 1 - 2 / 4, 1 - 2 / 5]))
    assert out["se_ave"]["std"] == pytest.approx(0.0)
    assert out["se_ave"]["lo"] == pytest.approx(out["se_ave"]["hi"])
    assert np.isnan(out["rt_peak"]["value"])


def test_bootstrap_value_uses_the_seed_mean_curves() -> None:
    rng = np.random.default_rng(3)
    method, base = rng.random((5, 8)).cumsum(1), rng.random((5, 8)).cumsum(1)
    out = bootstrap_efficiency(method, base, n_levels=5, n_boot=200, seed=1)
    assert out["se_peak"]["value"] == pytest.approx(
        efficiency(method.mean(0), base.mean(0), n_levels=5).se_peak
    )
    assert out["se_peak"]["lo"] <= out["se_peak"]["hi"]


def test_mean_and_band_brackets_the_mean() -> None:
    curves = np.array([[0.0, 1.0], [2.0, 3.0]])
    band = mean_and_band(curves, n_boot=200)
    np.testing.assert_allclose(band[0], [1.0, 2.0])
    assert (band[1] <= band[0]).all() and (band[0] <= band[2]).all()
    assert band[1, 0] >= 0.0 and band[2, 0] <= 2.0


def test_bad_curves_are_rejected() -> None:
    with pytest.raises(ValueError, match="curve"):
        rounds_to_reach(np.array([]), np.array([1.0]))
    with pytest.raises(ValueError, match="n_levels"):
        levels_between(BASE, 0)


def test_paired_bootstrap_keeps_seed_pairs_together() -> None:
    # Seed i of both methods ran under the same machine load: seconds differ by a factor per seed.
    load = np.array([[1.0], [5.0]])
    base_t, method_t = load * np.arange(1.0, 6.0), load * np.arange(1.0, 6.0)
    method = np.tile([0.5, 1.0, 1.0, 1.0, 1.0], (2, 1))
    base = np.tile(BASE, (2, 1))
    kwargs = {"method_seconds": method_t, "base_seconds": base_t, "n_levels": 4, "n_boot": 100}
    out = bootstrap_efficiency(method, base, paired=True, **kwargs)
    # Whatever seeds are drawn, the method reaches the peak at round 2 and the base at round 5.
    assert out["rt_peak"]["std"] == pytest.approx(0.0)
    assert out["rt_peak"]["value"] == pytest.approx(1 - 2 / 5)
    assert bootstrap_efficiency(method, base, **kwargs)["rt_peak"]["std"] > 0.1
    with pytest.raises(ValueError, match="paired"):
        bootstrap_efficiency(method, base[:1], paired=True)


def test_trailing_mean_by_hand_and_in_the_bootstrap() -> None:
    np.testing.assert_allclose(trailing_mean(np.array([1.0, 3.0, 5.0, 0.0]), 2), [1.0, 2.0, 4.0, 2.5])
    np.testing.assert_allclose(trailing_mean(BASE, 1), BASE)
    spike = np.array([0.0, 0.0, 1.0, 0.0, 0.4, 0.6, 0.6, 0.6])  # a one-round spike sets the raw peak
    smooth = bootstrap_efficiency(spike[None], spike[None], n_levels=4, n_boot=5, smooth=3)
    assert smooth["se_ave"]["value"] == 0.0
    with pytest.raises(ValueError, match="window"):
        trailing_mean(BASE, 0)


def test_trailing_mean_of_window_one_is_the_curve_exactly_so_first_passages_do_not_move() -> None:
    # success rates that are exact multiples of 1/200 (FrozenLake's evaluation): a running sum's
    # differences are off by ~1e-15, enough to miss a level the raw curve hits exactly
    curve = np.random.default_rng(0).integers(0, 201, 60) / 200.0
    assert np.array_equal(trailing_mean(curve, 1), curve)
    loop = [np.mean(curve[max(0, r - 4) : r + 1]) for r in range(curve.size)]
    np.testing.assert_allclose(trailing_mean(curve, 5), loop, rtol=0, atol=1e-15)
    # the bootstrap's point value (window 1) equals efficiency() on the same curves, for curves that
    # sit exactly on the levels (a saturating success rate)
    rng = np.random.default_rng(1)
    for _ in range(20):
        base = np.minimum(np.cumsum(rng.integers(0, 30, 40)) / 200.0, 1.0)
        method = np.minimum(np.cumsum(rng.integers(0, 40, 40)) / 200.0, 1.0)
        direct = efficiency(method, base, n_levels=20)
        boot = bootstrap_efficiency(method[None], base[None], n_levels=20, n_boot=2, paired=True)
        assert boot["se_ave"]["value"] == direct.se_ave


def test_level_rounds_censors_by_hand() -> None:
    from rlattr.eval.efficiency import level_rounds

    # levels 0.5 and 1.0 over base [0, 0.5, 1, 1]: base rounds 2 and 3; the method reaches 0.5 at
    # round 1 and never 1.0, censored at its 4 rounds
    m_base, m_method, reached = level_rounds(np.array([0.5, 0.5, 0.5, 0.9]), np.array([0, 0.5, 1, 1.0]), 2)
    assert m_base.tolist() == [2, 3] and m_method.tolist() == [1, 4] and reached.tolist() == [True, False]
