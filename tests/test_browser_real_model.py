"""The shipped model ``models/default`` behind the real page, in a real headless Chromium.

A real uvicorn (conftest's ``server_factory``) serves the shipped artifact on a loopback port;
Debian's Chromium, driven by Playwright, uploads a real dermoscopy photo, a photo of a cat and
a far too dark copy of the lesion, on a phone viewport with and without JavaScript. Each step
is saved as a screenshot under ``test-artifacts/screenshots/`` (or ``$TEST_ARTIFACTS_DIR``).
"""

from __future__ import annotations

import base64
import io
import json
import re
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from app.texts import DISCLAIMER, HEADLINES, HEATMAP_TEXTS, OOD_MESSAGE, photo_kind

REPO = Path(__file__).resolve().parents[1]
SHIPPED = REPO / "models" / "default"
IMAGES = Path(__file__).parent / "fixtures" / "images"
LESION = IMAGES / "isic2017_nevus_ISIC_0000000.jpg"
MELANOMA = IMAGES / "isic2017_melanoma_ISIC_0000002.jpg"
PHONE_PHOTO = IMAGES / "pad-ufes-20_nev_PAT_1107_427_352.jpg"
PHONE = {"width": 390, "height": 844}
TIMEOUT_MS = 120_000  # the full InceptionV3 plus its heat map on a couple of CPU cores
PERCENT = re.compile(r"(less than 1%|more than 99%|\b\d{1,2}%)")
TOO_DARK = "The photo is too dark to see the colours of the spot."
NO_COLOUR = "The photo is in black and white, so the colours of the spot cannot be judged."

pytestmark = [
    pytest.mark.slow,
    pytest.mark.browser,
    pytest.mark.skipif(
        not (SHIPPED / "metadata.json").is_file(),
        reason=f"no shipped model yet: {SHIPPED / 'metadata.json'} does not exist",
    ),
]

Shot = Callable[[Any, str], Path]


@pytest.fixture(scope="module")
def metadata() -> dict[str, Any]:
    """The shipped model's metadata.json."""
    data: dict[str, Any] = json.loads((SHIPPED / "metadata.json").read_text())
    return data


@pytest.fixture(scope="module")
def shipped(server_factory: Callable[..., AbstractContextManager[Any]]) -> Iterator[Any]:
    """A real uvicorn serving models/default with the default settings (nothing stored)."""
    with server_factory(model_dir=SHIPPED, store_uploads_dir=None) as live:
        yield live


