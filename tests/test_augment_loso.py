"""Source-shift augmentation (host and device side) and leave-one-source-out jobs."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from model_training import train as tr
from model_training.augment import affine_params, domain_augment, jpeg_roundtrip, phone_view
from model_training.crops import CropBatches
from model_training.loso import (
    average_weights,
    check_plan,
    job_rows,
    past_deadline,
    run_plan,
    subset_data,
    summarise_job,
)
from model_training.model import DermAugment

FIXTURES = sorted((Path(__file__).parent / "fixtures" / "images").glob("*.jpg"))


def _image(size: tuple[int, int] = (96, 80)) -> np.ndarray:
    return np.asarray(Image.open(FIXTURES[0]).convert("RGB").resize(size))


def test_affine_without_rotation_or_crop_is_the_identity_map() -> None:
    """Area 1, aspect 1, angle 0 (a generator that always draws the low end) maps the output
    grid onto the whole source: the corners land on the source's corners."""

    class Low:
        def uniform(self, low: float = 0.0, high: float = 1.0) -> float:
            return 0.0 if low < 0 else low

    a, b, c, d, e, f = affine_params((100, 100), (50, 50), Low(), 1.0)  # type: ignore[arg-type]
    for x, y in [(0, 0), (50, 0), (0, 50), (50, 50)]:
        assert a * x + b * y + c == pytest.approx(2 * x)
        assert d * x + e * y + f == pytest.approx(2 * y)


def test_domain_augment_shapes_types_and_reproducibility() -> None:
    image = _image()
    views = [domain_augment(image, (64, 48), np.random.default_rng(i), 0.4) for i in range(12)]
    assert all(v.shape == (64, 48, 3) and v.dtype == np.uint8 for v in views)
    again = domain_augment(image, (64, 48), np.random.default_rng(3), 0.4)
    np.testing.assert_array_equal(views[3], again)
    assert len({v.tobytes() for v in views}) == len(views)  # every draw a different view


def test_jpeg_roundtrip_loses_detail_at_low_quality() -> None:
    img = Image.fromarray(_image())
    low = np.asarray(jpeg_roundtrip(img, 10)).astype(int)
    high = np.asarray(jpeg_roundtrip(img, 95)).astype(int)
    original = np.asarray(img).astype(int)
    assert np.abs(low - original).mean() > np.abs(high - original).mean()


def _saturation(img: np.ndarray) -> float:
    rgb = img.astype(float)
    return float((rgb.max(axis=2) - rgb.min(axis=2)).mean())


def test_phone_view_is_reproducible_and_looks_like_a_phone_photo() -> None:
    """Each draw a different view of the same spot, with flatter colour on average."""
    view = _image((128, 128))
    views = [phone_view(view, np.random.default_rng(i)) for i in range(16)]
    assert all(v.shape == view.shape and v.dtype == np.uint8 for v in views)
    np.testing.assert_array_equal(views[5], phone_view(view, np.random.default_rng(5)))
    assert len({v.tobytes() for v in views}) == len(views)
    assert np.mean([_saturation(v) for v in views]) < 0.9 * _saturation(view)
    # The same spot: the views still correlate with the source pixel by pixel.
    grey = view.astype(float).mean(axis=2).ravel()
    assert min(np.corrcoef(grey, v.astype(float).mean(axis=2).ravel())[0, 1] for v in views) > 0.5


def _stored(n: int, size: int) -> np.ndarray:
    return np.stack([_image((size, size)) for _ in range(n)])


def test_crop_batches_turn_only_dermoscopy_views_into_phone_views() -> None:
    images, labels = _stored(6, 40), np.array([0, 1] * 3)
    dermoscopy = np.array([True, True, True, False, False, False])

    def first_batch(**kwargs: Any) -> tuple[np.ndarray, np.ndarray]:
        batches = CropBatches(
            images, labels, np.ones(6), np.arange(6), (32, 32), 6, seed=1, workers=1, **kwargs
        )
        return batches[0][0], batches.order[:6]

    plain, order = first_batch()
    off, _ = first_batch(phone_view=0.0, dermoscopy=dermoscopy)
    np.testing.assert_array_equal(plain, off)  # no extra draws: old recipes unchanged
    always, _ = first_batch(phone_view=1.0, dermoscopy=dermoscopy)
    changed = np.abs(always.astype(int) - plain.astype(int)).reshape(6, -1).mean(axis=1) > 1.0
    np.testing.assert_array_equal(changed, dermoscopy[order])
    with pytest.raises(ValueError, match="dermoscopy"):
        first_batch(phone_view=0.5)


