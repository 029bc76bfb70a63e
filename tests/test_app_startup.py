"""Start-up behaviour: readiness, fail-fast on a bad artifact, and metadata-driven behaviour."""

from __future__ import annotations

import asyncio
import json
import math
import os
import subprocess
import sys
import time
from collections.abc import Callable, Coroutine
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

import httpx
import numpy as np
import pytest

from app.main import create_app
from app.metadata import ModelLoadError
from app.model import TriageModel
from app.settings import Settings

REPO = Path(__file__).resolve().parent.parent
T = TypeVar("T")


def run_async(coro: Coroutine[Any, Any, T]) -> T:
    """asyncio.run in a fresh thread: the session's Playwright browser keeps a loop running."""
    with ThreadPoolExecutor(max_workers=1) as pool:
        return pool.submit(asyncio.run, coro).result()


def test_not_ready_until_the_lifespan_has_loaded_the_model(artifact_dir: Path) -> None:
    """Before the lifespan has run, the app answers 503 with a JSON detail, and is live."""
    app = create_app(Settings(model_dir=artifact_dir))

    async def probe() -> dict[str, httpx.Response]:
        # ASGITransport does not run the lifespan: this is the app before start-up finished.
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as c:
            return {
                "live": await c.get("/health/live"),
                "ready": await c.get("/health/ready"),
                "predict": await c.post("/predict", files={"file": ("a.jpg", b"x")}),
                "model": await c.get("/model"),
                "page": await c.get("/"),
            }

    answers = run_async(probe())
    assert answers["live"].status_code == 200
    for name in ("ready", "predict", "model"):
        assert answers[name].status_code == 503, name
        assert "not loaded" in answers[name].json()["detail"]
        assert answers[name].headers["retry-after"]
    assert answers["page"].status_code == 200 and "starting" in answers["page"].text


def test_ready_flips_with_the_lifespan(artifact_dir: Path) -> None:
    app = create_app(Settings(model_dir=artifact_dir))

    async def run() -> tuple[int, int, int]:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as c:
            before = (await c.get("/health/ready")).status_code
            async with app.router.lifespan_context(app):
                during = (await c.get("/health/ready")).status_code
            after = (await c.get("/health/ready")).status_code
        return before, during, after

    assert run_async(run()) == (503, 200, 503)


