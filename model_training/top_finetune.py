"""Fine-tune the top of an artifact's network on cached mid-level features (CPU).

Issue #10's CPU item: without a GPU, the upper Inception blocks can still be trained, because
the network below them is frozen and its output can be computed once. ``finetune-top`` caches
the output of ``--split`` (``mixed8``, 8 x 8 x 1,280) for every training image in ``--views``
views (the photo itself, then dihedral turns with a colour gain: a lesion has no up or left)
and every validation image, on OpenVINO (bf16 where the CPU has it, 3-4x TensorFlow), then
trains every layer after ``--train-after`` with batch norm frozen, as the fine-tuning recipes
do, from the artifact's own weights (the cache under ``--out`` serves every variant on the same
artifact, split and images). The trunk below ``--split`` is untouched, so the gates
and the domain reader, which read mixed2 and mixed5, stay valid; only the logit changes.

The rule is fixed before the run: the candidate is the last epoch, and it is judged against
the artifact's own top on the same cached validation features (ROC-AUC per set and domain,
with a lesion- or patient-grouped paired bootstrap interval of the difference). A candidate
that passes is written with ``--export-to`` and then goes through ``evaluate``, ``fit-gates``
and ``export-fast`` like any other; its recipe has no leave-one-source-out figure (the trunk
below the split saw every source), so the ship rule cannot pass it alone.

    python -m model_training finetune-top --artifact models/default --data-dir ../shared/data \\
        --out runs/top-mixed8 [--train-after mixed9|embedding] [--export-to runs/candidate-top]
"""

from __future__ import annotations

import hashlib
import json
import shutil
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import keras
import numpy as np
import pandas as pd
from sklearn.metrics import roc_auc_score

from model_training.data import domain_sets
from model_training.export import SAVED_MODEL_DIR, export_savedmodel, read_metadata, write_metadata
from model_training.metrics import paired_auc_delta
from model_training.reexport import copy_weights, rebuild
from model_training.runner import saved_model_fingerprint
from model_training.train import learned_rows

TRUNK_DIR = "trunk_saved_model"


@dataclass
class TopConfig:
    """What is cached and what is trained (the defaults are the measured run's)."""

    split: str = "mixed8"  # the cached layer output
    train_after: str = "mixed8"  # every layer after this one's output is trained
    lr: float = 2e-5  # peak, cosine-decayed to 0 over the run
    epochs: int = 3
    batch_size: int = 32
    views: int = 2  # per training image: the photo, then dihedral turns with colour gain
    phone_repeat: float = 3.0  # phone photos' weight, as the fine-tuning recipes repeat them
    label_smoothing: float = 0.1
    weight_decay: float = 1e-4
    seed: int = 0
    # diagnoses left out of the loss (weight 0): sources that label them differently, such as
    # actinic keratoses (malignant "akiec" in HAM10000, benign "ACK" in PAD-UFES-20)
    ignore_diagnoses: tuple[str, ...] = ()


def report_path(out: Path, config: TopConfig) -> Path:
    """One report per trained part and schedule, so variants can share ``out`` (and its cache)."""
    ignored = "".join(f"-without-{d}" for d in config.ignore_diagnoses)
    return out / f"report-after-{config.train_after}-lr{config.lr:g}-e{config.epochs}{ignored}.json"


def roc_auc(labels: np.ndarray, scores: np.ndarray) -> float:
    """ROC-AUC as a plain float."""
    return float(roc_auc_score(labels, scores))


