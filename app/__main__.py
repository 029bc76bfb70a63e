"""``python -m app``: serve with uvicorn on the configured host and port."""

from __future__ import annotations

import os

# TensorFlow's C++ INFO/WARNING lines bypass Python logging and would break one-JSON-object-
# per-line logs; errors still show. Must be set before TensorFlow is imported.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import uvicorn

from app.logs import configure_logging
from app.main import create_app
from app.settings import Settings


def main() -> None:
    """Read settings from the environment, set up logging and run uvicorn."""
    settings = Settings()
    configure_logging(settings.log_level, settings.log_json)
    uvicorn.run(
        create_app(settings),
        host=settings.host,
        port=settings.port,
        log_config=None,  # keep the JSON logging configured above
        log_level=settings.log_level,
        access_log=False,  # RequestContextMiddleware logs each request with its id
        server_header=False,
    )


if __name__ == "__main__":
    main()
