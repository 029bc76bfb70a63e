"""Comparing evaluated artifacts and their ensembles (model_training.compare)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from model_training.compare import (
    aucs_by_benign_diagnosis,
    compare,
    ensemble_score,
    main,
)


def _artifact(folder: Path, ids: list[str], sets: list[str], labels: np.ndarray,
              logits: np.ndarray, temperature: float) -> Path:  # fmt: skip
    """The two files ``evaluate`` leaves in an artifact that ``compare`` reads."""
    folder.mkdir(parents=True)
    pd.DataFrame({"image_id": ids, "dataset": sets, "label": labels, "logit": logits}).to_csv(
        folder / "validation_predictions.csv", index=False
    )
    (folder / "metrics.json").write_text(json.dumps({"calibration": {"temperature": temperature}}))
    return folder


def test_ensemble_divides_each_member_by_its_temperature() -> None:
    score = ensemble_score([np.array([2.0, -4.0]), np.array([30.0, 0.0])], [2.0, 10.0])
    np.testing.assert_allclose(score, [(1.0 + 3.0) / 2, (-2.0 + 0.0) / 2])


def test_independent_errors_average_out(tmp_path: Path) -> None:
    """Two members with independent errors of the same size: their ensemble ranks better."""
    rng = np.random.default_rng(0)
    n = 400
    labels = (np.arange(n) % 2).astype(int)
    signal = labels * 2.0 - 1.0
    noise_a, noise_b = 1.5 * rng.standard_normal((2, n))
    ids = [f"img{i}" for i in range(n)]
    sets = ["a" if i % 4 < 2 else "b" for i in range(n)]
    a = _artifact(tmp_path / "a", ids, sets, labels, signal + noise_a, 1.0)
    # The second member is ten times sharper: without its temperature it would dominate.
    b = _artifact(tmp_path / "b", ids, sets, labels, 10 * (signal + noise_b), 10.0)
    _, table, _ = compare({"A": a, "B": b})
    pooled = table.set_index("members")["pooled"]
    assert list(pooled.index) == ["A", "B", "A + B"]
    assert pooled["A + B"] > max(pooled["A"], pooled["B"]) + 0.02
    assert {"a", "b", "pooled"} <= set(table.columns)


def test_artifacts_scored_on_different_images_are_refused(tmp_path: Path) -> None:
    labels = np.array([0, 1, 0, 1])
    a = _artifact(tmp_path / "a", ["1", "2", "3", "4"], ["s"] * 4, labels, np.arange(4.0), 1.0)
    b = _artifact(tmp_path / "b", ["1", "2", "4", "3"], ["s"] * 4, labels, np.arange(4.0), 1.0)
    with pytest.raises(ValueError, match="different validation images"):
        compare({"A": a, "B": b})


def test_auc_by_benign_diagnosis_isolates_the_hard_class() -> None:
    """Malignant scores sit above nevi but among keratoses: the split shows which is hard."""
    labels = np.array([1, 1, 1, 0, 0, 0, 0])
    diagnoses = np.array(["mel", "mel", "bcc", "nv", "nv", "bkl", "bkl"])
    score = np.array([0.9, 0.6, 0.8, 0.1, 0.2, 0.7, 0.95])
    out = aucs_by_benign_diagnosis(labels, diagnoses, score)
    assert out["nv"] == 1.0
    assert out["bkl"] == pytest.approx(2 / 6)


def test_cli_prints_every_subset(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    labels = np.array([0, 1] * 10)
    ids = [str(i) for i in range(20)]
    arts = [
        _artifact(tmp_path / name, ids, ["s"] * 20, labels, np.linspace(0, 1, 20) + k, 1.0)
        for k, name in enumerate(("x", "y", "z"))
    ]
    assert main(["--artifacts", *map(str, arts), "--max-members", "2"]) == 0
    out = capsys.readouterr().out
    assert "1:x + 2:y" in out and "2:y + 3:z" in out
    assert "1:x + 2:y + 3:z" not in out
