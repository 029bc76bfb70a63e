"""Which images the gates are fitted and measured on, and their serve outputs.

* ``lesions``: a seeded sample of training images, ``per_set`` per source, distinct lesion
  groups first; ``copies``: ``n_copies`` heavily varied copies of each (``augment``);
* ``valid``: every validation image; ``valid_artefacts``: a seeded sample of validation
  images per set, each with every artefact of ``model_training.artefacts`` drawn on it;
* ``views``: the non-skin photos (``photos``), whole and cropped, split by photo.

Only images are chosen here; what is fitted on which part is decided by the fitting modules.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from model_training.artefacts import ARTEFACTS, with_artefact
from model_training.data import read_datasets
from model_training.gates.augment import draw_recipe, lesion_copy
from model_training.gates.features import FeatureStore, stable_seed
from model_training.gates.photos import non_skin_photos, photo_views, split_photos
from model_training.preprocessing import load_image_file
from model_training.quality import measure_quality

logger = logging.getLogger("model_training.gates")


@dataclass
class Part:
    """One group of images: a frame describing each row and the serve outputs."""

    frame: pd.DataFrame
    outputs: dict[str, np.ndarray]

    def features(self, name: str) -> np.ndarray:
        """[n, d] serve output ``name``."""
        return self.outputs[name]

    @property
    def logits(self) -> np.ndarray:
        """[n] the model's logit."""
        return self.outputs["logit"]


@dataclass
class Collected:
    """Everything the gates are fitted and measured on."""

    data: pd.DataFrame  # every image of the sets (quality fitting measures them all)
    lesions: Part
    copies: Part
    valid: Part
    valid_artefacts: Part
    views: Part
    missing_sources: list[str]


def training_sample(df: pd.DataFrame, per_set: int, seed: int) -> pd.DataFrame:
    """At most ``per_set`` training images per set, one per lesion group before repeats."""
    train = df[df["split"] == "train"]
    parts = []
    for name in sorted(train["dataset"].unique()):
        part = train[train["dataset"] == name].sample(frac=1.0, random_state=seed)
        part = part.assign(_rep=part.groupby("group").cumcount()).sort_values("_rep", kind="stable")
        parts.append(part.head(per_set).drop(columns="_rep"))
    return pd.concat(parts).sort_values("path").reset_index(drop=True)


def valid_sample(val: pd.DataFrame, per_set: int, seed: int) -> pd.DataFrame:
    """At most ``per_set`` validation images per set (seeded)."""
    parts = [
        part.sample(frac=1.0, random_state=seed).head(per_set) for _, part in val.groupby("dataset")
    ]
    return pd.concat(parts).sort_values("path").reset_index(drop=True)


def collect(
    store: FeatureStore,
    data_dir: Path,
    sets: list[str],
    per_set: int,
    n_copies: int,
    artefact_per_set: int,
    crops: int,
    seed: int,
    extra_photo_dirs: list[Path] | None = None,
) -> Collected:
    """Choose the images and get their serve outputs (from the cache where possible)."""
    df = read_datasets(data_dir, sets)
    val = df[df["split"] == "valid"].sort_values("path").reset_index(drop=True)
    val_paths = [str(p) for p in val["path"]]
    valid = Part(val, store.get("valid", val_paths, lambda i: load_image_file(val_paths[i])))

    photos, missing = non_skin_photos(extra_photo_dirs or [])
    for item in missing:
        logger.warning("non-skin photo source missing: %s", item)
    parts = split_photos(name for name, _ in photos)
    view_list = photo_views(photos, crops, seed)
    vf = pd.DataFrame(
        [
            {
                "photo": p,
                "view": v,
                "source": p.split("/", 1)[0],
                "part": parts[p],
                **measure_quality(img).as_dict(),
            }
            for p, v, img in view_list
        ]
    )
    vkeys = [f"{p}#{v}#{seed}" for p, v, _ in view_list]
    views = Part(vf, store.get("non-skin", vkeys, lambda i: view_list[i][2]))
    train = training_sample(df, per_set, seed)
    paths = [str(p) for p in train["path"]]
    lesions = Part(train, store.get("lesions", paths, lambda i: load_image_file(paths[i])))

    rows = []
    for i, path in enumerate(paths):
        for k in range(n_copies):
            s = stable_seed(seed, path, k)
            recipe = draw_recipe(np.random.default_rng(s))
            rows.append({**train.iloc[i].to_dict(), "copy": k, "seed": s, **vars(recipe)})
    cf = pd.DataFrame(rows)
    ckeys = [f"{p}#copy{k}#{seed}" for p, k in zip(cf["path"], cf["copy"], strict=True)]
    copies = Part(
        cf,
        store.get(
            "copies",
            ckeys,
            lambda i: lesion_copy(load_image_file(cf.at[i, "path"]), int(cf.at[i, "seed"]))[0],
        ),
    )

    vs = valid_sample(val, artefact_per_set, seed)
    arows = [
        {**r, "artefact": kind, "seed": stable_seed(seed, r["path"], kind)}
        for r in vs.to_dict("records")
        for kind in ARTEFACTS
    ]
    af = pd.DataFrame(arows)
    akeys = [f"{p}#{a}#{seed}" for p, a in zip(af["path"], af["artefact"], strict=True)]
    valid_artefacts = Part(
        af,
        store.get(
            "valid-artefacts",
            akeys,
            lambda i: with_artefact(
                load_image_file(af.at[i, "path"]), str(af.at[i, "artefact"]), int(af.at[i, "seed"])
            ),
        ),
    )

    return Collected(df, lesions, copies, valid, valid_artefacts, views, missing)
