"""``python -m app``: serve with uvicorn on the configured host and port."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

# TensorFlow's C++ INFO/WARNING lines bypass Python logging and would break one-JSON-object-
# per-line logs; errors still show. Must be set before TensorFlow is imported.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


@contextlib.contextmanager
def _native_stderr_muted() -> Iterator[None]:
    """Silence file descriptor 2 (not Python's sys.stderr objects) for the duration.

    TensorFlow 2.21's native start-up banner ("All log messages before absl::InitializeLog()
    ...", the oneDNN notice) is written at import time regardless of TF_CPP_MIN_LOG_LEVEL and
    is not JSON. An import *error* still surfaces: it is a Python exception, raised after the
    descriptor is restored.
    """
    saved = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def main() -> None:
    """Read settings from the environment, set up logging and run uvicorn."""
    from app.memory import limit_arenas
    from app.settings import Settings

    settings = Settings()
    # Before TensorFlow and the worker threads exist: glibc creates arenas lazily, per thread.
    limit_arenas(settings.malloc_arena_max)
    # Imported here, after muting TensorFlow's banner (app.model imports TensorFlow).
    if os.environ.get("TRIAGE_LOG_JSON", "true").strip().lower() not in ("0", "false", "no"):
        with _native_stderr_muted():
            import tensorflow  # noqa: F401

    from app.logs import configure_logging
    from app.main import create_app
    from app.server import DrainingServer, uvicorn_config

    configure_logging(settings.log_level, settings.log_json)
    app = create_app(settings)
    server = DrainingServer(uvicorn_config(app, settings), app, settings.shutdown_pre_stop_s)
    server.run()


if __name__ == "__main__":
    main()
