"""Export (SavedModel + metadata.json), weight shards, augmentation, crops and the CLI.

All real: models are built and exported by the project's own code and reloaded with
TensorFlow; the CLI test runs ``python -m model_training`` in a subprocess on real images.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import keras
import numpy as np
import pytest
import tensorflow as tf

from model_training import train as tr
from model_training.crops import CropBatches
from model_training.export import export_artifact, read_metadata
from model_training.model import (
    DermAugment,
    build_classifier,
    build_tiny_classifier,
    training_model,
)
from model_training.preprocessing import image_to_input

REPO = Path(__file__).resolve().parents[1]
IMAGES = Path(__file__).parent / "fixtures" / "images"
FIXTURES = sorted(IMAGES.glob("*.jpg"))
DATA_DIR = Path(os.environ.get("SHARED_DATA_DIR") or REPO.parent / "shared" / "data")
SETS = ("isic2017", "ham10000", "pad-ufes-20")
TINY_INPUT = (72, 56)  # (height, width): not square, so swapped axes would show
TINY_BLOCK = (9, 7)  # three stride-2 convolutions
MIB = 2**20

# Keras warns when a one-input functional model is called with a bare tensor; harmless.
pytestmark = pytest.mark.filterwarnings("ignore:The structure of `inputs`:UserWarning")

needs_data = pytest.mark.skipif(
    not all((DATA_DIR / name / "labels.csv").is_file() for name in SETS),
    reason=f"the real data sets are not at {DATA_DIR} (set SHARED_DATA_DIR)",
)


def fixture_batch(size: tuple[int, int]) -> np.ndarray:
    """The six fixture photos through the shared preprocessing path, float32 0..255."""
    return np.stack([image_to_input(p, size) for p in FIXTURES])


def documented_metadata_keys() -> set[str]:
    """Top-level keys of the metadata.json example in docs/ARTIFACT.md."""
    text = (REPO / "docs" / "ARTIFACT.md").read_text()
    block = text.split("## metadata.json", 1)[1].split("```json", 1)[1].split("```", 1)[0]
    keys = set(re.findall(r'^  "([a-z_]+)":', block, flags=re.MULTILINE))
    assert {"schema_version", "threshold", "risk_tiers"} <= keys  # the parse itself worked
    return keys


OPTIONAL_KEYS = {"ood", "quality"}  # "may be absent" per docs/ARTIFACT.md


# -- export ---------------------------------------------------------------------------------


def test_tiny_artifact_has_saved_model_and_documented_metadata(artifact_dir: Path) -> None:
    """make_tiny_artifact writes saved_model/ and a metadata.json with the documented keys."""
    assert (artifact_dir / "saved_model" / "saved_model.pb").is_file()
    meta = json.loads((artifact_dir / "metadata.json").read_text())
    missing = documented_metadata_keys() - OPTIONAL_KEYS - set(meta)
    assert not missing, f"metadata.json lacks documented keys {sorted(missing)}"
    assert meta["schema_version"] == 1
    assert meta["labels"] == ["benign", "malignant"] and meta["positive_label"] == "malignant"
    assert meta["endpoints"] == {
        "serve": ["logit", "embedding", "ood_embedding", "skin_embedding"],
        "explain": ["logit", "heatmap", "heatmap_benign"],
    }
    inp = meta["input"]
    assert {
        "height",
        "width",
        "channels",
        "color",
        "dtype",
        "value_range",
        "resize",
        "scaling",
    } <= set(inp)
    assert (inp["height"], inp["width"], inp["channels"]) == (64, 64, 3)
    assert inp["value_range"] == [0, 255]
    assert (meta["temperature"], meta["threshold"]) == (1.5, 0.4)
    tiers = meta["risk_tiers"]
    assert tiers[0]["lower"] == 0.0 and tiers[-1]["upper"] == 1.0
    assert tiers[-1]["lower"] == meta["threshold"]
    assert meta["parameters"] == build_tiny_classifier((64, 64)).count_params()


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> tuple[keras.Model, Any]:
    """A tiny non-square classifier, exported with export_artifact and reloaded."""
    from model_training.export import base_metadata

    model = build_tiny_classifier(TINY_INPUT, seed=3)
    artifact = export_artifact(
        model, tmp_path_factory.mktemp("export") / "art", base_metadata(model, name="t")
    )
    meta = read_metadata(artifact)
    assert (meta["input"]["height"], meta["input"]["width"]) == TINY_INPUT
    return model, tf.saved_model.load(str(artifact / "saved_model"))


def test_serve_matches_keras(exported: tuple[keras.Model, Any]) -> None:
    """serve's logit and embedding equal the Keras model's on real photos."""
    model, loaded = exported
    batch = fixture_batch(TINY_INPUT)
    out = loaded.serve(tf.constant(batch))
    expected = np.asarray(model(batch, training=False)).reshape(-1)
    embedder = keras.Model(model.inputs, model.get_layer("embedding").output)
    assert out["logit"].shape == (len(batch),)
    assert out["logit"].dtype == tf.float32
    np.testing.assert_allclose(out["logit"].numpy(), expected, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(
        out["embedding"].numpy(), np.asarray(embedder(batch)), rtol=1e-4, atol=1e-5
    )
    assert np.ptp(expected) > 0  # the photos are told apart: not a constant model


def test_explain_returns_a_unit_heatmap_of_the_block_size(
    exported: tuple[keras.Model, Any],
) -> None:
    """explain: same logit as serve; heatmap [n, h, w] of the last block, in [0, 1]."""
    model, loaded = exported
    batch = fixture_batch(TINY_INPUT)
    out = loaded.explain(tf.constant(batch))
    heat = out["heatmap"].numpy()
    assert heat.shape == (len(batch), *TINY_BLOCK)
    assert tuple(model.get_layer("mixed10").output.shape[1:3]) == TINY_BLOCK
    assert np.all(np.isfinite(heat)) and heat.min() >= 0.0 and heat.max() <= 1.0
    peaks = heat.reshape(len(batch), -1).max(axis=1)
    assert np.all((np.abs(peaks - 1.0) < 1e-5) | (peaks == 0.0))  # scaled per image
    assert np.any(np.abs(peaks - 1.0) < 1e-5)
    np.testing.assert_allclose(
        out["logit"].numpy(), loaded.serve(tf.constant(batch))["logit"].numpy(), atol=1e-5
    )


# -- weight shards --------------------------------------------------------------------------


def _float16(value: Any) -> np.ndarray:
    return np.asarray(value, dtype=np.float32).astype(np.float16).astype(np.float32)


def test_weight_shards_round_trip(tmp_path: Path) -> None:
    """float16 shards load back by variable path into a differently initialised model."""
    source = build_tiny_classifier(TINY_INPUT, seed=1)
    paths = tr.save_weight_shards(source, tmp_path / "w")
    assert [p.name for p in paths] == ["weights-00-of-01.npz"]
    with np.load(paths[0]) as data:
        assert {data[k].dtype for k in data.files} == {np.dtype(np.float16)}
        assert sorted(data.files) == sorted(v.path for v in source.weights)
    target = build_tiny_classifier(TINY_INPUT, seed=2)
    before = target.get_layer("conv_a").get_weights()[0]
    assert not np.allclose(before, source.get_layer("conv_a").get_weights()[0])
    tr.load_weight_shards(target, tmp_path / "w")
    for a, b in zip(source.weights, target.weights, strict=True):
        np.testing.assert_array_equal(np.asarray(b), _float16(a), err_msg=a.path)
    batch = fixture_batch(TINY_INPUT)
    np.testing.assert_allclose(
        np.asarray(target(batch)), np.asarray(source(batch)), rtol=1e-2, atol=1e-2
    )


def test_load_weight_shards_refuses_missing_variables(tmp_path: Path) -> None:
    """A shard set without some variable is an error naming it, not a half-loaded model."""
    source = build_tiny_classifier(TINY_INPUT)
    tr.save_weight_shards(source, tmp_path / "w")
    shard = tmp_path / "w" / "weights-00-of-01.npz"
    with np.load(shard) as data:
        kept = {k: data[k] for k in data.files if not k.startswith("logit/")}
    np.savez(shard, **kept)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="logit/"):
        tr.load_weight_shards(build_tiny_classifier(TINY_INPUT), tmp_path / "w")


@pytest.mark.slow
def test_full_inception_shards_fit_the_download_limit(tmp_path: Path) -> None:
    """The full InceptionV3 in float16 shards: each file < 16 MiB, and they load back."""
    from model_training.weights import imagenet_weights

    source = build_classifier(imagenet_npz=imagenet_weights(log=lambda _m: None))
    paths = tr.save_weight_shards(source, tmp_path / "w")
    sizes = [p.stat().st_size for p in paths]
    assert len(paths) >= 3
    assert max(sizes) < 16 * MIB
    assert sum(sizes) == pytest.approx(2 * source.count_params(), rel=0.02)
    assert all(p.name.endswith(f"-of-{len(paths):02d}.npz") for p in paths)
    target = build_classifier()
    tr.load_weight_shards(target, tmp_path / "w")
    for a, b in zip(source.weights, target.weights, strict=True):
        np.testing.assert_array_equal(np.asarray(b), _float16(a), err_msg=a.path)


# -- augmentation and crops -----------------------------------------------------------------


@pytest.mark.parametrize("size", [(64, 64), (48, 64)])
def test_derm_augment_identity_at_inference_changes_in_training(size: tuple[int, int]) -> None:
    """Inference: the input unchanged. Training: changed, same shape, still within 0..255."""
    batch = fixture_batch(size)
    layer = DermAugment(seed=7)
    np.testing.assert_array_equal(np.asarray(layer(batch, training=False)), batch)
    np.testing.assert_array_equal(np.asarray(layer(batch)), batch)  # default: inference
    out = np.asarray(layer(batch, training=True))
    assert out.shape == batch.shape and out.dtype == np.float32
    assert out.min() >= 0.0 and out.max() <= 255.0
    changed = np.abs(out - batch).reshape(len(batch), -1).mean(axis=1)
    assert np.all(changed > 0.5)
    again = np.asarray(layer(batch, training=True))
    assert not np.array_equal(again, out)  # fresh randomness per call


def test_colour_jitter_spreads_are_the_recipes() -> None:
    """Saturation is scaled by a factor from 1 +- the spread: 0.8-1.2 by default, 0.4-1.6 with
    the strong colour recipe (muted and vivid phone photos); the training wrapper passes the
    spreads on."""
    batch = fixture_batch((32, 32))

    def chroma(x: np.ndarray) -> np.ndarray:  # flip- and transpose-invariant per image
        return np.abs(x - x.mean(axis=3, keepdims=True)).sum(axis=(1, 2, 3))

    def factors(spread: float) -> np.ndarray:
        layer = DermAugment(brightness=0, contrast=0, saturation=spread, channel_gain=0, seed=1)
        views = [np.asarray(layer(batch, training=True)) for _ in range(25)]
        return np.concatenate([chroma(v) / chroma(batch) for v in views])

    default, strong = factors(0.2), factors(0.6)
    assert default.min() >= 0.79 and default.max() <= 1.21
    assert strong.min() < 0.5 and strong.max() > 1.4
    wrapper = training_model(
        build_tiny_classifier(TINY_INPUT), seed=0, saturation=0.6, channel_gain=0.15
    )
    layer = wrapper.get_layer("augment")
    assert (layer.saturation, layer.channel_gain) == (0.6, 0.15)


def test_one_hue_views_keep_the_luma_in_one_tint() -> None:
    """With ``one_hue`` a share of the views goes through a one-hue filter (sepia, black and
    white, tints): every pixel of such a view has the same R:G:B ratios and its luma is kept;
    the other views keep their colours. Off (0) by default; the wrapper passes it on."""
    batch = fixture_batch((32, 32)).astype("float32")
    luma_of = lambda x: x @ np.asarray([0.299, 0.587, 0.114], dtype="float32")  # noqa: E731

    def one_hue(view: np.ndarray) -> bool:
        # Ratios are noise where nearly black, and a tint above 1 clips the brightest pixels.
        lit = (luma_of(view) > 20) & (view.max(axis=-1) < 254.9)
        ratios = view[lit] / luma_of(view)[lit][:, None]
        return bool(np.all(ratios.std(axis=0) < 1e-3))

    layer = DermAugment(brightness=0, contrast=0, saturation=0, channel_gain=0, one_hue=1.0, seed=2)
    views = np.asarray(layer(batch, training=True))
    assert all(one_hue(v) for v in views)
    # The luma is the original's, up to flips and transposes (compare sorted values).
    for view, image in zip(views, batch, strict=True):
        unclipped = view.max() < 255.0
        if unclipped:
            np.testing.assert_allclose(
                np.sort(luma_of(view).ravel()), np.sort(luma_of(image).ravel()), atol=0.05
            )
    share = DermAugment(brightness=0, contrast=0, saturation=0, channel_gain=0, one_hue=0.3, seed=3)
    picked = [one_hue(v) for _ in range(20) for v in np.asarray(share(batch, training=True))]
    assert 0.15 < np.mean(picked) < 0.45
    plain = DermAugment(brightness=0, contrast=0, saturation=0, channel_gain=0, seed=4)
    assert DermAugment().one_hue == 0.0
    assert not any(one_hue(v) for v in np.asarray(plain(batch, training=True)))
    wrapper = training_model(build_tiny_classifier(TINY_INPUT), seed=0, one_hue=0.15)
    assert wrapper.get_layer("augment").get_config()["one_hue"] == 0.15


def test_training_model_takes_uint8_and_is_the_classifier_at_inference() -> None:
    """The training wrapper accepts uint8 crops; without training it equals the classifier."""
    classifier = build_tiny_classifier(TINY_INPUT)
    wrapper = training_model(classifier, seed=0)
    batch = fixture_batch(TINY_INPUT)
    assert wrapper.input.dtype == "uint8"
    np.testing.assert_allclose(
        np.asarray(wrapper(batch.astype(np.uint8), training=False)),
        np.asarray(classifier(batch, training=False)),
        rtol=1e-5,
        atol=1e-5,
    )


def _stored_images(n: int, size: tuple[int, int]) -> np.ndarray:
    return tr.load_images([str(FIXTURES[i % len(FIXTURES)]) for i in range(n)], size, 1, False)


def _is_window_of(crop: np.ndarray, image: np.ndarray) -> bool:
    ch, cw = crop.shape[:2]
    h, w = image.shape[:2]
    return any(
        np.array_equal(image[y : y + ch, x : x + cw], crop)
        for y in range(h - ch + 1)
        for x in range(w - cw + 1)
    )


def test_crop_batches_basic() -> None:
    """uint8 crops of the input size, cut from the stored image, with matching labels/weights."""
    crop, margin = (40, 32), 6
    images = _stored_images(10, (crop[0] + margin, crop[1] + margin))
    labels = np.arange(10) % 2
    weights = np.where(labels == 1, 2.5, 0.5)
    index = np.repeat(np.arange(10), [1, 1, 1, 1, 1, 1, 1, 1, 2, 2])  # rows 8, 9 repeated
    batches = CropBatches(images, labels, weights, index, crop, 4, seed=0, workers=1)
    assert len(batches) == len(index) // 4 == 3
    seen: list[int] = []
    for i in range(len(batches)):
        x, y, sw = batches[i]
        rows = batches.order[i * 4 : (i + 1) * 4]
        seen += rows.tolist()
        assert x.shape == (4, *crop, 3) and x.dtype == np.uint8
        assert y.dtype == np.float32 and sw.dtype == np.float32
        np.testing.assert_array_equal(y, labels[rows])
        np.testing.assert_array_equal(sw, weights[rows])
        for j, row in enumerate(rows):
            assert _is_window_of(x[j], images[row])
    assert sorted(seen) == sorted(batches.order[:12].tolist())
    first = batches.order.copy()
    batches.on_epoch_end()
    assert sorted(batches.order.tolist()) == sorted(index.tolist())
    assert not np.array_equal(first, batches.order)


def test_crop_batches_strong() -> None:
    """augment="strong": rotated random-resized crops, still uint8 of the input size."""
    crop = (40, 32)
    images = _stored_images(8, (crop[0] + 8, crop[1] + 8))
    labels = np.array([0, 1] * 4)
    weights = np.ones(8)
    batches = CropBatches(
        images, labels, weights, np.arange(8), crop, 4, seed=1, workers=1, augment="strong"
    )
    x, y, sw = batches[0]
    rows = batches.order[:4]
    assert x.shape == (4, *crop, 3) and x.dtype == np.uint8
    np.testing.assert_array_equal(y, labels[rows].astype(np.float32))
    np.testing.assert_array_equal(sw, np.ones(4, np.float32))
    assert not all(_is_window_of(x[j], images[row]) for j, row in enumerate(rows))
    x2, _, _ = batches[0]
    np.testing.assert_array_equal(x, x2)  # reproducible per (epoch order, batch)


def test_epoch_index_repeats_phone_rows() -> None:
    """Under-represented domains are repeated in each epoch's index."""
    domains = np.array(["dermoscopy", "phone", "dermoscopy", "phone"])
    index = tr.epoch_index(domains, {"phone": 3})
    assert index.tolist() == [0, 1, 1, 1, 2, 3, 3, 3]


