"""The JSON API against a real uvicorn server and a real (tiny) exported model."""

from __future__ import annotations

import base64
import io
import json
import math
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from PIL import ExifTags, Image, ImageOps

from model_training.preprocessing import decode_image, resize_to_input

HAM = "ham10000_nv_ISIC_0024306.jpg"  # 200x150: not square, so rotation is visible in its size
MELANOMA = "isic2017_melanoma_ISIC_0000002.jpg"
MB = 1024 * 1024
REQUIRED_KEYS = {
    "status",
    "label",
    "probability_malignant",
    "threshold",
    "risk_tier",
    "model_version",
    "request_id",
    "timings_ms",
    "disclaimer",
}


# -- helpers ---------------------------------------------------------------------------------
def encode(img: Image.Image, fmt: str, **kwargs: Any) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kwargs)
    return buf.getvalue()


def open_rgb(data: bytes) -> Image.Image:
    return Image.open(io.BytesIO(data)).convert("RGB")


def post_image(
    client: httpx.Client, data: bytes, name: str = "photo.jpg", ctype: str = "image/jpeg", **kw: Any
) -> httpx.Response:
    return client.post("/predict", files={"file": (name, data, ctype)}, **kw)


def assert_ok_result(body: dict[str, Any], metadata: dict[str, Any]) -> None:
    """Every field of an assessed result agrees with the artifact's metadata."""
    assert body.keys() >= REQUIRED_KEYS
    assert body["status"] == "ok"
    p = body["probability_malignant"]
    assert 0.0 <= p <= 1.0
    assert body["threshold"] == metadata["threshold"]
    assert body["model_version"] == metadata["version"]
    assert body["label"] in metadata["labels"]
    expected_label = metadata["positive_label"] if p >= metadata["threshold"] else "benign"
    assert body["label"] == expected_label
    tier = body["risk_tier"]
    assert tier["lower"] <= p <= tier["upper"]
    assert {"name": tier["name"], "lower": tier["lower"], "upper": tier["upper"]} in metadata[
        "risk_tiers"
    ]
    assert tier["advice"]
    assert body["reasons"] == []
    assert "heatmap_png_base64" not in body
    timings = body["timings_ms"]
    assert {"decode", "inference", "total"} <= timings.keys()
    assert timings["total"] >= timings["inference"] > 0
    assert "not a diagnosis" in body["disclaimer"].lower()


@pytest.fixture(scope="module")
def metadata(artifact_dir: Path) -> dict[str, Any]:
    return json.loads((artifact_dir / "metadata.json").read_text())


@pytest.fixture(scope="module")
def reference_probability(artifact_dir: Path, metadata: dict[str, Any]) -> Any:
    """Probability computed here straight from the SavedModel, to check the server's maths."""
    import tensorflow as tf

    saved = tf.saved_model.load(str(artifact_dir / "saved_model"))
    size = (metadata["input"]["height"], metadata["input"]["width"])

    def probability(data: bytes) -> float:
        x = resize_to_input(decode_image(data), size)[None]
        logit = float(saved.serve(tf.constant(x))["logit"].numpy()[0])
        return 1.0 / (1.0 + math.exp(-logit / metadata["temperature"]))

    return probability


# -- health, model, metrics ------------------------------------------------------------------
def test_health_live_and_ready(client: httpx.Client, metadata: dict[str, Any]) -> None:
    live = client.get("/health/live")
    assert live.status_code == 200 and live.json()["status"] == "ok"
    ready = client.get("/health/ready")
    assert ready.status_code == 200
    assert ready.json() == {"status": "ok", "model_version": metadata["version"]}


def test_model_endpoint_returns_metadata(client: httpx.Client, metadata: dict[str, Any]) -> None:
    r = client.get("/model")
    assert r.status_code == 200
    body = r.json()
    for key in ("name", "version", "labels", "threshold", "temperature", "risk_tiers", "input"):
        assert body[key] == metadata[key]
    server = body["server"]
    assert server["load_seconds"] > 0 and server["warmup_seconds"] > 0
    assert server["gates"] == {"quality": "quality" in metadata, "ood": "ood" in metadata}