@pytest.fixture(scope="module")
def photos(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The lesion's far too dark copy (pixels x 0.1) and its black-and-white copy, as JPEGs."""
    from PIL import Image

    folder = tmp_path_factory.mktemp("browser-photos")
    pixels = np.asarray(Image.open(LESION).convert("RGB"), dtype=np.float64)
    dark = folder / "dark-mole.jpg"
    Image.fromarray((pixels * 0.1).round().astype(np.uint8)).save(dark, quality=95)
    grey = folder / "black-and-white-mole.jpg"
    Image.open(LESION).convert("L").convert("RGB").save(grey, quality=95)
    return {"dark": dark, "black_and_white": grey}


@pytest.fixture(scope="module")
def cat_photo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """scikit-image's photo of Chelsea the cat, as a JPEG (skipped without scikit-image)."""
    skdata = pytest.importorskip("skimage.data", reason="scikit-image is not installed")
    from PIL import Image

    path = tmp_path_factory.mktemp("browser-cat") / "cat.jpg"
    Image.fromarray(skdata.chelsea()).convert("RGB").save(path, quality=92)
    return path


@pytest.fixture
def phone(browser: Any) -> Iterator[Any]:
    """A page in a phone-sized, touch-enabled context with JavaScript on."""
    context = browser.new_context(viewport=PHONE, is_mobile=True, has_touch=True)
    context.set_default_timeout(TIMEOUT_MS)
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    yield page
    context.close()
    assert errors == [], errors


def _upload(page: Any, base_url: str, photo: Path) -> Any:
    """Open the page, choose the photo, press the button and wait for the result card."""
    page.goto(base_url + "/")
    page.set_input_files("#file-input", str(photo))
    page.click("#submit-button")
    card = page.locator(".result-card")
    card.wait_for()
    return card


def _assert_fits_phone(page: Any) -> None:
    """No sideways scrolling on the phone."""
    assert page.evaluate("document.documentElement.scrollWidth") <= PHONE["width"]


def _assert_assessed(page: Any, metadata: dict[str, Any]) -> None:
    """An assessed result: a probability, the bar, a risk level of this model, the disclaimer."""
    card = page.locator(".result-card")
    assert "status-ok" in (card.get_attribute("class") or "")
    headline = page.locator("#result-headline").inner_text()
    assert headline in (HEADLINES["positive"], HEADLINES["negative"])
    assert PERCENT.search(page.locator(".prob-text").inner_text())
    assert page.locator(".prob-bar").is_visible()
    tier = page.locator(".tier-name strong").inner_text()
    assert tier in {t["name"] for t in metadata["risk_tiers"]}
    assert DISCLAIMER in page.locator(".disclaimer").inner_text()


def _assert_photo_kind(page: Any, metadata: dict[str, Any], domain: str) -> None:
    """The card says which kind of photo the model read it as (the shipped model calibrates
    and thresholds per kind), in the same words with and without JavaScript."""
    assert domain in metadata["domain_calibration"]["domains"]
    line = page.locator(".result-card .photo-kind")
    assert line.get_attribute("data-photo-domain") == domain
    assert line.inner_text() == photo_kind(domain)
    assert line.is_visible()


def _assert_heat_map_toggles(page: Any) -> None:
    """The heat map is hidden, then shown exactly over the photo once the switch is on."""
    heat = page.locator(".photo-stack .heat")
    assert not heat.is_visible()
    page.click(".heat-toggle-label")
    assert heat.is_visible()
    photo_box = page.locator(".photo-stack .photo").bounding_box()
    heat_box = heat.bounding_box()
    assert photo_box and heat_box and photo_box["width"] > 100
    for key in ("x", "y", "width", "height"):
        assert abs(photo_box[key] - heat_box[key]) <= 1.0, (key, photo_box, heat_box)


def _heat_map_opacity(page: Any) -> int:
    """The most opaque pixel of the heat-map overlay (0 = it shows nothing at all)."""
    from PIL import Image

    src = page.locator(".photo-stack .heat").get_attribute("src") or ""
    assert src.startswith("data:image/png;base64,"), src[:40]
    png = Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1])))
    return int(np.asarray(png.convert("RGBA"))[..., 3].max())


def _assert_readable_bar(page: Any, metadata: dict[str, Any]) -> None:
    """One colour per risk tier, and the estimate's marker well clear of the threshold line."""
    fills = page.locator(".result-card .prob-bar .band").evaluate_all(
        "(bands) => bands.map((b) => getComputedStyle(b).fill)"
    )
    assert len(fills) == len(metadata["risk_tiers"]) == len(set(fills)), fills
    needle = page.locator(".result-card .prob-bar .needle").bounding_box()
    threshold = page.locator(".result-card .prob-bar .threshold").bounding_box()
    assert needle and threshold
    gap = abs((needle["x"] + needle["width"] / 2) - (threshold["x"] + threshold["width"] / 2))
    assert gap >= 24, f"the marker is {gap:.0f} px from the threshold line"


def _assert_heat_wording(page: Any) -> None:
    """The switch says what the colours mean: concern for a positive answer, where the model
    looked for a negative one."""
    negative = page.locator("#result-headline").inner_text() == HEADLINES["negative"]
    key = "looked" if negative else "concern"
    assert page.locator(".heat-toggle-label").inner_text() == HEATMAP_TEXTS[key]["toggle"]


def _shown(page: Any) -> str:
    """The result card's headline and, if any, its probability sentence (for messages)."""
    text = page.locator("#result-headline").inner_text()
    if page.locator(".prob-text").count():
        text += " / " + page.locator(".prob-text").inner_text()
    return repr(text)


