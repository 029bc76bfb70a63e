"""The answer the server gives for the network's outputs, for measurements made offline.

The server calibrates a logit with the artifact's per-domain calibration when it has one
(``domain_calibration`` in metadata.json: the domain read off a serve output, one Platt
scaling and one threshold per domain) and with the single temperature otherwise. Figures
about how answers change (artefacts, degraded photos) must use the same answer, or they
describe a model that is not served.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from model_training.calibration import calibrate
from model_training.domain_calibration import DomainCalibration


@dataclass(frozen=True)
class ServedAnswer:
    """Calibration and threshold(s) exactly as the artifact's metadata gives them."""

    logit_bias: float
    temperature: float
    threshold: float
    domain: DomainCalibration | None = None
    domain_thresholds: tuple[float, float] | None = None  # (first, second domain)

    @classmethod
    def of(cls, artifact: Path, meta: Mapping[str, Any]) -> ServedAnswer:
        """From an artifact folder and its metadata.json."""
        spec = meta.get("domain_calibration")
        domain = DomainCalibration.load(artifact / str(spec["file"])) if spec else None
        per = (spec or {}).get("thresholds")
        thresholds = (
            (float(per[domain.domains[0]]), float(per[domain.domains[1]]))
            if per and domain is not None
            else None
        )
        return cls(
            float(meta.get("logit_bias", 0.0)),
            float(meta.get("temperature", 1.0)),
            float(meta["threshold"]),
            domain,
            thresholds,
        )

    @property
    def output(self) -> str | None:
        """The serve output the domain is read from (None: single calibration)."""
        return None if self.domain is None else self.domain.embedding_output

    def answer(
        self, logits: np.ndarray, outputs: Mapping[str, np.ndarray]
    ) -> tuple[np.ndarray, np.ndarray]:
        """(calibrated probabilities, each image's decision threshold) for [n] logits;
        ``outputs`` holds the serve output named by :attr:`output` when there is one."""
        logits = np.asarray(logits, dtype=np.float64).reshape(-1)
        if self.domain is None:
            p = calibrate(logits, self.logit_bias, self.temperature)
            return p, np.full(len(logits), self.threshold)
        features = outputs[self.domain.embedding_output]
        p, thresholds = self.domain.answer(logits, features, self.domain_thresholds)
        return p, np.full(len(logits), self.threshold) if thresholds is None else thresholds