# -- the CLI end to end on real data --------------------------------------------------------


def _cli(tmp: Path, *args: str) -> subprocess.CompletedProcess[str]:
    (tmp / "tmpdir").mkdir(exist_ok=True)
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "TMPDIR": str(tmp / "tmpdir")}
    result = subprocess.run(
        [sys.executable, "-m", "model_training", *args],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


@pytest.mark.slow
@pytest.mark.data
@needs_data
def test_cli_train_head_export_serve(tmp_path: Path) -> None:
    """train --mode head on 24 real images, export, reload the SavedModel and serve."""
    run, art = tmp_path / "run", tmp_path / "art"
    _cli(
        tmp_path,
        "train", "--data-dir", str(DATA_DIR), "--mode", "head", "--limit", "24", "--epochs",
        "2", "--batch-size", "8", "--workers", "2", "--out", str(run),
    )  # fmt: skip
    info = json.loads((run / "run.json").read_text())
    assert info["config"]["mode"] == "head" and info["config"]["limit"] == 24
    assert sum(int(r["images"]) for r in info["data"]) == 24
    assert {r["split"] for r in info["data"]} == {"train"}
    history = json.loads((run / "history.json").read_text())
    assert len(history["loss"]) == 2 and history["phase"] == ["head", "head"]
    assert list((run / "weights").glob("weights-*.npz"))
    with np.load(run / "embeddings-train.npz") as cached:
        assert cached["embeddings"].shape == (24, 2048)

    _cli(tmp_path, "export", "--run", str(run), "--out", str(art))
    meta = read_metadata(art)
    assert meta["training"]["recipe"] == "head"
    assert meta["architecture"] == "InceptionV3"
    assert (meta["input"]["height"], meta["input"]["width"]) == (299, 299)
    assert meta["parameters"] == 21_802_784 + 2049

    loaded = tf.saved_model.load(str(art / "saved_model"))
    batch = fixture_batch((299, 299))[:2]
    out = loaded.serve(tf.constant(batch))
    assert out["logit"].shape == (2,) and out["embedding"].shape == (2, 2048)
    classifier = build_classifier()
    tr.load_weight_shards(classifier, run / "weights")
    expected = np.asarray(classifier(batch, training=False)).reshape(-1)
    np.testing.assert_allclose(out["logit"].numpy(), expected, rtol=1e-3, atol=1e-3)


# -- gpu_job packing ------------------------------------------------------------------------


@pytest.mark.data
@needs_data
def test_choose_images_keeps_all_required_images_within_budget() -> None:
    """Every malignant and non-nevus image is packed; nevi fill up to (never over) the budget."""
    from model_training.data import read_dataset
    from model_training.gpu_job import ZIP_MEMBER_OVERHEAD, choose_images

    budget = 40 * MIB
    chosen, rest = choose_images(DATA_DIR, list(SETS), budget, seed=5)
    used = 0
    sizes: dict[str, int] = {}
    for name in SETS:
        train = read_dataset(DATA_DIR / name, name)
        train = train[train["split"] == "train"]
        sizes.update(
            {
                str(i): Path(p).stat().st_size + ZIP_MEMBER_OVERHEAD
                for i, p in zip(train["image_id"], train["path"], strict=True)
            }
        )
        packed, left = set(chosen[name]), set(rest[name])
        assert not packed & left
        assert packed | left == set(train["image_id"])
        nevus = train["diagnosis"].astype(str).str.lower().isin({"nv", "nevus", "nev"})
        required = train[(train["label"] == 1) | ~nevus]
        assert set(required["image_id"]) <= packed, name
        if name != "ham10000":
            assert not left, name  # only HAM10000 nevi are optional
        used += sum(sizes[i] for i in packed)
    assert used <= budget
    leftover = [i for ids in rest.values() for i in ids]
    assert leftover, "the budget was meant to leave some nevi out"
    assert all(used + sizes[i] > budget for i in leftover)  # nothing left out that would fit
    again, _ = choose_images(DATA_DIR, list(SETS), budget, seed=5)
    assert again == chosen


def test_remote_script_with_parallel_plans_is_valid_bash() -> None:
    """The rendered device script parses, starts one loso process per plan and gathers at
    most the 8 files a call may return."""
    import shutil
    import subprocess

    from model_training.gpu_job import REMOTE

    script = REMOTE.format(
        command="loso", sets="isic2017,ham10000", train_args="--deadline 500", plans="a.json,b.json"
    )
    bash = shutil.which("bash")
    assert bash is not None
    subprocess.run([bash, "-n"], input=script.encode(), check=True)
    assert 'PLANS="a.json,b.json"' in script and '--plan "$PLAN"' in script
    assert 'PLANS=""' in REMOTE.format(command="train", sets="x", train_args="", plans="")


def test_unpack_places_parallel_plan_outputs_where_export_and_loso_report_read(
    tmp_path: Path,
) -> None:
    """predictions.csv at the top, run-K-weights-* into run-K/weights/, runs.tar unpacked."""
    import tarfile

    from model_training.gpu_job import main as gpu_job_main

    fetched, staging = tmp_path / "fetched", tmp_path / "staging"
    (staging / "run-3").mkdir(parents=True)
    (staging / "run-3" / "run.json").write_text("{}")
    (staging / "run-0").mkdir()
    (staging / "run-0" / "loso.json").write_text("{}")
    fetched.mkdir()
    with tarfile.open(fetched / "runs.tar", "w") as tar:
        tar.add(staging / "run-3" / "run.json", "run-3/run.json")
        tar.add(staging / "run-0" / "loso.json", "run-0/loso.json")
    np.savez(fetched / "run-3-weights-00-of-01.npz", w=np.zeros(2))
    (fetched / "predictions.csv").write_text("job,image_id\nsoup-loso-x,1\n")
    (fetched / "train.log").write_text("log")
    run = tmp_path / "run"
    assert gpu_job_main(["unpack", "--files", str(fetched), "--run", str(run)]) == 0
    assert (run / "run-3" / "weights" / "weights-00-of-01.npz").is_file()
    assert (run / "run-3" / "run.json").is_file() and (run / "run-0" / "loso.json").is_file()
    assert (run / "predictions.csv").read_text().startswith("job,image_id")
    assert (run / "train.log").is_file()


# -- auxiliary diagnosis head ----------------------------------------------------------------


def test_crop_batches_with_diagnoses_yield_both_targets() -> None:
    """With diagnosis codes, y is {"logit": labels, "diagnosis": codes} for the same rows."""
    crop = (40, 32)
    images = _stored_images(8, (crop[0] + 4, crop[1] + 4))
    labels = np.array([0, 1] * 4)
    codes = np.array([1, 0, 2, 3, 1, 4, 8, 0], dtype=np.int32)
    batches = CropBatches(
        images, labels, np.ones(8), np.arange(8), crop, 4, seed=2, workers=1, diagnoses=codes
    )
    _, y, sw = batches[1]
    rows = batches.order[4:8]
    assert set(y) == {"logit", "diagnosis"}
    np.testing.assert_array_equal(y["logit"], labels[rows].astype(np.float32))
    np.testing.assert_array_equal(y["diagnosis"], codes[rows])
    assert sw.shape == (4,)


@pytest.mark.slow
def test_fit_finetune_with_diagnosis_head_returns_the_single_logit_classifier() -> None:
    """A real (small-input) InceptionV3 trains with the auxiliary head; what comes back, and
    is saved and exported, is the plain classifier: one logit, no diagnosis weights."""
    config = tr.TrainConfig(
        input_size=(75, 75), crop_margin=4, batch_size=4, head_epochs=1, epochs=1,
        aux_diagnosis=0.5, mixed_precision="off", workers=1, domain_repeat={},
    )  # fmt: skip
    images = _stored_images(8, (79, 79))
    labels = np.array([0, 1] * 4)
    codes = np.array([1, 0, 2, 3, 1, 4, 8, 0], dtype=np.int32)
    data = tr.TrainingData(images, labels, np.ones(8), np.arange(8), codes)
    classifier, history = tr.fit_finetune(data, config, None)
    assert {"logit_loss", "diagnosis_loss", "logit_auc"} <= set(history)
    assert all(np.isfinite(history["diagnosis_loss"]))
    assert classifier.output_shape == (None, 1)
    assert not any("diagnosis" in w.path for w in classifier.weights)
    untrained = build_classifier((75, 75), config.dropout)
    assert len(classifier.weights) == len(untrained.weights)  # shards load into the exporter's


def test_diagnosis_head_without_diagnoses_is_a_clear_error() -> None:
    config = tr.TrainConfig(input_size=(75, 75), aux_diagnosis=0.5, workers=1)
    data = tr.TrainingData(_stored_images(2, (96, 96)), np.array([0, 1]), np.ones(2), np.arange(2))
    with pytest.raises(ValueError, match="with_diagnoses"):
        tr.fit_finetune(data, config, None)
