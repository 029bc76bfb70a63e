"""Score an exported artifact on the validation splits, calibrate it and write its report.

Everything here runs the *exported SavedModel* through the shared preprocessing path, so the
figures describe exactly what the server serves. Temperature, threshold and risk tiers are
chosen on validation (never on a test split) and written back into ``metadata.json``; the
threshold rules and their out-of-fold check are ``model_training.operating_point``.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from model_training import calibration as cal
from model_training import isic_score, plots, report
from model_training import metrics as mt
from model_training.data import domain_sets, read_datasets
from model_training.domain_calibration import (
    ASSIGNMENTS,
    DomainCalibration,
    fit_domain_calibration,
)
from model_training.domain_calibration import DEFAULT_OUTPUT as DOMAIN_OUTPUT
from model_training.domain_calibration import FILE as DOMAIN_FILE
from model_training.export import read_metadata, write_metadata
from model_training.operating_point import (
    choose_domain_threshold,
    choose_thresholds_per_domain,
    crossfit_operating_point,
)
from model_training.preprocessing import TTA_VIEWS as PREPROCESSING_TTA_VIEWS

PREDICTIONS_FILE = "validation_predictions.csv"
SINGLE_METHOD = (
    "sigmoid((logit + logit_bias) / T): logit_bias undoes the class-balanced training "
    "(from training data); T fitted by NLL on validation"
)
CACHE_DIR = (
    Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    / "skin-lesion-triage"
    / "evaluate"
)
TTA_VIEWS = ("identity", *PREPROCESSING_TTA_VIEWS)


def predict_artifact(
    artifact: Path,
    paths: Sequence[str],
    batch_size: int = 16,
    views: Sequence[str] = ("identity",),
    output: str = DOMAIN_OUTPUT,
) -> tuple[np.ndarray, np.ndarray, float]:
    """Logits (averaged over ``views``), the serve output ``output`` of the first view (what
    the domain classifier reads, and what the cache stores under that name), model seconds
    per image."""
    from model_training.runner import Embedder, lazy_files

    embed = Embedder(artifact, batch_size, output=output)
    logits, embeddings = embed(lazy_files(paths), len(paths), f"score x{len(views)}", views)
    return logits, embeddings, embed.infer_seconds / max(1, len(paths))


def scores_cache(artifact: Path, image_ids: Sequence[str]) -> Path:
    """Where this SavedModel's logits and embeddings of these images are kept (outside the
    repository: 14 MB of embeddings), keyed by the graph, its weights and the image list.
    The file holds ``logits`` and ``<serve output>`` arrays (``ood_embedding``, which the
    domain classifier reads); one without the output needed is scored again."""
    from model_training.runner import saved_model_fingerprint

    ids = hashlib.sha256("\n".join(image_ids).encode()).hexdigest()[:12]
    return CACHE_DIR / f"{saved_model_fingerprint(artifact)}-{ids}.npz"


def choose_tiers(
    y: np.ndarray, p: np.ndarray, threshold: float, high_specificity: float = 0.90
) -> list[dict[str, Any]]:
    """Low below the decision threshold; high from the 90%-specificity point; moderate between.

    "Low" is exactly what the decision rule calls benign, so the tier never contradicts the
    label. "High" starts where validation specificity reaches ``high_specificity``: there
    most cases are malignant. Advice texts are the lay wordings in :mod:`calibration`.
    """
    advice = {"low": cal.LOW_ADVICE, "moderate": cal.MODERATE_ADVICE, "high": cal.HIGH_ADVICE}
    negatives = np.sort(p[y == 0])
    k = min(len(negatives) - 1, int(np.ceil(high_specificity * len(negatives))) - 1)
    high = float(np.nextafter(negatives[max(k, 0)], 1.0))
    high = min(max(high, threshold), 1.0)
    rule = (
        f"low: p < {threshold:.4f} (the decision threshold); high: p >= {high:.4f}, where "
        f"pooled validation specificity reaches {high_specificity:.2f}; moderate: between"
    )
    tiers = []
    for name, lower, upper in (("low", 0.0, threshold), ("moderate", threshold, high),
                               ("high", high, 1.0)):  # fmt: skip
        band = (p >= lower) & ((p < upper) if name != "high" else (p <= upper))
        tiers.append({
            "name": name, "lower": lower, "upper": upper, "advice": advice[name], "rule": rule,
            "validation": {"n": int(band.sum()), "n_positive": int(y[band].sum()),
                           "malignant_fraction": float(y[band].mean()) if band.any() else None},
        })  # fmt: skip
    return tiers


def _recount_tiers(
    tiers: list[dict[str, Any]], y: np.ndarray, p: np.ndarray, image_thresholds: np.ndarray
) -> None:
    """Validation counts per tier when the lowest tier ends at each image's own threshold."""
    for i, tier in enumerate(tiers):
        lower = image_thresholds if i == 1 else tier["lower"]
        upper = image_thresholds if i == 0 else tier["upper"]
        band = (p >= lower) & ((p < upper) if i < len(tiers) - 1 else (p <= upper))
        tier["validation"] = {
            "n": int(band.sum()), "n_positive": int(y[band].sum()),
            "malignant_fraction": float(y[band].mean()) if band.any() else None,
        }  # fmt: skip


