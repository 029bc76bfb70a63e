# Quick start: `make run` serves the shipped model; `make test` runs the whole suite.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
HOST ?= 127.0.0.1
PORT ?= 8000

.PHONY: run test lint typecheck install install-dev clean docker-test

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade "pip>=25.1"

# Serving dependencies only (what the Docker image has too).
$(VENV)/.installed-run: pyproject.toml | $(VENV)/bin/python
	$(PY) -m pip install --quiet -e .
	touch $@

# Training extra and dev tools on top.
$(VENV)/.installed-dev: pyproject.toml | $(VENV)/bin/python
	$(PY) -m pip install --quiet -e ".[train]" --group dev
	touch $(VENV)/.installed-run $@

install: $(VENV)/.installed-run
install-dev: $(VENV)/.installed-dev

run: $(VENV)/.installed-run
	HOST=$(HOST) PORT=$(PORT) $(PY) -m app

lint: $(VENV)/.installed-dev
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

typecheck: $(VENV)/.installed-dev
	$(PY) -m mypy

test: $(VENV)/.installed-dev lint typecheck
	$(PY) -m pytest

# The image, docker-compose.yml and the Swarm stack tested on a real engine (needs root or a
# running engine; ~10-15 min on 2 cores from scratch): see deploy/docker-test.sh.
docker-test:
	bash deploy/docker-test.sh

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
