"""The upload page in a real headless Chromium, with and without JavaScript.

Uses Debian's Chromium (CHROMIUM_PATH, or `chromium` on PATH; the session-wide ``browser``
fixture in conftest.py); skipped where there is none. Every meaningful step is saved as a
full-page screenshot under ``test-artifacts/screenshots/`` (or ``$TEST_ARTIFACTS_DIR``), to be
looked at, not just asserted on.
"""

from __future__ import annotations

import base64
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.browser

IMAGE = Path(__file__).parent / "fixtures" / "images" / "pad-ufes-20_nev_PAT_1107_427_352.jpg"
OTHER_IMAGE = IMAGE.with_name("ham10000_nv_ISIC_0024306.jpg")
PHONE = {"width": 390, "height": 844}
DESKTOP = {"width": 1280, "height": 900}
NOT_AN_IMAGE = "could not be read as a photo"

Shot = Callable[[Any, str], Path]

DROP_FILE_JS = """([b64, name, type]) => {
    const bytes = Uint8Array.from(atob(b64), c => c.charCodeAt(0));
    const dt = new DataTransfer();
    dt.items.add(new File([bytes], name, {type}));
    document.getElementById("dropzone").dispatchEvent(
        new DragEvent("drop", {dataTransfer: dt, bubbles: true, cancelable: true}));
}"""

# How the focused element is named in the keyboard test: its id, else its tag and text.
FOCUSED_JS = """() => {
    const el = document.activeElement;
    return el.id || (el.tagName.toLowerCase() + ":" + el.textContent.trim());
}"""


# The probability bar as drawn: each band's fill, each legend entry's height, the card's
# border colour and the legend's line height.
BAR_JS = """() => {
    const card = document.querySelector(".result-card");
    const q = (sel) => [...card.querySelectorAll(sel)];
    return {
        fills: q(".prob-bar .band").map(b => getComputedStyle(b).fill),
        entries: q(".prob-keys li, .tier-legend li").map(li => li.getBoundingClientRect().height),
        border: getComputedStyle(card).borderLeftColor,
        lineHeight: parseFloat(getComputedStyle(card.querySelector(".prob figcaption")).lineHeight),
        levels: JSON.parse(document.getElementById("model-meta").textContent).tiers.length,
    };
}"""


def _assert_bar_by_tier(page: Any) -> None:
    """One distinct colour per risk tier; no legend entry wraps inside; a tier-coloured card."""
    bar = page.evaluate(BAR_JS)
    assert len(bar["fills"]) == bar["levels"] == len(set(bar["fills"])), bar
    assert max(bar["entries"]) < 1.5 * bar["lineHeight"], bar  # each entry on one line
    assert bar["border"] != "rgb(138, 138, 150)", bar  # not the neutral border


def _watch_requests(page: Any, base_url: str) -> list[str]:
    """Collect every request the page makes to anywhere but the service itself."""
    foreign: list[str] = []

    def check(request: Any) -> None:
        if not request.url.startswith((base_url, "data:", "blob:")):
            foreign.append(request.url)

    page.on("request", check)
    return foreign


def _drop_file(page: Any, data: bytes, name: str, mime: str) -> None:
    """Drop a file on the drop zone, as a user dragging it from the desktop would."""
    page.evaluate(DROP_FILE_JS, [base64.b64encode(data).decode(), name, mime])


def _no_sideways_scroll(page: Any, width: int) -> bool:
    """True when the page fits the viewport's width (no horizontal scrolling)."""
    return bool(page.evaluate("document.documentElement.scrollWidth") <= width)


def _assert_heat_over_photo(page: Any) -> None:
    """The heat map is shown exactly on top of the photo (same box), not beside it."""
    photo = page.locator(".photo-stack .photo").bounding_box()
    heat = page.locator(".photo-stack .heat").bounding_box()
    assert photo and heat and photo["width"] > 100
    for key in ("x", "y", "width", "height"):
        assert abs(photo[key] - heat[key]) <= 1.0, (key, photo, heat)


