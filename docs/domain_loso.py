"""How a new dermoscope's photos would be read: the domain model leave-one-source-out.

The server reads each photo's domain (dermoscopy or phone) off the network's mid-level
features with a logistic model fitted on the validation photos of all three sources
(``domain_calibration.npz``), and gives it that domain's Platt scaling and threshold. A
dermoscope the model was never fitted on could be read as a phone. Here the domain model is
fitted again (same settings) without one dermoscopy source, and that source's photos are read
with it: its validation photos (answered with the shipped scalings and thresholds, so the
cost of a misreading shows) and the training photos the gates' cache holds (never part of
any domain fit). PAD-UFES-20 is the only phone source, so it cannot be left out.

The comparison of the classifier's L2 strength (written before any candidate below was
measured; only the shipped C 0.05 had been, by the first run of this script):

* candidates: C in 0.05 (shipped), 0.01, 0.002, 0.0005, 0.0001; everything else as shipped
  (validation photos of the three sources, sqrt ``ood_embedding``, balanced classes);
* headline: the worst, over ISIC 2017 and HAM10000 left out in turn, share of the left-out
  source's photos (validation and cached training photos together) read as phone;
* a candidate is eligible when, fitted on all three sources, the cached training photos (no
  domain fit ever sees them) are read right: PAD-UFES-20 as phone no more than 1 point below
  the shipped C's share, and each dermoscopy source as dermoscopy >= 99%;
* the eligible candidate with the lowest headline replaces C 0.05 only if it lowers the
  headline by at least 5 points; otherwise C 0.05 stays.

    .venv/bin/python docs/domain_loso.py --artifact models/default \
        --data-dir ../shared/data > docs/domain_loso.txt

A second comparison (``--compare photos``; written after the first's outcome and before
this one was measured): whether fitting the domain model on more photos helps.

* candidates: the validation photos (shipped), and the validation photos plus the cached
  training photos of half the lesion groups (half A: the CRC-32 of the group name even);
  C 0.05 both;
* headline: the worst left-out dermoscopy source's share read as phone, over its validation
  photos and its half-B cached training photos (which no fit sees);
* eligible when, fitted on all three sources, the half-B photos are read right no more than
  1 point below the shipped fit's: PAD-UFES-20 as phone, each dermoscopy source as
  dermoscopy;
* the larger fit replaces the shipped one only if it lowers the headline by >= 5 points.

    .venv/bin/python docs/domain_loso.py --compare photos > docs/domain_loso_photos.txt

A measurement, not a comparison (``--compare phone-look``; no decision rides on it): can the
gates' phone-look copies of dermoscopy photos (``gates.augment.phone_look``) stand in for a
phone source? With PAD-UFES-20 left out, the domain model is fitted on the dermoscopy
validation photos against those copies, and PAD-UFES-20's real photos are read: the share
read as phone is what a phone camera unlike any fitted one would meet, the riskier error
the leave-one-source-out above cannot show.

    .venv/bin/python docs/domain_loso.py --compare phone-look > docs/domain_loso_phone_look.txt

A third comparison (``--compare cut``; written after the phone-look measurement and before
any cut below 0.5 was measured): whether to read "phone" when in doubt. A photo gets the
phone scaling and threshold when its phone probability is at least the domain cut.

* candidates: cut 0.5 (shipped), 0.3, 0.2, 0.1, 0.05, 0.02; the shipped domain model,
  scalings and thresholds otherwise;
* headline: the share of PAD-UFES-20's photos (validation and cached training photos) read
  as phone, at that cut, by the phone-look fit above (PAD-UFES-20 left out; the dermoscopy
  validation photos against the phone-look copies, C 0.05): a phone camera no fit has seen;
* eligible when (a) with the shipped fit, each dermoscopy source's cached training photos
  (which no domain fit sees) are read as dermoscopy no more than 1 point below cut 0.5's
  share, and (b) with each leave-one-dermoscopy-source-out fit of the first comparison
  (C 0.05), the left-out source's validation photos, answered with the shipped scalings and
  thresholds, lose at most 0.03 of specificity against cut 0.5 read by the same fit;
* the eligible cut with the highest headline (the higher cut on a tie) replaces 0.5 only if
  it raises the headline by at least 10 points; otherwise 0.5 stays.

Reported beside it, no decision riding on them: PAD-UFES-20's validation answers read by the
phone-look fit, and the left-out dermoscopy sources' share read as phone and sensitivity.

    .venv/bin/python docs/domain_loso.py --compare cut > docs/domain_loso_cut.txt

Needs the serve outputs that ``fit-gates`` caches (``~/.cache/skin-lesion-triage/gates``);
seconds once they are there.
"""

