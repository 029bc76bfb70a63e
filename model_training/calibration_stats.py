"""Calibration measures that small samples can bear, with their uncertainty.

The project's ECE (15 equal-width bins) is noisy on a domain of 125 photos: most bins hold a
handful of images, and even perfectly calibrated probabilities score well above zero. Beside
it, :func:`calibration_report` gives measures with less variance (ECE over a few equal-mass
bins, the Brier score, the calibration intercept and slope of a logistic recalibration), a
percentile bootstrap interval for each (resampling whole lesions or patients, as the folds
do), and the *noise floor*: the ECE that probabilities scored against labels drawn from
themselves, i.e. perfectly calibrated ones, would get on the same sample.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

from model_training.calibration import brier_score, expected_calibration_error
from model_training.metrics import grouped_resamples

ADAPTIVE_BINS = 5


def adaptive_calibration_error(
    y: npt.ArrayLike, p: npt.ArrayLike, n_bins: int = ADAPTIVE_BINS
) -> float:
    """ECE over ``n_bins`` equal-mass bins (sorted by p): count-weighted |observed - mean p|."""
    labels = np.asarray(y, dtype=np.float64).ravel()
    prob = np.asarray(p, dtype=np.float64).ravel()
    if labels.size == 0 or labels.size != prob.size:
        raise ValueError("y and p must be non-empty and of equal length")
    order = np.argsort(prob, kind="stable")
    total = 0.0
    for chunk in np.array_split(order, min(n_bins, labels.size)):
        total += chunk.size * abs(float(labels[chunk].mean() - prob[chunk].mean()))
    return total / labels.size


def calibration_intercept_slope(y: npt.ArrayLike, p: npt.ArrayLike) -> tuple[float, float]:
    """(a, b) of the logistic recalibration ``P(y=1) = sigmoid(a + b * logit(p))``.

    Perfect calibration is (0, 1); b < 1 means over-confident probabilities (too extreme),
    a > 0 with b = 1 means probabilities too low overall. Fitted by Newton's method; NaN
    when the fit does not converge (labels separable by p, as in a degenerate resample).
    """
    labels = np.asarray(y, dtype=np.float64).ravel()
    prob = np.clip(np.asarray(p, dtype=np.float64).ravel(), 1e-6, 1 - 1e-6)
    if labels.size == 0 or labels.size != prob.size:
        raise ValueError("y and p must be non-empty and of equal length")
    x = np.column_stack([np.ones_like(prob), np.log(prob / (1 - prob))])
    beta = np.array([0.0, 1.0])
    for _ in range(100):
        mu = 1.0 / (1.0 + np.exp(-np.clip(x @ beta, -60, 60)))
        grad = x.T @ (labels - mu)
        hess = (x * (mu * (1 - mu))[:, None]).T @ x + 1e-9 * np.eye(2)
        step = np.linalg.solve(hess, grad)
        beta = beta + step
        if np.max(np.abs(beta)) > 50:
            break
        if np.max(np.abs(step)) < 1e-10:
            return float(beta[0]), float(beta[1])
    return math.nan, math.nan


def _measures(y: np.ndarray, p: np.ndarray) -> dict[str, float]:
    intercept, slope = calibration_intercept_slope(y, p)
    return {
        "ece": expected_calibration_error(y, p),
        "ece_adaptive": adaptive_calibration_error(y, p),
        "brier": brier_score(y, p),
        "intercept": intercept,
        "slope": slope,
        "mean_p_minus_rate": float(np.mean(p) - np.mean(y)),
    }


def calibration_report(
    y: npt.ArrayLike,
    p: npt.ArrayLike,
    groups: Sequence[str] | None = None,
    n_boot: int = 1000,
    seed: int = 0,
    alpha: float = 0.05,
) -> dict[str, Any]:
    """Point estimates and bootstrap intervals of the calibration measures, and the noise floor.

    ``groups`` (lesion or patient ids): resample whole groups, keeping their images together.
    ``noise_floor``: mean and upper quantile of the 15-bin ECE and of the adaptive ECE of these
    same probabilities against labels drawn from them (what perfect calibration would score
    at this n); an observed ECE inside that range cannot be told from perfect calibration.
    Binned ECEs are biased upwards, and more so on resamples (duplicated images), so their
    percentile intervals can sit above the estimate: read them with the noise floor.
    """
    labels = np.asarray(y, dtype=np.int64).ravel()
    prob = np.asarray(p, dtype=np.float64).ravel()
    keys = groups if groups is not None else np.arange(labels.size)
    rng = np.random.default_rng(seed)
    point = _measures(labels, prob)
    samples: dict[str, list[float]] = {k: [] for k in point}
    for rows in grouped_resamples(keys, n_boot, rng):
        if labels[rows].min() == labels[rows].max():
            continue  # one class only: the slope is undefined
        for k, v in _measures(labels[rows], prob[rows]).items():
            samples[k].append(v)
    lo, hi = 100 * alpha / 2, 100 * (1 - alpha / 2)
    out: dict[str, Any] = {"n": int(labels.size), "n_positive": int(labels.sum())}
    for k, v in point.items():
        s = np.asarray(samples[k])
        s = s[np.isfinite(s)]
        lower, upper = np.percentile(s, [lo, hi]) if s.size else (math.nan, math.nan)
        out[k] = {"estimate": v, "lower": float(lower), "upper": float(upper)}
    floor_ece, floor_ace = [], []
    for _ in range(n_boot):
        drawn = (rng.random(prob.size) < prob).astype(np.int64)
        floor_ece.append(expected_calibration_error(drawn, prob))
        floor_ace.append(adaptive_calibration_error(drawn, prob))
    out["noise_floor"] = {
        "ece_mean": float(np.mean(floor_ece)),
        "ece_upper": float(np.percentile(floor_ece, hi)),
        "ece_adaptive_mean": float(np.mean(floor_ace)),
        "ece_adaptive_upper": float(np.percentile(floor_ace, hi)),
    }
    out["method"] = (
        f"percentile bootstrap over {'groups' if groups is not None else 'images'} "
        f"({n_boot} resamples); ece: 15 equal-width bins; ece_adaptive: {ADAPTIVE_BINS} "
        "equal-mass bins; intercept/slope: sigmoid(a + b * logit(p)); noise floor: labels "
        "drawn from p itself"
    )
    return out