def _wait_for_preview(page: Any, timeout_s: float = 15.0) -> None:
    """Until the preview image has decoded. Polled from here: ``wait_for_function`` evaluates
    its predicate string with ``eval`` in the page, which the page's CSP (no 'unsafe-eval')
    refuses whenever the first check comes too early."""
    deadline = time.monotonic() + timeout_s
    while not page.evaluate("document.getElementById('preview-img').naturalWidth > 0"):
        assert time.monotonic() < deadline, "the preview image never loaded"
        page.wait_for_timeout(50)


def test_js_upload_renders_the_result_in_place(browser: Any, server: Any, screenshot: Shot) -> None:
    """Phone, JavaScript on: preview, in-place result, focus on the headline, heat toggle."""
    page = browser.new_page(viewport=PHONE)
    foreign = _watch_requests(page, server.base_url)
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.goto(server.base_url + "/")
    assert _no_sideways_scroll(page, PHONE["width"])

    page.set_input_files("#file-input", str(IMAGE))
    # The preview appears once the browser has decoded the chosen file: wait for it (a
    # snapshot right after set_input_files raced it and failed once in CI).
    page.wait_for_selector("#preview-img", state="visible", timeout=10_000)
    _wait_for_preview(page)
    screenshot(page, "phone-js-upload.png")
    with page.expect_response(lambda r: "/predict?explain=true" in r.url) as answer:
        page.click("#submit-button")
    assert answer.value.status == 200
    page.wait_for_selector(".result-card")
    assert page.url == server.base_url + "/"  # no navigation: rendered in place
    card = page.locator(".result-card")
    assert "Risk level" in card.inner_text()
    assert "Asymmetry" in card.inner_text()
    assert page.evaluate("document.activeElement.id") == "result-headline"
    assert page.locator("#result[aria-live=polite] .result-card").count() == 1
    _assert_bar_by_tier(page)
    screenshot(page, "phone-js-result.png")

    heat = page.locator(".photo-stack .heat")
    assert not heat.is_visible()
    page.click(".heat-toggle-label")
    assert heat.is_visible()
    _assert_heat_over_photo(page)
    page.locator(".photo-block").scroll_into_view_if_needed()
    screenshot(page, "phone-js-heatmap.png")
    page.click(".heat-toggle-label")
    assert not heat.is_visible()
    assert _no_sideways_scroll(page, PHONE["width"])
    assert foreign == [] and errors == []
    page.close()


def test_js_drag_and_drop_and_errors(browser: Any, server: Any, screenshot: Shot) -> None:
    """Phone, JavaScript on: no photo chosen, a dropped text file, then a dropped photo."""
    page = browser.new_page(viewport=PHONE)
    page.goto(server.base_url + "/")
    page.click("#submit-button")  # nothing chosen yet
    assert "choose or take a photo" in page.locator("#result .error-box").inner_text()
    screenshot(page, "error-no-photo.png")

    # Drop a text file: no broken-image preview, a plain note, then the server refuses it.
    _drop_file(page, b"not a photo", "notes.txt", "text/plain")
    page.wait_for_selector("#preview-img", state="hidden")
    caption = page.locator("#preview-caption").inner_text()
    assert "notes.txt" in caption and "it may not be a photo" in caption, caption
    assert "browser" not in caption  # the browser is not to blame
    style = "getComputedStyle(document.getElementById('preview-caption')).wordBreak"
    assert page.evaluate(style) != "break-all"  # words are not split mid-word
    screenshot(page, "phone-js-preview-not-an-image.png")
    page.click("#submit-button")
    page.wait_for_selector("#result .error-box")
    assert NOT_AN_IMAGE in page.locator("#result .error-box").inner_text()
    assert page.locator(".result-card").count() == 0
    screenshot(page, "error-not-an-image.png")

    # Drop the real photo: previewed again, then assessed.
    _drop_file(page, IMAGE.read_bytes(), "mole.jpg", "image/jpeg")
    _wait_for_preview(page)
    assert page.is_visible("#preview-img")
    assert page.locator("#preview-note").inner_text() == ""
    page.click("#submit-button")
    page.wait_for_selector(".result-card")
    assert page.locator("#result .error-box").count() == 0
    page.close()