def test_openapi_documents_every_endpoint_with_examples(client: httpx.Client) -> None:
    spec = client.get("/openapi.json").json()
    paths = spec["paths"]
    for path in ("/predict", "/predict/batch", "/model", "/health/live", "/health/ready"):
        assert path in paths
    body = paths["/predict"]["post"]["requestBody"]["content"]["multipart/form-data"]
    assert body["schema"]["required"] == ["file"]
    assert {"413", "415", "422", "503"} <= paths["/predict"]["post"]["responses"].keys()
    assert spec["components"]["schemas"]["PredictionResult"]["examples"]


def test_metrics_count_requests_predictions_and_rejections(
    client: httpx.Client, image_bytes: dict[str, bytes]
) -> None:
    assert post_image(client, image_bytes[MELANOMA]).status_code == 200
    assert post_image(client, b"not an image", "notes.txt", "text/plain").status_code == 415
    text = client.get("/metrics").text
    assert re.search(r'triage_predictions_total\{label="(benign|malignant)"\} [1-9]', text)
    assert re.search(r'triage_rejected_inputs_total\{reason="not_an_image"\} [1-9]', text)
    assert re.search(
        r'triage_http_requests_total\{method="POST",route="/predict",status="200"\} [1-9]', text
    )
    assert re.search(
        r'triage_http_requests_total\{method="POST",route="/predict",status="415"\} [1-9]', text
    )
    assert re.search(
        r'triage_http_request_duration_seconds_count\{method="POST",route="/predict"\} [1-9]', text
    )
    assert re.search(r"triage_inference_duration_seconds_count [1-9]", text)
    assert re.search(r"triage_model_load_seconds [0-9.e+-]+", text)
    assert re.search(r"triage_model_ready 1\.0", text)


# -- /predict: formats -----------------------------------------------------------------------
@pytest.mark.parametrize(
    "name",
    sorted(p.name for p in (Path(__file__).parent / "fixtures" / "images").glob("*.jpg")),
)
def test_predict_fixture_photos(
    client: httpx.Client,
    image_bytes: dict[str, bytes],
    metadata: dict[str, Any],
    reference_probability: Any,
    name: str,
) -> None:
    data = image_bytes[name]
    r = post_image(client, data, name)
    assert r.status_code == 200, r.text
    body = r.json()
    assert_ok_result(body, metadata)
    # Calibrated probability is sigmoid(logit / temperature) of the same preprocessing.
    assert body["probability_malignant"] == pytest.approx(reference_probability(data), abs=1e-5)
    width, height = Image.open(io.BytesIO(data)).size
    assert body["image"] == {"width": width, "height": height}
    assert r.headers["x-request-id"] == body["request_id"]


def _variants(img: Image.Image) -> Iterator[tuple[str, bytes, str]]:
    """The same photo in the formats and pixel modes phones and tools produce."""
    import pillow_heif

    pillow_heif.register_heif_opener()
    yield "png", encode(img, "PNG"), "image/png"
    yield "webp", encode(img, "WEBP", quality=90), "image/webp"
    yield "heic", encode(img, "HEIF", quality=90), "image/heic"
    yield "cmyk-jpeg", encode(img.convert("CMYK"), "JPEG", quality=95), "image/jpeg"
    grey16 = Image.fromarray(np.asarray(img.convert("L"), dtype=np.uint16) * 257)
    yield "png-16bit", encode(grey16, "PNG"), "image/png"
    rgba = img.convert("RGBA")
    rgba.putalpha(Image.linear_gradient("L").resize(img.size))
    yield "png-rgba", encode(rgba, "PNG"), "image/png"
    yield (
        "png-palette",
        encode(img.convert("P", palette=Image.Palette.ADAPTIVE, colors=64), "PNG"),
        "image/png",
    )


