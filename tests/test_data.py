"""Reading ISIC-style data sets, grouped splits without leaks, class weights.

The small cases build a real folder (labels.csv + PNG files) in tmp_path; the ``data`` cases
read the real sets under $SHARED_DATA_DIR (default ../shared/data from the repository root).
"""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from model_training.data import (
    DIAGNOSIS_CLASSES,
    DataError,
    check_no_leak,
    class_weights,
    describe,
    diagnosis_codes,
    read_dataset,
    read_datasets,
)

REPO = Path(__file__).resolve().parents[1]
DATA_DIR = Path(os.environ.get("SHARED_DATA_DIR") or REPO.parent / "shared" / "data")
SETS = ("isic2017", "ham10000", "pad-ufes-20")
# Documented in ../shared/data/README.md: (train, valid) images per set.
COUNTS = {"isic2017": (1993, 149), "ham10000": (7062, 1444), "pad-ufes-20": (524, 125)}
MALIGNANT = {
    "isic2017": {"melanoma"},
    "ham10000": {"mel", "bcc", "akiec"},
    "pad-ufes-20": {"BCC", "SCC", "MEL"},
}


def _png(colour: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (4, 4), (colour, 0, 0)).save(buf, format="PNG")
    return buf.getvalue()


def make_set(
    root: Path, rows: list[dict[str, object]], images_dir: bool = True, skip: tuple[str, ...] = ()
) -> Path:
    """Write an ISIC-style set: labels.csv plus one small PNG per row (except ``skip``)."""
    root.mkdir(parents=True, exist_ok=True)
    folder = root / "images" if images_dir else root
    folder.mkdir(exist_ok=True)
    pd.DataFrame(rows).to_csv(root / "labels.csv", index=False)
    for i, row in enumerate(rows):
        if str(row["image_id"]) not in skip:
            (folder / f"{row['image_id']}.png").write_bytes(_png(i % 256))
    return root


def lesion_rows(n_lesions: int = 40, per_lesion: int = 3) -> list[dict[str, object]]:
    """Several images per lesion, HAM10000-style, no split column."""
    return [
        {"image_id": f"IMG_{g:03d}_{k}", "lesion_id": f"LES_{g:03d}", "label": int(g % 4 == 0)}
        for g in range(n_lesions)
        for k in range(per_lesion)
    ]


# -- tiny sets built here -------------------------------------------------------------------


def test_read_dataset_columns_and_paths(tmp_path: Path) -> None:
    """Frame has path, label, split, group, dataset and domain; paths point at the images."""
    rows = [
        {"image_id": "ISIC_0000001", "label": 0, "split": "train", "diagnosis": "nevus"},
        {"image_id": "ISIC_0000002", "label": 1, "split": "valid", "diagnosis": "melanoma"},
        {"image_id": "ISIC_0000003", "label": 0, "split": "train", "diagnosis": "nevus"},
    ]
    df = read_dataset(make_set(tmp_path / "pad-ufes-20", rows))
    assert {"path", "label", "split", "group", "dataset", "domain"} <= set(df.columns)
    assert df["image_id"].tolist() == ["ISIC_0000001", "ISIC_0000002", "ISIC_0000003"]
    assert all(
        Path(p).is_file() and Path(p).stem == i
        for p, i in zip(df["path"], df["image_id"], strict=True)
    )
    assert df["label"].tolist() == [0, 1, 0]
    assert df["split"].tolist() == ["train", "valid", "train"]
    assert set(df["dataset"]) == {"pad-ufes-20"}
    assert set(df["domain"]) == {"phone"}
    assert df["group"].iloc[0] == "pad-ufes-20/image_id:ISIC_0000001"
    other = read_dataset(tmp_path / "pad-ufes-20", name="mine")
    assert set(other["dataset"]) == {"mine"} and set(other["domain"]) == {"dermoscopy"}


def test_image_ids_stay_strings_and_images_may_sit_beside_the_csv(tmp_path: Path) -> None:
    """Numeric-looking ids keep their leading zeros; no images/ folder is fine."""
    rows = [{"image_id": "0012", "label": 1}, {"image_id": "0345", "label": 0}]
    df = read_dataset(make_set(tmp_path / "flat", rows, images_dir=False))
    assert df["image_id"].tolist() == ["0012", "0345"]
    assert Path(df["path"].iloc[0]).name == "0012.png"