def test_without_javascript_the_form_posts_and_renders_server_side(
    browser: Any, server: Any, screenshot: Shot
) -> None:
    """Phone, JavaScript off: the plain form posts to /assess; the heat toggle is CSS only."""
    context = browser.new_context(java_script_enabled=False, viewport=PHONE)
    page = context.new_page()
    foreign = _watch_requests(page, server.base_url)
    page.goto(server.base_url + "/")
    page.set_input_files("#file-input", str(IMAGE))
    chosen = page.locator("#file-input").bounding_box()
    assert chosen and chosen["width"] > 100  # without JS the input shows the chosen file
    screenshot(page, "phone-nojs-upload.png")
    page.click("#submit-button")
    page.wait_for_load_state()
    assert page.url == server.base_url + "/assess"
    assert page.locator(".result-card").count() == 1
    assert "What to do next" in page.locator(".result-card").inner_text()
    assert page.locator(".disclaimer").is_visible()
    assert _no_sideways_scroll(page, PHONE["width"])
    screenshot(page, "phone-nojs-result.png")
    heat = page.locator(".photo-stack .heat")
    assert not heat.is_visible()
    page.click(".heat-toggle-label")  # CSS-only toggle
    assert heat.is_visible()
    _assert_heat_over_photo(page)
    screenshot(page, "phone-nojs-heatmap.png")

    # A file that is not a photo: the server-rendered page explains, with no result card.
    page.goto(server.base_url + "/")
    page.set_input_files(
        "#file-input", files=[{"name": "notes.txt", "mimeType": "text/plain", "buffer": b"hi"}]
    )
    with page.expect_navigation() as nav:
        page.click("#submit-button")
    assert nav.value is not None and nav.value.status == 415
    assert NOT_AN_IMAGE in page.locator(".error-box").inner_text()
    assert page.locator(".result-card").count() == 0
    screenshot(page, "error-not-an-image-nojs.png")
    assert foreign == []
    context.close()


def test_desktop_upload_and_result(browser: Any, server: Any, screenshot: Shot) -> None:
    """Desktop (1280x900): the page stays a readable column; result and heat map in place."""
    page = browser.new_page(viewport=DESKTOP)
    page.goto(server.base_url + "/")
    assert _no_sideways_scroll(page, DESKTOP["width"])
    main = page.locator("main").bounding_box()
    assert main and main["width"] <= 800  # a readable column, centred, not full width
    assert abs((main["x"] + main["width"] / 2) - DESKTOP["width"] / 2) <= 2
    button = page.locator("#submit-button").bounding_box()
    assert button and button["width"] < main["width"] / 2  # not a full-width phone button
    # Two distinct, labelled buttons, not two identical native "Choose File" buttons.
    labels = page.locator(".picker label")
    assert labels.all_inner_texts() == [
        "Take a photo with your camera",
        "Choose a photo from your device",
    ]
    for i in range(2):
        box = labels.nth(i).bounding_box()
        assert box and box["height"] >= 44 and box["width"] > 150
    looks = "(l) => getComputedStyle(l).backgroundColor + getComputedStyle(l).borderStyle"
    assert labels.nth(0).evaluate(looks) != labels.nth(1).evaluate(looks)
    for native in ("#camera-input", "#file-input"):
        box = page.locator(native).bounding_box()
        assert box is None or box["width"] <= 1, native  # visually hidden, still focusable
    screenshot(page, "desktop-upload.png")

    page.set_input_files("#file-input", str(IMAGE))
    page.click("#submit-button")
    page.wait_for_selector(".result-card")
    assert "Risk level" in page.locator(".result-card").inner_text()
    assert page.evaluate("document.activeElement.id") == "result-headline"
    _assert_bar_by_tier(page)
    screenshot(page, "desktop-result.png")
    page.click(".heat-toggle-label")
    assert page.locator(".photo-stack .heat").is_visible()
    _assert_heat_over_photo(page)
    screenshot(page, "desktop-heatmap.png")
    assert _no_sideways_scroll(page, DESKTOP["width"])
    page.close()


