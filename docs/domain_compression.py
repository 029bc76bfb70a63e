"""Heavily compressed phone photos read as dermoscopy: the domain model fitted with JPEG copies.

``docs/quality/photo_changes.py`` found that the shipped domain model reads only 50% of
PAD-UFES-20's validation photos saved at JPEG quality 15 as phone photos (90% at quality 30,
all at 50 and 75); read as dermoscopy they get its scaling and threshold, and sensitivity falls
0.851 → 0.723. The domain model (a logistic model on the mid-level ``ood_embedding``) seems to
lean on fine texture that strong compression, like a phone's own noise reduction, wipes out.
Whether fitting it on JPEG copies too makes it read phone photos by what survives:

The comparison (written before any candidate below was measured):

* candidates: the shipped fit (the validation photos of the three sources, sqrt
  ``ood_embedding``, balanced classes, C 0.05), and the same fit on those photos plus their
  JPEG quality 15 and quality 30 copies, each copy labelled with its photo's domain; the
  shipped scalings and thresholds either way;
* headline: the worst, over quality 15 and 30, share of the JPEG copies of PAD-UFES-20's
  cached training photos (which no fit sees) read as phone;
* eligible when (a) every source's cached training photos, as they are, are read right no
  more than 1 point below the shipped fit's share; (b) every dermoscopy source's JPEG copies
  of its cached training photos, at each quality, are read as dermoscopy no more than 1 point
  below the shipped fit's share; (c) fitted without one dermoscopy source (its validation
  photos and their copies), the worst left-out source's share read as phone (its validation
  and cached training photos as they are) is no more than 5 points above the shipped fit's;
* the JPEG-fitted model replaces the shipped one only if it raises the headline by at least
  10 points.

    .venv/bin/python docs/domain_compression.py > docs/domain_compression.txt

Outcome: the copies raised the headline from 52.1% to 97.7% but failed all three bounds (they
taught the model to read more of ISIC 2017 as phone). A second comparison (``--weights``;
written after that outcome and before any weight below 1 was measured): the copies given a
smaller weight in the fit.

* candidates: copy weight 1 (measured above), 0.5, 0.25, 0.1 (each copy's sample weight in
  the logistic fit; the photos keep weight 1 and the classes stay balanced);
* the same headline, bounds (a)-(c) against the shipped fit, and 10-point gain;
* the eligible weight with the highest headline (the smaller weight on a tie) replaces the
  shipped fit if it clears the gain; otherwise the shipped fit stays.

    .venv/bin/python docs/domain_compression.py --weights > docs/domain_compression_weights.txt

The copies' serve outputs are cached beside the gates' (``~/.cache/skin-lesion-triage/
gates``, tags ``jpeg-valid`` and ``jpeg-lesions``): about 15 minutes on two cores the first
time, then seconds.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pandas as pd
from domain_loso import LEFT_OUT, SHIPPED_C, outputs, refit_reading
from PIL import Image
from quality.photo_changes import _jpeg

from model_training.data import read_datasets
from model_training.domain_calibration import FILE, DomainCalibration
from model_training.gates.features import DEFAULT_CACHE, FeatureStore, ServeRunner
from model_training.preprocessing import load_image_file
from model_training.runner import saved_model_fingerprint

QUALITIES = (15, 30)
MAX_READ_LOSS = 0.01
MAX_LOSO_RISE = 0.05
MIN_GAIN = 0.10
WEIGHTS = (1.0, 0.5, 0.25, 0.1)
SOURCES = ("ham10000", "isic2017", "pad-ufes-20")


def jpeg_outputs(
    store: FeatureStore, tag: str, frame: pd.DataFrame, quality: int
) -> dict[str, np.ndarray]:
    """Serve outputs of ``frame``'s photos saved as JPEG at ``quality`` (cached by path)."""
    paths = [str(p) for p in frame["path"]]
    change = _jpeg(quality)

    def make(i: int) -> Image.Image:
        return change(load_image_file(paths[i]))

    keys = [f"{p}#jpeg{quality}" for p in paths]
    return store.get(tag, keys, make, desc=f"{tag} q{quality}")


def read_right(d: DomainCalibration, emb: np.ndarray, frame: pd.DataFrame) -> dict[str, float]:
    """Per source, the share of ``frame``'s photos whose domain ``d`` reads right."""
    second = d.is_second_domain(emb)
    truth = (frame["domain"] == d.domains[1]).to_numpy()
    return {
        s: float(np.mean(second[m] == truth[m]))
        for s in SOURCES
        if (m := (frame["dataset"] == s).to_numpy()).any()
    }


