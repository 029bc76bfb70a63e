"""Ensemble distillation: one network fitted to the mean logit of frozen teacher networks.

Two fine-tuned networks averaged in their logits can rank better than their weight average
(the soup the shipped model is): on the 2026-11-30 runs, on dermoscopy from a source neither
saw, though not on phone photos from one (README, "Distillation"). Serving two InceptionV3s
would double the cost of every request. Distillation (Hinton et al. 2015) trains one student
to match the ensemble instead. The teachers score the very views the student trains on, after every
augmentation ("function matching", Beyer et al. 2022: a consistent and patient teacher), so
the student learns the ensemble's answer on every crop, colour shift and artefact the recipe
draws, not only on the clean training photo.

Backend-agnostic Keras 3: the teachers sit inside the training model as frozen layers, and
the student's loss on the ``distil`` output is the Bernoulli KL divergence from the teachers'
probability, so the same code trains under TensorFlow here and JAX on a lent GPU.
"""

from __future__ import annotations

from typing import Any

import keras
import numpy as np
from keras import ops

from model_training.model import build_classifier


class DistillationLoss(keras.losses.Loss):  # type: ignore[misc]
    """KL(teacher || student) of the malignant probability at a temperature, times T**2.

    ``y_pred[..., 0]`` is the student's logit and ``y_pred[..., 1]`` the teachers' mean logit;
    ``y_true`` is ignored. Zero when the two agree; T**2 keeps the gradient's scale at any T.
    """

    def __init__(self, temperature: float = 1.0, name: str = "distillation", **kwargs: Any):
        if temperature <= 0:
            raise ValueError(f"temperature must be positive, got {temperature}")
        super().__init__(name=name, **kwargs)
        self.temperature = float(temperature)

    def call(self, y_true: Any, y_pred: Any) -> Any:
        del y_true
        y_pred = ops.cast(y_pred, "float32")
        s = y_pred[..., 0] / self.temperature
        t = y_pred[..., 1] / self.temperature
        p = ops.sigmoid(t)
        # log sigmoid(z) = -softplus(-z), log(1 - sigmoid(z)) = -softplus(z): stable at any z.
        kl = p * (ops.softplus(-s) - ops.softplus(-t)) + (1.0 - p) * (
            ops.softplus(s) - ops.softplus(t)
        )
        return self.temperature**2 * kl

    def get_config(self) -> dict[str, Any]:
        config: dict[str, Any] = super().get_config()
        config["temperature"] = self.temperature
        return config


def frozen_teacher(
    values: dict[str, np.ndarray], input_size: tuple[int, int], index: int
) -> keras.Model:
    """A classifier holding a trained network's weights (by variable path), frozen.

    Built without dropout: the training model passes ``training=True`` to every layer inside
    it, so a teacher's dropout would otherwise be on. Its batch norm is frozen by
    ``trainable = False`` (Keras runs a non-trainable BatchNormalization in inference mode).
    """
    classifier = build_classifier(input_size, dropout=0.0)
    assign_weights(classifier, values)
    # A distinct name: the training model holds the student and every teacher side by side.
    teacher = keras.Model(classifier.input, classifier.output, name=f"teacher_{index}")
    teacher.trainable = False
    return teacher


def assign_weights(model: keras.Model, values: dict[str, np.ndarray]) -> None:
    """Give every float variable of ``model`` the value stored under its path."""
    weights = [v for v in model.variables if is_weight(v)]
    mismatch = {v.path for v in weights} ^ values.keys()
    if mismatch:
        raise ValueError(f"the network does not match the classifier: {sorted(mismatch)[:5]}")
    for variable in weights:
        variable.assign(values[variable.path].astype(variable.dtype))


def is_weight(variable: Any) -> bool:
    """A float variable: a weight or a batch-norm statistic. Dropout's seed state is not one,
    and its path depends on how many seed generators the process made before."""
    return bool(
        np.issubdtype(np.dtype(keras.backend.standardize_dtype(variable.dtype)), np.floating)
    )
