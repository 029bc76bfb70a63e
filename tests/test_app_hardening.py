"""Issue #11 against the real server: hostile sizes and shapes, the contract's edges, headers,
disconnects, the admission limit and the SIGTERM drain.

Timings are not asserted here (benchmarks/bench_abuse.py measures them); waits below only
bound how long a test may hang.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import io
import json
import os
import re
import signal
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import HTTPException
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
MELANOMA = "isic2017_melanoma_ISIC_0000002.jpg"


def claimed_giant_jpeg(side: int = 7000) -> bytes:
    """A valid ~630-byte JPEG header (16x16 of skin colour) whose SOF0 claims side x side."""
    buf = io.BytesIO()
    Image.new("RGB", (16, 16), (180, 120, 100)).save(buf, "JPEG", quality=90)
    data = bytearray(buf.getvalue())
    sof = data.find(b"\xff\xc0")
    data[sof + 5 : sof + 9] = struct.pack(">HH", side, side)
    return bytes(data)


def png(size: tuple[int, int], colour: tuple[int, int, int] = (180, 120, 100)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, "PNG")
    return buf.getvalue()


def metric(client: httpx.Client, name: str, **labels: str) -> float:
    """One sample of the server's /metrics (0 when absent)."""
    text = client.get("/metrics").text
    want = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    total = 0.0
    for line in text.splitlines():
        if not line.startswith(name):
            continue
        head, _, value = line.rpartition(" ")
        found = dict(re.findall(r'(\w+)="([^"]*)"', head))
        if all(found.get(k) == v for k, v in labels.items()) and (want or "{" not in head):
            total += float(value)
    return total


# -- memory: what the header claims costs nothing ---------------------------------------------
def test_a_tiny_jpeg_claiming_49_megapixels_is_answered_from_a_reduced_decode(
    client: httpx.Client,
) -> None:
    data = claimed_giant_jpeg()
    assert len(data) < 1000
    r = client.post("/predict", files={"file": ("big.jpg", data, "image/jpeg")})
    assert r.status_code == 200, r.text
    assert r.json()["image"] == {"width": 7000, "height": 7000}  # the size as uploaded


def test_a_png_over_the_full_decode_cap_is_415(client: httpx.Client) -> None:
    r = client.post("/predict", files={"file": ("big.png", png((7000, 7000)), "image/png")})
    assert r.status_code == 415
    assert "pixels" in r.json()["detail"]
    assert r.headers["cache-control"] == "no-store"


def test_a_long_strip_is_unable_to_assess_with_advice(client: httpx.Client) -> None:
    r = client.post("/predict", files={"file": ("strip.png", png((4000, 80)), "image/png")})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["status"] == "unable_to_assess"
    assert body["probability_malignant"] is None
    assert "odd_shape" in [reason["code"] for reason in body["reasons"]]
    assert "strip" in body["advice"]


# -- the contract's edges --------------------------------------------------------------------
def _multipart(boundary: str, parts: list[tuple[str, str | None, bytes]], close: bool) -> bytes:
    out = b""
    for name, filename, data in parts:
        disposition = f'form-data; name="{name}"' + (
            f'; filename="{filename}"' if filename is not None else ""
        )
        out += f"--{boundary}\r\nContent-Disposition: {disposition}\r\n\r\n".encode() + data
        out += b"\r\n"
    return out + (f"--{boundary}--\r\n".encode() if close else b"")


def test_multipart_without_its_closing_boundary_is_400(
    client: httpx.Client, image_bytes: dict[str, bytes]
) -> None:
    body = _multipart("b0undary", [("file", "m.jpg", image_bytes[MELANOMA])], close=False)
    headers = {"content-type": "multipart/form-data; boundary=b0undary"}
    r = client.post("/predict", content=body, headers=headers)
    assert r.status_code == 400
    assert "closing boundary" in r.json()["detail"]
    closed = _multipart("b0undary", [("file", "m.jpg", image_bytes[MELANOMA])], close=True)
    assert client.post("/predict", content=closed, headers=headers).status_code == 200


@pytest.mark.parametrize("value", ["{}", "maybe", "2"])
def test_a_non_boolean_form_flag_is_422_like_the_query(
    client: httpx.Client, image_bytes: dict[str, bytes], value: str
) -> None:
    photo = {"file": ("m.jpg", image_bytes[MELANOMA], "image/jpeg")}
    r = client.post("/predict", files=photo, data={"preview": value})
    assert r.status_code == 422
    assert r.json()["detail"][0]["loc"] == ["body", "preview"]
    assert client.post("/predict", files=photo, params={"preview": value}).status_code == 422
    ok = client.post("/predict", files=photo, data={"preview": "true"})
    assert ok.status_code == 200 and "preview_jpeg_base64" in ok.json()