def _run_app(env: dict[str, str], timeout: float = 90) -> subprocess.CompletedProcess[str]:
    full_env = {**os.environ, "TRIAGE_LOG_JSON": "true", "PORT": "0", **env}
    return subprocess.run(
        [sys.executable, "-m", "app"],
        cwd=REPO,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def _critical_line(stderr: str) -> dict[str, Any]:
    for line in stderr.splitlines():
        if line.startswith("{") and '"critical"' in line:
            record: dict[str, Any] = json.loads(line)
            return record
    raise AssertionError(f"no critical JSON log line in:\n{stderr}")


def test_missing_model_dir_fails_fast_with_a_clear_log(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-model"
    proc = _run_app({"TRIAGE_MODEL_DIR": str(missing)})
    assert proc.returncode == 3  # uvicorn's "startup failed" status
    record = _critical_line(proc.stderr)
    assert record["msg"] == "model failed to load; refusing to start"
    assert str(missing) in record["error"] and "does not exist" in record["error"]
    assert "Application startup failed" in proc.stderr


def test_python_dash_m_app_serves_with_json_logs(artifact_dir: Path) -> None:
    """The entry point `make run` and Docker use: binds HOST/PORT, logs one JSON per line."""
    import socket

    with socket.socket() as probe:  # a free port (released just before the server binds it)
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = {**os.environ, "TRIAGE_MODEL_DIR": str(artifact_dir), "HOST": "127.0.0.1"}
    env["PORT"] = str(port)
    proc = subprocess.Popen(
        [sys.executable, "-m", "app"],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 90
        while True:
            assert proc.poll() is None, proc.communicate()[1]
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health/ready").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "server did not become ready"
            time.sleep(0.2)
        r = httpx.get(f"http://127.0.0.1:{port}/model", headers={"X-Request-ID": "entry-1"})
        assert r.status_code == 200 and r.headers["x-request-id"] == "entry-1"
    finally:
        proc.terminate()
        _, stderr = proc.communicate(timeout=30)
    entries = [json.loads(line) for line in stderr.splitlines() if line.startswith("{")]
    messages = [e["msg"] for e in entries]
    assert "model ready" in messages
    # Graceful shutdown on SIGTERM (uvicorn then re-raises the signal, hence -15).
    assert "Application shutdown complete." in messages
    assert proc.returncode in (0, -15)
    access = [e for e in entries if e["msg"] == "request" and e.get("request_id") == "entry-1"]
    assert access and access[0]["path"] == "/model" and access[0]["status"] == 200
    # Every line is one JSON object: TensorFlow's native start-up banner is muted too.
    for line in stderr.splitlines():
        assert isinstance(json.loads(line), dict), line


def test_artifact_that_disagrees_with_its_metadata_fails_fast(
    artifact_copy: Callable[..., Path],
) -> None:
    bad = artifact_copy(input={"height": 32, "width": 32, "channels": 3, "color": "RGB"})
    proc = _run_app({"TRIAGE_MODEL_DIR": str(bad)})
    assert proc.returncode == 3
    assert "metadata says [batch, 32, 32, 3]" in _critical_line(proc.stderr)["error"]


@pytest.mark.parametrize(
    ("updates", "message"),
    [
        ({"schema_version": 2}, "schema_version"),
        ({"labels": ["benign"]}, "labels"),
        ({"positive_label": "cancer"}, "positive_label"),
        ({"threshold": 1.5}, "threshold"),
        ({"temperature": 0}, "temperature"),
        ({"endpoints": {"serve": ["logit"], "explain": ["logit"]}}, "heatmap"),
        (
            {
                "risk_tiers": [
                    {"name": "a", "lower": 0, "upper": 0.3},
                    {"name": "b", "lower": 0.4, "upper": 1},
                ]
            },
            "contiguous",
        ),
        ({"risk_tiers": [{"name": "a", "lower": 0.1, "upper": 1}]}, "start at 0"),
        ({"tta": {"enabled": True, "flips": ["diagonal"]}}, "tta.flips"),
        ({"ood": {"file": "ood.npz"}}, "ood"),
    ],
)
def test_invalid_metadata_is_refused(
    artifact_copy: Callable[..., Path], updates: dict[str, Any], message: str
) -> None:
    with pytest.raises(ModelLoadError, match=message):
        TriageModel.load(artifact_copy(**updates))


def test_missing_saved_model_is_refused(artifact_copy: Callable[..., Path]) -> None:
    model_dir = artifact_copy()
    (model_dir / "saved_model" / "saved_model.pb").unlink()
    with pytest.raises(ModelLoadError, match="not a SavedModel"):
        TriageModel.load(model_dir)


def test_gate_requested_by_metadata_must_be_loadable(artifact_copy: Callable[..., Path]) -> None:
    """An artifact that asks for the OOD gate without its statistics file does not start."""
    from app.gates import build_gates

    model_dir = artifact_copy(ood={"file": "ood.npz", "method": "mahalanobis", "threshold": 10.0})
    model = TriageModel.load(model_dir)
    with pytest.raises(ModelLoadError, match=r"ood"):
        build_gates(model.metadata, model_dir)


def _logits(model_dir: Path, batch: np.ndarray) -> np.ndarray:
    import tensorflow as tf

    saved = tf.saved_model.load(str(model_dir / "saved_model"))
    return np.asarray(saved.serve(tf.constant(batch))["logit"])


def test_threshold_temperature_and_tiers_come_from_metadata(
    artifact_copy: Callable[..., Path],
) -> None:
    batch = np.random.default_rng(0).uniform(0, 255, (3, 64, 64, 3)).astype(np.float32)
    tiers = [
        {"name": "green", "lower": 0.0, "upper": 0.05},
        {"name": "amber", "lower": 0.05, "upper": 0.07},
        {"name": "red", "lower": 0.07, "upper": 1.0},
    ]
    model = TriageModel.load(
        artifact_copy(temperature=3.0, threshold=0.07, risk_tiers=tiers, version="9.9.9")
    )
    model.warm_up()
    out = model.infer(batch)
    expected = 1.0 / (1.0 + np.exp(-_logits(model.model_dir, batch) / 3.0))
    np.testing.assert_allclose(out.probabilities, expected, rtol=1e-6)
    assert model.metadata.version == "9.9.9"
    for p in out.probabilities:
        assert model.label_for(float(p)) == "malignant"  # every p is above 0.07
        assert model.tier_for(float(p)).name == "red"
    assert model.label_for(0.069) == "benign" and model.tier_for(0.06).name == "amber"
    assert model.tier_for(1.0).name == "red" and model.tier_for(0.0).name == "green"
    assert [model.tier_position(model.tier_for(p)) for p in (0.01, 0.06, 0.5)] == [
        "lowest",
        "between",
        "above",
    ]


def test_tta_averages_logits_over_flips(artifact_copy: Callable[..., Path]) -> None:
    batch = np.random.default_rng(1).uniform(0, 255, (2, 64, 64, 3)).astype(np.float32)
    model_dir = artifact_copy(tta={"enabled": True, "flips": ["horizontal", "vertical"]})
    model = TriageModel.load(model_dir)
    out = model.infer(batch)
    views = np.concatenate([batch, batch[:, :, ::-1], batch[:, ::-1]])
    expected = _logits(model_dir, np.ascontiguousarray(views)).reshape(3, 2).mean(axis=0)
    np.testing.assert_allclose(out.logits, expected, rtol=1e-5)
    assert out.embeddings is not None and out.embeddings.shape[0] == 2
    assert not math.isclose(float(out.logits[0]), float(_logits(model_dir, batch)[0]), rel_tol=1e-9)


def test_tta_serves_every_view_evaluation_measures(artifact_copy: Callable[..., Path]) -> None:
    """The server accepts exactly the views `model_training.evaluate --tta` measures."""
    from model_training.evaluate import TTA_VIEWS

    flips = [v for v in TTA_VIEWS if v != "identity"]
    batch = np.random.default_rng(2).uniform(0, 255, (2, 64, 64, 3)).astype(np.float32)
    model_dir = artifact_copy(tta={"enabled": True, "flips": flips})
    out = TriageModel.load(model_dir).infer(batch)
    views = np.concatenate([batch, batch[:, :, ::-1], batch[:, ::-1], batch.transpose(0, 2, 1, 3)])
    expected = _logits(model_dir, np.ascontiguousarray(views)).reshape(4, 2).mean(axis=0)
    np.testing.assert_allclose(out.logits, expected, rtol=1e-5)