def test_predict_accepts_every_common_format(
    client: httpx.Client, image_bytes: dict[str, bytes], metadata: dict[str, Any]
) -> None:
    img = open_rgb(image_bytes[HAM])
    seen = set()
    for kind, data, ctype in _variants(img):
        if kind == "png-16bit":
            assert Image.open(io.BytesIO(data)).mode in ("I;16", "I"), "not really 16-bit"
        if kind == "cmyk-jpeg":
            assert Image.open(io.BytesIO(data)).mode == "CMYK"
        if kind == "heic":
            assert data[4:12] in (b"ftypheic", b"ftypmif1"), "not really HEIC"
        r = post_image(client, data, f"photo.{kind}", ctype)
        assert r.status_code == 200, f"{kind}: {r.text}"
        body = r.json()
        assert_ok_result(body, metadata)
        assert body["image"] == {"width": 200, "height": 150}, kind
        seen.add(kind)
    assert len(seen) == 7


def test_heic_sent_with_a_jpeg_name_and_type_still_works(
    client: httpx.Client, image_bytes: dict[str, bytes]
) -> None:
    """Phones send HEIC named .jpg; the server sniffs the content, not the name."""
    import pillow_heif

    pillow_heif.register_heif_opener()
    data = encode(open_rgb(image_bytes[HAM]), "HEIF")
    r = post_image(client, data, "IMG_0001.JPG", "image/jpeg")
    assert r.status_code == 200 and r.json()["status"] == "ok"


def _exif_rotated(upright: Image.Image) -> bytes:
    """JPEG whose stored pixels are rotated, with EXIF orientation 6 to show it upright."""
    stored = upright.transpose(Image.Transpose.ROTATE_90)  # counter-clockwise
    exif = Image.Exif()
    exif[ExifTags.Base.Orientation] = 6  # "rotate 90° clockwise to display"
    return encode(stored, "JPEG", quality=95, exif=exif.tobytes())


def test_exif_orientation_is_applied(client: httpx.Client, image_bytes: dict[str, bytes]) -> None:
    upright = open_rgb(image_bytes[HAM])  # 200 wide, 150 high
    rotated_jpeg = _exif_rotated(upright)
    assert Image.open(io.BytesIO(rotated_jpeg)).size == (150, 200)  # stored sideways

    r = post_image(client, rotated_jpeg)
    assert r.status_code == 200
    body = r.json()
    assert body["image"] == {"width": 200, "height": 150}

    # The same pixels, turned upright here and sent losslessly without EXIF: same answer.
    turned = ImageOps.exif_transpose(Image.open(io.BytesIO(rotated_jpeg))).convert("RGB")
    manual = post_image(client, encode(turned, "PNG"), "upright.png", "image/png").json()
    assert manual["image"] == body["image"]
    assert manual["probability_malignant"] == pytest.approx(body["probability_malignant"], abs=1e-6)

    # Without the orientation tag the server sees the stored, sideways image.
    sideways = Image.open(io.BytesIO(rotated_jpeg)).convert("RGB")
    raw = post_image(client, encode(sideways, "PNG"), "sideways.png", "image/png").json()
    assert raw["image"] == {"width": 150, "height": 200}


def test_gps_and_exif_are_never_echoed(client: httpx.Client, image_bytes: dict[str, bytes]) -> None:
    marker = "SECRET-CAMERA-MARKER-51N"
    exif = Image.Exif()
    exif[ExifTags.Base.Make] = marker
    exif[ExifTags.Base.ImageDescription] = marker
    gps = exif.get_ifd(ExifTags.IFD.GPSInfo)
    gps[ExifTags.GPS.GPSLatitudeRef] = "N"
    gps[ExifTags.GPS.GPSLatitude] = (51.0, 30.0, 12.5)
    gps[ExifTags.GPS.GPSLongitudeRef] = "W"
    gps[ExifTags.GPS.GPSLongitude] = (0.0, 7.0, 39.0)
    data = encode(open_rgb(image_bytes[HAM]), "JPEG", quality=95, exif=exif.tobytes())
    assert Image.open(io.BytesIO(data)).getexif().get_ifd(ExifTags.IFD.GPSInfo)

    r = client.post(
        "/predict?explain=true&preview=true", files={"file": ("gps.jpg", data, "image/jpeg")}
    )
    assert r.status_code == 200
    assert marker not in r.text
    assert "GPS" not in r.text and "51.0" not in r.text
    body = r.json()
    for key in ("preview_jpeg_base64", "heatmap_png_base64"):
        img = Image.open(io.BytesIO(base64.b64decode(body[key])))
        assert len(img.getexif()) == 0, key
        assert marker.encode() not in base64.b64decode(body[key])