def test_a_form_flag_sent_twice_is_422(client: httpx.Client, image_bytes: dict[str, bytes]) -> None:
    photo = ("file", ("m.jpg", image_bytes[MELANOMA], "image/jpeg"))
    r = client.post(
        "/predict", files=[photo, ("explain", (None, b"true")), ("explain", (None, b"false"))]
    )
    assert r.status_code == 422


def test_empty_file_parts_are_422_as_the_schema_says(
    client: httpx.Client, image_bytes: dict[str, bytes]
) -> None:
    r = client.post("/predict", files={"file": ("e.jpg", b"", "image/jpeg")})
    assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", "file"]
    files = [
        ("files", ("a.jpg", image_bytes[MELANOMA], "image/jpeg")),
        ("files", ("b.jpg", b"", "image/jpeg")),
    ]
    r = client.post("/predict/batch", files=files)
    assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", "files", 1]
    schema = client.get("/openapi.json").json()["paths"]
    single = schema["/predict"]["post"]["requestBody"]["content"]["multipart/form-data"]
    batch = schema["/predict/batch"]["post"]["requestBody"]["content"]["multipart/form-data"]
    assert single["schema"]["properties"]["file"]["minLength"] == 1
    assert batch["schema"]["properties"]["files"]["minItems"] == 1
    assert batch["schema"]["properties"]["files"]["items"]["minLength"] == 1


def test_a_file_field_sent_as_text_is_422(client: httpx.Client) -> None:
    r = client.post("/predict", files={"file": (None, b"{}")})
    assert r.status_code == 422
    assert "file upload" in r.json()["detail"][0]["msg"]


def test_assess_documents_its_html_errors(client: httpx.Client) -> None:
    op = client.get("/openapi.json").json()["paths"]["/assess"]["post"]
    assert {"200", "400", "413", "415", "422", "503"} <= op["responses"].keys()
    assert "multipart/form-data" in op["requestBody"]["content"]
    r = client.post("/assess")
    assert r.status_code == 422 and r.headers["content-type"].startswith("text/html")


# -- headers and information -----------------------------------------------------------------
def test_errors_are_never_cached(client: httpx.Client) -> None:
    r = client.post("/predict", content=b"x", headers={"content-type": "text/plain"})
    assert r.status_code == 415
    assert r.headers["cache-control"] == "no-store"
    assert client.get("/no-such-page").headers["cache-control"] == "no-store"


def test_docs_page_has_a_csp_that_allows_exactly_its_inline_script(client: httpx.Client) -> None:
    r = client.get("/docs")
    assert r.status_code == 200
    csp = r.headers["content-security-policy"]
    assert "frame-ancestors 'none'" in csp and r.headers["x-frame-options"] == "DENY"
    [script] = re.findall(r"<script>(.*?)</script>", r.text, re.DOTALL)
    digest = base64.b64encode(hashlib.sha256(script.encode()).digest()).decode()
    assert f"'sha256-{digest}'" in csp
    assert "unsafe-eval" not in csp and "script-src 'self' 'sha256-" in csp


def test_model_metadata_hides_command_lines_and_machine_paths(client: httpx.Client) -> None:
    from app.routers.model import public_metadata

    raw = {
        "training": {
            "command": "python -m model_training sweep --data-dir /home/alice/data",
            "export_command": "python -m model_training export --out models/default",
            "data_dir": "/home/alice/data",
            "seed": 1234,
            "data": [{"dataset": "isic2017", "images": 10}],
            "paths": ["C:\\runs\\x", "runs/relative"],
        },
        "version": "1.0.0",
    }
    public = public_metadata(raw)
    assert public == {
        "training": {
            "seed": 1234,
            "data": [{"dataset": "isic2017", "images": 10}],
            "paths": ["runs/relative"],
        },
        "version": "1.0.0",
    }
    text = client.get("/model").text
    assert "command" not in text and '"/' not in text


def test_oversized_request_headers_are_431(client: httpx.Client) -> None:
    r = client.get("/health/live", headers={"X-Padding": "a" * 40_000})
    assert r.status_code == 431
    assert r.headers["cache-control"] == "no-store"


