"""Known-answer tests for model_training.metrics."""

from __future__ import annotations

import math
import time

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from model_training.metrics import (
    age_band,
    auc_by_set,
    binary_metrics,
    bootstrap_ci,
    paired_auc_delta,
    subgroup_metrics,
    weighted_auc,
)


def _synthetic(n: int = 2000, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = rng.binomial(1, 0.2, n)
    z = rng.normal(1.5 * (2 * y - 1), 1.5)
    return y, 1.0 / (1.0 + np.exp(-z))


def test_perfect_separation() -> None:
    y = [0, 0, 0, 1, 1]
    p = [0.1, 0.2, 0.3, 0.8, 0.9]
    m = binary_metrics(y, p, 0.5)
    assert m["roc_auc"] == 1.0
    assert m["average_precision"] == 1.0
    assert m["sensitivity"] == m["specificity"] == m["accuracy"] == 1.0
    assert m["sensitivity_at_specificity"]["0.95"] == 1.0
    assert m["specificity_at_sensitivity"]["0.95"] == 1.0


def test_hand_computed_confusion_matrix() -> None:
    y = [1, 1, 1, 1, 0, 0, 0, 0, 0, 0]
    p = [0.9, 0.6, 0.5, 0.2, 0.7, 0.5, 0.3, 0.2, 0.1, 0.0]
    m = binary_metrics(y, p, 0.5)  # p >= 0.5 is malignant
    assert m["confusion"] == {"tn": 4, "fp": 2, "fn": 1, "tp": 3}
    assert m["n"] == 10
    assert m["n_positive"] == 4
    assert m["prevalence"] == pytest.approx(0.4)
    assert m["sensitivity"] == pytest.approx(3 / 4)
    assert m["specificity"] == pytest.approx(4 / 6)
    assert m["balanced_accuracy"] == pytest.approx((3 / 4 + 4 / 6) / 2)
    assert m["accuracy"] == pytest.approx(7 / 10)
    assert m["ppv"] == pytest.approx(3 / 5)
    assert m["npv"] == pytest.approx(4 / 5)
    assert m["roc_auc"] == pytest.approx(roc_auc_score(y, p))


def test_operating_points_are_conservative() -> None:
    y, p = _synthetic(500, seed=3)
    m = binary_metrics(y, p, 0.5)
    pos, neg = p[y == 1], p[y == 0]
    for key, target in (("0.80", 0.80), ("0.90", 0.90), ("0.95", 0.95)):
        sens = m["sensitivity_at_specificity"][key]
        # Brute force over every threshold: best sensitivity among those reaching the target.
        best = max(np.mean(pos >= t) for t in np.append(p, np.inf) if np.mean(neg < t) >= target)
        assert sens == pytest.approx(best)
    for key, target in (("0.90", 0.90), ("0.95", 0.95)):
        spec = m["specificity_at_sensitivity"][key]
        best = max(np.mean(neg < t) for t in np.append(p, -np.inf) if np.mean(pos >= t) >= target)
        assert spec == pytest.approx(best)


def test_single_class_subset_gives_none_not_crash() -> None:
    m = binary_metrics([0, 0, 0], [0.1, 0.6, 0.2], 0.5)
    assert m["roc_auc"] is None
    assert m["average_precision"] is None
    assert m["sensitivity"] is None
    assert m["specificity"] == pytest.approx(2 / 3)
    assert m["balanced_accuracy"] is None
    assert m["sensitivity_at_specificity"]["0.90"] is None


def test_bad_labels_rejected() -> None:
    with pytest.raises(ValueError):
        binary_metrics([0, 2], [0.1, 0.2], 0.5)
    with pytest.raises(ValueError):
        binary_metrics([0, 1], [0.1, 1.2], 0.5)


def test_weighted_auc_matches_sklearn_with_ties() -> None:
    rng = np.random.default_rng(5)
    p = np.round(rng.random(60), 1)  # many ties
    y = (rng.random(60) < 0.4).astype(int)
    pos, neg = np.sort(p[y == 1]), np.sort(p[y == 0])
    c_pos = rng.integers(0, 3, size=(4, pos.size))
    c_neg = rng.integers(0, 3, size=(4, neg.size))
    c_pos[:, 0] += 1
    c_neg[:, 0] += 1
    got = weighted_auc(pos, neg, c_pos, c_neg)
    for b in range(4):
        scores = np.concatenate([pos, neg])
        labels = np.concatenate([np.ones(pos.size), np.zeros(neg.size)])
        weights = np.concatenate([c_pos[b], c_neg[b]])
        assert got[b] == pytest.approx(roc_auc_score(labels, scores, sample_weight=weights))


def test_bootstrap_ci_is_fast_and_brackets_estimate() -> None:
    y, p = _synthetic(2000)
    start = time.perf_counter()
    ci = bootstrap_ci(y, p, 0.5, n_boot=1000, seed=0)
    assert time.perf_counter() - start < 10
    point = binary_metrics(y, p, 0.5)
    for key in ("roc_auc", "sensitivity", "specificity", "balanced_accuracy"):
        c = ci[key]
        assert c["estimate"] == pytest.approx(point[key])
        assert c["lower"] < c["estimate"] < c["upper"]
        assert 0.0 < c["upper"] - c["lower"] < 0.15
    # Reproducible for a seed, different for another.
    first, again = (bootstrap_ci(y, p, 0.5, n_boot=200, seed=1) for _ in range(2))
    assert first == again
    assert first != bootstrap_ci(y, p, 0.5, n_boot=200, seed=2)


def test_bootstrap_ci_width_shrinks_with_n() -> None:
    y_small, p_small = _synthetic(100, seed=1)
    y_big, p_big = _synthetic(4000, seed=1)
    small = bootstrap_ci(y_small, p_small, 0.5, n_boot=300)["roc_auc"]
    big = bootstrap_ci(y_big, p_big, 0.5, n_boot=300)["roc_auc"]
    assert (small["upper"] - small["lower"]) > 3 * (big["upper"] - big["lower"])


def test_bootstrap_ci_single_class() -> None:
    ci = bootstrap_ci([0, 0, 0, 0], [0.1, 0.2, 0.7, 0.3], 0.5, n_boot=50)
    assert ci["roc_auc"] == {"estimate": None, "lower": None, "upper": None}
    assert ci["sensitivity"]["estimate"] is None
    assert ci["specificity"]["estimate"] == pytest.approx(0.75)


@pytest.mark.parametrize(
    ("age", "band"),
    [
        (0, "<30"),
        (29.9, "<30"),
        (30, "30-44"),
        ("44", "30-44"),
        (45, "45-59"),
        (60, "60-74"),
        (74, "60-74"),
        (75, "75+"),
        (90.0, "75+"),
        (None, "unknown"),
        (math.nan, "unknown"),
        ("", "unknown"),
        ("abc", "unknown"),
        (-3, "unknown"),
        (np.int64(50), "45-59"),
    ],
)
def test_age_band(age: object, band: str) -> None:
    assert age_band(age) == band


def test_subgroup_metrics() -> None:
    y = np.array([1] * 6 + [0] * 10 + [1] * 2 + [0] * 4)
    p = np.array([0.9] * 5 + [0.1] + [0.2] * 9 + [0.8] + [0.7, 0.1] + [0.3] * 4)
    sex = ["female"] * 16 + ["male"] * 6
    site = [None] * 3 + ["back"] * 19
    out = subgroup_metrics(y, p, 0.5, {"sex": sex, "site": site})
    female, male = out["sex"]["female"], out["sex"]["male"]
    assert (female["n"], female["n_positive"]) == (16, 6)
    assert female["sensitivity"] == pytest.approx(5 / 6)
    assert female["specificity"] == pytest.approx(9 / 10)
    assert female["roc_auc"] is not None
    # Only 2 positives: AUC withheld, sensitivity/specificity still reported.
    assert (male["n"], male["n_positive"]) == (6, 2)
    assert male["roc_auc"] is None
    assert male["sensitivity"] == pytest.approx(0.5)
    assert male["specificity"] == pytest.approx(1.0)
    assert list(out["site"]) == ["back", "unknown"]
    assert out["site"]["unknown"]["n"] == 3


def test_subgroup_length_mismatch() -> None:
    with pytest.raises(ValueError):
        subgroup_metrics([0, 1], [0.1, 0.9], 0.5, {"sex": ["f"]})


def test_auc_by_set_scores_each_set_and_skips_one_class_sets() -> None:
    y = [0, 1, 0, 1, 0, 0]
    score = [0.1, 0.9, 0.8, 0.2, 0.3, 0.4]
    out = auc_by_set(y, score, ["a", "a", "b", "b", "c", "c"])
    assert out == {"a": 1.0, "b": 0.0, "c": None}


def test_paired_delta_is_zero_for_the_same_scores_and_positive_for_better_ones() -> None:
    rng = np.random.default_rng(2)
    labels = np.repeat([0, 1], 40)
    base = labels + rng.normal(0, 1.0, labels.size)
    groups = np.arange(labels.size).astype(str)
    same = paired_auc_delta(labels, base, base.copy(), groups, n_boot=200)
    assert same == {"delta": 0.0, "ci_low": 0.0, "ci_high": 0.0}
    better = paired_auc_delta(labels, base, labels + rng.normal(0, 0.2, labels.size), groups)
    assert better["delta"] > 0 and better["ci_low"] > 0
