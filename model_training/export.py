"""Export a trained classifier as a TensorFlow SavedModel plus its ``metadata.json`` contract.

See docs/ARTIFACT.md. Export needs the TensorFlow backend (training may run on JAX; the
weights are portable, so ``gpu_job`` brings them back here to export).
"""

from __future__ import annotations

import datetime as dt
import json
import shutil
from pathlib import Path
from typing import Any

import keras
import numpy as np

from model_training import __version__

SCHEMA_VERSION = 1
SAVED_MODEL_DIR = "saved_model"
METADATA_FILE = "metadata.json"


OOD_LAYER = "mixed5"
# The 35x35 block whose texture statistics (per-channel mean and standard deviation) join the
# mixed5 means in ``skin_embedding``, the skin gate's input. Measured on three draws of the
# gate's fitting photos (README, skin gate, "Tried and dropped"; gate C 0.5 then):
# left-out-source false rejection 0.86% on average and 2.56% at worst instead of 0.94% and
# 4.32%, and the gates fitted without a source refuse 95.9-100% of held-out non-skin views
# instead of 91.3-99.4%.
TEXTURE_LAYER = "mixed2"


def ood_layer_name(model: keras.Model, feature_layer: str) -> str:
    """The mid-level block whose pooled features feed the out-of-distribution gate.

    Measured on the shipped model: a Mahalanobis score on globally pooled mixed5 features
    rejects 99% of non-lesion photo views at 1.7% false rejection of validation lesions, where
    the last block's (task-specialised) embedding rejected 19%: fine-tuning makes the last
    block map anything onto lesion features, mid-level texture statistics keep the difference.
    """
    names = {layer.name for layer in model.layers}
    return OOD_LAYER if OOD_LAYER in names else feature_layer


def texture_layer_name(model: keras.Model, feature_layer: str) -> str:
    """The early block of ``skin_embedding`` (mixed2; the OOD block in a model without it)."""
    names = {layer.name for layer in model.layers}
    return TEXTURE_LAYER if TEXTURE_LAYER in names else ood_layer_name(model, feature_layer)


def _split_model(model: keras.Model, feature_layer: str) -> tuple[keras.Model, keras.Model]:
    """Trunk (image → [early block, mid block, last block]) and head (block → embedding,
    logit)."""
    early = model.get_layer(texture_layer_name(model, feature_layer)).output
    mid = model.get_layer(ood_layer_name(model, feature_layer)).output
    trunk = keras.Model(
        model.inputs, [early, mid, model.get_layer(feature_layer).output], name="trunk"
    )
    block = keras.Input(model.get_layer(feature_layer).output.shape[1:], name="block")
    embedding = model.get_layer("embedding")(block)
    x = model.get_layer("dropout")(embedding)
    logit = model.get_layer("logit")(x)
    head = keras.Model(block, [embedding, logit], name="head")
    return trunk, head


def export_savedmodel(model: keras.Model, dest: Path, feature_layer: str = "mixed10") -> None:
    """Write ``dest`` as a SavedModel with ``serve`` and ``explain`` endpoints (see ARTIFACT.md)."""
    if keras.backend.backend() != "tensorflow":
        raise RuntimeError("SavedModel export needs KERAS_BACKEND=tensorflow")
    import tensorflow as tf

    trunk, head = _split_model(model, feature_layer)
    height, width = model.input_shape[1:3]
    spec = tf.TensorSpec([None, height, width, 3], tf.float32, name="image")

    def serve(image: tf.Tensor) -> dict[str, tf.Tensor]:
        early, mid, block = trunk(image, training=False)
        embedding, logit = head(block, training=False)
        early = tf.cast(early, tf.float32)
        ood_embedding = tf.reduce_mean(tf.cast(mid, tf.float32), axis=[1, 2])
        return {
            "logit": tf.reshape(tf.cast(logit, tf.float32), [-1]),
            "embedding": tf.cast(embedding, tf.float32),
            "ood_embedding": ood_embedding,
            "skin_embedding": tf.concat(
                [
                    ood_embedding,
                    tf.reduce_mean(early, axis=[1, 2]),
                    tf.math.reduce_std(early, axis=[1, 2]),
                ],
                axis=-1,
            ),
        }

    def normalise(cam: tf.Tensor) -> tf.Tensor:
        cam = tf.nn.relu(cam)
        return tf.math.divide_no_nan(cam, tf.reduce_max(cam, axis=[1, 2], keepdims=True))

    def explain(image: tf.Tensor) -> dict[str, tf.Tensor]:
        # Grad-CAM (Selvaraju et al. 2017) over the last block. `heatmap` shows evidence for
        # "malignant"; `heatmap_benign` the evidence against it (the same map with the sign
        # flipped), so a benign answer can also show where the model looked.
        _, _, block = trunk(image, training=False)
        block = tf.cast(block, tf.float32)
        with tf.GradientTape() as tape:
            tape.watch(block)
            _, logit = head(block, training=False)
            score = tf.reduce_sum(logit)
        grads = tape.gradient(score, block)
        weights = tf.reduce_mean(grads, axis=[1, 2], keepdims=True)
        cam = tf.reduce_sum(weights * block, axis=-1)
        return {
            "logit": tf.reshape(tf.cast(logit, tf.float32), [-1]),
            "heatmap": normalise(cam),
            "heatmap_benign": normalise(-cam),
        }

    archive = keras.export.ExportArchive()
    # No archive.track(): the endpoints' variables are tracked automatically, and tracking
    # the model as well writes every weight twice (175 MB instead of 87 MB).
    archive.add_endpoint("serve", tf.function(serve), input_signature=[spec])
    archive.add_endpoint("explain", tf.function(explain), input_signature=[spec])
    if dest.exists():
        shutil.rmtree(dest)
    archive.write_out(str(dest), verbose=False)


