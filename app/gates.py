"""Input gates that run before (quality) and after (out-of-distribution) the model.

Both are driven by the artifact's metadata: a gate is on exactly when metadata has its key
(``quality`` / ``ood``). Their algorithms live in ``model_training.quality`` and
``model_training.ood`` so that training, evaluation and serving share one implementation.
When metadata asks for a gate whose module is not installed, loading fails: silently
serving without a safety gate the artifact was built to rely on would be worse than not
starting.
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from PIL import Image

from app.model import DEFAULT_OOD_OUTPUT, ModelLoadError, ModelMetadata
from app.texts import OOD_ADVICE, OOD_MESSAGE

logger = logging.getLogger("app.gates")


class QualityIssueLike(Protocol):
    """What ``model_training.quality.QualityIssue`` provides."""

    code: str
    message: str
    advice: str


class OODDetectorLike(Protocol):
    """What ``model_training.ood.OODDetector`` provides."""

    def score(self, embeddings: np.ndarray) -> np.ndarray: ...

    def is_outlier(self, embeddings: np.ndarray) -> np.ndarray: ...


@dataclass(frozen=True)
class Reason:
    """Why an image was not assessed, in words a lay user can act on."""

    code: str
    message: str
    advice: str


AssessQuality = Callable[[Image.Image, Mapping[str, float]], Sequence[QualityIssueLike]]


class QualityGate:
    """Rejects photos too small, blurry, dark or overexposed to assess."""

    def __init__(self, assess: AssessQuality, thresholds: Mapping[str, float]) -> None:
        self._assess = assess
        self.thresholds = dict(thresholds)

    def check(self, img: Image.Image) -> list[Reason]:
        """Empty list when the photo is usable."""
        issues = self._assess(img, self.thresholds)
        return [Reason(str(i.code), str(i.message), str(i.advice)) for i in issues]


class OODGate:
    """Flags embeddings far from the training distribution (not a skin-lesion close-up).

    ``output`` is the serve output it scores (metadata ``ood.embedding_output``); the model
    hands exactly that output over as ``Inference.embeddings``.
    """

    def __init__(self, detector: OODDetectorLike, output: str = DEFAULT_OOD_OUTPUT) -> None:
        self._detector = detector
        self.output = output

    def check(self, embeddings: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(is_outlier [n] bool, score [n] float)."""
        outlier = np.asarray(self._detector.is_outlier(embeddings), dtype=bool).reshape(-1)
        score = np.asarray(self._detector.score(embeddings), dtype=np.float64).reshape(-1)
        return outlier, score

    @staticmethod
    def reason() -> Reason:
        """The single reason an out-of-distribution photo is refused."""
        return Reason("not_a_lesion", OOD_MESSAGE, OOD_ADVICE)


@dataclass(frozen=True)
class Gates:
    """The gates an artifact enables (None = off)."""

    quality: QualityGate | None
    ood: OODGate | None


def _import(module: str, gate: str) -> Any:
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise ModelLoadError(
            f"metadata.json enables the {gate} gate but {module} cannot be imported: {exc}"
        ) from exc


def build_gates(metadata: ModelMetadata, model_dir: Path) -> Gates:
    """Instantiate the gates metadata asks for; raise ModelLoadError if one cannot be built."""
    quality: QualityGate | None = None
    if metadata.quality is not None:
        module = _import("model_training.quality", "quality")
        # Numbers only: the metadata block may also carry notes about how they were set.
        thresholds = {
            str(k): float(v)
            for k, v in metadata.quality.items()
            if isinstance(v, int | float) and not isinstance(v, bool)
        }
        quality = QualityGate(module.assess_quality, thresholds)

    ood: OODGate | None = None
    if metadata.ood is not None:
        module = _import("model_training.ood", "out-of-distribution")
        path = model_dir / str(metadata.ood["file"])
        if not path.is_file():
            raise ModelLoadError(f"metadata.json names OOD statistics {path} that do not exist")
        try:
            detector = module.OODDetector.load(path, float(metadata.ood["threshold"]))
        except Exception as exc:  # a corrupt .npz must stop startup with a clear message
            raise ModelLoadError(f"cannot load OOD statistics {path}: {exc}") from exc
        dim = getattr(detector, "dim", None)
        output = metadata.ood_embedding_output
        logger.info(
            "OOD gate scores serve output",
            extra={"fields": {"ood_embedding_output": output, "ood_dim": dim}},
        )
        ood = OODGate(detector, output)

    logger.info(
        "gates configured",
        extra={"fields": {"quality_gate": quality is not None, "ood_gate": ood is not None}},
    )
    return Gates(quality=quality, ood=ood)
