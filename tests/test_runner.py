"""The SavedModel runner that evaluation, gates and shortcut checks share."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from model_training.preprocessing import TTA_VIEWS, resize_to_input, tta_view
from model_training.runner import Embedder


def test_views_average_the_logit_and_keep_the_first_views_output(artifact_dir: Path) -> None:
    """With test-time views the logit is the mean over the views, computed batch by batch."""
    tf = pytest.importorskip("tensorflow")
    rng = np.random.default_rng(3)
    images = [Image.fromarray(rng.integers(0, 255, (70, 90, 3), dtype=np.uint8)) for _ in range(5)]
    views = ("identity", *TTA_VIEWS)
    embed = Embedder(artifact_dir, batch_size=2)
    logits, embeddings = embed(iter(images), len(images), "test", views)
    saved = tf.saved_model.load(str(artifact_dir / "saved_model"))
    batch = np.stack([resize_to_input(img, embed.size) for img in images])
    per_view = [saved.serve(tf.constant(tta_view(batch, v)))["logit"].numpy() for v in views]
    np.testing.assert_allclose(logits, np.mean(per_view, axis=0), rtol=1e-4, atol=1e-5)
    assert not np.allclose(logits, per_view[0])  # the views do change the answer
    identity = saved.serve(tf.constant(batch))["embedding"].numpy()
    np.testing.assert_allclose(embeddings, identity, rtol=1e-4, atol=1e-5)
    assert embed.images_done == 5
    assert 0 < embed.infer_seconds <= embed.seconds