def test_missing_csv_is_an_error(tmp_path: Path) -> None:
    """A folder without labels.csv is refused."""
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=r"labels\.csv"):
        read_dataset(tmp_path / "empty")


@pytest.mark.parametrize("drop", ["label", "image_id"])
def test_required_columns(tmp_path: Path, drop: str) -> None:
    """image_id and label are required and the error names the missing one."""
    root = make_set(tmp_path / "s", [{"image_id": "a", "label": 0}])
    pd.read_csv(root / "labels.csv").drop(columns=[drop]).to_csv(root / "labels.csv", index=False)
    with pytest.raises(DataError, match=drop):
        read_dataset(root)


def test_missing_image_is_an_error(tmp_path: Path) -> None:
    """A CSV row without its image is refused, naming the image."""
    rows = [{"image_id": "present", "label": 0}, {"image_id": "gone_missing", "label": 1}]
    root = make_set(tmp_path / "s", rows, skip=("gone_missing",))
    with pytest.raises(DataError, match="gone_missing"):
        read_dataset(root)


def test_labels_must_be_binary(tmp_path: Path) -> None:
    """Labels other than 0/1 are refused."""
    root = make_set(tmp_path / "s", [{"image_id": "a", "label": 0}, {"image_id": "b", "label": 2}])
    with pytest.raises(DataError, match="label must be 0"):
        read_dataset(root)


def test_grouped_split_keeps_each_lesion_in_one_split(tmp_path: Path) -> None:
    """Without a split column, all images of a lesion land in the same split; both exist."""
    df = read_dataset(make_set(tmp_path / "s", lesion_rows()), valid_percent=30)
    per_lesion = df.groupby("lesion_id")["split"].nunique()
    assert per_lesion.max() == 1
    assert set(df["split"]) == {"train", "valid"}
    check_no_leak(df)
    again = read_dataset(tmp_path / "s", valid_percent=30)
    assert again["split"].tolist() == df["split"].tolist()  # deterministic


def test_patient_outranks_lesion(tmp_path: Path) -> None:
    """One patient with several lesions stays in one split (patient_id wins over lesion_id)."""
    rows = [
        {"image_id": f"P{p}_L{les}_{k}", "patient_id": f"PAT_{p}", "lesion_id": f"PAT_{p}_{les}",
         "label": int(les == 0)}
        for p in range(20) for les in range(3) for k in range(2)
    ]  # fmt: skip
    df = read_dataset(make_set(tmp_path / "s", rows), valid_percent=40)
    assert df.groupby("patient_id")["split"].nunique().max() == 1
    assert set(df["split"]) == {"train", "valid"}
    assert df["group"].str.contains("/patient_id:PAT_").all()


def test_empty_split_column_is_regrouped(tmp_path: Path) -> None:
    """A split column with no values is treated as absent (grouped split)."""
    rows = [{**r, "split": None} for r in lesion_rows(30, 2)]
    df = read_dataset(make_set(tmp_path / "s", rows), valid_percent=30)
    assert df.groupby("lesion_id")["split"].nunique().max() == 1
    assert set(df["split"]) == {"train", "valid"}


def test_numeric_patient_ids_are_grouped(tmp_path: Path) -> None:
    """Patient ids that happen to be numbers must still group the split."""
    rows = [
        {"image_id": f"img_{p}_{k}", "patient_id": 1000 + p, "label": int(k == 0)}
        for p in range(12)
        for k in range(6)
    ]
    df = read_dataset(make_set(tmp_path / "s", rows), valid_percent=30)
    assert df.groupby("patient_id")["split"].nunique().max() == 1


def test_check_no_leak_raises_on_a_leaking_frame() -> None:
    """A group with images in train and valid is a leak."""
    clean = pd.DataFrame(
        {"group": ["a", "a", "b", "c"], "split": ["train", "train", "valid", "train"]}
    )
    check_no_leak(clean)
    leaking = clean.assign(split=["train", "valid", "valid", "train"])
    with pytest.raises(DataError, match="1 group"):
        check_no_leak(leaking)


