"""The fast runtime: OpenVINO's model of the artifact's SavedModel (``model_training.fastmodel``).

At ``int8`` the model is rebuilt from the SavedModel plus the artifact's quantisation
parameters (``model_training.int8model``); the rest of it runs in f32.

The compiled model runs in throughput mode: OpenVINO splits the cores into streams and each
infer request runs on one, so ``parallel`` batches (one per request) run at the same time.
Requests are lent from a pool, so any thread may call ``serve``; no lock spans a whole call.
"""

from __future__ import annotations

import os
import queue
from pathlib import Path
from typing import Any

import numpy as np

from app.runtime import RuntimeUnavailable


def default_streams(cores: int) -> int | None:
    """Streams when none are configured: one on a machine with at most 2 cores (measured
    there: faster at every concurrency, p50 at c=1 48 ms against 67 ms with OpenVINO's two
    streams), else None for OpenVINO's throughput default."""
    return 1 if cores <= 2 else None


def usable_cores() -> int:
    """Cores this process may run on (its affinity, which containers and taskset narrow)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


class OpenVINORuntime:
    """``serve`` (plus ``cam`` where the head allows) and a forward-computed ``explain``."""

    name = "openvino"

    def __init__(self, model_dir: Path, precision: str, streams: int = 0) -> None:
        try:
            from model_training import fastmodel
        except ImportError as exc:  # openvino itself is imported inside fastmodel's functions
            raise RuntimeUnavailable(f"the OpenVINO runtime cannot be imported: {exc}") from exc
        try:
            if precision == fastmodel.INT8:
                from model_training import int8model

                model, self.forward_cam = int8model.derive_int8(Path(model_dir))
            else:
                model, self.forward_cam = fastmodel.derive_openvino(Path(model_dir))
            self._compiled = fastmodel.compile_openvino(
                model, precision, streams or default_streams(usable_cores())
            )
        except ImportError as exc:
            raise RuntimeUnavailable(f"openvino is not installed: {exc}") from exc
        except Exception as exc:  # conversion errors come in many types
            raise RuntimeUnavailable(
                f"OpenVINO cannot convert the SavedModel ({precision}): {exc}"
            ) from exc
        self._normalise = fastmodel.normalise_cam
        self._cam = fastmodel.CAM_OUTPUT
        hint = self._compiled.get_property("INFERENCE_PRECISION_HINT")
        self.precision = str(hint.to_string() if hasattr(hint, "to_string") else hint)
        if precision == fastmodel.INT8:
            self.precision = f"{fastmodel.INT8} ({self.precision} elsewhere)"
        self.parallel = max(1, int(self._compiled.get_property("OPTIMAL_NUMBER_OF_INFER_REQUESTS")))
        self._requests: queue.SimpleQueue[Any] = queue.SimpleQueue()
        for _ in range(self.parallel):
            self._requests.put(self._compiled.create_infer_request())
        self._names = [out.get_any_name() for out in self._compiled.outputs]

    def serve(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        """Every output of the model; copies, as the request's buffers are reused."""
        request = self._requests.get()
        try:
            request.infer({0: np.ascontiguousarray(batch, dtype=np.float32)})
            return {
                name: np.array(request.get_output_tensor(i).data)
                for i, name in enumerate(self._names)
            }
        finally:
            self._requests.put(request)

    def explain(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        """``explain``'s outputs, Grad-CAM computed forward from ``cam`` (see fastmodel)."""
        if not self.forward_cam:
            raise RuntimeUnavailable("this model's head gives no forward class-activation map")
        outputs = self.serve(batch)
        return self.explain_from(outputs)

    def explain_from(self, outputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """``explain``'s outputs from ``serve`` outputs that include ``cam``."""
        cam = outputs[self._cam]
        n = cam.shape[0]
        return {
            "logit": outputs["logit"],
            "heatmap": self._normalise(cam, np.zeros(n, dtype=bool)),
            "heatmap_benign": self._normalise(cam, np.ones(n, dtype=bool)),
        }

    def close(self) -> None:
        """Release the compiled model."""
        while not self._requests.empty():
            self._requests.get()
        self._compiled = None
