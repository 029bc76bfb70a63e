"""Fit an artifact's quality and out-of-distribution gates on real data, and report them.

    python -m model_training.gates --artifact DIR --data-dir ../shared/data

1. Quality (``model_training.quality``). Every training image of each set is measured, with
   one deliberately degraded copy per kind (shrunk to a thumbnail, Gaussian-blurred,
   darkened, overexposed; made in memory, seeded severity from a fixed range) of a sample of
   them. Each threshold is the max-margin one between the strictest value that still keeps
   >= 99.8 % of the real images of every set (so the five checks together keep >= 99 %) and
   the nearest degraded copy on the wrong side of it. The rates are then measured on the
   validation images and their own degraded copies, which the choice never saw. A sample of
   validation images also goes through the model with and without each degradation, to show
   that the copies the gate refuses are ones whose answer does change.
2. Out-of-distribution (``model_training.ood``). A seeded sample of training images (at most
   ``--train-cap``, equal per set) is embedded with the artifact's own ``serve`` endpoint and
   an ``OODDetector`` is fitted on it. The embedding is the ``serve`` output named by
   ``--ood-output`` (default: ``ood_embedding``, the mid-level mixed5 features, when
   ``endpoints.serve`` lists it, else the last-block ``embedding``); it is recorded as
   ``ood.embedding_output`` and the server feeds the detector that output. Non-lesion
   photos (Debian's darknet package, scikit-image's data module: people, animals, objects,
   documents, textures) and random crops of them are split by photo, never by view, into a
   "choice" half, used only to pick the detector variant (one pooled Gaussian, tied or
   separate per-domain covariances, every eigen-direction (the full-dimensional Ledoit–Wolf
   estimate) or fewer; each judged at its own operating threshold from the rule below), and
   a held-out half on which the rejection rate is reported. The threshold is chosen on
   validation lesions alone: a per-domain quantile rule, with the quantile the largest whose
   cross-fitted false rejection (threshold chosen on half the lesion groups, counted on the
   other half) stays <= ``--target-frr`` in each domain (dermoscopy, phone).
3. ``ood.npz``, ``gates.json`` (all figures) and ``metadata.json`` (``quality``: the numeric
   thresholds the server reads; ``quality_report``: rule and rates; ``ood``) are written into
   the artifact.

Embeddings are cached outside the repository (``--cache-dir``, default
``~/.cache/skin-lesion-triage/gates``), keyed by the SavedModel's weights, the ``serve`` output
and the image list.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import os
import shlex
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from PIL import Image, ImageFilter
from sklearn.metrics import roc_auc_score

from model_training.calibration import calibrate
from model_training.data import DEFAULT_SETS, group_bucket, read_datasets
from model_training.ood import METHOD, OODDetector
from model_training.preprocessing import load_image_file, to_rgb
from model_training.quality import (
    THRESHOLD_KEYS,
    QualityMeasures,
    issues_from_measures,
    measure_quality,
)
from model_training.runner import SAVED_MODEL_DIR, Embedder, lazy_files

logger = logging.getLogger("model_training.gates")

GATES_FILE = "gates.json"
OOD_FILE = "ood.npz"
# serve outputs the OOD gate can score, preferred first (docs/ARTIFACT.md).
OOD_OUTPUT_PREFERENCE = ("ood_embedding", "embedding")
DEFAULT_CACHE = (
    Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "skin-lesion-triage" / "gates"
)
DARKNET_DIRS = (Path("/usr/share/darknet/data"), Path("/usr/local/share/darknet/data"))
# scikit-image sample images that are real photographs (the synthetic ones, the binary horse
# and the 3-D stacks are left out; ``cat`` is the same photo as ``chelsea``).
SKIMAGE_PHOTOS = (
    "astronaut", "brick", "camera", "cell", "chelsea", "clock", "coffee", "coins", "eagle",
    "grass", "gravel", "hubble_deep_field", "immunohistochemistry", "lily", "moon", "page",
    "retina", "rocket", "skin", "stereo_motorcycle", "text",
)  # fmt: skip

# Degraded copies: kind -> (parameter, low, high); one copy per image and kind, seeded.
DEGRADATIONS: dict[str, tuple[str, float, float]] = {
    "tiny": ("shorter side in pixels", 12.0, 48.0),
    "blurred": ("Gaussian radius as a fraction of the shorter side", 0.012, 0.03),
    "dark": ("brightness factor", 0.08, 0.3),
    "overexposed": ("brightness gain, then clipped at 255", 1.8, 3.0),
}
# Which degraded kind each threshold is set against, and its direction and scale.
QUALITY_CHECKS: dict[str, tuple[str, str, str, str]] = {
    # key: (measure, degraded kind, "min" | "max", "geometric" | "arithmetic")
    "min_side": ("min_side", "tiny", "min", "geometric"),
    "min_sharpness": ("sharpness", "blurred", "min", "geometric"),
    "min_brightness": ("brightness", "dark", "min", "arithmetic"),
    "max_brightness": ("brightness", "overexposed", "max", "arithmetic"),
    "max_clipped_fraction": ("clipped_fraction", "overexposed", "max", "arithmetic"),
}
EXPECTED_CODE = {
    "tiny": "too_small",
    "blurred": "too_blurry",
    "dark": "too_dark",
    "overexposed": "overexposed",
}
ROUNDING = {
    "min_side": 0,
    "min_sharpness": 2,
    "min_brightness": 1,
    "max_brightness": 1,
    "max_clipped_fraction": 4,
}
# Detector variants compared on the "choice" non-lesion photos: (group by, tied, components);
# components None = every direction the data span (the full-dimensional Ledoit–Wolf estimate).
OOD_VARIANTS: tuple[tuple[str | None, bool, int | None], ...] = (
    (None, True, None),
    ("domain", True, None),
    ("domain", False, None),
    ("domain", False, 256),
    ("domain", False, 64),
)


# --------------------------------------------------------------------------- non-lesion photos


def _rgb_from_array(arr: np.ndarray) -> Image.Image:
    a = np.asarray(arr)
    if a.dtype != np.uint8:
        a = np.clip(a * (255.0 if a.max(initial=0) <= 1.0 else 1.0), 0, 255).astype(np.uint8)
    return to_rgb(Image.fromarray(a))


def find_non_lesion_photos(
    extra_dirs: Sequence[Path] = (),
) -> tuple[list[tuple[str, Image.Image]], list[str]]:
    """(photos found as (source/name, RGB image), what was looked for and not found)."""
    photos: list[tuple[str, Image.Image]] = []
    missing: list[str] = []

    folders = [d for d in DARKNET_DIRS if d.is_dir()]
    if not folders:
        missing.append("darknet (apt-get install darknet): no /usr/share/darknet/data")
    for folder in [*folders[:1], *extra_dirs]:
        source = "darknet" if folder in DARKNET_DIRS else folder.name
        files = sorted(p for p in folder.iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
        if not files:
            missing.append(f"{folder}: no .jpg/.png photos")
        for path in files:
            try:
                photos.append((f"{source}/{path.stem}", load_image_file(path)))
            except ValueError as exc:
                missing.append(f"{path}: {exc}")

    try:
        import skimage.data as skdata
    except ImportError:
        missing.append("scikit-image (pip install scikit-image): skimage.data photos")
    else:
        for name in SKIMAGE_PHOTOS:
            loader = getattr(skdata, name, None)
            if loader is None:
                missing.append(f"skimage.data.{name}: not in this version")
                continue
            try:
                arr = loader()
            except (KeyboardInterrupt, SystemExit):
                raise
            except BaseException as exc:  # needs the optional `pooch` download (under pytest
                # scikit-image raises pytest's Skipped, a BaseException, instead)
                missing.append(f"skimage.data.{name}: {type(exc).__name__}")
                continue
            if isinstance(arr, tuple):  # stereo_motorcycle: (left, right, disparity)
                arr = arr[0]
            photos.append((f"skimage/{name}", _rgb_from_array(arr)))
    return photos, missing


def non_lesion_photos() -> list[tuple[str, Image.Image]]:
    """Real photos of things that are not skin lesions, from what is installed.

    Darknet's sample photos (dog, eagle, giraffe, horses, kite, person, scream) and
    scikit-image's real photographs (astronaut, cat, coffee, camera man, page, text, rocket,
    coins, retina, ...), grey ones made RGB. What could not be found is logged.
    """
    photos, missing = find_non_lesion_photos()
    for item in missing:
        logger.warning("non-lesion photo source missing: %s", item)
    return photos


def face_thumbnails(limit: int = 200) -> list[tuple[str, Image.Image]]:
    """scikit-image's LFW subset: real 25x25 grey face crops (empty list when absent)."""
    try:
        import skimage.data as skdata

        faces = skdata.lfw_subset()[:limit]
    except Exception as exc:  # optional source
        logger.warning("skimage.data.lfw_subset unavailable: %s", exc)
        return []
    return [(f"lfw/{i:03d}", _rgb_from_array(face)) for i, face in enumerate(faces)]


