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
(same SavedModel files, calibration and OpenVINO release; for int8 also the same
quantisation parameters file, ``model_training.int8model``). An artifact without that record,
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


def _variant(record: Mapping[str, Any], precision: str | None) -> Mapping[str, Any] | None:
    """The recorded agreement of ``precision`` (default: the one export-fast chose)."""
    chosen = record.get("agreement")
    if precision is None or (isinstance(chosen, Mapping) and chosen.get("precision") == precision):
        return chosen if isinstance(chosen, Mapping) else None
    for variant in record.get("variants") or ():
        if isinstance(variant, Mapping) and variant.get("precision") == precision:
            return variant
    return None


def guard_failures(
    raw: Mapping[str, Any], model_dir: Path, precision: str | None = None
) -> list[str]:
    """Why the recorded fast model (of ``precision``, default the chosen one) may not be
    trusted here (empty: it may)."""
    record = _recorded(raw)
    if record is None:
        return ["metadata.json has no runtimes.openvino record (run export-fast)"]
    agreement = _variant(record, precision)
    if precision is None and not record.get("passed"):
        agreement = None
    if not isinstance(agreement, Mapping) or not agreement.get("passed"):
        return [f"no fast model{f' at {precision}' if precision else ''} passed the guard"]
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
    quantisation = agreement.get("quantisation")
    if agreement.get("precision") == fastmodel.INT8:
        problems += _quantisation_problems(quantisation, model_dir, fastmodel)
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


def _quantisation_problems(quantisation: Any, model_dir: Path, fastmodel: Any) -> list[str]:
    """Why an int8 record's parameters file cannot be used (empty: it can)."""
    if not isinstance(quantisation, Mapping) or not quantisation.get("shipped"):
        return ["the int8 variant's quantisation parameters were not shipped"]
    path = Path(model_dir) / str(quantisation.get("file"))
    if not path.is_file():
        return [f"the int8 quantisation parameters {path.name} are missing"]
    if fastmodel.file_sha256(path) != quantisation.get("sha256"):
        return [f"{path.name} differs from the file measured (re-run export-fast)"]
    return []


def _candidates(raw: Mapping[str, Any]) -> list[tuple[float, str]]:
    """(recorded throughput, precision) of every recorded variant that passed, fastest first."""
    record = _recorded(raw) or {}
    found: dict[str, float] = {}
    for variant in record.get("variants") or ():
        if isinstance(variant, Mapping) and variant.get("passed"):
            found[str(variant.get("precision"))] = float(variant.get("throughput_ips", 0.0))
    chosen = record.get("agreement")
    if record.get("passed") and isinstance(chosen, Mapping) and chosen.get("passed"):
        found[str(chosen.get("precision"))] = float(chosen.get("throughput_ips", 0.0))
    return sorted(((ips, p) for p, ips in found.items()), reverse=True)


def trusted_precision(raw: Mapping[str, Any], model_dir: Path) -> tuple[str | None, float]:
    """The fastest recorded fast model trusted here: (precision, throughput) or (None, 0)."""
    for ips, precision in _candidates(raw):
        if not guard_failures(raw, model_dir, precision):
            return precision, ips
    return None, 0.0


def select_runtime(
    raw: Mapping[str, Any], model_dir: Path, choice: str = "auto", streams: int = 0
) -> Runtime:
    """Load the runtime ``choice`` names, or for ``auto`` the fastest trusted one.

    ``streams``: OpenVINO's CPU streams (0: its throughput-mode default). Among the recorded
    OpenVINO variants (int8, bf16, f32) the fastest one whose agreement passes its guard and
    still describes this artifact is used.
    """
    if choice not in ("auto", "tensorflow", "openvino"):
        raise RuntimeUnavailable(f"unknown runtime {choice!r} (auto, tensorflow, openvino)")
    precision, fast_ips = trusted_precision(raw, model_dir)
    if choice == "auto":
        tf_ips = float(
            ((raw.get("runtimes") or {}).get("tensorflow") or {}).get("throughput_ips", 0)
        )
        if precision is None or fast_ips <= tf_ips:
            reason = guard_failures(raw, model_dir) or ["TensorFlow measured faster"]
            logger.info("runtime: tensorflow", extra={"fields": {"fast_runtime_not_used": reason}})
            choice = "tensorflow"
        else:
            choice = "openvino"
    if choice == "openvino":
        if precision is None:
            record = _recorded(raw) or {}
            precision = str(record.get("precision") or "f32")
            if precision == "int8":  # its parameters are not trusted here: bf16 instead
                precision = "bf16"
            logger.warning(
                "TRIAGE_RUNTIME=openvino without a trusted agreement record",
                extra={"fields": {"problems": guard_failures(raw, model_dir)}},
            )
        from app.runtime.openvino_runtime import OpenVINORuntime

        return OpenVINORuntime(model_dir, precision, streams)
    from app.runtime.tensorflow_runtime import TensorFlowRuntime

    return TensorFlowRuntime(model_dir)
