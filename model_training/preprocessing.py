"""The one preprocessing path shared by training, evaluation and serving.

Only Pillow and NumPy are used here, so the server imports this module without the training
extras. Pixel scaling is *not* done here: it lives inside the model (``Rescaling`` layer), so a
client that sends raw 0..255 RGB gets the same answer as the server.
"""

from __future__ import annotations

import contextlib
import io
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

try:  # HEIC/HEIF (phones send it, sometimes named .jpg).
    import pillow_heif

    pillow_heif.register_heif_opener()
    HEIF_SUPPORTED = True
except ImportError:  # pragma: no cover - pillow-heif is a runtime dependency
    HEIF_SUPPORTED = False

# Decompression-bomb guards. A header may claim any size, whatever the file's length (a 692-byte
# JPEG can say 7000x7000), so both limits are checked on the header, before any pixel exists:
# - MAX_PIXELS: refuse anything larger outright;
# - MAX_DECODE_PIXELS: the most pixels decoded at full scale (PNG, WebP, HEIC, ...; a JPEG
#   after its DCT-domain reduction, see DRAFT_MIN_SIDE). 25 Mpx covers 24-megapixel cameras.
MAX_PIXELS = 50_000_000
MAX_DECODE_PIXELS = 25_000_000
Image.MAX_IMAGE_PIXELS = MAX_PIXELS
# A large JPEG is decoded at 1/2, 1/4 or 1/8 scale in the DCT domain (Pillow's draft mode:
# libjpeg never builds the full-size pixels) while its shorter side stays at least this long:
# 7000x7000 costs 1750x1750 (9 MB). Over 3x any model input (299) and far above the quality
# gate's sizes, so answers do not change: on real photos the calibrated probability moves by
# at most 0.0074 at 1024 (0.012 at 600); tests/test_decode_parity.py checks <= 0.01.
DRAFT_MIN_SIDE = 1024
DRAFT_SCALES = (8, 4, 2)

RESAMPLE = Image.Resampling.BILINEAR


class ImageDecodeError(ValueError):
    """The bytes are not a decodable image (or are one we refuse to decode)."""


# A part of the upright photo, in fractions of its width and height: (left, top, width,
# height). The user's own crop around the spot (a phone's main camera cannot focus at 10 cm,
# so a photo from further away, cropped, is often the sharper close-up).
Crop = tuple[float, float, float, float]


@dataclass(frozen=True)
class DecodedImage:
    """An upright RGB image (cropped, if asked) and what its header said."""

    image: Image.Image
    original_size: tuple[int, int]  # (width, height) as uploaded, upright
    scale: int = 1  # JPEG draft denominator: 1 = full decode, 2/4/8 = reduced in the DCT
    # The crop in the upright photo's own pixels (left, top, width, height); None: whole photo
    crop_box: tuple[int, int, int, int] | None = None


def draft_scale(width: int, height: int, min_side: int = DRAFT_MIN_SIDE) -> int:
    """Largest of 8, 4, 2 that keeps the shorter side >= ``min_side`` (1: decode in full)."""
    shorter = min(width, height)
    for scale in DRAFT_SCALES:
        if min_side > 0 and shorter // scale >= min_side:
            return scale
    return 1


def crop_box(size: tuple[int, int], crop: Crop) -> tuple[int, int, int, int]:
    """``crop`` (fractions) as whole pixels (left, top, width, height) of an image of ``size``
    = (width, height): at least one pixel, never outside the image. Each of the four is
    rounded on its own (half up), so a square stays square wherever it lies."""
    width, height = size

    def px(fraction: float, side: int) -> int:
        return math.floor(fraction * side + 0.5)

    left = min(width - 1, max(0, px(crop[0], width)))
    top = min(height - 1, max(0, px(crop[1], height)))
    w = min(width - left, max(1, px(crop[2], width)))
    h = min(height - top, max(1, px(crop[3], height)))
    return left, top, w, h


def decode_upload(
    data: bytes, *, draft_min_side: int = DRAFT_MIN_SIDE, crop: Crop | None = None
) -> DecodedImage:
    """Decode bytes into an upright RGB image within the memory budget.

    EXIF orientation is applied and metadata dropped. A JPEG whose shorter side is at least
    twice ``draft_min_side`` is decoded at reduced scale (0 switches that off); with ``crop``
    (fractions of the upright photo) the part kept, not the whole, keeps that many pixels.
    Raises ImageDecodeError for anything not decodable or over MAX_PIXELS /
    MAX_DECODE_PIXELS.
    """
    if not data:
        raise ImageDecodeError("the file is empty")
    try:
        with Image.open(io.BytesIO(data)) as probe:
            # Pillow only raises above twice MAX_IMAGE_PIXELS (it merely warns between 1x
            # and 2x), so check the header's size ourselves before decoding anything.
            if probe.width * probe.height > MAX_PIXELS:
                raise Image.DecompressionBombError("too many pixels")
            probe.verify()  # cheap structural check before the decode
        img = Image.open(io.BytesIO(data))
        width, height = img.size
        # A crop keeps the smaller part of the photo, so it must keep its pixels: the draft's
        # reduction is chosen for the crop's shorter side (either way round, as EXIF may turn).
        needed = draft_min_side if crop is None else math.ceil(draft_min_side / min(crop[2:]))
        scale = draft_scale(width, height, needed) if img.format == "JPEG" else 1
        if scale > 1:
            img.draft(img.mode, (width // scale, height // scale))
            scale = round(width / img.width)
        if img.width * img.height > MAX_DECODE_PIXELS:
            raise Image.DecompressionBombError("too many pixels to decode")
        img.load()
    except Image.DecompressionBombError as exc:
        limit = MAX_PIXELS if "to decode" not in str(exc) else MAX_DECODE_PIXELS
        raise ImageDecodeError(
            f"the image is larger than {limit:,} pixels; send a smaller photo"
        ) from exc
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise ImageDecodeError("the file is not a decodable image") from exc
    upright: Image.Image = img
    # A corrupt EXIF block must not lose an otherwise good image.
    with contextlib.suppress(Exception):
        upright = ImageOps.exif_transpose(img)
    swapped = upright.size != img.size
    original = (height, width) if swapped else (width, height)
    box = None
    if crop is not None:
        # The box in the uploaded photo's pixels (what the client measured against), then the
        # same fractions of the decoded, possibly reduced, pixels.
        box = crop_box(original, crop)
        left, top, w, h = crop_box(upright.size, crop)
        upright = upright.crop((left, top, left + w, top + h))
    return DecodedImage(image=to_rgb(upright), original_size=original, scale=scale, crop_box=box)


def decode_image(data: bytes) -> Image.Image:
    """Decode bytes into an upright RGB image (see decode_upload); the one decoder."""
    return decode_upload(data).image


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