def _assert_not_assessed(page: Any, headline: str, reason: str) -> None:
    """A refused photo: the given headline and reason, and no probability, bar or heat map."""
    assert page.locator("#result-headline").inner_text() == headline
    assert reason in page.locator(".result-card .reasons").inner_text()
    assert page.locator(".result-card .prob-text, .result-card .prob-bar").count() == 0
    assert "Risk level" not in page.locator(".result-card").inner_text()
    assert page.locator(".result-card .heat").count() == 0
    assert DISCLAIMER in page.locator(".disclaimer").inner_text()


def test_real_lesion_with_javascript(
    phone: Any, shipped: Any, metadata: dict[str, Any], screenshot: Shot
) -> None:
    """A real dermoscopy photo: probability, risk level and a heat map over the photo."""
    _upload(phone, shipped.base_url, LESION)
    assert phone.url == shipped.base_url + "/"
    _assert_assessed(phone, metadata)
    _assert_photo_kind(phone, metadata, "dermoscopy")
    assert phone.evaluate("document.activeElement.id") == "result-headline"
    _assert_fits_phone(phone)
    _assert_readable_bar(phone, metadata)
    screenshot(phone, "real-lesion-result.png")
    _assert_heat_map_toggles(phone)
    _assert_heat_wording(phone)
    # A benign answer shows the evidence against malignant: not a blank overlay.
    assert _heat_map_opacity(phone) > 0, "the heat map is switched on but fully transparent"
    phone.locator(".photo-block").scroll_into_view_if_needed()
    screenshot(phone, "real-lesion-heatmap.png")


def test_real_melanoma_heat_map_is_visible(
    phone: Any, shipped: Any, metadata: dict[str, Any], screenshot: Shot
) -> None:
    """A real melanoma photo: the heat map switched on really colours part of the photo."""
    _upload(phone, shipped.base_url, MELANOMA)
    _assert_assessed(phone, metadata)
    _assert_readable_bar(phone, metadata)
    screenshot(phone, "real-melanoma-result.png")
    _assert_heat_map_toggles(phone)
    _assert_heat_wording(phone)
    assert _heat_map_opacity(phone) > 0, "the heat map is switched on but fully transparent"
    phone.locator(".photo-block").scroll_into_view_if_needed()
    screenshot(phone, "real-melanoma-heatmap.png")


def test_real_phone_photo_is_read_as_one(
    phone: Any, shipped: Any, metadata: dict[str, Any], screenshot: Shot
) -> None:
    """A real PAD-UFES-20 phone photo: assessed, with the phone photos' threshold, and the card
    says it was read as an ordinary photo."""
    _upload(phone, shipped.base_url, PHONE_PHOTO)
    _assert_assessed(phone, metadata)
    _assert_photo_kind(phone, metadata, "phone")
    threshold = metadata["domain_calibration"]["thresholds"]["phone"]
    keys = phone.locator(".prob-keys").inner_text()
    assert f"doctor's check from {round(threshold * 100)}%" in keys
    _assert_fits_phone(phone)
    screenshot(phone, "real-phone-photo-result.png")


def test_real_far_photo_cropped_back_on_the_page(
    phone: Any, shipped: Any, metadata: dict[str, Any], tmp_path: Path, screenshot: Shot
) -> None:
    """The phone photo as if from twice as far (upscaled 4x, its surroundings mirrored out to
    a 12:10 frame): zoomed in 2x on the page, the square centred on the spot, it is answered
    as the close-up is."""
    from PIL import Image

    img = Image.open(PHONE_PHOTO).convert("RGB").resize((1200, 1200), Image.Resampling.BICUBIC)
    far = np.pad(np.asarray(img), ((600, 600), (900, 900), (0, 0)), mode="symmetric")
    path = tmp_path / "far-away.jpg"
    Image.fromarray(far).save(path, quality=92)
    with shipped.client() as c:
        close = c.post("/predict", files={"file": ("p.jpg", PHONE_PHOTO.read_bytes())}).json()
    phone.goto(shipped.base_url + "/")
    phone.set_input_files("#file-input", str(path))
    phone.locator("#crop-controls").wait_for()
    phone.fill("#crop-size", "50")
    screenshot(phone, "real-far-photo-cropped.png")
    with phone.expect_response(lambda r: "/predict" in r.url) as answer:
        phone.click("#submit-button")
    body = answer.value.json()
    assert body["image"]["crop"] == {"left": 900, "top": 600, "width": 1200, "height": 1200}
    assert body["status"] == close["status"] == "ok"
    assert abs(body["probability_malignant"] - close["probability_malignant"]) < 0.02
    phone.locator(".result-card").wait_for()
    _assert_assessed(phone, metadata)
    _assert_photo_kind(phone, metadata, "phone")
    screenshot(phone, "real-far-photo-result.png")


