"""Request dependencies (FastAPI ``Annotated`` style)."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, HTTPException, Request
from fastapi.templating import Jinja2Templates

from app.admission import Admission
from app.metrics import Metrics
from app.service import TriageService
from app.settings import Settings

NOT_READY = "the model is not loaded yet; retry shortly"


def get_settings(request: Request) -> Settings:
    """The app's settings (set by create_app)."""
    settings: Settings = request.app.state.settings
    return settings


def get_metrics(request: Request) -> Metrics:
    """The app's metrics registry."""
    metrics: Metrics = request.app.state.metrics
    return metrics


def get_admission(request: Request) -> Admission:
    """The app's admission control (bounded concurrency and queue)."""
    admission: Admission = request.app.state.admission
    return admission


def get_templates(request: Request) -> Jinja2Templates:
    """The Jinja2 environment for the pages."""
    templates: Jinja2Templates = request.app.state.templates
    return templates


def get_request_id(request: Request) -> str:
    """The id set by RequestContextMiddleware."""
    return str(getattr(request.state, "request_id", "") or "")


def get_service(request: Request) -> TriageService:
    """The loaded model service, or 503 while it is not ready."""
    service: TriageService | None = getattr(request.app.state, "service", None)
    if service is None or not request.app.state.ready:
        raise HTTPException(status_code=503, detail=NOT_READY, headers={"Retry-After": "5"})
    return service


def get_optional_service(request: Request) -> TriageService | None:
    """The service if ready, else None (pages render a notice instead of failing)."""
    service: TriageService | None = getattr(request.app.state, "service", None)
    return service if service is not None and request.app.state.ready else None


SettingsDep = Annotated[Settings, Depends(get_settings)]
MetricsDep = Annotated[Metrics, Depends(get_metrics)]
AdmissionDep = Annotated[Admission, Depends(get_admission)]
TemplatesDep = Annotated[Jinja2Templates, Depends(get_templates)]
RequestIdDep = Annotated[str, Depends(get_request_id)]
ServiceDep = Annotated[TriageService, Depends(get_service)]
OptionalServiceDep = Annotated[TriageService | None, Depends(get_optional_service)]