def _subgroup_columns(part: pd.DataFrame) -> dict[str, list[str]]:
    groups: dict[str, list[str]] = {}
    # Per diagnosis: the sensitivity of each malignant kind and the specificity of each benign
    # kind (which benign lesions get flagged); per confirmation method where recorded.
    for column in ("diagnosis", "dx_type"):
        if column in part and part[column].notna().any():
            groups[column] = part[column].fillna("unknown").astype(str).tolist()
    if "sex" in part and part["sex"].notna().any():
        groups["sex"] = part["sex"].fillna("unknown").astype(str).tolist()
    if "age" in part and part["age"].notna().any():
        groups["age_band"] = [mt.age_band(a) for a in part["age"]]
    if "site" in part and part["site"].notna().any():
        groups["site"] = part["site"].fillna("unknown").astype(str).tolist()
    if "fitzpatrick" in part and part["fitzpatrick"].notna().any():
        groups["fitzpatrick"] = [
            "unknown" if pd.isna(v) else str(int(v)) for v in part["fitzpatrick"]
        ]
    return groups


RANKING_KEYS = ("roc_auc", "average_precision", "sensitivity_at_specificity",
                "specificity_at_sensitivity")  # fmt: skip


def decision_scores(p: np.ndarray, image_thresholds: np.ndarray, threshold: float) -> np.ndarray:
    """Scores that cross ``threshold`` exactly where each ``p`` crosses its own image's
    threshold (per inferred domain): the logit of p shifted by the difference of the two
    thresholds' logits, so the order within a domain is kept. Images whose threshold is
    ``threshold`` keep p itself; used only for the threshold metrics (sensitivity...)."""
    prob = np.clip(np.asarray(p, dtype=np.float64), 1e-12, 1 - 1e-12)
    t_img = np.asarray(image_thresholds, dtype=np.float64)
    logit = np.log(prob / (1 - prob)) - np.log(t_img / (1 - t_img))
    moved = cal.sigmoid(logit + math.log(threshold / (1 - threshold)))
    above = prob >= t_img
    moved = np.where(
        above, np.maximum(moved, threshold), np.minimum(moved, np.nextafter(threshold, 0))
    )
    return np.where(t_img == threshold, p, moved)