def main() -> None:
    """Fit the domain model with and without JPEG copies and judge both by the rule above."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--artifact", type=Path, default=Path("models/default"))
    p.add_argument("--data-dir", type=Path, default=Path("../shared/data"))
    p.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE)
    p.add_argument("--weights", action="store_true", help="the second comparison: copy weights")
    args = p.parse_args()
    shipped = DomainCalibration.load(args.artifact / FILE)
    name = shipped.embedding_output
    fingerprint = saved_model_fingerprint(args.artifact)
    cache = args.cache_dir / fingerprint
    store = FeatureStore(args.cache_dir, fingerprint, lambda: ServeRunner(args.artifact, 16))
    df = read_datasets(args.data_dir)
    valid, v_out = outputs(cache, "valid", df[df["split"] == "valid"])
    train, t_out = outputs(cache, "lesions", df[df["split"] == "train"])
    v_jpeg = {q: jpeg_outputs(store, "jpeg-valid", valid, q) for q in QUALITIES}
    t_jpeg = {q: jpeg_outputs(store, "jpeg-lesions", train, q) for q in QUALITIES}

    def fit(use: np.ndarray, weight: float) -> DomainCalibration:
        """The domain model on the validation photos ``use`` and, at ``weight`` > 0, their
        JPEG copies with that sample weight."""
        frames = [valid[use]]
        outs = [{k: v_out[k][use] for k in ("logit", name)}]
        weights = [np.ones(int(use.sum()))]
        for q in QUALITIES if weight > 0 else ():
            frames.append(valid[use])
            outs.append({k: v_jpeg[q][k][use] for k in ("logit", name)})
            weights.append(np.full(int(use.sum()), weight))
        frame = pd.concat(frames, ignore_index=True)
        out = {k: np.concatenate([o[k] for o in outs]) for k in ("logit", name)}
        return refit_reading(shipped, frame, out, SHIPPED_C, np.concatenate(weights))

    print(
        f"validation photos {valid['dataset'].value_counts().to_dict()}, cached training "
        f"photos {train['dataset'].value_counts().to_dict()}; JPEG qualities {QUALITIES}"
    )
    print(
        "| copy weight | PAD-UFES-20 training copies read as phone, q15 / q30 (headline: worst)"
        " | training photos read right: HAM10000 / ISIC 2017 / PAD-UFES-20 |"
        " dermoscopy training copies read right, q15 / q30: HAM10000 / ISIC 2017 |"
        " left out, read as phone: ISIC 2017 / HAM10000 (worst) | eligible |"
    )
    print("| --- | --- | --- | --- | --- | --- |")
    every = np.ones(len(valid), dtype=bool)
    base: tuple[float, dict[str, float], dict[int, dict[str, float]], float] | None = None
    eligible = []
    for weight in (0.0, *(WEIGHTS if args.weights else (1.0,))):
        d = fit(every, weight)
        as_is = read_right(d, t_out[name], train)
        jpeg = {q: read_right(d, t_jpeg[q][name], train) for q in QUALITIES}
        head = min(jpeg[q]["pad-ufes-20"] for q in QUALITIES)
        misread = {}
        for held in LEFT_OUT:
            loso = fit((valid["dataset"] != held).to_numpy(), weight)
            emb = np.concatenate([
                v_out[name][(valid["dataset"] == held).to_numpy()],
                t_out[name][(train["dataset"] == held).to_numpy()],
            ])  # fmt: skip
            misread[held] = float(loso.is_second_domain(emb).mean())
        worst = max(misread.values())
        base = base or (head, as_is, jpeg, worst)
        _, b_as_is, b_jpeg, b_worst = base
        checks = (
            all(as_is[s] >= b_as_is[s] - MAX_READ_LOSS for s in SOURCES),
            all(jpeg[q][s] >= b_jpeg[q][s] - MAX_READ_LOSS for q in QUALITIES for s in LEFT_OUT),
            worst <= b_worst + MAX_LOSO_RISE,
        )
        if weight > 0 and all(checks):
            eligible.append((head, -weight))
        print(
            f"| {'0 (shipped)' if weight == 0 else f'{weight:g}'} | "
            + " / ".join(f"{jpeg[q]['pad-ufes-20']:.1%}" for q in QUALITIES)
            + f" ({head:.1%}) | "
            + " / ".join(f"{as_is[s]:.1%}" for s in SOURCES)
            + " | "
            + " / ".join(f"{jpeg[q]['ham10000']:.1%} {jpeg[q]['isic2017']:.1%}" for q in QUALITIES)
            + " | "
            + " / ".join(f"{misread[s]:.1%}" for s in LEFT_OUT)
            + f" ({worst:.1%}) | "
            + ("-" if weight == 0 else " ".join("pass" if c else "fail" for c in checks))
            + " |"
        )
    assert base is not None
    # Highest headline; on a tie the smaller weight (max over (headline, -weight) picks it).
    best = max(eligible, default=None)
    kept = best is not None and best[0] >= base[0] + MIN_GAIN
    print(
        "\nbounds (a) training photos as they are, (b) dermoscopy copies, (c) left-out source;"
        f" kept: {f'copy weight {-best[1]:g}' if kept and best else 'shipped fit'}"
    )


if __name__ == "__main__":
    main()