def test_derm_augment_domain_shift_changes_training_views_only() -> None:
    batch = np.stack([_image((48, 48))] * 4).astype("float32")
    layer = DermAugment(seed=3, domain=True)
    np.testing.assert_array_equal(np.asarray(layer(batch, training=False)), batch)
    out = np.asarray(layer(batch, training=True))
    assert out.shape == batch.shape and out.min() >= 0 and out.max() <= 255
    assert np.all(np.abs(out - batch).reshape(4, -1).mean(axis=1) > 0.5)
    assert DermAugment.from_config(layer.get_config()).domain is True


def _frame() -> pd.DataFrame:
    """Three tiny sources (two dermoscopy, one phone), four images per split."""
    rows = [
        (f"{name}{split}{k}", name, domain, split, k % 2, str(FIXTURES[k % len(FIXTURES)]))
        for name, domain in [("a", "dermoscopy"), ("b", "dermoscopy"), ("c", "phone")]
        for split in ("train", "valid")
        for k in range(4)
    ]
    df = pd.DataFrame(rows, columns=["image_id", "dataset", "domain", "split", "label", "path"])
    df["diagnosis"] = np.where(df["label"] == 1, "mel", "nv")
    df["group"] = df["dataset"] + "/" + df["image_id"]
    return df


def test_job_rows_never_train_on_the_left_out_source() -> None:
    df = _frame()
    train, scored = job_rows(df, "c")
    assert not (train & (df["dataset"] == "c").to_numpy()).any()
    assert set(df.loc[train, "split"]) == {"train"}
    # Scored: every image of the left-out source, plus every validation image.
    assert set(df.loc[scored & (df["dataset"] == "c").to_numpy(), "split"]) == {"train", "valid"}
    assert (scored == ((df["dataset"] == "c") | (df["split"] == "valid")).to_numpy()).all()
    full_train, full_scored = job_rows(df, None)
    assert (full_train == (df["split"] == "train").to_numpy()).all()
    assert set(df.loc[full_scored, "split"]) == {"valid"}


def test_subset_data_indexes_only_the_chosen_rows_and_balances_them() -> None:
    labels = np.array([0, 0, 0, 1, 0, 1, 1, 1])
    data = tr.TrainingData(np.zeros((8, 4, 4, 3), np.uint8), labels, np.ones(8), np.arange(8))
    domains = np.array(["dermoscopy"] * 6 + ["phone"] * 2)
    mask = np.array([1, 1, 1, 1, 0, 0, 1, 1], dtype=bool)
    config = tr.TrainConfig(domain_repeat={"phone": 3})
    sub = subset_data(data, mask, domains, config)
    assert set(sub.index.tolist()) == {0, 1, 2, 3, 6, 7}
    assert (sub.index == 6).sum() == 3 and (sub.index == 0).sum() == 1
    # Within the subset, 3 benign and 3 malignant rows: equal class weights.
    assert sub.weights[0] == pytest.approx(sub.weights[3])
    assert sub.dermoscopy is None
    flagged = replace(data, dermoscopy=domains == "dermoscopy")
    assert subset_data(flagged, mask, domains, config).dermoscopy is flagged.dermoscopy


def test_summarise_job_scores_the_left_out_source_and_validation() -> None:
    rows = _frame()
    rows["logit"] = rows["label"] * 2.0 - 1.0  # a perfect ranking
    summary = summarise_job(rows[(rows["dataset"] == "c") | (rows["split"] == "valid")], "c")
    assert summary["left_out_auc"] == 1.0
    assert set(summary["valid_auc"]) == {"a", "b", "c"}


def test_past_deadline_runs_the_first_job_and_skips_what_would_overrun() -> None:
    assert not past_deadline(1000.0, [], 7, 10.0)
    # Jobs so far took 10 and 20 s per epoch: 3 more epochs take at most 60 s.
    assert not past_deadline(100.0, [10.0, 20.0], 3, 160.0)
    assert past_deadline(100.0, [10.0, 20.0], 3, 159.0)
    assert past_deadline(100.0, [10.0, 20.0], 7, 200.0)  # a long job no longer fits


def test_average_weights_mixes_floats_keeps_integers_and_refuses_mismatches() -> None:
    a = {"w": np.array([0.0, 2.0], np.float32), "seed": np.array([7, 9], np.int64)}
    b = {"w": np.array([4.0, 6.0], np.float32), "seed": np.array([1, 1], np.int64)}
    out = average_weights(a, b, 0.25)
    np.testing.assert_allclose(out["w"], [1.0, 3.0])
    assert out["w"].dtype == np.float32 and out["seed"].tolist() == [7, 9]
    with pytest.raises(ValueError, match="differ in variables"):
        average_weights(a, {"w": b["w"]}, 0.5)
    with pytest.raises(ValueError, match="shapes"):
        average_weights(a, {**b, "w": np.zeros(3, np.float32)}, 0.5)
    with pytest.raises(ValueError, match="alpha"):
        average_weights(a, b, 1.5)


