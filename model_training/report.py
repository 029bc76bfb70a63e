"""The model card (MODEL_CARD.md) from metadata.json and metrics.json.

The plots are ``model_training.plots``; the ISIC Challenge scorer, ``model_training.isic_score``.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)

PathLike = str | Path
NOT_MEASURED = "not measured"
DOMAIN_ORDER: tuple[str, ...] = ("isic2017", "ham10000", "pad-ufes-20")
SUBGROUP_TITLES: dict[str, str] = {
    "sex": "Sex",
    "age_band": "Age band",
    "age": "Age band",
    "site": "Body site",
    "fitzpatrick": "Fitzpatrick skin type",
    "domain": "Domain",
    "dx_type": "How the diagnosis was confirmed",
    "diagnosis": "Diagnosis (sensitivity of each malignant kind, specificity of each benign kind)",
}
STANDARD_SUBGROUPS: tuple[str, ...] = ("sex", "age_band", "site", "fitzpatrick")


# --------------------------------------------------------------------------------------------
# Model card
# --------------------------------------------------------------------------------------------


def _fmt(value: Any, digits: int = 3) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int | np.integer):
        return str(int(value))
    if isinstance(value, float | np.floating):
        return "n/a" if not math.isfinite(float(value)) else f"{float(value):.{digits}f}"
    return _cell(str(value))


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return [*lines, ""]


def _is_metrics(entry: Any) -> bool:
    return isinstance(entry, Mapping) and "n" in entry and not isinstance(entry["n"], Mapping)


def _ordered(keys: Sequence[str], preferred: Sequence[str], last: Sequence[str] = ()) -> list[str]:
    head = [k for k in preferred if k in keys]
    tail = [k for k in last if k in keys and k not in head]
    middle = sorted(k for k in keys if k not in head and k not in tail)
    return head + middle + tail


def _domains(metadata: Mapping[str, Any], metrics: Mapping[str, Any]) -> dict[str, Any]:
    for source in (metrics.get("domains"), metrics.get("validation")):
        if isinstance(source, Mapping) and source:
            return dict(source)
    meta_metrics = metadata.get("metrics")
    if isinstance(meta_metrics, Mapping) and isinstance(meta_metrics.get("validation"), Mapping):
        return {k: v for k, v in meta_metrics["validation"].items() if v}
    return {}


def _split_entry(entry: Mapping[str, Any]) -> tuple[Mapping[str, Any], Mapping[str, Any]]:
    inner = entry.get("metrics")
    m: Mapping[str, Any] = inner if isinstance(inner, Mapping) else entry
    ci = entry.get("ci") or entry.get("bootstrap_ci") or m.get("ci") or {}
    return m, ci if isinstance(ci, Mapping) else {}


def _with_ci(m: Mapping[str, Any], ci: Mapping[str, Any], key: str) -> str:
    value = _fmt(m.get(key))
    interval = ci.get(key)
    if isinstance(interval, Mapping) and interval.get("lower") is not None:
        return f"{value} ({_fmt(interval.get('lower'))}-{_fmt(interval.get('upper'))})"
    return value


def _section_model(metadata: Mapping[str, Any]) -> list[str]:
    lines = ["## Model details", ""]
    fields = [
        ("Name", metadata.get("name")),
        ("Version", metadata.get("version")),
        ("Created", metadata.get("created")),
        ("Architecture", metadata.get("architecture")),
        ("Labels", ", ".join(map(str, metadata.get("labels", []))) or None),
        ("Positive label", metadata.get("positive_label")),
    ]
    inp = metadata.get("input")
    if isinstance(inp, Mapping):
        size = f"{inp.get('height', '?')}x{inp.get('width', '?')} {inp.get('color', '')}".strip()
        fields.append(("Input", f"{size}; resize: {inp.get('resize', 'n/a')}"))
    fields.append(("Temperature", metadata.get("temperature")))
    tta = metadata.get("tta")
    if isinstance(tta, Mapping):
        fields.append(("Test-time augmentation", bool(tta.get("enabled"))))
    ood = metadata.get("ood")
    fields.append(
        ("Out-of-distribution gate", ood.get("method") if isinstance(ood, Mapping) else "off")
    )
    fields.append(("Image-quality gate", "on" if metadata.get("quality") else "off"))
    for name, value in fields:
        lines.append(f"- **{name}**: {_fmt(value, 4) if value is not None else 'not recorded'}")
    return [*lines, ""]


INTENDED_USE = """## Intended use
- A **triage aid**: it estimates how concerning a photographed skin spot looks and suggests how
  soon to have it checked by a doctor. For lay users who wonder whether to see a doctor, and for
  clinicians as a second reader that prioritises who is seen first.
