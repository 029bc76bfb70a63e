"""Server-rendered pages: upload, result (works without JavaScript) and about."""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

from fastapi import APIRouter, HTTPException, Request
from fastapi.responses import HTMLResponse
from markdown_it import MarkdownIt
from starlette.concurrency import run_in_threadpool

from app.deps import (
    AdmissionDep,
    MetricsDep,
    OptionalServiceDep,
    RequestIdDep,
    SettingsDep,
    TemplatesDep,
)
from app.metadata import RiskTier
from app.routers.model import model_info
from app.schemas import BatchItemError, PredictionResult
from app.service import Options, TriageService
from app.settings import Settings
from app.texts import (
    CROP_HINT,
    DISCLAIMER,
    HEATMAP_TEXTS,
    PHOTO_TIPS,
    WARNING_SIGNS,
    bound_percent,
    percent,
    photo_kind,
)
from app.uploads import MULTIPART_OVERHEAD, missing_field, read_upload

router = APIRouter(tags=["pages"], include_in_schema=True)

# The pages load nothing from third parties; inline scripts are not needed either.
CSP = (
    "default-src 'self'; img-src 'self' data: blob:; style-src 'self'; script-src 'self'; "
    "connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'; "
    "object-src 'none'"
)
PAGE_HEADERS = {"Content-Security-Policy": CSP, "Cache-Control": "no-store"}
# The crop slider's smallest square, in percent of the photo's shorter side: 5x zoom, which a
# 12-megapixel photo's 600 pixels still carry (the quality gate refuses a crop too small).
CROP_MIN_PERCENT = 20
FORM_FILE_FIELDS = ("file", "photo")
HTML_200: dict[int | str, dict[str, Any]] = {200: {"content": {"text/html": {}}}}
_HTML = {"text/html": {"schema": {"type": "string"}}}
ASSESS_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {"content": _HTML, "description": "The result page"},
    400: {"content": _HTML, "description": "Malformed multipart body"},
    408: {"content": _HTML, "description": "The upload was too slow"},
    413: {"content": _HTML, "description": "The photo is larger than the limit"},
    415: {"content": _HTML, "description": "Not a form upload, or not a decodable image"},
    422: {"content": _HTML, "description": "No photo chosen, or one in each picker"},
    503: {
        "content": _HTML,
        "description": "Starting, or busy: try again shortly",
        "headers": {"Retry-After": {"schema": {"type": "string"}}},
    },
}
_PHOTO = {"type": "string", "format": "binary", "minLength": 1}
_UNUSED = {"type": "string", "format": "binary", "maxLength": 0}
ASSESS_BODY: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "description": "The photo in exactly one of `file` (file picker) and `photo` "
                    "(camera); a browser sends the unused picker as an empty part",
                    "oneOf": [
                        {
                            "required": [chosen],
                            "properties": {
                                name: _PHOTO if name == chosen else _UNUSED
                                for name in FORM_FILE_FIELDS
                            },
                        }
                        for chosen in FORM_FILE_FIELDS
                    ],
                },
                "encoding": {name: {"contentType": "image/*"} for name in FORM_FILE_FIELDS},
            }
        },
    }
}


def render_model_card(text: str) -> str:
    """MODEL_CARD.md → HTML: CommonMark with tables, raw HTML escaped (html=False), and
    links to the artifact's ``plots/`` pointed at ``/model/plots/`` so the figures show."""
    md = MarkdownIt("commonmark", {"html": False}).enable("table")
    tokens = md.parse(text)
    for token in tokens:
        for node in [token, *(token.children or [])]:
            attr = {"image": "src", "link_open": "href"}.get(node.type)
            value = str(node.attrGet(attr) or "") if attr else ""
            if attr and value.startswith(("plots/", "./plots/")):
                node.attrSet(attr, "/model/plots/" + value.split("plots/", 1)[1])
    return md.renderer.render(tokens, md.options, {})


