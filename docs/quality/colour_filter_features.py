"""Can the network's own features tell a one-hue (sepia) photo? Compared, not shipped.

The pixel check of ``colour_filter.md`` could not refuse sepia photos saved as JPEG without
refusing real photos of a small mole on even skin. The skin gate already reads the network's
mid-level features (``skin_embedding``: per-channel means and spreads of an early block,
colour statistics among them) with linear heads; could one more head refuse one-hue photos?

One-hue copies of a seeded sample of training photos per source (the sepia matrix with 0-5%
of the photo's colour blended back, or a random luma-keeping tint; saved as JPEG at a seeded
quality 70-95) are run through the network; a logistic regression (square-rooted,
standardised features, balanced classes, L2 ``C``) tells them from the real photos of the
gates' cached training sample (with ``--with-copies`` also from the gates' varied and
phone-look copies). Its threshold keeps 99.9% of the real photos out of fold (5 folds by
lesion group). The variants are compared leave-one-source-out (head and threshold fitted
without a source, that source's real photos and sepia copies scored); the rule for choosing
and shipping is in ``colour_filter.md``. The chosen one is then read on the validation
photos and their one-hue copies (sepia, cold, warm, random; never fitted).

    .venv/bin/python docs/quality/colour_filter_features.py --data-dir ../shared/data \
        > docs/quality/colour_filter_features.txt
    .venv/bin/python docs/quality/colour_filter_features.py --data-dir ../shared/data \
        --with-copies > docs/quality/colour_filter_features_copies.txt

About 10 minutes on 2 cores the first time (2,700 copies through the network, cached with
the gates' features), then a minute.
"""

from __future__ import annotations

import argparse
import zlib
from pathlib import Path

import numpy as np
import pandas as pd

# The sibling survey script (run from this folder): its sepia matrix and JPEG round trip.
from photo_changes import SEPIA, _jpeg
from PIL import Image
from sklearn.linear_model import LogisticRegression

from model_training.data import read_datasets
from model_training.gates.features import DEFAULT_CACHE, FeatureStore, ServeRunner, stable_seed
from model_training.model import LUMA
from model_training.preprocessing import load_image_file
from model_training.runner import saved_model_fingerprint

OUTPUT = "skin_embedding"
KEEP = 0.999


def filtered(img: Image.Image, kind: str, key: str) -> Image.Image:
    """A seeded one-hue copy of ``img``: "sepia" (as fitted) or another tint, as JPEG."""
    rng = np.random.default_rng(stable_seed(7, key, kind))
    quality = int(rng.integers(70, 96))
    if kind == "sepia":
        return _jpeg(quality)(
            Image.blend(img.convert("RGB", SEPIA), img, float(rng.uniform(0, 0.05)))
        )
    tint = {"cold": (0.7, 1.0, 1.1), "warm": (1.15, 0.95, 0.6)}.get(kind)
    gains = np.asarray(tint if tint else rng.uniform(0.6, 1.2, 3), dtype=np.float32)
    gains /= gains @ np.asarray(LUMA, dtype=np.float32)
    grey = np.asarray(img.convert("L"), dtype=np.float32)[..., None] * gains
    return _jpeg(quality)(Image.fromarray(np.clip(np.rint(grey), 0, 255).astype(np.uint8)))


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


VARIANTS: list[tuple[float, tuple[str, ...]]] = [
    (c, kinds) for kinds in (("sepia",), ("sepia", "random")) for c in (0.02, 0.005, 0.001)
]
# Third comparison (``--with-copies``): the gates' varied and phone-look copies as real.
VARIANTS_WITH_COPIES: list[tuple[float, tuple[str, ...]]] = [
    (c, ("sepia", "random")) for c in (0.02, 0.001)
]
MAX_LOSO_REFUSED = 0.01