def test_keyboard_only(browser: Any, server: Any, screenshot: Shot) -> None:
    """Tab reaches the pickers, then the button; the result headline then takes focus."""
    page = browser.new_page(viewport=PHONE)
    # Listen for the chooser from the start: Playwright turns interception on asynchronously
    # when the first listener is added, and a key pressed before that lands opens an
    # unintercepted chooser (a CI run raced so). Nothing below waits on this set-up.
    choosers: list[Any] = []
    page.on("filechooser", lambda chooser: choosers.append(chooser))
    page.goto(server.base_url + "/")
    order: list[str] = []
    label_rings: list[float] = []
    for _ in range(12):
        page.keyboard.press("Tab")
        order.append(page.evaluate(FOCUSED_JS))
        if order[-1] in ("camera-input", "file-input"):
            # The input is visually hidden: its button-like label shows the focus ring.
            label = page.locator(f"label[for={order[-1]}]")
            ring = label.evaluate("(l) => getComputedStyle(l).outlineWidth")
            label_rings.append(float(ring.removesuffix("px")))
        if order[-1] == "submit-button":
            break
    assert order[0] == "a:Skip to main content", order
    wanted = ["camera-input", "file-input", "submit-button"]
    assert [name for name in order if name in wanted] == wanted, order
    assert order.index("submit-button") == order.index("file-input") + 1, order  # nothing between
    assert label_rings and min(label_rings) >= 2, f"no focus ring on a picker: {label_rings}"
    outline = page.evaluate("getComputedStyle(document.activeElement).outlineWidth")
    assert float(outline.removesuffix("px")) >= 2, f"no visible focus ring: {outline}"

    # Back to the file picker; Space opens the chooser, as it would for a keyboard user.
    page.keyboard.press("Shift+Tab")
    assert page.evaluate(FOCUSED_JS) == "file-input"
    # Keyboard activation reaches the input as a trusted click (what opens the chooser).
    page.evaluate(
        """() => document.getElementById("file-input").addEventListener(
            "click", (e) => { window.pickerActivated = e.isTrusted; })"""
    )
    page.keyboard.press("Space")
    page.wait_for_function("window.pickerActivated === true", timeout=10_000)
    for _ in range(50):
        if choosers:
            break
        page.wait_for_timeout(100)
    if choosers:
        assert len(choosers) == 1
        choosers[0].set_files(str(IMAGE))
    else:
        # The page did its part (the picker was activated); the browser build did not report
        # a chooser to Playwright. Choose the file the way Playwright does without one.
        page.set_input_files("#file-input", str(IMAGE))
    # The change event (and so the preview) may come a moment after the chooser closes.
    page.wait_for_selector("#preview-img", state="visible", timeout=10_000)
    _wait_for_preview(page)
    # The zoom slider (arrow keys), then the crop square (arrow keys move it), then the button.
    page.keyboard.press("Tab")
    assert page.evaluate(FOCUSED_JS) == "crop-size"
    assert page.locator("#crop-frame").is_hidden()  # the whole photo until zoomed in
    for _ in range(50):
        page.keyboard.press("ArrowLeft")
    assert page.locator("#crop-zoom").inner_text() == "2.0x"
    # The square is drawn over the photo, above the slider, and comes before it in the order.
    page.keyboard.press("Shift+Tab")
    assert page.evaluate(FOCUSED_JS) == "crop-frame"
    for key in ("ArrowRight", "ArrowRight", "ArrowDown", "Shift+ArrowRight", "Shift+ArrowDown"):
        page.keyboard.press(key)  # 2% of the photo, 10% with Shift
    screenshot(page, "keyboard-crop.png")
    page.keyboard.press("Tab")
    page.keyboard.press("Tab")
    assert page.evaluate(FOCUSED_JS) == "submit-button"
    screenshot(page, "keyboard-submit-focused.png")
    with page.expect_response(lambda r: "/predict" in r.url) as answer:
        page.keyboard.press("Enter")
    # Half the 300 px photo's side, centred 14% right of and 12% below the middle.
    crop = answer.value.json()["image"]["crop"]
    assert crop == {"left": 117, "top": 111, "width": 150, "height": 150}, crop
    page.wait_for_selector(".result-card")
    assert page.evaluate("document.activeElement.id") == "result-headline"

    # The next Tab stop is the heat-map switch; Space turns it on.
    page.keyboard.press("Tab")
    assert page.evaluate("document.activeElement.className") == "heat-toggle"
    page.keyboard.press("Space")
    assert page.locator(".photo-stack .heat").is_visible()
    screenshot(page, "keyboard-heatmap.png")
    page.close()


