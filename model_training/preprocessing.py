"""The one preprocessing path shared by training, evaluation and serving.

Only Pillow and NumPy are used here, so the server imports this module without the training
extras. Pixel scaling is *not* done here: it lives inside the model (``Rescaling`` layer), so a
client that sends raw 0..255 RGB gets the same answer as the server.
"""

from __future__ import annotations

import contextlib
import io
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

try:  # HEIC/HEIF (phones send it, sometimes named .jpg).
    import pillow_heif

    pillow_heif.register_heif_opener()
    HEIF_SUPPORTED = True
except ImportError:  # pragma: no cover - pillow-heif is a runtime dependency
    HEIF_SUPPORTED = False

# Decompression-bomb guard: refuse images above this many pixels before decoding them fully.
MAX_PIXELS = 50_000_000
Image.MAX_IMAGE_PIXELS = MAX_PIXELS

RESAMPLE = Image.Resampling.BILINEAR


class ImageDecodeError(ValueError):
    """The bytes are not a decodable image (or are one we refuse to decode)."""


def decode_image(data: bytes) -> Image.Image:
    """Decode bytes into an upright RGB image; EXIF orientation applied, metadata dropped."""
    if not data:
        raise ImageDecodeError("the file is empty")
    try:
        with Image.open(io.BytesIO(data)) as probe:
            # Pillow only raises above twice MAX_IMAGE_PIXELS (it merely warns between 1x
            # and 2x), so check the header's size ourselves before decoding anything.
            if probe.width * probe.height > MAX_PIXELS:
                raise Image.DecompressionBombError("too many pixels")
            probe.verify()  # cheap structural check before the full decode
        img = Image.open(io.BytesIO(data))
        img.load()
    except Image.DecompressionBombError as exc:
        raise ImageDecodeError(f"the image is larger than {MAX_PIXELS:,} pixels") from exc
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise ImageDecodeError("the file is not a decodable image") from exc
    upright: Image.Image = img
    # A corrupt EXIF block must not lose an otherwise good image.
    with contextlib.suppress(Exception):
        upright = ImageOps.exif_transpose(img)
    return to_rgb(upright)


def to_rgb(img: Image.Image) -> Image.Image:
    """Convert any Pillow mode (alpha, palette, CMYK, 16-bit, grey) to 8-bit RGB.

    Transparency is flattened onto white, as a photo viewer would show it. A new image is
    returned, so EXIF, ICC and GPS metadata are never carried along.
    """
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        arr = np.asarray(img, dtype=np.float64)
        hi = float(arr.max()) if arr.size else 0.0
        scale = 255.0 / 65535.0 if hi > 255 else 1.0
        img = Image.fromarray(np.clip(arr * scale, 0, 255).astype(np.uint8), mode="L")
    elif img.mode == "F":
        arr = np.asarray(img, dtype=np.float64)
        img = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), mode="L")
    if img.mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    if img.mode in ("RGBA", "LA", "PA"):
        rgba = img.convert("RGBA")
        background = Image.new("RGB", rgba.size, (255, 255, 255))
        background.paste(rgba, mask=rgba.getchannel("A"))
        return background
    rgb = img.convert("RGB")
    return Image.frombytes("RGB", rgb.size, rgb.tobytes())


def resize_to_input(img: Image.Image, size: tuple[int, int]) -> np.ndarray:
    """Squash the whole image to ``size`` = (height, width); return float32 RGB 0..255.

    The whole image is kept (no crop), as the ISIC 2017 images were made, so a lesion near the
    border is never cut away.
    """
    height, width = size
    resized = img.resize((width, height), RESAMPLE)
    return np.asarray(resized, dtype=np.float32)


TTA_VIEWS = ("horizontal", "vertical", "transpose")


def tta_view(batch: np.ndarray, name: str) -> np.ndarray:
    """One dihedral view of a batch [N, H, W, 3] for test-time augmentation.

    A lesion has no up or left, so mirrored and transposed photos are equally valid inputs.
    Shared by the evaluation that measures TTA and the server that would apply it, so what
    is measured is what is served. ``transpose`` needs a square input.
    """
    if name == "identity":
        return batch
    if name == "horizontal":
        return np.ascontiguousarray(batch[:, :, ::-1])
    if name == "vertical":
        return np.ascontiguousarray(batch[:, ::-1])
    if name == "transpose" and batch.shape[1] == batch.shape[2]:
        return np.ascontiguousarray(batch.transpose(0, 2, 1, 3))
    raise ValueError(f"unknown test-time view {name!r} for a batch of shape {batch.shape}")


def load_image_file(path: str | Path) -> Image.Image:
    """Read an image file through exactly the decoder the server uses for uploads."""
    return decode_image(Path(path).read_bytes())


def image_to_input(path: str | Path, size: tuple[int, int]) -> np.ndarray:
    """File → model input, the path used for validation, evaluation and feature caching."""
    return resize_to_input(load_image_file(path), size)
