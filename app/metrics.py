"""Prometheus metrics, in a registry owned by each app instance.

A per-app registry (not the process-global default) lets several apps live in one process,
as the tests do, without "duplicated timeseries" errors.
"""

from __future__ import annotations

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    gc_collector,
    generate_latest,
    platform_collector,
    process_collector,
)

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class Metrics:
    """All metrics the service exports."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        process_collector.ProcessCollector(registry=self.registry)
        platform_collector.PlatformCollector(registry=self.registry)
        gc_collector.GCCollector(registry=self.registry)
        r = self.registry
        self.requests = Counter(
            "triage_http_requests",
            "HTTP requests by route template, method and status code (client_closed: the "
            "client went away before the answer; not a server error).",
            ["route", "method", "status"],
            registry=r,
        )
        self.latency = Histogram(
            "triage_http_request_duration_seconds",
            "HTTP request latency by route template and method.",
            ["route", "method"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.inference_seconds = Histogram(
            "triage_inference_duration_seconds",
            "Time of one batched model forward pass (serve endpoint, TTA included).",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.predictions = Counter(
            "triage_predictions",
            "Assessed photos by predicted label.",
            ["label"],
            registry=r,
        )
        # A shift in this mix is the first sign of a new camera or clinic (a phone read as
        # dermoscopy gets the less sensitive threshold: docs/calibration.md).
        self.assessed_by_domain = Counter(
            "triage_assessed_by_domain",
            "Assessed photos by the kind of photo they were read as (domain_calibration.domains).",
            ["domain"],
            registry=r,
        )
        self.rejected_inputs = Counter(
            "triage_rejected_inputs",
            "Uploads not assessed, by reason (not_an_image, empty_file, too_large, quality "
            "issue codes, not_a_lesion).",
            ["reason"],
            registry=r,
        )
        self.admission_active = Gauge(
            "triage_assessments_active", "Assessments running (decode + model).", registry=r
        )
        self.admission_waiting = Gauge(
            "triage_assessments_waiting", "Assessments queued for a free slot.", registry=r
        )
        self.admission_rejected = Counter(
            "triage_assessments_rejected",
            "Requests answered 503 + Retry-After because the assessment queue was full.",
            registry=r,
        )
        self.model_load_seconds = Gauge(
            "triage_model_load_seconds",
            "Seconds spent loading the model artifact (excluding warm-up).",
            registry=r,
        )
        self.model_warmup_seconds = Gauge(
            "triage_model_warmup_seconds",
            "Seconds spent on the warm-up pass through serve and explain.",
            registry=r,
        )
        self.model_ready = Gauge(
            "triage_model_ready", "1 when the model is loaded and warmed up.", registry=r
        )
        self.model_info = Gauge(
            "triage_model_info",
            "Loaded model name and version (value is always 1).",
            ["name", "version"],
            registry=r,
        )

    def render(self) -> bytes:
        """The text exposition format."""
        return generate_latest(self.registry)
