"""ISIC-style data sets: a folder of images plus a CSV of labels.

A data set directory holds ``labels.csv`` (at least ``image_id`` and ``label``; optionally
``split``, ``lesion_id``, ``patient_id``, ``diagnosis`` and metadata such as ``age``, ``sex``,
``site``, ``fitzpatrick``) and an ``images/`` folder (or the images beside the CSV). This is
what the ISIC Archive's ``isic-cli`` produces, and what ``../shared/data`` holds.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import pandas as pd

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff")
LABELS_FILE = "labels.csv"
# Domain of each known set: dermoscopy vs. smartphone close-up (reported separately).
DOMAINS = {"isic2017": "dermoscopy", "ham10000": "dermoscopy", "pad-ufes-20": "phone"}
DEFAULT_SETS = ("isic2017", "ham10000", "pad-ufes-20")


# Diagnoses of the known sets on one scale, for the optional auxiliary diagnosis head in
# training. Seborrhoeic keratosis joins HAM10000's benign keratoses (bkl); PAD-UFES-20's
# actinic keratosis (ACK, benign there) stays apart from HAM10000's akiec (malignant there,
# it includes Bowen's disease), so no class mixes the two labels.
DIAGNOSIS_CLASSES = ("mel", "nv", "bkl", "bcc", "akiec", "scc", "ack", "vasc", "df")
DIAGNOSIS_ALIASES = {
    "melanoma": "mel",
    "nevus": "nv",
    "nev": "nv",
    "seborrheic_keratosis": "bkl",
    "sek": "bkl",
}


class DataError(ValueError):
    """A data set is missing or malformed."""


def _find_image(folder: Path, image_id: str) -> Path | None:
    for ext in IMAGE_EXTENSIONS:
        for candidate in (folder / f"{image_id}{ext}", folder / f"{image_id}{ext.upper()}"):
            if candidate.exists():
                return candidate
    return None


def group_key(row: pd.Series) -> str:
    """The unit that must never straddle train and validation: patient > lesion > image."""
    for column in ("patient_id", "lesion_id"):
        value = row.get(column)
        if value is not None and not pd.isna(value) and str(value).strip():
            return f"{column}:{str(value).strip()}"
    return f"image_id:{row['image_id']}"


def group_bucket(key: str, buckets: int) -> int:
    """Deterministic bucket of a group key, md5(key) mod ``buckets``: one place for every
    group-wise split (train/valid, cross-fitting folds), so a group never straddles one."""
    return int(hashlib.md5(key.encode()).hexdigest(), 16) % buckets


def grouped_split(groups: Sequence[str], valid_percent: int = 15) -> np.ndarray:
    """Deterministic group-wise split: md5(group) mod 100 < valid_percent → valid."""
    return np.asarray(
        ["valid" if group_bucket(g, 100) < valid_percent else "train" for g in groups]
    )


def read_dataset(root: Path, name: str | None = None, valid_percent: int = 15) -> pd.DataFrame:
    """Read one ISIC-style set into a frame with path, label, split, group, dataset, domain."""
    csv = root / LABELS_FILE
    if not csv.exists():
        raise DataError(f"{csv} not found: a data set needs a labels.csv")
    # Identifiers stay strings: numeric patient ids must still group (and not become floats).
    df = pd.read_csv(csv, dtype={"image_id": str, "patient_id": str, "lesion_id": str})
    missing = {"image_id", "label"} - set(df.columns)
    if missing:
        raise DataError(f"{csv} lacks required column(s): {', '.join(sorted(missing))}")
    folder = root / "images" if (root / "images").is_dir() else root
    paths = [_find_image(folder, image_id) for image_id in df["image_id"]]
    absent = [i for i, p in zip(df["image_id"], paths, strict=True) if p is None]
    if absent:
        raise DataError(f"{len(absent)} image(s) listed in {csv} not found, e.g. {absent[:3]}")
    df["path"] = [str(p) for p in paths]
    df["label"] = df["label"].astype(int)
    if not set(df["label"].unique()) <= {0, 1}:
        raise DataError(f"{csv}: label must be 0 (benign) or 1 (malignant)")
    df["group"] = df.apply(group_key, axis=1)
    if "split" not in df.columns or df["split"].isna().all():
        df["split"] = grouped_split(df["group"].tolist(), valid_percent)
    df["split"] = df["split"].fillna("train").astype(str)
    name = name or root.name
    df["dataset"] = name
    df["domain"] = DOMAINS.get(name, "dermoscopy")
    df["group"] = name + "/" + df["group"]
    return df


def read_datasets(data_dir: Path, names: Iterable[str] = DEFAULT_SETS) -> pd.DataFrame:
    """Read and concatenate several sets found under ``data_dir``.

    Image paths are absolute whatever ``data_dir``'s spelling: the feature caches are keyed,
    and the gates' copies seeded, by path, so ``../shared/data`` and its absolute form must
    name the same images."""
    frames = [read_dataset(data_dir.resolve() / name, name) for name in names]
    return pd.concat(frames, ignore_index=True)


def check_no_leak(df: pd.DataFrame) -> None:
    """Raise if any lesion/patient group has images in more than one split."""
    spread = df.groupby("group")["split"].nunique()
    leaking = spread[spread > 1]
    if len(leaking):
        raise DataError(f"{len(leaking)} group(s) straddle splits, e.g. {list(leaking.index[:3])}")


def class_weights(labels: np.ndarray) -> dict[int, float]:
    """Inverse-frequency weights so each class contributes equally to the loss."""
    n = len(labels)
    positives = int(labels.sum())
    negatives = n - positives
    if positives == 0 or negatives == 0:
        return {0: 1.0, 1: 1.0}
    return {0: n / (2.0 * negatives), 1: n / (2.0 * positives)}


def describe(df: pd.DataFrame) -> list[dict[str, object]]:
    """Per set and split: counts and malignant counts (for metadata and the model card)."""
    rows = []
    for (dataset, split), part in df.groupby(["dataset", "split"], sort=True):
        rows.append(
            {
                "dataset": str(dataset),
                "split": str(split),
                "domain": str(part["domain"].iloc[0]),
                "images": len(part),
                "malignant": int(part["label"].sum()),
                "groups": int(part["group"].nunique()),
            }
        )
    return rows


def diagnosis_codes(diagnoses: pd.Series) -> np.ndarray:
    """Index into DIAGNOSIS_CLASSES of each diagnosis (any case; known aliases mapped)."""
    names = diagnoses.astype(str).str.strip().str.lower().replace(DIAGNOSIS_ALIASES)
    unknown = sorted(set(names) - set(DIAGNOSIS_CLASSES))
    if unknown:
        raise DataError(
            f"diagnoses {unknown[:5]} are not among {list(DIAGNOSIS_CLASSES)} (or aliases "
            f"{sorted(DIAGNOSIS_ALIASES)}): train without the auxiliary diagnosis head"
        )
    lookup = {name: i for i, name in enumerate(DIAGNOSIS_CLASSES)}
    return names.map(lookup).to_numpy(dtype=np.int32)


def domain_sets(df: pd.DataFrame) -> dict[str, np.ndarray]:
    """Row masks: each data set, each domain (dermoscopy / phone) and everything pooled."""
    sets: dict[str, np.ndarray] = {}
    for name in sorted(df["dataset"].unique()):
        sets[str(name)] = (df["dataset"] == name).to_numpy()
    for domain in sorted(df["domain"].unique()):
        sets[f"domain:{domain}"] = (df["domain"] == domain).to_numpy()
    sets["pooled"] = np.ones(len(df), dtype=bool)
    return sets
