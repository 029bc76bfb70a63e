"""InceptionV3 feature extractor with explicit layer names.

The topology follows ``keras.applications.InceptionV3(include_top=False)`` exactly (same 94
convolutions in the same creation order, batch norm without scale, eps 1e-3), with two
deliberate differences:

* layers are named ``conv_NN``/``bn_NN`` in creation order, so weight conversion is a
  one-to-one walk rather than a guess from auto-generated names;
* mixed10's pool branch is a 3x3 stride-1 *max* pool, as in Google's original graph that
  the pinned ImageNet weights come from (Keras uses an average pool there). With it the
  features match the original network.
"""

from __future__ import annotations

from pathlib import Path

import keras
from keras import layers

from model_training.weights import N_CONVS, iter_conv_weights

LAST_BLOCK = "mixed10"
FEATURE_DIM = 2048


class _Builder:
    """Creates conv+BN+ReLU units with sequential names."""

    def __init__(self) -> None:
        self.index = 0

    def conv_bn(
        self,
        x: keras.KerasTensor,
        filters: int,
        kernel: tuple[int, int],
        strides: tuple[int, int] = (1, 1),
        padding: str = "same",
    ) -> keras.KerasTensor:
        i = self.index
        self.index += 1
        x = layers.Conv2D(
            filters, kernel, strides=strides, padding=padding, use_bias=False, name=f"conv_{i:02d}"
        )(x)
        x = layers.BatchNormalization(axis=3, scale=False, epsilon=1e-3, name=f"bn_{i:02d}")(x)
        return layers.Activation("relu", name=f"relu_{i:02d}")(x)


def inception_features(x: keras.KerasTensor) -> keras.KerasTensor:
    """Apply the InceptionV3 trunk to an already scaled image tensor; return mixed10."""
    b = _Builder()
    x = b.conv_bn(x, 32, (3, 3), strides=(2, 2), padding="valid")
    x = b.conv_bn(x, 32, (3, 3), padding="valid")
    x = b.conv_bn(x, 64, (3, 3))
    x = layers.MaxPooling2D((3, 3), strides=(2, 2), name="pool_1")(x)
    x = b.conv_bn(x, 80, (1, 1), padding="valid")
    x = b.conv_bn(x, 192, (3, 3), padding="valid")
    x = layers.MaxPooling2D((3, 3), strides=(2, 2), name="pool_2")(x)

    # mixed0..2: 35 x 35
    for i, pool_filters in enumerate((32, 64, 64)):
        b1 = b.conv_bn(x, 64, (1, 1))
        b5 = b.conv_bn(x, 48, (1, 1))
        b5 = b.conv_bn(b5, 64, (5, 5))
        b3 = b.conv_bn(x, 64, (1, 1))
        b3 = b.conv_bn(b3, 96, (3, 3))
        b3 = b.conv_bn(b3, 96, (3, 3))
        bp = layers.AveragePooling2D((3, 3), strides=(1, 1), padding="same", name=f"pool_m{i}")(x)
        bp = b.conv_bn(bp, pool_filters, (1, 1))
        x = layers.Concatenate(axis=3, name=f"mixed{i}")([b1, b5, b3, bp])

    # mixed3: 17 x 17
    b3 = b.conv_bn(x, 384, (3, 3), strides=(2, 2), padding="valid")
    bd = b.conv_bn(x, 64, (1, 1))
    bd = b.conv_bn(bd, 96, (3, 3))
    bd = b.conv_bn(bd, 96, (3, 3), strides=(2, 2), padding="valid")
    bp = layers.MaxPooling2D((3, 3), strides=(2, 2), name="pool_m3")(x)
    x = layers.Concatenate(axis=3, name="mixed3")([b3, bd, bp])

    # mixed4..7: 17 x 17
    for i, width in zip(range(4, 8), (128, 160, 160, 192), strict=True):
        b1 = b.conv_bn(x, 192, (1, 1))
        b7 = b.conv_bn(x, width, (1, 1))
        b7 = b.conv_bn(b7, width, (1, 7))
        b7 = b.conv_bn(b7, 192, (7, 1))
        bd = b.conv_bn(x, width, (1, 1))
        bd = b.conv_bn(bd, width, (7, 1))
        bd = b.conv_bn(bd, width, (1, 7))
        bd = b.conv_bn(bd, width, (7, 1))
        bd = b.conv_bn(bd, 192, (1, 7))
        bp = layers.AveragePooling2D((3, 3), strides=(1, 1), padding="same", name=f"pool_m{i}")(x)
        bp = b.conv_bn(bp, 192, (1, 1))
        x = layers.Concatenate(axis=3, name=f"mixed{i}")([b1, b7, bd, bp])

    # mixed8: 8 x 8
    b3 = b.conv_bn(x, 192, (1, 1))
    b3 = b.conv_bn(b3, 320, (3, 3), strides=(2, 2), padding="valid")
    b7 = b.conv_bn(x, 192, (1, 1))
    b7 = b.conv_bn(b7, 192, (1, 7))
    b7 = b.conv_bn(b7, 192, (7, 1))
    b7 = b.conv_bn(b7, 192, (3, 3), strides=(2, 2), padding="valid")
    bp = layers.MaxPooling2D((3, 3), strides=(2, 2), name="pool_m8")(x)
    x = layers.Concatenate(axis=3, name="mixed8")([b3, b7, bp])

    # mixed9, mixed10: 8 x 8
    for i in (9, 10):
        b1 = b.conv_bn(x, 320, (1, 1))
        b3 = b.conv_bn(x, 384, (1, 1))
        b3a = b.conv_bn(b3, 384, (1, 3))
        b3b = b.conv_bn(b3, 384, (3, 1))
        b3 = layers.Concatenate(axis=3, name=f"mixed{i}_a")([b3a, b3b])
        bd = b.conv_bn(x, 448, (1, 1))
        bd = b.conv_bn(bd, 384, (3, 3))
        bda = b.conv_bn(bd, 384, (1, 3))
        bdb = b.conv_bn(bd, 384, (3, 1))
        bd = layers.Concatenate(axis=3, name=f"mixed{i}_b")([bda, bdb])
        pool = layers.MaxPooling2D if i == 10 else layers.AveragePooling2D
        bp = pool((3, 3), strides=(1, 1), padding="same", name=f"pool_m{i}")(x)
        bp = b.conv_bn(bp, 192, (1, 1))
        x = layers.Concatenate(axis=3, name=f"mixed{i}")([b1, b3, bd, bp])

    assert b.index == N_CONVS, b.index
    return x


def load_imagenet_weights(model: keras.Model, npz_path: Path) -> None:
    """Copy the converted ImageNet weights into every ``conv_NN``/``bn_NN`` pair of a model."""
    for i, (kernel, bn) in enumerate(iter_conv_weights(npz_path)):
        model.get_layer(f"conv_{i:02d}").set_weights([kernel])
        model.get_layer(f"bn_{i:02d}").set_weights(bn)