@pytest.mark.slow
def test_run_plan_trains_scores_and_saves(tmp_path: Path) -> None:
    """Jobs on a small-input InceptionV3: predictions for each (the left-out source scored in
    full), weights for the saved one, a soup, a distilled student, a summary after every job;
    a job past the deadline is skipped, and so is every job built on it."""
    recipe = {"augment": "domain", "epochs": 1, "head_epochs": 1, "aux_diagnosis": 0.5}
    jobs: list[dict[str, Any]] = [
        {"name": "full", "save": True, "leave_out": None, "recipe": recipe},
        {"name": "without-c", "leave_out": "c", "recipe": {**recipe, "augment": "strong"}},
        {
            "name": "soup-without-c",
            "leave_out": "c",
            "soup_of": ["full", "without-c"],
            "alpha": 0.5,
            "recipe": {},
        },
        # Past any deadline at any speed: skipped, and the jobs built on it with it.
        {"name": "endless", "leave_out": "c", "recipe": {**recipe, "epochs": 10**9}},
        {"name": "soup-of-skipped", "leave_out": "c", "soup_of": ["full", "endless"]},
        {
            "name": "student-without-c",
            "leave_out": "c",
            "distil_from": ["full", "without-c"],
            "start_from": "soup-without-c",
            "recipe": {**recipe, "head_epochs": 0, "distil_weight": 0.5},
        },
        {
            "name": "student-of-skipped",
            "leave_out": "c",
            "distil_from": ["endless"],
            "recipe": {"distil_weight": 0.5},
        },
    ]
    base = tr.TrainConfig(input_size=(75, 75), crop_margin=4, batch_size=4, workers=1,
                          mixed_precision="off", domain_repeat={})  # fmt: skip
    run_plan(_frame(), jobs, base, None, tmp_path, deadline=1e6)
    predictions = pd.read_csv(tmp_path / "predictions.csv")
    assert set(predictions["job"]) == {"full", "without-c", "soup-without-c", "student-without-c"}
    # The soup is a third network: its scores are neither parent's nor their mean logit.
    valid = predictions[predictions["scored"] == "valid"]
    by_job = {j: g.set_index("image_id")["logit"].sort_index() for j, g in valid.groupby("job")}
    soup = by_job["soup-without-c"]
    parents = [by_job[j].loc[soup.index] for j in ("full", "without-c")]
    assert len(soup) == 8 and all(not np.allclose(soup, p) for p in parents)
    # The student started from the soup and trained on: a network of its own.
    assert not np.allclose(by_job["student-without-c"].loc[soup.index], soup)
    left_out = predictions[predictions["job"] == "without-c"]
    assert set(left_out.loc[left_out["scored"] == "left_out", "dataset"]) == {"c"}
    assert len(left_out[left_out["dataset"] == "c"]) == 8  # train and valid of the source
    assert len(list((tmp_path / "weights").glob("weights-*.npz"))) >= 1
    run = json.loads((tmp_path / "run.json").read_text())  # what export reads
    assert run["job"]["name"] == "full" and {d["dataset"] for d in run["data"]} == {"a", "b", "c"}
    summary = json.loads((tmp_path / "loso.json").read_text())
    assert [j["name"] for j in summary["jobs"]][:3] == ["full", "without-c", "soup-without-c"]
    skipped = [j["name"] for j in summary["jobs"] if j.get("skipped")]
    assert skipped == ["endless", "soup-of-skipped", "student-of-skipped"]
    assert summary["jobs"][5]["config"]["distil_weight"] == 0.5
    with pytest.raises(ValueError, match="come before"):  # refused before any work
        run_plan(_frame(), [{**jobs[2], "soup_of": ["full", "absent"]}], base, None,
                 tmp_path / "refused", deadline=1e6)  # fmt: skip
    assert not (tmp_path / "refused").exists()


