# Skin-lesion triage API: CPU TensorFlow, serving dependencies only (no `train` extra, no dev
# tools), runs as a non-root user and never writes uploads anywhere.
#
#   docker build -t skin-lesion-triage .
#   docker run --rm -p 8000:8000 --read-only --tmpfs /tmp skin-lesion-triage
#
# or `docker compose up --build` (docker-compose.yml). Settings come from TRIAGE_* environment
# variables, see app/settings.py. tests/test_deploy.py checks this file statically.
FROM python:3.11-slim-bookworm

ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    TF_CPP_MIN_LOG_LEVEL=2 \
    HOME=/tmp

WORKDIR /srv/triage

# Python code and packaging metadata first: the dependency layer is rebuilt only when they
# change, not when the model or the templates do.
COPY pyproject.toml README.md ./
COPY app/ ./app/
COPY model_training/ ./model_training/
RUN pip install --no-cache-dir . \
    && rm -rf build ./*.egg-info \
    && python -m compileall -q app model_training

COPY templates/ ./templates/
COPY static/ ./static/
COPY models/ ./models/

# Unprivileged user; the code and the model stay owned by root, so read-only to the server.
RUN useradd --system --uid 10001 --user-group --no-create-home --shell /usr/sbin/nologin triage
USER 10001:10001

# Bind every interface inside the container; the port is fixed here, map it with -p/ports.
ENV HOST=0.0.0.0 \
    PORT=8000
EXPOSE 8000

# Ready = model loaded and warmed up (503 before). Slim has no curl: python's urllib, which
# exits non-zero on a refused connection, a timeout or any non-2xx answer.
HEALTHCHECK --interval=30s --timeout=5s --start-period=90s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; port = os.environ.get('TRIAGE_PORT') or os.environ.get('PORT') or '8000'; urllib.request.urlopen(f'http://127.0.0.1:{port}/health/ready', timeout=4)"]

# Same command as `make run`; uvicorn stops cleanly on SIGTERM (`docker stop`).
CMD ["python", "-m", "app"]
