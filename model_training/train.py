"""Training: head-only on frozen features (CPU) or two-phase full fine-tuning (GPU).

Backend-agnostic Keras 3. On a lent GPU this runs under JAX with mixed bfloat16; here it runs
under TensorFlow on the CPU. Either way the result is a folder of float16 weight shards that
``export`` turns into the served SavedModel.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import keras
import numpy as np
import pandas as pd

from model_training.crops import CropBatches
from model_training.data import DIAGNOSIS_CLASSES, class_weights, diagnosis_codes
from model_training.distil import DistillationLoss, assign_weights, frozen_teacher
from model_training.model import (
    CHANNEL_GAIN_JITTER,
    DISTIL_OUTPUT,
    INPUT_SIZE,
    ONE_HUE_PROBABILITY,
    SATURATION_JITTER,
    build_classifier,
    set_trunk_trainable,
    training_model,
    with_diagnosis_head,
)
from model_training.preprocessing import load_image_file, resize_to_input

SHARD_BYTES = 15 * 2**20  # download limit from the GPU machine is 16 MiB per file


@dataclass
class TrainConfig:
    """Everything that determines a training run (recorded in the run folder and metadata)."""

    mode: str = "finetune"  # "finetune" (two phases) or "head" (frozen features)
    input_size: tuple[int, int] = INPUT_SIZE
    crop_margin: int = 21  # train images are stored this much larger, then randomly cropped
    batch_size: int = 128
    head_epochs: int = 2
    head_lr: float = 1e-3
    epochs: int = 15
    lr: float = 1e-4
    weight_decay: float = 1e-5
    warmup_epochs: float = 1.0
    dropout: float = 0.3
    label_smoothing: float = 0.0
    # basic: random crops; strong: + rotation and random-resized crops; domain: + artefacts,
    # JPEG and rescaling on the host, and illumination, colour constancy and blur on the device
    # (model_training.augment, model.DermAugment)
    augment: str = "basic"
    min_crop_area: float = 0.35  # strong: smallest crop, as a share of the stored image
    # >0: that share of dermoscopy views made to look like phone close-ups (augment.phone_view;
    # with augment "domain", the "clinical" recipe)
    phone_view: float = 0.0
    # DermAugment's colour jitter, each a factor drawn from 1 +- the value: saturation (0.6:
    # 40% to 160%, as muted and vivid phone photos come, docs/quality/photo_changes.txt) and
    # per-channel gain (white balance: warm or cool light)
    saturation_jitter: float = SATURATION_JITTER
    channel_gain_jitter: float = CHANNEL_GAIN_JITTER
    # share of views through a one-hue filter (sepia, black and white, tints): sepia photos
    # pass the quality gate and collapse the shipped model (docs/quality/colour_filter.md)
    one_hue_probability: float = ONE_HUE_PROBABILITY
    # diagnoses left out of training (scored as usual): where sources disagree on the label,
    # as on actinic keratoses (HAM10000 "akiec": malignant; PAD-UFES-20 "ACK": benign)
    ignore_diagnoses: tuple[str, ...] = ()
    ema: bool = False  # exponential moving average of the weights (kept at the end)
    ema_momentum: float = 0.99
    aux_diagnosis: float = 0.0  # >0: weight of an auxiliary diagnosis loss (training only)
    # >0 (with teachers, a plan's "distil_from"): share of the loss on matching the teachers'
    # mean logit on each view (model_training.distil); the rest stays on the labels
    distil_weight: float = 0.0
    distil_temperature: float = 1.0
    domain_repeat: dict[str, int] = field(default_factory=lambda: {"phone": 3})
    mixed_precision: str = "auto"  # auto | bfloat16 | float16 | off
    seed: int = 1234
    workers: int = 8
    limit: int = 0  # >0: a smoke run on that many images

    def to_json(self) -> dict[str, Any]:
        """JSON-ready dict."""
        return asdict(self)


def log(msg: str) -> None:
    """Timestamped progress line (flushes: remote logs must arrive in order)."""
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def load_images(
    paths: Sequence[str], size: tuple[int, int], workers: int = 8, progress: bool = True
) -> np.ndarray:
    """Decode and resize images through the shared preprocessing path into uint8 [N, H, W, 3]."""
    out = np.empty((len(paths), *size, 3), dtype=np.uint8)

    def one(i: int) -> None:
        out[i] = np.asarray(resize_to_input(load_image_file(paths[i]), size), dtype=np.uint8)

    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        iterator = pool.map(one, range(len(paths)))
        if progress:
            from tqdm import tqdm

            iterator = tqdm(iterator, total=len(paths), desc="decode", unit="img")
        for _ in iterator:
            pass
    return out


def learned_rows(frame: pd.DataFrame, ignore: Sequence[str]) -> np.ndarray:
    """Rows training may learn from: every row whose diagnosis is not in ``ignore`` (any case)."""
    if not ignore:
        return np.ones(len(frame), dtype=bool)
    if "diagnosis" not in frame:
        raise ValueError(f"ignore_diagnoses {list(ignore)} needs a diagnosis column")
    names = frame["diagnosis"].astype(str).str.lower()
    return ~names.isin({d.lower() for d in ignore}).to_numpy()


def epoch_index(domains: np.ndarray, repeat: dict[str, int]) -> np.ndarray:
    """Row indices for one epoch, repeating rows of under-represented domains."""
    parts = [np.repeat(np.flatnonzero(domains == d), repeat.get(str(d), 1)) for d in set(domains)]
    return np.sort(np.concatenate(parts))


def setup_precision(choice: str) -> str:
    """Set Keras' global dtype policy; 'auto' uses bfloat16 on a GPU under JAX."""
    policy = "float32"
    if choice == "auto":
        if keras.backend.backend() == "jax":
            import jax

            if any(d.platform == "gpu" for d in jax.devices()):
                policy = "mixed_bfloat16"
    elif choice in ("bfloat16", "float16"):
        policy = f"mixed_{choice}"
    keras.mixed_precision.set_global_policy(policy)
    return policy


