"""The HTML pages, served by the real test server: upload page, no-JS result page, about."""

from __future__ import annotations

import io
import json
import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from PIL import Image

from app.texts import percent

MELANOMA = "isic2017_melanoma_ISIC_0000002.jpg"
# Any URL that would make the browser contact another host.
EXTERNAL = re.compile(r"""(?:src|href|action)\s*=\s*["']?(?:https?:)?//""", re.I)


def test_upload_page_is_a_working_no_js_form(client: httpx.Client) -> None:
    r = client.get("/")
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/html")
    html = r.text
    form = re.search(r"<form[^>]*>", html)
    assert form is not None
    tag = form.group(0)
    assert 'method="post"' in tag and 'enctype="multipart/form-data"' in tag
    assert 'action="/assess"' in tag
    # Camera capture, plain file choice, and labels tied to both inputs.
    assert re.search(
        r'<input[^>]*type="file"[^>]*accept="image/\*"[^>]*capture="environment"', html
    )
    assert re.search(r'<input[^>]*id="file-input"[^>]*name="file"[^>]*type="file"', html)
    assert '<label for="camera-input">' in html and '<label for="file-input">' in html
    assert 'aria-live="polite"' in html
    assert '<button type="submit"' in html
    # Guidance for a usable photo.
    for words in ("focus", "light", "flash", "centre", "fill"):
        assert words in html.lower()
    assert '<meta name="viewport"' in html and '<html lang="en">' in html


def test_pages_make_no_third_party_requests(client: httpx.Client) -> None:
    for path in ("/", "/about"):
        r = client.get(path)
        assert not EXTERNAL.search(r.text), path
        csp = r.headers["content-security-policy"]
        assert "default-src 'self'" in csp and "script-src 'self'" in csp
    css = client.get("/static/style.css")
    assert css.status_code == 200 and "@import" not in css.text and "url(" not in css.text
    js = client.get("/static/app.js")
    assert js.status_code == 200
    assert "/predict?explain=true" in js.text
    assert "innerHTML" not in js.text  # results are inserted as text, never as markup
    assert client.get("/static/favicon.svg").status_code == 200


def test_upload_page_carries_model_facts_for_the_script(
    client: httpx.Client, artifact_dir: Path
) -> None:
    metadata = json.loads((artifact_dir / "metadata.json").read_text())
    html = client.get("/").text
    match = re.search(r'<script type="application/json" id="model-meta">(.*?)</script>', html, re.S)
    assert match is not None
    facts = json.loads(match.group(1))
    assert facts["threshold"] == metadata["threshold"]
    assert [t["name"] for t in facts["tiers"]] == [t["name"] for t in metadata["risk_tiers"]]
    assert {t["position"] for t in facts["tiers"]} <= {"lowest", "between", "above"}


def test_form_post_renders_the_result_page(
    client: httpx.Client, image_bytes: dict[str, bytes]
) -> None:
    data = image_bytes[MELANOMA]
    api = client.post("/predict", files={"file": ("m.jpg", data, "image/jpeg")}).json()
    # A browser sends both pickers; the unused one arrives empty, without a file name.
    r = client.post(
        "/assess",
        files=[
            ("photo", ("", b"", "application/octet-stream")),
            ("file", ("mole.jpg", data, "image/jpeg")),
        ],
    )
    assert r.status_code == 200, r.text
    html = r.text
    assert r.headers["content-type"].startswith("text/html")
    assert api["headline"].replace("'", "&#39;") in html
    assert percent(api["probability_malignant"]) in html
    assert f"Risk level: <strong>{api['risk_tier']['name']}</strong>" in html
    assert "What to do next" in html
    assert "data:image/png;base64," in html  # heat map overlay
    assert "data:image/jpeg;base64," in html  # the photo, upright and metadata-free
    assert 'class="heat-toggle"' in html  # CSS-only toggle: works without JavaScript
    assert '<svg class="prob-bar"' in html and 'class="threshold"' in html
    assert api["model_version"] in html
    for sign in ("Asymmetry", "Border", "Colour", "Diameter", "6 mm", "Evolving", "bleeds"):
        assert sign in html
    assert "not a diagnosis" in html.lower()
    lowered = html.lower()
    assert "you have cancer" not in lowered and "you are fine" not in lowered