# -- /predict: explain -----------------------------------------------------------------------
def test_explain_returns_a_png_overlay_at_the_photo_resolution(
    client: httpx.Client, image_bytes: dict[str, bytes]
) -> None:
    r = client.post(
        "/predict", params={"explain": "true"}, files={"file": ("m.jpg", image_bytes[HAM])}
    )
    assert r.status_code == 200
    body = r.json()
    png = base64.b64decode(body["heatmap_png_base64"])
    assert png.startswith(b"\x89PNG\r\n\x1a\n")
    overlay = Image.open(io.BytesIO(png))
    overlay.load()
    assert overlay.mode == "RGBA"
    assert overlay.size == (200, 150)
    alpha = np.asarray(overlay.getchannel("A"))
    assert alpha.max() > 0  # something is highlighted
    assert body["timings_ms"]["explain"] > 0


def test_explain_as_form_field_and_capped_size_for_large_photos(
    client: httpx.Client, image_bytes: dict[str, bytes], server: Any
) -> None:
    big = open_rgb(image_bytes[HAM]).resize((1200, 900))
    r = client.post(
        "/predict",
        data={"explain": "true", "preview": "1"},
        files={"file": ("big.jpg", encode(big, "JPEG", quality=80), "image/jpeg")},
    )
    assert r.status_code == 200
    body = r.json()
    assert body["image"] == {"width": 1200, "height": 900}
    overlay = Image.open(io.BytesIO(base64.b64decode(body["heatmap_png_base64"])))
    cap = server.settings.heatmap_max_side
    assert overlay.size == (cap, round(900 * cap / 1200))  # same aspect ratio, capped
    preview = Image.open(io.BytesIO(base64.b64decode(body["preview_jpeg_base64"])))
    assert preview.format == "JPEG" and preview.size == (768, 576)


# -- /predict: errors ------------------------------------------------------------------------
def test_text_file_is_415(client: httpx.Client) -> None:
    r = post_image(client, b"hello, I am not a photo\n", "notes.txt", "text/plain")
    assert r.status_code == 415
    assert r.json()["detail"] == "the file is not a decodable image"


def test_truncated_image_is_415(client: httpx.Client, image_bytes: dict[str, bytes]) -> None:
    r = post_image(client, image_bytes[MELANOMA][:300])
    assert r.status_code == 415
    assert "detail" in r.json()


def test_empty_file_is_422(client: httpx.Client) -> None:
    """The schema says minLength 1, so an empty file part is a validation error."""
    r = post_image(client, b"")
    assert r.status_code == 422
    assert "empty" in r.json()["detail"][0]["msg"]


def test_missing_field_is_422_with_detail(
    client: httpx.Client, image_bytes: dict[str, bytes]
) -> None:
    r = client.post("/predict", files={"image": ("m.jpg", image_bytes[MELANOMA], "image/jpeg")})
    assert r.status_code == 422
    detail = r.json()["detail"]
    assert detail[0]["loc"] == ["body", "file"]
    assert client.post("/predict").status_code == 422  # no body at all


def test_non_multipart_body_is_415(client: httpx.Client) -> None:
    r = client.post("/predict", json={"file": "aGVsbG8="})
    assert r.status_code == 415
    assert "multipart" in r.json()["detail"]


def test_oversize_upload_is_413(client: httpx.Client, server: Any) -> None:
    limit = server.settings.max_upload_bytes
    data = os.urandom(limit + 1)
    try:
        r = post_image(client, data, "big.jpg")
    except httpx.TransportError:  # pragma: no cover - server may close while we still send
        pytest.fail("the server must answer 413, not drop the connection")
    assert r.status_code == 413
    assert str(limit) in r.json()["detail"]


