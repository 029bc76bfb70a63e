"""uvicorn with a graceful, bounded shutdown.

On SIGTERM/SIGINT: readiness answers 503 at once (``app.state.draining``), the server keeps
serving for ``shutdown_pre_stop_s`` so load balancers notice and stop sending, then stops
accepting connections, waits at most ``shutdown_drain_s`` for in-flight requests (slow
uploads are cut off by the body-read timeout meanwhile) and exits. A second signal during
the pre-stop delay skips the rest of it; a second SIGINT after it forces the exit.
"""

from __future__ import annotations

import logging
import signal
import threading
from types import FrameType
from typing import Any

import uvicorn
from fastapi import FastAPI

from app.settings import Settings

logger = logging.getLogger("app.server")


def uvicorn_config(app: FastAPI, settings: Settings, **overrides: Any) -> uvicorn.Config:
    """The production uvicorn configuration for ``settings``."""
    options: dict[str, Any] = {
        "host": settings.host,
        "port": settings.port,
        "log_config": None,  # keep the JSON logging configured by app.logs
        "log_level": settings.log_level,
        "access_log": False,  # RequestContextMiddleware logs each request with its id
        "server_header": False,
        # h11 enforces the header size limit while parsing (httptools has none); the
        # middleware's 431 check is the second line.
        "http": "h11",
        "h11_max_incomplete_event_size": settings.max_header_bytes,
        "timeout_graceful_shutdown": settings.shutdown_drain_s,
    }
    options.update(overrides)
    return uvicorn.Config(app, **options)


class DrainingServer(uvicorn.Server):
    """uvicorn.Server whose first exit signal starts a drain instead of stopping at once."""

    def __init__(self, config: uvicorn.Config, app: FastAPI, pre_stop_s: float) -> None:
        super().__init__(config)
        self.app = app
        self.pre_stop_s = pre_stop_s
        self._timer: threading.Timer | None = None

    def start_drain(self) -> None:
        """Readiness 503 now; stop accepting after the pre-stop delay."""
        self.app.state.draining = True
        metrics = getattr(self.app.state, "metrics", None)
        if metrics is not None:
            metrics.model_ready.set(0)
        logger.info("draining", extra={"fields": {"pre_stop_s": self.pre_stop_s}})
        self._timer = threading.Timer(self.pre_stop_s, self._stop)
        self._timer.daemon = True
        self._timer.start()

    def _stop(self) -> None:
        self.should_exit = True

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if sig not in (signal.SIGTERM, signal.SIGINT):  # pragma: no cover - uvicorn's set
            super().handle_exit(sig, frame)
            return
        if not getattr(self.app.state, "draining", False):
            self._captured_signals.append(sig)
            self.start_drain()
            return
        if self._timer is not None and not self.should_exit:
            self._timer.cancel()  # a second signal: skip the rest of the pre-stop delay
            self.should_exit = True
            return
        super().handle_exit(sig, frame)
