"""The skin gate and artefact notes (NumPy runtime) and how they are fitted."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from model_training.gates.collect import Collected
from model_training.skin import NOTE_TEXTS, SKIN_HEAD, SkinGate

IMAGES = Path(__file__).parent / "fixtures" / "images"


def two_clusters(n: int = 300, d: int = 40, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Skin-like (shifted) and other points, with correlated noise."""
    rng = np.random.default_rng(seed)
    mixing = rng.normal(size=(d, d)) * rng.uniform(0.2, 1.5, size=d)
    pos = rng.normal(size=(n, d)) @ mixing.T + 3.0
    neg = rng.normal(size=(n, d)) @ mixing.T - 3.0
    return pos, neg


def gate(d: int = 6) -> SkinGate:
    rng = np.random.default_rng(1)
    return SkinGate(
        [SKIN_HEAD, "hair"],
        rng.normal(size=(2, d)),
        np.asarray([0.5, 0.0]),
        {SKIN_HEAD: 0.0, "hair": 0.2},
    )


def test_scores_are_one_dot_product_per_head() -> None:
    g = gate()
    x = np.random.default_rng(2).normal(size=(40, 6))
    expected = x @ g.weights.T.astype(np.float64) + g.bias
    np.testing.assert_allclose(g.scores(x), expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(g.not_skin(x), expected[:, 0] < 0.0)
    notes = g.notes(x)
    assert [bool(n) for n in notes] == (expected[:, 1] >= 0.2).tolist()
    assert any(notes) and not all(notes), "the sample must have rows with and without a note"
    for row in notes:
        for note in row:
            assert note.code == "hair" and (note.message, note.advice) == NOTE_TEXTS["hair"]


def test_a_broken_feature_row_is_refused_and_gets_no_note() -> None:
    g = gate()
    x = np.ones((2, 6))
    x[1, 3] = np.nan
    assert g.not_skin(x).tolist()[1] is True
    assert g.notes(x)[1] == []


def test_save_load_round_trip_and_wrong_inputs(tmp_path: Path) -> None:
    g = gate()
    path = g.save(tmp_path / "skin.npz")
    back = SkinGate.load(path, g.thresholds)
    x = np.random.default_rng(3).normal(size=(5, 6))
    np.testing.assert_array_equal(back.scores(x), g.scores(x))
    assert back.note_names == ("hair",)
    with pytest.raises(ValueError, match="expected features"):
        g.scores(np.ones((2, 5)))
    with pytest.raises(ValueError, match="no threshold"):
        SkinGate.load(path, {SKIN_HEAD: 0.0})
    with pytest.raises(ValueError, match="skin"):
        SkinGate(["hair"], np.ones((1, 3)), np.zeros(1), {"hair": 0.0})
    np.savez(tmp_path / "old.npz", format_version=np.int64(1), method=np.str_("mahalanobis"))
    with pytest.raises(ValueError, match="refit"):
        SkinGate.load(tmp_path / "old.npz", g.thresholds)


def test_fitted_head_is_the_folded_pipeline_and_separates() -> None:
    """Standardise → PCA → logistic regression folds into one line with the same scores."""
    from sklearn.decomposition import PCA
    from sklearn.linear_model import LogisticRegression

    from model_training.gates.skin_fit import fit_head

    pos, neg = two_clusters()
    x = np.concatenate([pos, neg])
    y = np.r_[np.ones(len(pos)), np.zeros(len(neg))]
    head = fit_head(x, y, n_components=10, c=0.5)
    assert np.mean(head.score(pos) > 0) > 0.99 and np.mean(head.score(neg) < 0) > 0.99

    z = (x - x.mean(axis=0)) / (x.std(axis=0) + 1e-6)
    zp = PCA(10, whiten=True, svd_solver="full").fit_transform(z)
    lr = LogisticRegression(C=0.5, class_weight="balanced", max_iter=2000).fit(zp, y)
    # PCA's whitening divides by sqrt(n - 1) where fit_head uses sqrt(n): compare ranks.
    ref = lr.decision_function(zp)
    assert np.corrcoef(ref, head.score(x))[0, 1] > 0.999


def test_skin_threshold_meets_its_false_rejection_target_out_of_fold() -> None:
    from model_training.gates.skin_fit import fit_skin

    pos, neg = two_clusters(400)
    domains = np.asarray(["dermoscopy", "phone"] * 200)
    groups = [f"g{i // 2}" for i in range(400)]
    fit = fit_skin(pos, groups, domains, neg, [f"p{i}" for i in range(400)], 0.01, 10, 0.5)
    for d in ("dermoscopy", "phone"):
        assert np.mean(fit.oof_pos[domains == d] < fit.threshold) <= 0.01
    assert fit.threshold == min(fit.per_domain_quantile.values())
    assert np.mean(fit.oof_neg < fit.threshold) > 0.95


def test_lesion_copies_are_seeded_and_keep_the_frame() -> None:
    from model_training.gates.augment import COPY_ARTEFACTS, lesion_copy, zoom_out
    from model_training.preprocessing import load_image_file

    photo = load_image_file(sorted(IMAGES.glob("*.jpg"))[0])
    a, recipe = lesion_copy(photo, 7)
    b, again = lesion_copy(photo, 7)
    assert recipe == again and np.array_equal(np.asarray(a), np.asarray(b))
    assert recipe.artefact in COPY_ARTEFACTS
    assert sorted(a.size) == sorted(photo.size)  # a right-angle turn may swap the sides
    out = zoom_out(photo, 0.3)  # strong zoom: padded in several mirror passes
    assert out.size == photo.size
    w, h = photo.size
    centre = np.asarray(out)[h // 2 - 5 : h // 2 + 5, w // 2 - 5 : w // 2 + 5]
    small = np.asarray(photo.resize((round(w * 0.3), round(h * 0.3))))
    sh, sw = small.shape[:2]
    assert (
        np.abs(centre.mean() - small[sh // 2 - 5 : sh // 2 + 5, sw // 2 - 5 : sw // 2 + 5].mean())
        < 3
    )


def test_phone_look_copies_are_seeded_and_keep_the_frame() -> None:
    from model_training.gates.augment import phone_look
    from model_training.preprocessing import load_image_file

    photo = load_image_file(sorted(IMAGES.glob("*.jpg"))[0]).resize((640, 480))
    a, b = phone_look(photo, 3), phone_look(photo, 3)
    assert a.size == photo.size and a.mode == "RGB"
    assert np.array_equal(np.asarray(a), np.asarray(b))
    assert not np.array_equal(np.asarray(a), np.asarray(phone_look(photo, 4)))


def test_copies_include_phone_looks_of_dermoscopy_only() -> None:
    import pandas as pd

    from model_training.gates.collect import copy_key, lesion_copies

    class Store:
        def get(self, tag: str, keys: list[str], make: object) -> dict[str, np.ndarray]:
            assert len(set(keys)) == len(keys)
            return {"logit": np.zeros(len(keys), np.float32)}

    train = pd.DataFrame(
        [
            {"path": "a.jpg", "dataset": "isic2017", "domain": "dermoscopy", "group": "a"},
            {"path": "b.jpg", "dataset": "pad-ufes-20", "domain": "phone", "group": "b"},
        ]
    )
    part = lesion_copies(Store(), train, 2, 1, 9)  # type: ignore[arg-type]
    f = part.frame
    assert list(f["kind"]).count("varied") == 4
    looks = f[f["kind"] == "phone_look"]
    assert list(looks["path"]) == ["a.jpg"] and list(looks["domain"]) == ["phone"]
    assert list(looks["artefact"]) == [""]
    # Varied copies keep the cache keys they had before phone-look copies existed.
    assert copy_key("a.jpg", "varied", 1, 9) == "a.jpg#copy1#9"


def test_non_skin_photos_are_split_by_photo_never_by_view() -> None:
    from model_training.gates.photos import photo_views, render_synthetic, split_photos

    photos = [
        (f"rendered_{k}/{i}", render_synthetic(k, i))
        for k in ("document", "screenshot", "chart", "skin_coloured_surface")
        for i in range(3)
    ]
    assert np.array_equal(
        np.asarray(render_synthetic("chart", 5)), np.asarray(render_synthetic("chart", 5))
    )
    views = photo_views(photos, 3, seed=1)
    assert len(views) == 4 * len(photos)
    parts = split_photos(name for name, _ in photos)
    assert set(parts.values()) == {"fit", "held_out"}
    for source in {n.split("/")[0] for n, _ in photos}:
        assert {parts[n] for n in parts if n.startswith(source)} == {"fit", "held_out"}
    assert all(isinstance(img, Image.Image) and min(img.size) >= 8 for _, _, img in views)


def test_sqrt_transform_is_applied_before_the_heads_and_saved(tmp_path: Path) -> None:
    rng = np.random.default_rng(4)
    w = rng.normal(size=(1, 6))
    g = SkinGate([SKIN_HEAD], w, np.zeros(1), {SKIN_HEAD: 0.0}, transform="sqrt")
    x = rng.uniform(0, 4, size=(5, 6))
    np.testing.assert_allclose(g.scores(x)[:, 0], np.sqrt(x) @ w[0], rtol=1e-5)
    back = SkinGate.load(g.save(tmp_path / "s.npz"), g.thresholds)
    assert back.transform == "sqrt"
    np.testing.assert_array_equal(back.scores(x), g.scores(x))
    with pytest.raises(ValueError, match="transform"):
        SkinGate([SKIN_HEAD], w, np.zeros(1), {SKIN_HEAD: 0.0}, transform="log")


def test_draw_spread_and_its_card_table() -> None:
    from model_training.card_inputs import section_gates
    from model_training.gates.loso import draw_spread

    def result(ham: float, pad: float, non_skin: float) -> dict[str, dict[str, float]]:
        return {
            "ham10000": {"false_rejection": ham, "held_out_non_skin_rejection": non_skin},
            "pad-ufes-20": {"false_rejection": pad, "held_out_non_skin_rejection": 0.99},
        }

    spread = draw_spread({1234: result(0.0, 0.008, 0.959), 2: result(0.001, 0.0432, 0.913)})
    assert spread["seeds"] == [1234, 2]
    assert spread["false_rejection"]["pad-ufes-20"] == [0.008, 0.0432]
    assert spread["worst_false_rejection"] == 0.0432
    assert spread["mean_false_rejection"] == pytest.approx((0.0 + 0.008 + 0.001 + 0.0432) / 4)
    assert spread["lowest_held_out_non_skin_rejection"] == 0.913

    card = "\n".join(
        section_gates({"ood": {"threshold": 0.2}}, {"skin": {"leave_one_source_out_draws": spread}})
    )
    assert "| pad-ufes-20 | 0.8% / 4.3% | 2.6% | 99.0% / 99.0% |" in card
    assert "worst 4.3%" in card and "at least 91.3%" in card
    assert "once per draw" not in card  # no full-gate figures in this report
    full = {"1234": {"held_out_non_skin_views_refused": 0.998,
                     "held_out_non_skin_photos_refused": 1.0, "held_out_non_skin_photos": 97,
                     "validation_refused": {"dermoscopy": 0, "phone": 1}}}  # fmt: skip
    card = "\n".join(
        section_gates(
            {"ood": {"threshold": 0.2}},
            {"skin": {"leave_one_source_out_draws": {**spread, "full_gate": full}}},
        )
    )
    assert "| 1234 | 99.8% | 100.0% (of 97) | dermoscopy 0, phone 1 |" in card
    # One draw alone says nothing about the spread: no table.
    single = draw_spread({1234: result(0.0, 0.008, 0.959)})
    card = "\n".join(
        section_gates({"ood": {"threshold": 0.2}}, {"skin": {"leave_one_source_out_draws": single}})
    )
    assert "random draws" not in card


def test_variant_rank_puts_the_lesion_target_first_then_non_skin() -> None:
    from model_training.gates.cli import variant_rank

    meets = variant_rank(0.0096, 0.969, 0.01)
    # Among variants whose worst left-out refusal meets the limit, more non-skin refused wins...
    assert meets < variant_rank(0.0048, 0.959, 0.01)
    # ... and a variant over the limit ranks after them however much non-skin it refuses ...
    assert meets < variant_rank(0.0288, 0.99, 0.01)
    # ... ranked among themselves by how far they miss it.
    assert variant_rank(0.0192, 0.96, 0.01) < variant_rank(0.0288, 0.99, 0.01)
    # Equal on both, fewer lesions refused wins.
    assert variant_rank(0.004, 0.97, 0.01) < variant_rank(0.008, 0.97, 0.01)


def synthetic_draw(seed: int, stray: float) -> Collected:
    """Two lesion sources and non-skin views with two serve outputs: on ``steady`` every
    lesion sits with the others; on ``shaky`` ``stray`` of source b's lesions drift towards
    the non-skin views (what a draw of the fitting photos can do to one variant)."""
    from model_training.gates.collect import Collected, Part

    rng = np.random.default_rng(seed)
    pos, neg = two_clusters(200, 8, seed)
    sources = np.repeat(["a", "b"], 100)
    shaky = pos.copy()
    drift = np.flatnonzero(sources == "b")[: int(stray * 100)]
    shaky[drift] = neg[: len(drift)] + rng.normal(0, 0.1, size=(len(drift), 8))
    lesions = pd.DataFrame(
        {"dataset": sources, "group": [f"g{i}" for i in range(200)], "domain": "dermoscopy"}
    )
    copies = pd.DataFrame(columns=["dataset", "group", "domain", "artefact", "kind"])
    views = pd.DataFrame(
        {
            "photo": [f"p{i // 2}" for i in range(200)],  # a whole photo and a crop of it
            "view": ["full", "crop1"] * 100,
            "part": (["fit"] * 2 + ["held_out"] * 2) * 50,
        }
    )

    def part(frame: pd.DataFrame, steady: np.ndarray, shaky_x: np.ndarray) -> Part:
        return Part(frame, {"steady": steady, "shaky": shaky_x})

    empty = np.zeros((0, 8))
    valid = part(lesions.head(0), empty, empty)
    return Collected(
        lesions, part(lesions, pos, shaky), part(copies, empty, empty), valid, valid,
        part(views, neg, neg), [],
    )  # fmt: skip


def test_the_variant_is_chosen_on_every_draw_of_the_fitting_photos() -> None:
    from model_training.gates.cli import choose_variant

    # On the first draw both variants look alike; only the second draw shows the shaky one
    # refusing lesions of a left-out source.
    draws = {1234: synthetic_draw(1, 0.0), 2: synthetic_draw(2, 0.2)}
    (output, transform, cost), per_draw, table = choose_variant(
        draws, [("shaky", "none"), ("steady", "none")], [0.5], 0.001
    )
    assert (output, transform, cost) == ("steady", "none", 0.5)
    assert set(per_draw) == {1234, 2}
    shaky = next(row for row in table if row["output"] == "shaky")
    assert shaky["loso_false_rejection"]["b"][0] < 0.01 < shaky["loso_false_rejection"]["b"][1]
    assert shaky["loso_worst_false_rejection"] > 0.01
    # The first draw alone could not tell them apart by the lesion target.
    _, _, first_table = choose_variant(
        {1234: draws[1234]}, [("shaky", "none"), ("steady", "none")], [0.5], 0.001
    )
    assert all(row["loso_worst_false_rejection"] <= 0.01 for row in first_table)


def test_the_full_gate_is_measured_on_every_draw() -> None:
    from model_training.gates.cli import with_transformed
    from model_training.gates.loso import full_gate_draws

    draws = {1234: synthetic_draw(1, 0.0), 2: synthetic_draw(2, 0.2)}
    for c in draws.values():
        key = with_transformed(c, "steady", "none")
    full = full_gate_draws(draws, key, 0.001, None, 0.5)
    assert set(full) == {"1234", "2"}
    for seed in full.values():
        # Two well-separated clusters: every held-out non-skin view and photo refused.
        assert seed["held_out_non_skin_views_refused"] == 1.0
        assert seed["held_out_non_skin_photos_refused"] == 1.0
        assert seed["held_out_non_skin_photos"] == 50
    # A gate already fitted on a draw (fit-gates passes the shipped one) is used, not refitted.
    from model_training.gates.loso import skin_training_data
    from model_training.gates.skin_fit import fit_skin

    fit = fit_skin(*skin_training_data(draws[1234], key), 0.001, None, 0.5)
    assert full_gate_draws(draws, key, 0.001, None, 0.5, {1234: fit}) == full
    lenient = dataclasses.replace(fit, threshold=-1e6)  # refuses nothing
    used = full_gate_draws(draws, key, 0.001, None, 0.5, {1234: lenient})
    assert used["1234"]["held_out_non_skin_views_refused"] == 0.0
    assert used["2"] == full["2"]


def test_fit_gates_compares_regularisation_strengths_by_default() -> None:
    import argparse

    from model_training.gates.cli import add_arguments

    p = argparse.ArgumentParser()
    add_arguments(p)
    args = p.parse_args(["--artifact", "x"])
    assert 0.5 in args.costs and min(args.costs) < 0.05
    assert p.parse_args(["--artifact", "x", "--costs", "0.1,0.02"]).costs == [0.1, 0.02]


def test_folder_photos_with_the_same_short_name_all_count(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Wallpaper packages laid out as <theme>/contents/images/<size>.jpg (KDE's) must not
    collide: fit-gates stopped with "names must be unique" when one was installed."""
    from model_training.gates import photos

    for theme in ("Flow", "Kay"):
        folder = tmp_path / theme / "contents" / "images"
        folder.mkdir(parents=True)
        Image.new("RGB", (120, 100), (10, 200, 30)).save(folder / "1920x1080.jpg")
    monkeypatch.setattr(photos, "PHOTO_FOLDERS", (("walls", str(tmp_path), "**/*.jpg"),))
    missing: list[str] = []
    found = [name for name, _ in photos._folder_photos(missing)]
    assert missing == []
    assert len(found) == len(set(found)) == 2
    assert "walls/images-1920x1080" in found  # the first keeps the short name
    assert "walls/Kay-contents-images-1920x1080" in found
