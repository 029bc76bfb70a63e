"""The API docs page works offline: Swagger UI comes from the app, not a CDN."""

from __future__ import annotations

import json
import re

import httpx


def test_docs_page_uses_only_local_assets(client: httpx.Client) -> None:
    page = client.get("/docs")
    assert page.status_code == 200
    sources = re.findall(r"""(?:src|href)=['"]([^'"]+)['"]""", page.text)
    assert sources, "the docs page should reference its script and stylesheet"
    assert all(s.startswith("/") for s in sources), sources
    for asset in ("/docs-assets/swagger-ui-bundle.js", "/docs-assets/swagger-ui.css"):
        assert asset in sources
        response = client.get(asset)
        assert response.status_code == 200 and len(response.content) > 10_000
    assert "/openapi.json" in page.text


def test_openapi_lists_every_endpoint_with_examples(client: httpx.Client) -> None:
    spec = client.get("/openapi.json").json()
    paths = spec["paths"]
    for path in ("/predict", "/predict/batch", "/model", "/health/live", "/health/ready"):
        assert path in paths, path
    assert "/metrics" in paths
    # Every JSON response model documents an example (shown in the docs page).
    schemas = spec["components"]["schemas"]
    for name in ("PredictionResult", "BatchResponse", "ModelInfo", "ErrorResponse"):
        assert "example" in json.dumps(schemas[name]).lower(), name