def log(message: str) -> None:
    """Progress on stderr."""
    print(f"[top {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def split_model(model: keras.Model, split: str) -> tuple[keras.Model, keras.Model]:
    """(trunk: image -> ``split``'s output, top: that output -> logit)."""
    cut = model.get_layer(split).output
    return keras.Model(model.input, cut), keras.Model(cut, model.output)


def freeze(model: keras.Model, top: keras.Model, split: str, train_after: str) -> int:
    """Make trainable exactly the top's layers after ``train_after`` (batch norm never);
    returns the number of trainable values."""
    frozen: set[str] = set()
    if train_after != split:
        below = keras.Model(model.get_layer(split).output, model.get_layer(train_after).output)
        frozen = {layer.name for layer in below.layers} | {train_after}
    for layer in top.layers:
        batch_norm = isinstance(layer, keras.layers.BatchNormalization)
        layer.trainable = layer.name not in frozen and not batch_norm
    return sum(int(np.prod(w.shape)) for w in top.trainable_weights)


def view(x: np.ndarray, turns: int, flip: bool, gain: np.ndarray) -> np.ndarray:
    """A dihedral turn of a model input with a per-channel colour gain (0..255 kept)."""
    y = np.rot90(x, turns)
    if flip:
        y = y[:, ::-1]
    return np.clip(y * gain, 0.0, 255.0)


def view_params(rng: np.random.Generator) -> tuple[int, bool, np.ndarray]:
    """Random turn, flip and gain: brightness +-15%, white balance +-5% per channel."""
    gain = rng.uniform(0.85, 1.15) * rng.uniform(0.95, 1.05, size=3)
    return int(rng.integers(4)), bool(rng.integers(2)), gain


def compile_trunk(trunk: keras.Model, workdir: Path) -> Any:
    """The trunk on OpenVINO (bf16 where the CPU has it), via a SavedModel in ``workdir``."""
    import openvino as ov

    folder = workdir / TRUNK_DIR
    if folder.exists():
        shutil.rmtree(folder)
    trunk.export(str(folder), format="tf_saved_model", verbose=False)
    converted = ov.convert_model(str(folder))
    converted.reshape([-1, *trunk.input_shape[1:]])
    config = {"INFERENCE_PRECISION_HINT": "bf16", "PERFORMANCE_HINT": "THROUGHPUT"}
    return ov.Core().compile_model(converted, "CPU", config)


def cache_features(
    compiled: Any,
    load: Callable[[str], np.ndarray],
    paths: Sequence[str],
    augment: np.random.Generator | None,
    batch: int = 16,
) -> np.ndarray:
    """The trunk's output for every path (float16), a random view each when ``augment``."""
    import openvino as ov

    shape = tuple(int(d) for d in compiled.outputs[0].get_partial_shape()[1:].to_shape())
    out = np.zeros((len(paths), *shape), np.float16)
    queue = ov.AsyncInferQueue(compiled, 2)

    def done(request: Any, rows: slice) -> None:
        out[rows] = request.get_output_tensor(0).data.astype(np.float16)

    queue.set_callback(done)
    for start in range(0, len(paths), batch):
        images = [load(p) for p in paths[start : start + batch]]
        if augment is not None:
            images = [view(x, *view_params(augment)) for x in images]
        queue.start_async(
            {0: np.stack(images).astype(np.float32)}, slice(start, start + len(images))
        )
    queue.wait_all()
    return out


def cache_key(artifact: Path, config: TopConfig, train: pd.DataFrame, valid: pd.DataFrame) -> str:
    """What the cached features depend on: the SavedModel, the split, the views, the images."""
    digest = hashlib.sha256(saved_model_fingerprint(artifact).encode())
    digest.update(json.dumps([config.split, config.views, config.seed]).encode())
    for paths in (train["path"], valid["path"]):
        digest.update("\n".join(paths).encode() + b"\0")
    return digest.hexdigest()[:16]


def save_atomic(path: Path, array: np.ndarray) -> None:
    """Write ``array`` to ``path`` under another name first, so an interrupted run never leaves
    a truncated cache file that a later run would take for a whole one."""
    partial = path.with_name(path.name + ".partial")
    with partial.open("wb") as f:
        np.save(f, array)
    partial.replace(path)


def cached_views(
    trunk: keras.Model,
    folder: Path,
    load: Callable[[str], np.ndarray],
    train: pd.DataFrame,
    valid: pd.DataFrame,
    config: TopConfig,
) -> tuple[list[np.ndarray], np.ndarray]:
    """The training views and the validation features, computed once into ``folder``."""
    names = [f"train{i}.npy" for i in range(config.views)] + ["valid.npy"]
    if not all((folder / name).exists() for name in names):
        folder.mkdir(parents=True, exist_ok=True)
        compiled = compile_trunk(trunk, folder)
        rng = np.random.default_rng(config.seed)
        for i, name in enumerate(names[:-1]):  # view 0: the photo itself
            paths = train["path"].tolist()
            save_atomic(folder / name, cache_features(compiled, load, paths, rng if i else None))
        paths = valid["path"].tolist()
        save_atomic(folder / names[-1], cache_features(compiled, load, paths, None))
        shutil.rmtree(folder / TRUNK_DIR)  # the features are what is kept
    views = [np.load(folder / name, mmap_mode="r") for name in names[:-1]]
    return views, np.load(folder / names[-1]).astype("float32")


def sample_weights(
    labels: np.ndarray, phone: np.ndarray, phone_repeat: float, keep: np.ndarray | None = None
) -> np.ndarray:
    """Balanced classes over the phone-repeated set, phone photos counted ``phone_repeat`` times;
    rows outside ``keep`` weigh 0 and do not count in the balance."""
    repeat = np.where(phone, phone_repeat, 1.0)
    if keep is not None:
        repeat = np.where(keep, repeat, 0.0)
    positives, negatives = float((repeat * labels).sum()), float((repeat * (1 - labels)).sum())
    total = positives + negatives
    return repeat * np.where(labels == 1, total / (2 * positives), total / (2 * negatives))


def train_top(
    top: keras.Model,
    views: Sequence[np.ndarray],
    labels: np.ndarray,
    weights: np.ndarray,
    config: TopConfig,
    after_epoch: Callable[[int], None] = lambda epoch: None,
) -> list[float]:
    """Train the top's trainable layers; each epoch shows each image in a random view.
    Returns the mean training loss per epoch."""
    rng = np.random.default_rng(config.seed)
    keras.utils.set_random_seed(config.seed)
    steps = max(1, config.epochs * (len(labels) // config.batch_size))
    schedule = keras.optimizers.schedules.CosineDecay(config.lr, steps)
    top.compile(
        optimizer=keras.optimizers.AdamW(schedule, weight_decay=config.weight_decay),
        loss=keras.losses.BinaryCrossentropy(
            from_logits=True, label_smoothing=config.label_smoothing
        ),
    )
    y = labels.astype("float32")
    losses: list[float] = []
    for epoch in range(config.epochs):
        order, pick = rng.permutation(len(y)), rng.integers(0, len(views), len(y))
        batch_losses = []
        for start in range(0, len(order) - config.batch_size + 1, config.batch_size):
            rows = order[start : start + config.batch_size]
            x = np.stack([views[pick[i]][i] for i in rows]).astype("float32")
            batch_losses.append(float(top.train_on_batch(x, y[rows], sample_weight=weights[rows])))
        losses.append(float(np.mean(batch_losses)))
        log(f"epoch {epoch + 1}: loss {losses[-1]:.4f}")
        after_epoch(epoch + 1)
    return losses


def compare(frame: pd.DataFrame, base: np.ndarray, new: np.ndarray) -> dict[str, dict[str, Any]]:
    """Per subset: both ROC-AUCs and the paired difference (None for a one-class subset)."""
    labels, groups = frame["label"].to_numpy(), frame["group"].to_numpy()
    out: dict[str, dict[str, Any]] = {}
    for name, mask in domain_sets(frame).items():
        if labels[mask].min() == labels[mask].max():
            out[name] = {"n": int(mask.sum()), "auc_before": None, "auc_after": None}
            continue  # one class: no ROC-AUC
        row = {
            "n": int(mask.sum()),
            "auc_before": round(roc_auc(labels[mask], base[mask]), 4),
            "auc_after": round(roc_auc(labels[mask], new[mask]), 4),
        }
        out[name] = {**row, **paired_auc_delta(labels[mask], base[mask], new[mask], groups[mask])}
    return out


def export_candidate(
    artifact: Path, model: keras.Model, dest: Path, record: dict[str, Any]
) -> Path:
    """Copy ``artifact`` to ``dest`` with ``model``'s weights; the records that describe the
    old SavedModel (fast runtime) go, calibration and gates stay until refitted."""
    if dest.exists():
        raise FileExistsError(f"{dest} exists; choose a new folder")
    shutil.copytree(artifact, dest, ignore=shutil.ignore_patterns(SAVED_MODEL_DIR, "int8.npz"))
    export_savedmodel(model, dest / SAVED_MODEL_DIR)
    meta = read_metadata(dest)
    meta.pop("runtimes", None)
    meta["top_finetune"] = record
    write_metadata(dest, meta)
    return dest


def run(
    artifact: Path,
    frame: pd.DataFrame,
    config: TopConfig,
    out: Path,
    load: Callable[[str], np.ndarray],
    export_to: Path | None = None,
) -> dict[str, Any]:
    """Cache (or reuse the cache), train, compare per epoch; write the report (and a
    candidate)."""
    out.mkdir(parents=True, exist_ok=True)
    model = rebuild(read_metadata(artifact))
    copy_weights(model, artifact / SAVED_MODEL_DIR)
    trunk, top = split_model(model, config.split)
    train = frame[frame["split"] == "train"].reset_index(drop=True)
    valid = frame[frame["split"] == "valid"].reset_index(drop=True)
    started = time.perf_counter()
    folder = out / f"cache-{cache_key(artifact, config, train, valid)}"
    views, valid_x = cached_views(trunk, folder, load, train, valid, config)
    cache_seconds = time.perf_counter() - started
    log(f"cached {len(train)} x {config.views} + {len(valid)} in {cache_seconds:.0f} s")
    base = top.predict(valid_x, batch_size=64, verbose=0).reshape(-1)
    trainable = freeze(model, top, config.split, config.train_after)
    keep = learned_rows(train, config.ignore_diagnoses)
    weights = sample_weights(
        train["label"].to_numpy(),
        (train["domain"] == "phone").to_numpy(),
        config.phone_repeat,
        keep,
    )
    if config.ignore_diagnoses:
        left_out = f"{int((~keep).sum())} training images of {list(config.ignore_diagnoses)}"
        log(f"{left_out} left out of the loss")
    epochs: list[dict[str, Any]] = []

    def measure(epoch: int) -> None:
        new = top.predict(valid_x, batch_size=64, verbose=0).reshape(-1)
        epochs.append({"epoch": epoch, "validation": compare(valid, base, new)})
        log(json.dumps({k: v["auc_after"] for k, v in epochs[-1]["validation"].items()}))

    started = time.perf_counter()
    losses = train_top(top, views, train["label"].to_numpy(), weights, config, measure)
    report: dict[str, Any] = {
        "artifact": str(artifact),
        "config": asdict(config),
        "trainable_values": trainable,
        "train_images": len(train),
        "valid_images": len(valid),
        "cache_seconds": round(cache_seconds, 1),
        "train_seconds": round(time.perf_counter() - started, 1),
        "loss": losses,
        "epochs": epochs,
        "rule": "candidate = the last epoch; compared with the artifact's own top on the same "
        "cached validation features",
    }
    report_path(out, config).write_text(json.dumps(report, indent=2))
    if export_to is not None:
        record = {
            "from_fingerprint": saved_model_fingerprint(artifact),
            "config": report["config"],
            "loss": report["loss"],
            "validation": epochs[-1]["validation"] if epochs else {},
        }
        export_candidate(artifact, model, export_to, record)
    return report


def summary_lines(report: dict[str, Any]) -> list[str]:
    """The last epoch against the start, one line per subset."""
    last = report["epochs"][-1]["validation"]
    return [
        f"{name:20s} n={row['n']:5d}  {row['auc_before']:.4f} -> {row['auc_after']:.4f}  "
        f"delta {row['delta']:+.4f} [{row['ci_low']:+.4f}, {row['ci_high']:+.4f}]"
        if row["auc_before"] is not None
        else f"{name:20s} n={row['n']:5d}  one class, no ROC-AUC"
        for name, row in last.items()
    ]
