"""The operating point: the decision threshold(s) chosen on validation, and how they hold
out of fold.

``choose_domain_threshold`` (one threshold, sensitivity averaged over the domains) and
``choose_thresholds_per_domain`` (one per inferred domain) are the selection rules;
``crossfit_operating_point`` refits calibration and threshold on grouped folds
(``crossfit_folds``) and reports the held-out figures (docs/calibration.md).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd

from model_training import calibration as cal
from model_training import metrics as mt
from model_training.calibration_stats import calibration_report
from model_training.data import domain_sets, group_bucket
from model_training.domain_calibration import ASSIGNMENTS, fit_domain_calibration


def choose_domain_threshold(
    df: pd.DataFrame, y: np.ndarray, p: np.ndarray, target_sensitivity: float
) -> tuple[float, str]:
    """Highest threshold whose *mean per-domain* validation sensitivity reaches the target.

    Pooled validation is 93% dermoscopy, but lay users send phone photos: a pooled rule would
    let the phone domain's sensitivity fall far below the target unnoticed. Requiring it in
    every domain separately would let 47 phone melanomas/carcinomas alone set the threshold
    and cost a third of the specificity. Averaging the domains' sensitivities weighs both
    equally: the rule used here.
    """
    domains = [str(d) for d in sorted(df["domain"].unique()) if y[(df["domain"] == d)].sum() > 0]
    masks = {d: (df["domain"] == d).to_numpy() for d in domains}
    threshold = float(np.min(p[y == 1]))
    for candidate in np.unique(p[y == 1])[::-1]:
        sens = [float(np.mean(p[masks[d] & (y == 1)] >= candidate)) for d in domains]
        if np.mean(sens) >= target_sensitivity:
            threshold = float(candidate)
            break
    pred = p >= threshold
    parts = []
    for name in domains:
        sens_d = float(np.mean(pred[masks[name] & (y == 1)]))
        spec_d = float(np.mean(~pred[masks[name] & (y == 0)]))
        parts.append(f"{name}: sensitivity {sens_d:.3f}, specificity {spec_d:.3f}")
    pooled = (
        f"pooled: sensitivity {np.mean(pred[y == 1]):.3f}, specificity {np.mean(~pred[y == 0]):.3f}"
    )
    rule = (
        f"label malignant when calibrated p >= {threshold:.4f}: the highest threshold whose "
        f"validation sensitivity averaged over the domains ({', '.join(domains)}) is >= "
        f"{target_sensitivity:.2f}; " + "; ".join([*parts, pooled])
    )
    return threshold, rule


def choose_thresholds_per_domain(
    y: np.ndarray,
    p: np.ndarray,
    second: np.ndarray,
    domains: tuple[str, str],
    target_sensitivity: float,
) -> dict[str, float]:
    """One threshold per *inferred* domain: in each, the highest whose sensitivity is >= the
    target. ``second``: whether each image was read as ``domains[1]`` (domain probability
    >= 0.5, as the server reads it). A domain with no malignant image keeps the other's."""
    out: dict[str, float] = {}
    for name, mask in ((domains[0], ~second), (domains[1], second)):
        pos = np.sort(p[mask & (y == 1)])[::-1]
        if pos.size:
            k = max(0, int(np.ceil(target_sensitivity * pos.size)) - 1)
            out[name] = float(pos[k])
    if not out:
        raise ValueError("no malignant image to set a threshold on")
    for name in domains:
        out.setdefault(name, min(out.values()))
    return out


def crossfit_folds(groups: Sequence[str], folds: int) -> np.ndarray:
    """Fold of each row, by md5 of its group: a lesion's or patient's images stay together."""
    return np.asarray([group_bucket(str(g), folds) for g in groups], dtype=int)