def summarise(
    df: pd.DataFrame,
    logits: np.ndarray,
    p: np.ndarray,
    threshold: float,
    decision: np.ndarray | None = None,
) -> dict[str, Any]:
    """Per-domain metrics with bootstrap CIs, calibration and subgroups at a threshold.

    Calibration "before" is the raw sigmoid(logit); "after" is the calibrated ``p``.
    ``decision`` (:func:`decision_scores`, when thresholds differ per domain): the
    threshold metrics and subgroups are read from it, ranking metrics from ``p``.
    """
    y = df["label"].to_numpy().astype(int)
    p_raw = cal.sigmoid(logits)
    d = p if decision is None else decision
    domains: dict[str, Any] = {}
    calib: dict[str, Any] = {}
    subgroups: dict[str, Any] = {}
    for name, mask in domain_sets(df).items():
        entry = mt.binary_metrics(y[mask], d[mask], threshold)
        entry["ci"] = mt.bootstrap_ci(y[mask], d[mask], threshold, n_boot=1000, seed=0)
        if decision is not None:
            entry["threshold"] = None  # one per inferred domain (decision_scores)
            ranked = mt.binary_metrics(y[mask], p[mask], threshold)
            entry.update({k: ranked[k] for k in RANKING_KEYS})
            entry["ci"]["roc_auc"] = mt.bootstrap_ci(
                y[mask], p[mask], threshold, n_boot=1000, seed=0
            )["roc_auc"]
        domains[name] = entry
        calib[name] = {
            "before": {
                "ece": cal.expected_calibration_error(y[mask], p_raw[mask]),
                "brier": cal.brier_score(y[mask], p_raw[mask]),
            },
            "after": {
                "ece": cal.expected_calibration_error(y[mask], p[mask]),
                "brier": cal.brier_score(y[mask], p[mask]),
            },
        }
        if not name.startswith("domain:") and name != "pooled":
            part = df[mask]
            groups = _subgroup_columns(part)
            if groups:
                subgroups[name] = mt.subgroup_metrics(y[mask], d[mask], threshold, groups)
    return {"domains": domains, "calibration": calib, "subgroups": subgroups}