from __future__ import annotations

import argparse
import dataclasses
import zlib
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pandas as pd

from model_training.calibration import expected_calibration_error
from model_training.data import read_datasets
from model_training.domain_calibration import FILE, DomainCalibration, fit_domain_calibration
from model_training.export import read_metadata
from model_training.gates.features import DEFAULT_CACHE
from model_training.metrics import roc_auc
from model_training.runner import saved_model_fingerprint


def outputs(
    cache: Path, name: str, frame: pd.DataFrame
) -> tuple[pd.DataFrame, dict[str, np.ndarray]]:
    """The cached serve outputs ``name`` joined to ``frame``'s rows by path."""
    with np.load(cache / f"{name}.npz", allow_pickle=False) as z:
        got = {k: np.asarray(z[k]) for k in z.files}
    index = pd.Series(np.arange(len(got["keys"])), index=got["keys"])
    rows = frame[frame["path"].isin(index.index)].drop_duplicates("path").reset_index(drop=True)
    if rows.empty:
        raise SystemExit(f"{cache / name}.npz holds none of these photos: run fit-gates first")
    take = index[rows["path"]].to_numpy()
    return rows, {k: v[take] for k, v in got.items() if k != "keys"}


class Photos(NamedTuple):
    """The validation and cached training photos with their cached serve outputs."""

    valid: pd.DataFrame
    v_out: dict[str, np.ndarray]
    train: pd.DataFrame
    t_out: dict[str, np.ndarray]
    cache: Path


def answer_figures(y: np.ndarray, p: np.ndarray, t: np.ndarray) -> str:
    """Sensitivity, specificity, ROC-AUC and ECE of answers ``p`` at thresholds ``t``."""
    pos, neg = y == 1, y == 0
    said = p >= t
    auc = roc_auc(y, p)
    return (
        f"sens {said[pos].mean():.3f} spec {(~said[neg]).mean():.3f} "
        f"AUC {auc:.3f} ECE {expected_calibration_error(y, p):.3f}"
    )


CANDIDATE_C = (0.05, 0.01, 0.002, 0.0005, 0.0001)
SHIPPED_C = 0.05
MIN_GAIN = 0.05
MAX_PHONE_LOSS = 0.01
MIN_DERMOSCOPY_READ = 0.99
LEFT_OUT = ("isic2017", "ham10000")


def refit_reading(
    shipped: DomainCalibration,
    frame: pd.DataFrame,
    out: dict[str, np.ndarray],
    c: float,
    weight: np.ndarray | None = None,
) -> DomainCalibration:
    """The shipped calibration with its domain model fitted again on ``frame``'s photos
    (each weighted by ``weight`` when given)."""
    name = shipped.embedding_output
    refit = fit_domain_calibration(
        out["logit"], out[name], frame["label"].to_numpy(), frame["domain"].to_numpy(), c=c,
        embedding_output=name, sqrt=shipped.sqrt, assignment=shipped.assignment,
        sample_weight=weight,
    )  # fmt: skip
    # Only the domain reading changes: the shipped scalings and thresholds answer.
    return dataclasses.replace(
        shipped, mean=refit.mean, scale=refit.scale, coef=refit.coef, intercept=refit.intercept
    )


def _rows(out: dict[str, np.ndarray], mask: np.ndarray) -> dict[str, np.ndarray]:
    return {k: v[mask] for k, v in out.items()}