def test_should_ship_needs_every_part_of_the_rule() -> None:
    """Leave-one-source-out AUC, pooled validation, the domain floor and the skin gate's
    worst left-out source (no worse than the shipped gate or 1%, whichever is larger)."""
    from model_training.selection import gate_worst_left_out, should_ship

    old = {"pooled": 0.906, "domain:dermoscopy": 0.908, "domain:phone": 0.863}
    new = {"pooled": 0.917, "domain:dermoscopy": 0.919, "domain:phone": 0.864}
    ok, reasons = should_ship(0.753, 0.734, new, old, 0.0048, 0.0048)
    assert ok and len(reasons) == 5
    assert should_ship(0.753, 0.734, new, old, 0.0099, 0.0048)[0]  # within the 1% target
    assert not should_ship(0.753, 0.734, new, old, 0.056, 0.0048)[0]  # the gate regressed
    assert not should_ship(0.730, 0.734, new, old, 0.0048, 0.0048)[0]
    assert not should_ship(0.753, 0.734, {**new, "domain:phone": 0.85}, old, 0.0, 0.0048)[0]
    assert not should_ship(0.753, 0.734, {**new, "pooled": 0.9}, old, 0.0, 0.0048)[0]
    gates = {"skin": {"leave_one_source_out": {
        "a": {"false_rejection": 0.001}, "b": {"false_rejection": 0.056}}}}  # fmt: skip
    assert gate_worst_left_out(gates) == 0.056
    # Measured on several draws of the fitting photos, the worst of them all counts.
    draws = {"seeds": [1234, 1, 2], "worst_false_rejection": 0.0288}
    with_draws = {"skin": {**gates["skin"], "leave_one_source_out_draws": draws}}
    assert gate_worst_left_out(with_draws) == 0.0288
    one = {"skin": {**gates["skin"], "leave_one_source_out_draws": {**draws, "seeds": [1234]}}}
    assert gate_worst_left_out(one) == 0.056


def test_diagnosis_breakdown_finds_the_benign_diagnosis_a_left_out_auc_is_lost_on() -> None:
    """Melanomas outrank nevi but not keratoses: the table says so per recipe and source."""
    from model_training.selection import diagnosis_aucs, diagnosis_table

    rows = pd.DataFrame(
        {
            "job": "r-loso-s",
            "dataset": "s",
            "image_id": [str(i) for i in range(6)],
            "label": [1, 1, 0, 0, 0, 0],
            "logit": [2.0, 3.0, 0.0, 1.0, 4.0, 5.0],
            "scored": "left_out",
        }
    )
    diagnoses = rows[["dataset", "image_id"]].assign(
        diagnosis=["mel", "bcc", "nv", "nv", "ak", "ak"]
    )
    aucs = diagnosis_aucs(rows.merge(diagnoses))
    assert aucs == {
        "malignant vs ak": 0.0,
        "malignant vs nv": 1.0,
        "bcc vs benign": 0.5,
        "mel vs benign": 0.5,
    }
    table = diagnosis_table(rows, diagnoses)
    assert table.splitlines()[0] == "left out: s"
    assert "| recipe | bcc vs benign | malignant vs ak | malignant vs nv | mel vs benign |" in table
    assert "| r | 0.500 | 0.000 | 1.000 | 0.500 |" in table


def test_paired_against_compares_recipes_on_the_same_left_out_images() -> None:
    from model_training.selection import main as loso_report
    from model_training.selection import paired_against

    rng = np.random.default_rng(0)
    labels = np.repeat([0, 1], 30)
    ids = [str(i) for i in range(60)]
    base = labels + rng.normal(0, 1.0, 60)

    def job(recipe: str, logits: np.ndarray) -> pd.DataFrame:
        frame = {"job": f"{recipe}-loso-s", "dataset": "s", "image_id": ids, "label": labels}
        return pd.DataFrame({**frame, "logit": logits, "scored": "left_out"})

    predictions = pd.concat(
        [job("old", base), job("same", base.copy()), job("sharp", labels + rng.normal(0, 0.2, 60))]
    )
    groups = pd.DataFrame(
        {"dataset": "s", "image_id": ids, "group": [f"l{i // 2}" for i in range(60)]}
    )
    out = paired_against(predictions, groups, "old")
    assert set(out) == {"same", "sharp"}
    assert out["same"]["s"] == {"delta": 0.0, "ci_low": 0.0, "ci_high": 0.0}
    assert out["sharp"]["s"]["ci_low"] > 0
    short = pd.concat([job("old", base), job("cut", base)[:-1]])
    with pytest.raises(ValueError, match="different images"):
        paired_against(short, groups, "old")
    with pytest.raises(SystemExit):
        loso_report(["--predictions", "p.csv", "--against", "old"])  # groups need --data-dir