- It is **not a diagnosis**. It never says that a spot is or is not cancer; only a clinician's
  examination (and, where needed, a biopsy) can.

## Out-of-scope use
- Diagnosis, or any use that replaces or delays a clinician's examination.
- Use without a clinician in the loop for decisions about treatment.
- Images that are not of skin, or not of a single lesion (whole-body photos, screenshots, text).
- Children (few children in the training data; not validated for them).
- Lesions on mucosa (mouth, genitals), nails, palms and soles, scalp through hair.
- Populations, cameras and skin types far from the training data without local validation.
"""

TRAINING_DATA = """## Training data and licences
- **ISIC 2017 Challenge, Part 3** (melanoma detection): Codella et al., "Skin lesion analysis
  toward melanoma detection: a challenge at ISBI 2017", arXiv:1710.05006 (2018). Dermoscopy images
  from the ISIC Archive under per-image licences: CC-0, CC-BY or CC-BY-NC.
- **HAM10000**: Tschandl, Rosendahl & Kittler, "The HAM10000 dataset", Sci. Data 5, 180161
  (2018), doi:10.1038/sdata.2018.161. Licence CC BY-NC 4.0 (non-commercial, attribution).
- **PAD-UFES-20** (smartphone photos): Pacheco et al., "PAD-UFES-20: a skin lesion dataset
  composed of patient data and clinical images collected from smartphones", Data in Brief 32
  (2020). Licence CC BY 4.0.
- Labels: malignant = melanoma (ISIC 2017); mel, bcc, akiec (HAM10000); MEL, BCC, SCC
  (PAD-UFES-20). Actinic keratosis (ACK) is labelled benign in PAD-UFES-20 but is pre-malignant.