def evaluate_artifact(
    artifact: Path,
    data_dir: Path,
    sets: Sequence[str],
    target_sensitivity: float = 0.90,
    tta: bool = False,
    update_metadata: bool = True,
    reuse_predictions: bool = False,
    calibration: str = "single",
    thresholds: str = "shared",
    assignment: str = "mixture",
    report_dir: Path | None = None,
) -> dict[str, Any]:
    """Validate, calibrate, choose threshold and tiers, write metrics.json, plots, model card.

    ``calibration``: "single" (one temperature after the prior correction) or "per-domain"
    (``model_training.domain_calibration``). Both are measured out of fold either way
    (``crossfit`` for the one chosen, ``crossfit_alternative`` for the other), so the choice
    is documented by figures that did not see their own images.
    ``thresholds``: "shared" (one threshold, sensitivity averaged over the domains >= the
    target) or "per-domain" (with per-domain calibration only: one threshold per inferred
    domain, each domain's sensitivity >= the target; :func:`choose_thresholds_per_domain`).
    ``assignment`` (with per-domain calibration): "mixture" (the scalings weighted by the
    domain probability) or "hard" (each photo gets its inferred domain's scaling).
    ``crossfit_candidates`` holds S, P, PT and H out of fold (docs/calibration.md), with
    calibration intervals and noise floors (``calibration_stats``).

    ``update_metadata`` False leaves the artifact untouched (metadata.json, the calibration
    file, metrics.json, predictions, plots and the model card); the report then goes to
    ``report_dir``, which is required. ``report_dir`` given with updates on: the report goes
    there and the calibration into the artifact.

    ``reuse_predictions`` re-reads the logits this artifact's SavedModel produced in an earlier
    run (``validation_predictions.csv``) instead of scoring again, e.g. after changing a
    selection rule; an earlier TTA measurement is kept.
    """
    df = read_datasets(data_dir, sets)
    df = df[df["split"] == "valid"].reset_index(drop=True)
    y = df["label"].to_numpy().astype(int)
    previous: dict[str, Any] = {}
    if (artifact / "metrics.json").exists():
        previous = json.loads((artifact / "metrics.json").read_text())
    if thresholds not in ("shared", "per-domain"):
        raise ValueError(f"thresholds must be 'shared' or 'per-domain', not {thresholds!r}")
    if thresholds == "per-domain" and calibration != "per-domain":
        raise ValueError("per-domain thresholds need --calibration per-domain")
    if assignment not in ASSIGNMENTS:
        raise ValueError(f"assignment must be one of {ASSIGNMENTS}, not {assignment!r}")
    if assignment == "hard" and calibration != "per-domain":
        raise ValueError("a hard domain assignment needs --calibration per-domain")
    if not update_metadata and report_dir is None:
        raise ValueError("without updating the artifact, say where the report goes (report_dir)")
    out_dir = artifact if report_dir is None else report_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    cache = scores_cache(artifact, df["image_id"].tolist())
    cached: dict[str, np.ndarray] = {}
    if reuse_predictions and cache.exists():
        with np.load(cache, allow_pickle=False) as data:
            cached = {k: data[k] for k in data.files}
    if "logits" in cached and DOMAIN_OUTPUT in cached:
        logits, embeddings = cached["logits"], cached[DOMAIN_OUTPUT]
        sec_per_image = float(previous.get("inference_seconds_per_image", float("nan")))
    else:
        logits, embeddings, sec_per_image = predict_artifact(artifact, df["path"].tolist())
        cache.parent.mkdir(parents=True, exist_ok=True)
        arrays: dict[str, Any] = {**cached, "logits": logits, DOMAIN_OUTPUT: embeddings}
        np.savez(cache, **arrays)

    meta = read_metadata(artifact)
    bias = float(meta.get("logit_bias", 0.0))
    # The single temperature stays in metadata for servers that predate domain calibration.
    temperature = cal.fit_temperature(logits + bias, y)
    p_single = cal.calibrate(logits, bias, temperature)
    domain_cal = fit_domain_calibration(
        logits, embeddings, y, df["domain"].to_numpy(), assignment=assignment
    )
    per_domain = calibration == "per-domain"
    p = domain_cal.calibrate(logits, embeddings) if per_domain else p_single
    threshold, rule = choose_domain_threshold(df, y, p, target_sensitivity)
    domain_thresholds: dict[str, float] | None = None
    read_second = domain_cal.is_second_domain(embeddings)
    if thresholds == "per-domain":
        domain_thresholds = choose_thresholds_per_domain(
            y, p, read_second, domain_cal.domains, target_sensitivity
        )
        threshold = domain_thresholds[domain_cal.domains[0]]
        rule = _per_domain_rule(df, y, p, read_second, domain_cal, domain_thresholds,
                                target_sensitivity)  # fmt: skip
    tiers = choose_tiers(y, p, threshold)
    decision = None
    if domain_thresholds is not None:
        first, second = domain_cal.domains
        image_thresholds = domain_cal.image_thresholds(
            embeddings, (domain_thresholds[first], domain_thresholds[second])
        )
        decision = decision_scores(p, image_thresholds, threshold)
        _recount_tiers(tiers, y, p, image_thresholds)
    result = summarise(df, logits, p, threshold, decision)
    for name, mask in domain_sets(df).items():
        result["calibration"][name]["single_temperature"] = {
            "ece": cal.expected_calibration_error(y[mask], p_single[mask]),
            "brier": cal.brier_score(y[mask], p_single[mask]),
        }
    result["calibration"]["temperature"] = temperature
    result["calibration"]["logit_bias"] = bias
    if per_domain:
        result["calibration"]["per_domain"] = domain_cal.describe()
        result["calibration"]["method"] = domain_cal.describe()["method"]
        result["calibration"]["fitted_on"] = "validation splits, each domain's own images"
    else:
        result["calibration"]["method"] = SINGLE_METHOD
        result["calibration"]["fitted_on"] = "pooled validation splits"
    result.update(threshold=threshold, threshold_rule=rule, risk_tiers=tiers)
    if domain_thresholds is not None:
        result["domain_thresholds"] = domain_thresholds
    result["inference_seconds_per_image"] = sec_per_image
    # Every candidate out of fold (docs/calibration.md: the rule that chose among them).
    candidates = dict(CANDIDATES)
    chosen_name = _candidate_name(calibration, thresholds, assignment)
    candidates.setdefault(chosen_name, (per_domain, thresholds, assignment))
    measured: dict[str, dict[str, Any]] = {}
    for name, (emb, kind, how) in candidates.items():
        measured[name] = crossfit_operating_point(
            df, y, logits, bias, target_sensitivity, embeddings=embeddings if emb else None,
            thresholds=kind, n_boot=1000, assignment=how,
        )  # fmt: skip
    result["crossfit"] = measured[chosen_name]
    result["crossfit_candidates"] = measured
    alternative = measured["per-domain" if not per_domain else "single"]
    alternative["roc_auc"] = {
        name: mt.binary_metrics(y[m], p_alt[m], threshold)["roc_auc"]
        for p_alt in [p_single if per_domain else domain_cal.calibrate(logits, embeddings)]
        for name, m in domain_sets(df).items()
    }
    result["crossfit_alternative"] = alternative

    isic = df["dataset"] == "isic2017"
    if isic.any():
        result["isic_challenge"] = {
            "isic2017": isic_score.isic_challenge_score(
                y[isic], p[isic], df.loc[isic, "image_id"].tolist()
            )
        }

    if tta:
        tta_logits, _, tta_sec = predict_artifact(artifact, df["path"].tolist(), views=TTA_VIEWS)
        tta_t = cal.fit_temperature(tta_logits + bias, y)
        tta_p = cal.calibrate(tta_logits, bias, tta_t)
        gains = {}
        for name, mask in domain_sets(df).items():
            base = mt.binary_metrics(y[mask], p[mask], threshold)["roc_auc"]
            with_tta = mt.binary_metrics(y[mask], tta_p[mask], threshold)["roc_auc"]
            gains[name] = {"roc_auc": base, "roc_auc_tta": with_tta}
        result["tta"] = {
            "views": list(TTA_VIEWS),
            "auc": gains,
            "cost_ratio": tta_sec / sec_per_image,
            "seconds_per_image": tta_sec,
        }

    elif "tta" in previous:
        result["tta"] = previous["tta"]
    if "shortcut_checks" in previous:  # written by model_training.artefacts
        result["shortcut_checks"] = previous["shortcut_checks"]

    plots_dir = out_dir / "plots"
    plots_dir.mkdir(exist_ok=True)
    masks = domain_sets(df)
    curves = {n: (y[m], p[m]) for n, m in masks.items() if not n.startswith("domain:")}
    plots.plot_roc(curves, plots_dir / "roc.png")
    plots.plot_pr(curves, plots_dir / "pr.png")
    plots.plot_confusion(
        result["domains"]["pooled"]["confusion"], plots_dir / "confusion.png",
        f"Pooled validation at threshold {threshold:.3f}" if not domain_thresholds else
        "Pooled validation at the thresholds per domain ("
        + ", ".join(f"{k} {v:.3f}" for k, v in domain_thresholds.items()) + ")",
    )  # fmt: skip
    plots.plot_reliability(y, cal.sigmoid(logits), p, plots_dir / "reliability.png")
    history = meta.get("training", {}).get("history", {})
    if history:
        plots.plot_training_curves(history, plots_dir / "training_curves.png")
    result["plots"] = {
        title: f"plots/{name}"
        for title, name in [
            ("ROC curves", "roc.png"),
            ("Precision-recall curves", "pr.png"),
            ("Confusion matrix", "confusion.png"),
            ("Reliability diagram", "reliability.png"),
            ("Training curves", "training_curves.png"),
        ]
        if (plots_dir / name).exists()
    }

    out = df[["image_id", "dataset", "domain", "label"]].copy()
    out["logit"] = logits
    out["probability_malignant"] = p
    out.to_csv(out_dir / PREDICTIONS_FILE, index=False, float_format="%.6f")
    (out_dir / "metrics.json").write_text(json.dumps(result, indent=2, default=float) + "\n")

    if update_metadata:
        if per_domain:
            domain_cal.save(artifact / DOMAIN_FILE)
            meta["domain_calibration"] = domain_cal.describe()
            if domain_thresholds is not None:
                meta["domain_calibration"]["thresholds"] = domain_thresholds
        else:
            (artifact / DOMAIN_FILE).unlink(missing_ok=True)
            meta.pop("domain_calibration", None)
        meta.update(
            calibration=result["calibration"]["method"],
            temperature=temperature,
            threshold=threshold,
            threshold_rule=rule,
            risk_tiers=[{k: t[k] for k in ("name", "lower", "upper", "advice")} for t in tiers],
        )
        meta["metrics"] = {"validation": _headline(result)}
        write_metadata(artifact, meta)
    report.write_model_card(meta, result, out_dir / "MODEL_CARD.md")
    return result


