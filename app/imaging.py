"""Image outputs: the Grad-CAM overlay and a metadata-free preview."""

from __future__ import annotations

import base64
import io

import numpy as np
from PIL import Image

# Anchor colours of a perceptually ordered blue → cyan → yellow → red ramp (close to "turbo"),
# interpolated linearly; matplotlib is a training-only dependency, so no colormap import.
_RAMP = np.array(
    [
        [48, 18, 59],
        [70, 131, 247],
        [27, 208, 213],
        [97, 252, 108],
        [210, 233, 53],
        [254, 155, 45],
        [218, 57, 7],
        [122, 4, 3],
    ],
    dtype=np.float64,
)
PREVIEW_MAX_SIDE = 768
_MAX_ALPHA = 170  # the photo must stay visible through the hottest areas


def fit_within(width: int, height: int, max_side: int) -> tuple[int, int]:
    """(width, height) scaled down so the longer side is at most ``max_side``."""
    scale = min(1.0, max_side / max(width, height))
    return max(1, round(width * scale)), max(1, round(height * scale))


def heatmap_overlay_png(heat: np.ndarray, size: tuple[int, int]) -> bytes:
    """Colour a [h, w] 0..1 map and upsample it to ``size`` = (width, height), as RGBA PNG.

    Alpha follows the heat, so cold areas are fully transparent and the overlay can be laid
    over the photo as is.
    """
    heat8 = Image.fromarray((np.clip(heat, 0.0, 1.0) * 255).astype(np.uint8), mode="L")
    smooth = np.asarray(heat8.resize(size, Image.Resampling.BILINEAR), dtype=np.float64) / 255.0
    positions = np.linspace(0.0, 1.0, len(_RAMP))
    rgb = np.stack([np.interp(smooth, positions, _RAMP[:, c]) for c in range(3)], axis=-1)
    alpha = np.clip(smooth * 1.4, 0.0, 1.0) ** 1.2 * _MAX_ALPHA  # low heat fades out fast
    rgba = np.concatenate([rgb, alpha[..., None]], axis=-1).round().astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(rgba, mode="RGBA").save(buf, format="PNG", optimize=False)
    return buf.getvalue()


def preview_jpeg(img: Image.Image, max_side: int = PREVIEW_MAX_SIDE, quality: int = 85) -> bytes:
    """The upright photo, downscaled and re-encoded without EXIF/GPS or any other metadata."""
    small = img.convert("RGB")
    small = small.resize(fit_within(*small.size, max_side), Image.Resampling.BILINEAR)
    buf = io.BytesIO()
    small.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def b64(data: bytes) -> str:
    """Base64 text for JSON."""
    return base64.b64encode(data).decode("ascii")
