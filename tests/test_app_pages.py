"""The HTML pages, served by the real test server: upload page, no-JS result page, about."""

from __future__ import annotations

import base64
import io
import itertools
import json
import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from PIL import Image

from app.texts import HEATMAP_TEXTS, percent

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
    assert facts["photo_kinds"] == {}  # one calibration for every photo: no kind to name


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
    assert api["photo_domain"] is None and "photo-kind" not in html
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


# -- probability bar: drawn from the tiers ---------------------------------------------------
def _model_facts(html: str) -> dict[str, Any]:
    match = re.search(r'<script type="application/json" id="model-meta">(.*?)</script>', html, re.S)
    assert match is not None
    facts: dict[str, Any] = json.loads(match.group(1))
    return facts


def test_bar_scale_keeps_small_probabilities_readable() -> None:
    """Equal-width tier segments: with the shipped model's tiers a 3% and a 6% estimate are
    far from the threshold (the 4.8% tier boundary), not on it as on a linear scale."""
    from app.metadata import RiskTier
    from app.routers.pages import bar_position, threshold_position, tier_level

    tiers = (
        RiskTier("low", 0.0, 0.0479),
        RiskTier("moderate", 0.0479, 0.2874),
        RiskTier("high", 0.2874, 1.0),
    )
    threshold = threshold_position(0.0479, tiers)
    assert threshold == pytest.approx(1 / 3)  # on the tier boundary
    assert threshold - bar_position(0.03, tiers) > 0.1  # > 30 px of a 300 px phone bar
    assert bar_position(0.06, tiers) - threshold > 0.03  # > 9 px: clear of the line
    assert bar_position(0.0479, tiers) > threshold  # the threshold itself: inside "moderate"
    assert 0.0 < bar_position(0.0, tiers) < bar_position(0.001, tiers)
    assert bar_position(0.999, tiers) < bar_position(1.0, tiers) < 1.0
    ps = np.linspace(0, 1, 501)
    xs = [bar_position(float(p), tiers) for p in ps]
    assert all(b > a for a, b in itertools.pairwise(xs))  # strictly monotonic
    for i, t in enumerate(tiers):  # every estimate is drawn inside its own tier's segment
        for p in np.linspace(t.lower, t.upper, 50, endpoint=i == 2):
            assert i / 3 < bar_position(float(p), tiers) < (i + 1) / 3
    assert threshold_position(0.1, tiers) == bar_position(0.1, tiers)  # not on a boundary
    assert [tier_level(i, 3) for i in range(3)] == [0, 2, 4]  # one colour per tier
    assert len({tier_level(i, 5) for i in range(5)}) == 5
    assert tier_level(0, 1) == 0


def test_bar_gives_every_tier_its_own_colour_and_segment(
    server_factory: Any, artifact_copy: Any, image_bytes: dict[str, bytes]
) -> None:
    """Like the shipped model: the threshold is the moderate tier's lower bound, so two tiers
    lie above it; they still get different colours, and the card border follows the tier."""
    tiers = [
        {"name": "low", "lower": 0.0, "upper": 0.05},
        {"name": "moderate", "lower": 0.05, "upper": 0.6},
        {"name": "high", "lower": 0.6, "upper": 1.0},
    ]
    model_dir = artifact_copy("shipped-like", threshold=0.05, risk_tiers=tiers)
    with server_factory(model_dir=model_dir) as live, live.client() as c:
        facts = _model_facts(c.get("/").text)
        levels = [t["level"] for t in facts["tiers"]]
        assert levels == sorted(levels) and len(set(levels)) == len(tiers)
        assert [t["position"] for t in facts["tiers"]] == ["lowest", "above", "above"]

        data = image_bytes[MELANOMA]
        api = c.post("/predict", files={"file": ("m.jpg", data, "image/jpeg")}).json()
        html = c.post("/assess", files={"file": ("m.jpg", data, "image/jpeg")}).text
    p = api["probability_malignant"]
    index = [t["name"] for t in tiers].index(api["risk_tier"]["name"])
    band = r'<rect class="band level-(\d)" x="([\d.]+)%" y="22" width="([\d.]+)%"'
    bands = re.findall(band, html)
    assert [int(level) for level, _, _ in bands] == levels
    assert [round(float(x), 1) for _, x, _ in bands] == [0.0, 33.3, 66.7]  # equal segments
    assert {round(float(w), 1) for _, _, w in bands} == {33.3}
    assert f"tier-level-{levels[index]}" in html  # card border by tier
    tier = tiers[index]
    inside = (p - tier["lower"]) / (tier["upper"] - tier["lower"])
    expected = 100 * (index + 0.08 + 0.84 * inside) / 3
    needle = re.search(r'<line class="needle" x1="([\d.]+)%"', html)
    assert needle is not None and float(needle.group(1)) == pytest.approx(expected, abs=0.01)
    assert float(bands[index][1]) < expected < float(bands[index][1]) + 33.3  # inside its tier
    threshold = re.search(r'<line class="threshold" x1="([\d.]+)%"', html)
    assert threshold is not None and float(threshold.group(1)) == pytest.approx(33.333)
    label = re.search(r'<text class="needle-label"[^>]*>([^<]+)</text>', html)
    assert label is not None and label.group(1) == percent(p)  # the marker carries its value
    assert "viewBox" not in html.split('class="prob-bar"')[1].split(">")[0]  # text unstretched
    scale = re.search(r'<div class="prob-scale"[^>]*>(.*?)</div>', html, re.S)
    assert scale is not None
    assert re.findall(r'class="tick[^"]*">([^<]+)<', scale.group(1)) == ["0%", "5%", "60%", "100%"]
    assert "Each risk level takes an equal share of the bar" in html  # the scale is explained
    assert "doctor's check from 5%" in html


