"""Which images the gates are fitted and measured on, and their serve outputs.

* ``lesions``: a seeded sample of training images, ``per_set`` per source, distinct lesion
  groups first; ``copies``: ``n_copies`` heavily varied copies of each and, of each
  dermoscopy photo, ``phone_copies`` copies made to look like phone photos (``augment``;
  their ``kind`` is "phone_look" and their domain "phone");
* ``valid``: every validation image; ``valid_artefacts``: a seeded sample of validation
  images per set, each with every artefact of ``model_training.artefacts`` drawn on it;
* ``views``: the non-skin photos (``photos``), whole and cropped, split by photo.

Only images are chosen here; what is fitted on which part is decided by the fitting modules.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from model_training.artefacts import ARTEFACTS, with_artefact
from model_training.data import read_datasets
from model_training.gates.augment import draw_recipe, lesion_copy, phone_look
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
    # The non-skin photos themselves: another draw crops them again (``collect_draw``).
    photos: list[tuple[str, Image.Image]] = field(default_factory=list)


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


def copy_key(path: str, kind: str, k: int, seed: int) -> str:
    """Cache key of one copy (varied copies keep the keys they had before phone copies)."""
    return f"{path}#copy{k}#{seed}" if kind == "varied" else f"{path}#{kind}{k}#{seed}"


def lesion_copies(
    store: FeatureStore, train: pd.DataFrame, n_copies: int, phone_copies: int, seed: int
) -> Part:
    """Varied copies of every training photo, phone-look copies of the dermoscopy ones."""
    rows = []
    for r in train.to_dict("records"):
        path = str(r["path"])
        for k in range(n_copies):
            s = stable_seed(seed, path, k)
            recipe = draw_recipe(np.random.default_rng(s))
            rows.append({**r, "kind": "varied", "copy": k, "seed": s, **vars(recipe)})
        if r["domain"] != "dermoscopy":
            continue
        for k in range(phone_copies):
            s = stable_seed(seed, path, "phone", k)
            rows.append(
                {**r, "domain": "phone", "kind": "phone_look", "copy": k, "seed": s, "artefact": ""}
            )
    cf = pd.DataFrame(rows)
    keys = [
        copy_key(str(p), str(kind), int(k), seed)
        for p, kind, k in zip(cf["path"], cf["kind"], cf["copy"], strict=True)
    ]

    def make(i: int) -> Image.Image:
        img = load_image_file(cf.at[i, "path"])
        if cf.at[i, "kind"] == "phone_look":
            return phone_look(img, int(cf.at[i, "seed"]))
        return lesion_copy(img, int(cf.at[i, "seed"]))[0]

    return Part(cf, store.get("copies", keys, make))


def collect_draw(
    store: FeatureStore,
    df: pd.DataFrame,
    photos: list[tuple[str, Image.Image]],
    per_set: int,
    n_copies: int,
    crops: int,
    seed: int,
    phone_copies: int,
) -> tuple[Part, Part, Part]:
    """One seeded draw of what the skin gate is fitted on: (lesions, their copies, non-skin
    views). Another seed gives another draw (``fit-gates --loso-seeds``)."""
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
    copies = lesion_copies(store, train, n_copies, phone_copies, seed)
    return lesions, copies, views


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
    phone_copies: int = 1,
) -> Collected:
    """Choose the images and get their serve outputs (from the cache where possible)."""
    df = read_datasets(data_dir, sets)
    val = df[df["split"] == "valid"].sort_values("path").reset_index(drop=True)
    val_paths = [str(p) for p in val["path"]]
    valid = Part(val, store.get("valid", val_paths, lambda i: load_image_file(val_paths[i])))

    photos, missing = non_skin_photos(extra_photo_dirs or [])
    for item in missing:
        logger.warning("non-skin photo source missing: %s", item)
    lesions, copies, views = collect_draw(
        store, df, photos, per_set, n_copies, crops, seed, phone_copies
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

    return Collected(df, lesions, copies, valid, valid_artefacts, views, missing, photos)