def _stable_seed(*parts: object) -> int:
    return int(hashlib.sha256(repr(parts).encode()).hexdigest()[:12], 16)


def photo_views(
    photos: Sequence[tuple[str, Image.Image]], n_crops: int, seed: int
) -> list[tuple[str, str, Image.Image]]:
    """(photo, view, image): the whole photo plus ``n_crops`` random square crops of it."""
    views: list[tuple[str, str, Image.Image]] = []
    for name, img in photos:
        views.append((name, "full", img))
        rng = np.random.default_rng(_stable_seed(seed, name))
        w, h = img.size
        for i in range(n_crops):
            side = max(8, int(min(w, h) * rng.uniform(0.4, 0.75)))
            left = int(rng.integers(0, w - side + 1))
            top = int(rng.integers(0, h - side + 1))
            views.append((name, f"crop{i + 1}", img.crop((left, top, left + side, top + side))))
    return views


def split_photos(names: Iterable[str]) -> dict[str, str]:
    """Photo → "choice" | "held_out": alternate within each source in sorted order."""
    by_source: dict[str, list[str]] = {}
    for name in sorted(set(names)):
        by_source.setdefault(name.split("/", 1)[0], []).append(name)
    return {
        name: ("choice" if i % 2 == 0 else "held_out")
        for members in by_source.values()
        for i, name in enumerate(members)
    }


# --------------------------------------------------------------------------- degradations


def degrade(img: Image.Image, kind: str, rng: np.random.Generator) -> tuple[Image.Image, float]:
    """A degraded copy of ``img`` (see DEGRADATIONS) and the severity drawn."""
    _, low, high = DEGRADATIONS[kind]
    w, h = img.size
    if kind == "tiny":
        side = float(rng.integers(int(low), int(high) + 1))
        scale = side / min(w, h)
        size = (max(1, round(w * scale)), max(1, round(h * scale)))
        return img.resize(size, Image.Resampling.BILINEAR), side
    value = float(rng.uniform(low, high))
    if kind == "blurred":
        return img.filter(ImageFilter.GaussianBlur(value * min(w, h))), value
    if kind in ("dark", "overexposed"):
        arr = np.asarray(img, dtype=np.float32) * value
        return Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8)), value
    raise ValueError(f"unknown degradation {kind!r}")


