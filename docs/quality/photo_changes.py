"""How the shipped model answers changed copies of the validation photos.

Each validation image, as it is and changed the way a phone, its settings or the light
change a photo (a black-and-white or sepia filter, muted or vivid colour, warm or cool light, harsh
JPEG, a low-resolution camera, brighter or darker mid-tones, taken from further away, cropped by
the user), run through the server's fast runtime (OpenVINO) and answered as the server answers
(per-domain calibration and thresholds), with the shares the artifact's quality gate and skin
gate refuse. The evidence for the quality gate's colour check (README, "Photo-quality
gate"; ``black_and_white.txt``):

    .venv/bin/python docs/quality/photo_changes.py --artifact models/default \
        --data-dir ../shared/data --variants "as taken,black and white,30% saturation"

and the wider survey in ``photo_changes.txt`` (every phone photo, 400 dermoscopy ones):

    .venv/bin/python docs/quality/photo_changes.py --dermoscopy-sample 400
"""

from __future__ import annotations

import argparse
import io
import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image, ImageEnhance, ImageFilter

from model_training import fastmodel
from model_training.data import read_datasets
from model_training.export_fast import ood_detector
from model_training.metrics import roc_auc
from model_training.preprocessing import crop_box, load_image_file, resize_to_input
from model_training.quality import assess_quality
from model_training.served import ServedAnswer


def _gains(r: float, g: float, b: float) -> Callable[[Image.Image], Image.Image]:
    """Per-channel gains: a light or a white balance of another colour."""

    def change(im: Image.Image) -> Image.Image:
        arr = np.asarray(im, dtype=np.float32) * np.asarray([r, g, b], dtype=np.float32)
        return Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8))

    return change


def _gamma(gamma: float) -> Callable[[Image.Image], Image.Image]:
    table = [round(255 * (v / 255) ** gamma) for v in range(256)] * 3
    return lambda im: im.point(table)


def _jpeg(quality: int) -> Callable[[Image.Image], Image.Image]:
    def change(im: Image.Image) -> Image.Image:
        buf = io.BytesIO()
        im.save(buf, "JPEG", quality=quality)
        return Image.open(io.BytesIO(buf.getvalue())).convert("RGB")

    return change


def _low_resolution(side: int) -> Callable[[Image.Image], Image.Image]:
    def change(im: Image.Image) -> Image.Image:
        k = side / min(im.size)
        return im.resize((round(im.width * k), round(im.height * k)), Image.Resampling.BILINEAR)

    return change


def _sent_on(side: int, quality: int, median: int = 0) -> Callable[[Image.Image], Image.Image]:
    """A photo passed on: smoothed by a phone's noise reduction (a median filter of that
    size, 0 for none), its longer side cut to ``side`` and saved as JPEG at ``quality``."""
    jpeg = _jpeg(quality)

    def change(im: Image.Image) -> Image.Image:
        if median:
            im = im.filter(ImageFilter.MedianFilter(median))
        k = min(1.0, side / max(im.size))
        im = im.resize((round(im.width * k), round(im.height * k)), Image.Resampling.BICUBIC)
        return jpeg(im)

    return change