**Licence of the weights: NON-COMMERCIAL.** The model was trained on CC BY-NC data (HAM10000 and
part of the ISIC Archive), so the trained weights inherit a non-commercial condition: use them
for research and non-commercial purposes only, with attribution to the datasets above. The code
is licensed separately.
"""


def _section_data_used(metadata: Mapping[str, Any]) -> list[str]:
    training = metadata.get("training")
    data = training.get("data") if isinstance(training, Mapping) else None
    if not data:
        return ["Data used for this model: " + NOT_MEASURED + ".", ""]
    lines = ["Data used for this model:", ""]
    for item in data if isinstance(data, list) else [data]:
        text = json.dumps(item, sort_keys=True) if isinstance(item, Mapping) else str(item)
        lines.append(f"- {text}")
    return [*lines, ""]


def _section_weights(metadata: Mapping[str, Any]) -> list[str]:
    lines = ["## ImageNet initialisation (weights provenance)", ""]
    source = metadata.get("weights_source")
    if not source:
        return [*lines, f"Provenance of the ImageNet weights: {NOT_MEASURED}.", ""]
    if isinstance(source, Mapping):
        for key, value in source.items():
            text = json.dumps(value, sort_keys=True) if isinstance(value, Mapping | list) else value
            lines.append(f"- **{key}**: {text}")
    else:
        lines.append(str(source))
    return [*lines, ""]


def _section_performance(domains: Mapping[str, Any]) -> list[str]:
    lines = ["## Validation performance", ""]
    if not domains:
        return [*lines, f"Validation metrics: {NOT_MEASURED}.", ""]
    lines += [
        "Per validation domain (95% stratified bootstrap CIs in brackets where measured). A case "
        "is called malignant when its calibrated probability is >= the threshold.",
        "",
    ]
    order = _ordered(list(domains), DOMAIN_ORDER, last=("pooled",))
    main_rows, op_rows = [], []
    for name in order:
        entry = domains[name]
        if not isinstance(entry, Mapping):
            continue
        m, ci = _split_entry(entry)
        prevalence = m.get("prevalence")
        pos = f"{_fmt(m.get('n_positive'))} ({_fmt(prevalence, 2)})" if prevalence else "n/a"
        main_rows.append(
            [
                _cell(name),
                _fmt(m.get("n")),
                pos,
                _with_ci(m, ci, "roc_auc"),
                _fmt(m.get("average_precision")),
                _with_ci(m, ci, "sensitivity"),
                _with_ci(m, ci, "specificity"),
                _with_ci(m, ci, "balanced_accuracy"),
            ]
        )
        sas = m.get("sensitivity_at_specificity") or {}
        spas = m.get("specificity_at_sensitivity") or {}
        cm = m.get("confusion") or {}
        cm_text = "/".join(_fmt(cm.get(k)) for k in ("tn", "fp", "fn", "tp")) if cm else "n/a"
        op_rows.append(
            [
                _cell(name),
                _fmt(m.get("threshold"), 4),
                _fmt(m.get("ppv")),
                _fmt(m.get("npv")),
                _fmt(m.get("accuracy")),
                *(_fmt(sas.get(k)) for k in ("0.80", "0.90", "0.95")),
                *(_fmt(spas.get(k)) for k in ("0.90", "0.95")),
                cm_text,
            ]
        )
    lines += _table(
        [
            "Domain",
            "n",
            "malignant (prevalence)",
            "ROC-AUC",
            "PR-AUC",
            "Sensitivity",
            "Specificity",
            "Balanced accuracy",
        ],
        main_rows,
    )
    lines += [
        "Operating points (sensitivity at a fixed specificity and vice versa are read "
        "conservatively off the ROC curve: the best value among thresholds that really reach "
        "the target). Accuracy alone is misleading at this prevalence.",
        "",
    ]
    lines += _table(
        [
            "Domain",
            "threshold",
            "PPV",
            "NPV",
            "accuracy",
            "sens @ spec 0.80",
            "sens @ spec 0.90",
            "sens @ spec 0.95",
            "spec @ sens 0.90",
            "spec @ sens 0.95",
            "TN/FP/FN/TP",
        ],
        op_rows,
    )
    return lines


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


def _section_calibration(metadata: Mapping[str, Any], metrics: Mapping[str, Any]) -> list[str]:
    lines = ["## Calibration", ""]
    calib = metrics.get("calibration")
    temperature = metadata.get("temperature")
    if isinstance(calib, Mapping):
        temperature = calib.get("temperature", temperature)
    bias = metadata.get("logit_bias", 0.0)
    per_domain = calib.get("per_domain") if isinstance(calib, Mapping) else None
    if isinstance(per_domain, Mapping):
        params = "; ".join(
            f"{name}: b = {_fmt(v.get('logit_bias'), 3)}, T = {_fmt(v.get('temperature'), 3)}"
            for name, v in per_domain.get("per_domain", {}).items()
        )
        lines.append(
            "Calibrated per photo domain without being told the domain: "
            f"{per_domain.get('method')}. Fitted: {params}. The single temperature over all "
            f"domains (T = {_fmt(temperature, 4)} after the prior correction b = "
            f"{_fmt(bias, 4)}) is kept in metadata for older servers; its ECE is shown as "
            '"ECE single T". "Before" is the raw sigmoid(logit).'
        )
    else:
        lines.append(
            f"Temperature scaling after a prior correction: calibrated p = "
            f"sigmoid((logit + b) / T), b = {_fmt(bias, 4)} (undoes the class-balanced training "
            f"loss; from the training data's class shares), T = "
            f"{_fmt(temperature, 4) if temperature is not None else NOT_MEASURED} (fitted on "
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
    lines.append(f"Expected calibration error ({_fmt(n_bins)} equal-width bins) and Brier score:")
    lines.append("")
    rows = []
    for name in _ordered(list(entries), DOMAIN_ORDER, last=("pooled",)):
        v = _calibration_values(entries[name])
        rows.append([_cell(name), *(_fmt(v[k]) for k in v)])
    lines += _table(
        ["Set", "ECE before", "ECE single T", "ECE after", "Brier before", "Brier after"],
        rows,
    )
    return lines


def _crossfit_lines(crossfit: Any) -> list[str]:
    """The out-of-fold check of the threshold and the temperature, when evaluate measured it."""
    if not isinstance(crossfit, Mapping) or not crossfit.get("sets"):
        return []
    lines = [
        f"Out of fold ({_fmt(crossfit.get('folds'))} folds grouped by "
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
        [_cell(name), _fmt(v.get("sensitivity")), _fmt(v.get("specificity")), _fmt(v.get("ece")),
         _fmt(v.get("ece_single_temperature")), _fmt(v.get("domain_accuracy"))]
        for name in _ordered(list(sets), DOMAIN_ORDER, last=("pooled",))
        for v in [sets[name]]
    ]  # fmt: skip
    head = ["Set", "sensitivity", "specificity", "ECE", "ECE single T", "domain inferred right"]
    lines += _table(head, rows)
    return lines + _calibration_interval_lines(sets)


def _interval(entry: Any, digits: int = 3) -> str:
    if not isinstance(entry, Mapping):
        return "n/a"
    return (
        f"{_fmt(entry.get('estimate'), digits)} "
        f"({_fmt(entry.get('lower'), digits)}-{_fmt(entry.get('upper'), digits)})"
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
    for name in _ordered(list(reports), DOMAIN_ORDER, last=("pooled",)):
        r = reports[name]
        floor = r.get("noise_floor", {})
        rows.append([
            _cell(name), _fmt(r.get("n")), _interval(r.get("ece")),
            f"{_fmt(floor.get('ece_mean'))} ({_fmt(floor.get('ece_upper'))})",
            _interval(r.get("ece_adaptive")),
            f"{_fmt(floor.get('ece_adaptive_mean'))} ({_fmt(floor.get('ece_adaptive_upper'))})",
            _interval(r.get("brier"), 4), _interval(r.get("intercept"), 2),
            _interval(r.get("slope"), 2),
        ])  # fmt: skip
    head = ["Set", "n", "ECE", "noise floor", "adaptive ECE", "noise floor", "Brier",
            "intercept", "slope"]  # fmt: skip
    return lines + _table(head, rows)


def _candidate_lines(candidates: Any) -> list[str]:
    """Every calibration/threshold combination out of fold (docs/calibration.md's rule)."""
    if not isinstance(candidates, Mapping) or not candidates:
        return []
    lines = [
        "Every candidate out of fold (the rule that chose among them, fixed before they were "
        "compared, is in docs/calibration.md); sensitivity / specificity / ECE:",
        "",
    ]
    rows = []
    for name, c in candidates.items():
        sets = c.get("sets", {}) if isinstance(c, Mapping) else {}
        cells = [
            f"{_fmt(v.get('sensitivity'))} / {_fmt(v.get('specificity'))} / {_fmt(v.get('ece'))}"
            for key in ("domain:dermoscopy", "domain:phone", "pooled")
            for v in [sets.get(key, {})]
        ]
        rows.append([_cell(name), _fmt(c.get("mean_domain_sensitivity")), *cells])
    head = ["Calibration, threshold", "mean of domains' sensitivity", "dermoscopy", "phone",
            "pooled"]  # fmt: skip
    return lines + _table(head, rows)


def _section_threshold(metadata: Mapping[str, Any], metrics: Mapping[str, Any]) -> list[str]:
    lines = ["## Decision threshold and risk tiers", ""]
    thr = metrics.get("threshold", metadata.get("threshold"))
    rule = metrics.get("threshold_rule", metadata.get("threshold_rule"))
    if isinstance(thr, Mapping):
        rule = thr.get("rule", rule)
        thr = thr.get("value")
    lines.append(f"- **Threshold**: {_fmt(thr, 4) if thr is not None else NOT_MEASURED}")
    per_domain = metrics.get("domain_thresholds")
    if isinstance(per_domain, Mapping):
        lines.append(
            "- **Thresholds per inferred photo domain**: "
            + ", ".join(f"{k} {_fmt(v, 4)}" for k, v in per_domain.items())
            + " (the risk tiers' lowest boundary moves with them; the threshold above is the "
            "first domain's)"
        )
    lines.append(f"- **Rule**: {_cell(str(rule)) if rule else NOT_MEASURED}")
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
                _cell(str(tier.get("name", "?"))),
                f"[{_fmt(tier.get('lower'), 4)}, {_fmt(tier.get('upper'), 4)}"
                + ("]" if tier.get("name") == "high" else ")"),
                _fmt(val.get("n")),
                _fmt(val.get("malignant_fraction")),
                _cell(str(tier.get("advice", NOT_MEASURED))),
            ]
        )
        if tier.get("rule") and tier["rule"] not in rules:
            rules.append(tier["rule"])
    lines += _table(
        ["Tier", "calibrated p", "validation n", "malignant fraction", "advice shown"],
        rows,
    )
    lines += [f"Tier rule: {_cell(r)}" for r in rules]
    return [*lines, ""] if rules else lines