def crossfit_operating_point(
    df: pd.DataFrame,
    y: np.ndarray,
    logits: np.ndarray,
    bias: float,
    target_sensitivity: float,
    folds: int = 5,
    embeddings: np.ndarray | None = None,
    thresholds: str = "shared",
    n_boot: int = 0,
    assignment: str = "mixture",
) -> dict[str, Any]:
    """Out-of-fold figures for the calibration and threshold that validation chose.

    The calibration and the threshold are fitted on the same validation images they are then
    reported on, which flatters them. Here each fold is scored with a calibration and a
    threshold fitted, by the same rules, on the other folds only (folds grouped by lesion or
    patient); the pooled held-out answers give sensitivity, specificity and ECE that did not
    see their own images. With ``embeddings`` (the serve output the domain classifier reads)
    the calibration is the per-domain one (domain classifier and per-domain scalings refitted
    per fold; the held-out fold's domain is inferred, never looked up) and the
    single-temperature ECE is reported beside it. ``thresholds``: "shared" (one, by the
    averaged-over-domains rule) or "per-domain" (:func:`choose_thresholds_per_domain`, applied
    by inferred domain; needs ``embeddings``). ``in_fold`` records what each fold's rule saw on
    its own fitting images, to compare with what held out. ``n_boot`` > 0 adds
    :func:`calibration_stats.calibration_report` per set (intervals, noise floor).
    ``assignment``: how the per-domain scalings are combined ("mixture" or "hard";
    :class:`DomainCalibration`). Each set's ``roc_auc`` is that of the held-out answers,
    ``roc_auc_logits`` that of the network's logits.
    """
    if thresholds not in ("shared", "per-domain"):
        raise ValueError(f"thresholds must be 'shared' or 'per-domain', not {thresholds!r}")
    if thresholds == "per-domain" and embeddings is None:
        raise ValueError("per-domain thresholds need the domain classifier's embeddings")
    if assignment not in ASSIGNMENTS:
        raise ValueError(f"assignment must be one of {ASSIGNMENTS}, not {assignment!r}")
    fold = crossfit_folds(df["group"].tolist(), folds)
    domain = df["domain"].astype(str).to_numpy()
    p_out = np.zeros(len(y))
    p_single = np.zeros(len(y))
    pred = np.zeros(len(y), dtype=bool)
    domain_hits = np.zeros(len(y), dtype=bool)
    chosen: list[Any] = []
    in_fold: list[dict[str, Any]] = []
    for k in range(folds):
        held, fit = fold == k, fold != k
        if not held.any():
            continue
        t_k = cal.fit_temperature(logits[fit] + bias, y[fit])
        p_single[held] = cal.calibrate(logits[held], bias, t_k)
        p_fit = cal.calibrate(logits[fit], bias, t_k)
        p_out[held] = p_single[held]
        read_fit: np.ndarray | None = None
        if embeddings is not None:
            dc = fit_domain_calibration(
                logits[fit], embeddings[fit], y[fit], domain[fit], assignment=assignment
            )
            p_fit = dc.calibrate(logits[fit], embeddings[fit])
            p_out[held] = dc.calibrate(logits[held], embeddings[held])
            read_fit = dc.is_second_domain(embeddings[fit])
            second = dc.is_second_domain(embeddings[held])
            domain_hits[held] = second == (domain[held] == dc.domains[1])
        if thresholds == "per-domain":
            assert read_fit is not None
            per = choose_thresholds_per_domain(
                y[fit], p_fit, read_fit, dc.domains, target_sensitivity
            )
            pred_fit = p_fit >= np.where(read_fit, per[dc.domains[1]], per[dc.domains[0]])
            pred[held] = p_out[held] >= np.where(second, per[dc.domains[1]], per[dc.domains[0]])
            chosen.append(per)
        else:
            thr_k, _ = choose_domain_threshold(
                df[fit].reset_index(drop=True), y[fit], p_fit, target_sensitivity
            )
            pred_fit = p_fit >= thr_k
            pred[held] = p_out[held] >= thr_k
            chosen.append(thr_k)
        seen: dict[str, Any] = {}
        for name in sorted(set(domain[fit].tolist())):
            m = (domain[fit] == name) & (y[fit] == 1)
            seen[f"sensitivity:{name}"] = float(pred_fit[m].mean()) if m.any() else None
            if read_fit is not None:
                truly = domain[fit] == name
                seen[f"domain_accuracy:{name}"] = float(
                    np.mean(read_fit[truly] == (name == dc.domains[1]))
                )
        in_fold.append(seen)
    out: dict[str, Any] = {"folds": folds, "grouped_by": "lesion or patient"}
    out["calibration"] = "single temperature"
    if embeddings is not None:
        out["calibration"] = "per domain" + (
            ", hard domain assignment" if assignment == "hard" else ""
        )
        out["assignment"] = assignment
    out["threshold_kind"] = thresholds
    out["thresholds"] = chosen
    out["in_fold"] = in_fold
    out["sets"] = {}
    groups = df["group"].astype(str).to_numpy()
    for name, mask in domain_sets(df).items():
        pos, neg = mask & (y == 1), mask & (y == 0)
        out["sets"][name] = {
            "sensitivity": float(pred[pos].mean()) if pos.any() else None,
            "specificity": float(np.mean(~pred[neg])) if neg.any() else None,
            "ece": cal.expected_calibration_error(y[mask], p_out[mask]),
            "ece_single_temperature": cal.expected_calibration_error(y[mask], p_single[mask]),
            "brier": cal.brier_score(y[mask], p_out[mask]),
            "roc_auc": mt.binary_metrics(y[mask], p_out[mask], 0.5)["roc_auc"],
            # The network's own ranking (nothing here was fitted on validation): what one
            # calibration map serves. ``roc_auc`` pools five folds' maps, which reorders
            # answers across folds, so it is lower by the folds' disagreement.
            "roc_auc_logits": mt.roc_auc(y[mask], logits[mask]),
        }
        if embeddings is not None:
            out["sets"][name]["domain_accuracy"] = float(domain_hits[mask].mean())
        if n_boot > 0:
            out["sets"][name]["calibration_report"] = calibration_report(
                y[mask], p_out[mask], groups[mask].tolist(), n_boot=n_boot
            )
    names = [n for n in out["sets"] if n.startswith("domain:")]
    sens = [out["sets"][n]["sensitivity"] for n in names]
    if sens and all(s is not None for s in sens):
        out["mean_domain_sensitivity"] = float(np.mean(sens))
    return out
