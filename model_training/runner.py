"""The one way the training package runs an exported SavedModel on images.

Evaluation, the gates and the shortcut checks all score images through this: the shared
preprocessing (``resize_to_input``), batches, optional test-time views, and the artifact's
``serve`` endpoint, so every figure they report comes from the same path as serving.
"""

from __future__ import annotations

import hashlib
import sys
import time
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from model_training.preprocessing import load_image_file, resize_to_input, tta_view

SAVED_MODEL_DIR = "saved_model"  # as model_training.export (which imports Keras: kept lazy)


def saved_model_fingerprint(artifact: Path) -> str:
    """Hash of the SavedModel graph and its variable index (which checksums every tensor)."""
    digest = hashlib.sha256()
    for rel in ("saved_model.pb", "variables/variables.index", "fingerprint.pb"):
        path = artifact / SAVED_MODEL_DIR / rel
        if path.exists():
            digest.update(rel.encode())
            digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def lazy_files(paths: Sequence[str | Path]) -> Iterable[Image.Image]:
    """Images read one at a time, as a runner consumes them."""
    return (load_image_file(p) for p in paths)


class Embedder:
    """The artifact's ``serve`` endpoint on PIL images.

    Returns the logit (averaged over the requested test-time views) and one more ``serve``
    output (of the first view): the embedding the gates score, for instance.
    """

    def __init__(self, artifact: Path, batch_size: int = 16, output: str = "embedding") -> None:
        import tensorflow as tf

        from model_training.export import read_metadata

        meta = read_metadata(artifact)
        serve_outputs = list(meta.get("endpoints", {}).get("serve", []))
        if output not in serve_outputs:
            raise ValueError(f"endpoints.serve lists {serve_outputs}, not {output!r}")
        self.output = output
        self.size = (int(meta["input"]["height"]), int(meta["input"]["width"]))
        self.batch_size = batch_size
        self._tf = tf
        self._model = tf.saved_model.load(str(artifact / SAVED_MODEL_DIR))
        self.images_done = 0
        self.seconds = 0.0  # wall time of whole calls, decoding included
        self.infer_seconds = 0.0  # time inside the model only

    def __call__(
        self,
        images: Iterable[Image.Image],
        total: int,
        desc: str,
        views: Sequence[str] = ("identity",),
    ) -> tuple[np.ndarray, np.ndarray]:
        """(logits [n], ``output`` [n, d]) for ``images`` (an iterable read lazily)."""
        from tqdm import tqdm

        logits: list[np.ndarray] = []
        outputs: list[np.ndarray] = []
        batch: list[np.ndarray] = []
        t0 = time.perf_counter()

        def flush() -> None:
            stacked = np.stack(batch)
            t_model = time.perf_counter()
            outs = [self._model.serve(self._tf.constant(tta_view(stacked, v))) for v in views]
            self.infer_seconds += time.perf_counter() - t_model
            logits.append(np.mean([o["logit"].numpy().reshape(-1) for o in outs], axis=0))
            outputs.append(outs[0][self.output].numpy())
            batch.clear()

        with tqdm(total=total, desc=desc, unit="img", file=sys.stderr) as bar:
            for img in images:
                batch.append(resize_to_input(img, self.size))
                if len(batch) == self.batch_size:
                    flush()
                    bar.update(self.batch_size)
            if batch:
                n = len(batch)
                flush()
                bar.update(n)
        self.seconds += time.perf_counter() - t0
        self.images_done += total
        if not logits:
            return np.zeros(0, np.float32), np.zeros((0, 0), np.float32)
        return np.concatenate(logits), np.concatenate(outputs)
