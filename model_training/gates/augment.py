"""Heavily varied copies of lesion photos: what other cameras, clinics and users produce.

A skin gate fitted on three sources must accept a fourth. Each copy draws, seeded by its key:
a geometry change (zoom out, showing more surrounding skin, made by mirroring the skin at the
border; zoom in; a right-angle turn or mirror), at most one everyday artefact from
``model_training.artefacts`` (hair, ink, ruler, vignette, dermatoscope rim), a colour and
illumination cast (per-channel gains, brightness, gamma, saturation), a mild blur (well
below what the quality gate refuses) and JPEG recompression.

``phone_look`` makes a dermoscopy photo look like a phone close-up of the same spot (lower
effective resolution, visible skin grain, specular glints, a warm or cool white balance, an
uneven light and a flatter, less saturated colour). Without such copies a gate fitted on
dermoscopy alone refused 9.6% of the phone photos of a source it never saw.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageEnhance, ImageFilter

from model_training.artefacts import ARTEFACTS, with_artefact

# Artefacts a copy may carry ("" = none); the artefact notes are trained on these labels.
COPY_ARTEFACTS = ("", *ARTEFACTS)


@dataclass(frozen=True)
class Recipe:
    """What one copy got (for reports and the artefact-note labels)."""

    artefact: str
    zoom: float  # < 1: zoomed out (more skin around), > 1: zoomed in
    gains: tuple[float, float, float]
    gamma: float
    saturation: float
    blur: float  # Gaussian radius as a fraction of the shorter side
    jpeg: int  # 0 = not recompressed


def draw_recipe(rng: np.random.Generator, artefact: str | None = None) -> Recipe:
    """A random recipe; ``artefact`` fixes the artefact ("" = none)."""
    art = COPY_ARTEFACTS[int(rng.integers(len(COPY_ARTEFACTS)))] if artefact is None else artefact
    u = rng.random()
    zoom = (
        float(rng.uniform(0.55, 0.85))
        if u < 0.4
        else float(rng.uniform(1.1, 1.6))
        if u < 0.6
        else 1.0
    )
    bright = rng.uniform(0.7, 1.3)
    gains = tuple(float(bright * g) for g in rng.uniform(0.82, 1.18, size=3))
    return Recipe(
        artefact=art,
        zoom=zoom,
        gains=(gains[0], gains[1], gains[2]),
        gamma=float(rng.uniform(0.8, 1.25)),
        saturation=float(rng.uniform(0.6, 1.4)),
        blur=float(rng.uniform(0.002, 0.007)) if rng.random() < 0.3 else 0.0,
        jpeg=int(rng.integers(25, 85)) if rng.random() < 0.5 else 0,
    )


def zoom_out(img: Image.Image, scale: float) -> Image.Image:
    """The photo shrunk to ``scale`` in the middle of a frame of its own size, the frame
    filled by mirroring the photo's border skin outwards."""
    w, h = img.size
    sw, sh = max(2, round(w * scale)), max(2, round(h * scale))
    small = np.asarray(img.resize((sw, sh), Image.Resampling.BILINEAR))
    left, top = (w - sw) // 2, (h - sh) // 2
    pad: list[tuple[int, int]] = [(top, h - sh - top), (left, w - sw - left), (0, 0)]
    out = small
    # np.pad "symmetric" needs pad <= size per pass: pad in steps for strong zooms.
    while any(a or b for a, b in pad):
        step = [(min(a, out.shape[i]), min(b, out.shape[i])) for i, (a, b) in enumerate(pad)]
        out = np.pad(out, step, mode="symmetric")
        pad = [(a - s[0], b - s[1]) for (a, b), s in zip(pad, step, strict=True)]
    return Image.fromarray(out)


def zoom_in(img: Image.Image, scale: float, rng: np.random.Generator) -> Image.Image:
    """A crop of 1/scale of each side around a jittered centre, resized back."""
    w, h = img.size
    cw, ch = max(2, round(w / scale)), max(2, round(h / scale))
    left = int(rng.integers(0, w - cw + 1))
    top = int(rng.integers(0, h - ch + 1))
    return img.crop((left, top, left + cw, top + ch)).resize((w, h), Image.Resampling.BILINEAR)