def degraded_copies(img: Image.Image, key: str, seed: int) -> dict[str, tuple[Image.Image, float]]:
    """One copy per kind, each seeded by (seed, image key, kind): order-independent."""
    return {
        kind: degrade(img, kind, np.random.default_rng(_stable_seed(seed, key, kind)))
        for kind in DEGRADATIONS
    }


# --------------------------------------------------------------------------- model & cache


def artifact_fingerprint(artifact: Path) -> str:
    """Hash of the SavedModel graph and its variable index (which checksums every tensor)."""
    digest = hashlib.sha256()
    for rel in ("saved_model.pb", "variables/variables.index", "fingerprint.pb"):
        path = artifact / SAVED_MODEL_DIR / rel
        if path.exists():
            digest.update(rel.encode())
            digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def choose_ood_output(serve_outputs: Sequence[str], requested: str | None = None) -> str:
    """The ``serve`` output the OOD gate scores: ``requested``, else the first of
    OOD_OUTPUT_PREFERENCE that the endpoint lists."""
    outputs = list(serve_outputs)
    if requested is not None:
        if requested not in outputs:
            raise ValueError(f"serve has no output {requested!r} (it lists {outputs})")
        return requested
    for name in OOD_OUTPUT_PREFERENCE:
        if name in outputs:
            return name
    raise ValueError(f"serve lists none of {list(OOD_OUTPUT_PREFERENCE)} (it lists {outputs})")


@dataclass
class EmbeddingCache:
    """Embeddings on disk, one .npz per (artifact weights, serve output, purpose, item list)."""

    folder: Path
    fingerprint: str
    enabled: bool = True
    output: str = "embedding"  # the serve output cached: part of the key

    def get(
        self,
        tag: str,
        keys: Sequence[str],
        compute: Callable[[], tuple[np.ndarray, np.ndarray]],
    ) -> tuple[np.ndarray, np.ndarray]:
        """Cached (logits, embeddings) for ``keys``; computed and stored on a miss."""
        digest = hashlib.sha256("\n".join(keys).encode()).hexdigest()[:16]
        path = self.folder / self.fingerprint / f"{tag}-{self.output}-{digest}.npz"
        if self.enabled and path.exists():
            with np.load(path, allow_pickle=False) as data:
                logger.info("embeddings from cache: %s", path)
                return data["logits"], data["embeddings"]
        logits, embeddings = compute()
        if self.enabled:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(".tmp.npz")
            np.savez(tmp, logits=logits, embeddings=embeddings)
            tmp.replace(path)
        return logits, embeddings


# --------------------------------------------------------------------------- quality


def _quantile(values: np.ndarray, q: float, method: str) -> float:
    return float(np.quantile(values, q, method=method))  # type: ignore[call-overload]


def choose_quality_threshold(
    real_by_set: Mapping[str, np.ndarray],
    degraded: np.ndarray,
    keep: float,
    direction: str,
    scale: str,
) -> dict[str, float]:
    """Max-margin threshold that keeps >= ``keep`` of the real images of every set.

    For a "min" check (reject below): ``strict`` = the highest value that rejects at most
    1 - keep of every set; ``edge`` = the largest degraded value below it. The threshold is
    their midpoint (geometric for scale-like measures), so it rejects exactly the degraded
    copies ``strict`` rejects while keeping as many real images as possible. Mirrored for
    "max".
    """
    sign = 1.0 if direction == "min" else -1.0
    # Work on sign * value so "reject below the threshold" covers both directions.
    strict = min(_quantile(sign * v, 1.0 - keep, "lower") for v in real_by_set.values())
    below = sign * degraded[sign * degraded < strict]
    edge = float(below.max()) if below.size else strict
    if scale == "geometric" and edge > 0 and strict > 0:
        mid = math.sqrt(edge * strict)
    else:
        mid = (edge + strict) / 2.0
    return {"threshold": sign * mid, "strict": sign * strict, "edge": sign * edge}


def _measure_row(m: QualityMeasures) -> dict[str, float]:
    return {**m.as_dict(), "min_side": float(m.min_side)}


