"""Validation rules of ``evaluate`` and ``operating_point``: the threshold, the tiers and their
out-of-fold check."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import roc_auc_score

from model_training import calibration as cal
from model_training.data import domain_sets
from model_training.evaluate import CANDIDATES, _candidate_name, choose_tiers, decision_scores
from model_training.operating_point import (
    choose_domain_threshold,
    choose_thresholds_per_domain,
    crossfit_folds,
    crossfit_operating_point,
)
from model_training.report import write_model_card


def _validation(n: int = 600, seed: int = 0) -> tuple[pd.DataFrame, np.ndarray, np.ndarray]:
    """Rows of two domains, two images per lesion; the logits are true log-odds times 2."""
    rng = np.random.default_rng(seed)
    lesions = np.repeat(np.arange(n // 2), 2)[:n]
    log_odds = rng.normal(-1.2, 1.5, n)
    y = (rng.random(n) < cal.sigmoid(log_odds)).astype(int)
    domain = np.where(lesions % 5 == 0, "phone", "dermoscopy")
    logits = 2.0 * log_odds
    df = pd.DataFrame(
        {
            "group": [f"lesion:{i}" for i in lesions],
            "domain": domain,
            "dataset": np.where(domain == "phone", "pad-ufes-20", "ham10000"),
        }
    )
    return df, y, logits


def test_domain_threshold_averages_the_domains_sensitivities() -> None:
    """Known answer: 4 dermoscopy and 2 phone positives; the mean must reach 0.75."""
    df = pd.DataFrame({"domain": ["d"] * 6 + ["p"] * 4})
    y = np.array([1, 1, 1, 1, 0, 0, 1, 1, 0, 0])
    p = np.array([0.9, 0.8, 0.7, 0.2, 0.1, 0.3, 0.6, 0.4, 0.05, 0.5])
    threshold, rule = choose_domain_threshold(df, y, p, 0.75)
    # At 0.6: d 3/4, p 1/2 -> 0.625. At 0.4: d 3/4, p 2/2 -> 0.875 (the highest that reaches).
    assert threshold == 0.4
    assert "0.4000" in rule and "d: sensitivity 0.750" in rule


def test_tiers_start_low_below_the_threshold_and_cover_zero_to_one() -> None:
    df, y, logits = _validation()
    p = cal.sigmoid(logits)
    threshold, _ = choose_domain_threshold(df, y, p, 0.9)
    tiers = choose_tiers(y, p, threshold)
    assert [t["name"] for t in tiers] == ["low", "moderate", "high"]
    assert tiers[0]["lower"] == 0.0 and tiers[0]["upper"] == threshold
    assert tiers[-1]["upper"] == 1.0
    fractions = [t["validation"]["malignant_fraction"] for t in tiers]
    assert fractions == sorted(fractions)


def test_crossfit_folds_keep_a_group_together() -> None:
    groups = ["a", "b", "a", "c", "b", "a"] * 10
    fold = crossfit_folds(groups, 5)
    for g in set(groups):
        assert len(set(fold[[i for i, x in enumerate(groups) if x == g]])) == 1
    assert np.array_equal(fold, crossfit_folds(groups, 5))  # deterministic


def test_a_fold_is_answered_without_its_own_images() -> None:
    """Changing one fold's logits moves the other folds' thresholds, never its own."""
    df, y, logits = _validation()
    base = crossfit_operating_point(df, y, logits, 0.0, 0.9)
    fold = crossfit_folds(df["group"].tolist(), 5)
    changed = logits.copy()
    changed[(fold == 0) & (y == 1)] -= 3.0  # fold 0's positives now look benign
    moved = crossfit_operating_point(df, y, changed, 0.0, 0.9)
    assert moved["thresholds"][0] == base["thresholds"][0]
    assert any(m != b for m, b in zip(moved["thresholds"][1:], base["thresholds"][1:], strict=True))
    assert moved["sets"]["pooled"]["sensitivity"] < base["sets"]["pooled"]["sensitivity"]


def test_crossfit_figures_are_near_the_target_and_reach_the_model_card(tmp_path: Path) -> None:
    df, y, logits = _validation(2000, seed=1)
    out = crossfit_operating_point(df, y, logits, 0.0, 0.9)
    assert set(out["sets"]) >= {"ham10000", "pad-ufes-20", "domain:phone", "pooled"}
    pooled = out["sets"]["pooled"]
    assert 0.8 <= pooled["sensitivity"] <= 1.0
    assert 0.0 < pooled["ece"] < 0.08
    card = write_model_card({}, {"crossfit": out}, tmp_path / "card.md").read_text()
    assert "Out of fold (5 folds" in card
    assert f"| pooled | {pooled['sensitivity']:.3f} |" in card


def test_crossfit_with_embeddings_calibrates_per_inferred_domain(tmp_path: Path) -> None:
    """Phone logits that are over-confident 3x: per-domain calibration out of fold fixes
    what one temperature cannot, with the domain read off the embedding (never looked up)."""
    df, y, logits = _validation(2000, seed=2)
    phone = (df["domain"] == "phone").to_numpy()
    logits = np.where(phone, 3.0 * logits + 1.0, logits)
    rng = np.random.default_rng(0)
    emb = rng.normal(0, 1, (len(df), 8))
    emb[:, 0] += np.where(phone, 2.5, -2.5)
    single = crossfit_operating_point(df, y, logits, 0.0, 0.9)
    per = crossfit_operating_point(df, y, logits, 0.0, 0.9, embeddings=emb)
    assert per["calibration"] == "per domain" and single["calibration"] == "single temperature"
    assert per["sets"]["domain:phone"]["domain_accuracy"] > 0.95
    assert per["sets"]["domain:phone"]["ece"] < single["sets"]["domain:phone"]["ece"]
    card = write_model_card({}, {"crossfit": per}, tmp_path / "card.md").read_text()
    assert "per domain" in card and "domain inferred right" in card


def test_thresholds_per_domain_reach_the_target_in_each_inferred_domain() -> None:
    y = np.array([1, 1, 1, 1, 0, 1, 1, 0, 0, 0])
    p = np.array([0.9, 0.8, 0.7, 0.2, 0.1, 0.6, 0.4, 0.05, 0.5, 0.3])
    second = np.array([False] * 5 + [True] * 5)
    got = choose_thresholds_per_domain(y, p, second, ("d", "p"), 0.75)
    # d: positives 0.9, 0.8, 0.7, 0.2 -> the 3rd highest (3/4 = 0.75); p: 0.6, 0.4 -> 0.4.
    assert got == {"d": 0.7, "p": 0.4}
    # A domain without positives takes the other's threshold.
    assert choose_thresholds_per_domain(y[:5], p[:5], second[:5], ("d", "p"), 0.75)["p"] == 0.7


def test_crossfit_thresholds_per_domain_hold_each_domain_out_of_fold() -> None:
    """With a shared threshold the averaged rule lets the phone domain (its calibrated
    probabilities higher: more malignant) carry the average; per-domain thresholds keep
    each domain near the target out of fold, and what the rule saw in fold is recorded."""
    df, y, logits = _validation(3000, seed=4)
    phone = (df["domain"] == "phone").to_numpy()
    logits = np.where(phone, 3.0 * logits + 1.0, logits)
    rng = np.random.default_rng(0)
    emb = np.abs(rng.normal(0, 1, (len(df), 8)))
    emb[:, 0] += np.where(phone, 4.0, 0.0)
    per = crossfit_operating_point(
        df, y, logits, 0.0, 0.9, embeddings=emb, thresholds="per-domain", n_boot=50
    )
    assert per["threshold_kind"] == "per-domain" and len(per["thresholds"]) == 5
    assert set(per["thresholds"][0]) == {"dermoscopy", "phone"}
    for name in ("domain:dermoscopy", "domain:phone"):
        assert per["sets"][name]["sensitivity"] == pytest.approx(0.9, abs=0.05)
        assert "noise_floor" in per["sets"][name]["calibration_report"]
    assert per["mean_domain_sensitivity"] == pytest.approx(0.9, abs=0.03)
    assert all(f["domain_accuracy:phone"] > 0.95 for f in per["in_fold"])
    with pytest.raises(ValueError):
        crossfit_operating_point(df, y, logits, 0.0, 0.9, thresholds="per-domain")


def test_crossfit_measures_the_hard_assignment_and_reports_auc_out_of_fold() -> None:
    """H (hard domain assignment): the same folds, domain classifier and rules as PT; the
    held-out ROC-AUC of each set is reported for both."""
    df, y, logits = _validation(2000, seed=6)
    phone = (df["domain"] == "phone").to_numpy()
    logits = np.where(phone, 3.0 * logits + 1.0, logits)
    rng = np.random.default_rng(1)
    emb = np.abs(rng.normal(0, 1, (len(df), 6)))
    emb[:, 0] += np.where(phone, 1.5, 0.0)  # a domain signal weak enough to mix
    pt = crossfit_operating_point(df, y, logits, 0.0, 0.9, embeddings=emb, thresholds="per-domain")
    h = crossfit_operating_point(
        df, y, logits, 0.0, 0.9, embeddings=emb, thresholds="per-domain", assignment="hard"
    )
    assert h["assignment"] == "hard" and pt["assignment"] == "mixture"
    assert h["calibration"] == "per domain, hard domain assignment"
    for name in ("ham10000", "pad-ufes-20", "pooled"):
        assert 0.5 < h["sets"][name]["roc_auc"] <= 1.0
        assert 0.5 < pt["sets"][name]["roc_auc"] <= 1.0
    # The logits' own ranking, the same whatever the calibration; the pooled answers of the
    # folds' different maps can only match it where the maps happen to agree.
    masks = domain_sets(df)
    for name, sets in h["sets"].items():
        mask = masks[name]
        assert sets["roc_auc_logits"] == pytest.approx(roc_auc_score(y[mask], logits[mask]))
        assert pt["sets"][name]["roc_auc_logits"] == sets["roc_auc_logits"]
    # Same domain classifier and scalings: the domain is read the same way.
    for name in ("domain:dermoscopy", "domain:phone"):
        assert h["sets"][name]["domain_accuracy"] == pt["sets"][name]["domain_accuracy"]
    with pytest.raises(ValueError, match="assignment"):
        crossfit_operating_point(df, y, logits, 0.0, 0.9, embeddings=emb, assignment="soft")


def test_every_candidate_has_a_name_and_the_chosen_one_is_among_them() -> None:
    assert set(CANDIDATES) == {
        "single",
        "per-domain",
        "per-domain, thresholds per domain",
        "per-domain hard, thresholds per domain",
    }
    for name, (per, kind, how) in CANDIDATES.items():
        assert _candidate_name("per-domain" if per else "single", kind, how) == name
    assert _candidate_name("per-domain", "shared", "hard") == "per-domain hard"


def test_model_card_shows_domain_thresholds_candidates_and_calibration_intervals(
    tmp_path: Path,
) -> None:
    df, y, logits = _validation(1000, seed=5)
    phone = (df["domain"] == "phone").to_numpy()
    emb = np.abs(np.random.default_rng(0).normal(0, 1, (len(df), 4)))
    emb[:, 0] += np.where(phone, 4.0, 0.0)
    per = crossfit_operating_point(
        df, y, logits, 0.0, 0.9, embeddings=emb, thresholds="per-domain", n_boot=20
    )
    metrics = {
        "crossfit": per,
        "crossfit_candidates": {"per-domain, thresholds per domain": per},
        "domain_thresholds": {"dermoscopy": 0.0812, "phone": 0.1556},
    }
    card = write_model_card({}, metrics, tmp_path / "card.md").read_text()
    assert "thresholds per inferred domain" in card
    assert "**Thresholds per inferred photo domain**: dermoscopy 0.0812, phone 0.1556" in card
    assert "| per-domain, thresholds per domain |" in card
    assert "ROC-AUC per data set" in card and "ham10000 0." in card
    assert "noise floor" in card and "adaptive ECE" in card


def test_decision_scores_cross_the_threshold_where_each_image_crosses_its_own() -> None:
    rng = np.random.default_rng(3)
    p = np.concatenate([rng.random(500), [0.2, 0.1, 0.3]])
    t_img = np.where(np.arange(p.size) % 3 == 0, 0.2, 0.1)
    t_img[-3:] = [0.2, 0.1, 0.1]  # images exactly at their own threshold
    d = decision_scores(p, t_img, 0.1)
    np.testing.assert_array_equal(d >= 0.1, p >= t_img)
    same = t_img == 0.1
    np.testing.assert_array_equal(d[same], p[same])  # untouched where the threshold is shared
    other = ~same
    assert np.all(np.diff(d[other][np.argsort(p[other])]) >= 0)  # order kept within a domain


def test_tier_counts_follow_each_images_own_threshold() -> None:
    from model_training.evaluate import _recount_tiers

    y = np.array([0, 1, 0, 1, 1])
    p = np.array([0.05, 0.12, 0.12, 0.5, 0.9])
    tiers = choose_tiers(y, p, 0.1)
    _recount_tiers(tiers, y, p, np.array([0.1, 0.1, 0.2, 0.2, 0.2]))
    counts = [t["validation"]["n"] for t in tiers]
    assert sum(counts) == 5
    assert counts[0] == 2  # 0.05 (threshold 0.1) and 0.12 (its own threshold 0.2)
