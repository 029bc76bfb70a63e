"""Prometheus scrape endpoint."""

from __future__ import annotations

from fastapi import APIRouter, Response

from app.deps import MetricsDep

router = APIRouter(tags=["operations"])

_EXAMPLE = """# HELP triage_predictions_total Assessed photos by predicted label.
# TYPE triage_predictions_total counter
triage_predictions_total{label="benign"} 12.0
triage_predictions_total{label="malignant"} 3.0
"""


@router.get(
    "/metrics",
    summary="Prometheus metrics",
    response_class=Response,
    responses={200: {"content": {"text/plain": {"example": _EXAMPLE}}}},
)
async def metrics(metrics: MetricsDep) -> Response:
    """Requests by route/status, latency histograms, predictions by label, rejected inputs
    by reason, model load and warm-up seconds, process metrics."""
    return Response(content=metrics.render(), media_type=metrics.content_type)
