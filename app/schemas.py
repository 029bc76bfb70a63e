"""Response models: they define the JSON contract and the OpenAPI documentation."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

Status = Literal["ok", "unable_to_assess", "not_a_lesion"]


class RiskTierOut(BaseModel):
    """The probability band the result falls in and what to do about it."""

    name: str = Field(examples=["moderate"])
    lower: float = Field(ge=0, le=1, examples=[0.1])
    upper: float = Field(ge=0, le=1, examples=[0.31])
    advice: str = Field(examples=["Some features are borderline. Ask a doctor to look at it..."])


class ReasonOut(BaseModel):
    """Why a photo was not assessed."""

    code: str = Field(examples=["too_blurry"])
    message: str = Field(examples=["The photo is out of focus."])
    advice: str = Field(examples=["Hold the phone steady and tap the spot to focus."])


class NoteOut(BaseModel):
    """Something in an assessed photo that can change the estimate (the answer still comes)."""

    code: str = Field(examples=["hair"], description="hair | ink | ruler")
    message: str = Field(examples=["Hair seems to cover part of the spot. ..."])
    advice: str = Field(examples=["If you can, gently part or trim the hair ..."])


class CropBox(BaseModel):
    """The part of the photo that was assessed, in the upright photo's pixels."""

    left: int = Field(ge=0, examples=[1012])
    top: int = Field(ge=0, examples=[1816])
    width: int = Field(ge=1, examples=[1000])
    height: int = Field(ge=1, examples=[1000])


class ImageInfo(BaseModel):
    """Size of the photo as the server saw it: upright (EXIF orientation applied)."""

    width: int = Field(examples=[3024])
    height: int = Field(examples=[4032])
    crop: CropBox | None = Field(
        default=None, description="The part assessed when the request asked for a `crop`"
    )


class Timings(BaseModel):
    """Server-side time spent, in milliseconds.

    ``inference`` and ``explain`` are the shared model calls of the whole request (one batched
    call for /predict/batch), ``total`` the time from the start of the request.
    """

    read: float = Field(default=0.0, description="receiving the upload", examples=[3.1])
    decode: float = Field(default=0.0, examples=[12.4])
    quality: float = Field(default=0.0, examples=[4.0])
    inference: float = Field(default=0.0, examples=[180.2])
    explain: float = Field(default=0.0, examples=[0.0])
    total: float = Field(default=0.0, examples=[204.7])


