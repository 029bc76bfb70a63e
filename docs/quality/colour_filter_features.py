"""Can the network's own features tell a sepia photo? A feasibility measurement (nothing ships).

The pixel check of ``colour_filter.md`` could not refuse sepia photos saved as JPEG without
refusing real photos of a small mole on even skin. The skin gate already reads the network's
mid-level features (``skin_embedding``: per-channel means and spreads of an early block,
colour statistics among them) with linear heads; could one more head refuse one-hue photos?

Sepia copies (the sepia matrix with 0-5% of the photo's colour blended back, saved as JPEG
at a seeded quality 70-95, as ``colour_filter.md``) of a seeded sample of training photos
per source are run through the network; a logistic regression (square-rooted, standardised
features, balanced classes, L2 ``C``) tells them from the real photos of the gates' cached
training sample. Its threshold keeps 99.9% of the real photos out of fold (5 folds by lesion
group). Reported: out of fold; on validation photos and their sepia copies (never fitted);
on the validation photos' copies through other one-hue tints (cold, warm, random; never
fitted: does the head learn "one hue" or only "sepia"?); and leave-one-source-out (the head
and its threshold fitted without one source, that source's real and sepia photos scored).

    .venv/bin/python docs/quality/colour_filter_features.py --data-dir ../shared/data \
        > docs/quality/colour_filter_features.txt

About 10 minutes on 2 cores (1,650 copies through the network, cached with the gates'
features).
"""

from __future__ import annotations

import argparse
import io
import zlib
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image
from sklearn.linear_model import LogisticRegression

from model_training.data import read_datasets
from model_training.gates.features import DEFAULT_CACHE, FeatureStore, ServeRunner, stable_seed
from model_training.preprocessing import load_image_file
from model_training.runner import saved_model_fingerprint

SEPIA = (0.393, 0.769, 0.189, 0.0, 0.349, 0.686, 0.168, 0.0, 0.272, 0.534, 0.131, 0.0)
OUTPUT = "skin_embedding"
KEEP = 0.999


def _jpeg(img: Image.Image, quality: int) -> Image.Image:
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=quality)
    return Image.open(io.BytesIO(buf.getvalue())).convert("RGB")


def filtered(img: Image.Image, kind: str, key: str) -> Image.Image:
    """A seeded one-hue copy of ``img``: "sepia" (as fitted) or another tint, as JPEG."""
    rng = np.random.default_rng(stable_seed(7, key, kind))
    quality = int(rng.integers(70, 96))
    if kind == "sepia":
        return _jpeg(
            Image.blend(img.convert("RGB", SEPIA), img, float(rng.uniform(0, 0.05))), quality
        )
    tint = {"cold": (0.7, 1.0, 1.1), "warm": (1.15, 0.95, 0.6)}.get(kind)
    gains = np.asarray(tint if tint else rng.uniform(0.6, 1.2, 3), dtype=np.float32)
    gains /= gains @ np.asarray([0.299, 0.587, 0.114], dtype=np.float32)
    grey = np.asarray(img.convert("L"), dtype=np.float32)[..., None] * gains
    return _jpeg(Image.fromarray(np.clip(np.rint(grey), 0, 255).astype(np.uint8)), quality)


def features(x: np.ndarray) -> np.ndarray:
    return np.sqrt(np.maximum(np.asarray(x, dtype=np.float64), 0.0))


def fit(
    x: np.ndarray, y: np.ndarray, c: float
) -> tuple[np.ndarray, np.ndarray, LogisticRegression]:
    mean, std = x.mean(axis=0), x.std(axis=0) + 1e-6
    model = LogisticRegression(C=c, class_weight="balanced", max_iter=3000)
    model.fit((x - mean) / std, y)
    return mean, std, model


