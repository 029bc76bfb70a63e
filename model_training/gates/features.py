"""The artifact's own ``serve`` outputs for many images, cached on disk item by item.

Every image the gates are fitted or measured on goes through the artifact's ``serve``
endpoint once: its ``logit`` (the model's answer, for the artefact-effect figures) and its
feature outputs (``embedding``, 2048-d; ``ood_embedding``, mixed5; ``skin_embedding``, mixed5 plus
mixed2 texture statistics; each when listed). Results are
stored per item key in ``<cache>/<weights fingerprint>/<tag>.npz`` and appended as batches
finish, so an interrupted run resumes and a changed sample only computes the new items.
"""

from __future__ import annotations

import hashlib
import logging
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from model_training.preprocessing import resize_to_input
from model_training.runner import SAVED_MODEL_DIR

logger = logging.getLogger("model_training.gates")

DEFAULT_CACHE = (
    Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "skin-lesion-triage" / "gates"
)
FEATURE_OUTPUTS = ("embedding", "ood_embedding", "skin_embedding")


def stable_seed(*parts: object) -> int:
    """A seed from any printable parts, the same in every process."""
    return int(hashlib.sha256(repr(parts).encode()).hexdigest()[:12], 16)


class ServeRunner:
    """The artifact's ``serve`` endpoint on PIL images: logit plus the feature outputs."""

    def __init__(self, artifact: Path, batch_size: int = 16) -> None:
        import tensorflow as tf

        from model_training.export import read_metadata

        meta = read_metadata(artifact)
        listed = list(meta.get("endpoints", {}).get("serve", []))
        self.outputs = [o for o in FEATURE_OUTPUTS if o in listed]
        if not self.outputs:
            raise ValueError(f"endpoints.serve lists none of {FEATURE_OUTPUTS}: {listed}")
        self.size = (int(meta["input"]["height"]), int(meta["input"]["width"]))
        self.batch_size = batch_size
        self._tf = tf
        self._model = tf.saved_model.load(str(artifact / SAVED_MODEL_DIR))
        self.images_done = 0
        self.infer_seconds = 0.0

    def run(self, images: Sequence[Image.Image]) -> dict[str, np.ndarray]:
        """{"logit": [n], output: [n, d] ...} for one batch of images."""
        batch = np.stack([resize_to_input(img, self.size) for img in images])
        t0 = time.perf_counter()
        out = self._model.serve(self._tf.constant(batch))
        self.infer_seconds += time.perf_counter() - t0
        self.images_done += len(images)
        result = {"logit": out["logit"].numpy().reshape(-1).astype(np.float32)}
        for name in self.outputs:
            result[name] = out[name].numpy().astype(np.float32)
        return result


@dataclass
class FeatureStore:
    """Serve outputs per item key, cached under ``folder/fingerprint/<tag>.npz``."""

    folder: Path
    fingerprint: str
    runner_factory: Callable[[], ServeRunner]
    enabled: bool = True
    _runner: ServeRunner | None = field(default=None, init=False)

    @property
    def runner(self) -> ServeRunner:
        """The SavedModel, loaded on first need (a fully cached run never loads it)."""
        if self._runner is None:
            self._runner = self.runner_factory()
        return self._runner

    def _path(self, tag: str) -> Path:
        return self.folder / self.fingerprint / f"{tag}.npz"

    def _load(self, tag: str) -> dict[str, np.ndarray]:
        path = self._path(tag)
        if not (self.enabled and path.exists()):
            return {}
        with np.load(path, allow_pickle=False) as data:
            return {k: data[k] for k in data.files}

    def _save(self, tag: str, stored: dict[str, np.ndarray]) -> None:
        if not self.enabled:
            return
        path = self._path(tag)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp.npz")
        np.savez(tmp, **stored)  # type: ignore[arg-type]
        tmp.replace(path)

    def get(
        self,
        tag: str,
        keys: Sequence[str],
        make: Callable[[int], Image.Image],
        desc: str = "",
        save_every: int = 20,
    ) -> dict[str, np.ndarray]:
        """Outputs for ``keys`` (row i = keys[i]); ``make(i)`` builds image i on a miss."""
        stored = self._load(tag)
        have = {str(k): i for i, k in enumerate(stored.get("keys", np.zeros(0, str)))}
        missing = [i for i, k in enumerate(keys) if k not in have]
        if missing:
            from tqdm import tqdm

            runner = self.runner
            new: dict[str, list[np.ndarray]] = {}
            new_keys: list[str] = []
            bar = tqdm(total=len(missing), desc=desc or tag, unit="img", file=sys.stderr)
            step = runner.batch_size
            for b, start in enumerate(range(0, len(missing), step)):
                rows = missing[start : start + step]
                out = runner.run([make(i) for i in rows])
                for name, arr in out.items():
                    new.setdefault(name, []).append(arr)
                new_keys.extend(keys[i] for i in rows)
                bar.update(len(rows))
                last = start + step >= len(missing)
                if (b + 1) % save_every == 0 or last:
                    stored = _append(stored, new_keys, new)
                    self._save(tag, stored)
                    new, new_keys = {}, []
            bar.close()
            have = {str(k): i for i, k in enumerate(stored["keys"])}
        if not keys:
            return {"logit": np.zeros(0, np.float32)}
        idx = np.asarray([have[k] for k in keys])
        return {k: v[idx] for k, v in stored.items() if k != "keys"}


def _append(
    stored: dict[str, np.ndarray], keys: list[str], new: dict[str, list[np.ndarray]]
) -> dict[str, np.ndarray]:
    if not keys:
        return stored
    out = {"keys": np.concatenate([stored.get("keys", np.zeros(0, "U1")), np.asarray(keys)])}
    for name, parts in new.items():
        arr = np.concatenate(parts)
        out[name] = np.concatenate([stored[name], arr]) if name in stored else arr
    return out
