"""Temperature scaling, calibration error, the decision threshold and the risk tiers.

Pure functions over arrays. Probabilities are malignant-class probabilities; the calibrated
probability is ``sigmoid(logit / temperature)`` (see docs/ARTIFACT.md).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import numpy.typing as npt
from scipy.optimize import minimize_scalar

from model_training.metrics import as_labels, as_probabilities

LOG_T_BOUNDS: tuple[float, float] = (-3.0, 3.0)

LOW_ADVICE = (
    "Lower concern. Keep an eye on this spot: look at it (or photograph it) about once a month. "
    "See a doctor if it changes in size, shape or colour, or shows any ABCDE sign: Asymmetry, "
    "an irregular Border, several Colours, a Diameter over 6 mm, or Evolving (changing, "
    "itching, bleeding). This result is not a diagnosis and does not rule anything out; if you "
    "are worried, see a doctor anyway."
)
MODERATE_ADVICE = (
    "Moderate concern. Have a doctor (a GP or a dermatologist) look at this spot within the next "
    "few weeks. Take a photo now so any change can be compared. This result is not a diagnosis: "
    "only a doctor who examines the skin can say what it is. See a doctor sooner if it changes, "
    "bleeds or grows."
)
HIGH_ADVICE = (
    "Higher concern. Please see a dermatologist promptly, within 1-2 weeks. This result is not a "
    "diagnosis: only a doctor who examines the skin (sometimes with a small biopsy) can say what "
    "it is. Many spots in this group turn out to be harmless, but it should be checked soon."
)


def sigmoid(x: npt.ArrayLike) -> npt.NDArray[np.float64]:
    """Numerically stable logistic function."""
    z = np.asarray(x, dtype=np.float64)
    return np.exp(-np.logaddexp(0.0, -z))


def calibrate(
    logits: npt.ArrayLike, logit_bias: float = 0.0, temperature: float = 1.0
) -> npt.NDArray[np.float64]:
    """The artifact's calibrated probability: sigmoid((logit + logit_bias) / temperature)."""
    return sigmoid((np.asarray(logits, dtype=np.float64) + logit_bias) / temperature)


def _nll(logits: npt.NDArray[np.float64], y: npt.NDArray[np.int64], temperature: float) -> float:
    z = logits / temperature
    # -[y log s(z) + (1 - y) log(1 - s(z))] = softplus(z) - y z
    return float(np.mean(np.logaddexp(0.0, z) - y * z))


def fit_temperature(logits: npt.ArrayLike, y: npt.ArrayLike) -> float:
    """Temperature T > 0 minimising the NLL of ``sigmoid(logit / T)``.

    Bounded scalar search over log T in ``LOG_T_BOUNDS`` (T in about [0.05, 20]).
    """
    labels = as_labels(y)
    z = np.asarray(logits, dtype=np.float64).ravel()
    if z.shape[0] != labels.shape[0] or z.size == 0:
        raise ValueError("logits and labels must be non-empty and of equal length")
    if not np.all(np.isfinite(z)):
        raise ValueError("logits must be finite")
    result = minimize_scalar(
        lambda log_t: _nll(z, labels, math.exp(log_t)),
        bounds=LOG_T_BOUNDS,
        method="bounded",
        options={"xatol": 1e-6},
    )
    return float(math.exp(float(result.x)))


def _bin_index(p: npt.NDArray[np.float64], n_bins: int) -> npt.NDArray[np.int64]:
    if n_bins < 1:
        raise ValueError("n_bins must be >= 1")
    return np.minimum((p * n_bins).astype(np.int64), n_bins - 1)