def save_weight_shards(model: keras.Model, dest: Path, dtype: str = "float16") -> list[Path]:
    """Save every variable by path into ``.npz`` shards under SHARD_BYTES (download limit)."""
    dest.mkdir(parents=True, exist_ok=True)
    shards: list[dict[str, np.ndarray]] = [{}]
    size = 0
    for variable in model.weights:
        value = np.asarray(keras.ops.convert_to_numpy(variable)).astype(dtype)
        if size + value.nbytes > SHARD_BYTES and shards[-1]:
            shards.append({})
            size = 0
        shards[-1][variable.path] = value
        size += value.nbytes
    paths = []
    for i, shard in enumerate(shards):
        path = dest / f"weights-{i:02d}-of-{len(shards):02d}.npz"
        np.savez(path, **shard)  # type: ignore[arg-type]
        paths.append(path)
    return paths


def load_weight_shards(model: keras.Model, src: Path) -> None:
    """Load shards written by ``save_weight_shards`` (any backend), matching by variable path."""
    values: dict[str, np.ndarray] = {}
    for path in sorted(src.glob("weights-*.npz")):
        with np.load(path) as data:
            values.update({k: data[k] for k in data.files})
    missing = [v.path for v in model.weights if v.path not in values]
    if missing:
        raise ValueError(f"{len(missing)} variable(s) missing from {src}, e.g. {missing[:3]}")
    for variable in model.weights:
        variable.assign(values[variable.path].astype(variable.dtype))


def compile_model(
    model: keras.Model,
    optimizer: keras.optimizers.Optimizer,
    smoothing: float,
    aux_diagnosis: float = 0.0,
    distil_weight: float = 0.0,
    distil_temperature: float = 1.0,
) -> None:
    """Weighted binary cross-entropy on the logit, with a running AUC; with ``aux_diagnosis``
    > 0 the model also has a ``diagnosis`` output, trained by cross-entropy at that weight;
    with ``distil_weight`` > 0 a ``distil`` output, trained towards the teachers' answer at
    that weight (the labels keep the rest)."""
    if not 0.0 <= distil_weight <= 1.0:  # checked first: a negative weight must not pass
        raise ValueError(f"distil_weight must be in [0, 1], got {distil_weight}")
    bce = keras.losses.BinaryCrossentropy(from_logits=True, label_smoothing=smoothing)
    auc = keras.metrics.AUC(from_logits=True, name="auc")
    if aux_diagnosis <= 0 and distil_weight <= 0:
        model.compile(optimizer=optimizer, loss=bce, weighted_metrics=[], metrics=[auc])
        return
    losses: dict[str, Any] = {"logit": bce}
    weights = {"logit": 1.0 - distil_weight}
    if aux_diagnosis > 0:
        losses["diagnosis"] = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
        weights["diagnosis"] = aux_diagnosis
    if distil_weight > 0:
        losses[DISTIL_OUTPUT] = DistillationLoss(distil_temperature)
        weights[DISTIL_OUTPUT] = distil_weight
    model.compile(
        optimizer=optimizer,
        loss=losses,
        loss_weights=weights,
        weighted_metrics={name: [] for name in losses},
        metrics={name: [auc] if name == "logit" else [] for name in losses},
    )


