"""The runtimes that run an artifact's model, and the choice among them.

A runtime turns a float32 [n, H, W, 3] batch into the ``serve`` outputs of the artifact
(``logit``, the embeddings, and ``cam`` when it can explain by a forward computation) and, for
Grad-CAM, the ``explain`` outputs. Two exist:

* ``tensorflow``: the SavedModel itself (the reference and the source of truth);
* ``openvino``: OpenVINO's model of the same SavedModel (``model_training.fastmodel``).

``select_runtime`` picks, unless ``TRIAGE_RUNTIME`` names one, the fastest runtime whose
agreement with TensorFlow, recorded in ``metadata.json`` under ``runtimes`` by
``python -m model_training export-fast``, passes ``model_training.fastmodel.GUARD`` (for
int8 also its probability bound) and still describes this artifact
(same SavedModel files, calibration and OpenVINO release). An artifact without that record,
or a machine without OpenVINO, serves on TensorFlow.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal, Protocol

import numpy as np

logger = logging.getLogger("app.runtime")

RuntimeChoice = Literal["auto", "tensorflow", "openvino"]


class RuntimeUnavailable(RuntimeError):
    """The runtime asked for cannot run this artifact here."""


class Runtime(Protocol):
    """What the model layer needs from a runtime."""

    name: str
    precision: str
    parallel: int  # batches it can usefully run at the same time
    forward_cam: bool  # serve() returns ``cam``: explain needs no second pass

    def serve(self, batch: np.ndarray) -> dict[str, np.ndarray]: ...

    def explain(self, batch: np.ndarray) -> dict[str, np.ndarray]: ...

    def close(self) -> None: ...


def _recorded(raw: Mapping[str, Any]) -> Mapping[str, Any] | None:
    runtimes = raw.get("runtimes")
    if not isinstance(runtimes, Mapping):
        return None
    record = runtimes.get("openvino")
    return record if isinstance(record, Mapping) else None


def guard_failures(raw: Mapping[str, Any], model_dir: Path) -> list[str]:
    """Why the recorded fast model may not be trusted here (empty: it may)."""
    record = _recorded(raw)
    if record is None:
        return ["metadata.json has no runtimes.openvino record (run export-fast)"]
    agreement = record.get("agreement")
    if not record.get("passed") or not isinstance(agreement, Mapping):
        return ["no fast model passed the agreement guard at export"]
    try:
        from model_training import fastmodel
    except ImportError:
        return ["the fast runtime's module cannot be imported"]
    problems = fastmodel.guard_problems(agreement)
    calibration = record.get("calibration") or {}
    keys = (("temperature", 1.0), ("logit_bias", 0.0), ("threshold", None))
    for key, default in (*keys, ("domain_calibration", None)):
        if calibration.get(key, default) != raw.get(key, default):
            problems.append(f"{key} changed since the agreement was measured (re-run export-fast)")
    try:
        if str(record.get("openvino_release")) != fastmodel.openvino_release():
            problems.append(
                f"measured with OpenVINO {record.get('openvino_release')}, "
                f"installed {fastmodel.openvino_release()}"
            )
        elif dict(record.get("source_sha256") or {}) != fastmodel.saved_model_hashes(model_dir):
            problems.append("the SavedModel files differ from those measured (re-run export-fast)")
    except ImportError:
        problems.append("openvino is not installed")
    return problems


def _throughput(raw: Mapping[str, Any], name: str) -> float:
    runtimes = raw.get("runtimes") or {}
    if name == "openvino":
        agreement = (_recorded(raw) or {}).get("agreement") or {}
        return float(agreement.get("throughput_ips", 0.0))
    return float((runtimes.get(name) or {}).get("throughput_ips", 0.0))


def select_runtime(
    raw: Mapping[str, Any], model_dir: Path, choice: str = "auto", streams: int = 0
) -> Runtime:
    """Load the runtime ``choice`` names, or for ``auto`` the fastest trusted one.

    ``streams``: OpenVINO's CPU streams (0: its throughput-mode default).
    """
    if choice not in ("auto", "tensorflow", "openvino"):
        raise RuntimeUnavailable(f"unknown runtime {choice!r} (auto, tensorflow, openvino)")
    if choice == "auto":
        problems = guard_failures(raw, model_dir)
        fast_wins = _throughput(raw, "openvino") > _throughput(raw, "tensorflow")
        if problems or not fast_wins:
            reason = problems or ["TensorFlow measured faster"]
            logger.info("runtime: tensorflow", extra={"fields": {"fast_runtime_not_used": reason}})
            choice = "tensorflow"
        else:
            choice = "openvino"
    if choice == "openvino":
        record = _recorded(raw) or {}
        precision = str(record.get("precision") or "f32")
        problems = guard_failures(raw, model_dir)
        if problems:
            logger.warning(
                "TRIAGE_RUNTIME=openvino without a trusted agreement record",
                extra={"fields": {"problems": problems}},
            )
        from app.runtime.openvino_runtime import OpenVINORuntime

        return OpenVINORuntime(model_dir, precision, streams)
    from app.runtime.tensorflow_runtime import TensorFlowRuntime

    return TensorFlowRuntime(model_dir)
