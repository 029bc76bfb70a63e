"""The out-of-distribution detector (NumPy Mahalanobis with Ledoit–Wolf shrinkage)."""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from model_training.ood import OODDetector, ledoit_wolf_shrinkage


@pytest.fixture(scope="module")
def cluster() -> np.ndarray:
    """A correlated, anisotropic Gaussian cluster: 300 points in 64 dimensions."""
    rng = np.random.default_rng(0)
    mixing = rng.normal(size=(64, 64)) * rng.uniform(0.1, 2.0, size=64)
    return rng.normal(size=(300, 64)) @ mixing.T + 5.0


def test_flags_far_points_not_in_cluster_ones(cluster: np.ndarray) -> None:
    det = OODDetector.fit(cluster[:200])
    inside = det.score(cluster[200:])
    threshold = float(np.quantile(det.score(cluster[:200]), 0.99)) * 1.5
    det.threshold = threshold
    rng = np.random.default_rng(1)
    far = cluster.mean(axis=0) + rng.normal(size=(50, 64)) * cluster.std() * 3
    assert det.is_outlier(far).all()
    assert det.is_outlier(cluster[200:]).mean() < 0.05
    assert np.median(det.score(far)) > 10 * np.median(inside)


def test_weights_a_shift_by_how_little_the_data_vary_that_way(cluster: np.ndarray) -> None:
    """A step off the training manifold counts more than the same step along it."""
    det = OODDetector.fit(cluster)
    centred = cluster - cluster.mean(axis=0)
    _, _, vt = np.linalg.svd(centred, full_matrices=False)
    step = np.linalg.norm(centred, axis=1).mean() * 0.5
    along_weakest = det.score(cluster[:20] + vt[-1] * step)
    along_strongest = det.score(cluster[:20] + vt[0] * step)
    assert (along_weakest > 3 * along_strongest).all()
    assert (along_weakest > 3 * det.score(cluster[:20])).all()


def test_matches_scikit_learn_ledoit_wolf(cluster: np.ndarray) -> None:
    covariance = pytest.importorskip("sklearn.covariance")
    x = cluster[:40]  # fewer points than dimensions: the shrinkage does the work
    lw = covariance.LedoitWolf().fit(x)
    det = OODDetector.fit(x)
    assert ledoit_wolf_shrinkage(x - x.mean(axis=0)) == pytest.approx(lw.shrinkage_)
    probe = np.random.default_rng(2).normal(size=(5, 64)) * 3
    np.testing.assert_allclose(det.score(probe), lw.mahalanobis(probe), rtol=1e-6)


def test_more_dimensions_than_points_stays_finite() -> None:
    rng = np.random.default_rng(3)
    x = np.maximum(rng.normal(size=(32, 512)), 0)  # ReLU-like, some all-zero features
    x[:, :10] = 0.0
    det = OODDetector.fit(x)
    scores = det.score(np.vstack([x, x + 1.0]))
    assert np.all(np.isfinite(scores)) and (scores[32:] > scores[:32].max()).all()


def test_group_means_take_the_nearest(cluster: np.ndarray) -> None:
    shifted = cluster + 200.0
    data = np.vstack([cluster, shifted])
    groups = ["a"] * len(cluster) + ["b"] * len(shifted)
    single = OODDetector.fit(data)
    middle = (cluster.mean(axis=0) + shifted.mean(axis=0))[None] / 2
    for tied in (False, True):
        det = OODDetector.fit(data, groups=groups, tied=tied)
        assert det.group_names == ("a", "b") and det.tied is tied
        assert det.group_scores(middle).shape == (1, 2)
        # Halfway between two clusters is unusual for two Gaussians, typical for one.
        assert det.score(middle)[0] > 10 * np.median(det.score(data))
        assert single.score(middle)[0] < det.score(middle)[0]