def test_oversize_upload_without_content_length_is_413(client: httpx.Client, server: Any) -> None:
    """A chunked body declares no length: the limit is enforced on the bytes as they come."""
    limit = server.settings.max_upload_bytes
    boundary = "----triage-test-boundary"

    def body() -> Iterator[bytes]:
        yield (
            f"--{boundary}\r\n"
            'Content-Disposition: form-data; name="file"; filename="big.jpg"\r\n'
            "Content-Type: image/jpeg\r\n\r\n"
        ).encode()
        sent = 0
        while sent <= limit + 128 * 1024:
            yield b"\xff" * 65536
            sent += 65536
        yield f"\r\n--{boundary}--\r\n".encode()

    r = client.post(
        "/predict",
        content=body(),
        headers={"Content-Type": f"multipart/form-data; boundary={boundary}"},
    )
    assert r.status_code == 413
    assert "detail" in r.json()


def test_a_photo_of_exactly_the_limit_is_accepted(
    client: httpx.Client, image_bytes: dict[str, bytes], server: Any
) -> None:
    """The multipart framing does not count against the per-file limit."""
    limit = server.settings.max_upload_bytes
    jpeg = image_bytes[MELANOMA]
    padded = jpeg + b"\0" * (limit - len(jpeg))  # decoders ignore bytes after the JPEG end
    assert len(padded) == limit
    r = post_image(client, padded)
    assert r.status_code == 200, r.text
    assert post_image(client, padded + b"\0").status_code == 413


def test_one_structured_log_line_per_request(
    client: httpx.Client, image_bytes: dict[str, bytes], caplog: pytest.LogCaptureFixture
) -> None:
    from app.logs import JsonFormatter

    caplog.set_level("INFO", logger="app.access")
    data = image_bytes[MELANOMA]
    r = post_image(client, data, "private-name.jpg", headers={"X-Request-ID": "log-check-1"})
    assert r.status_code == 200
    records = [rec for rec in caplog.records if rec.name == "app.access"]
    mine = [rec for rec in records if getattr(rec, "fields", {}).get("request_id") == "log-check-1"]
    assert len(mine) == 1
    line = JsonFormatter().format(mine[0])
    entry = json.loads(line)
    assert entry["path"] == "/predict" and entry["status"] == 200
    assert entry["latency_ms"] > 0
    assert entry["outcome"] == r.json()["label"]
    assert "private-name" not in line  # no file names
    assert base64.b64encode(data[:48]).decode()[:32] not in line and len(line) < 1000


def test_request_id_is_propagated_or_generated(
    client: httpx.Client, image_bytes: dict[str, bytes]
) -> None:
    r = post_image(client, image_bytes[MELANOMA], headers={"X-Request-ID": "trace-abc.123"})
    assert r.headers["x-request-id"] == "trace-abc.123"
    assert r.json()["request_id"] == "trace-abc.123"
    unsafe = client.get("/health/live", headers={"X-Request-ID": "<script>" + "x" * 200})
    assert re.fullmatch(r"[0-9a-f]{32}", unsafe.headers["x-request-id"])
    errored = post_image(client, b"")
    assert re.fullmatch(r"[0-9a-f]{32}", errored.headers["x-request-id"])


# -- /predict/batch --------------------------------------------------------------------------
def test_batch_mixes_results_and_errors_in_order(
    client: httpx.Client, image_bytes: dict[str, bytes], metadata: dict[str, Any], server: Any
) -> None:
    png = encode(open_rgb(image_bytes[HAM]), "PNG")
    files = [
        ("files", ("a.jpg", image_bytes[MELANOMA], "image/jpeg")),
        ("files", ("b.txt", b"plain text", "text/plain")),
        ("files", ("c.png", png, "image/png")),
        ("files", ("d.jpg", b"\xff\xd8 not really a jpeg", "image/jpeg")),
    ]
    r = client.post("/predict/batch", files=files)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["count"] == 4 and len(body["results"]) == 4
    assert body["model_version"] == metadata["version"]
    a, b, c, d = body["results"]
    assert_ok_result(a, metadata)
    assert_ok_result(c, metadata)
    assert c["image"] == {"width": 200, "height": 150}
    assert b == {
        "status": "error",
        "index": 1,
        "status_code": 415,
        "detail": "the file is not a decodable image",
    }
    assert d["status"] == "error" and d["index"] == 3 and d["status_code"] == 415
    assert a["request_id"] == c["request_id"] == body["request_id"] == r.headers["x-request-id"]

    # Batching does not change the answer: same probability as the single-photo endpoint.
    single = post_image(client, image_bytes[MELANOMA]).json()
    assert a["probability_malignant"] == pytest.approx(single["probability_malignant"], abs=1e-6)


