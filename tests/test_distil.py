"""Ensemble distillation: the loss, frozen teachers on the student's own views, the training
wiring and a plan job that distils two earlier networks. All with real Keras models."""

from __future__ import annotations

from pathlib import Path

import keras
import numpy as np
import pytest

from model_training import train as tr
from model_training.distil import DistillationLoss, assign_weights, frozen_teacher
from model_training.loso import network_weights, uses
from model_training.model import (
    DISTIL_OUTPUT,
    build_classifier,
    build_tiny_classifier,
    set_trunk_trainable,
    training_model,
)

FIXTURES = sorted((Path(__file__).parent / "fixtures" / "images").glob("*.jpg"))
SIZE = (75, 75)  # the smallest input InceptionV3 takes


def _network(seed: int, dropout: float = 0.0) -> keras.Model:
    """ImageNet's InceptionV3 with a random head: logits that differ from photo to photo."""
    from model_training.weights import imagenet_weights

    network = build_classifier(SIZE, dropout, imagenet_weights(log=lambda _m: None))
    for variable in network.get_layer("logit").weights:
        variable.assign(np.random.default_rng(seed).normal(0, 0.05, variable.shape))
    return network


def _bernoulli_kl(p: np.ndarray, q: np.ndarray) -> np.ndarray:
    return p * np.log(p / q) + (1 - p) * np.log((1 - p) / (1 - q))


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return 1 / (1 + np.exp(-z))


def test_distillation_loss_is_the_bernoulli_kl_from_the_teacher() -> None:
    student = np.array([-3.0, 0.0, 2.0, 5.0], np.float32)
    teacher = np.array([-1.0, 0.0, 4.0, -2.0], np.float32)
    pred = np.stack([student, teacher], axis=1)
    loss = DistillationLoss(reduction=None)
    got = np.asarray(loss(np.zeros(4), pred))
    np.testing.assert_allclose(got, _bernoulli_kl(_sigmoid(teacher), _sigmoid(student)), rtol=1e-5)
    assert got[1] == pytest.approx(0.0, abs=1e-7)  # agreement costs nothing
    warm = np.asarray(DistillationLoss(temperature=2.0, reduction=None)(np.zeros(4), pred))
    expected = 4.0 * _bernoulli_kl(_sigmoid(teacher / 2), _sigmoid(student / 2))
    np.testing.assert_allclose(warm, expected, rtol=1e-5)
    # Stable where a naive log(sigmoid) would give inf: a confident teacher, a wrong student.
    extreme = np.asarray(loss(np.zeros(1), np.array([[-60.0, 60.0]], np.float32)))
    assert np.isfinite(extreme).all() and extreme[0] == pytest.approx(60.0, rel=1e-3)
    with pytest.raises(ValueError, match="temperature"):
        DistillationLoss(temperature=0.0)


def test_a_frozen_teacher_is_its_network_and_ignores_training_mode() -> None:
    """Same weights as the network it was made from, nothing trainable, and the same answer
    with training on (no dropout, batch norm in inference mode) as the network at inference."""
    network = _network(0, dropout=0.5)
    teacher = frozen_teacher(network_weights(network), SIZE, 0)
    assert teacher.name == "teacher_0" and not teacher.trainable_weights
    images = tr.load_images([str(p) for p in FIXTURES[:4]], SIZE, 1, False).astype("float32")
    reference = np.asarray(network(images, training=False))
    np.testing.assert_allclose(np.asarray(teacher(images, training=True)), reference, atol=1e-5)
    with pytest.raises(ValueError, match="does not match"):
        assign_weights(build_tiny_classifier(SIZE), network_weights(network))