def test_form_post_without_a_photo_explains_what_to_do(client: httpx.Client) -> None:
    r = client.post(
        "/assess",
        files=[
            ("photo", ("", b"", "application/octet-stream")),
            ("file", ("", b"", "application/octet-stream")),
        ],
    )
    assert r.status_code == 422
    assert "Please choose or take a photo first." in r.text
    assert 'role="alert"' in r.text


def _rejected_count(client: httpx.Client, reason: str) -> float:
    pattern = rf'triage_rejected_inputs_total{{reason="{reason}"}} ([0-9.e+]+)'
    match = re.search(pattern, client.get("/metrics").text)
    return float(match.group(1)) if match else 0.0


def test_form_post_with_a_non_image_is_415_html(client: httpx.Client) -> None:
    before = _rejected_count(client, "not_an_image")
    r = client.post("/assess", files={"file": ("notes.txt", b"hello", "text/plain")})
    assert r.status_code == 415
    assert r.headers["content-type"].startswith("text/html")
    assert "could not be read as a photo" in r.text
    assert _rejected_count(client, "not_an_image") == before + 1  # counted once


def test_form_post_oversize_is_413_html(client: httpx.Client, server: Any) -> None:
    data = b"\xff" * (server.settings.max_upload_bytes + 1)
    r = client.post("/assess", files={"file": ("big.jpg", data, "image/jpeg")})
    assert r.status_code == 413
    assert "too large" in r.text


def test_about_without_model_card_shows_metadata(client: httpx.Client, artifact_dir: Path) -> None:
    metadata = json.loads((artifact_dir / "metadata.json").read_text())
    assert not (artifact_dir / "MODEL_CARD.md").exists()
    r = client.get("/about")
    assert r.status_code == 200
    html = r.text
    assert metadata["version"] in html and metadata["name"] in html
    assert percent(metadata["threshold"]) in html
    assert "Intended use" in html
    assert "Model card" not in html


@pytest.fixture(scope="module")
def carded_server(
    artifact_dir: Path, tmp_path_factory: pytest.TempPathFactory, server_factory: Any
) -> Iterator[Any]:
    """A server whose artifact ships MODEL_CARD.md, a plot and validation metrics."""
    model_dir = tmp_path_factory.mktemp("carded") / "artifact"
    shutil.copytree(artifact_dir, model_dir)
    meta_path = model_dir / "metadata.json"
    meta = json.loads(meta_path.read_text())
    meta["metrics"] = {"validation": {"pooled": {"roc_auc": 0.8123, "sensitivity": 0.9}}}
    meta_path.write_text(json.dumps(meta))
    (model_dir / "plots").mkdir()
    buf = io.BytesIO()
    Image.new("RGB", (40, 30), (10, 120, 200)).save(buf, format="PNG")
    (model_dir / "plots" / "roc.png").write_bytes(buf.getvalue())
    (model_dir / "MODEL_CARD.md").write_text(
        "# Tiny test model card\n\n"
        "Intended for **tests** only.\n\n"
        "| metric | value |\n|---|---|\n| ROC-AUC | 0.81 |\n\n"
        "![ROC curve](plots/roc.png) and [the same plot](./plots/roc.png)\n\n"
        "<script>alert('raw html must not pass')</script>\n"
    )
    with server_factory(model_dir=model_dir) as live:
        yield live


def test_about_renders_the_model_card(carded_server: Any) -> None:
    with carded_server.client() as c:
        r = c.get("/about")
        assert r.status_code == 200
        html = r.text
        assert "<h1>Tiny test model card</h1>" in html
        assert "<strong>tests</strong>" in html
        assert "<table>" in html and "ROC-AUC" in html
        assert "<script>alert" not in html  # raw HTML in the card is escaped
        assert 'src="/model/plots/roc.png"' in html and 'href="/model/plots/roc.png"' in html
        assert "roc auc: 0.812" in html  # validation metrics from metadata
        plot = c.get("/model/plots/roc.png")
        assert plot.status_code == 200 and plot.headers["content-type"] == "image/png"
        assert c.get("/model/plots/..%2Fmetadata.json").status_code == 404
        assert c.get("/model/plots/missing.png").status_code == 404