def test_batch_reports_an_oversize_file_in_place(
    client: httpx.Client, image_bytes: dict[str, bytes], server: Any
) -> None:
    files = [
        ("files", ("big.jpg", os.urandom(server.settings.max_upload_bytes + 10), "image/jpeg")),
        ("files", ("ok.jpg", image_bytes[MELANOMA], "image/jpeg")),
    ]
    r = client.post("/predict/batch", params={"explain": "true"}, files=files)
    assert r.status_code == 200
    big, ok = r.json()["results"]
    assert big["status"] == "error" and big["status_code"] == 413
    assert ok["status"] == "ok" and ok["heatmap_png_base64"]


def test_batch_over_the_file_limit_is_rejected(
    client: httpx.Client, image_bytes: dict[str, bytes], server: Any
) -> None:
    n = server.settings.max_batch_files + 1
    files = [("files", (f"{i}.jpg", image_bytes[MELANOMA], "image/jpeg")) for i in range(n)]
    r = client.post("/predict/batch", files=files)
    assert r.status_code == 413
    assert str(server.settings.max_batch_files) in r.json()["detail"]


def test_batch_missing_field_is_422(client: httpx.Client, image_bytes: dict[str, bytes]) -> None:
    r = client.post("/predict/batch", files={"file": ("a.jpg", image_bytes[MELANOMA])})
    assert r.status_code == 422
    assert r.json()["detail"][0]["loc"] == ["body", "files"]


# -- a user's crop ---------------------------------------------------------------------------


def test_a_crop_is_answered_as_the_same_photo_cropped_beforehand(
    client: httpx.Client, image_bytes: dict[str, bytes], metadata: dict[str, Any]
) -> None:
    """`crop` (query or form field) assesses exactly that part: the answer is the one for the
    photo cropped before upload (lossless PNG, so the same pixels), and `image.crop` says it."""
    img = open_rgb(image_bytes[HAM])  # 200x150
    png = encode(img, "PNG")
    cropped = post_image(client, encode(img.crop((50, 30, 150, 105)), "PNG"), "c.png").json()
    by_query = client.post(
        "/predict",
        params={"crop": "0.25,0.2,0.5,0.5", "preview": "true"},
        files={"file": ("m.png", png, "image/png")},
    )
    by_form = client.post(
        "/predict",
        data={"crop": "0.25,0.2,0.5,0.5"},
        files={"file": ("m.png", png, "image/png")},
    )
    whole = post_image(client, png, "m.png").json()
    for r in (by_query, by_form):
        assert r.status_code == 200, r.text
        body = r.json()
        assert_ok_result(body, metadata)
        assert body["probability_malignant"] == cropped["probability_malignant"]
        assert body["image"] == {
            "width": 200,
            "height": 150,
            "crop": {"left": 50, "top": 30, "width": 100, "height": 75},
        }
    assert whole["probability_malignant"] != cropped["probability_malignant"]
    assert whole["image"] == {"width": 200, "height": 150}  # no crop asked, none reported
    # The preview (and so the page's photo under the heat map) is the part assessed.
    preview = open_rgb(base64.b64decode(by_query.json()["preview_jpeg_base64"]))
    assert preview.size == (100, 75)


@pytest.mark.parametrize(
    "crop",
    ["0.1,0.1,0.5", "a,b,c,d", "0.1,0.1,nan,0.5", "-0.1,0,0.5,0.5", "0.1,0.1,0,0.5", "2,0,1,1"],
)
def test_a_bad_crop_is_422_where_it_was_sent(
    client: httpx.Client, image_bytes: dict[str, bytes], crop: str
) -> None:
    """Not four numbers from 0 to 1 (width and height above 0): the 422 a bad query value
    gets, naming where it came from; the schema's pattern says the same."""
    pattern = client.get("/openapi.json").json()["paths"]["/predict"]["post"]["parameters"]
    [schema] = [q["schema"] for q in pattern if q["name"] == "crop"]
    assert not re.fullmatch(schema["anyOf"][0]["pattern"], crop)
    sent = (("query", {"params": {"crop": crop}}), ("body", {"data": {"crop": crop}}))
    for where, kwargs in sent:
        r = client.post("/predict", files={"file": ("m.jpg", image_bytes[MELANOMA])}, **kwargs)
        assert r.status_code == 422, r.text
        [error] = r.json()["detail"]
        assert error["loc"] == [where, "crop"] and error["input"] == crop