def test_ignored_diagnoses_are_not_trained_on_but_the_rest_is() -> None:
    """Rows of a diagnosis the sources label differently leave the epoch (and the class
    balance); every other row stays, phone rows still repeated."""
    frame = _frame()
    train = frame[frame["split"] == "train"].reset_index(drop=True)
    train.loc[[1, 9], "diagnosis"] = ["AKIEC", "ack"]  # one dermoscopy, one phone row
    keep = tr.learned_rows(train, ["akiec", "ACK"])
    assert keep.tolist() == [i not in (1, 9) for i in range(len(train))]
    assert tr.learned_rows(train, []).all()
    with pytest.raises(ValueError, match="diagnosis column"):
        tr.learned_rows(train.drop(columns="diagnosis"), ["akiec"])
    config = tr.TrainConfig(input_size=(32, 32), crop_margin=4, workers=1)
    plain = tr.prepare_training_data(train, config, progress=lambda _: None)
    config = replace(config, ignore_diagnoses=("akiec", "ack"))
    data = tr.prepare_training_data(train, config, progress=lambda _: None)
    assert set(plain.index.tolist()) - set(data.index.tolist()) == {1, 9}
    assert len(plain.index) - len(data.index) == 1 + 3  # the phone row came three times


RECIPES = sorted((Path(__file__).parents[1] / "model_training" / "recipes").glob("*.json"))


@pytest.mark.parametrize("path", RECIPES, ids=[p.name for p in RECIPES])
def test_every_shipped_plan_and_sweep_builds_its_configs(path: Path) -> None:
    """A typo in a plan would otherwise surface only on the lent GPU, minutes into a call."""
    from model_training.data import DEFAULT_SETS

    jobs = json.loads(path.read_text())
    if "loso" not in path.name:  # a sweep's entries are recipes themselves
        for recipe in jobs:
            replace(tr.TrainConfig(), **{k: v for k, v in recipe.items() if k != "name"})
        return
    check_plan(jobs, tr.TrainConfig())
    assert all(job.get("leave_out") in (None, *DEFAULT_SETS) for job in jobs)


def test_check_plan_refuses_what_would_fail_part_way() -> None:
    base = tr.TrainConfig()
    teacher = {"name": "t", "recipe": {}}
    student = {"name": "s", "distil_from": ["t"], "recipe": {"distil_weight": 0.5}}
    check_plan([teacher, student], base)
    cases = [
        ([student, teacher], "come before"),
        ([teacher, {**student, "recipe": {}}], "go together"),
        ([teacher, {"name": "x", "recipe": {"distil_weight": 0.5}}], "go together"),
        ([teacher, teacher], "repeat"),
        ([teacher, {"name": "u", "soup_of": ["t"]}], "two parents"),
        ([teacher, {"name": "v", "start_from": "w", "recipe": {}}], "come before"),
    ]
    for jobs, message in cases:
        with pytest.raises(ValueError, match=message):
            check_plan(jobs, base)
    with pytest.raises(TypeError):
        check_plan([{"name": "typo", "recipe": {"epoch": 3}}], base)


def test_ensemble_jobs_average_logits_where_every_recipe_scored() -> None:
    """Per left-out source the recipes' mean logit on the images all of them scored; a source
    one recipe lacks gets no ensemble."""
    from sklearn.metrics import roc_auc_score

    from model_training.selection import ensemble_jobs

    def job(name: str, source: str, ids: list[str], logits: list[float]) -> pd.DataFrame:
        return pd.DataFrame({
            "job": name, "image_id": ids, "dataset": source, "domain": "dermoscopy",
            "split": "train", "label": [1 - int(i) % 2 for i in ids], "logit": logits,
            "scored": "left_out",
        })  # fmt: skip

    predictions = pd.concat([
        job("a-loso-s", "s", ["1", "2", "3", "4"], [0.0, 1.0, 2.0, -1.0]),
        job("b-loso-s", "s", ["2", "3", "4", "1"], [3.0, 0.0, 5.0, 2.0]),
        job("a-loso-t", "t", ["1", "2"], [0.0, 1.0]),  # no b without t: no ensemble there
        job("b-full", "s", ["1", "2"], [9.0, 9.0]),  # not a left-out job
    ], ignore_index=True)  # fmt: skip
    out = ensemble_jobs(predictions, ["a", "b"])
    assert list(out.columns) == list(predictions.columns)
    assert set(out["job"]) == {"a+b-loso-s"}
    logit = out.set_index("image_id")["logit"].sort_index()
    np.testing.assert_allclose(logit.to_numpy(), [1.0, 2.0, 1.0, 2.0])
    first = predictions[predictions["job"] == "a-loso-s"]
    assert roc_auc_score(first["label"], first["logit"]) == 0.25
    assert roc_auc_score(out["label"], out["logit"]) == 1.0  # the pair ranks better than a
    with pytest.raises(ValueError, match="two recipes"):
        ensemble_jobs(predictions, ["a"])