# -- disconnects -----------------------------------------------------------------------------
def test_a_client_that_hangs_up_mid_upload_is_client_closed_not_a_server_error(
    client: httpx.Client, server: Any
) -> None:
    before_500 = metric(client, "triage_http_requests_total", route="/predict", status="500")
    before = metric(client, "triage_http_requests_total", route="/predict", status="client_closed")
    host, port = server.base_url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(
            b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n"
            b"Content-Type: multipart/form-data; boundary=b0undary\r\n\r\n"
            b'--b0undary\r\nContent-Disposition: form-data; name="file"; filename="a.jpg"\r\n\r\n'
            + b"\xff"
            * 1000
        )
        time.sleep(0.3)  # let the server start reading the body
    deadline = time.monotonic() + 20
    while (
        metric(client, "triage_http_requests_total", route="/predict", status="client_closed")
        == before
    ):
        assert time.monotonic() < deadline, "the disconnect was never recorded"
        time.sleep(0.1)
    after_500 = metric(client, "triage_http_requests_total", route="/predict", status="500")
    assert after_500 == before_500


# -- admission -------------------------------------------------------------------------------
def test_the_queue_answers_503_with_retry_after_when_full() -> None:
    from app.admission import Admission
    from app.metrics import Metrics

    async def scenario() -> tuple[HTTPException, int]:
        admission = Admission(max_active=1, max_queued=1, retry_after_s=7, metrics=Metrics())
        release = asyncio.Event()

        async def hold() -> None:
            async with admission.slot():
                await release.wait()

        holder = asyncio.create_task(hold())
        waiter = asyncio.create_task(hold())
        while admission.active < 1 or admission.waiting < 1:
            await asyncio.sleep(0)
        with pytest.raises(HTTPException) as refused:
            async with admission.slot():
                pass
        release.set()
        await asyncio.gather(holder, waiter)
        return refused.value, admission.active + admission.waiting

    # In a fresh thread: the session's Playwright browser keeps an event loop running here.
    with ThreadPoolExecutor(max_workers=1) as pool:
        refused, left = pool.submit(asyncio.run, scenario()).result()
    assert refused.status_code == 503
    assert refused.headers == {"Retry-After": "7"}
    assert left == 0


# -- slow bodies and the SIGTERM drain (the real entry point, `python -m app`) ----------------
def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@pytest.fixture
def entry_point(artifact_dir: Path) -> Iterator[tuple[subprocess.Popen[str], str]]:
    """`python -m app` with a 2 s pre-stop delay and a short body timeout."""
    port = _free_port()
    env = {
        **os.environ,
        "TRIAGE_MODEL_DIR": str(artifact_dir),
        "HOST": "127.0.0.1",
        "PORT": str(port),
        "TRIAGE_SHUTDOWN_PRE_STOP_S": "2",
        "TRIAGE_SHUTDOWN_DRAIN_S": "20",
        "TRIAGE_BODY_TIMEOUT_S": "4",
        "TRIAGE_BODY_RATE_GRACE_S": "1",
    }
    proc = subprocess.Popen(
        [sys.executable, "-m", "app"], cwd=REPO, env=env, stderr=subprocess.PIPE, text=True
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            assert proc.poll() is None, proc.communicate()[1]
            try:
                if httpx.get(f"{base}/health/ready").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "server did not become ready"
            time.sleep(0.2)
        yield proc, base
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate(timeout=30)


def _slow_upload(base: str) -> socket.socket:
    host, port = base.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)), timeout=30)
    sock.sendall(
        b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Length: 1000000\r\n"
        b"Content-Type: multipart/form-data; boundary=b0undary\r\n\r\n--b0undary\r\n"
    )
    return sock


def test_sigterm_flips_readiness_keeps_serving_cuts_slow_uploads_and_exits(
    entry_point: tuple[subprocess.Popen[str], str], image_bytes: dict[str, bytes]
) -> None:
    proc, base = entry_point
    slow = _slow_upload(base)
    photo = {"file": ("m.jpg", image_bytes[MELANOMA], "image/jpeg")}
    with httpx.Client(base_url=base, timeout=30) as client:
        proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 10
        while client.get("/health/ready").status_code != 503:
            assert time.monotonic() < deadline, "readiness never turned 503"
            time.sleep(0.05)
        # Still serving during the pre-stop delay: the load balancer has not noticed yet.
        assert client.get("/health/live").status_code == 200
        assert client.post("/predict", files=photo).status_code == 200
    # The slow upload is cut off by the body timeout (408), not waited for.
    answer = slow.recv(4096)
    slow.close()
    assert answer.startswith(b"HTTP/1.1 408"), answer[:200]
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode in (0, -signal.SIGTERM)
    messages = [json.loads(line)["msg"] for line in stderr.splitlines() if line.startswith("{")]
    assert "draining" in messages and "Application shutdown complete." in messages
