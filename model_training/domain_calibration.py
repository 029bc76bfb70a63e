"""Calibration per photo domain, without being told the domain.

Dermoscopy and phone photos need different calibrations: the same logit means a different
probability in each (different class mixes, different confidence). The server is never told
which kind a photo is, so the artifact carries a small logistic model that reads the domain
from one of the network's own ``serve`` outputs (returned anyway: the mid-level
``ood_embedding``, square-rooted as the skin gate reads it, tells the domains apart far better
than the final ``embedding``, which training made largely domain-blind), and one
Platt scaling per domain, ``sigmoid((logit + bias_d) / T_d)``. With ``assignment="mixture"``
(the default, and what files without the field mean) the answer is the mixture of the
per-domain probabilities weighted by the domain probability, so a photo that looks half like
each gets a blend rather than a jump; with ``"hard"`` each photo gets the scaling of its single
inferred domain (the second domain when the domain probability is at least the cut, 0.5 unless
the file says otherwise), which keeps the order of the logits within each inferred domain
(docs/calibration.md, candidate H).

The same hard reading picks each photo's threshold when the artifact has one per domain
(:meth:`DomainCalibration.answer`, which the server and ``model_training.served`` both call:
probabilities and thresholds from one reading of the domain).

Scoring needs only NumPy (the server imports this module); fitting uses scikit-learn and
SciPy, imported when a fit is asked for.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

FILE = "domain_calibration.npz"
# What the domain classifier reads: the serve output and whether it is square-rooted first.
DEFAULT_OUTPUT = "ood_embedding"
# How the per-domain scalings are combined: weighted by the domain probability, or the one of
# the inferred domain. Files written before the choice existed mean "mixture".
ASSIGNMENTS = ("mixture", "hard")
# A photo is read as the second domain when its domain probability is at least the cut;
# files written before the cut could be chosen mean this one.
SECOND_DOMAIN_CUT = 0.5


def _sigmoid(x: npt.ArrayLike) -> npt.NDArray[np.float64]:
    return np.exp(-np.logaddexp(0.0, -np.asarray(x, dtype=np.float64)))


@dataclass(frozen=True)
class DomainCalibration:
    """A domain classifier on the embedding plus one (bias, temperature) per domain."""

    domains: tuple[str, str]  # (first, second): the classifier gives P(second)
    mean: np.ndarray
    scale: np.ndarray
    coef: np.ndarray
    intercept: float
    bias: tuple[float, float]
    temperature: tuple[float, float]
    embedding_output: str = "embedding"  # the serve output the classifier reads
    sqrt: bool = False  # square-root that output (clipped at 0) before standardising
    assignment: str = "mixture"  # one of ASSIGNMENTS
    cut: float = SECOND_DOMAIN_CUT  # read as the second domain from this probability up

    def __post_init__(self) -> None:
        if self.assignment not in ASSIGNMENTS:
            raise ValueError(f"assignment must be one of {ASSIGNMENTS}, not {self.assignment!r}")
        if not 0.0 < self.cut < 1.0:
            raise ValueError(f"the domain cut must lie in (0, 1), not {self.cut!r}")

    def second_domain_probability(self, embeddings: npt.ArrayLike) -> npt.NDArray[np.float64]:
        """P(domains[1] | embedding) for each row of ``embeddings`` [n, d] (the serve output
        named by ``embedding_output``)."""
        x = (_features(embeddings, self.sqrt) - self.mean) / self.scale
        return _sigmoid(x @ self.coef + self.intercept)

    def is_second_domain(self, embeddings: npt.ArrayLike) -> npt.NDArray[np.bool_]:
        """Whether each photo is read as ``domains[1]`` (its domain probability >= the cut)."""
        return np.asarray(self.second_domain_probability(embeddings) >= self.cut, dtype=bool)

    def image_thresholds(
        self, embeddings: npt.ArrayLike, thresholds: tuple[float, float]
    ) -> npt.NDArray[np.float64]:
        """Each photo's decision threshold: ``thresholds`` = (of domains[0], of domains[1]),
        picked by the photo's inferred domain (:meth:`is_second_domain`)."""
        first, second = thresholds
        return np.where(self.is_second_domain(embeddings), float(second), float(first))

    def per_domain(self, logits: npt.ArrayLike) -> npt.NDArray[np.float64]:
        """[n, 2]: each logit calibrated as if it came from each domain."""
        z = np.asarray(logits, dtype=np.float64).reshape(-1, 1)
        return _sigmoid((z + np.asarray(self.bias)) / np.asarray(self.temperature))

    def calibrate(
        self, logits: npt.ArrayLike, embeddings: npt.ArrayLike
    ) -> npt.NDArray[np.float64]:
        """Calibrated malignant probability: the domain-weighted mixture, or with ``"hard"``
        assignment the scaling of each photo's inferred domain."""
        return self.answer(logits, embeddings)[0]

    def answer(
        self,
        logits: npt.ArrayLike,
        embeddings: npt.ArrayLike,
        thresholds: tuple[float, float] | None = None,
    ) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64] | None]:
        """(calibrated probabilities, each photo's threshold or None without ``thresholds``),
        the domain read once for both (:meth:`calibrate`, :meth:`image_thresholds`)."""
        p, t, _ = self.answer_and_read(logits, embeddings, thresholds)
        return p, t

    def answer_and_read(
        self,
        logits: npt.ArrayLike,
        embeddings: npt.ArrayLike,
        thresholds: tuple[float, float] | None = None,
    ) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64] | None, npt.NDArray[np.bool_]]:
        """:meth:`answer` plus the reading it used: whether each photo was read as
        ``domains[1]`` (for callers that report it, without reading the domain again)."""
        w = self.second_domain_probability(embeddings)
        second = np.asarray(w >= self.cut, dtype=bool)
        weight = second.astype(np.float64) if self.assignment == "hard" else w
        both = self.per_domain(logits)
        p = np.asarray((1 - weight) * both[:, 0] + weight * both[:, 1], dtype=np.float64)
        if thresholds is None:
            return p, None, second
        return p, np.where(second, float(thresholds[1]), float(thresholds[0])), second

    def save(self, path: Path) -> None:
        """Write the parameters as a plain ``.npz`` (no pickles)."""
        np.savez(
            path, domains=np.asarray(self.domains), mean=self.mean, scale=self.scale,
            coef=self.coef, intercept=np.float64(self.intercept), bias=np.asarray(self.bias),
            temperature=np.asarray(self.temperature),
            embedding_output=np.asarray(self.embedding_output), sqrt=np.asarray(self.sqrt),
            assignment=np.asarray(self.assignment), cut=np.float64(self.cut),
        )  # fmt: skip

    @classmethod
    def load(cls, path: Path) -> DomainCalibration:
        """Read what :meth:`save` wrote; raises ValueError on an inconsistent file."""
        with np.load(path, allow_pickle=False) as data:
            domains = tuple(str(d) for d in data["domains"])
            mean, scale, coef = (np.asarray(data[k], np.float64) for k in ("mean", "scale", "coef"))
            bias, temperature = data["bias"], data["temperature"]
            intercept = float(data["intercept"])
            # Files written before the classifier could read another output: the embedding.
            output = str(data["embedding_output"]) if "embedding_output" in data else "embedding"
            sqrt = bool(data["sqrt"]) if "sqrt" in data else False
            # Files written before the assignment could be chosen: the mixture.
            assignment = str(data["assignment"]) if "assignment" in data else "mixture"
            cut = float(data["cut"]) if "cut" in data else SECOND_DOMAIN_CUT
        if len(domains) != 2 or not mean.shape == scale.shape == coef.shape:
            raise ValueError(f"{path}: inconsistent domain calibration")
        if np.any(np.asarray(temperature) <= 0) or np.any(scale <= 0):
            raise ValueError(f"{path}: temperatures and scales must be > 0")
        return cls(
            (domains[0], domains[1]), mean, scale, coef, intercept,
            (float(bias[0]), float(bias[1])), (float(temperature[0]), float(temperature[1])),
            output, sqrt, assignment, cut,
        )  # fmt: skip

    def describe(self) -> dict[str, Any]:
        """JSON-ready summary for metadata.json."""
        w = f"P(second domain | {'sqrt ' if self.sqrt else ''}{self.embedding_output})"
        if self.assignment == "hard":
            method = (
                "p = sigmoid((logit + b_d) / T_d) for the photo's inferred domain d (the second "
                f"domain when w >= {self.cut:g}, else the first), w = {w} from a logistic "
                "model; (b_d, T_d) fitted by NLL on validation images of domain d"
            )
        else:
            method = (
                "p = (1 - w) * sigmoid((logit + b_1) / T_1) + w * sigmoid((logit + b_2) / T_2), "
                f"w = {w} from a logistic model; (b_d, T_d) fitted by NLL on validation images "
                "of domain d"
            )
        return {
            "file": FILE,
            "embedding_output": self.embedding_output,
            "embedding_transform": "sqrt" if self.sqrt else "none",
            "domains": list(self.domains),
            "per_domain": {
                d: {"logit_bias": b, "temperature": t}
                for d, b, t in zip(self.domains, self.bias, self.temperature, strict=True)
            },
            "assignment": self.assignment,
            "cut": self.cut,
            "method": method,
        }


