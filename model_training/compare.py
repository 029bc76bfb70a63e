"""Compare evaluated artifacts on validation, alone and as logit ensembles.

Reads each artifact's ``validation_predictions.csv`` and ``metrics.json`` (written by
``evaluate``), so nothing is re-scored. For every subset of the artifacts it prints the
validation ROC-AUC per set and pooled, of the mean of the members' temperature-scaled logits
(each member's logit divided by its own calibration temperature, so a sharp member does not
drown the others). With ``--diagnoses`` it also splits a set's AUC by benign diagnosis
(every malignant image against one benign diagnosis), which shows where a model loses.

    python -m model_training compare --artifacts models/default runs/x/artifact
    python -m model_training.compare --artifacts A B C --diagnoses ham10000

Validation only: this measures what an ensemble or another recipe would buy; the test
splits are never read.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.metrics import roc_auc_score

from model_training.data import read_datasets
from model_training.evaluate import PREDICTIONS_FILE
from model_training.metrics import auc_by_set


def load_predictions(artifact: Path) -> tuple[pd.DataFrame, float]:
    """An artifact's validation predictions and its calibration temperature."""
    preds = pd.read_csv(artifact / PREDICTIONS_FILE, dtype={"image_id": str})
    metrics = json.loads((artifact / "metrics.json").read_text())
    return preds, float(metrics.get("calibration", {}).get("temperature", 1.0))


def aligned(frames: Sequence[pd.DataFrame]) -> pd.DataFrame:
    """The first frame's rows; every other frame must hold the same images in the same order."""
    first = frames[0]
    for other in frames[1:]:
        same = (
            len(other) == len(first)
            and (other["image_id"].to_numpy() == first["image_id"].to_numpy()).all()
        )
        if not same:
            raise ValueError("the artifacts were evaluated on different validation images")
    return first.reset_index(drop=True)


def ensemble_score(logits: Sequence[np.ndarray], temperatures: Sequence[float]) -> np.ndarray:
    """Mean of the members' logits, each divided by its temperature."""
    return np.mean([np.asarray(z) / t for z, t in zip(logits, temperatures, strict=True)], axis=0)


def aucs_by_set(rows: pd.DataFrame, score: np.ndarray) -> dict[str, float]:
    """ROC-AUC per ``dataset`` and pooled (sets with one class are left out)."""
    y = rows["label"].to_numpy()
    per_set = auc_by_set(y, score, rows["dataset"].astype(str).tolist())
    out = {name: auc for name, auc in per_set.items() if auc is not None}
    out["pooled"] = float(roc_auc_score(y, score))
    return out


def aucs_by_benign_diagnosis(
    labels: np.ndarray, diagnoses: np.ndarray, score: np.ndarray
) -> dict[str, float]:
    """AUC of all malignant images against each benign diagnosis in turn."""
    malignant = labels == 1
    out: dict[str, float] = {}
    for dx in sorted(set(diagnoses[~malignant])):
        keep = malignant | (diagnoses == dx)
        out[str(dx)] = float(roc_auc_score(labels[keep], score[keep]))
    return out


def compare(
    artifacts: Mapping[str, Path], max_members: int = 3
) -> tuple[pd.DataFrame, pd.DataFrame, dict[str, np.ndarray]]:
    """(validation rows, AUC table over member subsets, score of each subset)."""
    loaded = {name: load_predictions(path) for name, path in artifacts.items()}
    rows = aligned([frame for frame, _ in loaded.values()])
    table, scores = [], {}
    for r in range(1, min(max_members, len(loaded)) + 1):
        for combo in itertools.combinations(loaded, r):
            score = ensemble_score(
                [loaded[n][0]["logit"].to_numpy() for n in combo], [loaded[n][1] for n in combo]
            )
            key = " + ".join(combo)
            scores[key] = score
            table.append({"members": key, **aucs_by_set(rows, score)})
    return rows, pd.DataFrame(table), scores


def main(argv: Sequence[str] | None = None) -> int:
    """Print the comparison table (and per-diagnosis AUCs with ``--diagnoses``)."""
    parser = argparse.ArgumentParser(prog="python -m model_training compare")
    parser.add_argument("--artifacts", type=Path, nargs="+", required=True)
    parser.add_argument("--max-members", type=int, default=3)
    parser.add_argument("--diagnoses", default="", help="a set to split by benign diagnosis")
    parser.add_argument(
        "--data-dir", type=Path, default=Path(os.environ.get("SHARED_DATA_DIR", "../shared/data"))
    )
    args = parser.parse_args(argv)
    names = [f"{i}:{p.name}" for i, p in enumerate(args.artifacts, 1)]
    rows, table, scores = compare(dict(zip(names, args.artifacts, strict=True)), args.max_members)
    print(table.to_string(index=False, float_format=lambda v: f"{v:.4f}"))
    if args.diagnoses:
        df = read_datasets(args.data_dir, [args.diagnoses])
        dx = df.set_index("image_id")["diagnosis"].astype(str)
        part = rows[rows["dataset"] == args.diagnoses]
        idx = part.index.to_numpy()
        per = {
            key: aucs_by_benign_diagnosis(
                part["label"].to_numpy(), part["image_id"].map(dx).to_numpy(), score[idx]
            )
            for key, score in scores.items()
        }
        print(f"\n{args.diagnoses}: malignant vs. each benign diagnosis")
        print(pd.DataFrame(per).T.to_string(float_format=lambda v: f"{v:.3f}"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
