"""Weight averaging of two artifacts ("model soup", Wortsman et al., ICML 2022).

Two networks fine-tuned from the same ImageNet weights usually sit in one basin of the loss,
so the average of their weights is one network that often ranks and generalises better than
either, at the cost of one. ``soup`` writes ``(1 - alpha) * A + alpha * B`` for every
variable (batch-norm statistics included) into a copy of artifact ``A``; the variables are
matched by name and shape, so both must come from the same exporter and architecture.

The copy keeps A's metadata except what describes its weights: a ``soup`` record names both
parents, and the calibration, gates and fast-runtime records are A's until they are refitted
(``evaluate``, ``fit-gates``, ``export-fast``); the server refuses the stale fast-runtime
record by itself (it is tied to the SavedModel's hashes).

    python -m model_training soup --a models/default --b runs/candidate-domain --alpha 0.5 \\
        --out runs/soup-50
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np

from model_training.export import (
    SAVED_MODEL_DIR,
    read_metadata,
    saved_variables,
    write_metadata,
)
from model_training.runner import saved_model_fingerprint

CHECKPOINT = "variables/variables"


def averaged_checkpoint(a: Path, b: Path, alpha: float) -> dict[str, np.ndarray]:
    """Every key of SavedModel ``a``'s checkpoint -> its value, the variables averaged (the
    rest, such as the object graph, kept as they are)."""
    import tensorflow as tf

    reader = tf.train.load_checkpoint(str(a / CHECKPOINT))
    by_name = {v.name: v.numpy() for v in saved_variables(b)}
    out: dict[str, np.ndarray] = {}
    for i, var in enumerate(saved_variables(a)):
        key = f"_all_variables/{i}/.ATTRIBUTES/VARIABLE_VALUE"
        mine = reader.get_tensor(key)
        # The key must hold this very variable, or the written checkpoint would scramble it.
        if mine.shape != tuple(var.shape) or not np.array_equal(mine, var.numpy()):
            raise ValueError(f"{a}: checkpoint key {key} does not hold {var.name}")
        theirs = by_name.get(var.name)
        if theirs is None or theirs.shape != mine.shape:
            raise ValueError(f"{b} has no variable {var.name} of shape {mine.shape}")
        out[key] = ((1.0 - alpha) * mine + alpha * theirs).astype(mine.dtype)
    if len(by_name) != len(out):
        raise ValueError(f"{a} and {b} hold different numbers of variables")
    for key in reader.get_variable_to_shape_map():
        if key not in out:
            out[key] = reader.get_tensor(key)
    return out


def soup(a: Path, b: Path, alpha: float, out: Path) -> Path:
    """Write the weight average of artifacts ``a`` and ``b`` as a new artifact ``out``."""
    import tensorflow as tf

    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    if out.exists():
        raise FileExistsError(f"{out} exists; choose a new folder")
    values = averaged_checkpoint(a / SAVED_MODEL_DIR, b / SAVED_MODEL_DIR, alpha)
    keys = sorted(values)
    shutil.copytree(a, out)
    folder = out / SAVED_MODEL_DIR / "variables"
    for stale in folder.iterdir():
        stale.unlink()
    # The same keys as A's checkpoint (its object graph included), new values.
    tf.raw_ops.SaveV2(
        prefix=str(out / SAVED_MODEL_DIR / CHECKPOINT),
        tensor_names=keys,
        shape_and_slices=[""] * len(keys),
        tensors=[tf.constant(values[k]) for k in keys],
    )
    meta = read_metadata(out)
    meta["soup"] = {
        "method": "(1 - alpha) * a + alpha * b for every variable",
        "alpha": alpha,
        "a": {"artifact": str(a), "fingerprint": saved_model_fingerprint(a)},
        "b": {"artifact": str(b), "fingerprint": saved_model_fingerprint(b)},
        "refit": "calibration, thresholds, gates and the fast runtime are a's until refitted",
    }
    write_metadata(out, meta)
    return out