def _features(embeddings: npt.ArrayLike, sqrt: bool) -> npt.NDArray[np.float64]:
    x = np.asarray(embeddings, dtype=np.float64)
    return np.sqrt(np.maximum(x, 0.0)) if sqrt else x


def fit_platt(logits: npt.ArrayLike, y: npt.ArrayLike) -> tuple[float, float]:
    """(bias, temperature) minimising the NLL of ``sigmoid((logit + bias) / T)``."""
    from scipy.optimize import minimize

    z = np.asarray(logits, dtype=np.float64)
    labels = np.asarray(y, dtype=np.float64)

    def nll(params: np.ndarray) -> float:
        u = (z + params[0]) / math.exp(params[1])
        return float(np.mean(np.logaddexp(0.0, u) - labels * u))

    result = minimize(nll, np.zeros(2), method="L-BFGS-B", bounds=[(-10, 10), (-3, 3)])
    return float(result.x[0]), float(math.exp(result.x[1]))


def fit_domain_calibration(
    logits: npt.ArrayLike,
    embeddings: npt.ArrayLike,
    y: npt.ArrayLike,
    domains: npt.ArrayLike,
    c: float = 0.05,
    embedding_output: str = DEFAULT_OUTPUT,
    sqrt: bool = True,
    assignment: str = "mixture",
    cut: float = SECOND_DOMAIN_CUT,
    sample_weight: npt.ArrayLike | None = None,
) -> DomainCalibration:
    """Fit the domain classifier and the per-domain Platt scalings on labelled images.

    ``embeddings`` are the serve output ``embedding_output`` of the same images. The
    classifier is L2-regularised (``c``) on standardised (optionally square-rooted) features,
    and its classes are weighted equally: phone photos are few, and a user's domain is not
    the training mix. ``assignment``: how :meth:`DomainCalibration.calibrate` combines the
    scalings (``ASSIGNMENTS``) and ``cut`` from which domain probability a photo is read as
    the second domain; the fitted parameters are the same either way. ``sample_weight``
    weighs each image in the domain classifier's fit (not in the scalings').
    """
    from sklearn.linear_model import LogisticRegression

    emb = _features(embeddings, sqrt)
    names = np.asarray(domains).astype(str)
    order = tuple(sorted(set(names.tolist())))
    if len(order) != 2:
        raise ValueError(f"need exactly two domains, got {order}")
    mean = emb.mean(axis=0)
    scale = emb.std(axis=0) + 1e-6
    clf = LogisticRegression(C=c, class_weight="balanced", max_iter=2000)
    clf.fit((emb - mean) / scale, names == order[1], sample_weight=sample_weight)
    z, labels = np.asarray(logits, dtype=np.float64), np.asarray(y)
    params = [fit_platt(z[names == d], labels[names == d]) for d in order]
    return DomainCalibration(
        (order[0], order[1]), mean, scale, clf.coef_.reshape(-1), float(clf.intercept_[0]),
        (params[0][0], params[1][0]), (params[0][1], params[1][1]), embedding_output, sqrt,
        assignment, cut,
    )  # fmt: skip