def _subgroup_sets(metrics: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    sub = metrics.get("subgroups")
    if not isinstance(sub, Mapping) or not sub:
        return {}
    first = next(iter(sub.values()))
    # {column: {value: metrics}} (one set) or {domain: {column: {value: metrics}}}.
    if isinstance(first, Mapping) and first and all(_is_metrics(v) for v in first.values()):
        return {"all": dict(sub)}
    return {k: dict(v) for k, v in sub.items() if isinstance(v, Mapping)}


def _section_subgroups(metrics: Mapping[str, Any]) -> list[str]:
    lines = ["## Subgroups", ""]
    sets = _subgroup_sets(metrics)
    if not sets:
        return [*lines, f"Subgroup metrics: {NOT_MEASURED}.", ""]
    lines += [
        "Sensitivity and specificity at the decision threshold per subgroup. ROC-AUC is left "
        "n/a where a subgroup has too few malignant or benign cases to estimate it. Small groups "
        "give very uncertain figures.",
        "",
    ]
    for set_name in _ordered(list(sets), DOMAIN_ORDER, last=("pooled",)):
        columns = sets[set_name]
        lines += [f"### {set_name}", ""]
        preferred = ("diagnosis", "dx_type", "sex", "age_band", "age", "site", "fitzpatrick")
        for column in _ordered(list(columns), preferred):
            values = columns[column]
            if not isinstance(values, Mapping):
                continue
            lines += [f"**{SUBGROUP_TITLES.get(column, column)}**", ""]
            rows = [
                [
                    _cell(str(value)),
                    _fmt(m.get("n")),
                    _fmt(m.get("n_positive")),
                    _fmt(m.get("sensitivity")),
                    _fmt(m.get("specificity")),
                    _fmt(m.get("roc_auc")),
                ]
                for value, m in values.items()
                if isinstance(m, Mapping)
            ]
            lines += _table(
                ["Group", "n", "malignant", "sensitivity", "specificity", "ROC-AUC"], rows
            )
        missing = [SUBGROUP_TITLES[c] for c in STANDARD_SUBGROUPS if c not in columns]
        if missing:
            lines += [f"Not measured for {set_name}: {', '.join(missing)}.", ""]
    return lines


def _section_isic(metrics: Mapping[str, Any]) -> list[str]:
    scores = metrics.get("isic_challenge")
    lines = ["## ISIC Challenge scorer", ""]
    if not isinstance(scores, Mapping) or not scores:
        return [*lines, f"Official ISIC Challenge scoring: {NOT_MEASURED}.", ""]
    sets = {"all": scores} if "auc" in scores else dict(scores)
    lines += [
        "Scored with the ISIC Challenge's own package (`isic-challenge-scoring`); its thresholded "
        "figures use the scorer's fixed rule (malignant when p > 0.5), not this model's threshold.",
        "",
    ]
    rows = []
    for name in _ordered(list(sets), DOMAIN_ORDER, last=("pooled",)):
        s = sets[name]
        if not isinstance(s, Mapping):
            rows.append([_cell(name), *([NOT_MEASURED] * 5)])
            continue
        keys = ("auc", "auc_sens_80", "average_precision", "balanced_accuracy", "sensitivity")
        rows.append([_cell(name), *(_fmt(s.get(k)) for k in keys)])
    return lines + _table(
        ["Set", "AUC", "partial AUC (sens >= 0.80)", "AP", "balanced accuracy", "sensitivity"],
        rows,
    )


def _section_limits(domains: Mapping[str, Any]) -> list[str]:
    lines = [
        "## Known limitations",
        "",
        "- **Skin tones**: ISIC and HAM10000 images come mostly from fair-skinned patients; "
        "darker skin types (Fitzpatrick IV-VI) are under-represented, so performance on them is "
        "largely unknown (see the Fitzpatrick table where measured).",
        "- **Artefacts**: ink or surgical-marker circles, rulers, hair, gel bubbles, vignetting "
        "and dermoscope borders occur in the training images; a model can learn such shortcuts.",
        "- **Domain shift**: most training images are dermoscopy; ordinary phone photos (what a "
        "lay user sends) look different. Expect lower performance on phone photos and compare the "
        "pad-ufes-20 rows above with the dermoscopy rows.",
        "- **Label scope**: benign/malignant only; actinic keratosis (pre-malignant) counts as "
        "benign in PAD-UFES-20; rare malignancies are barely represented.",
        "- **Licence**: the training data include CC BY-NC images, so the weights may not be used "
        "commercially.",
    ]
    small = []
    for name, entry in domains.items():
        if isinstance(entry, Mapping):
            m, _ = _split_entry(entry)
            n_pos = m.get("n_positive")
            if isinstance(n_pos, int | float) and n_pos < 100:
                small.append(f"{name} ({_fmt(m.get('n'))} images, {_fmt(n_pos)} malignant)")
    text = "- **Small validation sets**: confidence intervals are wide"
    lines.append(f"{text}: {', '.join(small)}." if small else f"{text} for small sets.")
    return [*lines, ""]


def _section_plots(metrics: Mapping[str, Any], card_dir: Path) -> list[str]:
    lines = ["## Plots", ""]
    plots = metrics.get("plots")
    entries: list[tuple[str, str]] = []
    if isinstance(plots, Mapping):
        entries = [(str(k), str(v)) for k, v in plots.items()]
    elif (card_dir / "plots").is_dir():
        entries = [(p.stem, f"plots/{p.name}") for p in sorted((card_dir / "plots").glob("*.png"))]
    if not entries:
        return [*lines, f"Plots: {NOT_MEASURED}.", ""]
    return [*lines, *(f"![{name}]({rel})" for name, rel in entries), ""]


def _section_reproduce(metadata: Mapping[str, Any]) -> list[str]:
    lines = ["## How to reproduce", ""]
    training = metadata.get("training")
    if not isinstance(training, Mapping) or not training.get("command"):
        return [*lines, f"Training command: {NOT_MEASURED}.", ""]
    lines += ["```", str(training["command"]), "```", ""]
    if training.get("seed") is not None:
        lines.append(f"- **Seed**: {training['seed']}")
    if training.get("recipe"):
        lines.append(f"- **Recipe**: {_cell(str(training['recipe']))}")
    return [*lines, ""]


def write_model_card(
    metadata: Mapping[str, Any], metrics: Mapping[str, Any], path: PathLike
) -> Path:
    """Write MODEL_CARD.md from the artifact metadata and the evaluation report.

    ``metrics`` layout (every key optional; a missing section reads "not measured"):
    ``domains`` (or ``validation``): ``{domain: binary_metrics(...) + {"ci": bootstrap_ci(...)}}``
    (or ``{"metrics": ..., "ci": ...}``), falling back to ``metadata["metrics"]["validation"]``;
    ``calibration``: ``{"temperature", "n_bins", "before": {"ece", "brier"}, "after": {...}}``
    and/or the same per domain; ``threshold`` and ``threshold_rule`` (else from metadata);
    ``risk_tiers`` (else from metadata); ``subgroups``: ``{domain: subgroup_metrics(...)}`` or
    one ``subgroup_metrics(...)``; ``isic_challenge``: ``{domain: isic_challenge_score(...)}``;
    ``plots``: ``{title: path relative to the card}`` (else ``plots/*.png`` next to the card).
    """
    out = Path(path)
    domains = _domains(metadata, metrics)
    name = metadata.get("name", "skin-lesion triage model")
    version = metadata.get("version", "")
    lines = [f"# Model card: {name} {version}".rstrip(), ""]
    lines += [
        "A benign/malignant assessment of a photographed skin lesion, used to suggest how "
        "urgently to see a doctor. **Not a diagnosis.**",
        "",
    ]
    lines += _section_model(metadata)
    lines += [*INTENDED_USE.splitlines(), ""]
    lines += [*TRAINING_DATA.splitlines(), ""]
    lines += _section_data_used(metadata)
    lines += _section_weights(metadata)
    lines += _section_performance(domains)
    lines += _section_calibration(metadata, metrics)
    lines += _section_threshold(metadata, metrics)
    lines += _section_subgroups(metrics)
    lines += _section_isic(metrics)
    lines += _section_tta(metrics)
    lines += _section_shortcuts(metrics)
    gates_json = Path(out).parent / "gates.json"
    gates = json.loads(gates_json.read_text()) if gates_json.is_file() else None
    lines += _section_gates(metadata, gates)
    lines += _section_limits(domains)
    lines += _section_plots(metrics, out.parent)
    lines += _section_reproduce(metadata)
    out.parent.mkdir(parents=True, exist_ok=True)
    text = "\n".join(lines).rstrip() + "\n"
    out.write_text(text, encoding="utf-8")
    return out


def _section_tta(metrics: Mapping[str, Any]) -> list[str]:
    """Test-time augmentation: measured gain and cost, and whether it is served."""
    tta = metrics.get("tta")
    lines = ["## Test-time augmentation", ""]
    if not isinstance(tta, Mapping):
        return [*lines, f"Not measured ({NOT_MEASURED}).", ""]
    lines.append(
        f"Views: {', '.join(tta.get('views', []))}; cost {_fmt(tta.get('cost_ratio'), 2)}x "
        "the inference time of one view. ROC-AUC on validation:"
    )
    lines += ["", "| Set | one view | averaged views |", "|---|---|---|"]
    for name, entry in tta.get("auc", {}).items():
        lines.append(
            f"| {name} | {_fmt(entry.get('roc_auc'))} | {_fmt(entry.get('roc_auc_tta'))} |"
        )
    served = "yes" if tta.get("served") else "no (the gain does not pay for the cost)"
    lines += ["", f"Served with TTA: {served}.", ""]
    return lines


def _section_shortcuts(metrics: Mapping[str, Any]) -> list[str]:
    """Shortcut checks (model_training.artefacts): does a drawn ink ring move the answer?"""
    checks = metrics.get("shortcut_checks", {}).get("ink_marker_ring")
    lines = ["## Shortcut check: surgical-marker ink", ""]
    if not isinstance(checks, Mapping):
        return [*lines, f"Not measured ({NOT_MEASURED}).", ""]
    lines += [str(checks.get("method", "")), ""]
    lines += [
        "| ink colour | set | n | mean change in p | benign → malignant | malignant → benign |",
        "|---|---|---|---|---|---|",
    ]
    changes: list[float] = []
    lost: list[float] = []
    for key, per_set in checks.items():
        if not key.startswith("ink_rgb_") or not isinstance(per_set, Mapping):
            continue
        colour = key.removeprefix("ink_rgb_").replace("_", ",")
        for name, entry in per_set.items():
            changes.append(float(entry.get("mean_probability_change") or 0.0))
            lost.append(float(entry.get("malignant_to_benign") or 0.0))
            lines.append(
                f"| rgb({colour}) | {name} | {entry.get('n')} | "
                f"{_fmt(entry.get('mean_probability_change'), 4)} | "
                f"{_fmt(entry.get('benign_to_malignant'))} | "
                f"{_fmt(entry.get('malignant_to_benign'))} |"
            )
    if changes and max(changes) < 0:
        lines += [
            "",
            'Reading: the model did **not** learn "ink means malignant". A drawn ring instead '
            f"*lowers* its estimate and turns up to {max(lost):.0%} of malignant answers "
            "benign, so photos with pen marks may be under-called: ask users not to draw on "
            "the skin, and add synthetic marker rings to training augmentation (not done yet).",
        ]
    return [*lines, ""]


def _section_gates(metadata: Mapping[str, Any], gates: Mapping[str, Any] | None) -> list[str]:
    """Quality gate, skin gate and artefact notes: thresholds and measured rates (gates.json
    next to the card, written by ``python -m model_training fit-gates``)."""
    lines = ["## Input gates", ""]
    quality = metadata.get("quality")
    report = metadata.get("quality_report")
    if isinstance(quality, Mapping):
        pairs = ", ".join(f"{k} {_fmt(v, 3)}" for k, v in quality.items())
        lines.append(
            '- **Quality gate** ("unable to assess" only for unusable photos: too small, '
            f"blurred, too dark, overexposed; each with its own advice): {pairs}."
        )
        if isinstance(report, Mapping) and report.get("rule"):
            lines.append(f"  Rule: {report['rule']}")
    else:
        lines.append("- **Quality gate**: off.")
    ood = metadata.get("ood")
    if not isinstance(ood, Mapping):
        return [*lines, "- **Skin gate**: off.", ""]
    lines.append(
        f'- **Skin gate** ("not a lesion" only for photos that are not a close-up of skin; '
        f"{ood.get('method', 'n/a')} on `{ood.get('embedding_output', 'embedding')}`, "
        f"threshold {_fmt(ood.get('threshold'), 3)}). Rule: {ood.get('rule', 'n/a')}."
    )
    skin = (gates or {}).get("skin")
    if not isinstance(skin, Mapping):
        return [*lines, ""]
    loso = skin.get("leave_one_source_out", {})
    lines += [
        "",
        "**Leave-one-source-out** (the headline: the gate fitted again without any image of "
        "one source, threshold rule included, then scored on every embedded real photo of that "
        "source, i.e. its training sample and all its validation images):",
        "",
        "| left-out source | photos | refused | false rejection | its varied copies refused "
        "| held-out non-skin refused |",
        "|---|---|---|---|---|---|",
    ]
    for name, e in loso.items():
        lines.append(
            f"| {name} | {e.get('images')} | {e.get('refused')} | "
            f"{_pct(e.get('false_rejection'))} | {_pct(e.get('copies_false_rejection'))} | "
            f"{_pct(e.get('held_out_non_skin_rejection'))} |"
        )
    val = skin.get("validation", {})
    counts = val.get("refused_counts_by_domain", {})
    lines += [
        "",
        "Validation photos refused by the skin gate (never used in fitting): "
        + ", ".join(
            f"{d} {_pct(r)} ({counts.get(d, ['?', '?'])[0]}/{counts.get(d, ['?', '?'])[1]})"
            for d, r in val.get("refused_by_domain", {}).items()
        )
        + ".",
        "",
        "Validation photos with an artefact drawn on them, refused by the skin gate (in brackets: "
        "refused although the photo without it is accepted) and by the quality gate:",
        "",
        "| artefact | domain | n | skin gate refuses | quality gate refuses |",
        "|---|---|---|---|---|",
    ]
    q_art = (gates or {}).get("quality", {}).get("artefact_copies", {})
    for kind, per in skin.get("artefact_copies", {}).items():
        for d, e in per.items():
            qe = q_art.get(kind, {}).get(d, {})
            lines.append(
                f"| {kind} | {d} | {e.get('n')} | {_pct(e.get('refused'))} "
                f"({_pct(e.get('refused_because_of_artefact'))}) | "
                f"{_pct(qe.get('refused_because_of_artefact'))} |"
            )
    ns = skin.get("non_skin_held_out", {})
    lines += [
        "",
        f"Non-skin photos not used in fitting (split by photo, never by view): "
        f"{_pct(ns.get('refused'))} of {ns.get('views')} views of {ns.get('photos')} photos "
        f"refused as not a lesion ({_pct(ns.get('refused_by_either_gate'))} by either gate); "
        "by source: "
        + ", ".join(f"{k} {_pct(v.get('refused'))}" for k, v in ns.get("by_source", {}).items())
        + ".",
        "",
        "**Artefact notes** (the answer still comes, with a note and retake advice):",
        "",
        "| note | detected on validation copies with it | given on plain validation photos |",
        "|---|---|---|",
    ]
    for name, e in skin.get("notes_measured", {}).items():
        det = e.get("detected_on_validation_copies", {}).get(name)
        plain = ", ".join(
            f"{d} {_pct(r)}" for d, r in e.get("flagged_on_plain_validation_photos", {}).items()
        )
        lines.append(f"| {name} | {_pct(det)} | {plain} |")
    lines += [
        "",
        "**Effect of each artefact on the estimate** (the same validation photos with and "
        "without it drawn on; probability and threshold as the server gives them, so "
        "with per-domain calibration each photo is read at its inferred domain's threshold):",
        "",
        "| artefact | domain | n | mean change in p | mean abs. change | benign → malignant "
        "| malignant → benign |",
        "|---|---|---|---|---|---|---|",
    ]
    for kind, per in skin.get("artefact_effects", {}).items():
        for d, e in per.items():
            lines.append(
                f"| {kind} | {d} | {e.get('n')} | {_fmt(e.get('mean_probability_change'), 3)} | "
                f"{_fmt(e.get('mean_abs_probability_change'), 3)} | "
                f"{_pct(e.get('benign_to_malignant'))} | {_pct(e.get('malignant_to_benign'))} |"
            )
    return [*lines, ""]


def _pct(value: Any) -> str:
    if isinstance(value, int | float) and math.isfinite(float(value)):
        return f"{float(value):.1%}"
    return "n/a"
