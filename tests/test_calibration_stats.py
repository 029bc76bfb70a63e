"""Calibration measures for small samples: known answers, intervals and the noise floor."""

from __future__ import annotations

import math

import numpy as np
import pytest

from model_training.calibration_stats import (
    adaptive_calibration_error,
    calibration_intercept_slope,
    calibration_report,
)


def _draw(n: int, seed: int, power: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """Probabilities p and labels drawn from p ** power-scaled log-odds (1: calibrated)."""
    rng = np.random.default_rng(seed)
    z = rng.normal(-0.5, 1.5, n)
    y = (rng.random(n) < 1 / (1 + np.exp(-z))).astype(int)
    return y, 1 / (1 + np.exp(-power * z))


def test_adaptive_ece_known_answer() -> None:
    # Two equal-mass bins: {0.1, 0.2} with labels {0, 1} (|0.5 - 0.15|), {0.8, 0.9} with {1, 1}.
    y = np.array([0, 1, 1, 1])
    p = np.array([0.1, 0.2, 0.8, 0.9])
    assert adaptive_calibration_error(y, p, n_bins=2) == pytest.approx((2 * 0.35 + 2 * 0.15) / 4)
    with pytest.raises(ValueError):
        adaptive_calibration_error([], [])


def test_intercept_and_slope_recover_a_known_miscalibration() -> None:
    y, p = _draw(40000, seed=1)
    a, b = calibration_intercept_slope(y, p)
    assert a == pytest.approx(0.0, abs=0.05) and b == pytest.approx(1.0, abs=0.05)
    y, p = _draw(40000, seed=1, power=2.0)  # over-confident: log-odds doubled
    _, b = calibration_intercept_slope(y, p)
    assert b == pytest.approx(0.5, abs=0.05)
    # Perfectly separable labels: no finite fit.
    assert all(
        math.isnan(v) for v in calibration_intercept_slope([0, 0, 1, 1], [0.1, 0.2, 0.8, 0.9])
    )


def test_report_on_a_small_calibrated_sample_sits_inside_its_noise_floor() -> None:
    """125 calibrated images: the 15-bin ECE is far from 0, yet within what perfect
    calibration scores at that n; the over-confident version is caught by the slope."""
    y, p = _draw(125, seed=3)
    groups = [f"lesion:{i // 2}" for i in range(125)]
    good = calibration_report(y, p, groups, n_boot=300, seed=0)
    assert good["n"] == 125 and good["n_positive"] == int(y.sum())
    assert good["noise_floor"]["ece_mean"] > 0.04  # the binned ECE is biased upwards at this n
    assert good["ece"]["estimate"] < good["noise_floor"]["ece_upper"]
    assert good["slope"]["lower"] < 1.0 < good["slope"]["upper"]
    _, p_bad = _draw(125, seed=3, power=3.0)
    bad = calibration_report(y, p_bad, groups, n_boot=300, seed=0)
    assert bad["slope"]["upper"] < 1.0
    assert bad["brier"]["estimate"] > good["brier"]["estimate"]
    for key in ("ece", "ece_adaptive", "brier", "intercept", "slope"):
        assert good[key]["lower"] <= good[key]["upper"]