class PredictionResult(BaseModel):
    """The assessment of one photo."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "status": "ok",
                    "label": "benign",
                    "probability_malignant": 0.18,
                    "threshold": 0.31,
                    "risk_tier": {
                        "name": "moderate",
                        "lower": 0.1,
                        "upper": 0.31,
                        "advice": "Some features are borderline. Ask a doctor to look at it...",
                    },
                    "headline": "No strong features of concern were found in this photo",
                    "advice": "Some features are borderline. Ask a doctor to look at it...",
                    "reasons": [],
                    "model_name": "isic-inceptionv3",
                    "model_version": "1.0.0",
                    "request_id": "5f0c3c1f9b8e4d7a9e1d2c3b4a596877",
                    "image": {"width": 1024, "height": 768},
                    "timings_ms": {
                        "read": 2.0,
                        "decode": 11.0,
                        "quality": 3.0,
                        "inference": 170.0,
                        "explain": 0.0,
                        "total": 190.0,
                    },
                    "disclaimer": "This is not a diagnosis. ...",
                },
                {
                    "status": "unable_to_assess",
                    "label": None,
                    "probability_malignant": None,
                    "threshold": 0.31,
                    "risk_tier": None,
                    "headline": "We could not assess this photo",
                    "advice": "Hold the phone steady and tap the spot to focus.",
                    "reasons": [
                        {
                            "code": "too_blurry",
                            "message": "The photo is out of focus.",
                            "advice": "Hold the phone steady and tap the spot to focus.",
                        }
                    ],
                    "model_name": "isic-inceptionv3",
                    "model_version": "1.0.0",
                    "request_id": "0d9a0b8f1e2c4a6b8c0d1e2f3a4b5c6d",
                    "image": {"width": 640, "height": 480},
                    "timings_ms": {"decode": 5.0, "quality": 2.0, "total": 8.0},
                    "disclaimer": "This is not a diagnosis. ...",
                },
            ]
        }
    )

    status: Status = Field(
        description="ok: assessed; unable_to_assess: photo unusable (see reasons); "
        "not_a_lesion: photo unlike the lesion photos the model knows"
    )
    label: str | None = Field(
        description="The model's label (one of metadata labels), null unless status is ok",
        examples=["benign"],
    )
    probability_malignant: float | None = Field(
        ge=0,
        le=1,
        description="Calibrated probability of the positive label; null unless status is ok",
        examples=[0.18],
    )
    threshold: float = Field(
        description="label is the positive one when probability_malignant >= threshold",
        examples=[0.31],
    )
    risk_tier: RiskTierOut | None = None
    photo_domain: str | None = Field(
        default=None,
        description="Only with status ok, when the model calibrates per kind of photo: the "
        "kind this photo was read as (one of the model's domain_calibration.domains, such as "
        "dermoscopy or phone), whose calibration and threshold answered it; null otherwise",
        examples=["phone"],
    )
    headline: str = Field(description="The result in plain words")
    advice: str | None = Field(default=None, description="What to do next")
    reasons: list[ReasonOut] = Field(
        default_factory=list, description="Why the photo was not assessed (empty when ok)"
    )
    notes: list[NoteOut] = Field(
        default_factory=list,
        description="Only with status ok: hair, ink or a ruler detected in the photo, which "
        "can change the estimate, each with how to retake the photo (empty when none)",
    )
    model_name: str
    model_version: str = Field(examples=["1.0.0"])
    request_id: str
    image: ImageInfo | None = None
    timings_ms: Timings
    heatmap_png_base64: str | None = Field(
        default=None,
        description="Only with explain=true and status ok: Grad-CAM overlay, an RGBA PNG with "
        "the photo's aspect ratio (longer side capped), transparent where the model did not "
        "look; draw it over the photo. Which evidence it shows: see heatmap_evidence.",
    )
    heatmap_evidence: Literal["for", "against", "none"] | None = Field(
        default=None,
        description="Only with heatmap_png_base64. for: areas that raised the probability of "
        "the positive label (shown for a positive label, and for a negative one when the "
        "artifact has no heatmap_benign); against: areas that lowered it (shown for a negative "
        "label); none: no area stood out (the overlay is fully transparent).",
        examples=["against"],
    )
    preview_jpeg_base64: str | None = Field(
        default=None,
        description="Only with preview=true: the upright photo as the server saw it, "
        "downscaled, re-encoded without any metadata (for clients that cannot show HEIC).",
    )
    disclaimer: str

    def public_dict(self) -> dict[str, Any]:
        """JSON-ready dict without the image fields that were not asked for."""
        data = self.model_dump(mode="json")
        for key in ("heatmap_png_base64", "heatmap_evidence", "preview_jpeg_base64"):
            if data.get(key) is None:
                data.pop(key, None)
        if data.get("image") and data["image"].get("crop") is None:
            data["image"].pop("crop", None)  # only a cropped request says what it assessed
        return data


class BatchItemError(BaseModel):
    """A file of a batch that could not be processed at all (the others still are)."""

    status: Literal["error"] = "error"
    index: int = Field(description="Position of the file in the request, from 0", examples=[2])
    status_code: int = Field(
        description="The HTTP status /predict would have answered", examples=[415]
    )
    detail: str = Field(examples=["the file is not a decodable image"])


BatchItem = Annotated[PredictionResult | BatchItemError, Field(discriminator="status")]


class BatchResponse(BaseModel):
    """One entry per uploaded file, in upload order."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "request_id": "5f0c3c1f9b8e4d7a9e1d2c3b4a596877",
                    "model_version": "1.0.0",
                    "count": 2,
                    "results": [
                        {
                            "status": "ok",
                            "label": "malignant",
                            "probability_malignant": 0.62,
                            "threshold": 0.31,
                            "risk_tier": {
                                "name": "high",
                                "lower": 0.31,
                                "upper": 1.0,
                                "advice": "Please make an appointment with a doctor...",
                            },
                            "headline": "Features of concern found: please have this spot "
                            "checked by a doctor",
                            "advice": "Please make an appointment with a doctor...",
                            "reasons": [],
                            "model_name": "isic-inceptionv3",
                            "model_version": "1.0.0",
                            "request_id": "5f0c3c1f9b8e4d7a9e1d2c3b4a596877",
                            "image": {"width": 1024, "height": 768},
                            "timings_ms": {"decode": 10.0, "inference": 310.0, "total": 340.0},
                            "disclaimer": "This is not a diagnosis. ...",
                        },
                        {
                            "status": "error",
                            "index": 1,
                            "status_code": 415,
                            "detail": "the file is not a decodable image",
                        },
                    ],
                }
            ]
        }
    )

    request_id: str
    model_version: str
    count: int
    results: list[BatchItem]