def base_metadata(model: keras.Model, **fields: Any) -> dict[str, Any]:
    """The metadata every artifact carries; callers add metrics, calibration and provenance."""
    height, width = model.input_shape[1:3]
    meta: dict[str, Any] = {
        "schema_version": SCHEMA_VERSION,
        "name": "isic-inceptionv3",
        "version": __version__,
        "created": dt.datetime.now(dt.UTC).replace(microsecond=0).isoformat(),
        "architecture": "InceptionV3" if model.name == "isic_inceptionv3" else model.name,
        "labels": ["benign", "malignant"],
        "positive_label": "malignant",
        "input": {
            "height": int(height),
            "width": int(width),
            "channels": 3,
            "color": "RGB",
            "dtype": "float32",
            "value_range": [0, 255],
            "resize": "bilinear, whole image squashed to square (no crop)",
            "scaling": "inside the model: (x - 128) / 128",
        },
        "endpoints": {
            "serve": ["logit", "embedding", "ood_embedding", "skin_embedding"],
            "explain": ["logit", "heatmap", "heatmap_benign"],
        },
        "temperature": 1.0,
        "logit_bias": 0.0,
        "threshold": 0.5,
        "threshold_rule": "default 0.5 (not calibrated)",
        "risk_tiers": [
            {"name": "low", "lower": 0.0, "upper": 0.2},
            {"name": "moderate", "lower": 0.2, "upper": 0.5},
            {"name": "high", "lower": 0.5, "upper": 1.0},
        ],
        "tta": {"enabled": False},
        "parameters": int(model.count_params()),
    }
    meta.update(fields)
    return meta


def prior_correction(data: list[dict[str, Any]], domain_repeat: dict[str, int]) -> float:
    """Logit shift that undoes class-balanced training (Saerens et al. 2002, prior shift).

    Training weighted the classes equally, i.e. as if half the images were malignant; the
    training data's own malignant share (with the per-domain repeats of an epoch) is pi, so
    add log(pi / (1 - pi)). Derived from the training data only, never from validation.
    """
    positives = total = 0.0
    for row in data:
        repeat = float(domain_repeat.get(str(row.get("domain")), 1))
        positives += repeat * float(row["malignant"])
        total += repeat * float(row["images"])
    if total <= 0 or not 0 < positives < total:
        return 0.0
    pi = positives / total
    return float(np.log(pi / (1.0 - pi)))


def write_metadata(artifact: Path, metadata: dict[str, Any]) -> Path:
    """Write ``metadata.json`` (sorted keys, so diffs between models stay readable)."""
    path = artifact / METADATA_FILE
    path.write_text(json.dumps(metadata, indent=2, sort_keys=True) + "\n")
    return path


def saved_variables(saved_model: Path) -> list[Any]:
    """A SavedModel's variables in the order its checkpoint numbers them (``_all_variables``,
    which keras.export.ExportArchive writes)."""
    import tensorflow as tf

    loaded = tf.saved_model.load(str(saved_model))
    variables = list(getattr(loaded, "_all_variables", []))
    if not variables:
        raise ValueError(f"{saved_model}: no tracked variables (not exported by this project?)")
    return variables


def read_metadata(artifact: Path) -> dict[str, Any]:
    """Read an artifact's ``metadata.json``."""
    data: dict[str, Any] = json.loads((artifact / METADATA_FILE).read_text())
    return data


def export_artifact(
    model: keras.Model, artifact: Path, metadata: dict[str, Any], check: bool = True
) -> Path:
    """SavedModel + metadata into ``artifact``; reload and check it reproduces Keras' logits."""
    artifact.mkdir(parents=True, exist_ok=True)
    export_savedmodel(model, artifact / SAVED_MODEL_DIR)
    write_metadata(artifact, metadata)
    if check:
        import tensorflow as tf

        height, width = model.input_shape[1:3]
        probe = np.random.default_rng(0).uniform(0, 255, (2, height, width, 3)).astype("float32")
        expected = np.asarray(model(probe, training=False)).reshape(-1)
        loaded = tf.saved_model.load(str(artifact / SAVED_MODEL_DIR))
        got = loaded.serve(tf.constant(probe))["logit"].numpy()
        if not np.allclose(got, expected, atol=1e-3, rtol=1e-3):
            raise RuntimeError(f"exported logits {got} differ from Keras {expected}")
    return artifact
