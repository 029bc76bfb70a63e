"""Training batches: random crops of decoded images, augmented on the host, with weights.

The host side of every recipe's augmentation (``model_training.augment``: rotations,
random-resized crops, artefacts, phone-look views) runs here in worker threads; the cheap
elementwise part runs on the device (``model.DermAugment``).
"""

from __future__ import annotations

import math
from typing import Any

import keras
import numpy as np

from model_training.augment import domain_augment, phone_view
from model_training.model import DISTIL_OUTPUT


class CropBatches(keras.utils.PyDataset):  # type: ignore[misc]
    """Random crops of pre-resized uint8 images, shuffled each epoch, with sample weights."""

    def __init__(
        self,
        images: np.ndarray,
        labels: np.ndarray,
        weights: np.ndarray,
        index: np.ndarray,
        crop: tuple[int, int],
        batch_size: int,
        seed: int,
        workers: int = 8,
        augment: str = "basic",
        min_crop_area: float = 0.35,
        diagnoses: np.ndarray | None = None,
        phone_view: float = 0.0,
        dermoscopy: np.ndarray | None = None,
        distil: bool = False,
    ) -> None:
        super().__init__(workers=workers, use_multiprocessing=False, max_queue_size=32)
        if phone_view > 0 and dermoscopy is None:
            raise ValueError("phone_view needs to know which images are dermoscopy photos")
        self.images, self.labels, self.weights = images, labels, weights
        self.diagnoses = diagnoses
        self.distil = distil  # targets for a "distil" output too (the label; the loss ignores it)
        self.phone_view = phone_view
        self.dermoscopy = np.zeros(len(images), bool) if dermoscopy is None else dermoscopy
        self.augment = augment
        self.min_crop_area = min_crop_area
        self.base_index = index
        self.crop = crop
        self.batch_size = batch_size
        self.rng = np.random.default_rng(seed)
        self.order = self.rng.permutation(self.base_index)

    def __len__(self) -> int:
        return len(self.base_index) // self.batch_size  # drop the ragged last batch

    def __getitem__(self, i: int) -> tuple[np.ndarray, Any, np.ndarray]:
        idx = self.order[i * self.batch_size : (i + 1) * self.batch_size]
        ch, cw = self.crop
        h, w = self.images.shape[1:3]
        # A per-item generator keyed on (epoch order, batch) keeps runs reproducible with threads.
        rng = np.random.default_rng([int(self.order[0]), i])
        oy = rng.integers(0, h - ch + 1, len(idx))
        ox = rng.integers(0, w - cw + 1, len(idx))
        batch = np.empty((len(idx), ch, cw, 3), dtype=np.uint8)
        for j, k in enumerate(idx):
            if self.augment == "domain":
                batch[j] = domain_augment(self.images[k], self.crop, rng, self.min_crop_area)
            elif self.augment == "strong":
                batch[j] = self._rotate_and_crop(self.images[k], rng)
            else:
                batch[j] = self.images[k, oy[j] : oy[j] + ch, ox[j] : ox[j] + cw]
            if self.dermoscopy[k] and self.phone_view > 0 and rng.random() < self.phone_view:
                batch[j] = phone_view(batch[j], rng)
        labels = self.labels[idx].astype("float32")
        weights = self.weights[idx].astype("float32")
        if self.diagnoses is None and not self.distil:
            return batch, labels, weights
        targets: dict[str, np.ndarray] = {"logit": labels}
        if self.diagnoses is not None:
            targets["diagnosis"] = self.diagnoses[idx]
        if self.distil:
            targets[DISTIL_OUTPUT] = labels
        return batch, targets, weights

    def _rotate_and_crop(self, image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """Any-angle rotation, then a random-resized crop (Inception-style scale and aspect).

        Done here with Pillow in worker threads (it releases the GIL): affine warps inside the
        model are ~90x slower on JAX.
        """
        from PIL import Image

        h, w = image.shape[:2]
        pil = Image.fromarray(image).rotate(
            float(rng.uniform(0.0, 360.0)), resample=Image.Resampling.BILINEAR
        )
        area = rng.uniform(self.min_crop_area, 1.0) * h * w
        ratio = math.exp(rng.uniform(math.log(3 / 4), math.log(4 / 3)))
        cw_ = min(w, round(math.sqrt(area * ratio)))
        ch_ = min(h, round(math.sqrt(area / ratio)))
        x0 = int(rng.integers(0, w - cw_ + 1))
        y0 = int(rng.integers(0, h - ch_ + 1))
        out = pil.resize(
            (self.crop[1], self.crop[0]),
            Image.Resampling.BILINEAR,
            box=(x0, y0, x0 + cw_, y0 + ch_),
        )
        return np.asarray(out)

    def on_epoch_end(self) -> None:
        self.order = self.rng.permutation(self.base_index)