def measure_images(
    df: pd.DataFrame, degrade_mask: np.ndarray, seed: int, desc: str
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Quality measures of every image of ``df`` and of degraded copies of the masked ones."""
    from tqdm import tqdm

    real_rows: list[dict[str, Any]] = []
    degraded_rows: list[dict[str, Any]] = []
    rows = zip(df["path"], df["dataset"], degrade_mask, strict=True)
    for path, dataset, make_copies in tqdm(rows, total=len(df), desc=desc, file=sys.stderr):
        img = load_image_file(path)
        real_rows.append({"dataset": dataset, **_measure_row(measure_quality(img))})
        if make_copies:
            for kind, (copy, severity) in degraded_copies(img, str(path), seed).items():
                degraded_rows.append(
                    {
                        "dataset": dataset,
                        "kind": kind,
                        "severity": severity,
                        **_measure_row(measure_quality(copy)),
                    }
                )
    return pd.DataFrame(real_rows), pd.DataFrame(degraded_rows)


def _issues(row: Mapping[str, Any], thresholds: Mapping[str, float]) -> list[str]:
    measures = QualityMeasures(
        width=int(row["width"]),
        height=int(row["height"]),
        sharpness=float(row["sharpness"]),
        brightness=float(row["brightness"]),
        dark_fraction=float(row["dark_fraction"]),
        clipped_fraction=float(row["clipped_fraction"]),
    )
    return [issue.code for issue in issues_from_measures(measures, thresholds)]


def _rate(mask: np.ndarray) -> float:
    return float(np.mean(mask)) if len(mask) else float("nan")


def _gate_rates(real: pd.DataFrame, degraded: pd.DataFrame) -> dict[str, Any]:
    """Rejection of real images (by set) and of degraded copies (by kind) by the whole gate."""
    rejected = real["issues"].map(bool)
    return {
        "real": {
            "n_by_set": {str(s): len(p) for s, p in real.groupby("dataset")},
            "rejected_by_set": {
                str(s): _rate(rejected[p.index].to_numpy()) for s, p in real.groupby("dataset")
            },
            "rejected_pooled": _rate(rejected.to_numpy()),
            "reasons": _count_codes(real["issues"]),
        },
        "degraded": {
            str(kind): {
                "n": len(part),
                "rejected": _rate(part["issues"].map(bool).to_numpy()),
                "rejected_for_expected_reason": _rate(
                    part["issues"].map(lambda c, k=kind: EXPECTED_CODE[str(k)] in c).to_numpy()
                ),
                "rejected_by_set": {
                    str(s): _rate(p["issues"].map(bool).to_numpy())
                    for s, p in part.groupby("dataset")
                },
            }
            for kind, part in degraded.groupby("kind")
        },
    }


def fit_quality(
    choice: pd.DataFrame,
    held_out: pd.DataFrame,
    degrade_per_set: int,
    keep: float,
    seed: int,
) -> tuple[dict[str, float], dict[str, Any]]:
    """Quality thresholds chosen on ``choice`` images, rates reported on ``held_out`` ones.

    ``choice``: real images (the training splits) plus degraded copies of a seeded sample of
    ``degrade_per_set`` of them per set; ``held_out``: the validation images, each with one
    copy per degradation kind.
    """
    checks = len(QUALITY_CHECKS)
    keep_per_check = 1.0 - (1.0 - keep) / checks
    rng = np.random.default_rng(seed)
    mask = np.zeros(len(choice), dtype=bool)
    for _, part in choice.groupby("dataset"):
        idx = np.flatnonzero((choice["dataset"] == part["dataset"].iloc[0]).to_numpy())
        mask[rng.choice(idx, size=min(degrade_per_set, len(idx)), replace=False)] = True
    real, degraded = measure_images(choice, mask, seed, "quality (choice)")
    val_real, val_degraded = measure_images(
        held_out, np.ones(len(held_out), dtype=bool), seed, "quality (validation)"
    )

    thresholds: dict[str, float] = {}
    per_check: dict[str, Any] = {}
    for key, (measure, kind, direction, scale) in QUALITY_CHECKS.items():
        by_set = {str(s): part[measure].to_numpy() for s, part in real.groupby("dataset")}
        values = degraded.loc[degraded["kind"] == kind, measure].to_numpy()
        picked = choose_quality_threshold(by_set, values, keep_per_check, direction, scale)
        value = round(picked["threshold"], ROUNDING[key])
        if key == "min_side":
            value = float(math.ceil(picked["threshold"]))
        thresholds[key] = value

        def reject(v: np.ndarray, t: float = value, d: str = direction) -> np.ndarray:
            return np.asarray(v < t if d == "min" else v > t)

        val_values = val_degraded.loc[val_degraded["kind"] == kind, measure].to_numpy()
        per_check[key] = {
            "measure": measure,
            "against": kind,
            "direction": direction,
            "midpoint": scale,
            "strictest_allowed": picked["strict"],
            "nearest_degraded": picked["edge"],
            "choice_real_rejected_by_set": {s: _rate(reject(v)) for s, v in by_set.items()},
            "choice_degraded_rejected": _rate(reject(values)),
            "validation_real_rejected_by_set": {
                str(s): _rate(reject(p[measure].to_numpy())) for s, p in val_real.groupby("dataset")
            },
            "validation_degraded_rejected": _rate(reject(val_values)),
        }

    for frame in (real, degraded, val_real, val_degraded):
        frame["issues"] = [_issues(r, thresholds) for r in frame.to_dict("records")]
    report: dict[str, Any] = {
        "thresholds": thresholds,
        "rule": (
            f"per check, the max-margin threshold between the strictest value that keeps >= "
            f"{keep_per_check:.1%} of the real training images of every set (so the "
            f"{checks} checks together keep >= {keep:.0%}) and the nearest degraded copy on "
            "the wrong side of it (midpoint geometric for size and sharpness, arithmetic "
            "otherwise); rates then measured on the validation images and their degraded "
            "copies, which the choice never saw"
        ),
        "measures": {
            "min_side": "shorter side of the photo as uploaded, pixels",
            "sharpness": "variance of the 4-neighbour Laplacian of the luma at 256x256",
            "brightness": "mean luma 0..255 at 256x256",
            "clipped_fraction": "share of 256x256 luma pixels >= 250",
        },
        "degradations": {
            kind: {"parameter": p, "low": lo, "high": hi}
            for kind, (p, lo, hi) in DEGRADATIONS.items()
        },
        "checks": per_check,
        "choice": _gate_rates(real, degraded),
        "validation": _gate_rates(val_real, val_degraded),
        "quantiles_choice_real": {
            m: {f"q{q:g}": float(real[m].quantile(q / 100)) for q in (0, 0.2, 1, 50, 99, 99.8, 100)}
            for m in ("min_side", "sharpness", "brightness", "clipped_fraction")
        },
    }
    return thresholds, report


def _count_codes(issues: pd.Series) -> dict[str, int]:
    counts: dict[str, int] = {}
    for codes in issues:
        for code in codes:
            counts[code] = counts.get(code, 0) + 1
    return counts


def quality_sensitivity(
    embed: Embedder,
    val: pd.DataFrame,
    logits: np.ndarray,
    per_set: int,
    thresholds: Mapping[str, float],
    temperature: float,
    decision_threshold: float,
    seed: int,
    logit_bias: float = 0.0,
) -> dict[str, Any]:
    """How the model's answer changes on degraded copies, by whether the gate rejects them.

    Answers are calibrated probabilities, sigmoid((logit + logit_bias) / temperature), as the
    server computes them, against the calibrated ``decision_threshold``.
    """
    rng = np.random.default_rng(seed)
    picks: list[int] = []
    for _, part in val.groupby("dataset"):
        idx = part.index.to_numpy()
        picks.extend(rng.choice(idx, size=min(per_set, len(idx)), replace=False).tolist())
    picks.sort()
    copies: list[tuple[int, str, Image.Image]] = []
    for i in picks:
        img = load_image_file(val.at[i, "path"])
        for kind, (copy, _) in degraded_copies(img, str(val.at[i, "path"]), seed).items():
            copies.append((i, kind, copy))
    deg_logits, _ = embed((c for _, _, c in copies), len(copies), "degraded copies")

    def prob(x: np.ndarray) -> np.ndarray:
        return calibrate(x, logit_bias, temperature)

    out: dict[str, Any] = {"images": len(picks), "per_set": per_set}
    kinds = np.asarray([k for _, k, _ in copies])
    rows = np.asarray([i for i, _, _ in copies])
    rejected = np.asarray(
        [bool(issues_from_measures(measure_quality(c), thresholds)) for _, _, c in copies]
    )
    p0 = prob(logits[rows])
    p1 = prob(deg_logits)
    flips = (p0 >= decision_threshold) != (p1 >= decision_threshold)
    for kind in DEGRADATIONS:
        m = kinds == kind
        out[kind] = {
            "decision_flip_rate": _rate(flips[m]),
            "mean_abs_probability_change": float(np.mean(np.abs(p1[m] - p0[m]))),
            "gate_rejects": _rate(rejected[m]),
            "flip_rate_if_rejected": _rate(flips[m & rejected]),
            "flip_rate_if_passed": _rate(flips[m & ~rejected]),
        }
    return out


# --------------------------------------------------------------------------- OOD


def frr_threshold(scores_by_domain: Mapping[str, np.ndarray], target: float) -> float:
    """Smallest threshold with at most ``target`` of every domain's scores above it."""
    return max(_quantile(s, 1.0 - target, "higher") for s in scores_by_domain.values() if len(s))


def auroc(negatives: np.ndarray, positives: np.ndarray) -> float:
    """P(positive score > negative score), ties counted half; NaN when a side is empty."""
    if not len(negatives) or not len(positives):
        return float("nan")
    labels = np.r_[np.zeros(len(negatives)), np.ones(len(positives))]
    return float(roc_auc_score(labels, np.r_[negatives, positives]))


CROSSFIT_REPEATS = 20
# Candidate quantile targets, as fractions of --target-frr (see choose_operating_point).
TARGET_FRACTIONS = (1.0, 0.875, 0.75, 0.625, 0.5, 0.375, 0.25)


def crossfit_frr(
    scores: np.ndarray,
    domains: np.ndarray,
    groups: Sequence[str],
    target: float,
    repeats: int = CROSSFIT_REPEATS,
) -> dict[str, dict[str, float]]:
    """Out-of-sample false rejection of the ``frr_threshold(target)`` rule, per domain.

    The validation lesion groups (patients / lesions) are halved at random ``repeats`` times
    (md5 of repeat and group); the threshold is chosen on one half and the rejection counted
    on the other, both ways round. Pessimistic: each threshold sees half the data.
    """
    names = [str(d) for d in np.unique(domains)]
    counts = {d: [0, 0] for d in names}
    for rep in range(repeats):
        half = np.asarray([group_bucket(f"{rep}:{g}", 2) for g in groups])
        for fold in (0, 1):
            pick = half == fold
            t = frr_threshold({d: scores[pick & (domains == d)] for d in names}, target)
            for d in names:
                test = ~pick & (domains == d)
                counts[d][0] += int((scores[test] > t).sum())
                counts[d][1] += int(test.sum())
    return {
        d: {"rate": a / b if b else float("nan"), "rejected": a, "scored": b}
        for d, (a, b) in counts.items()
    }


def choose_operating_point(
    scores: np.ndarray, domains: np.ndarray, groups: Sequence[str], target_frr: float
) -> tuple[float, float, list[dict[str, Any]]]:
    """(threshold, quantile target used, table of candidates).

    The largest candidate target (a fraction of ``target_frr``) whose cross-fitted false
    rejection is <= ``target_frr`` in every domain; the threshold is then that target's rule
    applied to all validation lesions. Only lesions are used: no non-lesion photo.
    """
    by_domain = {str(d): scores[domains == d] for d in np.unique(domains)}
    table: list[dict[str, Any]] = []
    chosen: tuple[float, float] | None = None
    for fraction in TARGET_FRACTIONS:
        target = target_frr * fraction
        threshold = frr_threshold(by_domain, target)
        cross = crossfit_frr(scores, domains, groups, target)
        ok = all(c["rate"] <= target_frr for c in cross.values())
        table.append(
            {
                "quantile_target": target,
                "threshold": threshold,
                "in_sample": {d: _rate(s > threshold) for d, s in by_domain.items()},
                "crossfit": {d: c["rate"] for d, c in cross.items()},
                "meets_target": ok,
            }
        )
        if ok and chosen is None:
            chosen = (threshold, target)
    if chosen is None:
        logger.warning("no candidate meets the false-rejection target out of sample")
        chosen = (table[-1]["threshold"], table[-1]["quantile_target"])
    return chosen[0], chosen[1], table


def fit_ood(
    train: pd.DataFrame,
    train_emb: np.ndarray,
    val: pd.DataFrame,
    val_emb: np.ndarray,
    views: pd.DataFrame,
    view_emb: np.ndarray,
    faces_emb: np.ndarray,
    target_frr: float,
) -> tuple[OODDetector, dict[str, Any]]:
    """Pick the variant on choice photos; threshold on validation lesions; report held-out."""
    domains = val["domain"].to_numpy()
    lesion_groups = val["group"].astype(str).tolist()
    choice = (views["part"] == "choice").to_numpy()
    held = ~choice
    variants: list[dict[str, Any]] = []
    best: tuple[tuple[float, float], OODDetector, dict[str, Any]] | None = None
    for group_by, tied, k in OOD_VARIANTS:
        groups = train[group_by].to_numpy() if group_by else None
        det = OODDetector.fit(train_emb, groups=groups, n_components=k, tied=tied)
        val_scores = det.score(val_emb)
        nominal_thr = frr_threshold(
            {d: val_scores[domains == d] for d in np.unique(domains)}, target_frr
        )
        # Each variant is judged at the threshold it would ship with: its own operating
        # point from the lesion-only rule (a heavy validation tail costs it rejections).
        thr, variant_target, _ = choose_operating_point(
            val_scores, domains, lesion_groups, target_frr
        )
        choice_scores = det.score(view_emb[choice])
        rate = _rate(choice_scores > thr)
        margin = float(np.median(np.log(choice_scores / thr)))
        entry = {
            "groups": group_by or "none",
            "tied": det.tied,
            "n_components": det.describe()["n_components"],
            "threshold": thr,
            "quantile_target": variant_target,
            "choice_rejection": rate,
            "choice_median_log_margin": margin,
            "nominal_threshold": nominal_thr,
            "choice_rejection_at_nominal_threshold": _rate(choice_scores > nominal_thr),
            "choice_auroc": auroc(val_scores, choice_scores),
        }
        variants.append(entry)
        key = (rate, margin)
        if best is None or key > best[0]:
            best = (key, det, entry)
    assert best is not None
    _, det, picked = best

    val_scores = det.score(val_emb)
    by_domain = {str(d): val_scores[domains == d] for d in np.unique(domains)}
    threshold, used_target, table = choose_operating_point(
        val_scores, domains, lesion_groups, target_frr
    )
    det.threshold = threshold
    rejected_val = val_scores > threshold
    cross = crossfit_frr(val_scores, domains, lesion_groups, used_target)
    nominal = frr_threshold(by_domain, target_frr)

    view_scores = det.score(view_emb)
    view_out = view_scores > threshold
    full = (views["view"] == "full").to_numpy()
    face_scores = det.score(faces_emb) if len(faces_emb) else np.zeros(0)

    per_photo = []
    for (photo, part), idx in views.groupby(["photo", "part"]).groups.items():
        rows = np.asarray([views.index.get_loc(i) for i in idx])
        per_photo.append(
            {
                "photo": photo,
                "part": part,
                "views": len(rows),
                "views_rejected": int(view_out[rows].sum()),
                "full_view_score": float(view_scores[rows][full[rows]][0])
                if full[rows].any()
                else None,
                "min_view_score": float(view_scores[rows].min()),
            }
        )

    report: dict[str, Any] = {
        "method": METHOD,
        "detector": det.describe(),
        "variant_choice": {
            "rule": "highest rejection of the choice non-lesion views at each variant's own "
            "operating threshold (the lesion-only rule below, applied to that variant's "
            "validation scores); ties broken by the median log(score / threshold)",
            "variants": variants,
            "picked": picked,
        },
        "threshold": threshold,
        "rule": (
            f"per-domain quantile rule: the smallest threshold rejecting at most q of the "
            f"validation lesions of each domain, with q the largest of "
            f"{[round(target_frr * f, 5) for f in TARGET_FRACTIONS]} whose cross-fitted false "
            f"rejection ({CROSSFIT_REPEATS} random halvings of the lesion groups) is <= "
            f"{target_frr:.1%} in every domain; chosen q = {used_target:.4f}"
        ),
        "operating_points": table,
        "nominal_threshold": {
            "threshold": nominal,
            "note": f"the plain in-sample {target_frr:.0%} quantile rule, for comparison",
            "held_out_non_lesion_rejection": _rate(det.score(view_emb[held]) > nominal),
        },
        "false_rejection": {d: _rate(rejected_val[domains == d]) for d in by_domain},
        "false_rejection_counts": {
            d: [int(rejected_val[domains == d].sum()), int((domains == d).sum())] for d in by_domain
        },
        "false_rejection_by_set": {
            str(s): _rate(rejected_val[(val["dataset"] == s).to_numpy()])
            for s in sorted(val["dataset"].unique())
        },
        "false_rejection_crossfit": {d: c["rate"] for d, c in cross.items()},
        "false_rejection_crossfit_counts": {
            d: [c["rejected"], c["scored"]] for d, c in cross.items()
        },
        "crossfit_rule": f"validation lesion groups halved at random {CROSSFIT_REPEATS} times "
        "(md5 of repeat and group); threshold chosen on one half with the same rule, false "
        "rejection counted on the other, both ways round; pooled counts",
        "non_lesion_rejection": _rate(view_out[held]),
        "non_lesion": {
            "held_out": {
                "photos": int(views.loc[held, "photo"].nunique()),
                "views": int(held.sum()),
                "rejected_views": _rate(view_out[held]),
                "rejected_full_photos": _rate(view_out[held & full]),
            },
            "choice": {
                "photos": int(views.loc[choice, "photo"].nunique()),
                "views": int(choice.sum()),
                "rejected_views": _rate(view_out[choice]),
                "rejected_full_photos": _rate(view_out[choice & full]),
            },
            "all": {"views": len(views), "rejected_views": _rate(view_out)},
            "lfw_faces_25px": {
                "n": len(face_scores),
                "rejected": _rate(face_scores > threshold),
                "note": "never used for any choice; 25x25 grey thumbnails, which the quality "
                "gate refuses as too small before the model runs",
            },
            "per_photo": sorted(per_photo, key=lambda r: (r["part"], r["photo"])),
        },
        "auroc_validation_vs_held_out_views": auroc(val_scores, view_scores[held]),
        "score_quantiles_validation": {
            d: {f"q{q}": float(np.quantile(s, q / 100)) for q in (50, 90, 98, 99, 100)}
            for d, s in by_domain.items()
        },
    }
    return det, report


# --------------------------------------------------------------------------- main


def training_sample(df: pd.DataFrame, cap: int, seed: int) -> pd.DataFrame:
    """At most ``cap`` training images, equal per set, one per lesion group before repeats."""
    train = df[df["split"] == "train"]
    sets = sorted(train["dataset"].unique())
    per_set = max(1, cap // max(1, len(sets)))
    parts = []
    for name in sets:
        part = train[train["dataset"] == name].sample(frac=1.0, random_state=seed)
        part = part.assign(_rep=part.groupby("group").cumcount()).sort_values("_rep", kind="stable")
        parts.append(part.head(per_set).drop(columns="_rep"))
    return pd.concat(parts).sort_values("path").reset_index(drop=True)


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Fit both gates into ``args.artifact`` and return the report written to gates.json."""
    from model_training.export import SAVED_MODEL_DIR as EXPORT_DIR
    from model_training.export import read_metadata, write_metadata

    if EXPORT_DIR != SAVED_MODEL_DIR:
        raise RuntimeError(f"SavedModel folder is {EXPORT_DIR!r}, gates assume {SAVED_MODEL_DIR!r}")
    artifact: Path = args.artifact
    meta = read_metadata(artifact)
    df = read_datasets(args.data_dir, args.sets)
    val = df[df["split"] == "valid"].sort_values("path").reset_index(drop=True)
    train = training_sample(df, args.train_cap, args.seed)
    logger.info("validation images: %d, training sample: %d", len(val), len(train))

    # Quality (no model needed): chosen on the training images, reported on validation.
    train_all = df[df["split"] == "train"].sort_values("path").reset_index(drop=True)
    thresholds, quality_report = fit_quality(
        train_all, val, args.degrade_per_set, args.keep, args.seed
    )
    logger.info("quality thresholds: %s", thresholds)

    ood_output = choose_ood_output(meta.get("endpoints", {}).get("serve", []), args.ood_output)
    logger.info("OOD gate scores serve output %r", ood_output)
    embed = Embedder(artifact, args.batch_size, ood_output)
    cache = EmbeddingCache(
        args.cache_dir, artifact_fingerprint(artifact), not args.no_cache, ood_output
    )
    val_paths = val["path"].tolist()
    train_paths = train["path"].tolist()
    val_logits, val_emb = cache.get(
        "valid", val_paths, lambda: embed(lazy_files(val_paths), len(val_paths), "validation")
    )
    _, train_emb = cache.get(
        "train", train_paths, lambda: embed(lazy_files(train_paths), len(train_paths), "training")
    )

    quality_report["model_sensitivity"] = quality_sensitivity(
        embed,
        val,
        val_logits,
        args.sensitivity_per_set,
        thresholds,
        float(meta.get("temperature", 1.0)),
        float(meta["threshold"]),
        args.seed,
        float(meta.get("logit_bias", 0.0)),
    )

    photos, missing = find_non_lesion_photos(args.non_lesion_dir)
    for item in missing:
        logger.warning("non-lesion photo source missing: %s", item)
    if not photos:
        raise SystemExit(
            "no non-lesion photos found: apt-get install darknet, pip install scikit-image"
        )
    parts = split_photos(name for name, _ in photos)
    view_list = photo_views(photos, args.crops, args.seed)
    views = pd.DataFrame([{"photo": p, "view": v, "part": parts[p]} for p, v, _ in view_list])
    view_keys = [f"{p}#{v}#{args.seed}" for p, v, _ in view_list]
    _, view_emb = cache.get(
        "non-lesion",
        view_keys,
        lambda: embed((img for _, _, img in view_list), len(view_list), "non-lesion"),
    )
    faces = face_thumbnails()
    _, faces_emb = cache.get(
        "faces",
        [name for name, _ in faces],
        lambda: embed((img for _, img in faces), len(faces), "faces"),
    )
    view_quality = np.asarray(
        [bool(issues_from_measures(measure_quality(img), thresholds)) for _, _, img in view_list]
    )

    detector, ood_report = fit_ood(
        train, train_emb, val, val_emb, views, view_emb, faces_emb, args.target_frr
    )
    held = (views["part"] == "held_out").to_numpy()
    view_ood = detector.is_outlier(view_emb)
    ood_report["non_lesion"]["held_out"]["rejected_by_either_gate"] = _rate(
        (view_ood | view_quality)[held]
    )
    ood_report["non_lesion"]["held_out"]["rejected_by_quality_gate"] = _rate(view_quality[held])
    ood_report["non_lesion"]["sources_missing"] = missing
    val_quality = np.asarray(
        [
            bool(issues_from_measures(measure_quality(load_image_file(p)), thresholds))
            for p in val_paths
        ]
    )
    val_ood = detector.is_outlier(val_emb)
    ood_report["validation_rejected_by_either_gate"] = {
        str(d): _rate((val_ood | val_quality)[(val["domain"] == d).to_numpy()])
        for d in sorted(val["domain"].unique())
    }
    ood_report["embedding_output"] = ood_output
    ood_report["embedding_dim"] = detector.dim
    ood_report["fitted_on"] = {
        "images": len(train),
        "by_set": {str(k): int(v) for k, v in train["dataset"].value_counts().sort_index().items()},
        "rule": f"seeded sample of training images (seed {args.seed}), at most "
        f"{args.train_cap} in all, equal per set, distinct lesion groups first",
    }

    ood_report["file_bytes"] = detector.save(artifact / OOD_FILE).stat().st_size
    report = {
        "command": "python -m model_training.gates " + shlex.join(sys.argv[1:]),
        "artifact_fingerprint": artifact_fingerprint(artifact),
        "data": {"sets": list(args.sets), "validation_images": len(val)},
        "quality": quality_report,
        "ood": ood_report,
        "inference_seconds_per_image": embed.seconds / max(1, embed.images_done),
    }
    (artifact / GATES_FILE).write_text(json.dumps(_jsonable(report), indent=2) + "\n")

    # Read again: the fit takes minutes, and only this command's keys are to change.
    meta = read_metadata(artifact)
    meta["quality"] = {k: thresholds[k] for k in THRESHOLD_KEYS if k in thresholds}
    meta["quality_report"] = {
        "rule": quality_report["rule"],
        "report": GATES_FILE,
        "validation_real_rejected": quality_report["validation"]["real"]["rejected_by_set"],
        "validation_degraded_rejected": {
            k: v["rejected"] for k, v in quality_report["validation"]["degraded"].items()
        },
        "choice_real_rejected": quality_report["choice"]["real"]["rejected_by_set"],
    }
    meta["ood"] = {
        "file": OOD_FILE,
        "method": METHOD,
        "embedding_output": ood_output,
        "threshold": ood_report["threshold"],
        "rule": ood_report["rule"],
        "groups": ood_report["detector"]["groups"],
        "tied": ood_report["detector"]["tied"],
        "n_components": ood_report["detector"]["n_components"],
        "false_rejection": ood_report["false_rejection"],
        "false_rejection_crossfit": ood_report["false_rejection_crossfit"],
        "non_lesion_rejection": ood_report["non_lesion_rejection"],
        "non_lesion_held_out": {
            "photos": ood_report["non_lesion"]["held_out"]["photos"],
            "views": ood_report["non_lesion"]["held_out"]["views"],
        },
        "report": GATES_FILE,
    }
    meta["quality_report"] = _jsonable(meta["quality_report"])
    meta["ood"] = _jsonable(meta["ood"])
    write_metadata(artifact, meta)
    return report


def _jsonable(value: Any) -> Any:
    """Plain JSON: NumPy scalars to Python, NaN and infinities to null."""
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def summary(report: Mapping[str, Any]) -> str:
    """The headline figures as a few lines of text."""
    q = report["quality"]
    o = report["ood"]
    lines = [
        "quality thresholds: " + json.dumps(q["thresholds"]),
        "  real training images (choice) rejected by set: "
        + _fmt(q["choice"]["real"]["rejected_by_set"]),
        "  real validation images rejected by set: "
        + _fmt(q["validation"]["real"]["rejected_by_set"]),
        "  degraded validation copies rejected: "
        + _fmt({k: v["rejected"] for k, v in q["validation"]["degraded"].items()}),
        "  decision flips on degraded copies: "
        + _fmt(
            {
                k: v["decision_flip_rate"]
                for k, v in q["model_sensitivity"].items()
                if isinstance(v, dict)
            }
        ),
        f"ood: serve output {o.get('embedding_output', 'embedding')!r} "
        f"({o['detector']['dim']}-d), Gaussians {o['detector']['groups']} "
        f"(tied: {o['detector']['tied']}), "
        f"components {o['detector']['n_components']}, threshold {o['threshold']:.1f}",
        "  validation false rejection: " + _fmt(o["false_rejection"]),
        "  cross-fitted false rejection: " + _fmt(o["false_rejection_crossfit"]),
        f"  held-out non-lesion rejection: {o['non_lesion_rejection']:.1%} of "
        f"{o['non_lesion']['held_out']['views']} views of "
        f"{o['non_lesion']['held_out']['photos']} photos",
        f"  lfw faces rejection: {o['non_lesion']['lfw_faces_25px']['rejected']:.1%}",
    ]
    return "\n".join(lines)


def _fmt(rates: Mapping[str, float]) -> str:
    return ", ".join(f"{k} {v:.1%}" for k, v in rates.items())


def build_parser() -> argparse.ArgumentParser:
    """Command-line options."""
    p = argparse.ArgumentParser(
        prog="python -m model_training.gates", description=__doc__.split("\n\n")[0]
    )
    p.add_argument("--artifact", type=Path, required=True, help="artifact folder to write into")
    p.add_argument(
        "--data-dir", type=Path,
        default=Path(os.environ.get("SHARED_DATA_DIR", "../shared/data")),
    )  # fmt: skip
    p.add_argument(
        "--sets", type=lambda s: [x for x in s.split(",") if x], default=list(DEFAULT_SETS)
    )
    p.add_argument("--train-cap", type=int, default=1200, help="training images embedded")
    p.add_argument(
        "--ood-output",
        default=None,
        help="serve output the OOD gate scores (default: ood_embedding if serve lists it, "
        "else embedding)",
    )
    p.add_argument("--target-frr", type=float, default=0.02, help="OOD false rejection per domain")
    p.add_argument("--keep", type=float, default=0.99, help="real images kept by the quality gate")
    p.add_argument("--crops", type=int, default=4, help="random crops per non-lesion photo")
    p.add_argument(
        "--degrade-per-set", type=int, default=400, help="training images degraded per set"
    )
    p.add_argument(
        "--sensitivity-per-set", type=int, default=30, help="images run degraded through the model"
    )
    p.add_argument("--non-lesion-dir", type=Path, action="append", default=[])
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE)
    p.add_argument("--no-cache", action="store_true")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    args = build_parser().parse_args(argv)
    report = run(args)
    print(summary(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
