"""Input gates that run before (quality) and after (skin) the model, and the artefact notes.

Both gates are driven by the artifact's metadata: a gate is on exactly when metadata has its
key (``quality`` / ``ood``). Their algorithms live in ``model_training.quality`` and
``model_training.skin`` (NumPy and Pillow only, like the server), so fitting, evaluation and
serving share one implementation.

* quality: too small, blurred, too dark or overexposed → ``unable_to_assess``, one reason
  and its own advice per problem; hair, ink, rulers, vignettes and dermatoscope rims are
  never a reason;
* skin: not a close-up of skin → ``not_a_lesion``;
* notes: hair, ink or a ruler detected → the answer still comes, with a note saying the
  estimate can be affected and how to retake the photo.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from app.metadata import DEFAULT_OOD_OUTPUT, ModelLoadError, ModelMetadata
from app.texts import OOD_ADVICE, OOD_MESSAGE
from model_training.quality import assess_quality
from model_training.skin import SKIN_HEAD, SkinGate

logger = logging.getLogger("app.gates")


@dataclass(frozen=True)
class Reason:
    """Why an image was not assessed, or what may affect its answer, in plain words."""

    code: str
    message: str
    advice: str


class QualityGate:
    """Rejects photos too small, blurry, dark or overexposed to assess."""

    def __init__(self, thresholds: dict[str, float]) -> None:
        self.thresholds = dict(thresholds)

    def check(self, img: Image.Image) -> list[Reason]:
        """Empty list when the photo is usable."""
        return [Reason(i.code, i.message, i.advice) for i in assess_quality(img, self.thresholds)]


class OODGate:
    """Refuses photos that are not a close-up of skin; notes hair, ink and rulers.

    ``output`` is the serve output it scores (metadata ``ood.embedding_output``); the model
    hands exactly that output over as ``Inference.embeddings``.
    """

    def __init__(self, gate: SkinGate, output: str = DEFAULT_OOD_OUTPUT) -> None:
        self.gate = gate
        self.output = output

    def check(self, embeddings: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(not a close-up of skin [n] bool, skin score [n] float; higher = more skin-like)."""
        score = self.gate.skin_score(embeddings)
        return np.asarray(score < self.gate.thresholds[SKIN_HEAD], dtype=bool), score

    def notes(self, embeddings: np.ndarray) -> list[list[Reason]]:
        """Per row, the artefacts detected (the answer still comes)."""
        return [
            [Reason(n.code, n.message, n.advice) for n in row]
            for row in self.gate.notes(embeddings)
        ]

    @staticmethod
    def reason() -> Reason:
        """The single reason a photo that is not of skin is refused."""
        return Reason("not_a_lesion", OOD_MESSAGE, OOD_ADVICE)


@dataclass(frozen=True)
class Gates:
    """The gates an artifact enables (None = off)."""

    quality: QualityGate | None
    ood: OODGate | None


def build_gates(metadata: ModelMetadata, model_dir: Path) -> Gates:
    """Instantiate the gates metadata asks for; raise ModelLoadError if one cannot be built."""
    quality: QualityGate | None = None
    if metadata.quality is not None:
        # Numbers only: the metadata block may also carry notes about how they were set.
        thresholds = {
            str(k): float(v)
            for k, v in metadata.quality.items()
            if isinstance(v, int | float) and not isinstance(v, bool)
        }
        quality = QualityGate(thresholds)

    ood: OODGate | None = None
    if metadata.ood is not None:
        path = model_dir / str(metadata.ood["file"])
        if not path.is_file():
            raise ModelLoadError(f"metadata.json names gate weights {path} that do not exist")
        notes = metadata.ood.get("notes") or {}
        try:
            thresholds = {SKIN_HEAD: float(metadata.ood["threshold"])}
            thresholds.update({str(n): float(v["threshold"]) for n, v in notes.items()})
            gate = SkinGate.load(path, thresholds)
        except Exception as exc:  # a corrupt or outdated file must stop startup clearly
            raise ModelLoadError(f"cannot load the skin gate {path}: {exc}") from exc
        output = metadata.ood_embedding_output
        logger.info(
            "skin gate scores serve output",
            extra={"fields": {"ood_embedding_output": output, "dim": gate.dim}},
        )
        ood = OODGate(gate, output)

    logger.info(
        "gates configured",
        extra={"fields": {"quality_gate": quality is not None, "ood_gate": ood is not None}},
    )
    return Gates(quality=quality, ood=ood)
