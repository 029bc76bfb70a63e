"""Host-side augmentation that imitates how photos differ between sources.

A new camera, clinic or dermatoscope changes scale, framing, sharpness, compression and the
artefacts around the lesion; the colour side (illumination, white balance, colour constancy,
blur) runs on the accelerator in ``model.DermAugment``. Everything here works on one uint8
image with Pillow (which releases the GIL, so ``CropBatches``' worker threads run it in
parallel) and takes its randomness from the caller's generator, so a run is reproducible.

The ``domain`` recipe per training image:

1. one affine resample straight to the input size: any-angle rotation, a random-resized crop
   (area share ``min_area``..1, aspect 3/4..4/3) and a shift, in a single interpolation;
2. with probability ``ARTEFACT_P`` one everyday artefact from ``model_training.artefacts``
   (hair, marker ink, ruler, vignette, dermatoscope rim): the label must not depend on them;
3. with probability ``JPEG_P`` a JPEG re-encode at quality 25-85 (phones and web uploads);
   with probability ``RESCALE_P`` a shrink to 30-70 % and back (a small, soft phone crop).

The ``clinical`` variant (``TrainConfig.phone_view``) also turns a share of the dermoscopy
views into phone close-ups of the same spot with :func:`phone_view`: lay users send phone
photos, and the only real ones in training are PAD-UFES-20's 524. It is a faster cousin of the
skin gate's ``phone_look`` (which stays as it is: the shipped gates were fitted with it).
"""

from __future__ import annotations

import io
import math

import numpy as np
from PIL import Image, ImageEnhance

from model_training.artefacts import ARTEFACTS

ARTEFACT_P = 0.3
JPEG_P = 0.3
RESCALE_P = 0.2
_ARTEFACT_NAMES = tuple(sorted(ARTEFACTS))


def affine_params(
    size: tuple[int, int],
    out: tuple[int, int],
    rng: np.random.Generator,
    min_area: float,
) -> tuple[float, float, float, float, float, float]:
    """Pillow AFFINE coefficients mapping output pixels into a rotated random-resized crop.

    ``size`` and ``out`` are (width, height). The crop has ``min_area``..1 of the source's
    area and aspect 3/4..4/3, is rotated by any angle about its centre, and is shifted at
    most as far as it stays within the source (before rotation).
    """
    w, h = size
    ow, oh = out
    area = rng.uniform(min_area, 1.0) * w * h
    ratio = math.exp(rng.uniform(math.log(3 / 4), math.log(4 / 3)))
    cw = min(float(w), math.sqrt(area * ratio))
    ch = min(float(h), math.sqrt(area / ratio))
    cx = w / 2 + rng.uniform(-1, 1) * (w - cw) / 2
    cy = h / 2 + rng.uniform(-1, 1) * (h - ch) / 2
    theta = rng.uniform(0.0, 2 * math.pi)
    sx, sy = cw / ow, ch / oh
    cos, sin = math.cos(theta), math.sin(theta)
    a, b, d, e = cos * sx, -sin * sy, sin * sx, cos * sy
    c = cx - a * ow / 2 - b * oh / 2
    f = cy - d * ow / 2 - e * oh / 2
    return a, b, c, d, e, f


def jpeg_roundtrip(img: Image.Image, quality: int) -> Image.Image:
    """``img`` after one JPEG encode and decode at ``quality``."""
    buffer = io.BytesIO()
    img.save(buffer, format="JPEG", quality=quality)
    buffer.seek(0)
    with Image.open(buffer) as decoded:
        return decoded.convert("RGB")


