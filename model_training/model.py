"""The classifier: preprocessing inside the model, InceptionV3 trunk, one malignant logit.

Backend-agnostic Keras 3 (keras.ops only), so the same code trains on TensorFlow here and on
JAX on a lent GPU, and the weights move between them.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import keras
import numpy as np
from keras import layers, ops

from model_training.inception import LAST_BLOCK, inception_features, load_imagenet_weights

INPUT_SIZE = (299, 299)
HEAD_LAYERS = ("embedding", "dropout", "logit")
DISTIL_OUTPUT = "distil"  # training only: [student logit, teachers' mean logit]
# DermAugment's default colour-jitter spreads (factors drawn from 1 +- these).
SATURATION_JITTER = 0.2
CHANNEL_GAIN_JITTER = 0.06
# Share of training views put through a one-hue filter (0: none, the shipped recipes). Sepia
# photos pass the quality gate and collapse the shipped model's sensitivity
# (docs/quality/colour_filter.md); the colour recipe shows it such views.
ONE_HUE_PROBABILITY = 0.0
# A one-hue filter's tint: each channel's gain drawn from this range, then scaled so the
# luma is kept (sepia is about (1.12, 1.0, 0.78) of the grey; equal gains: black and white).
ONE_HUE_GAIN = (0.6, 1.2)
# ITU-R 601 luma weights (R, G, B), as Pillow's convert("L").
LUMA = (0.299, 0.587, 0.114)


def scaling_layer() -> layers.Layer:
    """Pixel scaling of the pinned ImageNet weights: (x - 128) / 128, inside the model."""
    return layers.Rescaling(1.0 / 128.0, offset=-1.0, name="pixel_scaling")


def add_head(features: keras.KerasTensor, dropout: float) -> keras.KerasTensor:
    """Global average pool (the embedding), dropout, one float32 logit."""
    x = layers.GlobalAveragePooling2D(name="embedding")(features)
    x = layers.Dropout(dropout, name="dropout")(x)
    return layers.Dense(1, name="logit", dtype="float32")(x)


def build_classifier(
    input_size: tuple[int, int] = INPUT_SIZE,
    dropout: float = 0.3,
    imagenet_npz: Path | None = None,
) -> keras.Model:
    """InceptionV3 classifier taking float RGB 0..255 images; optional ImageNet initialisation."""
    image = keras.Input((*input_size, 3), name="image")
    features = inception_features(scaling_layer()(image))
    model = keras.Model(image, add_head(features, dropout), name="isic_inceptionv3")
    if imagenet_npz is not None:
        load_imagenet_weights(model, imagenet_npz)
    return model


def build_tiny_classifier(input_size: tuple[int, int] = (64, 64), seed: int = 0) -> keras.Model:
    """A small real CNN with the same interface (for fast tests of export and serving)."""
    keras.utils.set_random_seed(seed)
    image = keras.Input((*input_size, 3), name="image")
    x = scaling_layer()(image)
    x = layers.Conv2D(8, 3, strides=2, padding="same", activation="relu", name="conv_a")(x)
    x = layers.Conv2D(16, 3, strides=2, padding="same", activation="relu", name="conv_b")(x)
    x = layers.Conv2D(16, 3, strides=2, padding="same", activation="relu", name=LAST_BLOCK)(x)
    return keras.Model(image, add_head(x, 0.0), name="tiny_classifier")


def set_trunk_trainable(model: keras.Model, trainable: bool, freeze_bn: bool = True) -> None:
    """Freeze or unfreeze the trunk; batch norm stays frozen (inference mode) when asked."""
    for layer in model.layers:
        if layer.name in HEAD_LAYERS or not layer.weights:
            continue
        if isinstance(layer, layers.BatchNormalization):
            layer.trainable = trainable and not freeze_bn
        else:
            layer.trainable = trainable


class DermAugment(layers.Layer):
    """Cheap, GPU-friendly augmentation for dermoscopy (active only in training).

    Dihedral symmetries (flips and transposes: a lesion has no up or left) and colour jitter
    (brightness, contrast, saturation, per-channel gain for white balance), and with
    ``one_hue`` > 0 that share of views through a one-hue filter (grey times a random tint:
    sepia, black and white, cold or warm "vintage"). With ``domain``
    on, also what differs between cameras and clinics: gamma, a partial Shades-of-Gray colour
    constancy (Finlayson & Trezzi 2004; the model sees images with and without their
    illuminant removed) and a random amount of Gaussian blur. Only elementwise ops, one small
    depthwise convolution and flips, which are fast on every backend; affine warps are not
    (90x slower on JAX).
    """

    def __init__(
        self,
        brightness: float = 0.15,
        contrast: float = 0.2,
        saturation: float = SATURATION_JITTER,
        channel_gain: float = CHANNEL_GAIN_JITTER,
        seed: int | None = None,
        domain: bool = False,
        one_hue: float = ONE_HUE_PROBABILITY,
        **kwargs: Any,
    ) -> None:
        kwargs.setdefault("dtype", "float32")
        super().__init__(**kwargs)
        self.domain = domain
        self.brightness = brightness
        self.contrast = contrast
        self.saturation = saturation
        self.channel_gain = channel_gain
        self.one_hue = one_hue
        self.seed = seed
        self.seed_generator = keras.random.SeedGenerator(seed)

    def _uniform(self, shape: tuple[Any, ...], spread: float) -> Any:
        return keras.random.uniform(
            shape, 1.0 - spread, 1.0 + spread, seed=self.seed_generator, dtype="float32"
        )

    def call(self, images: Any, training: bool | None = None) -> Any:
        x = ops.cast(images, "float32")
        if not training:
            return x
        n = ops.shape(x)[0]
        coin = (n, 1, 1, 1)
        flip_h = keras.random.uniform(coin, seed=self.seed_generator) < 0.5
        x = ops.where(flip_h, ops.flip(x, axis=2), x)
        flip_v = keras.random.uniform(coin, seed=self.seed_generator) < 0.5
        x = ops.where(flip_v, ops.flip(x, axis=1), x)
        if x.shape[1] == x.shape[2]:
            swap = keras.random.uniform(coin, seed=self.seed_generator) < 0.5
            x = ops.where(swap, ops.transpose(x, (0, 2, 1, 3)), x)
        x = x * self._uniform(coin, self.brightness)
        mean = ops.mean(x, axis=(1, 2, 3), keepdims=True)
        x = (x - mean) * self._uniform(coin, self.contrast) + mean
        grey = ops.mean(x, axis=3, keepdims=True)
        x = grey + (x - grey) * self._uniform(coin, self.saturation)
        x = x * self._uniform((n, 1, 1, 3), self.channel_gain)
        x = ops.clip(x, 0.0, 255.0)
        if self.one_hue > 0:
            x = self._one_hue(x, coin)
        if self.domain:
            x = self._domain_shift(x, coin)
        return x

    def _one_hue(self, x: Any, coin: tuple[Any, ...]) -> Any:
        """A ``one_hue`` share of the views: their luma times a random, luma-keeping tint."""
        weights = ops.convert_to_tensor(LUMA, "float32")
        luma = ops.sum(x * weights, axis=3, keepdims=True)
        low, high = ONE_HUE_GAIN
        tint = keras.random.uniform((coin[0], 1, 1, 3), low, high, seed=self.seed_generator)
        tint = tint / ops.sum(tint * weights, axis=3, keepdims=True)
        filtered = ops.clip(luma * tint, 0.0, 255.0)
        chosen = keras.random.uniform(coin, seed=self.seed_generator) < self.one_hue
        return ops.where(chosen, filtered, x)

    def _domain_shift(self, x: Any, coin: tuple[Any, ...]) -> Any:
        """Gamma, partial Shades-of-Gray (p = 6) and blur: how sources differ in look."""
        gamma = ops.exp(keras.random.uniform(coin, -0.3, 0.3, seed=self.seed_generator))
        x = 255.0 * ops.power(x / 255.0 + 1e-6, gamma)
        # Shades of Gray: the illuminant per channel is the 6-norm of that channel.
        illuminant = ops.power(ops.mean(ops.power(x + 1.0, 6.0), axis=(1, 2), keepdims=True), 1 / 6)
        neutral = ops.mean(illuminant, axis=3, keepdims=True) / illuminant
        strength = keras.random.uniform(coin, seed=self.seed_generator)
        strength = ops.where(
            keras.random.uniform(coin, seed=self.seed_generator) < 0.5, strength, 0
        )
        x = x * ops.power(neutral, strength)
        blurred = ops.depthwise_conv(x, self._blur_kernel(), padding="same")
        amount = keras.random.uniform(coin, seed=self.seed_generator)
        amount = ops.where(keras.random.uniform(coin, seed=self.seed_generator) < 0.3, amount, 0)
        x = x + (blurred - x) * amount
        return ops.clip(x, 0.0, 255.0)

    @staticmethod
    def _blur_kernel(size: int = 9, sigma: float = 2.0) -> Any:
        """A [size, size, 3, 1] Gaussian for a per-channel (depthwise) blur."""
        r = np.arange(size, dtype="float32") - (size - 1) / 2
        g = np.exp(-(r**2) / (2 * sigma**2))
        k = np.outer(g, g) / np.outer(g, g).sum()
        return ops.convert_to_tensor(np.tile(k[:, :, None, None], (1, 1, 3, 1)), "float32")

    def get_config(self) -> dict[str, Any]:
        config: dict[str, Any] = super().get_config()
        config.update(
            brightness=self.brightness,
            contrast=self.contrast,
            saturation=self.saturation,
            channel_gain=self.channel_gain,
            seed=self.seed,
            domain=self.domain,
            one_hue=self.one_hue,
        )
        return config


def with_diagnosis_head(classifier: keras.Model, n_classes: int) -> keras.Model:
    """The classifier plus a diagnosis head on the same (dropped-out) embedding.

    For training only: the extra supervision teaches the trunk what tells, say, a benign
    keratosis from a melanoma. It shares every layer with ``classifier``, which is what gets
    saved and exported, so the served model keeps its single malignant logit.
    """
    features = classifier.get_layer("dropout").output
    diagnosis = layers.Dense(n_classes, name="diagnosis", dtype="float32")(features)
    outputs = {"logit": classifier.output, "diagnosis": diagnosis}
    return keras.Model(classifier.input, outputs, name="classifier_with_diagnosis")


def training_model(
    classifier: keras.Model,
    seed: int | None = None,
    device_augment: bool = False,
    teachers: Sequence[keras.Model] = (),
    saturation: float = SATURATION_JITTER,
    channel_gain: float = CHANNEL_GAIN_JITTER,
    one_hue: float = ONE_HUE_PROBABILITY,
) -> keras.Model:
    """Wrap the classifier with augmentation; takes uint8 crops (4x less host→device traffic).
    ``device_augment`` adds DermAugment's source-shift part (the ``domain`` recipe);
    ``saturation`` and ``channel_gain`` are its colour jitter's spreads, ``one_hue`` its
    share of one-hue (sepia-like) views. With
    ``teachers`` (frozen networks, ``model_training.distil``) they score the same augmented
    view, and a ``distil`` output pairs the student's logit with their mean logit."""
    size = classifier.input_shape[1:3]
    crops = keras.Input((*size, 3), dtype="uint8", name="crops")
    augment = DermAugment(
        saturation=saturation, channel_gain=channel_gain, seed=seed, domain=device_augment,
        one_hue=one_hue, name="augment",
    )  # fmt: skip
    view = augment(crops)
    outputs = classifier(view)
    if teachers:
        outputs = add_distil_output(outputs, view, teachers)
    return keras.Model(crops, outputs, name="train_wrapper")


def add_distil_output(
    outputs: Any, view: keras.KerasTensor, teachers: Sequence[keras.Model]
) -> dict[str, Any]:
    """The training model's outputs plus ``distil``: [student logit, teachers' mean logit]."""
    if not teachers:
        raise ValueError("distillation needs at least one teacher")
    named = dict(outputs) if isinstance(outputs, dict) else {"logit": outputs}
    logits = [teacher(view) for teacher in teachers]
    mean = logits[0] if len(logits) == 1 else layers.Average(dtype="float32")(logits)
    joined = layers.Concatenate(name=DISTIL_OUTPUT, dtype="float32")([named["logit"], mean])
    return {**named, DISTIL_OUTPUT: joined}
