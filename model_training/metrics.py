"""Binary classification metrics, bootstrap confidence intervals and subgroup breakdowns.

Pure functions over arrays (NumPy and scikit-learn only). The positive class is "malignant"
(label 1); a case is called positive when its probability is ``>= threshold``.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import numpy.typing as npt
from sklearn.metrics import average_precision_score, roc_auc_score, roc_curve

SPECIFICITY_TARGETS: tuple[float, ...] = (0.80, 0.90, 0.95)
SENSITIVITY_TARGETS: tuple[float, ...] = (0.90, 0.95)
AGE_BANDS: tuple[str, ...] = ("<30", "30-44", "45-59", "60-74", "75+", "unknown")
UNKNOWN = "unknown"
# Tolerance for "achieves at least the target" comparisons of rates computed as fractions.
_EPS = 1e-9


def as_labels(y_true: npt.ArrayLike) -> npt.NDArray[np.int64]:
    """Return ``y_true`` as a 1-D int array of 0/1 labels; raise ValueError otherwise."""
    y = np.asarray(y_true).ravel()
    if y.dtype == bool:
        return y.astype(np.int64)
    y_float = y.astype(np.float64)
    if not np.all((y_float == 0) | (y_float == 1)):
        raise ValueError("labels must be 0 (benign) or 1 (malignant)")
    return y_float.astype(np.int64)


def as_probabilities(p: npt.ArrayLike, n: int | None = None) -> npt.NDArray[np.float64]:
    """Return ``p`` as a 1-D float array in [0, 1] (of length ``n`` when given)."""
    arr = np.asarray(p, dtype=np.float64).ravel()
    if n is not None and arr.shape[0] != n:
        raise ValueError(f"expected {n} probabilities, got {arr.shape[0]}")
    if not np.all(np.isfinite(arr)) or np.any((arr < 0) | (arr > 1)):
        raise ValueError("probabilities must be finite and within [0, 1]")
    return arr


def _ratio(num: float, den: float) -> float | None:
    return float(num / den) if den > 0 else None


def _key(target: float) -> str:
    return f"{target:.2f}"


def confusion_counts(y_true: npt.ArrayLike, p: npt.ArrayLike, threshold: float) -> dict[str, int]:
    """Confusion matrix ``{tn, fp, fn, tp}`` for the rule "malignant when p >= threshold"."""
    y = as_labels(y_true)
    prob = as_probabilities(p, y.shape[0])
    pred = prob >= threshold
    pos = y == 1
    return {
        "tn": int(np.sum(~pred & ~pos)),
        "fp": int(np.sum(pred & ~pos)),
        "fn": int(np.sum(~pred & pos)),
        "tp": int(np.sum(pred & pos)),
    }


def operating_points(
    y_true: npt.ArrayLike,
    p: npt.ArrayLike,
    specificity_targets: Sequence[float] = SPECIFICITY_TARGETS,
    sensitivity_targets: Sequence[float] = SENSITIVITY_TARGETS,
) -> dict[str, dict[str, float | None]]:
    """Conservative operating points read off the empirical ROC curve.

    ``sensitivity_at_specificity[s]`` is the best sensitivity among thresholds whose
    specificity is actually ``>= s``; ``specificity_at_sensitivity`` likewise. Values are None
    when the set has a single class.
    """
    y = as_labels(y_true)
    prob = as_probabilities(p, y.shape[0])
    sens_at: dict[str, float | None] = {_key(t): None for t in specificity_targets}
    spec_at: dict[str, float | None] = {_key(t): None for t in sensitivity_targets}
    if y.size == 0 or y.min() == y.max():
        return {"sensitivity_at_specificity": sens_at, "specificity_at_sensitivity": spec_at}
    fpr, tpr, _ = roc_curve(y, prob, drop_intermediate=False)
    spec = 1.0 - fpr
    for t in specificity_targets:
        ok = spec >= t - _EPS
        sens_at[_key(t)] = float(tpr[ok].max()) if ok.any() else None
    for t in sensitivity_targets:
        ok = tpr >= t - _EPS
        spec_at[_key(t)] = float(spec[ok].max()) if ok.any() else None
    return {"sensitivity_at_specificity": sens_at, "specificity_at_sensitivity": spec_at}


def binary_metrics(y_true: npt.ArrayLike, p: npt.ArrayLike, threshold: float) -> dict[str, Any]:
    """Threshold and ranking metrics for malignant-vs-benign predictions.

    Returns roc_auc, average_precision (PR-AUC), sensitivity, specificity, balanced_accuracy,
    accuracy, ppv, npv, confusion ``{tn, fp, fn, tp}``, n, n_positive, prevalence, threshold,
    and conservative ``sensitivity_at_specificity`` / ``specificity_at_sensitivity``. A metric
    that is undefined on the data (e.g. AUC on a single-class subset) is None.
    """
    y = as_labels(y_true)
    prob = as_probabilities(p, y.shape[0])
    cm = confusion_counts(y, prob, threshold)
    tn, fp, fn, tp = cm["tn"], cm["fp"], cm["fn"], cm["tp"]
    n = int(y.shape[0])
    n_pos = tp + fn
    both_classes = 0 < n_pos < n
    sensitivity = _ratio(tp, tp + fn)
    specificity = _ratio(tn, tn + fp)
    balanced = (
        (sensitivity + specificity) / 2
        if sensitivity is not None and specificity is not None
        else None
    )
    out: dict[str, Any] = {
        "n": n,
        "n_positive": n_pos,
        "prevalence": _ratio(n_pos, n),
        "threshold": float(threshold),
        "roc_auc": float(roc_auc_score(y, prob)) if both_classes else None,
        "average_precision": float(average_precision_score(y, prob)) if both_classes else None,
        "sensitivity": sensitivity,
        "specificity": specificity,
        "balanced_accuracy": balanced,
        "accuracy": _ratio(tp + tn, n),
        "ppv": _ratio(tp, tp + fp),
        "npv": _ratio(tn, tn + fn),
        "confusion": cm,
    }
    out.update(operating_points(y, prob))
    return out


def grouped_resamples(
    groups: npt.ArrayLike, n_boot: int, rng: np.random.Generator
) -> Iterator[npt.NDArray[np.int64]]:
    """Row indices of ``n_boot`` bootstrap resamples that draw whole groups (a lesion's or
    patient's images together) with replacement, as many groups as there are."""
    _, codes = np.unique(np.asarray(groups).astype(str), return_inverse=True)
    members = [np.flatnonzero(codes == g) for g in range(int(codes.max()) + 1)]
    for _ in range(n_boot):
        yield np.concatenate([members[g] for g in rng.integers(0, len(members), len(members))])


def paired_auc_delta(
    labels: npt.NDArray[np.int64],
    base: npt.NDArray[np.float64],
    new: npt.NDArray[np.float64],
    groups: npt.ArrayLike,
    n_boot: int = 1000,
    seed: int = 0,
) -> dict[str, float]:
    """ROC-AUC of ``new`` minus ``base`` on the same images, with a 95% bootstrap interval
    over resampled groups (a lesion's or patient's images move together)."""
    labels = np.asarray(labels)
    deltas = []
    for rows in grouped_resamples(groups, n_boot, np.random.default_rng(seed)):
        if 0 < labels[rows].sum() < len(rows):
            y = labels[rows]
            deltas.append(roc_auc_score(y, new[rows]) - roc_auc_score(y, base[rows]))
    low, high = np.percentile(deltas, [2.5, 97.5])
    delta = roc_auc_score(labels, new) - roc_auc_score(labels, base)
    return {
        "delta": round(float(delta), 4),
        "ci_low": round(float(low), 4),
        "ci_high": round(float(high), 4),
    }


def _resample_counts(rng: np.random.Generator, size: int, n_boot: int) -> npt.NDArray[np.int64]:
    """``(n_boot, size)`` multiplicities of a with-replacement resample of ``size`` items."""
    if size == 0:
        return np.zeros((n_boot, 0), dtype=np.int64)
    draws = rng.integers(0, size, size=(n_boot, size))
    flat = draws + (np.arange(n_boot)[:, None] * size)
    return np.bincount(flat.ravel(), minlength=n_boot * size).reshape(n_boot, size)


def weighted_auc(
    pos: npt.NDArray[np.float64],
    neg: npt.NDArray[np.float64],
    pos_counts: npt.NDArray[np.int64],
    neg_counts: npt.NDArray[np.int64],
) -> npt.NDArray[np.float64]:
    """Mann-Whitney AUC of many resamples at once, ties counting one half.

    ``pos`` and ``neg`` are sorted scores; ``pos_counts`` ``(B, n_pos)`` and ``neg_counts``
    ``(B, n_neg)`` give each item's multiplicity in each of B resamples (each row non-empty).
    """
    n_boot = neg_counts.shape[0]
    zero = np.zeros((n_boot, 1), dtype=np.int64)
    cum = np.concatenate([zero, np.cumsum(neg_counts, axis=1)], axis=1)
    lo = np.searchsorted(neg, pos, side="left")
    hi = np.searchsorted(neg, pos, side="right")
    # For each positive: resampled negatives strictly below it, plus half of those tied with it.
    wins = cum[:, lo] + 0.5 * (cum[:, hi] - cum[:, lo])
    total = pos_counts.sum(axis=1) * neg_counts.sum(axis=1)
    return np.asarray(np.sum(pos_counts * wins, axis=1) / total, dtype=np.float64)


def _interval(
    estimate: float | None, samples: npt.NDArray[np.float64] | None, alpha: float
) -> dict[str, float | None]:
    if estimate is None or samples is None:
        return {"estimate": None, "lower": None, "upper": None}
    lower, upper = np.percentile(samples, [100 * alpha / 2, 100 * (1 - alpha / 2)])
    return {"estimate": float(estimate), "lower": float(lower), "upper": float(upper)}


def bootstrap_ci(
    y_true: npt.ArrayLike,
    p: npt.ArrayLike,
    threshold: float,
    n_boot: int = 1000,
    seed: int = 0,
    alpha: float = 0.05,
) -> dict[str, Any]:
    """Stratified percentile-bootstrap CIs for roc_auc, sensitivity, specificity and
    balanced_accuracy.

    Positives and negatives are resampled separately (keeping their counts), so every
    resample has both classes. Returns ``{metric: {"estimate", "lower", "upper"}}`` plus
    ``n_boot``, ``alpha``, ``seed`` and ``method``; a metric undefined on the data is all None.
    """
    if n_boot < 1:
        raise ValueError("n_boot must be >= 1")
    if not 0 < alpha < 1:
        raise ValueError("alpha must be in (0, 1)")
    y = as_labels(y_true)
    prob = as_probabilities(p, y.shape[0])
    rng = np.random.default_rng(seed)
    pos = np.sort(prob[y == 1])
    neg = np.sort(prob[y == 0])
    n_pos, n_neg = pos.shape[0], neg.shape[0]
    c_pos = _resample_counts(rng, n_pos, n_boot)
    c_neg = _resample_counts(rng, n_neg, n_boot)

    sens_s = spec_s = auc_s = None
    point = binary_metrics(y, prob, threshold)
    if n_pos:
        sens_s = (c_pos @ (pos >= threshold).astype(np.float64)) / n_pos
    if n_neg:
        spec_s = (c_neg @ (neg < threshold).astype(np.float64)) / n_neg
    if n_pos and n_neg:
        auc_s = weighted_auc(pos, neg, c_pos, c_neg)
    bal_s = (sens_s + spec_s) / 2 if sens_s is not None and spec_s is not None else None
    return {
        "roc_auc": _interval(point["roc_auc"], auc_s, alpha),
        "sensitivity": _interval(point["sensitivity"], sens_s, alpha),
        "specificity": _interval(point["specificity"], spec_s, alpha),
        "balanced_accuracy": _interval(point["balanced_accuracy"], bal_s, alpha),
        "n_boot": int(n_boot),
        "alpha": float(alpha),
        "seed": int(seed),
        "method": "stratified percentile bootstrap",
    }


def age_band(age: object) -> str:
    """Age band label: "<30", "30-44", "45-59", "60-74", "75+" or "unknown"."""
    if isinstance(age, str):
        try:
            value = float(age.strip())
        except ValueError:
            return UNKNOWN
    elif isinstance(age, int | float | np.integer | np.floating) and not isinstance(age, bool):
        value = float(age)
    else:
        return UNKNOWN
    if not math.isfinite(value) or value < 0 or value > 120:
        return UNKNOWN
    if value < 30:
        return "<30"
    if value < 45:
        return "30-44"
    if value < 60:
        return "45-59"
    if value < 75:
        return "60-74"
    return "75+"


def _group_label(value: object) -> str:
    """String label of a grouping value; missing values (None, NaN, "") become "unknown"."""
    if value is None:
        return UNKNOWN
    if isinstance(value, float | np.floating) and not np.isfinite(value):
        return UNKNOWN
    if isinstance(value, float | np.floating) and float(value).is_integer():
        return str(int(value))
    text = str(value).strip()
    missing = {"nan", "none", "unknown", "<na>", "nat"}
    return text if text and text.lower() not in missing else UNKNOWN


def _label_sort_key(label: str) -> tuple[int, float, str]:
    if label == UNKNOWN:
        return (3, 0.0, label)
    if label in AGE_BANDS:
        return (0, float(AGE_BANDS.index(label)), label)
    try:
        return (1, float(label), label)
    except ValueError:
        return (2, 0.0, label)


def subgroup_metrics(
    y_true: npt.ArrayLike,
    p: npt.ArrayLike,
    threshold: float,
    groups: Mapping[str, Sequence[Any] | npt.ArrayLike],
    min_positives: int = 5,
    min_negatives: int = 5,
) -> dict[str, dict[str, dict[str, Any]]]:
    """Metrics per value of each grouping column: ``{column: {value: binary_metrics}}``.

    Missing values are grouped as "unknown". Ranking metrics (roc_auc, average_precision and
    the ROC operating points) are left None where a group has fewer than ``min_positives``
    positives or ``min_negatives`` negatives; sensitivity/specificity are still reported.
    """
    y = as_labels(y_true)
    prob = as_probabilities(p, y.shape[0])
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for column, values in groups.items():
        raw = list(np.asarray(values, dtype=object).ravel())
        if len(raw) != y.shape[0]:
            raise ValueError(f"group {column!r} has {len(raw)} values for {y.shape[0]} labels")
        labels = np.array([_group_label(v) for v in raw], dtype=object)
        per_value: dict[str, dict[str, Any]] = {}
        for label in sorted(set(labels.tolist()), key=_label_sort_key):
            mask = labels == label
            m = binary_metrics(y[mask], prob[mask], threshold)
            n_neg = m["n"] - m["n_positive"]
            if m["n_positive"] < min_positives or n_neg < min_negatives:
                m["roc_auc"] = None
                m["average_precision"] = None
                for section in ("sensitivity_at_specificity", "specificity_at_sensitivity"):
                    m[section] = dict.fromkeys(m[section])
            per_value[label] = m
        out[column] = per_value
    return out


def roc_auc(y_true: npt.ArrayLike, score: npt.ArrayLike) -> float | None:
    """ROC-AUC of any score (logits too); None when only one class is present."""
    y = np.asarray(y_true)
    return float(roc_auc_score(y, np.asarray(score))) if 0 < int(y.sum()) < y.size else None


def auc_by_set(
    y_true: npt.ArrayLike, score: npt.ArrayLike, sets: Sequence[str]
) -> dict[str, float | None]:
    """ROC-AUC within each set named in ``sets`` (None where a set has one class only)."""
    y, s, names = np.asarray(y_true), np.asarray(score), np.asarray(sets)
    return {str(n): roc_auc(y[names == n], s[names == n]) for n in sorted(set(names.tolist()))}