def apply_recipe(img: Image.Image, recipe: Recipe, seed: int) -> Image.Image:
    """``img`` changed as ``recipe`` says (geometry, artefact, colour, blur, JPEG)."""
    rng = np.random.default_rng(seed)
    out = img.convert("RGB")
    if recipe.zoom < 1.0:
        out = zoom_out(out, recipe.zoom)
    elif recipe.zoom > 1.0:
        out = zoom_in(out, recipe.zoom, rng)
    turn = int(rng.integers(8))
    if turn >= 4:
        out = out.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    if turn % 4:
        out = out.rotate(90 * (turn % 4), expand=True)
    if recipe.artefact:
        out = with_artefact(out, recipe.artefact, seed)
    arr = np.asarray(out, dtype=np.float32) / 255.0
    arr = np.clip(arr * np.asarray(recipe.gains, dtype=np.float32), 0.0, 1.0) ** recipe.gamma
    out = Image.fromarray(np.clip(np.rint(arr * 255.0), 0, 255).astype(np.uint8))
    out = ImageEnhance.Color(out).enhance(recipe.saturation)
    if recipe.blur > 0:
        out = out.filter(ImageFilter.GaussianBlur(recipe.blur * min(out.size)))
    if recipe.jpeg:
        buf = io.BytesIO()
        out.save(buf, format="JPEG", quality=recipe.jpeg)
        buf.seek(0)
        out = Image.open(buf).convert("RGB")
    return out


def phone_look(img: Image.Image, seed: int) -> Image.Image:
    """A dermoscopy photo made to look like a phone close-up of the same spot (seeded)."""
    rng = np.random.default_rng(seed)
    out = img.convert("RGB")
    w, h = out.size
    # A phone a hand's width away resolves a spot with a few hundred pixels.
    s = float(rng.uniform(180, 400)) / max(w, h)
    if s < 1.0:
        small = (max(32, round(w * s)), max(32, round(h * s)))
        out = out.resize(small, Image.Resampling.BILINEAR).resize((w, h), Image.Resampling.BICUBIC)
    arr = np.asarray(out, dtype=np.float32) / 255.0
    # Skin grain (pores, fine lines): multiplicative noise at half resolution.
    grain = rng.normal(0.0, rng.uniform(0.02, 0.06), size=(h // 2 + 1, w // 2 + 1))
    grain_img = Image.fromarray(grain.astype(np.float32)).resize((w, h), Image.Resampling.BILINEAR)
    arr = arr * (1.0 + np.asarray(grain_img)[..., None])
    # Specular glints of unpolarised light on skin, which dermatoscopes remove.
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    for _ in range(int(rng.integers(0, 4))):
        cx, cy = rng.uniform(0, w), rng.uniform(0, h)
        r = rng.uniform(0.02, 0.08) * min(w, h)
        glint = np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / (2 * r * r))
        arr = arr + rng.uniform(0.15, 0.4) * glint[..., None]
    gains = np.asarray(
        [rng.uniform(0.95, 1.15), rng.uniform(0.85, 1.02), rng.uniform(0.7, 0.95)], np.float32
    )
    # Light falling off across the frame (a lamp or window to one side).
    tilt_x, tilt_y = rng.uniform(-0.25, 0.25, size=2)
    light = 1.0 + tilt_x * (xx / w - 0.5) + tilt_y * (yy / h - 0.5)
    arr = arr * gains * light[..., None]
    out = Image.fromarray(np.clip(np.rint(arr * 255.0), 0, 255).astype(np.uint8))
    out = ImageEnhance.Color(out).enhance(float(rng.uniform(0.5, 0.9)))
    out = ImageEnhance.Contrast(out).enhance(float(rng.uniform(0.7, 1.0)))
    buf = io.BytesIO()
    out.save(buf, format="JPEG", quality=int(rng.integers(60, 90)))
    buf.seek(0)
    return Image.open(buf).convert("RGB")


def lesion_copy(
    img: Image.Image, seed: int, artefact: str | None = None
) -> tuple[Image.Image, Recipe]:
    """One varied copy of a lesion photo and the recipe it got."""
    recipe = draw_recipe(np.random.default_rng(seed), artefact)
    return apply_recipe(img, recipe, seed), recipe
