"""Tests for model_training.report: plots, the model card and the ISIC scorer bridge."""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest
from sklearn.metrics import balanced_accuracy_score, roc_auc_score

from model_training.calibration import choose_risk_tiers
from model_training.isic_score import isic_challenge_score
from model_training.metrics import binary_metrics, bootstrap_ci, subgroup_metrics
from model_training.plots import (
    plot_confusion,
    plot_pr,
    plot_reliability,
    plot_roc,
    plot_training_curves,
)
from model_training.report import write_model_card

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _synthetic(n: int = 300, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = rng.binomial(1, 0.25, n)
    p = 1.0 / (1.0 + np.exp(-rng.normal(2 * y - 1, 1.2)))
    return y, p


def _assert_png(path: Path) -> None:
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC
    assert len(data) > 2000


def test_plots_write_pngs(tmp_path: Path) -> None:
    y, p = _synthetic()
    y2, p2 = _synthetic(seed=1)
    curves: dict[str, tuple[npt.ArrayLike, npt.ArrayLike]] = {
        "isic2017": (y, p),
        "ham10000": (y2, p2),
        "single class": ([0, 0], [0.1, 0.2]),
    }
    written = [
        plot_roc(curves, tmp_path / "roc.png"),
        plot_pr(curves, tmp_path / "pr.png"),
        plot_confusion(binary_metrics(y, p, 0.5)["confusion"], tmp_path / "cm.png", "isic2017"),
        plot_reliability(y, p, np.clip(p * 0.9, 0, 1), tmp_path / "sub" / "reliability.png"),
        plot_reliability(y, p, None, tmp_path / "reliability_before.png"),
        plot_training_curves(
            {"loss": [0.7, 0.5, 0.4], "val_loss": [0.8, 0.6], "val_auc": [0.7, 0.8, 0.85]},
            tmp_path / "training.png",
        ),
        plot_training_curves({"lr": [0.1]}, tmp_path / "training_empty.png"),
    ]
    for path in written:
        assert path.parent.is_dir()
        _assert_png(path)


def _card_inputs(tmp_path: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    rng = np.random.default_rng(4)
    y, p = _synthetic(400)
    y_pad, p_pad = _synthetic(60, seed=9)
    threshold = 0.4
    sex = rng.choice(["male", "female"], y_pad.size)
    fitz = rng.choice(["II", "III", "IV"], y_pad.size)
    domains = {
        name: {**binary_metrics(yy, pp, threshold), "ci": bootstrap_ci(yy, pp, threshold, 200)}
        for name, (yy, pp) in {"isic2017": (y, p), "pad-ufes-20": (y_pad, p_pad)}.items()
    }
    metadata = {
        "name": "isic-inceptionv3",
        "version": "1.0.0",
        "architecture": "InceptionV3",
        "labels": ["benign", "malignant"],
        "positive_label": "malignant",
        "temperature": 1.7,
        "threshold": threshold,
        "threshold_rule": "highest threshold with validation sensitivity >= 0.90",
        "training": {"command": "python -m model_training train --data ../shared/data", "seed": 7},
        "weights_source": {"url": "https://example.org/inception_v3_notop.h5", "sha256": "abc"},
    }
    metrics = {
        "domains": domains,
        "calibration": {
            "temperature": 1.7,
            "n_bins": 15,
            "before": {"ece": 0.123, "brier": 0.2},
            "after": {"ece": 0.031, "brier": 0.15},
        },
        "risk_tiers": choose_risk_tiers(y, p, threshold),
        "subgroups": {
            "pad-ufes-20": subgroup_metrics(
                y_pad, p_pad, threshold, {"sex": sex, "fitzpatrick": fitz}
            )
        },
    }
    return metadata, metrics


def test_model_card_sections(tmp_path: Path) -> None:
    metadata, metrics = _card_inputs(tmp_path)
    (tmp_path / "plots").mkdir()
    plot_confusion({"tn": 1, "fp": 2, "fn": 3, "tp": 4}, tmp_path / "plots" / "confusion.png")
    card = write_model_card(metadata, metrics, tmp_path / "MODEL_CARD.md").read_text()
    for heading in (
        "## Intended use",
        "## Out-of-scope use",
        "## Training data and licences",
        "## ImageNet initialisation",
        "## Validation performance",
        "## Calibration",
        "## Decision threshold and risk tiers",
        "## Subgroups",
        "## Known limitations",
        "## How to reproduce",
    ):
        assert heading in card
    assert "Codella" in card and "Tschandl" in card and "Pacheco" in card
    assert "CC BY-NC 4.0" in card and "NON-COMMERCIAL" in card
    assert "https://example.org/inception_v3_notop.h5" in card
    assert "python -m model_training train --data ../shared/data" in card
    isic = metrics["domains"]["isic2017"]
    ci = isic["ci"]["roc_auc"]
    assert f"{isic['roc_auc']:.3f} ({ci['lower']:.3f}-{ci['upper']:.3f})" in card
    assert "| pad-ufes-20 |" in card
    assert "0.123" in card and "0.031" in card
    assert "Fitzpatrick skin type" in card and "| IV |" in card
    assert "Not measured for pad-ufes-20: Age band, Body site." in card
    assert "![confusion](plots/confusion.png)" in card
    assert "dermatologist" in card  # tier advice rendered
    assert "ink" in card and "rulers" in card


def test_model_card_missing_sections_say_not_measured(tmp_path: Path) -> None:
    card = write_model_card({"name": "x"}, {}, tmp_path / "card.md").read_text()
    assert card.count("not measured") >= 6
    assert "## Intended use" in card and "NON-COMMERCIAL" in card


def test_isic_challenge_score_agrees_with_sklearn() -> None:
    pytest.importorskip("isic_challenge_scoring")
    y, p = _synthetic(500)
    ids = [f"ISIC_{i:07d}" for i in range(y.size)]
    # Shuffle ids relative to order: the scorer sorts rows, results must not depend on it.
    order = np.random.default_rng(0).permutation(y.size)
    score = isic_challenge_score(y[order], p[order], [ids[i] for i in order])
    assert score is not None
    assert score["auc"] == pytest.approx(roc_auc_score(y, p))
    assert score["balanced_accuracy"] == pytest.approx(balanced_accuracy_score(y, p > 0.5))
    assert score["sensitivity"] == pytest.approx(np.mean(p[y == 1] > 0.5))
    # Partial AUC over the part of the ROC curve with sensitivity >= 0.80.
    assert 0 < score["auc_sens_80"] < score["auc"]


def test_isic_challenge_score_single_class_and_bad_ids() -> None:
    pytest.importorskip("isic_challenge_scoring")
    assert isic_challenge_score([0, 0], [0.1, 0.2], ["a", "b"]) is None
    with pytest.raises(ValueError):
        isic_challenge_score([0, 1], [0.1, 0.2], ["a", "a"])


def test_isic_challenge_score_missing_package(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setitem(sys.modules, "isic_challenge_scoring", None)
    with caplog.at_level(logging.WARNING):
        assert isic_challenge_score([0, 1], [0.1, 0.9], ["a", "b"]) is None
    assert "isic-challenge-scoring" in caplog.text


def test_card_names_only_the_quality_checks_the_artifact_has() -> None:
    from model_training.card_inputs import section_gates

    old = {"quality": {"min_side": 85.0, "max_brightness": 231.9, "max_clipped_fraction": 0.2}}
    [line] = [x for x in section_gates(old, None) if "Quality gate" in x]
    assert "too small, overexposed;" in line and "black and white" not in line
    new = {
        "quality": {**old["quality"], "min_colourfulness": 10.5},
        "quality_report": {"leave_one_source_out_real_rejected": {"b": 0.0031, "a": 0.0}},
    }
    lines = section_gates(new, None)
    [line] = [x for x in lines if "Quality gate" in x]
    assert "too small, overexposed, in black and white;" in line
    [loso] = [x for x in lines if "Leave-one-source-out (thresholds" in x]
    assert loso.endswith("a 0.00%, b 0.31%.")