# Tier colours: static/style.css defines .level-0 (lowest concern) to .level-4 (highest). The
# lowest tier gets 0, the highest 4 and the others are spread evenly between (three tiers:
# 0, 2, 4), so every tier of any artifact has its own colour without knowing its name.
COLOUR_LEVELS = 5
# The estimate's marker keeps this share of its tier's segment clear of either edge, so it
# never sits on a tier boundary (where the threshold usually is).
BAR_INSET = 0.08


def tier_level(index: int, count: int) -> int:
    """Colour level (0..COLOUR_LEVELS-1) of the ``index``-th of ``count`` ascending tiers."""
    if count < 2:
        return 0
    return round(index * (COLOUR_LEVELS - 1) / (count - 1))


def bar_position(p: float, tiers: tuple[RiskTier, ...]) -> float:
    """Where the estimate ``p`` sits on the probability bar, 0..1 (static/app.js mirrors it).

    Scale choice: each risk tier gets an equal-width segment, and ``p`` is placed linearly
    inside its own tier's segment, kept BAR_INSET of the segment clear of its edges. On a
    linear 0-100% scale the shipped model's low tier (0-4.8%) was about 15 px wide on a
    phone, so a 3% and a 6% estimate both sat on the threshold line; with equal segments the
    marker is always inside its tier's colour, clear of the boundaries, and a 3% estimate is
    some 40 px from the threshold on a phone. The bar is therefore not linear in percent:
    the tick labels under each segment boundary give the real percentages, the marker
    carries its value, and the bar's text alternative says how it is drawn.
    """
    p = min(max(p, 0.0), 1.0)
    n = len(tiers)
    for i, t in enumerate(tiers):
        if p < t.upper or i == n - 1:
            inside = min(max((p - t.lower) / (t.upper - t.lower), 0.0), 1.0)
            return (i + BAR_INSET + inside * (1 - 2 * BAR_INSET)) / n
    return 1.0  # pragma: no cover - the last tier always returns


def threshold_position(threshold: float, tiers: tuple[RiskTier, ...]) -> float:
    """The threshold line on the bar: exactly on a tier boundary when it is one (usual)."""
    for i, t in enumerate(tiers):
        if math.isclose(threshold, t.lower, abs_tol=1e-9):
            return i / len(tiers)
    return bar_position(threshold, tiers)


def _svg_percent(fraction: float) -> str:
    """An SVG length as a percentage of the bar's width (no viewBox: text is not stretched)."""
    return f"{100 * fraction:.3f}%"


def _tier_views(service: TriageService, threshold: float | None) -> list[dict[str, Any]]:
    """The risk tiers as the bar draws them, with the decision threshold at ``threshold`` (a
    photo's own, when the artifact has one per photo domain; None: metadata's)."""
    tiers = service.model.tiers_for(threshold)
    n = len(tiers)
    return [
        {
            "name": t.name,
            "lower": t.lower,
            "upper": t.upper,
            "position": service.model.tier_position(t, threshold),
            "level": tier_level(i, n),
            "x": _svg_percent(i / n),
            "width": _svg_percent(1 / n),
            "lower_label": bound_percent(t.lower),
            "upper_label": bound_percent(t.upper),
        }
        for i, t in enumerate(tiers)
    ]


def _model_context(service: TriageService | None) -> dict[str, Any]:
    """What every page shows about the model (if loaded)."""
    if service is None:
        return {"model": None}
    meta = service.model.metadata
    tiers = _tier_views(service, None)
    dc = service.model.domain_calibration
    return {
        "model": {
            "name": meta.name,
            "version": meta.version,
            "threshold": meta.threshold,
            "positive_label": meta.positive_label,
            "labels": list(meta.labels),
            "tiers": tiers,
            "threshold_x": _svg_percent(threshold_position(meta.threshold, meta.risk_tiers)),
            "bar_inset": BAR_INSET,
            # The sentence per kind of photo the model reads (result.photo_domain); the page's
            # script shows the same, so both renderings say it alike.
            "photo_kinds": {d: photo_kind(d) for d in dc.domains} if dc else {},
        }
    }


