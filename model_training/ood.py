"""Out-of-distribution gate on the model's own embedding: is this a skin-lesion photo at all?

Method: squared Mahalanobis distance of an embedding (the ``serve`` output that metadata's
``ood.embedding_output`` names: the 768-d mid-level ``ood_embedding`` in current artifacts,
the 2048-d last-block ``embedding`` in older ones) to the training lesions, each
covariance estimated with Ledoit–Wolf shrinkage. With ``groups`` (e.g. the domain of each
training image: dermoscopy vs. phone) there is one Gaussian per group and the score is the
distance to the nearest one; each group has its own covariance by default (``tied=False``) or
all share the pooled within-group one (``tied=True``, Lee et al., NeurIPS 2018).

Why these choices:

* Shrinkage rather than a plain inverse: with hundreds of training embeddings in hundreds
  or thousands of dimensions the sample covariance is singular or nearly so. Ledoit–Wolf
  shrinks it towards a multiple of the identity with an intensity computed from the data
  (Ledoit & Wolf, J. Multivar. Anal. 2004), so no ridge constant is picked by hand.
* Shrinkage rather than PCA truncation: keeping only the top principal components discards
  exactly the directions in which training lesions hardly vary, which are where photos of
  other things tend to differ (Kamoi & Kobayashi 2020, "Why is the Mahalanobis distance
  effective for anomaly detection?"). The shrunk covariance keeps every direction.
* One Gaussian per domain: dermoscopy images and phone close-ups form two separate clusters
  with different spreads; a single (or tied) covariance is inflated by the gap between them
  and lets non-lesion photos through. ``python -m model_training.gates`` compares these
  variants on held-apart photos and records which one it kept.

Each Gaussian is stored in eigen-form: its top ``k`` eigenvectors with their shrunk variances
plus one isotropic variance for the other ``d - k`` directions (the mean of their shrunk
variances, as in probabilistic PCA). With ``k`` = the rank of the centred training data this is
exactly the Ledoit–Wolf distance, yet the file holds ``k x d`` numbers rather than a ``d x d``
precision matrix; a smaller ``k`` gives a smaller file and a coarser model.

NumPy only: the server imports this module.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

FORMAT_VERSION = 1
METHOD = "mahalanobis-ledoit-wolf"
SHARED = -1  # component_group value of a component every group uses (tied covariance)


def ledoit_wolf_shrinkage(centred: np.ndarray) -> float:
    """Ledoit–Wolf intensity towards ``mu * I`` for centred data [n, d] (as scikit-learn's).

    Computed through the n x n Gram matrix, so no d x d matrix is formed.
    """
    n, d = centred.shape
    if n < 2:
        return 1.0
    gram = centred @ centred.T  # [n, n]
    sq_norms = np.diag(gram).copy()
    trace = float(sq_norms.sum()) / n  # tr(S), S = Z^T Z / n
    mu = trace / d
    s_frob2 = float((gram**2).sum()) / n**2  # ||S||_F^2
    delta = s_frob2 - mu**2 * d  # ||S - mu I||_F^2
    if delta <= 0:
        return 1.0
    # (1/n^2) sum_k ||z_k z_k^T - S||_F^2, with z^T S z = ||Z z||^2 / n = sum_j G_kj^2 / n.
    quad = (gram**2).sum(axis=1) / n
    beta_bar = float((sq_norms**2 - 2.0 * quad + s_frob2).sum()) / n**2
    return float(min(max(beta_bar, 0.0), delta) / delta)


@dataclass(frozen=True)
class _Gaussian:
    """Shrunk covariance of centred data in eigen-form (see the module docstring)."""

    components: np.ndarray  # [k, d]
    variances: np.ndarray  # [k]
    residual_variance: float
    shrinkage: float


def _shrunk_gaussian(centred: np.ndarray, n_components: int | None) -> _Gaussian:
    n, d = centred.shape
    alpha = ledoit_wolf_shrinkage(centred)
    cov_trace = float((centred**2).sum()) / n
    mu = cov_trace / d
    floor = max(mu * 1e-6, 1e-12)  # keeps distances finite even for constant features
    _, sing, vt = np.linalg.svd(centred, full_matrices=False)
    eig = sing**2 / n  # eigenvalues of S in the directions the data span
    rank = int(np.sum(eig > eig.max(initial=0.0) * 1e-10)) if eig.size else 0
    k = rank if n_components is None else max(0, min(int(n_components), rank))
    shrunk = (1.0 - alpha) * eig[:k] + alpha * mu
    rest = d - k
    residual = floor
    if rest > 0:
        residual = ((1.0 - alpha) * (cov_trace - float(eig[:k].sum())) + alpha * mu * rest) / rest
    return _Gaussian(vt[:k], np.maximum(shrunk, floor), max(residual, floor), alpha)


class OODDetector:
    """Mahalanobis distance to the nearest training Gaussian, with a threshold.

    ``score`` is the squared distance (higher = more unusual); ``is_outlier`` is
    ``score > threshold``. ``component_group[i]`` says which group's covariance component
    ``i`` belongs to (``-1``: all groups', a tied covariance).
    """

    def __init__(
        self,
        means: np.ndarray,
        components: np.ndarray,
        variances: np.ndarray,
        component_group: np.ndarray,
        residual_variances: np.ndarray,
        threshold: float = math.inf,
        group_names: Sequence[str] = (),
        shrinkage: Sequence[float] = (),
        n_fit: Sequence[int] = (),
    ) -> None:
        # Means and components are held at the float32 precision they are saved with, so a
        # detector scores exactly the same before and after a save/load round trip.
        self.means = np.atleast_2d(np.asarray(means, dtype=np.float32)).astype(np.float64)
        n_groups, dim = self.means.shape
        self.components = (
            np.asarray(components, dtype=np.float32).astype(np.float64).reshape(-1, dim)
        )
        self.variances = np.asarray(variances, dtype=np.float64).reshape(-1)
        self.component_group = np.asarray(component_group, dtype=np.int64).reshape(-1)
        self.residual_variances = np.asarray(residual_variances, dtype=np.float64).reshape(-1)
        k = self.components.shape[0]
        if self.variances.shape != (k,) or self.component_group.shape != (k,):
            raise ValueError("one variance and one group index per component are needed")
        if self.residual_variances.shape != (n_groups,):
            raise ValueError("one residual variance per group is needed")
        if np.any(self.component_group < SHARED) or np.any(self.component_group >= n_groups):
            raise ValueError("component_group indices out of range")
        if np.any(self.component_group == SHARED) and np.any(self.component_group != SHARED):
            raise ValueError("components are either all shared (tied) or all per group")
        if np.any(self.variances <= 0) or np.any(self.residual_variances <= 0):
            raise ValueError("variances must be positive")
        self.threshold = float(threshold)
        self.group_names = tuple(str(g) for g in group_names) or tuple(
            f"group{i}" for i in range(n_groups)
        )
        if len(self.group_names) != n_groups:
            raise ValueError("one name per group is needed")
        self.shrinkage = tuple(float(s) for s in shrinkage)
        self.n_fit = tuple(int(n) for n in n_fit)
        self._rows = [
            np.flatnonzero((self.component_group == g) | (self.component_group == SHARED))
            for g in range(n_groups)
        ]
        # Each group's components and variances, gathered once: gathering them per call
        # copied 7 MB and cost more than the whole distance (the server scores every photo).
        self._parts = [(self.components[r], self.variances[r]) for r in self._rows]

    @property
    def dim(self) -> int:
        """Embedding dimension."""
        return int(self.means.shape[1])

    @property
    def tied(self) -> bool:
        """Whether all groups share one covariance."""
        return bool(np.all(self.component_group == SHARED))

    @classmethod
    def fit(
        cls,
        embeddings: np.ndarray,
        groups: Sequence[str] | np.ndarray | None = None,
        n_components: int | None = None,
        tied: bool = False,
        threshold: float = math.inf,
    ) -> OODDetector:
        """Fit on training embeddings [n, d].

        ``groups``: one label per row for one Gaussian per group (None = a single Gaussian).
        ``tied``: groups share the pooled within-group covariance. ``n_components``:
        eigen-directions kept individually per covariance (None = all the data span, the
        exact Ledoit–Wolf estimate). ``threshold``: normally chosen later, on validation
        data, and passed to ``load``.
        """
        x = np.asarray(embeddings, dtype=np.float64)
        if x.ndim != 2 or x.shape[0] < 2:
            raise ValueError(f"need at least 2 embeddings as [n, d], got shape {x.shape}")
        if not np.all(np.isfinite(x)):
            raise ValueError("embeddings contain NaN or infinity")
        n = x.shape[0]
        names = ["all"]
        labels = np.zeros(n, dtype=np.int64)
        if groups is not None:
            group_arr = np.asarray([str(g) for g in groups])
            if group_arr.shape[0] != n:
                raise ValueError("groups must have one label per embedding")
            names = sorted(set(group_arr.tolist()))
            labels = np.searchsorted(np.asarray(names), group_arr)
        counts = np.bincount(labels, minlength=len(names))
        if not tied and np.any(counts < 2):
            raise ValueError(f"each group needs at least 2 embeddings, got {counts.tolist()}")
        means = np.stack([x[labels == g].mean(axis=0) for g in range(len(names))])
        centred = x - means[labels]

        if tied or len(names) == 1:
            gauss = _shrunk_gaussian(centred, n_components)
            return cls(
                means=means,
                components=gauss.components,
                variances=gauss.variances,
                component_group=np.full(len(gauss.variances), SHARED),
                residual_variances=np.full(len(names), gauss.residual_variance),
                threshold=threshold,
                group_names=names,
                shrinkage=[gauss.shrinkage] * len(names),
                n_fit=counts.tolist(),
            )
        fitted = [_shrunk_gaussian(centred[labels == g], n_components) for g in range(len(names))]
        return cls(
            means=means,
            components=np.concatenate([g.components for g in fitted]),
            variances=np.concatenate([g.variances for g in fitted]),
            component_group=np.concatenate(
                [np.full(len(g.variances), i) for i, g in enumerate(fitted)]
            ),
            residual_variances=np.asarray([g.residual_variance for g in fitted]),
            threshold=threshold,
            group_names=names,
            shrinkage=[g.shrinkage for g in fitted],
            n_fit=counts.tolist(),
        )

    def group_scores(self, embeddings: np.ndarray) -> np.ndarray:
        """Squared Mahalanobis distance to each group's Gaussian, [n, groups]."""
        x = np.asarray(embeddings, dtype=np.float64)
        if x.ndim == 1:
            x = x[None, :]
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise ValueError(f"expected embeddings [n, {self.dim}], got shape {x.shape}")
        out = np.empty((x.shape[0], len(self.group_names)))
        for g, mean in enumerate(self.means):
            rows = self._rows[g]
            components, variances = self._parts[g]
            z = x - mean
            proj = z @ components.T  # [n, k]
            in_span = (proj**2 / variances).sum(axis=1)
            if len(rows) >= self.dim:
                # Every direction has its own variance: nothing lies outside the span, and
                # the difference below would only be float32 rounding of the components
                # divided by the (tiny) floor variance.
                out[:, g] = in_span
                continue
            outside = np.maximum((z**2).sum(axis=1) - (proj**2).sum(axis=1), 0.0)
            out[:, g] = in_span + outside / self.residual_variances[g]
        return out

    def score(self, embeddings: np.ndarray) -> np.ndarray:
        """Squared Mahalanobis distance to the nearest group, one per row [n]."""
        best = self.group_scores(embeddings).min(axis=1)
        # A NaN embedding must never pass as in-distribution.
        return np.where(np.isfinite(best), best, np.inf)

    def is_outlier(self, embeddings: np.ndarray) -> np.ndarray:
        """True where ``score > threshold``."""
        return np.asarray(self.score(embeddings) > self.threshold, dtype=bool)

    def describe(self) -> dict[str, Any]:
        """Plain facts for reports (no arrays)."""
        return {
            "method": METHOD,
            "dim": self.dim,
            "groups": list(self.group_names),
            "tied": self.tied,
            "n_components": [len(r) for r in self._rows],
            "shrinkage": list(self.shrinkage),
            "n_fit": list(self.n_fit),
            "threshold": self.threshold,
        }

    def save(self, path: Path) -> Path:
        """Write the statistics (not the threshold: that lives in metadata.json) to ``.npz``."""
        path = Path(path)
        with path.open("wb") as fh:
            np.savez(
                fh,
                format_version=np.int64(FORMAT_VERSION),
                method=np.str_(METHOD),
                means=self.means.astype(np.float32),
                components=self.components.astype(np.float32),
                variances=self.variances,
                component_group=self.component_group,
                residual_variances=self.residual_variances,
                group_names=np.asarray(self.group_names, dtype=np.str_),
                shrinkage=np.asarray(self.shrinkage, dtype=np.float64),
                n_fit=np.asarray(self.n_fit, dtype=np.int64),
            )
        return path

    @classmethod
    def load(cls, path: Path, threshold: float) -> OODDetector:
        """Read statistics written by ``save``; ``threshold`` comes from metadata.json."""
        with np.load(Path(path), allow_pickle=False) as data:
            version = int(data["format_version"])
            if version != FORMAT_VERSION:
                raise ValueError(f"unsupported OOD statistics format {version}")
            return cls(
                means=data["means"],
                components=data["components"],
                variances=data["variances"],
                component_group=data["component_group"],
                residual_variances=data["residual_variances"],
                threshold=float(threshold),
                group_names=[str(g) for g in data["group_names"]],
                shrinkage=data["shrinkage"].tolist(),
                n_fit=data["n_fit"].tolist(),
            )