def _join(
    a: pd.DataFrame, a_out: dict[str, np.ndarray], b: pd.DataFrame, b_out: dict[str, np.ndarray]
) -> tuple[pd.DataFrame, dict[str, np.ndarray]]:
    frame = pd.concat([a, b], ignore_index=True)
    return frame, {k: np.concatenate([a_out[k], b_out[k]]) for k in a_out if k in b_out}


def compare_photos(
    shipped: DomainCalibration,
    valid: pd.DataFrame,
    v_out: dict[str, np.ndarray],
    train: pd.DataFrame,
    t_out: dict[str, np.ndarray],
) -> None:
    """The second comparison of the module docstring: validation photos alone, or with half
    the cached training photos, as the domain model's fitting photos."""
    name = shipped.embedding_output
    half_a = np.asarray([zlib.crc32(str(g).encode()) % 2 == 0 for g in train["group"]])
    a, a_out = train[half_a].reset_index(drop=True), _rows(t_out, half_a)
    b, b_out = train[~half_a].reset_index(drop=True), _rows(t_out, ~half_a)
    fits = {
        "validation": (valid, v_out),
        "validation + training half A": _join(valid, v_out, a, a_out),
    }
    print(
        f"half A {a['dataset'].value_counts().to_dict()}, "
        f"half B {b['dataset'].value_counts().to_dict()}"
    )
    print(
        "| fitting photos | worst left-out source read as phone | ISIC 2017 / HAM10000 left out |"
        " half B read right, all fitted: PAD-UFES-20 / ISIC 2017 / HAM10000 |"
    )
    print("| --- | --- | --- | --- |")
    results = {}
    for label, (frame, out) in fits.items():
        every = refit_reading(shipped, frame, out, SHIPPED_C)
        second = every.is_second_domain(b_out[name])
        seen = {
            s: float(np.mean(second[(b["dataset"] == s).to_numpy()] == (s == "pad-ufes-20")))
            for s in ("pad-ufes-20", *LEFT_OUT)
        }
        misread = {}
        for held in LEFT_OUT:
            keep = (frame["dataset"] != held).to_numpy()
            loso = refit_reading(shipped, frame[keep], _rows(out, keep), SHIPPED_C)
            read = np.concatenate([
                loso.is_second_domain(v_out[name][(valid["dataset"] == held).to_numpy()]),
                loso.is_second_domain(b_out[name][(b["dataset"] == held).to_numpy()]),
            ])  # fmt: skip
            misread[held] = float(read.mean())
        results[label] = (max(misread.values()), seen)
        print(
            f"| {label} | {max(misread.values()):.1%} | "
            f"{misread['isic2017']:.1%} / {misread['ham10000']:.1%} | "
            + " / ".join(f"{v:.1%}" for v in seen.values())
            + " |"
        )
    base_worst, base_seen = results["validation"]
    worst, seen = results["validation + training half A"]
    eligible = all(seen[s] >= base_seen[s] - MAX_PHONE_LOSS for s in seen)
    kept = eligible and worst <= base_worst - MIN_GAIN
    print(
        f"\nlarger fit eligible: {eligible}; kept: "
        + ("validation + training" if kept else "validation (shipped)")
    )


def phone_look_copies(
    name: str, train: pd.DataFrame, cache: Path
) -> tuple[pd.DataFrame, dict[str, np.ndarray]]:
    """The gates' cached phone-look copies of dermoscopy training photos (logit and serve
    output ``name``), labelled as phone photos, which they stand for here."""
    with np.load(cache / "copies.npz", allow_pickle=False) as z:
        look = np.asarray(["#phone_look" in str(k) for k in z["keys"]])
        paths = [str(k).split("#")[0] for k in z["keys"][look]]
        copy_out = {k: np.asarray(z[k])[look] for k in ("logit", name)}
    by_path = train.drop_duplicates("path").set_index("path")
    copies = by_path.loc[paths].reset_index()[["path", "dataset", "label", "group"]]
    copies["domain"] = "phone"
    return copies, copy_out


