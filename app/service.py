"""One assessment, from uploaded bytes to result objects: decode → gates → model → words.

Synchronous and CPU-bound: the routes run it in a worker thread. Shared by the JSON API and
the server-rendered pages so both give the same answer for the same photo.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from itertools import repeat
from pathlib import Path
from typing import BinaryIO, Literal, TypedDict

import numpy as np
from PIL import Image

from app.gates import Gates, OODGate, Reason
from app.imaging import PREVIEW_MAX_SIDE, b64, fit_within, heatmap_overlay_png, preview_jpeg
from app.metrics import Metrics
from app.model import TriageModel
from app.schemas import (
    BatchItemError,
    CropBox,
    ImageInfo,
    NoteOut,
    PredictionResult,
    ReasonOut,
    RiskTierOut,
    Timings,
)
from app.settings import Settings
from app.texts import (
    DISCLAIMER,
    HEADLINES,
    ODD_SHAPE_ADVICE,
    ODD_SHAPE_MESSAGE,
    TIER_ADVICE,
    UNABLE_ADVICE_FALLBACK,
)
from app.uploads import FilePart
from model_training.preprocessing import Crop, ImageDecodeError, decode_upload, resize_to_input

logger = logging.getLogger("app.service")


@dataclass(frozen=True)
class Options:
    """Per-request switches."""

    explain: bool = False
    preview: bool = False
    crop: Crop | None = None  # the part of each photo to assess (fractions); None: all of it


class _Common(TypedDict):
    """Fields every PredictionResult of this service shares."""

    threshold: float
    model_name: str
    model_version: str
    request_id: str
    image: ImageInfo
    timings_ms: Timings
    disclaimer: str


@dataclass
class _Item:
    """Working state of one file while the request is processed."""

    index: int
    image: Image.Image | None = None  # upright RGB; reduced in size unless uploads are stored
    info: ImageInfo | None = None  # size of the photo as uploaded (upright)
    model_input: np.ndarray | None = None  # [H, W, 3] float32, from the full-size photo
    error: BatchItemError | None = None
    reasons: list[Reason] | None = None
    decode_ms: float = 0.0
    quality_ms: float = 0.0


def _reduced(img: Image.Image, max_side: int) -> Image.Image:
    """``img`` itself if small enough, else a copy whose longer side is ``max_side``."""
    if max(img.size) <= max_side:
        return img
    return img.resize(fit_within(*img.size, max_side), Image.Resampling.BILINEAR)


def shape_reasons(size: tuple[int, int], max_aspect_ratio: float) -> list[Reason]:
    """A long thin strip would be squashed out of all recognition by the model's input."""
    width, height = size
    if max(width, height) > max_aspect_ratio * max(1, min(width, height)):
        return [Reason("odd_shape", ODD_SHAPE_MESSAGE, ODD_SHAPE_ADVICE)]
    return []


# Decoding and the quality gate mostly run in Pillow and NumPy with the GIL released.
_DECODERS = ThreadPoolExecutor(max_workers=max(2, os.cpu_count() or 2), thread_name_prefix="decode")

# A heat map whose peak is below this draws (next to) nothing: "no area stood out".
_EMPTY_HEAT = 0.02


def _ms(seconds: float) -> float:
    return round(seconds * 1000.0, 2)