def test_real_non_lesion_photo(
    phone: Any, shipped: Any, metadata: dict[str, Any], cat_photo: Path, screenshot: Shot
) -> None:
    """A photo of a cat is refused as not a skin-spot close-up, with no probability."""
    assert "ood" in metadata, "the shipped model has no out-of-distribution gate"
    card = _upload(phone, shipped.base_url, cat_photo)
    screenshot(phone, "real-non-lesion.png")  # first: what a user sees, whatever the verdict
    assert "status-not_a_lesion" in (card.get_attribute("class") or ""), (
        "a photo of a cat was assessed as a skin spot: " + _shown(phone)
    )
    _assert_not_assessed(phone, HEADLINES["not_a_lesion"], OOD_MESSAGE)
    _assert_fits_phone(phone)


@pytest.mark.parametrize(
    ("photo", "check", "message"),
    [
        # At a tenth of its brightness.
        ("dark", "min_brightness", TOO_DARK),
        # Through a black-and-white filter: the model misses most malignant lesions without
        # their colours (README, "Photo-quality gate").
        ("black_and_white", "min_colourfulness", NO_COLOUR),
    ],
)
def test_real_unusable_photo(
    phone: Any,
    shipped: Any,
    metadata: dict[str, Any],
    photos: dict[str, Path],
    screenshot: Shot,
    photo: str,
    check: str,
    message: str,
) -> None:
    """The lesion photo made unusable: unable to assess, with the reason and its advice."""
    assert check in metadata.get("quality", {}), f"the shipped quality gate has no {check}"
    card = _upload(phone, shipped.base_url, photos[photo])
    screenshot(phone, f"real-{photo.replace('_', '-')}.png")
    assert "status-unable_to_assess" in (card.get_attribute("class") or ""), (
        f"a {photo} photo was assessed: " + _shown(phone)
    )
    _assert_not_assessed(phone, HEADLINES["unable_to_assess"], message)
    _assert_fits_phone(phone)


def test_real_lesion_without_javascript(
    browser: Any, shipped: Any, metadata: dict[str, Any], screenshot: Shot
) -> None:
    """JavaScript off: the form posts to /assess and the server renders the same result."""
    context = browser.new_context(java_script_enabled=False, viewport=PHONE, is_mobile=True)
    context.set_default_timeout(TIMEOUT_MS)
    page = context.new_page()
    page.goto(shipped.base_url + "/")
    page.set_input_files("#file-input", str(LESION))
    with page.expect_navigation() as nav:
        page.click("#submit-button")
    assert nav.value is not None and nav.value.status == 200
    assert page.url == shipped.base_url + "/assess"
    _assert_assessed(page, metadata)
    _assert_photo_kind(page, metadata, "dermoscopy")
    _assert_fits_phone(page)
    _assert_readable_bar(page, metadata)
    screenshot(page, "real-nojs-result.png")
    _assert_heat_map_toggles(page)
    _assert_heat_wording(page)
    assert _heat_map_opacity(page) > 0, "the heat map is switched on but fully transparent"
    page.locator(".photo-block").scroll_into_view_if_needed()
    screenshot(page, "real-nojs-heatmap.png")
    context.close()
