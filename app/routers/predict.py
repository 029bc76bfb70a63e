"""The JSON prediction API."""

from __future__ import annotations

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


def _options(form: ParsedForm, explain: bool, preview: bool) -> Options:
    return Options(
        explain=form_flag(form, "explain") or explain,
        preview=form_flag(form, "preview") or preview,
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
        form_fields=_FLAG_FIELDS,
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
        _options(form, explain, preview),
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
        form_fields=_FLAG_FIELDS,
        file_fields=("files",),
        max_file_bytes=settings.max_upload_bytes,
        max_body_bytes=settings.max_batch_bytes,
        max_files=settings.max_batch_files,
        too_many_files=HTTPException(
            status_code=413, detail=f"at most {settings.max_batch_files} files per batch"
        ),
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