# Every candidate of docs/calibration.md, measured out of fold on each run:
# name -> (per-domain calibration?, thresholds, assignment of the per-domain scalings).
CANDIDATES: dict[str, tuple[bool, str, str]] = {
    "single": (False, "shared", "mixture"),  # S
    "per-domain": (True, "shared", "mixture"),  # P
    "per-domain, thresholds per domain": (True, "per-domain", "mixture"),  # PT
    "per-domain hard, thresholds per domain": (True, "per-domain", "hard"),  # H
}


def _candidate_name(calibration: str, thresholds: str, assignment: str) -> str:
    """The ``crossfit_candidates`` key of a calibration/threshold/assignment choice."""
    if calibration != "per-domain":
        return "single"
    name = "per-domain" + (" hard" if assignment == "hard" else "")
    return name + (", thresholds per domain" if thresholds == "per-domain" else "")


def _per_domain_rule(
    df: pd.DataFrame,
    y: np.ndarray,
    p: np.ndarray,
    read_second: np.ndarray,
    domain_cal: DomainCalibration,
    thresholds: dict[str, float],
    target_sensitivity: float,
) -> str:
    """The threshold rule's text, with the validation figures it gives."""
    domains = domain_cal.domains
    t = np.where(read_second, thresholds[domains[1]], thresholds[domains[0]])
    pred = p >= t
    parts = []
    for name in domains:
        m = (df["domain"] == name).to_numpy()
        parts.append(
            f"{name}: sensitivity {np.mean(pred[m & (y == 1)]):.3f}, "
            f"specificity {np.mean(~pred[m & (y == 0)]):.3f}"
        )
    pooled = (
        f"pooled: sensitivity {np.mean(pred[y == 1]):.3f}, specificity {np.mean(~pred[y == 0]):.3f}"
    )
    return (
        "label malignant when calibrated p >= the threshold of the photo's inferred domain ("
        + ", ".join(f"{d} {thresholds[d]:.4f}" for d in domains)
        + f"; domain read by the calibration's domain model, P >= {domain_cal.cut:g}): in each "
        "domain the "
        f"highest threshold whose validation sensitivity is >= {target_sensitivity:.2f} (so "
        f"the average over the domains is too); " + "; ".join([*parts, pooled])
    )


def _headline(result: dict[str, Any]) -> dict[str, Any]:
    """The compact metrics kept in metadata.json (the full report is metrics.json)."""
    keys = (
        "n", "n_positive", "roc_auc", "average_precision", "sensitivity", "specificity",
        "balanced_accuracy", "sensitivity_at_specificity", "specificity_at_sensitivity",
    )  # fmt: skip
    out: dict[str, Any] = {}
    for name, entry in result["domains"].items():
        out[name] = {k: entry.get(k) for k in keys}
        ci = entry.get("ci", {}).get("roc_auc")
        if ci:
            out[name]["roc_auc_ci95"] = [ci.get("lower"), ci.get("upper")]
        out[name]["ece_calibrated"] = result["calibration"][name]["after"]["ece"]
    return out
