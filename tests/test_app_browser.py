"""The upload page in a real headless Chromium, with and without JavaScript.

Uses Debian's Chromium (CHROMIUM_PATH, or `chromium` on PATH); skipped where there is none.
"""

from __future__ import annotations

import base64
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.browser

IMAGE = Path(__file__).parent / "fixtures" / "images" / "pad-ufes-20_nev_PAT_1107_427_352.jpg"
PHONE = {"width": 390, "height": 844}


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    sync_api = pytest.importorskip("playwright.sync_api")
    executable = os.environ.get("CHROMIUM_PATH") or shutil.which("chromium")
    if not executable:
        pytest.skip("no Chromium on this machine (set CHROMIUM_PATH)")
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=executable, args=["--no-sandbox"])
        try:
            yield b
        finally:
            b.close()


def _watch_requests(page: Any, base_url: str) -> list[str]:
    """Collect every request the page makes to anywhere but the service itself."""
    foreign: list[str] = []

    def check(request: Any) -> None:
        if not request.url.startswith((base_url, "data:", "blob:")):
            foreign.append(request.url)

    page.on("request", check)
    return foreign


def test_js_upload_renders_the_result_in_place(browser: Any, server: Any) -> None:
    page = browser.new_page(viewport=PHONE)
    foreign = _watch_requests(page, server.base_url)
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.goto(server.base_url + "/")
    assert page.evaluate("document.documentElement.scrollWidth") <= PHONE["width"]

    page.set_input_files("#file-input", str(IMAGE))
    assert page.is_visible("#preview-img")
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

    heat = page.locator(".photo-stack .heat")
    assert not heat.is_visible()
    page.click(".heat-toggle-label")
    assert heat.is_visible()
    page.click(".heat-toggle-label")
    assert not heat.is_visible()
    assert page.evaluate("document.documentElement.scrollWidth") <= PHONE["width"]
    assert foreign == [] and errors == []
    page.close()


def test_js_drag_and_drop_and_errors(browser: Any, server: Any) -> None:
    page = browser.new_page(viewport=PHONE)
    page.goto(server.base_url + "/")
    page.click("#submit-button")  # nothing chosen yet
    assert "choose or take a photo" in page.locator("#result .error-box").inner_text()

    # Drop a text file: the server refuses it and the page says so in plain words.
    page.evaluate(
        """(b64) => {
            const bytes = Uint8Array.from(atob(b64), c => c.charCodeAt(0));
            const dt = new DataTransfer();
            dt.items.add(new File([bytes], "notes.txt", {type: "text/plain"}));
            document.getElementById("dropzone").dispatchEvent(
                new DragEvent("drop", {dataTransfer: dt, bubbles: true, cancelable: true}));
        }""",
        base64.b64encode(b"not a photo").decode(),
    )
    page.click("#submit-button")
    page.wait_for_selector("#result .error-box")
    assert "could not be read as a photo" in page.locator("#result .error-box").inner_text()

    # Drop the real photo: assessed.
    page.evaluate(
        """(b64) => {
            const bytes = Uint8Array.from(atob(b64), c => c.charCodeAt(0));
            const dt = new DataTransfer();
            dt.items.add(new File([bytes], "mole.jpg", {type: "image/jpeg"}));
            document.getElementById("dropzone").dispatchEvent(
                new DragEvent("drop", {dataTransfer: dt, bubbles: true, cancelable: true}));
        }""",
        base64.b64encode(IMAGE.read_bytes()).decode(),
    )
    page.click("#submit-button")
    page.wait_for_selector(".result-card")
    page.close()


def test_without_javascript_the_form_posts_and_renders_server_side(
    browser: Any, server: Any
) -> None:
    context = browser.new_context(java_script_enabled=False, viewport=PHONE)
    page = context.new_page()
    foreign = _watch_requests(page, server.base_url)
    page.goto(server.base_url + "/")
    page.set_input_files("#file-input", str(IMAGE))
    page.click("#submit-button")
    page.wait_for_load_state()
    assert page.url == server.base_url + "/assess"
    assert page.locator(".result-card").count() == 1
    assert "What to do next" in page.locator(".result-card").inner_text()
    heat = page.locator(".photo-stack .heat")
    assert not heat.is_visible()
    page.click(".heat-toggle-label")  # CSS-only toggle
    assert heat.is_visible()
    assert foreign == []
    context.close()
