"""Runtime configuration, read from the environment.

Every setting is read from an environment variable named ``TRIAGE_<FIELD>`` (case-insensitive),
for example ``TRIAGE_MODEL_DIR=/models/v2`` or ``TRIAGE_STORE_UPLOADS_DIR=/srv/uploads``.
``host`` and ``port`` also accept the unprefixed ``HOST`` and ``PORT`` that ``make run``,
Docker and most hosting platforms set; the prefixed name wins when both are present.

Relative paths (``model_dir``, ``store_uploads_dir``) are resolved against the current working
directory, which is the repository root for ``make run`` and the Docker image.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import AliasChoices, Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

MB = 1024 * 1024

LogLevel = Literal["debug", "info", "warning", "error", "critical"]


class Settings(BaseSettings):
    """Service settings; see the module docstring for the environment variable names."""

    model_config = SettingsConfigDict(
        env_prefix="TRIAGE_",
        case_sensitive=False,
        populate_by_name=True,  # Settings(host=...) in code, HOST/TRIAGE_HOST in the environment
        protected_namespaces=(),  # `model_dir` is a field name, not pydantic's namespace
        extra="ignore",
    )

    model_dir: Path = Field(
        default=Path("models/default"),
        description="Model artifact folder (saved_model/ + metadata.json), see docs/ARTIFACT.md.",
    )
    host: str = Field(
        default="127.0.0.1",
        validation_alias=AliasChoices("TRIAGE_HOST", "HOST"),
        description="Interface to bind; use 0.0.0.0 inside a container.",
    )
    port: int = Field(
        default=8000, ge=0, le=65535, validation_alias=AliasChoices("TRIAGE_PORT", "PORT")
    )
    max_upload_bytes: int = Field(
        default=10 * MB, gt=0, description="Largest accepted image, in bytes (per file)."
    )
    max_batch_files: int = Field(
        default=16, gt=0, description="Most files in one /predict/batch call."
    )
    max_batch_bytes: int = Field(
        default=40 * MB,
        gt=0,
        description="Largest accepted /predict/batch request body, in bytes (all files together).",
    )
    heatmap_max_side: int = Field(
        default=1024,
        ge=64,
        description=(
            "The Grad-CAM overlay has the photo's aspect ratio and resolution, capped at this "
            "many pixels on its longer side (a smooth upsampled map loses nothing by the cap)."
        ),
    )
    store_uploads_dir: Path | None = Field(
        default=None,
        description=(
            "Operator opt-in: keep a metadata-free copy of each decoded upload (the part "
            "assessed, when the request asked for a crop) and its result here. None (the "
            "default) means uploads are never written to disk."
        ),
    )
    max_aspect_ratio: float = Field(
        default=4.0,
        gt=1.0,
        description="A photo whose longer side exceeds this many times its shorter side "
        "(a strip, a panorama) is answered unable_to_assess instead of being squashed.",
    )
    # -- load and abuse limits (see README "Limits") ------------------------------------------
    max_concurrent_jobs: int = Field(
        default=2,
        gt=0,
        description="Assessments (decode + gates + model) running at once; the rest queue.",
    )
    max_queued_jobs: int = Field(
        default=32,
        ge=0,
        description="Assessments waiting for a slot; beyond this, 503 with Retry-After.",
    )
    retry_after_s: int = Field(
        default=2, ge=1, description="Retry-After (seconds) sent with a queue-full 503."
    )
    body_timeout_s: float = Field(
        default=60.0, gt=0, description="Most seconds to receive one request body (408)."
    )
    body_min_rate_bytes: int = Field(
        default=4096,
        ge=0,
        description="Slowest accepted upload, bytes per second, averaged over the body after "
        "body_rate_grace_s (408 below it; 0 switches the check off).",
    )
    body_rate_grace_s: float = Field(
        default=5.0, ge=0, description="Seconds of upload before the minimum rate applies."
    )
    max_header_bytes: int = Field(
        default=16 * 1024, ge=1024, description="Largest request line + headers, in bytes."
    )
    shutdown_pre_stop_s: float = Field(
        default=3.0,
        ge=0,
        description="On SIGTERM, readiness turns 503 at once and the server keeps serving "
        "this long (so load balancers stop sending) before it stops accepting connections.",
    )
    shutdown_drain_s: float = Field(
        default=20.0,
        gt=0,
        description="Then at most this long for in-flight requests; the rest are cancelled. "
        "Set the orchestrator's grace period above pre_stop + drain (+ a few seconds).",
    )
    malloc_arena_max: int = Field(
        default=2,
        ge=0,
        description="glibc malloc arenas (M_ARENA_MAX) set at start-up; 0 leaves glibc's "
        "default (8 per core). Fewer arenas return memory after a spike.",
    )
    runtime: Literal["auto", "tensorflow", "openvino"] = Field(
        default="auto",
        description=(
            "Inference runtime. auto: the fastest whose agreement with TensorFlow, recorded in "
            "metadata.json by export-fast, passes the guard (else tensorflow)."
        ),
    )
    batch_max_size: int = Field(
        default=8, ge=1, le=64, description="Most images one cross-request model call gathers."
    )
    batch_max_wait_ms: float = Field(
        default=2.0,
        ge=0.0,
        le=100.0,
        description="Longest a model call waits for more requests to join its batch.",
    )
    openvino_streams: int = Field(
        default=0,
        ge=0,
        le=64,
        description=(
            "OpenVINO CPU streams (batches run at once, the cores split among them); "
            "0: one stream on a machine with at most 2 cores, else OpenVINO's throughput "
            "default."
        ),
    )
    log_level: LogLevel = "info"
    log_json: bool = Field(
        default=True, description="One JSON object per log line (false: plain text)."
    )

    @field_validator("log_level", mode="before")
    @classmethod
    def _lower_log_level(cls, value: object) -> object:
        """Accept LOG_LEVEL=INFO as well as info."""
        return value.lower() if isinstance(value, str) else value
