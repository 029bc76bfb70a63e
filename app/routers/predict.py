"""The JSON prediction API."""

from __future__ import annotations

import re
import time
from collections.abc import Sequence
from typing import Annotated, Any

from fastapi import APIRouter, HTTPException, Query, Request
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from app.admission import Admission
from app.deps import AdmissionDep, MetricsDep, RequestIdDep, ServiceDep, SettingsDep
from app.schemas import PREDICT_ERRORS, BatchItemError, BatchResponse, PredictionResult
from app.service import Options, TriageService
from app.uploads import (
    MULTIPART_OVERHEAD,
    ParsedForm,
    empty_files_error,
    form_flag,
    missing_field,
    read_upload,
)
from model_training.preprocessing import Crop

router = APIRouter(tags=["prediction"])

_FLAG_FIELDS = ("explain", "preview")
# Results are health information about one person: no shared or browser caches.
NO_STORE = {"Cache-Control": "no-store"}
_FLAGS_DOC = {
    "explain": {
        "type": "boolean",
        "default": False,
        "description": "Also return the Grad-CAM heat map (also accepted as a query "
        "parameter, read by the same rules)",
    },
    "preview": {
        "type": "boolean",
        "default": False,
        "description": "Also return an upright, metadata-free JPEG preview of the photo; "
        "a boolean as for `explain`",
    },
}
CROP_DOC = (
    "Assess only this part of the photo: `left,top,width,height` as fractions (0-1) of the "
    "upright photo, e.g. `0.3,0.4,0.25,0.25` (also accepted as a form field, which wins). A "
    "part that overhangs the right or bottom edge is moved inside, as the upload page keeps "
    "its square inside. The preview and heat map are of that part; `image.crop` gives it in "
    "pixels."
)
# Four plain decimals in [0, 1], the width and height above 0: the schema says all the server
# checks, so a client (or a schema-driven test) can tell a valid crop without trying it.
_UNIT = r"(0(\.[0-9]+)?|1(\.0+)?)"
_POSITIVE = r"(0\.[0-9]*[1-9][0-9]*|1(\.0+)?)"
CROP_PATTERN = rf"^{_UNIT},{_UNIT},{_POSITIVE},{_POSITIVE}$"
_CROP_FIELD = {
    "type": "string",
    "pattern": CROP_PATTERN,
    "description": CROP_DOC,
    "examples": ["0.3,0.4,0.25,0.25"],
}
_IMAGE_TYPES = "image/jpeg, image/png, image/webp, image/heic, image/heif, image/*"

_SINGLE_BODY: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["file"],
                    "properties": {
                        "file": {
                            "type": "string",
                            "format": "binary",
                            "minLength": 1,
                            "description": "The photo: JPEG, PNG, WebP, HEIC/HEIF, ...",
                        },
                        **_FLAGS_DOC,
                        "crop": _CROP_FIELD,
                    },
                },
                "encoding": {"file": {"contentType": _IMAGE_TYPES}},
            }
        },
    }
}
_BATCH_BODY: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["files"],
                    "properties": {
                        "files": {
                            "type": "array",
                            "minItems": 1,
                            "items": {"type": "string", "format": "binary", "minLength": 1},
                            "description": "Several photos, each one part named `files`",
                        },
                        **_FLAGS_DOC,
                    },
                },
                "encoding": {"files": {"contentType": _IMAGE_TYPES}},
            }
        },
    }
}

ExplainQuery = Annotated[
    bool, Query(description="Also return the Grad-CAM heat map overlay (slower)")
]
PreviewQuery = Annotated[
    bool, Query(description="Also return an upright, metadata-free JPEG preview")
]


CropQuery = Annotated[
    str | None,
    Query(description=CROP_DOC, pattern=CROP_PATTERN, examples=["0.3,0.4,0.25,0.25"]),
]


def parse_crop(text: str) -> Crop:
    """``left,top,width,height`` in fractions of the photo, moved inside it where it
    overhangs; ValueError when ``text`` does not match CROP_PATTERN."""
    if not re.fullmatch(CROP_PATTERN, text):
        raise ValueError(
            "give four numbers from 0 to 1, left,top,width,height, the width and height above 0"
        )
    left, top, width, height = (float(v) for v in text.split(","))
    return min(left, 1.0 - width), min(top, 1.0 - height), width, height


def _crop(form: ParsedForm, query: str | None) -> Crop | None:
    """The request's crop (form field first, then query), or a 422 like a bad query value's."""
    where, text = ("body", form.fields["crop"]) if "crop" in form.fields else ("query", query)
    if text is None:
        return None
    try:
        if where == "body" and "crop" in form.repeated:
            raise ValueError("send the crop once")
        return parse_crop(text)
    except ValueError as exc:
        raise HTTPException(
            status_code=422,
            detail=[
                {
                    "type": "value_error",
                    "loc": [where, "crop"],
                    "msg": f"Invalid crop: {exc}",
                    "input": text,
                }
            ],
        ) from exc


def _options(form: ParsedForm, explain: bool, preview: bool, crop: Crop | None = None) -> Options:
    return Options(
        explain=form_flag(form, "explain") or explain,
        preview=form_flag(form, "preview") or preview,
        crop=crop,
    )


