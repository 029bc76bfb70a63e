"""Skin gate and artefact notes, scored on the model's own features: NumPy only.

The question the gate answers is "is this a close-up of skin?", not "is this like my
training sources?". It is a logistic regression, fitted by ``python -m model_training
fit-gates`` on the serve output that metadata's ``ood.embedding_output`` names: lesion photos
of every source plus heavily varied copies of them (colour casts, blur, zoom, JPEG, hair, ink,
rulers, vignettes, dermatoscope rims) against many kinds of photos that are not of skin.
The features are optionally square-rooted (``transform``); standardising and the logistic
weights are linear, so they are folded into one weight vector per head: a score is one dot
product, ``f(x) @ w + b`` (a logit).

Heads: ``skin`` (below its threshold: ``not_a_lesion``) and one per artefact note (``hair``,
``ink``, ``ruler``; at or above its threshold: the answer comes with a note). The weights live
in the artifact's ``skin.npz``; the thresholds in ``metadata.json`` (``ood.threshold``,
``ood.notes.<name>.threshold``), next to how they were set.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

FORMAT_VERSION = 1
METHOD = "skin-logistic"
SKIN_HEAD = "skin"
NOTE_HEADS = ("hair", "ink", "ruler")
# Element-wise transforms applied to the features before the heads. "sqrt" (power
# normalisation) evens out the skewed, non-negative pooled activations.
TRANSFORMS = ("none", "sqrt")


def transform_features(features: np.ndarray, transform: str) -> np.ndarray:
    """``features`` as the heads read them (float32)."""
    x = np.asarray(features, dtype=np.float32)
    if transform == "sqrt":
        return np.sqrt(np.maximum(x, 0.0))
    if transform == "none":
        return x
    raise ValueError(f"unknown feature transform {transform!r}; known: {TRANSFORMS}")


@dataclass(frozen=True)
class Note:
    """Something in the photo that can change the estimate; the answer still comes."""

    code: str
    message: str
    advice: str


NOTE_TEXTS: dict[str, tuple[str, str]] = {
    "hair": (
        "Hair seems to cover part of the spot. Hair can hide its edges and colours and change "
        "the estimate.",
        "If you can, gently part or trim the hair around the spot (or wet it flat) and take "
        "the photo again.",
    ),
    "ink": (
        "There seem to be pen or marker lines on the skin near the spot. Ink marks can change "
        "the estimate.",
        "If the marks can be washed off, clean the skin and take the photo again without them.",
    ),
    "ruler": (
        "A ruler or scale seems to be in the photo. It can change the estimate.",
        "Take one more photo without the ruler, with the spot filling most of the frame.",
    ),
}


class SkinGate:
    """Linear heads on one feature vector: ``scores`` are logits, higher = more of it."""

    def __init__(
        self,
        names: Sequence[str],
        weights: np.ndarray,
        bias: np.ndarray,
        thresholds: Mapping[str, float],
        transform: str = "none",
    ) -> None:
        if transform not in TRANSFORMS:
            raise ValueError(f"unknown feature transform {transform!r}; known: {TRANSFORMS}")
        self.transform = transform
        self.names = tuple(str(n) for n in names)
        self.weights = np.asarray(weights, dtype=np.float32).reshape(len(self.names), -1)
        self.bias = np.asarray(bias, dtype=np.float64).reshape(-1)
        if self.bias.shape != (len(self.names),):
            raise ValueError("one bias per head is needed")
        if SKIN_HEAD not in self.names:
            raise ValueError(f"the {SKIN_HEAD!r} head is missing")
        if not np.all(np.isfinite(self.weights)) or not np.all(np.isfinite(self.bias)):
            raise ValueError("weights and biases must be finite")
        missing = [n for n in self.names if n not in thresholds]
        if missing:
            raise ValueError(f"no threshold for heads {missing}")
        self.thresholds = {n: float(thresholds[n]) for n in self.names}
        self._wt = np.ascontiguousarray(self.weights.T)  # [d, heads]

    @property
    def dim(self) -> int:
        """Feature dimension."""
        return int(self.weights.shape[1])

    @property
    def note_names(self) -> tuple[str, ...]:
        """The artefact-note heads present."""
        return tuple(n for n in self.names if n != SKIN_HEAD)

    def scores(self, features: np.ndarray) -> np.ndarray:
        """[n, heads] logits; a non-finite feature row scores -inf on every head."""
        x = np.asarray(features, dtype=np.float32)
        if x.ndim == 1:
            x = x[None, :]
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise ValueError(f"expected features [n, {self.dim}], got shape {x.shape}")
        x = transform_features(x, self.transform)
        s = (x @ self._wt).astype(np.float64) + self.bias
        return np.where(np.isfinite(s), s, -np.inf)

    def skin_score(self, features: np.ndarray) -> np.ndarray:
        """[n] logit of "a close-up of skin"."""
        return self.scores(features)[:, self.names.index(SKIN_HEAD)]

    def not_skin(self, features: np.ndarray) -> np.ndarray:
        """[n] True where the photo is not a close-up of skin (refused as not_a_lesion)."""
        return np.asarray(self.skin_score(features) < self.thresholds[SKIN_HEAD], dtype=bool)

    def notes(self, features: np.ndarray) -> list[list[Note]]:
        """Per row, the artefact notes whose head is at or above its threshold."""
        s = self.scores(features)
        out: list[list[Note]] = []
        for row in s:
            found = []
            for name in self.note_names:
                if row[self.names.index(name)] >= self.thresholds[name] and name in NOTE_TEXTS:
                    found.append(Note(name, *NOTE_TEXTS[name]))
            out.append(found)
        return out

    def save(self, path: Path) -> Path:
        """Write the heads (not the thresholds: they live in metadata.json) to ``.npz``."""
        path = Path(path)
        with path.open("wb") as fh:
            np.savez(
                fh,
                format_version=np.int64(FORMAT_VERSION),
                method=np.str_(METHOD),
                names=np.asarray(self.names, dtype=np.str_),
                weights=self.weights.astype(np.float32),
                bias=self.bias,
                transform=np.str_(self.transform),
            )
        return path

    @classmethod
    def load(cls, path: Path, thresholds: Mapping[str, float]) -> SkinGate:
        """Read heads written by ``save``; ``thresholds`` come from metadata.json."""
        with np.load(Path(path), allow_pickle=False) as data:
            version = int(data["format_version"])
            if version != FORMAT_VERSION or str(data["method"]) != METHOD:
                raise ValueError(
                    f"unsupported gate file (format {version}, method {str(data['method'])!r}); "
                    "refit with python -m model_training fit-gates"
                )
            transform = str(data["transform"]) if "transform" in data.files else "none"
            names = [str(n) for n in data["names"]]
            return cls(names, data["weights"], data["bias"], thresholds, transform)
