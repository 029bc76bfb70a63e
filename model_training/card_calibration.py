"""Model-card sections on calibration and the operating point: calibration per set and
domain, the out-of-fold figures with their intervals and noise floors, the candidates compared
by the calibration rule, and the threshold(s) with their rule."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from model_training.card_format import DOMAIN_ORDER, NOT_MEASURED, cell, fmt, ordered, table


def _calibration_values(entry: Mapping[str, Any]) -> dict[str, Any]:
    def pick(stage: str, name: str) -> Any:
        nested = entry.get(stage)
        if isinstance(nested, Mapping) and name in nested:
            return nested[name]
        return entry.get(f"{name}_{stage}")

    return {
        "ece_before": pick("before", "ece"),
        "ece_single": pick("single_temperature", "ece"),
        "ece_after": pick("after", "ece"),
        "brier_before": pick("before", "brier"),
        "brier_after": pick("after", "brier"),
    }


def section_calibration(metadata: Mapping[str, Any], metrics: Mapping[str, Any]) -> list[str]:
    lines = ["## Calibration", ""]
    calib = metrics.get("calibration")
    temperature = metadata.get("temperature")
    if isinstance(calib, Mapping):
        temperature = calib.get("temperature", temperature)
    bias = metadata.get("logit_bias", 0.0)
    per_domain = calib.get("per_domain") if isinstance(calib, Mapping) else None
    if isinstance(per_domain, Mapping):
        params = "; ".join(
            f"{name}: b = {fmt(v.get('logit_bias'), 3)}, T = {fmt(v.get('temperature'), 3)}"
            for name, v in per_domain.get("per_domain", {}).items()
        )
        lines.append(
            "Calibrated per photo domain without being told the domain: "
            f"{per_domain.get('method')}. Fitted: {params}. The single temperature over all "
            f"domains (T = {fmt(temperature, 4)} after the prior correction b = "
            f"{fmt(bias, 4)}) is kept in metadata for older servers; its ECE is shown as "
            '"ECE single T". "Before" is the raw sigmoid(logit).'
        )
    else:
        lines.append(
            f"Temperature scaling after a prior correction: calibrated p = "
            f"sigmoid((logit + b) / T), b = {fmt(bias, 4)} (undoes the class-balanced training "
            f"loss; from the training data's class shares), T = "
            f"{fmt(temperature, 4) if temperature is not None else NOT_MEASURED} (fitted on "
            f'validation by negative log-likelihood). "Before" below is the raw sigmoid(logit).'
        )
    lines.append("")
    if not isinstance(calib, Mapping):
        return [*lines, f"ECE and Brier score: {NOT_MEASURED}.", ""]
    entries: dict[str, Mapping[str, Any]] = {}
    if any(k in calib for k in ("before", "after", "ece_before", "ece_after")):
        entries["pooled"] = calib
    for key, value in calib.items():
        if isinstance(value, Mapping) and key not in ("before", "after", "per_domain"):
            entries[key] = value
    if not entries:
        return [*lines, f"ECE and Brier score: {NOT_MEASURED}.", ""]
    n_bins = calib.get("n_bins", 15)
    lines.append(f"Expected calibration error ({fmt(n_bins)} equal-width bins) and Brier score:")
    lines.append("")
    rows = []
    for name in ordered(list(entries), DOMAIN_ORDER, last=("pooled",)):
        v = _calibration_values(entries[name])
        rows.append([cell(name), *(fmt(v[k]) for k in v)])
    lines += table(
        ["Set", "ECE before", "ECE single T", "ECE after", "Brier before", "Brier after"],
        rows,
    )
    return lines


def _crossfit_lines(crossfit: Any) -> list[str]:
    """The out-of-fold check of the threshold and the temperature, when evaluate measured it."""
    if not isinstance(crossfit, Mapping) or not crossfit.get("sets"):
        return []
    lines = [
        f"Out of fold ({fmt(crossfit.get('folds'))} folds grouped by "
        f"{crossfit.get('grouped_by', 'group')}; each fold answered with a calibration "
        f"({crossfit.get('calibration', 'single temperature')}) and "
        + (
            "thresholds per inferred domain"
            if crossfit.get("threshold_kind") == "per-domain"
            else "a threshold"
        )
        + " fitted by the same rules on the other folds), so these figures did not see their "
        "own images:",
        "",
    ]
    sets = crossfit["sets"]
    rows = [
        [cell(name), fmt(v.get("sensitivity")), fmt(v.get("specificity")), fmt(v.get("ece")),
         fmt(v.get("ece_single_temperature")), fmt(v.get("domain_accuracy"))]
        for name in ordered(list(sets), DOMAIN_ORDER, last=("pooled",))
        for v in [sets[name]]
    ]  # fmt: skip
    head = ["Set", "sensitivity", "specificity", "ECE", "ECE single T", "domain inferred right"]
    lines += table(head, rows)
    return lines + _calibration_interval_lines(sets)


def _interval(entry: Any, digits: int = 3) -> str:
    if not isinstance(entry, Mapping):
        return "n/a"
    return (
        f"{fmt(entry.get('estimate'), digits)} "
        f"({fmt(entry.get('lower'), digits)}-{fmt(entry.get('upper'), digits)})"
    )


def _calibration_interval_lines(sets: Mapping[str, Any]) -> list[str]:
    """Out-of-fold calibration per set with 95% intervals and the noise floor, if measured."""
    reports = {
        name: v["calibration_report"]
        for name, v in sets.items()
        if isinstance(v, Mapping) and isinstance(v.get("calibration_report"), Mapping)
    }
    if not reports:
        return []
    lines = [
        "Out-of-fold calibration with 95% bootstrap intervals (whole lesions or patients "
        "resampled). ECE: 15 equal-width bins; adaptive ECE: 5 equal-mass bins; intercept and "
        "slope of sigmoid(a + b logit p) (perfect: 0 and 1). The noise floor is the mean "
        "(95th percentile) ECE of these same probabilities against labels drawn from "
        "themselves, i.e. what perfect calibration scores at this n: an ECE below it cannot "
        "be told from perfect calibration. Binned ECEs are biased upwards, more so on "
        "resamples, so their intervals can sit above the estimate.",
        "",
    ]
    rows = []
    for name in ordered(list(reports), DOMAIN_ORDER, last=("pooled",)):
        r = reports[name]
        floor = r.get("noise_floor", {})
        rows.append([
            cell(name), fmt(r.get("n")), _interval(r.get("ece")),
            f"{fmt(floor.get('ece_mean'))} ({fmt(floor.get('ece_upper'))})",
            _interval(r.get("ece_adaptive")),
            f"{fmt(floor.get('ece_adaptive_mean'))} ({fmt(floor.get('ece_adaptive_upper'))})",
            _interval(r.get("brier"), 4), _interval(r.get("intercept"), 2),
            _interval(r.get("slope"), 2),
        ])  # fmt: skip
    head = ["Set", "n", "ECE", "noise floor", "adaptive ECE", "noise floor", "Brier",
            "intercept", "slope"]  # fmt: skip
    return lines + table(head, rows)


def _candidate_lines(candidates: Any) -> list[str]:
    """Every calibration/threshold combination out of fold (docs/calibration.md's rule)."""
    if not isinstance(candidates, Mapping) or not candidates:
        return []
    lines = [
        "Every candidate out of fold (the rule that chose among them, fixed before they were "
        "compared, is in docs/calibration.md); sensitivity / specificity / ECE, and each data "
        "set's ROC-AUC of the held-out answers:",
        "",
    ]
    rows = []
    for name, c in candidates.items():
        sets = c.get("sets", {}) if isinstance(c, Mapping) else {}
        cells = [
            f"{fmt(v.get('sensitivity'))} / {fmt(v.get('specificity'))} / {fmt(v.get('ece'))}"
            for key in ("domain:dermoscopy", "domain:phone", "pooled")
            for v in [sets.get(key, {})]
        ]
        aucs = ", ".join(
            f"{key} {fmt(v['roc_auc'])}"
            for key, v in sets.items()
            if not key.startswith("domain:") and key != "pooled" and isinstance(v, Mapping)
            and v.get("roc_auc") is not None
        )  # fmt: skip
        rows.append([cell(name), fmt(c.get("mean_domain_sensitivity")), *cells, aucs or "n/a"])
    head = ["Calibration, threshold", "mean of domains' sensitivity", "dermoscopy", "phone",
            "pooled", "ROC-AUC per data set"]  # fmt: skip
    return lines + table(head, rows)


def section_threshold(metadata: Mapping[str, Any], metrics: Mapping[str, Any]) -> list[str]:
    lines = ["## Decision threshold and risk tiers", ""]
    thr = metrics.get("threshold", metadata.get("threshold"))
    rule = metrics.get("threshold_rule", metadata.get("threshold_rule"))
    if isinstance(thr, Mapping):
        rule = thr.get("rule", rule)
        thr = thr.get("value")
    lines.append(f"- **Threshold**: {fmt(thr, 4) if thr is not None else NOT_MEASURED}")
    per_domain = metrics.get("domain_thresholds")
    if isinstance(per_domain, Mapping):
        lines.append(
            "- **Thresholds per inferred photo domain**: "
            + ", ".join(f"{k} {fmt(v, 4)}" for k, v in per_domain.items())
            + " (the risk tiers' lowest boundary moves with them; the threshold above is the "
            "first domain's)"
        )
    lines.append(f"- **Rule**: {cell(str(rule)) if rule else NOT_MEASURED}")
    lines.append("")
    lines += _crossfit_lines(metrics.get("crossfit"))
    lines += _candidate_lines(metrics.get("crossfit_candidates"))
    tiers = metrics.get("risk_tiers") or metadata.get("risk_tiers")
    if not tiers:
        return [*lines, f"Risk tiers: {NOT_MEASURED}.", ""]
    rows = []
    rules = []
    for tier in tiers:
        val = tier.get("validation") or {}
        rows.append(
            [
                cell(str(tier.get("name", "?"))),
                f"[{fmt(tier.get('lower'), 4)}, {fmt(tier.get('upper'), 4)}"
                + ("]" if tier.get("name") == "high" else ")"),
                fmt(val.get("n")),
                fmt(val.get("malignant_fraction")),
                cell(str(tier.get("advice", NOT_MEASURED))),
            ]
        )
        if tier.get("rule") and tier["rule"] not in rules:
            rules.append(tier["rule"])
    lines += table(
        ["Tier", "calibrated p", "validation n", "malignant fraction", "advice shown"],
        rows,
    )
    lines += [f"Tier rule: {cell(r)}" for r in rules]
    return [*lines, ""] if rules else lines