def _zoomed_out(factor: int) -> Callable[[Image.Image], Image.Image]:
    """The photo as from ``factor`` times the distance: shrunk by that factor, the frame
    filled with the photo's own surroundings mirrored outwards (skin, mostly; a lesion that
    touches the border is mirrored too). The spot then covers 1/factor of each side."""

    def change(im: Image.Image) -> Image.Image:
        small = im.resize((im.width // factor, im.height // factor), Image.Resampling.BOX)
        arr = np.asarray(small)
        pad_y, pad_x = (im.height - small.height) // 2, (im.width - small.width) // 2
        widths = (
            (pad_y, im.height - small.height - pad_y),
            (pad_x, im.width - small.width - pad_x),
        )
        return Image.fromarray(np.pad(arr, (*widths, (0, 0)), mode="symmetric"))

    return change


def _zoomed_out_flat(factor: int) -> Callable[[Image.Image], Image.Image]:
    """As ``_zoomed_out``, but the frame around the shrunk photo is one flat colour (the
    median of the photo's outer 5%): no mirrored lesion, so what the two share is the spot's
    size (the skin gate refuses many of these, as a flat frame is no photo)."""

    def change(im: Image.Image) -> Image.Image:
        arr = np.asarray(im)
        k = max(1, min(im.size) // 20)
        ring = np.concatenate(
            [arr[:k], arr[-k:], arr[:, :k].swapaxes(0, 1), arr[:, -k:].swapaxes(0, 1)], axis=1
        ).reshape(-1, 3)
        colour = tuple(int(v) for v in np.median(ring, axis=0))
        small = im.resize((im.width // factor, im.height // factor), Image.Resampling.BOX)
        canvas = Image.new("RGB", im.size, colour)
        canvas.paste(small, ((im.width - small.width) // 2, (im.height - small.height) // 2))
        return canvas

    return change


def _middle(fraction: float) -> Callable[[Image.Image], Image.Image]:
    """A user's crop: the middle ``fraction`` of each side (the server's crop path)."""
    crop = ((1 - fraction) / 2, (1 - fraction) / 2, fraction, fraction)

    def change(im: Image.Image) -> Image.Image:
        left, top, w, h = crop_box(im.size, crop)
        return im.crop((left, top, left + w, top + h))

    return change


SEPIA = (0.393, 0.769, 0.189, 0.0, 0.349, 0.686, 0.168, 0.0, 0.272, 0.534, 0.131, 0.0)
VARIANTS: dict[str, Callable[[Image.Image], Image.Image]] = {
    "as taken": lambda im: im,
    "black and white": lambda im: im.convert("L").convert("RGB"),
    # The classic sepia matrix of photo apps: one brown hue, chroma rising with brightness.
    "sepia": lambda im: im.convert("RGB", SEPIA),
    "30% saturation": lambda im: ImageEnhance.Color(im).enhance(0.3),
    "60% saturation": lambda im: ImageEnhance.Color(im).enhance(0.6),
    "150% saturation": lambda im: ImageEnhance.Color(im).enhance(1.5),
    "warm light": _gains(1.1, 1.0, 0.8),
    "cool light": _gains(0.85, 1.0, 1.15),
    "JPEG quality 15": _jpeg(15),
    "JPEG quality 30": _jpeg(30),
    "JPEG quality 50": _jpeg(50),
    "JPEG quality 75": _jpeg(75),
    "sent by a messenger (1600 px JPEG 60)": _sent_on(1600, 60),
    "noise reduction (median 5) then 1600 px JPEG 50": _sent_on(1600, 50, median=5),
    "thumbnail (640 px JPEG 40)": _sent_on(640, 40),
    "150 px camera": _low_resolution(150),
    "brighter mid-tones (gamma 0.7)": _gamma(0.7),
    "darker mid-tones (gamma 1.4)": _gamma(1.4),
    "taken from twice as far (spot 1/2 as wide)": _zoomed_out(2),
    "taken from three times as far (spot 1/3 as wide)": _zoomed_out(3),
    "twice as far in a flat frame (no mirrored surroundings)": _zoomed_out_flat(2),
    "cropped to the middle 70%": _middle(0.7),
    "cropped to the middle 50%": _middle(0.5),
    # What the page's crop tool is for: the far photo cropped back to the spot's framing (at
    # half the pixels, as a real photo from twice as far has).
    "taken from twice as far and cropped back (middle 50%)": lambda im: _middle(0.5)(
        _zoomed_out(2)(im)
    ),
}


def own_domain_answer(
    served: ServedAnswer, outputs: dict[str, np.ndarray], domain: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """(whether each photo's domain is read right, whether it is called malignant when
    answered with its true domain's scaling and threshold)."""
    dc, thresholds = served.domain, served.domain_thresholds
    assert dc is not None and thresholds is not None, "needs per-domain calibration"
    second = domain == dc.domains[1]
    read_right = dc.is_second_domain(outputs[dc.embedding_output]) == second
    both = dc.per_domain(outputs["logit"].reshape(-1))
    prob = np.where(second, both[:, 1], both[:, 0])
    return read_right, prob >= np.where(second, thresholds[1], thresholds[0])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--artifact", type=Path, default=Path("models/default"))
    p.add_argument("--data-dir", type=Path, default=Path("../shared/data"))
    p.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated names")
    p.add_argument(
        "--dermoscopy-sample", type=int, default=0, help=">0: that many dermoscopy photos, seeded"
    )
    args = p.parse_args()
    assert not any("," in name for name in VARIANTS), "--variants splits names on commas"
    variants = [v for v in args.variants.split(",") if v]
    if variants[0] != "as taken" or not set(variants) <= set(VARIANTS):
        raise SystemExit(f"variants: 'as taken' first, then any of {list(VARIANTS)}")
    meta = json.loads((args.artifact / "metadata.json").read_text())
    served = ServedAnswer.of(args.artifact, meta)
    model, _ = fastmodel.derive_openvino(args.artifact)
    compiled = fastmodel.compile_openvino(model, "bf16")
    request = compiled.create_infer_request()
    names = [o.get_any_name() for o in compiled.outputs]
    size = (int(meta["input"]["height"]), int(meta["input"]["width"]))
    df = read_datasets(args.data_dir)
    val = df[df["split"] == "valid"].reset_index(drop=True)
    if args.dermoscopy_sample:
        derm = np.flatnonzero((val["domain"] == "dermoscopy").to_numpy())
        drop = np.random.default_rng(0).permutation(derm)[args.dermoscopy_sample :]
        val = val.drop(index=drop).reset_index(drop=True)
    y, domain = val["label"].to_numpy(), val["domain"].astype(str).to_numpy()
    counts = val["domain"].value_counts().to_dict()
    print(f"validation images {counts}; thresholds as served; quality gate of the artifact")
    skin = ood_detector(args.artifact, meta)
    columns = (
        "ROC-AUC | sensitivity | specificity | answer changed | gate refuses | read as its domain"
        " | sensitivity, its domain's scaling and threshold | skin gate refuses"
    )
    print(f"| photos | domain | {columns} |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    base: np.ndarray | None = None
    for variant in variants:
        change = VARIANTS[variant]
        outputs: dict[str, list[np.ndarray]] = {n: [] for n in names}
        refused = []
        for start in range(0, len(val), 8):
            imgs = [change(load_image_file(path)) for path in val["path"][start : start + 8]]
            refused += [bool(assess_quality(im, meta.get("quality") or {})) for im in imgs]
            x = np.stack([resize_to_input(im, size) for im in imgs])
            result = request.infer({0: x})
            for out, name in zip(compiled.outputs, names, strict=True):
                outputs[name].append(np.asarray(result[out]))
        joined = {n: np.concatenate(v) for n, v in outputs.items()}
        prob, threshold = served.answer(joined["logit"].reshape(-1), joined)
        malignant = prob >= threshold
        # How much of a change's cost is the domain misread: the photo answered as the server
        # would had it read the domain right.
        own = own_domain_answer(served, joined, domain)
        base = malignant if base is None else base
        gate = np.asarray(refused)
        # "Not a lesion" (the server's skin gate), apart from the quality gate's refusals.
        not_skin = (
            np.zeros(len(val), dtype=bool)
            if skin is None
            else skin.not_skin(joined[meta["ood"]["embedding_output"]])
        )
        for name in ("dermoscopy", "phone"):
            m = domain == name
            sens, spec = malignant[m & (y == 1)].mean(), 1 - malignant[m & (y == 0)].mean()
            changed, refuses = np.mean(malignant[m] != base[m]), gate[m].mean()
            read, own_sens = own[0][m].mean(), own[1][m & (y == 1)].mean()
            print(
                f"| {variant} | {name} | {roc_auc(y[m], prob[m]):.3f} | {sens:.3f} | {spec:.3f} "
                f"| {changed:.1%} | {refuses:.1%} | {read:.1%} | {own_sens:.3f} "
                f"| {not_skin[m].mean():.1%} |"
            )


if __name__ == "__main__":
    main()
