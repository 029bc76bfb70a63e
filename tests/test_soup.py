"""Weight averaging of two real (tiny) artifacts made by the exporter."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from model_training.export import read_metadata
from model_training.soup import soup
from model_training.testing import make_tiny_artifact


def _weights(artifact: Path) -> dict[str, np.ndarray]:
    import tensorflow as tf

    loaded = tf.saved_model.load(str(artifact / "saved_model"))
    return {v.name: v.numpy() for v in loaded._all_variables}


def _logits(artifact: Path, x: np.ndarray) -> np.ndarray:
    import tensorflow as tf

    loaded = tf.saved_model.load(str(artifact / "saved_model"))
    return np.asarray(loaded.signatures["serve"](tf.constant(x))["logit"])


def test_soup_averages_every_variable_and_keeps_the_interface(
    artifact_dir: Path, tmp_path: Path
) -> None:
    other = make_tiny_artifact(tmp_path / "other", seed=1)  # another initialisation
    wa, wb = _weights(artifact_dir), _weights(other)
    assert any(not np.array_equal(wa[k], wb[k]) for k in wa)
    out = soup(artifact_dir, other, 0.25, tmp_path / "soup")
    ws = _weights(out)
    assert set(ws) == set(wa)
    for name, value in ws.items():
        np.testing.assert_allclose(value, 0.75 * wa[name] + 0.25 * wb[name], rtol=1e-6, atol=1e-7)
    meta = read_metadata(out)
    assert (
        meta["soup"]["alpha"] == 0.25
        and meta["threshold"] == read_metadata(artifact_dir)["threshold"]
    )
    x = np.random.default_rng(0).uniform(0, 255, (2, 64, 64, 3)).astype(np.float32)
    assert _logits(out, x).shape == (2,)
    # alpha 0 is A itself, answer for answer.
    same = soup(artifact_dir, other, 0.0, tmp_path / "same")
    np.testing.assert_allclose(_logits(same, x), _logits(artifact_dir, x), rtol=1e-6)


def test_soup_refuses_bad_alpha_a_used_folder_and_other_architectures(
    artifact_dir: Path, tmp_path: Path
) -> None:
    with pytest.raises(ValueError, match="alpha"):
        soup(artifact_dir, artifact_dir, 1.5, tmp_path / "x")
    used = tmp_path / "used"
    used.mkdir()
    with pytest.raises(FileExistsError):
        soup(artifact_dir, artifact_dir, 0.5, used)
    wider = make_tiny_artifact(tmp_path / "wider", input_size=(80, 80))
    # Same layers, other input size: the variables still match; a soup is allowed and works.
    assert soup(artifact_dir, wider, 0.5, tmp_path / "ok").is_dir()
