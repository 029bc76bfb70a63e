"""Shared fixtures: a tiny real model artifact and real uvicorn servers serving it.

Nothing is mocked: the artifact is exported by the project's real exporter
(``model_training.testing.make_tiny_artifact``), and the server is uvicorn on a loopback port
running ``app.main.create_app``, driven over HTTP with httpx.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from tests.deploy_files import Instruction, read_compose_api, read_dockerfile

# Quieter TensorFlow C++ logging in test output; must precede the first TF import.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

FIXTURES = Path(__file__).parent / "fixtures"
IMAGES = FIXTURES / "images"
MB = 1024 * 1024
READY_TIMEOUT_S = 120.0


@dataclass
class LiveServer:
    """A running server: its base URL and the settings it was started with."""

    base_url: str
    settings: object  # app.settings.Settings (kept untyped: app imports stay lazy)
    app: object

    def client(self, **kwargs: object) -> httpx.Client:
        """An HTTP client for this server."""
        return httpx.Client(base_url=self.base_url, timeout=60.0, **kwargs)  # type: ignore[arg-type]


def fixture_validation() -> tuple[list[str], np.ndarray, list[str], list[str]]:
    """The fixture photos as a labelled 'validation' set (malignant = melanoma in the name)."""
    paths = sorted(str(p) for p in IMAGES.glob("*.jpg"))
    names = [Path(p).name for p in paths]
    y = np.array([1 if "melanoma" in n else 0 for n in names])
    sets = [n.split("_")[0] for n in names]
    domains = ["phone" if s == "pad-ufes-20" else "dermoscopy" for s in sets]
    return paths, y, sets, domains


def _loopback_socket() -> socket.socket:
    """A bound loopback socket on a free port, handed to uvicorn (no bind race)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    return sock


@contextmanager
def run_server(**settings_kwargs: object) -> Iterator[LiveServer]:
    """Start uvicorn with ``create_app(Settings(**settings_kwargs))`` in a thread."""
    import uvicorn

    from app.main import create_app
    from app.settings import Settings

    sock = _loopback_socket()
    port = sock.getsockname()[1]
    settings = Settings(host="127.0.0.1", port=port, **settings_kwargs)  # type: ignore[arg-type]
    app = create_app(settings)
    config = uvicorn.Config(app, log_level="warning", access_log=False, lifespan="on")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    base_url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + READY_TIMEOUT_S
        while True:
            if not thread.is_alive():
                raise RuntimeError("the test server exited during start-up (see the log)")
            try:
                if httpx.get(f"{base_url}/health/ready", timeout=2.0).status_code == 200:
                    break
            except httpx.TransportError:
                pass  # not listening yet: uvicorn binds after the lifespan has loaded the model
            if time.monotonic() > deadline:
                raise RuntimeError(f"server not ready within {READY_TIMEOUT_S} s")
            time.sleep(0.1)
        yield LiveServer(base_url=base_url, settings=settings, app=app)
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        sock.close()


@pytest.fixture(scope="session")
def artifact_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny real artifact (64x64 input, temperature 1.5, threshold 0.4) for the session."""
    from model_training.testing import make_tiny_artifact

    return make_tiny_artifact(tmp_path_factory.mktemp("artifact") / "tiny")


@pytest.fixture(scope="session")
def watched_tmpdir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """Redirect this process's temporary files here, so a test can prove nothing was written.

    The server runs in this process: anything it spooled to a temporary file (as Starlette's
    own form parser does for uploads over 1 MB) would land here.
    """
    tmp_path_factory.getbasetemp()  # fix pytest's own base before redirecting
    path = tmp_path_factory.mktemp("watched-tmp")
    old_env, old_tempdir = os.environ.get("TMPDIR"), tempfile.tempdir
    os.environ["TMPDIR"] = str(path)
    tempfile.tempdir = str(path)
    try:
        yield path
    finally:
        tempfile.tempdir = old_tempdir
        if old_env is None:
            os.environ.pop("TMPDIR", None)
        else:
            os.environ["TMPDIR"] = old_env


@pytest.fixture(scope="session")
def server(artifact_dir: Path, watched_tmpdir: Path) -> Iterator[LiveServer]:
    """The main test server: defaults except small limits, so limit tests stay cheap."""
    with run_server(
        model_dir=artifact_dir,
        max_upload_bytes=2 * MB,
        max_batch_files=4,
        max_batch_bytes=5 * MB,
        heatmap_max_side=512,
        store_uploads_dir=None,
    ) as live:
        yield live


@pytest.fixture(scope="session")
def server_factory() -> Callable[..., AbstractContextManager[LiveServer]]:
    """``with server_factory(model_dir=..., **settings) as live:`` starts another server."""
    return run_server


@pytest.fixture
def client(server: LiveServer) -> Iterator[httpx.Client]:
    """An httpx client bound to the main test server."""
    with server.client() as c:
        yield c


@pytest.fixture(scope="session")
def image_bytes() -> dict[str, bytes]:
    """The fixture photos by file name."""
    return {p.name: p.read_bytes() for p in sorted(IMAGES.glob("*.jpg"))}


@pytest.fixture
def artifact_copy(artifact_dir: Path, tmp_path: Path) -> Callable[..., Path]:
    """Factory: a private copy of the tiny artifact with metadata fields replaced."""

    def make(name: str = "copy", **metadata_updates: object) -> Path:
        dest = tmp_path / name
        shutil.copytree(artifact_dir, dest)
        meta_path = dest / "metadata.json"
        meta = json.loads(meta_path.read_text())
        meta.update(metadata_updates)
        meta_path.write_text(json.dumps(meta, indent=2))
        return dest

    return make


# --- Real-browser tests: Debian's Chromium driven by Playwright, and their screenshots. ---

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def browser() -> Iterator[object]:
    """One headless Chromium for the session: Debian's (CHROMIUM_PATH, or `chromium` on PATH).

    Playwright only drives it; it never downloads a browser. Skipped where there is none.
    """
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


@pytest.fixture(scope="session")
def screenshot_dir() -> Path:
    """Where browser tests save screenshots: ``<artifacts>/screenshots``.

    ``<artifacts>`` is ``$TEST_ARTIFACTS_DIR`` if set, else ``test-artifacts/`` at the repo root
    (git-ignored).
    """
    root = Path(os.environ.get("TEST_ARTIFACTS_DIR") or REPO_ROOT / "test-artifacts")
    path = root / "screenshots"
    path.mkdir(parents=True, exist_ok=True)
    return path


@pytest.fixture(scope="session")
def screenshot(screenshot_dir: Path) -> Callable[[object, str], Path]:
    """``screenshot(page, "name.png")`` saves a full-page PNG and returns its path."""

    def take(page: object, name: str) -> Path:
        path = screenshot_dir / name
        page.screenshot(path=str(path), full_page=True)  # type: ignore[attr-defined]
        return path

    return take


@pytest.fixture(scope="module")
def dockerfile() -> list[Instruction]:
    """The parsed Dockerfile."""
    return read_dockerfile()


@pytest.fixture(scope="module")
def compose_api() -> dict[str, Any]:
    """The `api` service of docker-compose.yml."""
    return read_compose_api()
