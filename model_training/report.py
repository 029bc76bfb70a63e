"""The model card (MODEL_CARD.md) from metadata.json and metrics.json.

The plots are ``model_training.plots``; the ISIC Challenge scorer, ``model_training.isic_score``;
the sections about the photo (TTA, shortcut check, gates), ``model_training.card_inputs``.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from model_training.card_calibration import section_calibration, section_threshold
from model_training.card_format import DOMAIN_ORDER, NOT_MEASURED, cell, fmt, ordered, table
from model_training.card_inputs import section_gates, section_shortcuts, section_tta

logger = logging.getLogger(__name__)

PathLike = str | Path
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


def _is_metrics(entry: Any) -> bool:
    return isinstance(entry, Mapping) and "n" in entry and not isinstance(entry["n"], Mapping)


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
    value = fmt(m.get(key))
    interval = ci.get(key)
    if isinstance(interval, Mapping) and interval.get("lower") is not None:
        return f"{value} ({fmt(interval.get('lower'))}-{fmt(interval.get('upper'))})"
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
        lines.append(f"- **{name}**: {fmt(value, 4) if value is not None else 'not recorded'}")
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
    order = ordered(list(domains), DOMAIN_ORDER, last=("pooled",))
    main_rows, op_rows = [], []
    for name in order:
        entry = domains[name]
        if not isinstance(entry, Mapping):
            continue
        m, ci = _split_entry(entry)
        prevalence = m.get("prevalence")
        pos = f"{fmt(m.get('n_positive'))} ({fmt(prevalence, 2)})" if prevalence else "n/a"
        main_rows.append(
            [
                cell(name),
                fmt(m.get("n")),
                pos,
                _with_ci(m, ci, "roc_auc"),
                fmt(m.get("average_precision")),
                _with_ci(m, ci, "sensitivity"),
                _with_ci(m, ci, "specificity"),
                _with_ci(m, ci, "balanced_accuracy"),
            ]
        )
        sas = m.get("sensitivity_at_specificity") or {}
        spas = m.get("specificity_at_sensitivity") or {}
        cm = m.get("confusion") or {}
        cm_text = "/".join(fmt(cm.get(k)) for k in ("tn", "fp", "fn", "tp")) if cm else "n/a"
        op_rows.append(
            [
                cell(name),
                fmt(m.get("threshold"), 4),
                fmt(m.get("ppv")),
                fmt(m.get("npv")),
                fmt(m.get("accuracy")),
                *(fmt(sas.get(k)) for k in ("0.80", "0.90", "0.95")),
                *(fmt(spas.get(k)) for k in ("0.90", "0.95")),
                cm_text,
            ]
        )
    lines += table(
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
    lines += table(
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
    for set_name in ordered(list(sets), DOMAIN_ORDER, last=("pooled",)):
        columns = sets[set_name]
        lines += [f"### {set_name}", ""]
        preferred = ("diagnosis", "dx_type", "sex", "age_band", "age", "site", "fitzpatrick")
        for column in ordered(list(columns), preferred):
            values = columns[column]
            if not isinstance(values, Mapping):
                continue
            lines += [f"**{SUBGROUP_TITLES.get(column, column)}**", ""]
            rows = [
                [
                    cell(str(value)),
                    fmt(m.get("n")),
                    fmt(m.get("n_positive")),
                    fmt(m.get("sensitivity")),
                    fmt(m.get("specificity")),
                    fmt(m.get("roc_auc")),
                ]
                for value, m in values.items()
                if isinstance(m, Mapping)
            ]
            lines += table(
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
    for name in ordered(list(sets), DOMAIN_ORDER, last=("pooled",)):
        s = sets[name]
        if not isinstance(s, Mapping):
            rows.append([cell(name), *([NOT_MEASURED] * 5)])
            continue
        keys = ("auc", "auc_sens_80", "average_precision", "balanced_accuracy", "sensitivity")
        rows.append([cell(name), *(fmt(s.get(k)) for k in keys)])
    return lines + table(
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
        "- **Framing and filters**: the model learned from close-ups. A spot photographed from "
        "further away (small in the frame), a one-hue filter such as sepia, or muted colours "
        "lower its sensitivity, mostly without the photo being refused: crop the photo to the "
        "spot and send it unfiltered (measured per change in the repository's "
        "`docs/quality/photo_changes.txt`).",
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
                small.append(f"{name} ({fmt(m.get('n'))} images, {fmt(n_pos)} malignant)")
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
        lines.append(f"- **Recipe**: {cell(str(training['recipe']))}")
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
    lines += section_calibration(metadata, metrics)
    lines += section_threshold(metadata, metrics)
    lines += _section_subgroups(metrics)
    lines += _section_isic(metrics)
    lines += section_tta(metrics)
    lines += section_shortcuts(metrics)
    gates_json = Path(out).parent / "gates.json"
    gates = json.loads(gates_json.read_text()) if gates_json.is_file() else None
    lines += section_gates(metadata, gates)
    lines += _section_limits(domains)
    lines += _section_plots(metrics, out.parent)
    lines += _section_reproduce(metadata)
    out.parent.mkdir(parents=True, exist_ok=True)
    text = "\n".join(lines).rstrip() + "\n"
    out.write_text(text, encoding="utf-8")
    return out
