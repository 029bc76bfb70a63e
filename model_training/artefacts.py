"""Everyday artefacts of real lesion photos, drawn onto images, and the ink shortcut check.

Real archives are full of dense hair, surgical-marker ink rings and lines, rulers, dark
vignettes and the black rim of a dermatoscope. The drawing functions here put such artefacts
onto any photo, seeded and in memory: training augments with them (a model must not change
its answer for them), the gates are measured on copies that carry them (they must never
refuse a lesion for them), and the model card reports how much each one moves the estimate.

The ink shortcut check (``ink_shortcut_check``, described in ``INK_CHECK_METHOD``, which the
model card quotes):

    python -m model_training.artefacts --artifact models/default
"""

from __future__ import annotations

import argparse
import json
import math
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from model_training.data import read_datasets

INK_COLOURS = ((88, 60, 150), (40, 60, 150))  # gentian-violet purple, blue marker
HAIR_COLOURS = ((20, 14, 10), (45, 30, 20), (70, 50, 35), (10, 10, 10))


def draw_ink_ring(img: Image.Image, colour: tuple[int, int, int], seed: int) -> Image.Image:
    """A hand-drawn-looking marker ellipse around the centre (where the lesion usually is)."""
    rng = np.random.default_rng(seed)
    out = img.copy()
    w, h = out.size
    draw = ImageDraw.Draw(out)
    rx, ry = w * rng.uniform(0.32, 0.42), h * rng.uniform(0.32, 0.42)
    cx, cy = w / 2 + rng.uniform(-0.04, 0.04) * w, h / 2 + rng.uniform(-0.04, 0.04) * h
    width = max(2, round(min(w, h) * 0.012))
    draw.ellipse((cx - rx, cy - ry, cx + rx, cy + ry), outline=colour, width=width)
    return out


def draw_ink(img: Image.Image, seed: int) -> Image.Image:
    """Marker ink: a ring (two in three) or a few short strokes and dots beside the lesion."""
    rng = np.random.default_rng(seed)
    colour = INK_COLOURS[int(rng.integers(len(INK_COLOURS)))]
    if rng.random() < 2 / 3:
        return draw_ink_ring(img, colour, seed)
    out = img.copy()
    w, h = out.size
    draw = ImageDraw.Draw(out)
    width = max(2, round(min(w, h) * rng.uniform(0.008, 0.02)))
    for _ in range(int(rng.integers(1, 4))):
        angle = rng.uniform(0, 2 * math.pi)
        r0 = rng.uniform(0.3, 0.42) * min(w, h)
        x0, y0 = w / 2 + r0 * math.cos(angle), h / 2 + r0 * math.sin(angle)
        length = rng.uniform(0.05, 0.2) * min(w, h)
        tilt = angle + math.pi / 2 + rng.normal(0, 0.3)
        x1, y1 = x0 + length * math.cos(tilt), y0 + length * math.sin(tilt)
        draw.line((x0, y0, x1, y1), fill=colour, width=width)
        d = width * 1.2
        draw.ellipse((x1 - d, y1 - d, x1 + d, y1 + d), fill=colour)
    return out


def draw_hair(img: Image.Image, seed: int, density: float | None = None) -> Image.Image:
    """Dark, thin, gently curved hairs across the image (dense over the lesion when unlucky)."""
    rng = np.random.default_rng(seed)
    out = img.copy()
    w, h = out.size
    draw = ImageDraw.Draw(out)
    side = min(w, h)
    count = round((density if density is not None else rng.uniform(0.3, 1.0)) * 40)
    for _ in range(max(1, count)):
        colour = HAIR_COLOURS[int(rng.integers(len(HAIR_COLOURS)))]
        width = max(1, round(side * rng.uniform(0.003, 0.009)))
        x, y = rng.uniform(0, w), rng.uniform(0, h)
        heading = rng.uniform(0, 2 * math.pi)
        bend = rng.normal(0, 0.08)
        points = [(x, y)]
        for _ in range(int(rng.integers(6, 14))):
            heading += bend + rng.normal(0, 0.05)
            step = side * rng.uniform(0.03, 0.06)
            x, y = x + step * math.cos(heading), y + step * math.sin(heading)
            points.append((x, y))
        draw.line(points, fill=colour, width=width, joint="curve")
    return out