def _common(settings: Settings) -> dict[str, Any]:
    return {
        "disclaimer": DISCLAIMER,
        "warning_signs": WARNING_SIGNS,
        "photo_tips": PHOTO_TIPS,
        "max_upload_mb": round(settings.max_upload_bytes / (1024 * 1024), 1),
        "stores_uploads": settings.store_uploads_dir is not None,
        "percent": percent,
        "bound_percent": bound_percent,
        "heatmap_texts": HEATMAP_TEXTS,
        "crop_hint": CROP_HINT,
        "crop_min_percent": CROP_MIN_PERCENT,
    }


@router.get("/", response_class=HTMLResponse, summary="Upload page", responses=HTML_200)
async def index(
    request: Request,
    templates: TemplatesDep,
    settings: SettingsDep,
    service: OptionalServiceDep,
) -> HTMLResponse:
    """Mobile-first upload page (camera, file picker, drag and drop)."""
    context = {**_common(settings), **_model_context(service)}
    return templates.TemplateResponse(request, "index.html", context, headers=PAGE_HEADERS)


@router.post(
    "/assess",
    response_class=HTMLResponse,
    summary="Form upload; renders the result page (no JavaScript needed)",
    responses=ASSESS_RESPONSES,
    openapi_extra=ASSESS_BODY,
)
async def assess(
    request: Request,
    admission: AdmissionDep,
    templates: TemplatesDep,
    settings: SettingsDep,
    metrics: MetricsDep,
    service: OptionalServiceDep,
    request_id: RequestIdDep,
) -> HTMLResponse:
    """The plain HTML form posts here; errors render the page with the error and its code."""
    started = time.perf_counter()
    context: dict[str, Any] = {**_common(settings), **_model_context(service)}
    context.update(result=None, error=None, request_id=request_id)
    status_code = 200
    headers = dict(PAGE_HEADERS)
    try:
        if service is None:
            raise HTTPException(
                status_code=503,
                detail="The service is starting; try again.",
                headers={"Retry-After": "5"},
            )
        # The page has two pickers (camera and file); a browser sends both parts, the
        # unused one empty and without a filename.
        form = await read_upload(
            request,
            metrics,
            file_fields=FORM_FILE_FIELDS,
            max_file_bytes=settings.max_upload_bytes,
            max_body_bytes=2 * settings.max_upload_bytes + MULTIPART_OVERHEAD,
            max_files=len(FORM_FILE_FIELDS),
            too_many_files=HTTPException(status_code=422, detail="Choose a single photo."),
            require_filename=False,  # a form part is the photo whatever its headers say
        )
        chosen = [f for f in form.files if f.data or f.filename or f.oversized]
        if not chosen:
            raise missing_field("file")
        if sum(1 for f in form.files if f.data or f.oversized) > 1:
            raise HTTPException(status_code=422, detail="Choose a single photo.")
        chosen[0].index = 0
        async with admission.slot():
            [result] = await run_in_threadpool(
                service.assess, chosen[:1], Options(explain=True, preview=True), request_id, started
            )
        if isinstance(result, BatchItemError):
            raise HTTPException(status_code=result.status_code, detail=result.detail)
        context["result"] = _result_view(result, service)
        request.state.outcome = result.label if result.status == "ok" else result.status
    except HTTPException as exc:
        status_code = exc.status_code
        headers = {**headers, **(exc.headers or {})}
        context["error"] = _error_message(exc, settings.max_upload_bytes)
        request.state.outcome = f"rejected:{exc.status_code}"
    return templates.TemplateResponse(
        request, "result.html", context, status_code=status_code, headers=headers
    )