def phone_view(view: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A uint8 [H, W, 3] dermoscopy view made to look like a phone close-up of the same spot.

    What a phone adds and a dermatoscope removes: a lower effective resolution, skin grain,
    specular glints of unpolarised light, a warm or cool white balance, light falling off
    across the frame, flatter and less saturated colour, and JPEG. About 5 ms at 299 px (the
    gate's ``phone_look`` takes 9: glints are computed in their own box, grain is upsampled by
    repetition), because it runs in the training loop's host threads.
    """
    h, w = view.shape[:2]
    pil = Image.fromarray(view)
    scale = float(rng.uniform(0.45, 1.0))
    if scale < 0.95:
        small = pil.resize((max(32, round(w * scale)), max(32, round(h * scale))))
        pil = small.resize((w, h), Image.Resampling.BILINEAR)
    # Skin grain (pores, fine lines): multiplicative noise at half resolution.
    noise = rng.normal(0.0, rng.uniform(0.02, 0.06), size=(h // 2 + 1, w // 2 + 1))
    grain = np.repeat(np.repeat(noise.astype(np.float32), 2, axis=0), 2, axis=1)[:h, :w]
    # Light falling off across the frame (a lamp or window to one side).
    tilt_x, tilt_y = (np.float32(t) for t in rng.uniform(-0.25, 0.25, size=2))
    ramp_y = np.arange(h, dtype=np.float32)[:, None] / h - 0.5
    ramp_x = np.arange(w, dtype=np.float32)[None, :] / w - 0.5
    light = (1.0 + grain) * (1.0 + tilt_y * ramp_y + tilt_x * ramp_x)
    gains = np.asarray(
        [rng.uniform(0.95, 1.15), rng.uniform(0.85, 1.02), rng.uniform(0.7, 0.95)], np.float32
    )
    arr = np.asarray(pil, dtype=np.float32) * light[..., None] * gains
    for _ in range(int(rng.integers(0, 4))):  # glints, each within 3 radii of its centre
        cx, cy = rng.uniform(0, w), rng.uniform(0, h)
        r = rng.uniform(0.02, 0.08) * min(w, h)
        strength = np.float32(255.0 * rng.uniform(0.15, 0.4))
        x0, x1 = max(0, int(cx - 3 * r)), min(w, int(cx + 3 * r) + 1)
        y0, y1 = max(0, int(cy - 3 * r)), min(h, int(cy + 3 * r) + 1)
        gx = np.exp(-((np.arange(x0, x1, dtype=np.float32) - cx) ** 2) / (2 * r * r))
        gy = np.exp(-((np.arange(y0, y1, dtype=np.float32) - cy) ** 2) / (2 * r * r))
        arr[y0:y1, x0:x1] += strength * (gy[:, None] * gx[None, :])[..., None]
    out = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))
    out = ImageEnhance.Color(out).enhance(float(rng.uniform(0.5, 0.9)))
    out = ImageEnhance.Contrast(out).enhance(float(rng.uniform(0.7, 1.0)))
    return np.asarray(jpeg_roundtrip(out, int(rng.integers(60, 91))), dtype=np.uint8)


def domain_augment(
    image: np.ndarray, out: tuple[int, int], rng: np.random.Generator, min_area: float
) -> np.ndarray:
    """One training view of a stored uint8 [H, W, 3] image, as uint8 [out_h, out_w, 3]."""
    oh, ow = out
    pil = Image.fromarray(image)
    coeffs = affine_params(pil.size, (ow, oh), rng, min_area)
    view = pil.transform((ow, oh), Image.Transform.AFFINE, coeffs, Image.Resampling.BILINEAR)
    if rng.random() < ARTEFACT_P:
        name = _ARTEFACT_NAMES[int(rng.integers(len(_ARTEFACT_NAMES)))]
        view = ARTEFACTS[name](view, int(rng.integers(2**31)))
    if rng.random() < RESCALE_P:
        scale = rng.uniform(0.3, 0.7)
        small = view.resize((max(8, round(ow * scale)), max(8, round(oh * scale))))
        view = small.resize((ow, oh), Image.Resampling.BILINEAR)
    if rng.random() < JPEG_P:
        view = jpeg_roundtrip(view, int(rng.integers(25, 86)))
    return np.asarray(view, dtype=np.uint8)