def oof_threshold(
    x: np.ndarray, y: np.ndarray, fold: np.ndarray, c: float, real: np.ndarray
) -> float:
    """The score that keeps KEEP of the ``real`` photos (not copies), out of fold."""
    oof = np.zeros(len(y))
    for f in np.unique(fold):
        oof[fold == f] = score(fit(x[fold != f], y[fold != f], c), x[fold == f])
    return float(np.quantile(oof[real], KEEP))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--artifact", type=Path, default=Path("models/default"))
    p.add_argument("--data-dir", type=Path, default=Path("../shared/data"))
    p.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE)
    p.add_argument("--per-set", type=int, default=250)
    p.add_argument("--valid-per-set", type=int, default=100)
    p.add_argument(
        "--with-copies", action="store_true",
        help="add the gates' cached varied and phone-look copies to the real class",
    )  # fmt: skip
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

    def copies(kind: str, frame: pd.DataFrame, tag: str) -> np.ndarray:
        def make(i: int) -> Image.Image:
            path = str(frame.at[i, "path"])
            return filtered(load_image_file(path), kind, path)

        return features(store.get(tag, [f"{p}#{kind}" for p in frame["path"]], make)[OUTPUT])

    copy_x = {k: copies(k, picked, f"{k}-copies") for k in ("sepia", "random")}
    groups = [*train["group"], *picked["group"], *picked["group"]]
    sets = np.asarray([*train["dataset"], *picked["dataset"], *picked["dataset"]])
    kind = np.asarray(["real"] * len(train) + ["sepia"] * len(picked) + ["random"] * len(picked))
    x = np.concatenate([real_x, copy_x["sepia"], copy_x["random"]])
    variants = VARIANTS
    if args.with_copies:
        with np.load(cache / "copies.npz", allow_pickle=False) as z:
            keys = [str(k).split("#")[0] for k in z["keys"]]
            varied_x = features(z[OUTPUT])
        by_path = train.set_index("path")
        keep = np.asarray([k in by_path.index for k in keys])
        rows = by_path.loc[[k for k, m in zip(keys, keep, strict=True) if m]]
        groups += list(rows["group"])
        sets = np.r_[sets, rows["dataset"].to_numpy()]
        kind = np.r_[kind, np.full(int(keep.sum()), "copy")]
        x = np.concatenate([x, varied_x[keep]])
        variants = VARIANTS_WITH_COPIES
        print(f"with {int(keep.sum())} varied and phone-look copies as real photos")
    y = np.isin(kind, ("sepia", "random")).astype(float)
    fold = np.asarray([zlib.crc32(str(g).encode()) % 5 for g in groups])
    print(
        f"real training photos {train['dataset'].value_counts().to_dict()}; sepia and random "
        f"one-hue copies of {picked['dataset'].value_counts().to_dict()}; threshold keeps "
        f"{KEEP:.1%} of real photos out of fold"
    )
    print(
        "\n| C | fitted on | leave-one-source-out real refused (HAM10000 / ISIC 2017 / "
        "PAD-UFES-20) | LOSO sepia copies refused (worst source) | eligible |"
    )
    print("| --- | --- | --- | --- | --- |")
    rows = []
    base = ("real", "copy")
    for c, kinds in variants:
        use = np.isin(kind, (*base, *kinds))
        real_refused, sepia_refused = {}, []
        for held in sorted(np.unique(sets)):
            fit_rows = use & (sets != held)
            t = oof_threshold(x[fit_rows], y[fit_rows], fold[fit_rows], c, kind[fit_rows] == "real")
            head = fit(x[fit_rows], y[fit_rows], c)
            real_refused[held] = float(
                np.mean(score(head, x[(sets == held) & (kind == "real")]) > t)
            )
            sepia_refused.append(
                float(np.mean(score(head, x[(sets == held) & (kind == "sepia")]) > t))
            )
        worst = max(real_refused.values())
        rows.append((worst, -min(sepia_refused), -c, c, kinds))
        print(
            f"| {c:g} | {' + '.join(kinds)} | "
            + " / ".join(f"{real_refused[s]:.2%}" for s in sorted(real_refused))
            + f" | {min(sepia_refused):.1%} | {'yes' if worst <= MAX_LOSO_REFUSED else 'no'} |"
        )
    eligible = [r for r in rows if r[0] <= MAX_LOSO_REFUSED]
    if not eligible:
        print("\nno variant is eligible: no head")
        return
    best = min(eligible)
    tied = [r for r in eligible if r[0] <= best[0] + 0.001]
    _, _, _, c, kinds = min(tied, key=lambda r: (r[1], r[2]))
    print(f"\nchosen: C {c:g}, fitted on real photos and {' + '.join(kinds)} copies")

    use = np.isin(kind, (*base, *kinds))
    head = fit(x[use], y[use], c)
    cut = oof_threshold(x[use], y[use], fold[use], c, kind[use] == "real")
    valid = df[df["split"] == "valid"].sort_values("path").reset_index(drop=True)
    with np.load(cache / "valid.npz", allow_pickle=False) as z:
        vi = {str(k): i for i, k in enumerate(z["keys"])}
        valid_x = features(z[OUTPUT])[[vi[p] for p in valid["path"]]]
    vpick = pd.concat(
        part.sample(min(args.valid_per_set, len(part)), random_state=1)
        for _, part in valid.groupby("dataset")
    ).reset_index(drop=True)
    refused = score(head, valid_x) > cut
    print(f"validation ({len(valid)} real photos, copies of {len(vpick)}), threshold {cut:.3f}:")
    print("  real refused: " + ", ".join(
        f"{s} {np.mean(refused[(valid['dataset'] == s).to_numpy()]):.2%}"
        for s in sorted(valid["dataset"].unique())))  # fmt: skip
    for k in ("sepia", "cold", "warm", "random"):
        got = score(head, copies(k, vpick, f"{k}-valid-copies")) > cut
        by = {
            d: f"{np.mean(got[(vpick['dataset'] == d).to_numpy()]):.0%}"
            for d in sorted(set(vpick["dataset"]))
        }
        print(f"  {k} copies (JPEG 70-95) refused: {np.mean(got):.1%} {by}")


if __name__ == "__main__":
    main()