def score(head: tuple[np.ndarray, np.ndarray, LogisticRegression], x: np.ndarray) -> np.ndarray:
    mean, std, model = head
    return np.asarray(model.decision_function((x - mean) / std))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--artifact", type=Path, default=Path("models/default"))
    p.add_argument("--data-dir", type=Path, default=Path("../shared/data"))
    p.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE)
    p.add_argument("--per-set", type=int, default=250)
    p.add_argument("--valid-per-set", type=int, default=100)
    p.add_argument("--c", type=float, default=0.02)
    args = p.parse_args()
    fingerprint = saved_model_fingerprint(args.artifact)
    store = FeatureStore(args.cache_dir, fingerprint, lambda: ServeRunner(args.artifact, 16))
    cache = args.cache_dir / fingerprint
    df = read_datasets(args.data_dir)
    with np.load(cache / "lesions.npz", allow_pickle=False) as z:
        cached = {str(k): i for i, k in enumerate(z["keys"])}
        lesion_x = features(z[OUTPUT])
    train = df[df["path"].isin(cached)].drop_duplicates("path").reset_index(drop=True)
    real_x = lesion_x[[cached[p] for p in train["path"]]]
    picked = pd.concat(
        part.sample(min(args.per_set, len(part)), random_state=0)
        for _, part in train.groupby("dataset")
    ).reset_index(drop=True)
    sepia = store.get(
        "sepia-copies", [f"{p}#sepia" for p in picked["path"]],
        lambda i: filtered(load_image_file(picked.at[i, "path"]), "sepia", picked.at[i, "path"]),
    )  # fmt: skip
    sepia_x = features(sepia[OUTPUT])
    x = np.concatenate([real_x, sepia_x])
    y = np.r_[np.zeros(len(real_x)), np.ones(len(sepia_x))]
    frame = pd.concat(
        [train[["dataset", "group"]], picked[["dataset", "group"]]], ignore_index=True
    )
    fold = np.asarray([zlib.crc32(str(g).encode()) % 5 for g in frame["group"]])
    oof = np.zeros(len(y))
    for f in range(5):
        head = fit(x[fold != f], y[fold != f], args.c)
        oof[fold == f] = score(head, x[fold == f])
    cut = float(np.quantile(oof[y == 0], KEEP))
    print(
        f"fitted on {len(real_x)} real training photos and {len(sepia_x)} sepia copies "
        f"({picked['dataset'].value_counts().to_dict()}); C {args.c}; threshold keeps "
        f"{KEEP:.1%} of real photos out of fold"
    )
    print(
        f"out of fold: real refused {np.mean(oof[y == 0] > cut):.2%}, "
        f"sepia copies refused {np.mean(oof[y == 1] > cut):.1%}"
    )

    head = fit(x, y, args.c)
    cut_all = float(np.quantile(score(head, x[y == 0]), KEEP))
    # The out-of-fold threshold is the honest one; the in-sample one is stricter than needed.
    cut_all = max(cut_all, cut)
    valid = df[df["split"] == "valid"].sort_values("path").reset_index(drop=True)
    with np.load(cache / "valid.npz", allow_pickle=False) as z:
        vi = {str(k): i for i, k in enumerate(z["keys"])}
        valid_x = features(z[OUTPUT])[[vi[p] for p in valid["path"]]]
    vpick = pd.concat(
        part.sample(min(args.valid_per_set, len(part)), random_state=1)
        for _, part in valid.groupby("dataset")
    ).reset_index(drop=True)
    print(
        f"\nvalidation ({len(valid)} real photos; copies of {len(vpick)}), threshold {cut_all:.3f}:"
    )
    print("  real refused: " + ", ".join(
        f"{s} {np.mean(score(head, valid_x[(valid['dataset'] == s).to_numpy()]) > cut_all):.2%}"
        for s in sorted(valid["dataset"].unique())))  # fmt: skip
    for kind in ("sepia", "cold", "warm", "random"):

        def make(i: int, k: str = kind) -> Image.Image:
            path = str(vpick.at[i, "path"])
            return filtered(load_image_file(path), k, path)

        out = store.get(f"{kind}-valid-copies", [f"{p}#{kind}" for p in vpick["path"]], make)
        s_ = score(head, features(out[OUTPUT])) > cut_all
        by = {
            d: f"{np.mean(s_[(vpick['dataset'] == d).to_numpy()]):.0%}"
            for d in sorted(vpick["dataset"].unique())
        }
        print(f"  {kind} copies refused: {np.mean(s_):.1%} {by}")

    print("\nleave-one-source-out (head and threshold fitted without the source):")
    for held in sorted(frame["dataset"].unique()):
        keep = (frame["dataset"] != held).to_numpy()
        h = fit(x[keep], y[keep], args.c)
        inner = np.zeros(int(keep.sum()))
        xk, yk, fk = x[keep], y[keep], fold[keep]
        for f in range(5):
            inner[fk == f] = score(fit(xk[fk != f], yk[fk != f], args.c), xk[fk == f])
        t = float(np.quantile(inner[yk == 0], KEEP))
        s_ = score(h, x[~keep]) > t
        yh = y[~keep]
        print(
            f"  {held}: real refused {np.mean(s_[yh == 0]):.2%} of {int((yh == 0).sum())}, "
            f"sepia copies refused {np.mean(s_[yh == 1]):.1%} of {int((yh == 1).sum())}"
        )


if __name__ == "__main__":
    main()
