"""Known-answer tests for model_training.calibration."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from model_training.calibration import (
    brier_score,
    choose_risk_tiers,
    choose_threshold,
    expected_calibration_error,
    fit_temperature,
    reliability_curve,
    sigmoid,
)


def _logits(t0: float, n: int = 20000, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    z = rng.normal(0.0, 4.0, n)
    y = rng.binomial(1, sigmoid(z / t0))
    return z, y


@pytest.mark.parametrize("t0", [0.5, 1.0, 2.5])
def test_fit_temperature_recovers_known_t(t0: float) -> None:
    z, y = _logits(t0)
    assert fit_temperature(z, y) == pytest.approx(t0, rel=0.1)


def test_fit_temperature_is_bounded() -> None:
    # Perfectly separable logits push T to its lower bound, not to 0.
    t = fit_temperature([-5.0, -3.0, 3.0, 5.0], [0, 0, 1, 1])
    assert np.exp(-3.0) * 0.99 <= t <= np.exp(-3.0) * 1.1


def test_ece_calibrated_near_zero_miscalibrated_high() -> None:
    rng = np.random.default_rng(1)
    p = rng.random(50000)
    y = rng.binomial(1, p)
    assert expected_calibration_error(y, p) < 0.02
    # Overconfident: the true rate is p, the reported probability is pushed to the extremes.
    p_bad = np.clip(0.5 + 1.8 * (p - 0.5), 0.0, 1.0)
    # Expected ECE here is about 0.11 (|p_bad - p| averaged over the bins).
    assert expected_calibration_error(y, p_bad) > 0.08


def test_ece_known_answer() -> None:
    # Two bins of 15: [0, 1/15) holds p=0.0 (y=1), [14/15, 1] holds p=1.0 (y=1).
    assert expected_calibration_error([1, 1], [0.0, 1.0]) == pytest.approx(0.5)
    assert expected_calibration_error([0, 1, 0, 1], [0.5, 0.5, 0.5, 0.5]) == pytest.approx(0.0)


def test_brier_known_answer() -> None:
    assert brier_score([1, 0], [0.8, 0.4]) == pytest.approx((0.04 + 0.16) / 2)


def test_reliability_curve_shapes() -> None:
    centers, observed, predicted, counts = reliability_curve(
        [0, 1, 1, 0], [0.05, 0.15, 0.95, 1.0], n_bins=10
    )
    assert centers.shape == observed.shape == predicted.shape == counts.shape == (10,)
    assert centers[0] == pytest.approx(0.05)
    assert counts.tolist() == [1, 1, 0, 0, 0, 0, 0, 0, 0, 2]
    assert np.isnan(observed[2])
    assert observed[9] == pytest.approx(0.5)
    assert predicted[9] == pytest.approx(0.975)


def test_choose_threshold_is_highest_meeting_target() -> None:
    rng = np.random.default_rng(2)
    y = rng.binomial(1, 0.3, 1000)
    p = np.clip(rng.normal(0.3 + 0.3 * y, 0.15), 0, 1)
    t, rule = choose_threshold(y, p, 0.90)
    sens = np.mean(p[y == 1] >= t)
    assert sens >= 0.90
    # Any higher threshold loses the target.
    higher = np.min(p[p > t])
    assert np.mean(p[y == 1] >= higher) < 0.90
    assert ">=" in rule and "0.90" in rule


def test_choose_threshold_small_known_answer() -> None:
    y = [1, 1, 1, 1, 0, 0]
    p = [0.9, 0.8, 0.4, 0.2, 0.3, 0.1]
    assert choose_threshold(y, p, 0.75)[0] == pytest.approx(0.4)
    assert choose_threshold(y, p, 0.76)[0] == pytest.approx(0.2)
    with pytest.raises(ValueError):
        choose_threshold([0, 0], [0.1, 0.2])


def test_risk_tiers_ordered_and_meet_target() -> None:
    rng = np.random.default_rng(3)
    y = rng.binomial(1, 0.2, 3000)
    p = sigmoid(rng.normal(2.0 * (2 * y - 1), 1.5))
    threshold, _ = choose_threshold(y, p, 0.90)
    tiers = choose_risk_tiers(y, p, threshold, low_npv=0.99)
    assert [t["name"] for t in tiers] == ["low", "moderate", "high"]
    assert tiers[0]["lower"] == 0.0 and tiers[-1]["upper"] == 1.0
    for lower_tier, upper_tier in itertools.pairwise(tiers):
        assert lower_tier["upper"] == upper_tier["lower"]
    a_edge = tiers[0]["upper"]
    assert 0 < a_edge <= threshold
    assert all(0 <= t["lower"] <= t["upper"] <= 1 for t in tiers)
    low = p < a_edge
    assert low.sum() > 0
    assert y[low].mean() <= 0.01
    # The edge is the highest one: every higher edge up to the threshold breaks the target.
    higher = [c for c in np.unique(np.append(p, threshold)) if a_edge < c <= threshold]
    assert higher
    assert all(y[p < c].mean() > 0.01 for c in higher)
    assert tiers[0]["validation"]["malignant_fraction"] <= 0.01
    assert tiers[1]["validation"]["n"] > 0
    assert "1.0%" in tiers[0]["rule"]
    for tier in tiers:
        advice = tier["advice"].lower()
        assert "cancer" not in advice and "benign" not in advice and "malignant" not in advice
        assert "not a diagnosis" in advice
    assert "month" in tiers[0]["advice"] and "ABCDE" in tiers[0]["advice"]
    assert "few weeks" in tiers[1]["advice"]
    assert "dermatologist" in tiers[2]["advice"] and "1-2 weeks" in tiers[2]["advice"]


def test_risk_tiers_edge_can_reach_threshold() -> None:
    # Everything below the threshold is benign: the low tier runs up to the threshold.
    tiers = choose_risk_tiers([0, 0, 0, 1, 1], [0.1, 0.2, 0.3, 0.6, 0.9], 0.5)
    assert tiers[0]["upper"] == pytest.approx(0.5)
    assert tiers[1]["validation"]["n"] == 0
    assert tiers[2]["validation"] == {"n": 2, "n_positive": 2, "malignant_fraction": 1.0}


def test_risk_tiers_fallback_keeps_edge_positive() -> None:
    # The lowest-scoring case is malignant: no non-empty low tier meets 3%.
    tiers = choose_risk_tiers([1, 0, 1, 0], [0.05, 0.2, 0.6, 0.7], 0.5)
    a_edge = tiers[0]["upper"]
    assert a_edge == pytest.approx(0.05)
    assert tiers[0]["validation"]["n"] == 0
    assert "fallback" in tiers[0]["rule"]
    assert tiers[1]["lower"] == a_edge and tiers[2]["lower"] == 0.5
    # A probability of exactly 0 cannot be excluded: the edge stays at the positive floor.
    floor = choose_risk_tiers([1, 0, 1, 0], [0.0, 0.2, 0.6, 0.7], 0.5)[0]["upper"]
    assert 0 < floor <= 1e-6
    with pytest.raises(ValueError):
        choose_risk_tiers([1, 0], [0.1, 0.2], 0.0)