def _error_message(exc: HTTPException, max_bytes: int) -> str:
    """Lay wording for the errors a form upload can hit."""
    if exc.status_code == 413:
        return f"The photo is too large. Please send one under {max_bytes // (1024 * 1024)} MB."
    if exc.status_code == 415:
        return (
            "That file could not be read as a photo. Please choose a JPEG, PNG, WebP or HEIC image."
        )
    if exc.status_code == 422:
        return exc.detail if isinstance(exc.detail, str) else "Please choose or take a photo first."
    if exc.status_code == 408:
        return "The upload took too long. Please try again on a better connection."
    if exc.status_code == 503:
        return "The service is busy or starting. Please try again in a minute."
    return str(exc.detail)


def heatmap_key(result: PredictionResult, positive_label: str) -> str | None:
    """Which HEATMAP_TEXTS wording fits the result's heat map (None: there is none).

    static/app.js mirrors this.
    """
    if not result.heatmap_png_base64:
        return None
    if result.heatmap_evidence == "none":
        return "none"
    if result.heatmap_evidence == "against":
        return "looked"
    return "concern" if result.label == positive_label else "raised"


def _result_view(result: PredictionResult, service: TriageService) -> dict[str, Any]:
    """The result plus display helpers the template needs."""
    view = result.model_dump()
    meta = service.model.metadata
    # The photo's own threshold (one per inferred domain in some artifacts) moves the boundary
    # between the lowest tier and the next; the bar and its ticks follow it.
    threshold = result.threshold if result.status == "ok" else None
    tiers = service.model.tiers_for(threshold)
    view["tiers"] = _tier_views(service, threshold)
    view["tier_position"] = ""
    view["tier_level"] = None
    for i, tier in enumerate(tiers):
        if result.risk_tier is not None and tier.name == result.risk_tier.name:
            view["tier_position"] = service.model.tier_position(tier, threshold)
            view["tier_level"] = tier_level(i, len(tiers))
            view["tier_range"] = f"{bound_percent(tier.lower)}–{bound_percent(tier.upper)}"
    if result.probability_malignant is not None:
        position = bar_position(result.probability_malignant, tiers)
        view["bar_x"] = _svg_percent(position)
        # The value label above the marker: centred, or anchored inwards near an end.
        view["bar_anchor"] = "start" if position < 0.1 else "end" if position > 0.9 else "middle"
    view["heat_key"] = heatmap_key(result, meta.positive_label)
    if result.heatmap_png_base64 and view["heat_key"] != "none":
        view["heatmap_src"] = "data:image/png;base64," + result.heatmap_png_base64
    if result.preview_jpeg_base64:
        view["photo_src"] = "data:image/jpeg;base64," + result.preview_jpeg_base64
    return view


@router.get("/about", response_class=HTMLResponse, summary="About the model", responses=HTML_200)
async def about(
    request: Request,
    templates: TemplatesDep,
    settings: SettingsDep,
    service: OptionalServiceDep,
) -> HTMLResponse:
    """The artifact's MODEL_CARD.md (if shipped) and the key metadata."""
    context: dict[str, Any] = {**_common(settings), **_model_context(service)}
    context.update(card_html=None, info=None, metric_rows=[])
    if service is not None:
        info = model_info(service)
        context["info"] = info
        context["metric_rows"] = _metric_rows(info.get("metrics"))
        card = Path(service.model.model_dir) / "MODEL_CARD.md"
        if card.is_file():
            text = card.read_text(encoding="utf-8", errors="replace")
            context["card_html"] = render_model_card(text)
    return templates.TemplateResponse(request, "about.html", context, headers=PAGE_HEADERS)


def _metric_rows(metrics: Any) -> list[dict[str, Any]]:
    """Flatten metrics.validation.<set>.<metric> numbers into table rows."""
    rows: list[dict[str, Any]] = []
    if not isinstance(metrics, dict):
        return rows
    for split, sets in metrics.items():
        if not isinstance(sets, dict):
            continue
        for dataset, values in sets.items():
            if not isinstance(values, dict):
                continue
            numbers = {
                k: v
                for k, v in values.items()
                if isinstance(v, int | float) and not isinstance(v, bool)
            }
            if numbers:
                rows.append({"split": split, "dataset": dataset, "values": numbers})
    return rows