def phone_look(shipped: DomainCalibration, thresholds: tuple[float, float], photos: Photos) -> None:
    """The ``--compare phone-look`` measurement of the module docstring."""
    valid, v_out, train, t_out, cache = photos
    name = shipped.embedding_output
    copies, copy_out = phone_look_copies(name, train, cache)
    derm = (valid["domain"] == "dermoscopy").to_numpy()
    print(f"phone-look copies: {copies['dataset'].value_counts().to_dict()}")
    print(
        "| fitted on (dermoscopy / phone) | PAD-UFES-20 validation read as phone |"
        " PAD-UFES-20 training read as phone | dermoscopy validation read as phone |"
    )
    print("| --- | --- | --- | --- |")
    fits = {
        "validation dermoscopy / PAD-UFES-20 validation (shipped)": (valid, v_out),
        "validation dermoscopy / phone-look copies (PAD-UFES-20 left out)": _join(
            valid[derm].reset_index(drop=True), _rows(v_out, derm), copies, copy_out
        ),
    }
    pad_v = (valid["dataset"] == "pad-ufes-20").to_numpy()
    pad_t = (train["dataset"] == "pad-ufes-20").to_numpy()
    for label, (frame, out) in fits.items():
        d = refit_reading(shipped, frame, out, SHIPPED_C)
        print(
            f"| {label} | {d.is_second_domain(v_out[name][pad_v]).mean():.1%} | "
            f"{d.is_second_domain(t_out[name][pad_t]).mean():.1%} | "
            f"{d.is_second_domain(v_out[name][derm]).mean():.1%} |"
        )
    # What the risky misreading costs: PAD-UFES-20's validation photos answered as phone
    # photos (the shipped reading) and as dermoscopy (every one misread).
    y, logit = valid["label"].to_numpy()[pad_v], v_out["logit"][pad_v]
    both = shipped.per_domain(logit)
    print("\nPAD-UFES-20 validation photos answered with each domain's scaling and threshold:")
    for i, domain in enumerate(shipped.domains):
        prob, t = both[:, i], np.full(len(y), thresholds[i])
        print(f"  as {domain}: {answer_figures(y, prob, t)}")


CANDIDATE_CUTS = (0.5, 0.3, 0.2, 0.1, 0.05, 0.02)
SHIPPED_CUT = 0.5
MIN_CUT_GAIN = 0.10
MAX_READ_LOSS = 0.01
MAX_SPECIFICITY_LOSS = 0.03


def phone_look_fit(
    shipped: DomainCalibration,
    valid: pd.DataFrame,
    v_out: dict[str, np.ndarray],
    train: pd.DataFrame,
    cache: Path,
) -> DomainCalibration:
    """The domain model fitted without PAD-UFES-20: the dermoscopy validation photos against
    the gates' phone-look copies of dermoscopy training photos, standing in for phones."""
    copies, copy_out = phone_look_copies(shipped.embedding_output, train, cache)
    derm = (valid["domain"] == "dermoscopy").to_numpy()
    frame, out = _join(valid[derm].reset_index(drop=True), _rows(v_out, derm), copies, copy_out)
    return refit_reading(shipped, frame, out, SHIPPED_C)


