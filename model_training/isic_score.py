"""The ISIC Challenge's own scorer on this project's predictions (``isic-challenge-scoring``)."""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy.typing as npt

from model_training.metrics import as_labels, as_probabilities
from model_training.plots import has_both_classes

logger = logging.getLogger(__name__)

CATEGORIES: tuple[str, str] = ("benign", "malignant")


def isic_challenge_score(
    y_true: npt.ArrayLike, p: npt.ArrayLike, image_ids: Sequence[str]
) -> dict[str, Any] | None:
    """Score malignant probabilities with the ISIC Challenge's own scorer.

    Builds a 2-category (benign, malignant) ground-truth CSV and prediction CSV (benign = 1 - p)
    and scores them with ``isic_challenge_scoring.ClassificationScore``. Returns the malignant
    category's figures (auc, auc_sens_80, average_precision, sensitivity, specificity, accuracy,
    ppv, npv, dice) and the scorer's aggregate balanced_accuracy, as plain floats. Its
    thresholded figures use the scorer's fixed cut (argmax, i.e. p > 0.5). Returns None with a
    logged warning if the package is not importable or the set has a single class.
    """
    try:
        import isic_challenge_scoring as ics
        from isic_challenge_scoring import ClassificationMetric, ClassificationScore
        from isic_challenge_scoring.load_csv import sort_rows, validate_rows
    except ImportError:
        logger.warning("isic-challenge-scoring is not installed; ISIC Challenge score skipped")
        return None
    import pandas as pd

    y = as_labels(y_true)
    prob = as_probabilities(p, y.size)
    ids = [str(i) for i in image_ids]
    if len(ids) != y.size:
        raise ValueError(f"{len(ids)} image ids for {y.size} labels")
    if len(set(ids)) != len(ids):
        raise ValueError("image ids must be unique")
    if not has_both_classes(y):
        logger.warning("ISIC Challenge score skipped: the set has a single class")
        return None

    benign, malignant = CATEGORIES
    truth = pd.DataFrame({"image": ids, benign: 1.0 - y, malignant: y.astype(float)})
    pred = pd.DataFrame({"image": ids, benign: 1.0 - prob, malignant: prob})
    metric = ClassificationMetric.AUC
    with tempfile.TemporaryDirectory() as tmp:
        truth_csv, pred_csv = Path(tmp) / "truth.csv", Path(tmp) / "prediction.csv"
        truth.to_csv(truth_csv, index=False)
        pred.to_csv(pred_csv, index=False)
        try:
            score = ClassificationScore.from_file(truth_csv, pred_csv, metric)
            route = "csv"
        except AttributeError:
            # isic-challenge-scoring <= 5.6 validates prediction CSVs with DataFrame.applymap,
            # which pandas 3 removed: score the same tables through the scorer's own class.
            truth_probs = truth.set_index("image")
            pred_probs = pred.set_index("image").reindex(truth_probs.columns, axis="columns")
            weights = pd.DataFrame(
                {"score_weight": 1.0, "validation_weight": 1.0}, index=truth_probs.index
            )
            validate_rows(truth_probs, pred_probs)
            sort_rows(truth_probs)
            sort_rows(pred_probs)
            weights = weights.reindex(truth_probs.index)
            score = ClassificationScore(truth_probs, pred_probs, weights, metric)
            route = "dataframe"

    row = score.per_category.loc[malignant]
    result: dict[str, Any] = {
        key: float(row[src])
        for key, src in (
            ("auc", "auc"),
            ("auc_sens_80", "auc_sens_80"),
            ("average_precision", "ap"),
            ("sensitivity", "sensitivity"),
            ("specificity", "specificity"),
            ("accuracy", "accuracy"),
            ("ppv", "ppv"),
            ("npv", "npv"),
            ("dice", "dice"),
        )
    }
    result["balanced_accuracy"] = float(score.aggregate["balanced_accuracy"])
    result["overall"] = float(score.overall)
    result["decision_rule"] = "scorer's argmax over (benign = 1 - p, malignant = p): p > 0.5"
    result["n"] = int(y.size)
    result["n_positive"] = int(y.sum())
    result["scorer_version"] = str(getattr(ics, "__version__", "unknown"))
    result["route"] = route
    return result