def test_each_group_keeps_its_own_covariance() -> None:
    """A spread that is normal for one group is not normal for the other."""
    rng = np.random.default_rng(4)
    a = rng.normal(size=(400, 8)) * [30, 1, 1, 1, 1, 1, 1, 1]
    b = rng.normal(size=(400, 8)) * [1, 30, 1, 1, 1, 1, 1, 1] + [0, 0, 100, 0, 0, 0, 0, 0]
    data, groups = np.vstack([a, b]), ["a"] * 400 + ["b"] * 400
    probe = np.asarray([[0.0, 60.0, 0, 0, 0, 0, 0, 0]])  # group a's centre, b's direction
    untied = OODDetector.fit(data, groups=groups)
    tied = OODDetector.fit(data, groups=groups, tied=True)
    assert untied.score(probe)[0] > 20 * np.quantile(untied.score(data), 0.99)
    assert tied.score(probe)[0] < np.quantile(tied.score(data), 0.99)


def test_truncated_components_shrink_the_file_and_keep_order(
    cluster: np.ndarray, tmp_path: Path
) -> None:
    full = OODDetector.fit(cluster)
    small = OODDetector.fit(cluster, n_components=8)
    assert small.describe()["n_components"] == [8] and full.describe()["n_components"] == [64]
    far = cluster[:5] * 4
    assert (small.score(far) > np.median(small.score(cluster))).all()
    assert (
        small.save(tmp_path / "s.npz").stat().st_size < full.save(tmp_path / "f.npz").stat().st_size
    )


def test_save_load_round_trip(cluster: np.ndarray, tmp_path: Path) -> None:
    det = OODDetector.fit(cluster, groups=["x", "y"] * 150)
    path = det.save(tmp_path / "ood.npz")
    back = OODDetector.load(path, threshold=123.5)
    assert back.threshold == 123.5 and back.group_names == ("x", "y")
    assert back.n_fit == (150, 150) and back.shrinkage == pytest.approx(det.shrinkage)
    assert back.describe() == {**det.describe(), "threshold": 123.5}
    probe = np.vstack([cluster[:10], cluster[:10] * 3])
    np.testing.assert_array_equal(back.score(probe), det.score(probe))
    assert back.is_outlier(probe).tolist() == (det.score(probe) > 123.5).tolist()
    with np.load(path, allow_pickle=False) as data:  # no pickled objects in the file
        assert "threshold" not in data.files


def test_default_threshold_flags_nothing_and_bad_input_is_refused(cluster: np.ndarray) -> None:
    det = OODDetector.fit(cluster)
    assert det.threshold == math.inf and not det.is_outlier(cluster * 100).any()
    assert det.score(cluster[0]).shape == (1,)
    nan = cluster[:1].copy()
    nan[0, 0] = np.nan
    det.threshold = 1e12
    assert det.is_outlier(nan).all()  # NaN never passes as in-distribution
    with pytest.raises(ValueError):
        det.score(np.zeros((2, 3)))
    with pytest.raises(ValueError):
        OODDetector.fit(cluster[:1])
    with pytest.raises(ValueError):
        OODDetector.fit(cluster, groups=["a"])
    with pytest.raises(ValueError):  # a group of one cannot have its own covariance
        OODDetector.fit(cluster[:3], groups=["a", "a", "b"])


def test_operating_threshold_bounds_each_domains_false_rejection() -> None:
    from model_training.gates import frr_threshold

    rng = np.random.default_rng(5)
    scores = {"dermoscopy": rng.gamma(5, 10, 1500), "phone": rng.gamma(5, 20, 125)}
    t = frr_threshold(scores, 0.02)
    assert all(np.mean(s > t) <= 0.02 for s in scores.values())
    assert np.mean(scores["phone"] > t * 0.999) > 0  # the smallest such threshold


def test_views_of_one_photo_stay_on_one_side_of_the_split() -> None:
    from PIL import Image

    from model_training.gates import photo_views, split_photos

    photos = [(f"src{i % 2}/p{i}", Image.new("RGB", (120, 90), (i, 0, 0))) for i in range(7)]
    views = photo_views(photos, n_crops=4, seed=0)
    assert len(views) == 7 * 5
    assert all(img.size[0] == img.size[1] for _, v, img in views if v != "full")
    parts = split_photos(name for name, _, _ in views)
    assert set(parts) == {name for name, _ in photos}
    assert set(parts.values()) == {"choice", "held_out"}
    assert photo_views(photos, 4, 0)[3][2].tobytes() == views[3][2].tobytes()  # seeded


