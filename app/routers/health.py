"""Liveness and readiness probes."""

from __future__ import annotations

from fastapi import APIRouter, HTTPException, Request

from app.deps import ServiceDep
from app.schemas import RETRY_AFTER, ErrorResponse, HealthResponse

DRAINING = "the server is shutting down"

router = APIRouter(prefix="/health", tags=["health"])


@router.get(
    "/live",
    response_model=HealthResponse,
    summary="Liveness: the process answers",
    responses={200: {"content": {"application/json": {"example": {"status": "ok"}}}}},
)
async def live() -> HealthResponse:
    """Always 200 while the process serves HTTP; restart the container if this fails."""
    return HealthResponse()


@router.get(
    "/ready",
    response_model=HealthResponse,
    summary="Readiness: the model is loaded and warmed up",
    responses={
        200: {
            "content": {"application/json": {"example": {"status": "ok", "model_version": "1.0.0"}}}
        },
        503: {
            "model": ErrorResponse,
            "description": "Model not loaded yet, or shutting down (draining)",
            "headers": RETRY_AFTER,
        },
    },
)
async def ready(request: Request, service: ServiceDep) -> HealthResponse:
    """200 once the model is loaded and warmed up; 503 with a JSON detail before that, and
    from the moment the process receives SIGTERM (it keeps serving while it drains)."""
    if getattr(request.app.state, "draining", False):
        raise HTTPException(status_code=503, detail=DRAINING, headers={"Retry-After": "5"})
    return HealthResponse(model_version=service.model.metadata.version)
