"""The loaded model's metadata and its evaluation plots."""

from __future__ import annotations

import re
from datetime import UTC, datetime
from typing import Any

from fastapi import APIRouter, HTTPException
from fastapi.responses import FileResponse

from app.deps import ServiceDep
from app.schemas import ErrorResponse, ModelInfo
from app.service import TriageService

router = APIRouter(prefix="/model", tags=["model"])

_PLOT_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,100}\.png$")
# Provenance an operator may keep in metadata.json but the public need not see: command
# lines and absolute paths name the training machine's folders (and sometimes its users).
_PRIVATE_KEY = re.compile(r"(^|_)(command|argv|cwd|host|hostname|user)$", re.IGNORECASE)
_ABSOLUTE_PATH = re.compile(r"^(/|~|[A-Za-z]:[\\/]|\\\\)")


def public_metadata(value: Any) -> Any:
    """``value`` without command lines, host/user names or absolute paths, at any depth."""
    if isinstance(value, dict):
        return {
            k: public_metadata(v)
            for k, v in value.items()
            if not _PRIVATE_KEY.search(str(k)) and not _is_path(v)
        }
    if isinstance(value, list):
        return [public_metadata(v) for v in value if not _is_path(v)]
    return value


def _is_path(value: Any) -> bool:
    return isinstance(value, str) and bool(_ABSOLUTE_PATH.match(value))


def model_info(service: TriageService) -> dict[str, Any]:
    """metadata.json (public part) plus the server's load report (shared with /about)."""
    report = service.model.report
    info = public_metadata(dict(service.model.metadata.raw))
    info["server"] = {
        "load_seconds": round(report.load_seconds, 3),
        "warmup_seconds": round(report.warmup_seconds, 3),
        "loaded_at": datetime.fromtimestamp(report.loaded_at, UTC).isoformat(),
        "gates": {
            "quality": service.gates.quality is not None,
            "ood": service.gates.ood is not None,
        },
    }
    return info


@router.get(
    "",
    response_model=ModelInfo,
    summary="Metadata of the loaded model",
    responses={503: {"model": ErrorResponse, "description": "Model not loaded yet"}},
)
async def get_model(service: ServiceDep) -> dict[str, Any]:
    """The artifact's metadata.json (version, labels, threshold, tiers, metrics, training
    provenance without command lines or machine paths) and how long the server took to load
    and warm it up."""
    return model_info(service)


@router.get(
    "/plots/{name}",
    summary="An evaluation plot shipped with the artifact",
    response_class=FileResponse,
    responses={
        200: {"content": {"image/png": {}}},
        404: {"model": ErrorResponse, "description": "No such plot"},
    },
)
async def get_plot(name: str, service: ServiceDep) -> FileResponse:
    """PNG files from the artifact's plots/ folder (linked from the model card on /about)."""
    if not _PLOT_NAME.match(name):
        raise HTTPException(status_code=404, detail="no such plot")
    path = service.model.model_dir / "plots" / name
    if not path.is_file():
        raise HTTPException(status_code=404, detail="no such plot")
    return FileResponse(path, media_type="image/png")
