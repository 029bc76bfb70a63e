"""Fit the skin gate and the artefact notes (``model_training.skin``) on serve features.

Each head is standardise → PCA (``n_components``, or none) → L2 logistic regression with
balanced class weights, folded into one weight vector (everything is linear). Thresholds
come from out-of-fold scores (folds by lesion group and by photo, never by copy or view):

* skin: the lowest of the per-domain ``target_frr`` quantiles of the out-of-fold scores of
  the lesion photos and their varied copies, so at most that share of each domain's
  lesions is refused; non-skin photos play no part in the threshold;
* notes: the ``1 - note_fpr`` quantile of the out-of-fold scores of the images without
  that artefact, so at most ``note_fpr`` of them get the note by mistake.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.utils.extmath import randomized_svd

from model_training.data import group_bucket


@dataclass(frozen=True)
class LinearHead:
    """score = x @ weight + bias (a logit)."""

    weight: np.ndarray  # [d] float64
    bias: float

    def score(self, x: np.ndarray) -> np.ndarray:
        """[n] logits."""
        return np.asarray(x, dtype=np.float64) @ self.weight + self.bias


def fit_head(
    x: np.ndarray,
    y: np.ndarray,
    n_components: int | None = 128,
    c: float = 0.5,
    sample_weight: np.ndarray | None = None,
) -> LinearHead:
    """Standardise, PCA-whiten to ``n_components``, logistic regression; folded to a line."""
    x = np.asarray(x, dtype=np.float64)
    mean = x.mean(axis=0)
    std = x.std(axis=0) + 1e-6
    z = (x - mean) / std
    if n_components is not None and n_components < min(z.shape):
        # Randomised SVD (Halko et al. 2011): the top components at a fraction of a full
        # SVD's cost, seeded so a refit gives the same gate.
        _, sing, vt = randomized_svd(z, n_components, n_iter=4, random_state=0)
        proj = vt.T / (sing / np.sqrt(len(z)) + 1e-6)  # [d, k], whitened
    else:
        proj = np.eye(z.shape[1])
    zp = z @ proj
    lr = LogisticRegression(C=c, class_weight="balanced", max_iter=2000)
    lr.fit(zp, np.asarray(y, dtype=int), sample_weight=sample_weight)
    beta = proj @ lr.coef_.reshape(-1)  # [d], on standardised x
    weight = beta / std
    bias = float(lr.intercept_[0] - mean @ weight)
    return LinearHead(weight, bias)


def fold_of(keys: Sequence[str], folds: int, salt: str = "") -> np.ndarray:
    """Fold index per item from the md5 of its group key (copies follow their original)."""
    return np.asarray([group_bucket(f"{salt}{k}", folds) for k in keys])


def out_of_fold(
    x: np.ndarray,
    y: np.ndarray,
    fold: np.ndarray,
    n_components: int | None,
    c: float,
) -> np.ndarray:
    """Out-of-fold logits: each fold scored by a head fitted on the others."""
    out = np.empty(len(x))
    for f in np.unique(fold):
        test = fold == f
        head = fit_head(x[~test], y[~test], n_components, c)
        out[test] = head.score(x[test])
    return out


def skin_threshold(
    pos_scores: np.ndarray, pos_domains: np.ndarray, target_frr: float
) -> tuple[float, dict[str, float]]:
    """Lowest per-domain ``target_frr`` quantile of lesion scores, and each domain's."""
    per = {
        str(d): float(np.quantile(pos_scores[pos_domains == d], target_frr, method="lower"))
        for d in np.unique(pos_domains)
    }
    return min(per.values()), per


def note_threshold(neg_scores: np.ndarray, fpr: float) -> float:
    """Score above which at most ``fpr`` of the artefact-free images lie."""
    return float(np.quantile(neg_scores, 1.0 - fpr, method="higher"))


@dataclass
class SkinFit:
    """A fitted skin head with its threshold and the out-of-fold evidence."""

    head: LinearHead
    threshold: float
    per_domain_quantile: dict[str, float]
    oof_pos: np.ndarray
    oof_neg: np.ndarray


def fit_skin(
    pos: np.ndarray,
    pos_groups: Sequence[str],
    pos_domains: np.ndarray,
    neg: np.ndarray,
    neg_groups: Sequence[str],
    target_frr: float,
    n_components: int | None,
    c: float,
    folds: int = 5,
) -> SkinFit:
    """Skin head on lesions (``pos``) vs non-skin views (``neg``); threshold out of fold."""
    x = np.concatenate([pos, neg])
    y = np.r_[np.ones(len(pos)), np.zeros(len(neg))]
    fold = np.r_[fold_of(pos_groups, folds), fold_of(neg_groups, folds)]
    oof = out_of_fold(x, y, fold, n_components, c)
    threshold, per = skin_threshold(oof[: len(pos)], pos_domains, target_frr)
    head = fit_head(x, y, n_components, c)
    return SkinFit(head, threshold, per, oof[: len(pos)], oof[len(pos) :])


@dataclass
class NoteFit:
    """A fitted artefact-note head with its threshold and out-of-fold rates."""

    head: LinearHead
    threshold: float
    oof_detected: float  # share of the copies with the artefact flagged (out of fold)
    oof_false_flag: float  # share of the images without it flagged (out of fold)


def fit_note(
    x: np.ndarray,
    has: np.ndarray,
    groups: Sequence[str],
    fpr: float,
    n_components: int | None,
    c: float,
    folds: int = 5,
) -> NoteFit:
    """Head for one artefact: images carrying it (``has``) against the rest."""
    y = np.asarray(has, dtype=bool)
    fold = fold_of(groups, folds, "note")
    oof = out_of_fold(x, y.astype(float), fold, n_components, c)
    threshold = note_threshold(oof[~y], fpr)
    head = fit_head(x, y.astype(float), n_components, c)
    return NoteFit(
        head,
        threshold,
        float(np.mean(oof[y] >= threshold)),
        float(np.mean(oof[~y] >= threshold)),
    )