# -- heat map: evidence for, evidence against, none --------------------------------------------
def _alpha_max(png_b64: str) -> int:
    png = Image.open(io.BytesIO(base64.b64decode(png_b64)))
    return int(np.asarray(png.convert("RGBA"))[..., 3].max())


def _heat_wording(html: str) -> str | None:
    label = re.search(r'<label for="heat-toggle" class="heat-toggle-label">([^<]*)</label>', html)
    return label.group(1) if label else None


def test_positive_answer_shows_the_areas_that_raised_concern(
    client: httpx.Client, image_bytes: dict[str, bytes]
) -> None:
    data = image_bytes[MELANOMA]
    api = client.post("/predict?explain=true", files={"file": ("m.jpg", data)}).json()
    assert api["label"] == "malignant"  # the tiny model's threshold is 0.4; p is about 0.49
    assert api["heatmap_evidence"] == "for" and _alpha_max(api["heatmap_png_base64"]) > 0
    html = client.post("/assess", files={"file": ("m.jpg", data, "image/jpeg")}).text
    assert _heat_wording(html) == HEATMAP_TEXTS["concern"]["toggle"]
    assert HEATMAP_TEXTS["concern"]["hint"].replace("'", "&#39;") in html
    assert 'aria-describedby="heat-hint"' in html and 'id="heat-hint"' in html


def test_negative_answer_shows_where_the_model_looked(
    server_factory: Any, artifact_copy: Any, image_bytes: dict[str, bytes]
) -> None:
    """A benign answer draws heatmap_benign (evidence against), not the blank malignant map;
    an artifact without heatmap_benign falls back to heatmap, worded as such."""
    data = image_bytes[MELANOMA]
    model_dir = artifact_copy("benign", threshold=0.6)
    with server_factory(model_dir=model_dir) as live, live.client() as c:
        api = c.post("/predict?explain=true", files={"file": ("m.jpg", data)}).json()
        html = c.post("/assess", files={"file": ("m.jpg", data, "image/jpeg")}).text
    assert api["label"] == "benign" and api["heatmap_evidence"] == "against"
    assert _alpha_max(api["heatmap_png_base64"]) > 0
    assert _heat_wording(html) == HEATMAP_TEXTS["looked"]["toggle"]
    assert 'class="heat"' in html and HEATMAP_TEXTS["looked"]["alt"] in html.replace("&#39;", "'")

    endpoints = {"serve": ["logit", "embedding", "ood_embedding"], "explain": ["logit", "heatmap"]}
    old_dir = artifact_copy("no-benign-map", threshold=0.6, endpoints=endpoints)
    with server_factory(model_dir=old_dir) as live, live.client() as c:
        api = c.post("/predict?explain=true", files={"file": ("m.jpg", data)}).json()
        html = c.post("/assess", files={"file": ("m.jpg", data, "image/jpeg")}).text
    assert api["label"] == "benign" and api["heatmap_evidence"] == "for"
    assert _heat_wording(html) == HEATMAP_TEXTS["raised"]["toggle"]


def test_an_empty_heat_map_hides_the_switch_and_says_so(client: httpx.Client) -> None:
    """Mid-grey is all zeros after the model's (x - 128) / 128 scaling: no area can stand out."""
    buf = io.BytesIO()
    Image.new("RGB", (96, 72), (128, 128, 128)).save(buf, format="PNG")
    api = client.post("/predict?explain=true", files={"file": ("g.png", buf.getvalue())}).json()
    assert api["status"] == "ok" and api["heatmap_evidence"] == "none"
    assert _alpha_max(api["heatmap_png_base64"]) == 0
    html = client.post("/assess", files={"file": ("g.png", buf.getvalue(), "image/png")}).text
    assert 'class="heat-toggle"' not in html and 'class="heat"' not in html
    assert HEATMAP_TEXTS["none"]["hint"] in html
    assert 'class="photo"' in html  # the photo itself is still shown
    no_explain = client.post("/predict", files={"file": ("g.png", buf.getvalue())}).json()
    assert "heatmap_evidence" not in no_explain  # only with explain=true