def test_js_crop_by_tap_and_drag(browser: Any, server: Any, screenshot: Shot) -> None:
    """Phone, JavaScript on: the slider zooms in, a tap puts the square there (kept inside the
    photo), dragging moves it; only that part is checked, and the result shows that part."""
    page = browser.new_page(viewport=PHONE)
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.goto(server.base_url + "/")
    assert page.locator("#crop-controls").is_hidden()  # nothing to crop yet
    page.set_input_files("#file-input", str(IMAGE))
    _wait_for_preview(page)
    page.locator("#crop-controls").wait_for()
    page.fill("#crop-size", "40")
    photo = page.locator("#preview-img").bounding_box()
    assert photo
    page.mouse.click(photo["x"] + 8, photo["y"] + 8)  # near the corner: kept inside
    frame = page.locator("#crop-frame").bounding_box()
    assert frame and abs(frame["x"] - photo["x"]) <= 1 and abs(frame["y"] - photo["y"]) <= 1
    assert abs(frame["width"] - 0.4 * photo["width"]) <= 1
    page.mouse.move(photo["x"] + 10, photo["y"] + 10)
    page.mouse.down()
    page.mouse.move(photo["x"] + photo["width"] - 5, photo["y"] + photo["height"] - 5, steps=5)
    page.mouse.up()
    frame = page.locator("#crop-frame").bounding_box()
    assert frame
    assert abs(frame["x"] + frame["width"] - (photo["x"] + photo["width"])) <= 1
    assert abs(frame["y"] + frame["height"] - (photo["y"] + photo["height"])) <= 1
    screenshot(page, "phone-js-crop.png")
    with page.expect_response(lambda r: "/predict" in r.url) as answer:
        page.click("#submit-button")
    assert "preview=true" in answer.value.url  # the result shows the part that was checked
    # 40% of the 300 px photo, in its bottom-right corner.
    assert answer.value.json()["image"]["crop"] == {
        "left": 180, "top": 180, "width": 120, "height": 120
    }  # fmt: skip
    page.wait_for_selector(".result-card")
    shown = page.evaluate(
        "(() => { const i = document.querySelector('.photo-stack .photo');"
        " return [i.naturalWidth, i.naturalHeight, i.src.slice(0, 23)]; })()"
    )
    assert shown == [120, 120, "data:image/jpeg;base64,"], shown
    page.click(".heat-toggle-label")
    _assert_heat_over_photo(page)
    screenshot(page, "phone-js-crop-result.png")
    # Another photo starts uncropped.
    page.set_input_files("#file-input", str(OTHER_IMAGE))
    page.locator("#crop-controls").wait_for()
    assert page.locator("#crop-frame").is_hidden()
    assert page.locator("#crop-size").input_value() == "100"
    assert errors == []
    page.close()


