"""Fine-tuning the top of a real (tiny) artifact on cached features, end to end."""

from __future__ import annotations

from pathlib import Path

import keras
import numpy as np
import pandas as pd
import pytest

from model_training import top_finetune as top
from model_training.export import read_metadata
from model_training.preprocessing import image_to_input
from model_training.reexport import copy_weights, rebuild
from tests.conftest import fixture_validation


def _frame() -> pd.DataFrame:
    paths, y, sets, domains = fixture_validation()
    rows = pd.DataFrame({"path": paths, "label": y, "dataset": sets, "domain": domains})
    rows["group"] = rows["path"]
    return pd.concat([rows.assign(split="train"), rows.assign(split="valid")], ignore_index=True)


def _model(artifact: Path) -> keras.Model:
    model = rebuild(read_metadata(artifact))
    copy_weights(model, artifact / "saved_model")
    return model


def test_split_model_is_the_network_and_freeze_picks_the_layers(artifact_dir: Path) -> None:
    model = _model(artifact_dir)
    trunk, head = top.split_model(model, "conv_a")
    x = np.random.default_rng(0).uniform(0, 255, (3, 64, 64, 3)).astype("float32")
    np.testing.assert_allclose(head.predict(trunk.predict(x, verbose=0), verbose=0),
                               model.predict(x, verbose=0), rtol=1e-5, atol=1e-5)  # fmt: skip
    everything = top.freeze(model, head, "conv_a", "conv_a")
    assert everything == sum(int(np.prod(w.shape)) for w in head.weights)
    only_dense = top.freeze(model, head, "conv_a", "embedding")
    assert only_dense == 17  # 16 weights + bias of the one dense unit
    assert {layer.name for layer in head.layers if layer.trainable and layer.weights} == {"logit"}


def test_views_keep_the_pixels_and_weights_balance_the_classes() -> None:
    x = np.random.default_rng(1).uniform(0, 255, (8, 8, 3))
    turned = top.view(x, 3, True, np.ones(3))
    assert sorted(turned.ravel()) == sorted(x.ravel()) and not np.array_equal(turned, x)
    assert top.view(x, 0, False, np.full(3, 2.0)).max() <= 255.0
    labels, phone = np.array([1, 0, 0, 0, 1, 0]), np.array([0, 0, 0, 0, 1, 1], dtype=bool)
    w = top.sample_weights(labels, phone, 3.0)
    assert w[labels == 1].sum() == pytest.approx(w[labels == 0].sum())
    assert w[4] == pytest.approx(3 * w[0]) and w[5] == pytest.approx(3 * w[1])
    # Rows left out (a diagnosis the sources label differently) weigh 0; the rest stay balanced.
    keep = np.array([1, 1, 1, 0, 0, 1], dtype=bool)
    w = top.sample_weights(labels, phone, 3.0, keep)
    assert w[3] == 0 and w[4] == 0
    assert w[labels == 1].sum() == pytest.approx(w[labels == 0].sum())
    assert top.report_path(Path("r"), top.TopConfig(ignore_diagnoses=("akiec",))).name.endswith(
        "-without-akiec.json"
    )


def test_finetune_top_trains_the_top_only_and_exports_a_candidate(
    artifact_dir: Path, tmp_path: Path
) -> None:
    config = top.TopConfig(split="conv_a", train_after="conv_b", lr=0.05, epochs=2, batch_size=4)
    report = top.run(
        artifact_dir, _frame(), config, tmp_path / "run",
        lambda path: image_to_input(path, (64, 64)), tmp_path / "candidate",
    )  # fmt: skip
    assert [e["epoch"] for e in report["epochs"]] == [1, 2] and len(report["loss"]) == 2
    last = report["epochs"][-1]["validation"]
    assert last["pooled"]["n"] == 6 and last["pooled"]["auc_before"] is not None
    assert last["ham10000"]["auc_before"] is None  # one photo, one class
    assert top.report_path(tmp_path / "run", config).exists()
    # Another variant on the same images reuses the cached features (not recomputed).
    cached = sorted((tmp_path / "run").glob("cache-*/*.npy"))
    assert len(cached) == 3  # two training views and validation
    assert not list((tmp_path / "run").glob("cache-*/*.partial"))
    assert not list((tmp_path / "run").glob("cache-*/trunk_saved_model"))
    stamps = [p.stat().st_mtime_ns for p in cached]
    dense = top.TopConfig(split="conv_a", train_after="embedding", lr=0.05, epochs=1, batch_size=4)
    top.run(artifact_dir, _frame(), dense, tmp_path / "run", lambda p: image_to_input(p, (64, 64)))
    assert [p.stat().st_mtime_ns for p in cached] == stamps
    assert top.report_path(tmp_path / "run", dense).exists()
    before, after = _model(artifact_dir), _model(tmp_path / "candidate")
    for name in ("conv_a", "conv_b"):  # below the trained part: untouched
        for a, b in zip(before.get_layer(name).weights, after.get_layer(name).weights, strict=True):
            np.testing.assert_array_equal(a.numpy(), b.numpy())
    assert not np.array_equal(before.get_layer("logit").weights[0].numpy(),
                              after.get_layer("logit").weights[0].numpy())  # fmt: skip
    meta = read_metadata(tmp_path / "candidate")
    assert meta["top_finetune"]["config"]["train_after"] == "conv_b" and "runtimes" not in meta
    assert meta["top_finetune"]["validation"]["pooled"]["n"] == 6
    with pytest.raises(FileExistsError):
        top.export_candidate(artifact_dir, after, tmp_path / "candidate", {})
