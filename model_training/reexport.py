"""Write an artifact's SavedModel again with the current exporter, weights untouched.

An exporter change (a new ``serve`` output, such as ``skin_embedding``) otherwise needs the
training run's weights, which live on the machine that trained them. The SavedModel already
holds every weight: the Keras network is rebuilt from ``metadata.json`` (architecture and
input size), each variable is copied in by name, and the new SavedModel must give the old
one's outputs to 1e-5 on probe images before it replaces it. Metadata keeps everything but
``endpoints`` (the new exporter's) and gains a ``reexport`` record.

What depends on the SavedModel's bytes is then stale and is refitted as after any export:
``fit-gates`` (to use a new output) and ``export-fast`` (its record is tied to the file
hashes; until then the server refuses it and serves on TensorFlow).

    python -m model_training reexport --artifact models/default
"""

from __future__ import annotations

import datetime as dt
import shutil
from pathlib import Path
from typing import Any

import keras
import numpy as np

from model_training.export import (
    SAVED_MODEL_DIR,
    base_metadata,
    export_savedmodel,
    read_metadata,
    saved_variables,
    write_metadata,
)
from model_training.runner import saved_model_fingerprint

PROBE_IMAGES = 4
TOLERANCE = 1e-5


def rebuild(meta: dict[str, Any]) -> keras.Model:
    """An untrained network of the artifact's architecture and input size."""
    from model_training.model import build_classifier, build_tiny_classifier

    size = (int(meta["input"]["height"]), int(meta["input"]["width"]))
    architecture = meta.get("architecture")
    if architecture == "InceptionV3":
        dropout = float(meta.get("training", {}).get("config", {}).get("dropout", 0.3))
        return build_classifier(size, dropout)
    if architecture == "tiny_classifier":
        return build_tiny_classifier(size)
    raise ValueError(f"cannot rebuild architecture {architecture!r}")


def copy_weights(model: keras.Model, saved_model: Path) -> int:
    """Assign every weight of ``model`` from the SavedModel's variable of the same name."""
    stored = {v.name.rsplit(":", 1)[0]: v.numpy() for v in saved_variables(saved_model)}
    wanted = {w.path: w for w in model.weights}
    if set(stored) != set(wanted):
        missing, extra = sorted(set(wanted) - set(stored)), sorted(set(stored) - set(wanted))
        raise ValueError(f"variables differ: missing {missing[:5]}, unexpected {extra[:5]}")
    for name, weight in wanted.items():
        if tuple(weight.shape) != stored[name].shape:
            raise ValueError(f"{name}: shape {stored[name].shape}, network wants {weight.shape}")
        weight.assign(stored[name])
    return len(wanted)


def max_output_difference(old: Path, new: Path, size: tuple[int, int]) -> dict[str, float]:
    """Per output that both SavedModels' ``serve`` share: the largest absolute difference."""
    import tensorflow as tf

    probe = np.random.default_rng(0).uniform(0, 255, (PROBE_IMAGES, *size, 3)).astype("float32")
    # Keep the loaded objects alive while their functions run (they own the variables).
    first, second = tf.saved_model.load(str(old)), tf.saved_model.load(str(new))
    a, b = first.serve(tf.constant(probe)), second.serve(tf.constant(probe))
    return {k: float(np.max(np.abs(a[k].numpy() - b[k].numpy()))) for k in a if k in b}


def reexport(artifact: Path) -> dict[str, Any]:
    """Rewrite ``artifact``'s SavedModel with the current exporter; return the record."""
    meta = read_metadata(artifact)
    model = rebuild(meta)
    old = artifact / SAVED_MODEL_DIR
    copied = copy_weights(model, old)
    staged = artifact / f"{SAVED_MODEL_DIR}.new"
    if staged.exists():
        shutil.rmtree(staged)
    export_savedmodel(model, staged)
    size = (int(meta["input"]["height"]), int(meta["input"]["width"]))
    differences = max_output_difference(old, staged, size)
    if "logit" not in differences or max(differences.values()) > TOLERANCE:
        shutil.rmtree(staged)
        raise RuntimeError(f"re-exported outputs differ from the original: {differences}")
    record = {
        "created": dt.datetime.now(dt.UTC).replace(microsecond=0).isoformat(),
        "from_fingerprint": saved_model_fingerprint(artifact),
        "variables_copied": copied,
        "max_abs_difference_on_probe": differences,
        "endpoints_before": meta.get("endpoints"),
    }
    retired = artifact / f"{SAVED_MODEL_DIR}.old"
    if retired.exists():
        shutil.rmtree(retired)
    old.rename(retired)
    staged.rename(old)
    shutil.rmtree(retired)
    meta["endpoints"] = base_metadata(model)["endpoints"]
    meta["reexport"] = record
    write_metadata(artifact, meta)
    return record