class TriageService:
    """Holds the loaded model and gates; turns uploads into PredictionResults."""

    def __init__(
        self, model: TriageModel, gates: Gates, settings: Settings, metrics: Metrics
    ) -> None:
        self.model = model
        self.gates = gates
        self.settings = settings
        self.metrics = metrics

    def assess(
        self,
        parts: Sequence[FilePart],
        options: Options,
        request_id: str,
        started: float,
        read_ms: float = 0.0,
    ) -> list[PredictionResult | BatchItemError]:
        """Assess every part; one entry per part, in order. ``started`` is perf_counter()."""
        if len(parts) > 1:  # decode and quality-check the files of a batch in parallel
            items = list(_DECODERS.map(self._decode_and_check, parts, repeat(options.crop)))
        else:
            items = [self._decode_and_check(part, options.crop) for part in parts]

        # One batched forward pass over every photo that passed decoding and the quality gate.
        runnable = [it for it in items if it.model_input is not None]
        inference_ms = explain_ms = 0.0
        probabilities: dict[int, float] = {}
        thresholds: dict[int, float] = {}  # a photo's own threshold (per inferred domain)
        domains: dict[int, str] = {}  # the domain each photo was read as
        outliers: set[int] = set()
        notes: dict[int, list[Reason]] = {}  # artefacts noted on assessed photos
        heatmaps: dict[int, tuple[np.ndarray, bool]] = {}  # map, shows evidence against
        if runnable:
            batch = np.stack([it.model_input for it in runnable if it.model_input is not None])
            t0 = time.perf_counter()
            inference = self.model.infer(batch)
            inference_ms = _ms(time.perf_counter() - t0)
            self.metrics.inference_seconds.observe(inference_ms / 1000.0)
            if self.gates.ood is not None and inference.embeddings is not None:
                is_outlier, _scores = self.gates.ood.check(inference.embeddings)
                outliers = {it.index for it, out in zip(runnable, is_outlier, strict=True) if out}
                for it, found in zip(
                    runnable, self.gates.ood.notes(inference.embeddings), strict=True
                ):
                    notes[it.index] = found
            for row, (it, p) in enumerate(zip(runnable, inference.probabilities, strict=True)):
                probabilities[it.index] = float(p)
                if inference.thresholds is not None:
                    thresholds[it.index] = float(inference.thresholds[row])
                if inference.domains is not None:
                    domains[it.index] = inference.domains[row]
            to_explain = [i for i, it in enumerate(runnable) if it.index not in outliers]
            if options.explain and to_explain:
                # A negative answer shows the evidence against the positive label: the map of
                # evidence for it is blank (all zero after Grad-CAM's ReLU) on a clear case.
                positive = self.model.metadata.positive_label
                against = [
                    self.model.label_for(
                        probabilities[runnable[i].index], thresholds.get(runnable[i].index)
                    )
                    != positive
                    for i in to_explain
                ]
                t0 = time.perf_counter()
                cams = None if inference.cams is None else inference.cams[to_explain]
                maps, got_against = self.model.explain(batch[to_explain], against, cams)
                explain_ms = _ms(time.perf_counter() - t0)
                for row, i in enumerate(to_explain):
                    heatmaps[runnable[i].index] = (maps[row], bool(got_against[row]))

        results: list[PredictionResult | BatchItemError] = []
        for it in items:
            if it.error is not None:
                results.append(it.error)
                continue
            assert it.image is not None and it.info is not None
            timings = Timings(
                read=read_ms,
                decode=it.decode_ms,
                quality=it.quality_ms,
                inference=inference_ms if it.index in probabilities else 0.0,
                explain=explain_ms if it.index in heatmaps else 0.0,
            )
            if it.reasons:
                result = self._rejected("unable_to_assess", it.reasons, it.info, request_id)
            elif it.index in outliers:
                result = self._rejected("not_a_lesion", [OODGate.reason()], it.info, request_id)
            else:
                result = self._assessed(
                    probabilities[it.index],
                    heatmaps.get(it.index),
                    it.info,
                    request_id,
                    thresholds.get(it.index),
                )
                result.photo_domain = domains.get(it.index)
                result.notes = [NoteOut(**vars(n)) for n in notes.get(it.index, [])]
            if options.preview:
                result.preview_jpeg_base64 = b64(preview_jpeg(it.image))
            timings.total = _ms(time.perf_counter() - started)
            result.timings_ms = timings
            self._count(result)
            if self.settings.store_uploads_dir is not None:
                self._store(it.image, result, request_id, it.index)
            results.append(result)
        return results

    # -- steps -----------------------------------------------------------------------------
    def _decode_and_check(self, part: FilePart, crop: Crop | None = None) -> _Item:
        item = _Item(index=part.index)
        if part.oversized:
            item.error = BatchItemError(
                index=part.index,
                status_code=413,
                detail=f"the file is larger than {self.settings.max_upload_bytes} bytes",
            )
            self.metrics.rejected_inputs.labels(reason="too_large").inc()
            return item
        t0 = time.perf_counter()
        try:
            decoded = decode_upload(bytes(part.data), crop=crop)
        except ImageDecodeError as exc:
            item.error = BatchItemError(index=part.index, status_code=415, detail=str(exc))
            reason = "empty_file" if not part.data else "not_an_image"
            self.metrics.rejected_inputs.labels(reason=reason).inc()
            return item
        finally:
            item.decode_ms = _ms(time.perf_counter() - t0)
            part.data = bytearray()  # drop the raw bytes (and any EXIF/GPS in them) early
        img = decoded.image  # a large JPEG arrives reduced (DCT scaling), never below 1024 px
        box = decoded.crop_box
        # The shape the model will see: the crop's, when the client cropped.
        shape = decoded.original_size if box is None else (box[2], box[3])
        item.reasons = shape_reasons(shape, self.settings.max_aspect_ratio)
        if self.gates.quality is not None:
            t0 = time.perf_counter()
            item.reasons += self.gates.quality.check(img)
            item.quality_ms = _ms(time.perf_counter() - t0)
        item.info = ImageInfo(
            width=decoded.original_size[0],
            height=decoded.original_size[1],
            crop=None
            if box is None
            else CropBox(left=box[0], top=box[1], width=box[2], height=box[3]),
        )
        if not item.reasons:
            # The model input comes from the decoded photo, exactly as in evaluation.
            item.model_input = resize_to_input(img, self.model.metadata.input_size)
        if self.settings.store_uploads_dir is None:
            # Only the preview and overlay need the photo from here on: keep a smaller copy
            # so a batch of 12-megapixel photos does not hold gigabytes of pixels.
            img = _reduced(img, max(self.settings.heatmap_max_side, PREVIEW_MAX_SIDE))
        item.image = img
        return item

    def _base(self, request_id: str, info: ImageInfo, threshold: float | None = None) -> _Common:
        meta = self.model.metadata
        return {
            "threshold": meta.threshold if threshold is None else threshold,
            "model_name": meta.name,
            "model_version": meta.version,
            "request_id": request_id,
            "image": info,
            "timings_ms": Timings(),
            "disclaimer": DISCLAIMER,
        }

    def _assessed(
        self,
        p: float,
        heat: tuple[np.ndarray, bool] | None,
        info: ImageInfo,
        request_id: str,
        threshold: float | None = None,
    ) -> PredictionResult:
        """An assessed photo's answer; ``threshold``: its own (per inferred domain), if any."""
        model = self.model
        label = model.label_for(p, threshold)
        tier = model.tier_for(p, threshold)
        advice = tier.advice or TIER_ADVICE[model.tier_position(tier, threshold)]
        positive = label == model.metadata.positive_label
        heatmap_b64 = None
        evidence: Literal["for", "against", "none"] | None = None
        if heat is not None:
            cam, against = heat
            size = fit_within(info.width, info.height, self.settings.heatmap_max_side)
            heatmap_b64 = b64(heatmap_overlay_png(cam, size))
            # Maps are scaled to a peak of 1 per image, so a lower peak means an empty map.
            if float(np.max(cam, initial=0.0)) < _EMPTY_HEAT:
                evidence = "none"
            else:
                evidence = "against" if against else "for"
        return PredictionResult(
            status="ok",
            label=label,
            probability_malignant=round(min(max(p, 0.0), 1.0), 6),
            risk_tier=RiskTierOut(
                name=tier.name, lower=tier.lower, upper=tier.upper, advice=advice
            ),
            headline=HEADLINES["positive" if positive else "negative"],
            advice=advice,
            heatmap_png_base64=heatmap_b64,
            heatmap_evidence=evidence,
            **self._base(request_id, info, threshold),
        )

    def _rejected(
        self,
        status: Literal["unable_to_assess", "not_a_lesion"],
        reasons: list[Reason],
        info: ImageInfo,
        request_id: str,
    ) -> PredictionResult:
        advice = " ".join(dict.fromkeys(r.advice for r in reasons if r.advice))
        return PredictionResult(
            status=status,
            label=None,
            probability_malignant=None,
            risk_tier=None,
            headline=HEADLINES[status],
            advice=advice or UNABLE_ADVICE_FALLBACK,
            reasons=[ReasonOut(code=r.code, message=r.message, advice=r.advice) for r in reasons],
            **self._base(request_id, info),
        )

    def _count(self, result: PredictionResult) -> None:
        if result.status == "ok":
            self.metrics.predictions.labels(label=result.label or "none").inc()
            if result.photo_domain is not None:
                self.metrics.assessed_by_domain.labels(domain=result.photo_domain).inc()
        else:
            for reason in result.reasons:
                self.metrics.rejected_inputs.labels(reason=reason.code).inc()

    def _store(
        self, img: Image.Image, result: PredictionResult, request_id: str, index: int
    ) -> None:
        """Operator opt-in: keep a metadata-free JPEG of the upload and its result."""
        assert self.settings.store_uploads_dir is not None
        day = datetime.now(UTC).strftime("%Y-%m-%d")
        folder = Path(self.settings.store_uploads_dir) / day
        stem = folder / f"{request_id}-{index}"
        try:
            folder.mkdir(parents=True, exist_ok=True, mode=0o700)
            # Re-encoded from decoded pixels, so EXIF/GPS in the original are not kept.
            with _private_file(stem.with_suffix(".jpg")) as fh:
                img.save(fh, format="JPEG", quality=95)
            record = result.model_dump(
                mode="json", exclude={"heatmap_png_base64", "preview_jpeg_base64"}
            )
            record["stored_at"] = datetime.now(UTC).isoformat()
            with _private_file(stem.with_suffix(".json")) as fh:
                fh.write(json.dumps(record, indent=2).encode("utf-8"))
        except OSError:
            # Storage is auxiliary: the user still gets the answer; the operator gets a log.
            logger.exception("could not store upload", extra={"fields": {"dir": str(folder)}})


def _private_file(path: Path) -> BinaryIO:
    """Open a new file readable by the service user only (uploads are health data)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    return os.fdopen(fd, "wb")
