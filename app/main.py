"""Application factory and lifespan.

Start-up order: load the artifact, validate it against its metadata, build the gates, warm
the model up through ``serve`` and ``explain``, and only then mark the app ready. A model
that fails any of these steps stops the process with a clear log line (uvicorn exits with
status 3) instead of serving 503s forever: an orchestrator then reports a crash loop that
someone will look at, and a rolling update keeps the old version serving.
"""

from __future__ import annotations

import base64
import hashlib
import logging
import re
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import HTMLResponse
from fastapi.staticfiles import StaticFiles
from fastapi.templating import Jinja2Templates
from starlette.concurrency import run_in_threadpool
from swagger_ui_bundle import swagger_ui_path

from app import __version__
from app.admission import Admission
from app.gates import build_gates
from app.metadata import ModelLoadError
from app.metrics import Metrics
from app.middleware import RequestContextMiddleware
from app.model import TriageModel
from app.routers import health, metrics, model, pages, predict
from app.service import TriageService
from app.settings import Settings

logger = logging.getLogger("app")

ROOT = Path(__file__).resolve().parent.parent
TEMPLATES_DIR = ROOT / "templates"
STATIC_DIR = ROOT / "static"

DESCRIPTION = """
Upload a photo of a skin lesion (a mole or spot) and get a **calibrated** estimate of the
probability that it is malignant, the label by the model's decision threshold, a risk tier
with plain-language advice, and optionally a Grad-CAM heat map.

**This is not a diagnosis.** It is a triage aid; only a clinician who examines the skin can
diagnose. Photos are processed in memory and are not stored unless the operator enabled it.
"""

TAGS = [
    {"name": "prediction", "description": "Assess photos."},
    {"name": "model", "description": "The loaded model artifact."},
    {"name": "health", "description": "Probes for orchestrators."},
    {"name": "operations", "description": "Prometheus metrics."},
    {"name": "pages", "description": "The browser interface (HTML)."},
]


def load_service(
    settings: Settings, metrics: Metrics, in_flight: Callable[[], int] | None = None
) -> TriageService:
    """Load, validate and warm up the model; blocking (run it off the event loop).
    ``in_flight`` counts the assessments running (the admission's), for the batcher."""
    started = time.perf_counter()
    triage_model = TriageModel.load(
        settings.model_dir,
        runtime=settings.runtime,
        max_batch=settings.batch_max_size,
        max_wait_ms=settings.batch_max_wait_ms,
        streams=settings.openvino_streams,
        in_flight=in_flight,
    )
    gates = build_gates(triage_model.metadata, triage_model.model_dir)
    triage_model.report.load_seconds = time.perf_counter() - started
    try:
        triage_model.warm_up()
    except ModelLoadError:
        raise
    except Exception as exc:  # TF errors here mean the artifact and metadata disagree
        raise ModelLoadError(f"warm-up through serve/explain failed: {exc}") from exc
    meta = triage_model.metadata
    metrics.model_load_seconds.set(triage_model.report.load_seconds)
    metrics.model_warmup_seconds.set(triage_model.report.warmup_seconds)
    metrics.model_info.labels(name=meta.name, version=meta.version).set(1)
    return TriageService(triage_model, gates, settings, metrics)


_INLINE_SCRIPT = re.compile(r"<script>(.*?)</script>", re.DOTALL)


def docs_csp(html: str) -> str:
    """CSP for the Swagger UI page: local assets only, its one inline start-up script
    allowed by hash, no framing. Swagger UI sets inline styles, hence 'unsafe-inline' for
    styles only."""
    hashes = " ".join(
        "'sha256-" + base64.b64encode(hashlib.sha256(m.encode()).digest()).decode() + "'"
        for m in _INLINE_SCRIPT.findall(html)
    )
    return (
        f"default-src 'self'; script-src 'self' {hashes}; style-src 'self' 'unsafe-inline'; "
        "img-src 'self' data:; connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; "
        "form-action 'self'; object-src 'none'"
    )


def create_app(settings: Settings | None = None) -> FastAPI:
    """Build the app; the model is loaded by the lifespan, when the server starts."""
    settings = settings or Settings()
    app_metrics = Metrics()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        model_dir = Path(settings.model_dir).resolve()
        logger.info("loading model", extra={"fields": {"model_dir": str(model_dir)}})
        try:
            admission: Admission = app.state.admission
            service = await run_in_threadpool(
                load_service, settings, app_metrics, lambda: admission.active
            )
        except ModelLoadError as exc:
            logger.critical(
                "model failed to load; refusing to start",
                extra={"fields": {"model_dir": str(model_dir), "error": str(exc)}},
            )
            raise
        app.state.service = service
        app.state.ready = True
        app_metrics.model_ready.set(1)
        meta = service.model.metadata
        logger.info(
            "model ready",
            extra={
                "fields": {
                    "model": meta.name,
                    "version": meta.version,
                    "runtime": service.model.runtime.name,
                    "precision": service.model.runtime.precision,
                    "load_seconds": round(service.model.report.load_seconds, 3),
                    "warmup_seconds": round(service.model.report.warmup_seconds, 3),
                    "quality_gate": service.gates.quality is not None,
                    "ood_gate": service.gates.ood is not None,
                    "store_uploads": settings.store_uploads_dir is not None,
                }
            },
        )
        try:
            yield
        finally:
            # Stop advertising readiness first, so a load balancer drains us during shutdown.
            app.state.ready = False
            app_metrics.model_ready.set(0)
            service.model.close()

    app = FastAPI(
        title="Skin-lesion triage",
        version=__version__,
        description=DESCRIPTION,
        openapi_tags=TAGS,
        lifespan=lifespan,
        # FastAPI's default docs pages load Swagger UI from a CDN; serve our own copy instead.
        docs_url=None,
        redoc_url=None,
    )
    app.state.settings = settings
    app.state.metrics = app_metrics
    app.state.service = None
    app.state.ready = False
    app.state.draining = False  # set by app.server on SIGTERM: readiness answers 503
    app.state.admission = Admission(
        settings.max_concurrent_jobs, settings.max_queued_jobs, settings.retry_after_s, app_metrics
    )
    app.state.templates = Jinja2Templates(directory=TEMPLATES_DIR)

    app.add_middleware(
        RequestContextMiddleware, metrics=app_metrics, max_header_bytes=settings.max_header_bytes
    )
    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    app.mount("/docs-assets", StaticFiles(directory=swagger_ui_path), name="docs-assets")
    for router in (predict.router, model.router, health.router, metrics.router, pages.router):
        app.include_router(router)

    docs = get_swagger_ui_html(
        openapi_url=app.openapi_url or "/openapi.json",
        title=f"{app.title} - API docs",
        swagger_js_url="/docs-assets/swagger-ui-bundle.js",
        swagger_css_url="/docs-assets/swagger-ui.css",
        swagger_favicon_url="/static/favicon.svg",
    )
    docs_headers = {
        "Content-Security-Policy": docs_csp(bytes(docs.body).decode("utf-8")),
        "X-Frame-Options": "DENY",
    }

    @app.get("/docs", include_in_schema=False)
    async def api_docs() -> HTMLResponse:
        """Swagger UI, served from the swagger-ui-bundle package (no third-party requests)."""
        return HTMLResponse(bytes(docs.body), headers=docs_headers)

    return app