class ErrorResponse(BaseModel):
    """Every error answer: a human-readable ``detail`` (a list for field validation errors)."""

    detail: str | list[Any] = Field(examples=["the file is not a decodable image"])


class HealthResponse(BaseModel):
    """Liveness / readiness answer."""

    status: Literal["ok"] = "ok"
    model_version: str | None = None


class ServerModelInfo(BaseModel):
    """What the server measured while loading the model."""

    load_seconds: float
    warmup_seconds: float
    loaded_at: str
    gates: dict[str, bool]


class ModelInfo(BaseModel):
    """The artifact's metadata.json as loaded, plus how the server loaded it."""

    model_config = ConfigDict(
        extra="allow",
        json_schema_extra={
            "examples": [
                {
                    "schema_version": 1,
                    "name": "isic-inceptionv3",
                    "version": "1.0.0",
                    "labels": ["benign", "malignant"],
                    "positive_label": "malignant",
                    "input": {"height": 299, "width": 299, "channels": 3},
                    "temperature": 1.0,
                    "threshold": 0.31,
                    "risk_tiers": [
                        {"name": "low", "lower": 0.0, "upper": 0.1},
                        {"name": "moderate", "lower": 0.1, "upper": 0.31},
                        {"name": "high", "lower": 0.31, "upper": 1.0},
                    ],
                    "server": {
                        "load_seconds": 4.2,
                        "warmup_seconds": 1.3,
                        "loaded_at": "2026-11-26T15:00:00Z",
                        "gates": {"quality": True, "ood": True},
                    },
                }
            ]
        },
    )

    schema_version: int
    name: str
    version: str
    labels: list[str]
    positive_label: str
    threshold: float
    risk_tiers: list[dict[str, Any]]
    server: ServerModelInfo


RETRY_AFTER = {
    "Retry-After": {"description": "Seconds to wait before retrying", "schema": {"type": "string"}}
}
# Shared OpenAPI error documentation for the prediction routes.
PREDICT_ERRORS: dict[int | str, dict[str, Any]] = {
    400: {
        "model": ErrorResponse,
        "description": "Malformed multipart body (bad boundary, no closing boundary, too many "
        "parts, a form field too long)",
    },
    408: {
        "model": ErrorResponse,
        "description": "The body took longer than body_timeout_s, or arrived slower than "
        "body_min_rate_bytes per second",
    },
    413: {"model": ErrorResponse, "description": "Upload larger than the configured limit"},
    415: {
        "model": ErrorResponse,
        "description": "Not multipart, not a decodable image, or an image with more pixels "
        "than the server decodes",
    },
    422: {
        "model": ErrorResponse,
        "description": "Missing or empty file, a file sent as a text field, or a flag that is "
        "not a boolean (or sent twice)",
    },
    503: {
        "model": ErrorResponse,
        "description": "Model not loaded yet, the server is shutting down, or the assessment "
        "queue is full: retry after Retry-After seconds",
        "headers": RETRY_AFTER,
    },
}