def draw_ruler(img: Image.Image, seed: int) -> Image.Image:
    """A millimetre ruler along one edge: a pale band with dark ticks and longer tens."""
    rng = np.random.default_rng(seed)
    out = img.copy()
    w, h = out.size
    horizontal = bool(rng.random() < 0.5)
    length, across = (w, h) if horizontal else (h, w)
    band = max(6, round(across * rng.uniform(0.06, 0.12)))
    start = 0 if rng.random() < 0.5 else across - band
    layer = Image.new("RGBA", out.size, (0, 0, 0, 0))
    draw = ImageDraw.Draw(layer)
    shade = int(rng.integers(200, 250))
    tint = (shade, shade, int(shade * rng.uniform(0.85, 1.0)), int(rng.integers(170, 235)))
    box = (0, start, w, start + band) if horizontal else (start, 0, start + band, h)
    draw.rectangle(box, fill=tint)
    pitch = max(3.0, length * rng.uniform(0.012, 0.025))
    tick_w = max(1, round(pitch * 0.15))
    edge = start if start == 0 else start + band
    sign = 1 if start == 0 else -1
    for i in range(int(length / pitch) + 1):
        t = i * pitch
        tick = band * (0.7 if i % 10 == 0 else 0.45 if i % 5 == 0 else 0.3)
        a, b = edge, edge + sign * tick
        line = (t, a, t, b) if horizontal else (a, t, b, t)
        draw.line(line, fill=(30, 30, 30, 255), width=tick_w)
    return Image.alpha_composite(out.convert("RGBA"), layer).convert("RGB")