def test_teachers_score_the_same_augmented_view_as_the_student() -> None:
    """A teacher that is the student (dropout off) gives the student's own logit on every
    augmented view, so the two see one view; several teachers are averaged."""
    student = _network(1)
    set_trunk_trainable(student, True, freeze_bn=True)  # as fit_finetune trains it
    same = frozen_teacher(network_weights(student), SIZE, 0)
    model = training_model(student, seed=0, device_augment=True, teachers=[same])
    crops = tr.load_images([str(p) for p in FIXTURES[:4]], SIZE, 1, False)
    out = model(crops, training=True)
    assert set(out) == {"logit", DISTIL_OUTPUT}
    pair = np.asarray(out[DISTIL_OUTPUT])
    np.testing.assert_allclose(pair[:, 0], pair[:, 1], atol=1e-4)
    plain = np.asarray(student(crops.astype("float32"), training=False))[:, 0]
    assert np.abs(pair[:, 0] - plain).max() > 0.05  # the view really was augmented
    assert np.ptp(plain) > 0.1  # and the logits tell photos apart
    other = _network(2)
    second = frozen_teacher(network_weights(other), SIZE, 1)
    both = training_model(student, seed=0, teachers=[same, second])
    pair = np.asarray(both(crops, training=False)[DISTIL_OUTPUT])
    expected = (plain + np.asarray(other(crops.astype("float32")))[:, 0]) / 2
    np.testing.assert_allclose(pair[:, 1], expected, atol=1e-4)


def test_training_on_the_distil_output_alone_pulls_the_student_to_the_teacher() -> None:
    """With all the weight on the teacher, fitting lowers the student's KL from it (labels
    that contradict the teacher are ignored); the weights of both stay apart."""
    size = (32, 32)
    student = build_tiny_classifier(size, seed=0)
    source = build_tiny_classifier(size, seed=7)
    source.get_layer("logit").set_weights(
        [np.random.default_rng(3).normal(0, 0.5, (16, 1)).astype("float32"), np.array([0.5])]
    )
    teacher = keras.Model(source.input, source.output, name="teacher_0")
    teacher.trainable = False
    model = training_model(student, seed=0, teachers=[teacher])
    tr.compile_model(model, keras.optimizers.Adam(1e-2), 0.0, distil_weight=1.0)
    rng = np.random.default_rng(4)
    crops = rng.integers(0, 256, (64, *size, 3), dtype=np.uint8)
    labels = 1.0 - (np.asarray(source(crops.astype("float32")))[:, 0] > 0.5)  # the opposite
    targets = {"logit": labels.astype("float32"), DISTIL_OUTPUT: labels.astype("float32")}

    def kl() -> float:
        pair = np.asarray(model(crops, training=False)[DISTIL_OUTPUT])
        return float(np.mean(_bernoulli_kl(_sigmoid(pair[:, 1]), _sigmoid(pair[:, 0]))))

    before = kl()
    model.fit(crops, targets, batch_size=16, epochs=15, verbose=0)
    assert kl() < 0.5 * before
    kernels = [m.get_layer("logit").get_weights()[0] for m in (student, source)]
    assert not np.allclose(*kernels)


def test_distil_weight_and_teachers_go_together() -> None:
    data = tr.TrainingData(
        tr.load_images([str(FIXTURES[0])] * 2, (79, 79), 1, False), np.array([0, 1]),
        np.ones(2), np.arange(2),
    )  # fmt: skip
    with pytest.raises(ValueError, match="go together"):
        tr.fit_finetune(data, tr.TrainConfig(input_size=SIZE, distil_weight=0.5), None)
    weights = network_weights(build_classifier(SIZE))
    with pytest.raises(ValueError, match="go together"):
        tr.fit_finetune(data, tr.TrainConfig(input_size=SIZE), None, teachers=[weights])
    with pytest.raises(ValueError, match="distil_weight"):
        tr.compile_model(build_tiny_classifier(), "adam", 0.0, distil_weight=1.5)
    with pytest.raises(ValueError, match="distil_weight"):  # not silently a plain model
        tr.compile_model(build_tiny_classifier(), "adam", 0.0, distil_weight=-0.5)


def test_a_job_uses_its_soup_parents_teachers_and_start() -> None:
    job = {"name": "s", "distil_from": ["a", "b"], "start_from": "soup"}
    assert uses(job) == ["a", "b", "soup"]
    assert uses({"name": "soup", "soup_of": ["a", "b"]}) == ["a", "b"]
    assert uses({"name": "plain"}) == []
