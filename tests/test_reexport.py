"""Re-export of an artifact written by an older exporter, and the ``skin_embedding`` output."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from model_training.export import read_metadata
from model_training.testing import make_tiny_artifact

OLD_SERVE = ["logit", "embedding", "ood_embedding"]


def _serve(artifact: Path, x: np.ndarray) -> dict[str, np.ndarray]:
    import tensorflow as tf

    loaded = tf.saved_model.load(str(artifact / "saved_model"))
    return {k: v.numpy() for k, v in loaded.serve(tf.constant(x)).items()}


def _old_format_artifact(dest: Path, seed: int) -> Path:
    """A tiny artifact as the exporter wrote it before ``skin_embedding`` existed."""
    import keras
    import tensorflow as tf

    from model_training.model import LAST_BLOCK, build_tiny_classifier

    make_tiny_artifact(dest, seed=seed)  # its metadata; the SavedModel is replaced below
    model = build_tiny_classifier((64, 64), seed)
    trunk = keras.Model(model.inputs, model.get_layer(LAST_BLOCK).output)

    def serve(image: tf.Tensor) -> dict[str, tf.Tensor]:
        block = trunk(image, training=False)
        return {
            "logit": tf.reshape(model(image, training=False), [-1]),
            "embedding": tf.reduce_mean(block, axis=[1, 2]),
            "ood_embedding": tf.reduce_mean(block, axis=[1, 2]),
        }

    archive = keras.export.ExportArchive()
    spec = tf.TensorSpec([None, 64, 64, 3], tf.float32, name="image")
    archive.add_endpoint("serve", tf.function(serve), input_signature=[spec])
    shutil.rmtree(dest / "saved_model")
    archive.write_out(str(dest / "saved_model"), verbose=False)
    meta = read_metadata(dest)
    meta["endpoints"] = {"serve": OLD_SERVE, "explain": ["logit", "heatmap", "heatmap_benign"]}
    (dest / "metadata.json").write_text(json.dumps(meta))
    return dest


def test_skin_embedding_is_the_ood_means_then_the_texture_block_mean_and_std(
    artifact_dir: Path,
) -> None:
    import keras

    from model_training.model import LAST_BLOCK, build_tiny_classifier

    x = np.random.default_rng(3).uniform(0, 255, (3, 64, 64, 3)).astype("float32")
    out = _serve(artifact_dir, x)
    # The tiny network has neither mixed2 nor mixed5: both fall back to its last block.
    model = build_tiny_classifier((64, 64), 0)
    block = np.asarray(keras.Model(model.input, model.get_layer(LAST_BLOCK).output)(x))
    d = out["ood_embedding"].shape[1]
    assert out["skin_embedding"].shape == (3, 3 * d)
    np.testing.assert_allclose(out["skin_embedding"][:, :d], out["ood_embedding"], atol=1e-6)
    np.testing.assert_allclose(out["skin_embedding"][:, d : 2 * d], block.mean((1, 2)), atol=1e-5)
    np.testing.assert_allclose(out["skin_embedding"][:, 2 * d :], block.std((1, 2)), atol=1e-5)


def test_reexport_adds_the_new_output_and_keeps_every_answer(tmp_path: Path) -> None:
    from model_training.reexport import reexport
    from model_training.runner import saved_model_fingerprint

    old = _old_format_artifact(tmp_path / "old", seed=5)
    x = np.random.default_rng(4).uniform(0, 255, (5, 64, 64, 3)).astype("float32")
    before = _serve(old, x)
    assert "skin_embedding" not in before
    fingerprint = saved_model_fingerprint(old)

    record = reexport(old)

    after = _serve(old, x)
    for name in OLD_SERVE:
        np.testing.assert_allclose(after[name], before[name], atol=1e-5)
    assert after["skin_embedding"].shape[0] == 5
    meta = read_metadata(old)
    assert meta["endpoints"]["serve"] == [*OLD_SERVE, "skin_embedding"]
    assert meta["reexport"]["from_fingerprint"] == fingerprint != saved_model_fingerprint(old)
    assert record["variables_copied"] == 8  # 3 convolutions and the dense unit, kernel + bias
    assert not (old / "saved_model.new").exists() and not (old / "saved_model.old").exists()


def test_reexport_refuses_an_architecture_it_cannot_rebuild(tmp_path: Path) -> None:
    from model_training.reexport import reexport

    art = make_tiny_artifact(tmp_path / "a", seed=6)
    meta = read_metadata(art)
    meta["architecture"] = "ResNet50"
    (art / "metadata.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="ResNet50"):
        reexport(art)
    assert read_metadata(art)["architecture"] == "ResNet50"  # nothing rewritten
