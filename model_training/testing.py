"""Tiny real artifacts for tests, made by the real exporter (no mocks)."""

from __future__ import annotations

from pathlib import Path

from model_training.export import base_metadata, export_artifact
from model_training.model import build_tiny_classifier


def make_tiny_artifact(
    dest_dir: Path, input_size: tuple[int, int] = (64, 64), seed: int = 0
) -> Path:
    """Export a small random-weight CNN (initialised from ``seed``) with the production
    interface into ``dest_dir``.

    Its metadata uses a 64x64 input, a non-trivial temperature and threshold, so a server
    that hard-codes anything about the production model fails the tests.
    """
    model = build_tiny_classifier(input_size, seed)
    metadata = base_metadata(
        model,
        name="tiny-test-model",
        version="0.0.1-test",
        temperature=1.5,
        threshold=0.4,
        threshold_rule="fixed for tests",
        risk_tiers=[
            {"name": "low", "lower": 0.0, "upper": 0.2},
            {"name": "moderate", "lower": 0.2, "upper": 0.4},
            {"name": "high", "lower": 0.4, "upper": 1.0},
        ],
        metrics={"validation": {}},
        training={"recipe": "random weights (test artifact)", "data": []},
        weights_source={"note": "random initialisation"},
    )
    return export_artifact(model, dest_dir, metadata)