def reliability_curve(
    y: npt.ArrayLike, p: npt.ArrayLike, n_bins: int = 15
) -> tuple[
    npt.NDArray[np.float64],
    npt.NDArray[np.float64],
    npt.NDArray[np.float64],
    npt.NDArray[np.int64],
]:
    """Equal-width reliability diagram data over [0, 1].

    Returns ``(bin_centers, observed, predicted, counts)``, one entry per bin: observed
    malignant frequency and mean predicted probability (NaN for empty bins) and the count.
    """
    labels = as_labels(y)
    prob = as_probabilities(p, labels.shape[0])
    idx = _bin_index(prob, n_bins)
    counts = np.bincount(idx, minlength=n_bins).astype(np.int64)
    sum_y = np.bincount(idx, weights=labels.astype(np.float64), minlength=n_bins)
    sum_p = np.bincount(idx, weights=prob, minlength=n_bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        observed = np.where(counts > 0, sum_y / np.maximum(counts, 1), np.nan)
        predicted = np.where(counts > 0, sum_p / np.maximum(counts, 1), np.nan)
    centers = (np.arange(n_bins, dtype=np.float64) + 0.5) / n_bins
    return centers, observed, predicted, counts


def expected_calibration_error(y: npt.ArrayLike, p: npt.ArrayLike, n_bins: int = 15) -> float:
    """ECE with equal-width bins: count-weighted mean |observed frequency - mean p| per bin."""
    _, observed, predicted, counts = reliability_curve(y, p, n_bins)
    total = int(counts.sum())
    if total == 0:
        raise ValueError("no samples")
    filled = counts > 0
    return float(np.sum(counts[filled] * np.abs(observed[filled] - predicted[filled])) / total)


def brier_score(y: npt.ArrayLike, p: npt.ArrayLike) -> float:
    """Mean squared error between the malignant probability and the 0/1 label."""
    labels = as_labels(y)
    prob = as_probabilities(p, labels.shape[0])
    if prob.size == 0:
        raise ValueError("no samples")
    return float(np.mean((prob - labels) ** 2))


def choose_threshold(
    y: npt.ArrayLike, p: npt.ArrayLike, target_sensitivity: float = 0.90
) -> tuple[float, str]:
    """Highest threshold whose sensitivity on ``(y, p)`` is >= ``target_sensitivity``.

    A case is labelled malignant when ``p >= threshold``. The threshold is the k-th highest
    malignant probability, k = ceil(target * n_positive). Returns ``(threshold, rule_text)``.
    """
    if not 0 < target_sensitivity <= 1:
        raise ValueError("target_sensitivity must be in (0, 1]")
    labels = as_labels(y)
    prob = as_probabilities(p, labels.shape[0])
    pos = np.sort(prob[labels == 1])[::-1]
    if pos.size == 0:
        raise ValueError("cannot choose a sensitivity threshold without malignant cases")
    k = max(1, math.ceil(target_sensitivity * pos.size - 1e-9))
    threshold = float(pos[k - 1])
    pred = prob >= threshold
    sens = float(np.mean(pred[labels == 1]))
    neg = labels == 0
    spec_text = f", specificity {float(np.mean(~pred[neg])):.3f}" if neg.any() else ""
    rule = (
        f"label malignant when calibrated p >= {threshold:.4f}: the highest threshold whose "
        f"validation sensitivity is >= {target_sensitivity:.2f} (achieved sensitivity "
        f"{sens:.3f}{spec_text}; n = {labels.size}, malignant = {pos.size})"
    )
    return threshold, rule


def choose_risk_tiers(
    y: npt.ArrayLike,
    p: npt.ArrayLike,
    threshold: float,
    low_npv: float = 0.97,
    min_low_edge: float = 1e-6,
) -> list[dict[str, Any]]:
    """Three risk tiers: low ``[0, a)``, moderate ``[a, threshold)``, high ``[threshold, 1]``.

    ``a`` is the highest probability (at most ``threshold``) such that, on ``(y, p)``, the
    malignant fraction among cases with ``p < a`` is <= ``1 - low_npv`` (default: at most 3% of
    "low" cases malignant). If no non-empty low tier meets the target, ``a`` falls back to the
    lowest probability seen (so the low tier holds no validation case), but never below
    ``min_low_edge``; so always 0 < a <= threshold. ``a == threshold`` (an empty moderate tier)
    happens when every case below the threshold meets the target.
    Each tier: name, lower, upper, advice (lay wording), rule, and validation n / n_positive /
    malignant_fraction.
    """
    if not 0 < threshold <= 1:
        raise ValueError("threshold must be in (0, 1]")
    if not 0 < low_npv <= 1:
        raise ValueError("low_npv must be in (0, 1]")
    labels = as_labels(y)
    prob = as_probabilities(p, labels.shape[0])
    max_fraction = 1.0 - low_npv

    # Candidate edges: every distinct probability below the threshold, and the threshold itself.
    # The set {p < a} only changes at these values, so the highest qualifying a is among them.
    candidates = np.unique(np.append(prob[prob < threshold], threshold))
    order = np.sort(prob)
    cum_pos = np.concatenate([[0], np.cumsum(labels[np.argsort(prob, kind="stable")])])
    n_below = np.searchsorted(order, candidates, side="left")
    pos_below = cum_pos[n_below]
    with np.errstate(invalid="ignore", divide="ignore"):
        fraction = np.where(n_below > 0, pos_below / np.maximum(n_below, 1), np.inf)
    ok = (n_below > 0) & (fraction <= max_fraction + 1e-12) & (candidates > 0)
    if ok.any():
        edge = float(candidates[ok].max())
        how = "chosen"
    else:
        lowest = float(order[0]) if order.size else threshold
        edge = min(threshold, max(lowest, min_low_edge))
        how = "fallback: no non-empty low tier met the target on validation"
    edge = min(max(edge, min_low_edge), threshold)

    rule = (
        f"low/moderate edge a = {edge:.4f} ({how}): the highest probability below which at most "
        f"{max_fraction:.1%} of validation cases are malignant (NPV >= {low_npv:.1%}), capped at "
        f"the decision threshold {threshold:.4f}; high tier starts at the threshold"
    )
    tiers: list[dict[str, Any]] = []
    spec = (
        ("low", 0.0, edge, LOW_ADVICE),
        ("moderate", edge, float(threshold), MODERATE_ADVICE),
        ("high", float(threshold), 1.0, HIGH_ADVICE),
    )
    for name, lower, upper, advice in spec:
        mask = prob >= lower if name == "high" else (prob >= lower) & (prob < upper)
        n = int(mask.sum())
        n_pos = int(labels[mask].sum())
        tiers.append(
            {
                "name": name,
                "lower": float(lower),
                "upper": float(upper),
                "advice": advice,
                "rule": rule,
                "validation": {
                    "n": n,
                    "n_positive": n_pos,
                    "malignant_fraction": n_pos / n if n else None,
                },
            }
        )
    return tiers