def compare_cut(
    shipped: DomainCalibration, thresholds: tuple[float, float], photos: Photos
) -> None:
    """The third comparison of the module docstring: a domain cut below 0.5."""
    valid, v_out, train, t_out, cache = photos
    name = shipped.embedding_output
    proxy = phone_look_fit(shipped, valid, v_out, train, cache)
    pad_v = (valid["dataset"] == "pad-ufes-20").to_numpy()
    pad_t = (train["dataset"] == "pad-ufes-20").to_numpy()
    pad_emb = np.concatenate([v_out[name][pad_v], t_out[name][pad_t]])
    loso = {}
    for held in LEFT_OUT:
        fit = (valid["dataset"] != held).to_numpy()
        loso[held] = refit_reading(shipped, valid[fit], _rows(v_out, fit), SHIPPED_C)
    print(
        f"PAD-UFES-20 photos read by the phone-look fit: {int(pad_v.sum())} validation, "
        f"{int(pad_t.sum())} cached training; left-out fits: C {SHIPPED_C:g}, validation photos"
    )
    print(
        "| cut | PAD-UFES-20 read as phone, phone-look fit (headline) |"
        " PAD-UFES-20 validation answers, phone-look fit |"
        " training read as dermoscopy, shipped fit: ISIC 2017 / HAM10000 |"
        " left out: read as phone | left out: validation answers |"
    )
    print("| --- | --- | --- | --- | --- | --- |")
    rows = {}
    y, logit = valid["label"].to_numpy()[pad_v], v_out["logit"][pad_v]
    for cut in CANDIDATE_CUTS:
        every = dataclasses.replace(shipped, cut=cut)
        reading = dataclasses.replace(proxy, cut=cut)
        headline = float(reading.is_second_domain(pad_emb).mean())
        prob, t = reading.answer(logit, v_out[name][pad_v], thresholds)
        assert t is not None
        pad_answers = answer_figures(y, prob, t)
        read_derm = {
            s: float(
                1 - every.is_second_domain(t_out[name][(train["dataset"] == s).to_numpy()]).mean()
            )
            for s in LEFT_OUT
        }
        misread, spec, left_answers = {}, {}, {}
        for held, fit in loso.items():
            m = (valid["dataset"] == held).to_numpy()
            emb, y_h = v_out[name][m], valid["label"].to_numpy()[m]
            d = dataclasses.replace(fit, cut=cut)
            misread[held] = float(d.is_second_domain(emb).mean())
            prob_h, t_h = d.answer(v_out["logit"][m], emb, thresholds)
            assert t_h is not None
            spec[held] = float(np.mean(prob_h[y_h == 0] < t_h[y_h == 0]))
            left_answers[held] = answer_figures(y_h, prob_h, t_h)
        rows[cut] = (headline, read_derm, spec)
        print(
            f"| {cut:g} | {headline:.1%} | {pad_answers} | "
            + " / ".join(f"{read_derm[s]:.1%}" for s in LEFT_OUT)
            + " | "
            + " / ".join(f"{misread[s]:.1%}" for s in LEFT_OUT)
            + " | "
            + " / ".join(f"{s}: {left_answers[s]}" for s in LEFT_OUT)
            + " |"
        )
    base_head, base_read, base_spec = rows[SHIPPED_CUT]
    print(
        "\n| cut | headline gain | (a) read loss, worst | (b) specificity loss, worst | eligible |"
    )
    print("| --- | --- | --- | --- | --- |")
    eligible = []
    for cut, (head, read_derm, spec) in rows.items():
        read_loss = max(base_read[s] - read_derm[s] for s in LEFT_OUT)
        spec_loss = max(base_spec[s] - spec[s] for s in LEFT_OUT)
        ok = read_loss <= MAX_READ_LOSS and spec_loss <= MAX_SPECIFICITY_LOSS
        if ok:
            eligible.append((head, cut))
        print(
            f"| {cut:g} | {head - base_head:+.1%} | {read_loss:+.1%} | {spec_loss:+.3f} | "
            f"{'yes' if ok else 'no'} |"
        )
    # Highest headline; on a tie the higher cut (max over (headline, cut) picks it).
    best_head, best_cut = max(eligible)
    kept = best_cut if best_head >= base_head + MIN_CUT_GAIN else SHIPPED_CUT
    print(f"\nkept: cut {kept:g}")