def _outcome(results: Sequence[PredictionResult | BatchItemError]) -> str:
    """Short summary for the request log line (labels and statuses only, no data)."""
    parts = []
    for r in results:
        if isinstance(r, BatchItemError):
            parts.append(f"error:{r.status_code}")
        else:
            parts.append(r.label if r.status == "ok" and r.label else r.status)
    return ",".join(parts)


async def _assess(
    request: Request,
    admission: Admission,
    service: TriageService,
    form: ParsedForm,
    field: str,
    options: Options,
    request_id: str,
    started: float,
) -> list[PredictionResult | BatchItemError]:
    """Shared by /predict and /predict/batch: refuse a form without ``field``, assess its
    files off the event loop once admitted (503 when the queue is full), record the
    request's outcome for the access log."""
    read_ms = round((time.perf_counter() - started) * 1000.0, 2)
    if not form.files:
        request.state.outcome = f"rejected:missing_{field}"
        raise missing_field(field, sent_as_text=field in form.not_files)
    empty = empty_files_error(field, form.files)
    if empty is not None:
        request.state.outcome = "rejected:empty_file"
        raise empty
    async with admission.slot():
        results = await run_in_threadpool(
            service.assess, form.files, options, request_id, started, read_ms
        )
    request.state.outcome = _outcome(results)
    return results


@router.post(
    "/predict",
    response_model=PredictionResult,
    summary="Assess one photo",
    responses=PREDICT_ERRORS,
    openapi_extra=_SINGLE_BODY,
)
async def predict(
    request: Request,
    service: ServiceDep,
    admission: AdmissionDep,
    settings: SettingsDep,
    metrics: MetricsDep,
    request_id: RequestIdDep,
    explain: ExplainQuery = False,
    preview: PreviewQuery = False,
    crop: CropQuery = None,
) -> JSONResponse:
    """Upload one photo of a skin lesion as multipart field `file`.

    Returns a calibrated probability, the label by the model's threshold, the risk tier
    with advice, or `unable_to_assess` / `not_a_lesion` with reasons when the photo cannot
    be assessed. Example: `curl -F file=@mole.jpg 'http://127.0.0.1:8000/predict?explain=true'`
    """
    started = time.perf_counter()
    form = await read_upload(
        request,
        metrics,
        form_fields=(*_FLAG_FIELDS, "crop"),
        file_fields=("file",),
        max_file_bytes=settings.max_upload_bytes,
        max_body_bytes=settings.max_upload_bytes + MULTIPART_OVERHEAD,
        max_files=1,
        too_many_files=HTTPException(
            status_code=422, detail="send one file in `file`; use /predict/batch for several"
        ),
    )
    [result] = await _assess(
        request,
        admission,
        service,
        form,
        "file",
        _options(form, explain, preview, _crop(form, crop)),
        request_id,
        started,
    )
    if isinstance(result, BatchItemError):
        raise HTTPException(status_code=result.status_code, detail=result.detail)
    return JSONResponse(result.public_dict(), headers=NO_STORE)


@router.post(
    "/predict/batch",
    response_model=BatchResponse,
    summary="Assess several photos in one request",
    responses={
        **PREDICT_ERRORS,
        413: {
            "model": PREDICT_ERRORS[413]["model"],
            "description": "More than max_batch_files files, or the body over max_batch_bytes",
        },
    },
    openapi_extra=_BATCH_BODY,
)
async def predict_batch(
    request: Request,
    service: ServiceDep,
    admission: AdmissionDep,
    settings: SettingsDep,
    metrics: MetricsDep,
    request_id: RequestIdDep,
    explain: ExplainQuery = False,
    preview: PreviewQuery = False,
) -> JSONResponse:
    """Upload several photos, each as a multipart part named `files`.

    `results` has one entry per file, in order: a result as from /predict, or an error
    object (`status: "error"`, `status_code`, `detail`) for a file that is not an image or
    too large. The photos are run through the model in one batch.
    """
    started = time.perf_counter()
    form = await read_upload(
        request,
        metrics,
        form_fields=(*_FLAG_FIELDS, "crop"),
        file_fields=("files",),
        max_file_bytes=settings.max_upload_bytes,
        max_body_bytes=settings.max_batch_bytes,
        max_files=settings.max_batch_files,
        too_many_files=HTTPException(
            status_code=413, detail=f"at most {settings.max_batch_files} files per batch"
        ),
    )
    if "crop" in form.fields or "crop" in request.query_params:
        # One crop cannot fit several photos; ignoring it would answer on the wrong part.
        raise HTTPException(
            status_code=422, detail="`crop` is for one photo: send each to /predict with its own"
        )
    results = await _assess(
        request,
        admission,
        service,
        form,
        "files",
        _options(form, explain, preview),
        request_id,
        started,
    )
    body = {
        "request_id": request_id,
        "model_version": service.model.metadata.version,
        "count": len(results),
        "results": [
            r.public_dict() if isinstance(r, PredictionResult) else r.model_dump(mode="json")
            for r in results
        ],
    }
    return JSONResponse(body, headers=NO_STORE)
