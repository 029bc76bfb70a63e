"""Deliberately degraded copies of a photo, what the quality gate's thresholds are set against.

Each kind stands for a way a lay user's photo goes wrong (see ``DEGRADATIONS``); every copy's
severity is drawn from a fixed range by a generator seeded per (seed, photo, kind), so the
copies do not depend on the order the photos are met in.
"""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageEnhance, ImageFilter

from model_training.gates.features import stable_seed

# Degraded copies: kind -> (parameter, low, high); one copy per image and kind, seeded.
DEGRADATIONS: dict[str, tuple[str, float, float]] = {
    "tiny": ("shorter side in pixels", 12.0, 48.0),
    "blurred": ("Gaussian radius as a fraction of the shorter side", 0.012, 0.03),
    "dark": ("brightness factor", 0.08, 0.3),
    "overexposed": ("brightness gain, then clipped at 255", 1.8, 3.0),
    # A black-and-white filter or mode, or a photo of a grey print (0: fully grey).
    "monochrome": ("share of the colour saturation kept", 0.0, 0.05),
}
# The issue code the gate should give each kind.
EXPECTED_CODE = {
    "tiny": "too_small",
    "blurred": "too_blurry",
    "dark": "too_dark",
    "overexposed": "overexposed",
    "monochrome": "no_colour",
}


def degrade(img: Image.Image, kind: str, rng: np.random.Generator) -> tuple[Image.Image, float]:
    """A degraded copy of ``img`` (see DEGRADATIONS) and the severity drawn."""
    _, low, high = DEGRADATIONS[kind]
    w, h = img.size
    if kind == "tiny":
        side = float(rng.integers(int(low), int(high) + 1))
        scale = side / min(w, h)
        size = (max(1, round(w * scale)), max(1, round(h * scale)))
        return img.resize(size, Image.Resampling.BILINEAR), side
    value = float(rng.uniform(low, high))
    if kind == "blurred":
        return img.filter(ImageFilter.GaussianBlur(value * min(w, h))), value
    if kind in ("dark", "overexposed"):
        arr = np.asarray(img, dtype=np.float32) * value
        return Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8)), value
    if kind == "monochrome":
        return ImageEnhance.Color(img).enhance(value), value
    raise ValueError(f"unknown degradation {kind!r}")


def degraded_copies(img: Image.Image, key: str, seed: int) -> dict[str, tuple[Image.Image, float]]:
    """One copy per kind, each seeded by (seed, image key, kind): order-independent."""
    return {
        kind: degrade(img, kind, np.random.default_rng(stable_seed(seed, key, kind)))
        for kind in DEGRADATIONS
    }