def test_js_crop_follows_the_photos_exif_orientation(
    browser: Any, server: Any, tmp_path: Path
) -> None:
    """A phone photo stored sideways with an EXIF orientation: the browser shows it upright,
    and the crop the page sends is of the upright photo, as the server reads it."""
    from PIL import ExifTags, Image

    exif = Image.Exif()
    exif[ExifTags.Base.Orientation] = 6  # stored 200x150, shown 150x200
    path = tmp_path / "sideways.jpg"
    Image.open(OTHER_IMAGE).convert("RGB").save(path, quality=95, exif=exif.tobytes())
    page = browser.new_page(viewport=PHONE)
    page.goto(server.base_url + "/")
    page.set_input_files("#file-input", str(path))
    page.locator("#crop-controls").wait_for()
    page.fill("#crop-size", "50")  # first: it scrolls the slider, and so the photo, into view
    photo = page.locator("#preview-img").bounding_box()
    assert photo and photo["height"] > photo["width"]  # shown upright
    page.mouse.click(photo["x"] + 8, photo["y"] + photo["height"] - 8)  # bottom-left corner
    with page.expect_response(lambda r: "/predict" in r.url) as answer:
        page.click("#submit-button")
    body = answer.value.json()
    assert body["image"] == {
        "width": 150, "height": 200, "crop": {"left": 0, "top": 125, "width": 75, "height": 75}
    }  # fmt: skip
    page.close()


def test_moderate_and_high_tiers_look_different(
    browser: Any, server: Any, server_factory: Any, artifact_copy: Any, screenshot: Shot
) -> None:
    """Tiers like the shipped model's (the threshold is the moderate tier's lower bound): a
    result just above the threshold is drawn inside the moderate colour, clear of the line,
    and its card border differs from a high result's."""
    tiers = [
        {"name": "low", "lower": 0.0, "upper": 0.45},
        {"name": "moderate", "lower": 0.45, "upper": 0.9},
        {"name": "high", "lower": 0.9, "upper": 1.0},
    ]
    model_dir = artifact_copy("shipped-like", threshold=0.45, risk_tiers=tiers)
    borders: dict[str, str] = {}
    with server_factory(model_dir=model_dir) as live:
        for name, base_url in (("moderate", live.base_url), ("high", server.base_url)):
            page = browser.new_page(viewport=PHONE)
            page.goto(base_url + "/")
            page.set_input_files("#file-input", str(IMAGE))
            page.click("#submit-button")
            page.wait_for_selector(".result-card")
            assert page.locator(".tier-name strong").inner_text() == name
            _assert_bar_by_tier(page)
            borders[name] = page.evaluate(BAR_JS)["border"]
            if name == "moderate":
                needle = page.locator(".prob-bar .needle").bounding_box()
                line = page.locator(".prob-bar .threshold").bounding_box()
                assert needle and line and needle["x"] - line["x"] >= 12  # clear of the line
                page.locator(".prob").scroll_into_view_if_needed()
                screenshot(page, "phone-js-moderate.png")
            page.close()
    assert borders["moderate"] != borders["high"], borders


def test_api_docs_render_offline(browser: Any, server: Any) -> None:
    """Swagger UI (served by the app itself) renders the OpenAPI 3.1 document."""
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    foreign = _watch_requests(page, server.base_url)
    page.goto(server.base_url + "/docs")
    page.wait_for_selector(".opblock-summary-path", timeout=15_000)
    paths = page.locator(".opblock-summary-path").all_inner_texts()
    assert "/predict" in paths and "/predict/batch" in paths
    assert "Unable to render" not in page.content()
    assert foreign == []
    page.close()