def test_class_weights_balance_the_classes() -> None:
    """Each class contributes n/2 in total weight; a single class gets weights 1."""
    labels = np.array([1] * 3 + [0] * 17)
    cw = class_weights(labels)
    assert cw[1] * 3 == pytest.approx(10.0)
    assert cw[0] * 17 == pytest.approx(10.0)
    assert cw[1] > cw[0]
    assert class_weights(np.zeros(5)) == {0: 1.0, 1: 1.0}
    assert class_weights(np.ones(5)) == {0: 1.0, 1: 1.0}


def test_describe_counts(tmp_path: Path) -> None:
    """describe() reports images, malignant and groups per set and split."""
    df = read_dataset(make_set(tmp_path / "s", lesion_rows(20, 3)), valid_percent=30)
    rows = {r["split"]: r for r in describe(df)}
    assert sum(int(r["images"]) for r in rows.values()) == 60  # type: ignore[call-overload]
    for split, part in df.groupby("split"):
        assert rows[split]["malignant"] == int(part["label"].sum())
        assert rows[split]["groups"] == part["lesion_id"].nunique()


# -- the real sets --------------------------------------------------------------------------

needs_data = pytest.mark.skipif(
    not all((DATA_DIR / name / "labels.csv").is_file() for name in SETS),
    reason=f"the real data sets are not at {DATA_DIR} (set SHARED_DATA_DIR)",
)


@pytest.fixture(scope="module")
def real() -> pd.DataFrame:
    """All three real sets, read once."""
    return read_datasets(DATA_DIR, SETS)


@pytest.mark.data
@needs_data
@pytest.mark.parametrize("name", SETS)
def test_real_sets_have_documented_counts(real: pd.DataFrame, name: str) -> None:
    """Train/valid counts as documented in shared/data/README.md; labels as documented."""
    part = real[real["dataset"] == name]
    counts = part["split"].value_counts().to_dict()
    assert (counts.get("train"), counts.get("valid")) == COUNTS[name]
    assert set(counts) == {"train", "valid"}
    malignant = part["diagnosis"].isin(MALIGNANT[name]).astype(int)
    assert (part["label"] == malignant).all()


@pytest.mark.data
@needs_data
def test_real_sets_do_not_leak(real: pd.DataFrame) -> None:
    """No lesion (HAM10000) or patient (PAD-UFES-20) straddles train and valid."""
    check_no_leak(real)
    ham = real[real["dataset"] == "ham10000"]
    assert ham.groupby("lesion_id")["split"].nunique().max() == 1
    assert ham["group"].str.contains("/lesion_id:").all()
    pad = real[real["dataset"] == "pad-ufes-20"]
    assert pad.groupby("patient_id")["split"].nunique().max() == 1
    assert pad["group"].str.contains("/patient_id:").all()
    assert set(real.loc[real["dataset"] == "pad-ufes-20", "domain"]) == {"phone"}
    assert not real["image_id"].duplicated().any()


def test_diagnosis_codes_map_aliases_and_any_case() -> None:
    """One scale for the three sets: ISIC 2017 and PAD-UFES-20 names map onto HAM10000's."""
    codes = diagnosis_codes(pd.Series(["melanoma", "NEV", "Seborrheic_Keratosis", "ACK", "akiec"]))
    assert [DIAGNOSIS_CLASSES[c] for c in codes] == ["mel", "nv", "bkl", "ack", "akiec"]


def test_unknown_diagnosis_is_an_error() -> None:
    with pytest.raises(DataError, match="lentigo"):
        diagnosis_codes(pd.Series(["nv", "lentigo"]))


@pytest.mark.data
@needs_data
def test_every_real_diagnosis_has_a_class_of_one_label(real: pd.DataFrame) -> None:
    """The auxiliary head's classes never mix benign and malignant training labels."""
    codes = diagnosis_codes(real["diagnosis"])
    labels_per_class = pd.Series(real["label"].to_numpy()).groupby(codes).nunique()
    assert (labels_per_class == 1).all()
    assert len(labels_per_class) == len(DIAGNOSIS_CLASSES)