def test_non_lesion_photos_are_found_when_installed() -> None:
    from model_training.gates import find_non_lesion_photos

    photos, missing = find_non_lesion_photos()
    if not photos:
        pytest.skip(f"no non-lesion photo source installed: {missing}")
    names = [name for name, _ in photos]
    assert len(names) == len(set(names))
    assert all(img.mode == "RGB" and min(img.size) >= 64 for _, img in photos)


def test_full_rank_matches_scikit_learn_after_a_float32_round_trip(
    cluster: np.ndarray, tmp_path: Path
) -> None:
    """More points than dimensions: every direction kept, as the 768-d gate on real data.

    The components are stored as float32; with all directions kept nothing lies outside
    their span, so rounding must not leak in through the floor variance of the rest.
    """
    covariance = pytest.importorskip("sklearn.covariance")
    lw = covariance.LedoitWolf().fit(cluster)  # 300 points in 64 dimensions
    det = OODDetector.fit(cluster)
    assert det.describe()["n_components"] == [64]
    back = OODDetector.load(det.save(tmp_path / "ood.npz"), threshold=1.0)
    probe = np.vstack([cluster[:5], np.random.default_rng(6).normal(size=(5, 64)) * 3])
    np.testing.assert_allclose(back.score(probe), lw.mahalanobis(probe), rtol=1e-4)


def test_ood_output_prefers_the_mid_level_embedding() -> None:
    from model_training.gates import choose_ood_output

    assert choose_ood_output(["logit", "embedding", "ood_embedding"]) == "ood_embedding"
    assert choose_ood_output(["logit", "embedding"]) == "embedding"  # older artifacts
    assert choose_ood_output(["logit", "embedding", "ood_embedding"], "embedding") == "embedding"
    with pytest.raises(ValueError, match="ood_embedding"):
        choose_ood_output(["logit", "embedding"], "ood_embedding")
    with pytest.raises(ValueError):
        choose_ood_output(["logit"])


def test_embedding_cache_keys_on_the_serve_output(tmp_path: Path) -> None:
    from model_training.gates import EmbeddingCache

    calls: list[int] = []

    def compute(dim: int) -> Callable[[], tuple[np.ndarray, np.ndarray]]:
        def run() -> tuple[np.ndarray, np.ndarray]:
            calls.append(dim)
            return np.zeros(2, np.float32), np.ones((2, dim), np.float32)

        return run

    keys = ["a.jpg", "b.jpg"]
    last = EmbeddingCache(tmp_path, "weights", output="embedding")
    mid = EmbeddingCache(tmp_path, "weights", output="ood_embedding")
    assert last.get("valid", keys, compute(2048))[1].shape == (2, 2048)
    assert mid.get("valid", keys, compute(768))[1].shape == (2, 768)  # not the cached 2048
    assert last.get("valid", keys, compute(1))[1].shape == (2, 2048)  # both now from cache
    assert mid.get("valid", keys, compute(1))[1].shape == (2, 768)
    assert calls == [2048, 768]


def test_embedder_returns_the_serve_output_it_was_asked_for(artifact_dir: Path) -> None:
    tf = pytest.importorskip("tensorflow")
    from PIL import Image

    from model_training.preprocessing import resize_to_input
    from model_training.runner import Embedder

    rng = np.random.default_rng(7)
    images = [Image.fromarray(rng.integers(0, 255, (80, 96, 3), dtype=np.uint8)) for _ in range(3)]
    embed = Embedder(artifact_dir, batch_size=2, output="ood_embedding")
    logits, got = embed(iter(images), len(images), "test")
    saved = tf.saved_model.load(str(artifact_dir / "saved_model"))
    batch = np.stack([resize_to_input(img, embed.size) for img in images])
    out = saved.serve(tf.constant(batch))
    assert got.shape == tuple(out["ood_embedding"].shape)
    np.testing.assert_allclose(got, out["ood_embedding"].numpy(), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(logits, out["logit"].numpy(), rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="not_an_output"):
        Embedder(artifact_dir, output="not_an_output")