class EpochTimer(keras.callbacks.Callback):  # type: ignore[misc]
    """Wall time per epoch: the first includes compilation, later ones are the steady state."""

    def __init__(self) -> None:
        super().__init__()
        self.times: list[float] = []
        self._start = 0.0

    def on_epoch_begin(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        self._start = time.perf_counter()

    def on_epoch_end(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        self.times.append(time.perf_counter() - self._start)


def _merge(history: dict[str, list[Any]], new: dict[str, list[Any]], phase: str) -> None:
    for key, values in new.items():
        history.setdefault(key, []).extend(float(v) for v in values)
    history.setdefault("phase", []).extend([phase] * len(next(iter(new.values()), [])))


@dataclass
class TrainingData:
    """Decoded training images (stored larger than the input, for cropping) and their labels."""

    images: np.ndarray
    labels: np.ndarray
    weights: np.ndarray
    index: np.ndarray
    diagnoses: np.ndarray | None = None  # DIAGNOSIS_CLASSES codes (auxiliary head only)
    dermoscopy: np.ndarray | None = None  # per image: a dermoscopy photo (for phone_view)


def prepare_training_data(
    train: pd.DataFrame,
    config: TrainConfig,
    progress: Callable[[str], None] = log,
    with_diagnoses: bool = False,
) -> TrainingData:
    """Decode once; class-balanced sample weights; phone photos repeated per epoch; diagnosis
    codes when an auxiliary diagnosis head will train on this data."""
    store = (config.input_size[0] + config.crop_margin, config.input_size[1] + config.crop_margin)
    t0 = time.time()
    images = load_images(train["path"].tolist(), store, config.workers, progress=True)
    progress(f"decoded {len(images)} images at {store} in {time.time() - t0:.1f}s")
    labels = train["label"].to_numpy()
    keep = learned_rows(train, config.ignore_diagnoses)
    cw = class_weights(labels[keep])
    weights = np.where(labels == 1, cw[1], cw[0])
    index = epoch_index(train["domain"].to_numpy(), config.domain_repeat)
    index = index[keep[index]]
    diagnoses = diagnosis_codes(train["diagnosis"]) if with_diagnoses else None
    dermoscopy = (train["domain"] == "dermoscopy").to_numpy()
    return TrainingData(images, labels, weights, index, diagnoses, dermoscopy)


def train_finetune(
    train: pd.DataFrame,
    config: TrainConfig,
    imagenet_npz: Path,
    progress: Callable[[str], None] = log,
) -> tuple[keras.Model, dict[str, list[Any]]]:
    """Decode the data, then run :func:`fit_finetune`."""
    keras.utils.set_random_seed(config.seed)
    policy = setup_precision(config.mixed_precision)
    progress(f"backend {keras.backend.backend()}, dtype policy {policy}")
    data = prepare_training_data(train, config, progress, config.aux_diagnosis > 0)
    return fit_finetune(data, config, imagenet_npz, progress)


def fit_finetune(
    data: TrainingData,
    config: TrainConfig,
    imagenet_npz: Path | None,
    progress: Callable[[str], None] = log,
    teachers: Sequence[dict[str, np.ndarray]] = (),
    start: dict[str, np.ndarray] | None = None,
) -> tuple[keras.Model, dict[str, list[Any]]]:
    """Phase 1: the head on the frozen trunk. Phase 2: the whole network, batch norm frozen.

    ``teachers`` (networks' weights by variable path) turn it into distillation at
    ``config.distil_weight``; ``start`` begins from those weights instead of ImageNet's."""
    if config.aux_diagnosis > 0 and data.diagnoses is None:
        raise ValueError("aux_diagnosis needs the data prepared with_diagnoses=True")
    if bool(teachers) != (config.distil_weight > 0):
        raise ValueError("distil_weight > 0 and teachers go together (a plan's distil_from)")
    keras.utils.set_random_seed(config.seed)
    batches = CropBatches(
        data.images, data.labels, data.weights, data.index, config.input_size,
        config.batch_size, config.seed, config.workers, config.augment, config.min_crop_area,
        data.diagnoses if config.aux_diagnosis > 0 else None, config.phone_view, data.dermoscopy,
        bool(teachers),
    )  # fmt: skip
    # ImageNet's weights only when nothing else is given to start from
    initial = imagenet_npz if start is None else None
    classifier = build_classifier(config.input_size, config.dropout, initial)
    if start is not None:
        assign_weights(classifier, start)
    trained = classifier
    if config.aux_diagnosis > 0:
        trained = with_diagnosis_head(classifier, len(DIAGNOSIS_CLASSES))
    frozen = [frozen_teacher(values, config.input_size, i) for i, values in enumerate(teachers)]
    model = training_model(
        trained, seed=config.seed, device_augment=config.augment == "domain", teachers=frozen,
        saturation=config.saturation_jitter, channel_gain=config.channel_gain_jitter,
        one_hue=config.one_hue_probability,
    )  # fmt: skip
    losses = (config.label_smoothing, config.aux_diagnosis, config.distil_weight,
              config.distil_temperature)  # fmt: skip
    history: dict[str, list[Any]] = {}

    set_trunk_trainable(classifier, False)
    compile_model(model, keras.optimizers.Adam(config.head_lr), *losses)
    t0 = time.time()
    fit = model.fit(batches, epochs=config.head_epochs, verbose=2)
    _merge(history, fit.history, "head")
    progress(f"phase 1 (head) done in {time.time() - t0:.1f}s")

    set_trunk_trainable(classifier, True, freeze_bn=True)
    steps = len(batches) * config.epochs
    warmup = int(len(batches) * config.warmup_epochs)
    schedule = keras.optimizers.schedules.CosineDecay(
        initial_learning_rate=config.lr / 10,
        decay_steps=max(1, steps - warmup),
        warmup_target=config.lr,
        warmup_steps=warmup,
        alpha=0.01,
    )
    optimizer = keras.optimizers.AdamW(
        schedule,
        weight_decay=config.weight_decay,
        use_ema=config.ema,
        ema_momentum=config.ema_momentum,
    )
    compile_model(model, optimizer, *losses)
    timer = EpochTimer()
    t0 = time.time()
    fit = model.fit(batches, epochs=config.epochs, verbose=2, callbacks=[timer])
    elapsed = time.time() - t0
    _merge(history, fit.history, "finetune")
    per_epoch = len(batches) * config.batch_size
    steady = timer.times[1:] or timer.times
    history["epoch_seconds"] = timer.times
    history["train_images_per_second"] = [per_epoch / float(np.median(steady))]
    progress(
        f"phase 2 (full) done in {elapsed:.1f}s; train step {per_epoch / np.median(steady):.0f} "
        f"images/s (median of epochs after the first; the first, with compile, "
        f"took {timer.times[0]:.1f}s)"
    )
    return classifier, history


def train_head(
    train: pd.DataFrame,
    config: TrainConfig,
    imagenet_npz: Path,
    cache: Path | None = None,
    progress: Callable[[str], None] = log,
) -> tuple[keras.Model, dict[str, list[Any]]]:
    """CPU recipe: cache frozen ImageNet embeddings once, then fit the head on them."""
    keras.utils.set_random_seed(config.seed)
    classifier = build_classifier(config.input_size, config.dropout, imagenet_npz)
    embeddings = embed_images(classifier, train["path"].tolist(), cache, config.batch_size)
    labels = train["label"].to_numpy().astype("float32")
    cw = class_weights(labels)
    emb = keras.Input((embeddings.shape[1],))
    x = keras.layers.Dropout(config.dropout)(emb)
    out = keras.layers.Dense(1, kernel_regularizer=keras.regularizers.L2(1e-4))(x)
    head = keras.Model(emb, out)
    compile_model(head, keras.optimizers.Adam(config.head_lr), config.label_smoothing)
    fit = head.fit(
        embeddings, labels, batch_size=256, epochs=config.epochs, class_weight=cw, verbose=2,
        shuffle=True,
    )  # fmt: skip
    classifier.get_layer("logit").set_weights(head.layers[-1].get_weights())
    history: dict[str, list[Any]] = {}
    _merge(history, fit.history, "head")
    return classifier, history


def embed_images(
    classifier: keras.Model, paths: Sequence[str], cache: Path | None, batch_size: int = 32
) -> np.ndarray:
    """Global-pooled trunk features of images, cached in ``cache`` (an .npz) when given."""
    if cache is not None and cache.exists():
        with np.load(cache, allow_pickle=False) as data:
            if list(data["paths"]) == list(paths):
                return np.asarray(data["embeddings"])
    from tqdm import tqdm

    embedder = keras.Model(classifier.inputs, classifier.get_layer("embedding").output)
    size = classifier.input_shape[1:3]
    chunks = []
    step = max(1, min(batch_size, 32))
    for start in tqdm(range(0, len(paths), step), desc="embed", unit="batch"):
        batch = load_images(paths[start : start + step], size, workers=2, progress=False)
        chunks.append(np.asarray(embedder.predict_on_batch(batch.astype("float32"))))
    embeddings = np.concatenate(chunks).astype("float32")
    if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        np.savez(cache, paths=np.asarray(paths), embeddings=embeddings)
    return embeddings


def write_run(run_dir: Path, classifier: keras.Model, history: dict[str, Any], info: dict) -> None:
    """Weights shards, history and the run description into ``run_dir``."""
    save_weight_shards(classifier, run_dir / "weights")
    (run_dir / "history.json").write_text(json.dumps(history, indent=1))
    (run_dir / "run.json").write_text(json.dumps(info, indent=2, sort_keys=True, default=str))


def steps_summary(n_images: int, config: TrainConfig) -> str:
    """One line describing the schedule (for logs)."""
    per_epoch = math.floor(n_images / config.batch_size)
    return f"{n_images} images/epoch, {per_epoch} steps/epoch, batch {config.batch_size}"