def main() -> None:
    """Fit the domain model without each dermoscopy source and read that source with it."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--artifact", type=Path, default=Path("models/default"))
    p.add_argument("--data-dir", type=Path, default=Path("../shared/data"))
    p.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE)
    p.add_argument(
        "--compare", choices=("strength", "photos", "phone-look", "cut"), default="strength"
    )
    args = p.parse_args()
    meta = read_metadata(args.artifact)
    shipped = DomainCalibration.load(args.artifact / FILE)
    cut = meta["domain_calibration"]["thresholds"]
    thresholds = (float(cut[shipped.domains[0]]), float(cut[shipped.domains[1]]))
    cache = args.cache_dir / saved_model_fingerprint(args.artifact)
    df = read_datasets(args.data_dir)
    valid, v_out = outputs(cache, "valid", df[df["split"] == "valid"])
    train, t_out = outputs(cache, "lesions", df[df["split"] == "train"])
    name = shipped.embedding_output
    if args.compare == "photos":
        compare_photos(shipped, valid, v_out, train, t_out)
        return
    if args.compare == "phone-look":
        phone_look(shipped, thresholds, Photos(valid, v_out, train, t_out, cache))
        return
    if args.compare == "cut":
        compare_cut(shipped, thresholds, Photos(valid, v_out, train, t_out, cache))
        return
    print(
        f"domain model: {name}, sqrt {shipped.sqrt}, assignment {shipped.assignment}; "
        f"thresholds {thresholds[0]:.4f} / {thresholds[1]:.4f}; photos: validation "
        f"{valid['dataset'].value_counts().to_dict()}, cached training "
        f"{train['dataset'].value_counts().to_dict()}"
    )
    summary = []
    for c in CANDIDATE_C:
        every = refit_reading(shipped, valid, v_out, c)
        second = every.is_second_domain(t_out[name])
        seen = {
            s: float(np.mean(second[(train["dataset"] == s).to_numpy()] == (s == "pad-ufes-20")))
            for s in sorted(train["dataset"].unique())
        }
        print(
            f"\n## C {c:g}\ncached training photos read right, all sources fitted: "
            + ", ".join(f"{s} {v:.1%}" for s, v in seen.items())
        )
        print(
            "| fitted without | photos read | n | read as phone: all sources fitted |"
            " left-out fit | answers, all sources fitted | answers, left-out fit |"
        )
        print("| --- | --- | --- | --- | --- | --- | --- |")
        worst = 0.0
        for held in LEFT_OUT:
            fit = (valid["dataset"] != held).to_numpy()
            loso = refit_reading(shipped, valid[fit], {k: v[fit] for k, v in v_out.items()}, c)
            misread, count = 0, 0
            for part, frame, out in (("validation", valid, v_out), ("training", train, t_out)):
                m = (frame["dataset"] == held).to_numpy()
                emb, logit = out[name][m], out["logit"][m]
                y = frame["label"].to_numpy()[m]
                row = [held, part, str(int(m.sum()))]
                row += [f"{d.is_second_domain(emb).mean():.1%}" for d in (every, loso)]
                for d in (every, loso):
                    prob, t = d.answer(logit, emb, thresholds)
                    assert t is not None
                    row.append(answer_figures(y, prob, t))
                print("| " + " | ".join(row) + " |")
                misread += int(loso.is_second_domain(emb).sum())
                count += int(m.sum())
            worst = max(worst, misread / count)
        summary.append((c, worst, seen))
        print(f"worst left-out dermoscopy source read as phone: {worst:.1%}")
    base = next(s for c, _, s in summary if c == SHIPPED_C)
    print(
        "\n| C | worst left-out source read as phone | PAD-UFES-20 training read as phone |"
        " ISIC 2017 / HAM10000 training read as dermoscopy | eligible |"
    )
    print("| --- | --- | --- | --- | --- |")
    eligible = []
    for c, worst, seen in summary:
        ok = seen["pad-ufes-20"] >= base["pad-ufes-20"] - MAX_PHONE_LOSS and all(
            seen[s] >= MIN_DERMOSCOPY_READ for s in LEFT_OUT
        )
        if ok:
            eligible.append((worst, c))
        print(
            f"| {c:g} | {worst:.1%} | {seen['pad-ufes-20']:.1%} | "
            f"{seen['isic2017']:.1%} / {seen['ham10000']:.1%} | {'yes' if ok else 'no'} |"
        )
    shipped_worst = next(w for c, w, _ in summary if c == SHIPPED_C)
    best_worst, best_c = min(eligible) if eligible else (shipped_worst, SHIPPED_C)
    kept = best_c if best_worst <= shipped_worst - MIN_GAIN else SHIPPED_C
    print(f"\nkept: C {kept:g}")


if __name__ == "__main__":
    main()
