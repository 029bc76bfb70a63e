"""The reference runtime: the artifact's SavedModel in TensorFlow."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import numpy as np

from app.runtime import RuntimeUnavailable

SAVED_MODEL_DIR = "saved_model"


class TensorFlowRuntime:
    """``serve`` and ``explain`` of the SavedModel (TensorFlow imported here, lazily).

    One model call at a time: TensorFlow already spreads one call over every core, and two
    InceptionV3 passes at once on a small machine only thrash caches and double peak memory.
    The lock covers the model call only; decoding, gates and JSON run in parallel.
    """

    name = "tensorflow"
    precision = "f32"
    parallel = 1
    forward_cam = False

    def __init__(self, model_dir: Path) -> None:
        import tensorflow as tf

        self._tf = tf
        path = Path(model_dir) / SAVED_MODEL_DIR
        try:
            self.saved: Any = tf.saved_model.load(str(path))
        except Exception as exc:  # TF raises many types for a corrupt SavedModel
            raise RuntimeUnavailable(f"cannot load SavedModel at {path}: {exc}") from exc
        self._lock = threading.Lock()

    def _call(self, endpoint: str, batch: np.ndarray) -> dict[str, np.ndarray]:
        with self._lock:
            outputs = getattr(self.saved, endpoint)(
                self._tf.constant(batch, dtype=self._tf.float32)
            )
            return {key: np.asarray(value) for key, value in outputs.items()}

    def serve(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        """The SavedModel's ``serve`` outputs."""
        return self._call("serve", batch)

    def explain(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        """The SavedModel's ``explain`` outputs (Grad-CAM by gradient tape)."""
        return self._call("explain", batch)

    def close(self) -> None:
        """Nothing to release beyond what garbage collection does."""
