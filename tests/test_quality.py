"""The photo-quality gate on real lesion photos and degraded copies of them."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image, ImageEnhance, ImageFilter

from model_training.preprocessing import load_image_file
from model_training.quality import (
    ISSUE_CODES,
    THRESHOLD_KEYS,
    assess_quality,
    laplacian_variance,
    measure_quality,
)

REPO = Path(__file__).resolve().parent.parent
IMAGES = Path(__file__).parent / "fixtures" / "images"
LESIONS = sorted(IMAGES.glob("*.jpg"))
PHONE = IMAGES / "pad-ufes-20_nev_PAT_1107_427_352.jpg"
# Of the order `python -m model_training fit-gates` chooses on the real sets (see gates.json).
REASONABLE = {
    "min_side": 96.0,
    "min_sharpness": 2.0,
    "min_brightness": 70.0,
    "max_brightness": 225.0,
    "max_clipped_fraction": 0.1,
    "min_colourfulness": 4.0,
}


def scaled(img: Image.Image, factor: float) -> Image.Image:
    arr = np.asarray(img, dtype=np.float32) * factor
    return Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8))


def codes(img: Image.Image, thresholds: dict[str, float] = REASONABLE) -> list[str]:
    return [issue.code for issue in assess_quality(img, thresholds)]


@pytest.fixture(scope="module")
def phone() -> Image.Image:
    return load_image_file(PHONE)


@pytest.mark.parametrize("path", LESIONS, ids=[p.stem for p in LESIONS])
def test_real_lesion_photos_pass(path: Path) -> None:
    assert codes(load_image_file(path)) == []


@pytest.mark.parametrize(
    "drain",
    [
        lambda img: img.convert("L").convert("RGB"),  # a black-and-white filter, as RGB
        lambda img: img.convert("L"),  # a true grey-mode file
        lambda img: ImageEnhance.Color(img).enhance(0.03),  # all but a trace of colour gone
    ],
    ids=["grey-rgb", "grey-mode", "desaturated"],
)
def test_black_and_white_copy_is_flagged(phone: Image.Image, drain: Any) -> None:
    assert measure_quality(phone).colourfulness > 20
    assert codes(drain(phone)) == ["no_colour"]


@pytest.mark.parametrize("path", LESIONS, ids=[p.stem for p in LESIONS])
def test_muted_colours_are_not_black_and_white(path: Path) -> None:
    """Half the saturation (pale skin, cool light) is still a colour photo."""
    assert codes(ImageEnhance.Color(load_image_file(path)).enhance(0.5)) == []


def test_colour_is_not_judged_in_a_photo_too_dark_to_show_it(phone: Image.Image) -> None:
    assert codes(scaled(phone.convert("L").convert("RGB"), 0.15)) == ["too_dark"]


def test_sharp_image_measures_sharper_than_its_blurred_copy(phone: Image.Image) -> None:
    sharp = measure_quality(phone).sharpness
    blurred = measure_quality(phone.filter(ImageFilter.GaussianBlur(4))).sharpness
    assert sharp > 2 * blurred > 0


def test_sharpness_does_not_depend_on_resolution(phone: Image.Image) -> None:
    big = phone.resize((phone.width * 3, phone.height * 3), Image.Resampling.LANCZOS)
    a, b = measure_quality(phone).sharpness, measure_quality(big).sharpness
    assert abs(a - b) / a < 0.25


def test_blurred_copy_is_flagged(phone: Image.Image) -> None:
    found = codes(phone.filter(ImageFilter.GaussianBlur(0.03 * min(phone.size))))
    assert found == ["too_blurry"]


def test_dark_copy_is_flagged_too_dark(phone: Image.Image) -> None:
    dark = scaled(phone, 0.2)
    m = measure_quality(dark)
    assert m.brightness < measure_quality(phone).brightness * 0.3
    assert m.dark_fraction > measure_quality(phone).dark_fraction
    assert codes(dark) == ["too_dark"]  # blur is not judged in a photo this dark


def test_overexposed_copy_is_flagged(phone: Image.Image) -> None:
    bright = scaled(phone, 2.5)
    assert measure_quality(bright).clipped_fraction > 0.5
    assert codes(bright) == ["overexposed"]


def test_overexposure_by_clipping_alone(phone: Image.Image) -> None:
    only_clip = {"max_clipped_fraction": 0.1}
    assert codes(phone, only_clip) == []
    assert codes(scaled(phone, 2.5), only_clip) == ["overexposed"]


def test_tiny_copy_is_flagged_too_small(phone: Image.Image) -> None:
    tiny = phone.resize((40, 40), Image.Resampling.BILINEAR)
    m = measure_quality(tiny)
    assert (m.width, m.height, m.min_side) == (40, 40, 40)
    assert "too_small" in codes(tiny)
    assert codes(tiny, {"min_side": 32}) == []


def test_issues_explain_themselves(phone: Image.Image) -> None:
    issues = assess_quality(scaled(phone.resize((30, 30)), 0.1), REASONABLE)
    assert [i.code for i in issues] == ["too_small", "too_dark"]
    for issue in issues:
        assert issue.code in ISSUE_CODES
        assert len(issue.message) > 20 and len(issue.advice) > 20


def test_missing_keys_switch_checks_off(phone: Image.Image) -> None:
    awful = scaled(phone.resize((10, 10)), 0.05)
    assert assess_quality(awful, {}) == []
    assert [i.code for i in assess_quality(awful, {"min_side": 64})] == ["too_small"]
    assert set(THRESHOLD_KEYS) == set(REASONABLE)


def test_odd_modes_and_sizes_are_measured() -> None:
    grey = Image.new("L", (300, 200), 128)
    m = measure_quality(grey)
    assert m.sharpness == 0.0 and m.brightness == pytest.approx(128)
    assert measure_quality(Image.new("RGB", (1, 1))).min_side == 1
    white = measure_quality(Image.new("RGB", (64, 64), (255, 255, 255)))
    assert white.clipped_fraction == 1.0 and white.dark_fraction == 0.0


def test_laplacian_of_a_flat_image_is_zero() -> None:
    assert laplacian_variance(np.full((10, 10), 7.0)) == 0.0
    assert laplacian_variance(np.zeros((2, 2))) == 0.0
    checker = np.indices((16, 16)).sum(axis=0) % 2 * 255.0
    assert laplacian_variance(checker) > 1e4


def test_threshold_rule_keeps_real_images_and_rejects_degraded_copies(phone: Image.Image) -> None:
    from model_training.gates.degrade import degrade
    from model_training.gates.quality_fit import choose_quality_threshold

    rng = np.random.default_rng(0)
    real = {"a": rng.uniform(100, 200, 1000), "b": rng.uniform(90, 180, 100)}
    degraded = rng.uniform(10, 60, 500)
    picked = choose_quality_threshold(
        real, degraded, keep=0.99, direction="min", scale="arithmetic"
    )
    t = picked["threshold"]
    assert all(np.mean(v < t) <= 0.01 for v in real.values())
    assert np.mean(degraded < t) == 1.0
    assert picked["edge"] < t < picked["strict"]  # in the gap, not on either side's edge
    high = choose_quality_threshold(
        {k: -v for k, v in real.items()}, -degraded, 0.99, direction="max", scale="arithmetic"
    )
    assert high["threshold"] == pytest.approx(-t)

    # Degraded copies reaching into the real tail (as overexposed copies do for the clipped
    # share): the shipped rule (share 1) hugs the real tail; a share widens the margin toward
    # the copies while still refusing at least that share of them, and keeps every real image.
    real_tail = {"a": np.concatenate([np.zeros(990), rng.uniform(0.0, 0.02, 10)])}
    overlapping = rng.uniform(0.005, 1.0, 1000)
    tight = choose_quality_threshold(real_tail, overlapping, 0.99, "max", "arithmetic")
    wide = choose_quality_threshold(real_tail, overlapping, 0.99, "max", "arithmetic", 0.9)
    assert tight["threshold"] < 0.02 < wide["threshold"]
    assert np.mean(overlapping > wide["threshold"]) >= 0.9 > np.mean(overlapping > 0.2)
    assert np.mean(real_tail["a"] > wide["threshold"]) == 0.0
    # Where the copies leave a gap, a share below 1 only widens it on the copies' side.
    gap = choose_quality_threshold(real, degraded, 0.99, "min", "arithmetic", 0.9)
    assert gap["strict"] == picked["strict"] and gap["edge"] < picked["edge"]
    assert np.mean(degraded < gap["threshold"]) >= 0.9

    # The degradations do what their names say, as the gate measures them.
    base = measure_quality(phone)
    for kind, check in {
        "tiny": lambda m: m.min_side <= 48,
        "blurred": lambda m: m.sharpness < base.sharpness / 2,
        "dark": lambda m: m.brightness < base.brightness * 0.31,
        "overexposed": lambda m: m.clipped_fraction > base.clipped_fraction + 0.2,
        "monochrome": lambda m: m.colourfulness < base.colourfulness * 0.05 + 1.0,  # rounding
    }.items():
        copy, _ = degrade(phone, kind, np.random.default_rng(1))
        assert check(measure_quality(copy)), kind


@pytest.mark.parametrize("kind", ["hair", "ink", "ruler", "vignette", "dermoscope_rim"])
def test_artefacts_are_never_a_quality_problem(kind: str) -> None:
    """Hair, ink, rulers, vignettes and dermatoscope rims get an answer, not "unable to assess".

    The thresholds are the shipped model's; the rim darkens a quarter of the frame, which a
    whole-frame mean brightness would call "too dark" (the brightness is the centre's).
    """
    from model_training.artefacts import with_artefact

    shipped = json.loads((REPO / "models" / "default" / "metadata.json").read_text())["quality"]
    for path in LESIONS:
        photo = load_image_file(path)
        assert codes(photo, shipped) == [], path.name
        for seed in range(4):
            assert codes(with_artefact(photo, kind, seed), shipped) == [], (path.name, seed)


def test_brightness_leaves_out_a_black_surround() -> None:
    """A black surround leaves the brightness of the lit photo unchanged; a dark photo stays
    dark."""
    img = Image.new("RGB", (200, 200), (150, 120, 100))
    rim = img.copy()
    rim.paste((0, 0, 0), (0, 0, 200, 25))
    rim.paste((0, 0, 0), (0, 175, 200, 200))
    assert measure_quality(rim).brightness == pytest.approx(
        measure_quality(img).brightness, abs=1.0
    )
    assert measure_quality(rim).dark_fraction > 0.2
    assert measure_quality(scaled(img, 0.1)).brightness < 15
    # The colourfulness too is the lit photo's: the rim's black is not "no colour".
    assert measure_quality(rim).colourfulness == pytest.approx(50.0, abs=1.0)
    # ... and a small coloured spot on grey-white skin is colour (ISIC_0009936, mean chroma 4).
    spot = Image.new("RGB", (200, 200), (200, 199, 198))
    spot.paste((150, 90, 60), (88, 88, 112, 112))  # 1.4% of the frame
    assert codes(spot, {"min_colourfulness": REASONABLE["min_colourfulness"]}) == []
    assert measure_quality(spot).colourfulness > 50


def test_fit_quality_keeps_the_real_photos_and_refuses_their_degraded_copies() -> None:
    """The whole fitting routine on the fixture photos (real images of all three sets): every
    check gets a threshold, no real photo is refused, and each kind of degraded copy is refused
    for its own reason, black-and-white ones included."""
    import pandas as pd

    from model_training.gates.quality_fit import EXPECTED_CODE, QUALITY_CHECKS, fit_quality

    frame = pd.DataFrame(
        {"path": [str(p) for p in LESIONS], "dataset": [p.name.split("_")[0] for p in LESIONS]}
    )
    thresholds, report = fit_quality(frame, frame, degrade_per_set=10, keep=0.99, seed=3)
    assert set(thresholds) == set(QUALITY_CHECKS) == set(THRESHOLD_KEYS)
    assert report["validation"]["real"]["rejected_pooled"] == 0.0
    for kind, rates in report["validation"]["degraded"].items():
        assert rates["rejected_for_expected_reason"] == 1.0, (kind, EXPECTED_CODE[kind])
    loso = report["leave_one_source_out"]
    assert set(loso) == set(frame["dataset"])
    assert {s: v["n"] for s, v in loso.items()} == frame["dataset"].value_counts().to_dict()


def test_leave_one_source_out_shows_what_a_new_source_would_meet() -> None:
    """A source whose photos are less colourful than the others' is safe when the threshold
    sees it, and partly refused when it is left out of the choice: what LOSO is there to show."""
    import pandas as pd

    from model_training.gates.quality_fit import leave_one_source_out

    rng = np.random.default_rng(0)
    usable = {"width": 800, "height": 600, "min_side": 600, "sharpness": 100.0, "brightness": 128.0}
    usable |= {"dark_fraction": 0.0, "clipped_fraction": 0.0}
    spans = {"a": (50, 100), "b": (50, 100), "muted": (15, 60)}
    real = pd.DataFrame(
        [
            {"dataset": s, **usable, "colourfulness": rng.uniform(*span)}
            for s, span in spans.items()
            for _ in range(300)
        ]
    )
    degraded = pd.DataFrame(
        [
            {"dataset": s, "kind": "monochrome", **usable, "colourfulness": rng.uniform(0, 5)}
            for s in spans
            for _ in range(50)
        ]
    )
    loso = leave_one_source_out(real, degraded, keep_per_check=0.998)
    assert loso["a"]["refused"] == loso["b"]["refused"] == 0.0
    assert loso["muted"]["n"] == 300 and loso["muted"]["refused"] > 0.1
    assert set(loso["muted"]["reasons"]) == {"no_colour"}
    assert loso["muted"]["thresholds"]["min_colourfulness"] > 20
