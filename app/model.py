"""The loaded model: a runtime running the artifact's SavedModel endpoints, calibration, tiers.

:class:`TriageModel` reads ``metadata.json`` (validated by ``app.metadata``), loads the model on
a runtime and answers batches through a cross-request batcher: calibrated probabilities, the
decision threshold (one per inferred domain when the artifact has them), risk tiers, Grad-CAM.
The runtime (TensorFlow or OpenVINO, ``app.runtime``) is imported lazily so that ``import app``
stays cheap and a missing artifact is reported before a runtime spends seconds starting up.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from app.batching import Batcher
from app.metadata import (
    REQUIRED_OUTPUTS,
    ModelLoadError,
    ModelMetadata,
    RiskTier,
    load_domain_calibration,
    load_domain_thresholds,
)
from app.runtime import Runtime, RuntimeUnavailable, select_runtime
from model_training.preprocessing import tta_view

logger = logging.getLogger("app.model")


@dataclass
class Inference:
    """Outputs of ``serve`` for a batch (TTA already averaged)."""

    logits: np.ndarray  # [n] uncalibrated, averaged over TTA views when enabled
    probabilities: np.ndarray  # [n] calibrated
    # [n, d] serve output metadata's ood.embedding_output names (what the OOD statistics were
    # fitted on), of the un-flipped view
    embeddings: np.ndarray | None
    # [n, h, w] class-activation maps, when the runtime computes Grad-CAM forward
    cams: np.ndarray | None = None
    # [n] decision threshold of each photo's inferred domain, when the artifact has one per
    # domain (metadata domain_calibration.thresholds); None: metadata's threshold for all
    thresholds: np.ndarray | None = None
    # [n] the domain each photo was read as (metadata domain_calibration.domains), whose
    # calibration answered it; None without per-domain calibration
    domains: list[str] | None = None


@dataclass
class LoadReport:
    """How long the model took to become usable (exported as metrics and on /model)."""

    load_seconds: float = 0.0
    warmup_seconds: float = 0.0
    loaded_at: float = field(default_factory=time.time)


class TriageModel:
    """A loaded artifact, run by a runtime (``app.runtime``) behind a cross-request batcher.

    No lock spans a request: concurrent requests decode and pass the gates in parallel, and
    their model inputs meet in the batcher (``app.batching``), which runs as many batches at
    once as the runtime can (TensorFlow: one; OpenVINO: one per stream).
    """

    def __init__(
        self,
        runtime: Runtime,
        metadata: ModelMetadata,
        model_dir: Path,
        max_batch: int = 8,
        max_wait_ms: float = 2.0,
        in_flight: Callable[[], int] | None = None,
    ) -> None:
        self.runtime = runtime
        self.metadata = metadata
        self.model_dir = model_dir
        self.report = LoadReport()
        self.domain_calibration = load_domain_calibration(metadata, model_dir)
        self.domain_thresholds = load_domain_thresholds(metadata, self.domain_calibration)
        self.batch_sizes: list[int] = []  # recent batch sizes (metrics; bounded below)
        self._batcher = Batcher(
            runtime.serve,
            max_batch=max_batch,
            max_wait_s=max_wait_ms / 1000.0,
            workers=runtime.parallel,
            on_batch=self._record_batch,
            in_flight=in_flight,
        )

    def _record_batch(self, size: int) -> None:
        self.batch_sizes.append(size)
        if len(self.batch_sizes) > 1000:
            del self.batch_sizes[:500]

    # -- loading ---------------------------------------------------------------------------
    @classmethod
    def load(
        cls,
        model_dir: Path,
        runtime: str = "auto",
        max_batch: int = 8,
        max_wait_ms: float = 2.0,
        streams: int = 0,
        in_flight: Callable[[], int] | None = None,
    ) -> TriageModel:
        """Read metadata.json, load the model on ``runtime`` (see app.runtime; no warm-up).
        ``in_flight``: how many requests are being assessed (the batcher waits for company
        only while one of them has not brought its photos yet)."""
        started = time.perf_counter()
        model_dir = Path(model_dir)
        meta_path = model_dir / "metadata.json"
        saved_path = model_dir / "saved_model"
        if not model_dir.is_dir():
            raise ModelLoadError(f"model directory {model_dir.resolve()} does not exist")
        if not meta_path.is_file():
            raise ModelLoadError(f"{meta_path} is missing")
        if not (saved_path / "saved_model.pb").is_file():
            raise ModelLoadError(f"{saved_path} is not a SavedModel (no saved_model.pb)")
        try:
            raw = json.loads(meta_path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise ModelLoadError(f"{meta_path} is not valid JSON: {exc}") from exc
        if not isinstance(raw, dict):
            raise ModelLoadError(f"{meta_path} must hold a JSON object")
        metadata = ModelMetadata.from_dict(raw)

        try:
            chosen = select_runtime(raw, model_dir, runtime, streams)
        except RuntimeUnavailable as exc:
            raise ModelLoadError(str(exc)) from exc
        saved = getattr(chosen, "saved", None)
        if saved is not None:  # TensorFlow: check the endpoints against metadata now
            for endpoint in REQUIRED_OUTPUTS:
                if not callable(getattr(saved, endpoint, None)):
                    raise ModelLoadError(f"SavedModel at {saved_path} has no `{endpoint}` endpoint")
                _check_input_signature(getattr(saved, endpoint), endpoint, metadata)
        logger.info(
            "model runtime",
            extra={"fields": {"runtime": chosen.name, "precision": chosen.precision}},
        )
        model = cls(
            chosen, metadata, model_dir, max_batch=max_batch, max_wait_ms=max_wait_ms,
            in_flight=in_flight,
        )  # fmt: skip
        model.report.load_seconds = time.perf_counter() - started
        return model

    def close(self) -> None:
        """Stop the batcher and release the runtime."""
        self._batcher.close()
        self.runtime.close()

    def warm_up(self) -> None:
        """Run one dummy batch through serve and explain and check the outputs' shapes.

        The first call of a restored function traces and allocates; doing it here keeps that
        latency (and any shape mismatch) out of the first user's request.
        """
        started = time.perf_counter()
        h, w = self.metadata.input_size
        dummy = np.full((1, h, w, 3), 128.0, dtype=np.float32)
        served = self._batcher.run(dummy)
        explained = self.runtime.explain(dummy)
        for endpoint, outputs in (("serve", served), ("explain", explained)):
            missing = [k for k in self.metadata.endpoints[endpoint] if k not in outputs]
            if missing:
                raise ModelLoadError(f"endpoint {endpoint} did not return {missing}")
            logit = outputs["logit"]
            if logit.shape != (1,) or not np.all(np.isfinite(logit)):
                raise ModelLoadError(f"{endpoint}.logit must be a finite [batch] vector")
        for name in dict.fromkeys(("embedding", self.metadata.ood_embedding_output)):
            if name in served and served[name].ndim != 2:
                raise ModelLoadError(f"serve.{name} must be [batch, features]")
        if explained["heatmap"].ndim != 3 or explained["heatmap"].shape[0] != 1:
            raise ModelLoadError("explain.heatmap must be [batch, h, w]")
        self.report.warmup_seconds = time.perf_counter() - started

    def _call(self, endpoint: str, batch: np.ndarray) -> dict[str, np.ndarray]:
        """One unbatched call of the runtime's ``serve`` or ``explain`` (checks and tests)."""
        run = self.runtime.serve if endpoint == "serve" else self.runtime.explain
        return run(np.ascontiguousarray(batch, dtype=np.float32))

    def calibrate(self, logits: np.ndarray) -> np.ndarray:
        """Calibrated probability: sigmoid((logit + logit_bias) / temperature)."""
        shifted = np.asarray(logits, dtype=np.float64) + self.metadata.logit_bias
        z = np.clip(shifted / self.metadata.temperature, -60, 60)
        return np.asarray(1.0 / (1.0 + np.exp(-z)))

    def infer(self, batch: np.ndarray) -> Inference:
        """Run ``serve`` on a [n, H, W, 3] float32 0..255 batch, with TTA if metadata asks."""
        views = [batch, *(tta_view(batch, flip) for flip in self.metadata.tta_flips)]
        outputs = self._batcher.run(np.concatenate(views, axis=0) if len(views) > 1 else batch)
        n = batch.shape[0]
        # Average logits (not probabilities) over the views, as the contract states.
        logits = outputs["logit"].reshape(len(views), n).mean(axis=0)
        # The output the OOD statistics were fitted on (metadata ood.embedding_output).
        embedding = outputs.get(self.metadata.ood_embedding_output)
        dc = self.domain_calibration
        domains = None
        if dc is None:
            probabilities, thresholds = self.calibrate(logits), None
        else:
            # Per-domain calibration reads the domain off the un-flipped view's output.
            features = outputs[dc.embedding_output][:n]
            probabilities, thresholds, second = dc.answer_and_read(
                logits, features, self.domain_thresholds
            )
            domains = [dc.domains[int(s)] for s in second]
        cams = outputs.get("cam") if self.runtime.forward_cam else None
        return Inference(
            logits=logits,
            probabilities=probabilities,
            embeddings=None if embedding is None else embedding[:n],
            cams=None if cams is None else cams[:n],
            thresholds=thresholds,
            domains=domains,
        )

    def explain(
        self,
        batch: np.ndarray,
        against: Sequence[bool] | None = None,
        cams: np.ndarray | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Grad-CAM maps [n, h, w] in 0..1 for the un-flipped images, and which rows got the
        map of evidence *against* the positive label ([n] bool).

        ``heatmap`` is the evidence for the positive label; for a clearly negative photo it is
        all zero after the ReLU, so a negative answer asks (``against[i]``) for
        ``heatmap_benign``, the same Grad-CAM with the sign flipped. Artifacts whose
        ``endpoints.explain`` lacks it fall back to ``heatmap`` (the returned flags say so).
        ``cams``: the class-activation maps ``infer`` already got from a runtime that
        computes Grad-CAM forward (``Inference.cams``); then no model call is made.
        """
        explain_from = getattr(self.runtime, "explain_from", None)
        if cams is not None and explain_from is not None:
            outputs = explain_from({"cam": cams, "logit": np.zeros(len(cams), np.float32)})
        else:
            outputs = self.runtime.explain(np.ascontiguousarray(batch))
        heat = outputs["heatmap"]
        wanted = np.zeros(heat.shape[0], dtype=bool)
        if against is not None:
            wanted = np.asarray(against, dtype=bool).reshape(heat.shape[0])
        benign = None
        if "heatmap_benign" in self.metadata.endpoints["explain"]:
            benign = outputs.get("heatmap_benign")
        if benign is None or benign.shape != heat.shape:
            wanted = np.zeros_like(wanted)
        else:
            heat = np.where(wanted[:, None, None], benign, heat)
        return np.clip(np.nan_to_num(heat.astype(np.float32)), 0.0, 1.0), wanted

    # -- interpretation --------------------------------------------------------------------
    def label_for(self, probability: float, threshold: float | None = None) -> str:
        """Positive label when ``probability >= threshold`` (default: metadata's; a photo's own
        is ``Inference.thresholds`` when the artifact has one per domain)."""
        meta = self.metadata
        cut = meta.threshold if threshold is None else threshold
        return meta.positive_label if probability >= cut else meta.negative_label

    def tiers_for(self, threshold: float | None = None) -> tuple[RiskTier, ...]:
        """The risk tiers with the decision threshold at ``threshold``: the tier boundary at
        metadata's threshold moves there (load checked it stays inside its neighbours), so
        the lowest tier is always exactly what the label calls negative."""
        tiers = self.metadata.risk_tiers
        old = self.metadata.threshold
        if threshold is None or threshold == old:
            return tiers
        return tuple(
            replace(
                t,
                lower=threshold if math.isclose(t.lower, old, abs_tol=1e-12) else t.lower,
                upper=threshold if math.isclose(t.upper, old, abs_tol=1e-12) else t.upper,
            )
            for t in tiers
        )

    def tier_for(self, probability: float, threshold: float | None = None) -> RiskTier:
        """The tier whose [lower, upper) holds ``probability`` (the top tier includes 1.0)."""
        tiers = self.tiers_for(threshold)
        for tier in tiers:
            if tier.lower <= probability < tier.upper:
                return tier
        return tiers[-1]

    def tier_position(self, tier: RiskTier, threshold: float | None = None) -> str:
        """Where a tier sits relative to the threshold: 'above', 'lowest' or 'between'.

        Used to pick default advice wording without relying on tier names.
        """
        cut = self.metadata.threshold if threshold is None else threshold
        if tier.lower >= cut - 1e-12:
            return "above"
        if tier.name == self.metadata.risk_tiers[0].name:
            return "lowest"
        return "between"


def _check_input_signature(function: Any, endpoint: str, metadata: ModelMetadata) -> None:
    """Compare the endpoint's traced input shape with metadata's input size, when visible."""
    concrete: Sequence[Any] = getattr(function, "concrete_functions", None) or ()
    expected = (metadata.input_height, metadata.input_width, 3)
    for fn in concrete:
        try:
            args, kwargs = fn.structured_input_signature
            spec = args[0] if args else next(iter(kwargs.values()))
            shape = tuple(spec.shape.as_list())
        except (AttributeError, IndexError, StopIteration, TypeError, ValueError):
            continue  # unusual signature: the warm-up still checks the real call
        if len(shape) != 4 or any(
            s is not None and s != e for s, e in zip(shape[1:], expected, strict=True)
        ):
            raise ModelLoadError(
                f"endpoint {endpoint} takes input {shape}, but metadata says "
                f"[batch, {expected[0]}, {expected[1]}, 3]"
            )
