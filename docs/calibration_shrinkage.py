"""Would shrinking the phone photos' Platt scaling help, out of fold? (docs/calibration.md)

The phone scaling (bias, log T) is fitted on about 100 photos per fold. Here it is fitted with
a Gaussian prior, strength ``lam``, centred on no change (bias 0, T 1) or on the dermoscopy
scaling of the same fold; dermoscopy keeps its plain fit. The domain is the true one (it is
read right for 100% of held-out phone photos). Lesion- or patient-grouped folds as in
``evaluate``; ``nested`` picks ``lam`` inside each fold's fitting photos (4 inner folds,
negative log-likelihood), the only honest way to choose it.

    .venv/bin/python docs/calibration_shrinkage.py --artifact models/default \
        --data-dir ../shared/data
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import numpy as np
import pandas as pd
from scipy.optimize import minimize

from model_training import calibration as cal
from model_training.data import group_bucket, read_datasets
from model_training.domain_calibration import fit_platt
from model_training.metrics import roc_auc
from model_training.operating_point import crossfit_folds

LAMS = (0.0, 1.0, 3.0, 10.0, 30.0, 100.0, 1000.0)
Prior = tuple[float, float]  # (bias, log T)


def fit_shrunk(z: np.ndarray, y: np.ndarray, prior: Prior, lam: float) -> tuple[float, float]:
    """(bias, T) minimising the summed NLL plus lam * squared distance from the prior."""
    if lam == 0:
        return fit_platt(z, y)

    def loss(p: np.ndarray) -> float:
        u = (z + p[0]) / math.exp(p[1])
        nll = float(np.sum(np.logaddexp(0.0, u) - y * u))
        return nll + lam * float((p[0] - prior[0]) ** 2 + (p[1] - prior[1]) ** 2)

    r = minimize(loss, np.asarray(prior), method="L-BFGS-B", bounds=[(-10, 10), (-3, 3)])
    return float(r.x[0]), math.exp(float(r.x[1]))


def scale(z: np.ndarray, bias: float, t: float) -> np.ndarray:
    return np.asarray(1.0 / (1.0 + np.exp(-(z + bias) / t)))


def nll(y: np.ndarray, p: np.ndarray) -> float:
    return float(-np.mean(y * np.log(p) + (1 - y) * np.log(1 - p)))


def main() -> None:
    a = argparse.ArgumentParser(description=__doc__)
    a.add_argument("--artifact", type=Path, default=Path("models/default"))
    a.add_argument("--data-dir", type=Path, default=Path("../shared/data"))
    args = a.parse_args()
    df = read_datasets(args.data_dir)
    val = df[df["split"] == "valid"].copy()
    val["image_id"] = val["path"].map(lambda p: Path(p).stem)
    pred = pd.read_csv(args.artifact / "validation_predictions.csv")
    m = pred.merge(val[["image_id", "dataset", "group"]], on=["image_id", "dataset"])
    if len(m) != len(pred):
        raise SystemExit("validation_predictions.csv does not match the validation split")
    y, z, dom = m["label"].to_numpy(float), m["logit"].to_numpy(), m["domain"].to_numpy()
    groups = m["group"].astype(str).to_numpy()
    fold = crossfit_folds(groups.tolist(), 5)
    phone = dom == "phone"

    def prior_of(kind: str, fit: np.ndarray) -> Prior:
        if kind == "identity":
            return (0.0, 0.0)
        b, t = fit_platt(z[fit & ~phone], y[fit & ~phone])
        return (b, math.log(t))

    def held_out(kind: str, lam_of_fold: list[float]) -> np.ndarray:
        p = np.zeros(len(y))
        for k in range(5):
            held, fit = fold == k, fold != k
            b, t = fit_platt(z[fit & ~phone], y[fit & ~phone])
            p[held & ~phone] = scale(z[held & ~phone], b, t)
            b, t = fit_shrunk(z[fit & phone], y[fit & phone], prior_of(kind, fit), lam_of_fold[k])
            p[held & phone] = scale(z[held & phone], b, t)
        return p

    def nested_lams(kind: str) -> list[float]:
        chosen = []
        for k in range(5):
            fit = fold != k
            rows = np.flatnonzero(fit & phone)
            inner = np.asarray([group_bucket("inner/" + groups[i], 4) for i in rows])
            prior = prior_of(kind, fit)
            scores = []
            for lam in LAMS:
                total = 0.0
                for j in range(4):
                    tr, te = rows[inner != j], rows[inner == j]
                    b, t = fit_shrunk(z[tr], y[tr], prior, lam)
                    total += nll(y[te], scale(z[te], b, t)) * len(te)
                scores.append(total)
            chosen.append(LAMS[int(np.argmin(scores))])
        return chosen

    print(f"phone photos {phone.sum()}, ROC-AUC of their logits {roc_auc(y[phone], z[phone]):.3f}")
    print("| prior | lam | phone ECE | phone ROC-AUC | phone Brier | phone NLL |")
    print("| --- | --- | --- | --- | --- | --- |")
    for kind in ("identity", "dermoscopy"):
        rows = [(str(lam), [lam] * 5) for lam in LAMS]
        chosen = nested_lams(kind)
        rows.append((f"nested ({', '.join(f'{c:g}' for c in chosen)})", chosen))
        for label, lams in rows:
            p = held_out(kind, lams)[phone]
            yp = y[phone]
            print(
                f"| {kind} | {label} | {cal.expected_calibration_error(yp, p):.4f} "
                f"| {roc_auc(yp, p):.4f} | {cal.brier_score(yp, p):.4f} | {nll(yp, p):.4f} |"
            )


if __name__ == "__main__":
    main()
