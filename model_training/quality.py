"""Photo-quality gate: too small, too blurry, too dark, overexposed or without colour → not
assessed.

Only Pillow and NumPy are used, so the server imports this module without the training extras.
The measures are taken on a grey (luma) copy squashed to a fixed working size, the way the
model squashes every photo to its input size, so they do not depend on the upload's
resolution. The thresholds come from the artifact's ``metadata.json`` (key ``quality``, set on
real and deliberately degraded validation images by ``python -m model_training.gates``); a
missing key switches that check off.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from typing import Any

import numpy as np
from PIL import Image

# Working size (width, height) for the resolution-independent measures.
WORK_SIZE = (256, 256)
# Luma at or below DARK_LEVEL counts as dark; at or above CLIP_LEVEL as clipped (blown out).
DARK_LEVEL = 16
CLIP_LEVEL = 250
# Brightness leaves out near-black surround (luma <= SURROUND_LEVEL: a dermatoscope's rim, black
# borders) unless nearly all the photo is that dark (then it is the plain mean).
SURROUND_LEVEL = 40
MIN_LIT_FRACTION = 0.25
# Colourfulness is this percentile of the lit pixels' chroma: the whole frame's mean called a
# small coloured lesion on pale skin (ISIC_0009936) nearly grey.
COLOUR_PERCENTILE = 99

THRESHOLD_KEYS = (
    "min_side",
    "min_sharpness",
    "min_brightness",
    "max_brightness",
    "max_clipped_fraction",
    "min_colourfulness",
)
# The integer fields of QualityMeasures; the rest are floats.
SIZE_FIELDS = ("width", "height")
ISSUE_CODES = ("too_small", "too_blurry", "too_dark", "overexposed", "no_colour")


@dataclass(frozen=True)
class QualityMeasures:
    """What the gate measures on one photo.

    ``sharpness`` is the variance of a 4-neighbour Laplacian of the 0..255 luma at the working
    size (higher = sharper); ``brightness`` the mean luma (0..255) of the pixels brighter than
    ``SURROUND_LEVEL`` (the plain mean when fewer than ``MIN_LIT_FRACTION`` of them are), so
    the black surround of a contact dermatoscope does not make a well-lit lesion "too dark";
    ``dark_fraction`` and ``clipped_fraction`` the shares of working-size pixels with luma
    <= 16 and >= 250; ``colourfulness`` the 99th percentile of the chroma, max(R, G, B) -
    min(R, G, B) on 0..255, of the same lit pixels: the colour of the most colourful 1%, which
    a small brown spot on pale skin has although the frame's mean is nearly grey (0 for a
    black-and-white photo, in which the network, trained on colour, misses most malignant
    lesions).
    """

    width: int
    height: int
    sharpness: float
    brightness: float
    dark_fraction: float
    clipped_fraction: float
    colourfulness: float

    @property
    def min_side(self) -> int:
        """The shorter side in pixels of the photo as uploaded."""
        return min(self.width, self.height)

    def as_dict(self) -> dict[str, float]:
        """Plain numbers (for logs, reports and JSON)."""
        return {k: float(v) for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, row: Mapping[str, Any]) -> QualityMeasures:
        """Back from :meth:`as_dict` (extra keys, such as a report row's, are ignored)."""
        return cls(
            width=int(row["width"]),
            height=int(row["height"]),
            **{f.name: float(row[f.name]) for f in fields(cls) if f.name not in SIZE_FIELDS},
        )


@dataclass(frozen=True)
class QualityIssue:
    """One reason a photo is not assessed, in words a lay person can act on."""

    code: str
    message: str
    advice: str


_TEXTS: dict[str, tuple[str, str]] = {
    "too_small": (
        "The photo is too small (too few pixels) to show the details of the spot.",
        "Send the original photo from your camera rather than a thumbnail or a screenshot, "
        "and take it close enough that the spot fills most of the frame.",
    ),
    "too_blurry": (
        "The photo is too blurred to see the edges and patterns of the spot.",
        "Hold the phone steady about 10 cm from the skin, tap the spot on the screen to focus "
        "and wait until it looks sharp before taking the photo.",
    ),
    "too_dark": (
        "The photo is too dark to see the colours of the spot.",
        "Take the photo in good daylight or a well-lit room, without your shadow or the "
        "phone's shadow falling on the spot.",
    ),
    "overexposed": (
        "The photo is too bright or washed out: parts of it are pure white.",
        "Avoid direct sunlight and the flash; use even indirect light, such as near a window.",
    ),
    "no_colour": (
        "The photo is in black and white, so the colours of the spot cannot be judged.",
        "Turn off any black-and-white or mono filter or effect and send the photo in colour, "
        "taken in daylight or a well-lit room.",
    ),
}


def _luma(img: Image.Image) -> np.ndarray:
    """Grey (ITU-R 601 luma) copy at the working size, float64 0..255."""
    grey = img.convert("L") if img.mode != "L" else img
    return np.asarray(grey.resize(WORK_SIZE, Image.Resampling.BILINEAR), dtype=np.float64)


def laplacian_variance(grey: np.ndarray) -> float:
    """Variance of the 4-neighbour Laplacian over the interior of a 2-D array."""
    if grey.shape[0] < 3 or grey.shape[1] < 3:
        return 0.0
    lap = (
        grey[:-2, 1:-1] + grey[2:, 1:-1] + grey[1:-1, :-2] + grey[1:-1, 2:] - 4.0 * grey[1:-1, 1:-1]
    )
    return float(lap.var())


def _lit_mask(grey: np.ndarray) -> np.ndarray:
    """The pixels brighter than the surround, or all of them when too few are."""
    lit = grey > SURROUND_LEVEL
    if np.count_nonzero(lit) < MIN_LIT_FRACTION * grey.size:
        return np.ones_like(lit)
    return lit


def _chroma(img: Image.Image) -> np.ndarray:
    """max(R, G, B) - min(R, G, B) at the working size, uint8 (0 everywhere for a grey mode)."""
    if img.mode in ("1", "L", "I", "I;16", "I;16B", "I;16L", "F", "LA"):
        return np.zeros(WORK_SIZE[::-1], dtype=np.uint8)
    rgb = img if img.mode == "RGB" else img.convert("RGB")
    small = np.asarray(rgb.resize(WORK_SIZE, Image.Resampling.BILINEAR))
    # Channel by channel: a reduction over the last axis of length 3 is 30x slower.
    r, g, b = small[..., 0], small[..., 1], small[..., 2]
    return np.asarray(np.maximum(np.maximum(r, g), b) - np.minimum(np.minimum(r, g), b))


def measure_quality(img: Image.Image) -> QualityMeasures:
    """Measure size, sharpness, brightness, clipping and colourfulness of one photo."""
    width, height = img.size
    if width == 0 or height == 0:
        return QualityMeasures(width, height, 0.0, 0.0, 1.0, 0.0, 0.0)
    grey = _luma(img)
    lit = _lit_mask(grey)
    return QualityMeasures(
        width=int(width),
        height=int(height),
        sharpness=laplacian_variance(grey),
        brightness=float(grey[lit].mean()),
        dark_fraction=float((grey <= DARK_LEVEL).mean()),
        clipped_fraction=float((grey >= CLIP_LEVEL).mean()),
        colourfulness=float(np.percentile(_chroma(img)[lit], COLOUR_PERCENTILE)),
    )


def issues_from_measures(
    measures: QualityMeasures, thresholds: Mapping[str, float]
) -> list[QualityIssue]:
    """The issues ``thresholds`` find in already-taken measures (empty list = usable).

    Sharpness and colour are not judged on a photo that is too dark or overexposed: the
    Laplacian and the chroma of an underexposed or blown-out photo are small whatever its focus
    and colours, and "retake it in better light" is the advice that helps.
    """
    codes: list[str] = []
    if "min_side" in thresholds and measures.min_side < thresholds["min_side"]:
        codes.append("too_small")
    exposure_bad = False
    if "min_brightness" in thresholds and measures.brightness < thresholds["min_brightness"]:
        codes.append("too_dark")
        exposure_bad = True
    too_bright = (
        "max_brightness" in thresholds and measures.brightness > thresholds["max_brightness"]
    )
    clipped = (
        "max_clipped_fraction" in thresholds
        and measures.clipped_fraction > thresholds["max_clipped_fraction"]
    )
    if too_bright or clipped:
        codes.append("overexposed")
        exposure_bad = True
    if (
        not exposure_bad
        and "min_sharpness" in thresholds
        and measures.sharpness < thresholds["min_sharpness"]
    ):
        codes.insert(1 if codes and codes[0] == "too_small" else 0, "too_blurry")
    if (
        not exposure_bad
        and "min_colourfulness" in thresholds
        and measures.colourfulness < thresholds["min_colourfulness"]
    ):
        codes.append("no_colour")
    return [QualityIssue(code, *_TEXTS[code]) for code in codes]


def assess_quality(img: Image.Image, thresholds: Mapping[str, float]) -> list[QualityIssue]:
    """Check one photo against ``thresholds``; empty list = usable.

    Keys are those of ``THRESHOLD_KEYS``; a missing key switches its check off and other keys
    are ignored.
    """
    return issues_from_measures(measure_quality(img), thresholds)