def _radius_grid(w: int, h: int, cx: float, cy: float) -> np.ndarray:
    """Distance of each pixel from (cx, cy), in units of half the shorter side."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    return np.hypot(xx - cx, yy - cy) / (min(w, h) / 2)


def draw_vignette(img: Image.Image, seed: int) -> Image.Image:
    """Darkened corners, as a lens or uneven lighting leaves them."""
    rng = np.random.default_rng(seed)
    w, h = img.size
    r = _radius_grid(w, h, w / 2 + rng.normal(0, 0.05) * w, h / 2 + rng.normal(0, 0.05) * h)
    start, strength = rng.uniform(0.6, 0.9), rng.uniform(0.5, 0.9)
    fall = np.clip((r - start) / (1.45 - start), 0, 1) ** 1.5
    gain = 1 - strength * fall
    arr = np.asarray(img, dtype=np.float32) * gain[..., None]
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))


def draw_dermoscope_rim(img: Image.Image, seed: int) -> Image.Image:
    """The black surround of a contact dermatoscope: a circle of skin, dark outside it."""
    rng = np.random.default_rng(seed)
    w, h = img.size
    r = _radius_grid(w, h, w / 2 + rng.normal(0, 0.03) * w, h / 2 + rng.normal(0, 0.03) * h)
    radius, soft = rng.uniform(0.85, 1.15), rng.uniform(0.02, 0.08)
    inside = np.clip((radius - r) / soft, 0, 1)
    level = rng.uniform(0, 25)
    arr = np.asarray(img, dtype=np.float32)
    arr = (arr * inside[..., None] + level * (1 - inside[..., None])).astype(np.float32)
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))


# name -> drawing function(img, seed): the artefacts every gate and model must live with.
ARTEFACTS: dict[str, Callable[[Image.Image, int], Image.Image]] = {
    "hair": draw_hair,
    "ink": draw_ink,
    "ruler": draw_ruler,
    "vignette": draw_vignette,
    "dermoscope_rim": draw_dermoscope_rim,
}


def with_artefact(img: Image.Image, name: str, seed: int) -> Image.Image:
    """``img`` with the named artefact drawn on it (see ``ARTEFACTS``)."""
    return ARTEFACTS[name](img, seed)


def answer_changes(
    p0: np.ndarray,
    p1: np.ndarray,
    threshold: float | np.ndarray,
    threshold1: float | np.ndarray | None = None,
) -> dict[str, Any]:
    """How answers move from ``p0`` (without the artefact) to ``p1`` (with it).

    Mean and mean absolute change of the calibrated probability, and the share of benign
    answers turned malignant and of malignant answers turned benign. Each answer is read at
    its own threshold: ``threshold`` for ``p0`` and ``threshold1`` (default the same) for
    ``p1``, a number or one per image (per-domain thresholds follow the inferred domain,
    which an artefact can change).
    """
    p0, p1 = np.asarray(p0, dtype=np.float64), np.asarray(p1, dtype=np.float64)
    t0 = np.broadcast_to(np.asarray(threshold, dtype=np.float64), p0.shape)
    t1 = t0 if threshold1 is None else np.broadcast_to(np.asarray(threshold1, np.float64), p1.shape)
    benign0, benign1 = p0 < t0, p1 < t1
    return {
        "n": len(p0),
        "mean_probability_change": float(np.mean(p1 - p0)) if len(p0) else None,
        "mean_abs_probability_change": float(np.mean(np.abs(p1 - p0))) if len(p0) else None,
        "benign_to_malignant": float(np.mean(~benign1[benign0])) if benign0.any() else None,
        "malignant_to_benign": float(np.mean(benign1[~benign0])) if (~benign0).any() else None,
        "answers_flipped": float(np.mean(benign0 != benign1)) if len(p0) else None,
    }


INK_CHECK_METHOD = (
    "PAD-UFES-20 photos sometimes carry surgical-marker ink circles drawn around lesions a "
    'doctor found suspicious: a shortcut a model can learn ("ink means malignant"). Counting '
    "marked images is unreliable (thin dark lines, dark lesions of the same hue), so this "
    "measures the effect directly: draw a marker-like ellipse around the centre of each "
    "validation photo and compare the model's answers with and without it, read as the server "
    "gives them (calibration and threshold of each photo's inferred domain). A model that "
    "learned the shortcut raises its probabilities and flips benign answers to malignant."
)


def ink_shortcut_check(
    artifact: Path, data_dir: Path, sets: Sequence[str] = ("pad-ufes-20", "isic2017")
) -> dict[str, Any]:
    """Answers with vs. without a drawn marker ring, per validation set, read as the server
    gives them (``ServedAnswer``: per-domain calibration and thresholds when the artifact has
    them, each photo at its own inferred domain's threshold)."""
    from model_training.export import read_metadata
    from model_training.preprocessing import load_image_file
    from model_training.runner import Embedder
    from model_training.served import ServedAnswer

    meta = read_metadata(artifact)
    served = ServedAnswer.of(artifact, meta)
    df = read_datasets(data_dir, sets)
    df = df[df["split"] == "valid"].reset_index(drop=True)
    originals = [load_image_file(p) for p in df["path"]]
    # The SavedModel is loaded once for every pass below; it returns the output the
    # calibration reads the domain from (the embedding when there is none).
    embed = Embedder(artifact, output=served.output or "embedding")

    def answer(images: list[Image.Image], desc: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        logits, features = embed(images, len(images), desc)
        p, thresholds = served.answer(logits, {embed.output: features})
        return logits, p, thresholds

    base, p0, t0 = answer(originals, "without ink")
    result: dict[str, Any] = {"method": INK_CHECK_METHOD}
    for colour in INK_COLOURS:
        marked = [draw_ink_ring(im, colour, i) for i, im in enumerate(originals)]
        inked, p1, t1 = answer(marked, f"ink rgb{colour}")
        per_set = {}
        for name in sorted(df["dataset"].unique()):
            m = (df["dataset"] == name).to_numpy()
            per_set[str(name)] = {
                "mean_logit_change": float(np.mean(inked[m] - base[m])),
                **answer_changes(p0[m], p1[m], t0[m], t1[m]),
            }
        result[f"ink_rgb_{'_'.join(map(str, colour))}"] = per_set
    return result


def main(argv: Sequence[str] | None = None) -> int:
    """Run the check, store it in the artifact's metrics.json (key ``shortcut_checks``) and
    re-render the model card, whose shortcut section reads it."""
    parser = argparse.ArgumentParser(prog="python -m model_training.artefacts")
    parser.add_argument("--artifact", type=Path, required=True)
    parser.add_argument(
        "--data-dir", type=Path, default=Path(os.environ.get("SHARED_DATA_DIR", "../shared/data"))
    )
    args = parser.parse_args(argv)
    result = ink_shortcut_check(args.artifact, args.data_dir)
    print(json.dumps(result, indent=2))
    metrics_path = args.artifact / "metrics.json"
    if metrics_path.exists():
        metrics = json.loads(metrics_path.read_text())
        metrics["shortcut_checks"] = {"ink_marker_ring": result}
        metrics_path.write_text(json.dumps(metrics, indent=2) + "\n")
        from model_training.export import read_metadata
        from model_training.report import write_model_card

        write_model_card(read_metadata(args.artifact), metrics, args.artifact / "MODEL_CARD.md")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