def test_a_crop_over_the_edge_is_moved_inside(
    client: httpx.Client, image_bytes: dict[str, bytes]
) -> None:
    png = encode(open_rgb(image_bytes[HAM]), "PNG")  # 200x150
    r = client.post("/predict", params={"crop": "0.75,0.9,0.5,0.4"}, files={"file": ("m.png", png)})
    assert r.status_code == 200, r.text
    assert r.json()["image"]["crop"] == {"left": 100, "top": 90, "width": 100, "height": 60}


def test_a_crop_sent_with_a_batch_is_refused(
    client: httpx.Client, image_bytes: dict[str, bytes]
) -> None:
    files = [("files", ("a.jpg", image_bytes[MELANOMA], "image/jpeg"))] * 2
    for kwargs in ({"params": {"crop": "0,0,0.5,0.5"}}, {"data": {"crop": "0,0,0.5,0.5"}}):
        r = client.post("/predict/batch", files=files, **kwargs)
        assert r.status_code == 422
        assert "/predict" in r.json()["detail"]


# -- privacy: nothing on disk by default -----------------------------------------------------
def test_uploads_are_not_written_to_disk_by_default(
    client: httpx.Client, server: Any, watched_tmpdir: Path
) -> None:
    assert server.settings.store_uploads_dir is None
    rng = np.random.default_rng(0)
    # Over 1 MB: the size at which Starlette's own form parser would spool to a temp file.
    data = encode(Image.fromarray(rng.integers(0, 255, (700, 700, 3), dtype=np.uint8)), "PNG")
    assert 1 * MB < len(data) < server.settings.max_upload_bytes
    before = sorted(watched_tmpdir.rglob("*"))
    r = post_image(client, data, "noise.png", "image/png")
    assert r.status_code == 200
    batch = client.post("/predict/batch", files=[("files", ("n.png", data, "image/png"))] * 2)
    assert batch.status_code == 200
    assert sorted(watched_tmpdir.rglob("*")) == before


@pytest.fixture(scope="module")
def storing_server(
    artifact_dir: Path, tmp_path_factory: pytest.TempPathFactory, server_factory: Any
) -> Iterator[Any]:
    """A second server whose operator opted in to keeping uploads."""
    store = tmp_path_factory.mktemp("stored-uploads")
    with server_factory(model_dir=artifact_dir, store_uploads_dir=store) as live:
        yield live


def test_opt_in_storage_keeps_a_metadata_free_copy(
    storing_server: Any, image_bytes: dict[str, bytes]
) -> None:
    store = Path(storing_server.settings.store_uploads_dir)
    exif = Image.Exif()
    exif[ExifTags.Base.Make] = "MARKER-CAMERA"
    exif.get_ifd(ExifTags.IFD.GPSInfo)[ExifTags.GPS.GPSLatitude] = (51.0, 30.0, 12.5)
    data = encode(open_rgb(image_bytes[HAM]), "JPEG", quality=95, exif=exif.tobytes())
    with storing_server.client() as c:
        r = post_image(c, data)
        assert r.status_code == 200
        assert post_image(c, b"not an image", "x.txt", "text/plain").status_code == 415
    request_id = r.json()["request_id"]

    stored = sorted(p for p in store.rglob("*") if p.is_file())
    assert [p.name for p in stored] == [f"{request_id}-0.jpg", f"{request_id}-0.json"]
    jpg, record = stored
    assert jpg.stat().st_mode & 0o777 == 0o600
    img = Image.open(jpg)
    assert img.size == (200, 150)
    assert len(img.getexif()) == 0 and b"MARKER-CAMERA" not in jpg.read_bytes()
    saved = json.loads(record.read_text())
    assert saved["request_id"] == request_id
    assert saved["probability_malignant"] == r.json()["probability_malignant"]
    assert "heatmap_png_base64" not in saved
