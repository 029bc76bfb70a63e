"""Model-card sections about the photo rather than the model's scores: test-time
augmentation, the ink shortcut check and the input gates (from ``gates.json``)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from model_training.card_format import NOT_MEASURED, fmt, pct

# What each quality threshold refuses, in the card's words (two keys share "overexposed").
QUALITY_WORDS = {
    "min_side": "too small",
    "min_sharpness": "blurred",
    "min_brightness": "too dark",
    "max_brightness": "overexposed",
    "max_clipped_fraction": "overexposed",
    "min_colourfulness": "in black and white",
}


def section_tta(metrics: Mapping[str, Any]) -> list[str]:
    """Test-time augmentation: measured gain and cost, and whether it is served."""
    tta = metrics.get("tta")
    lines = ["## Test-time augmentation", ""]
    if not isinstance(tta, Mapping):
        return [*lines, f"Not measured ({NOT_MEASURED}).", ""]
    lines.append(
        f"Views: {', '.join(tta.get('views', []))}; cost {fmt(tta.get('cost_ratio'), 2)}x "
        "the inference time of one view. ROC-AUC on validation:"
    )
    lines += ["", "| Set | one view | averaged views |", "|---|---|---|"]
    for name, entry in tta.get("auc", {}).items():
        lines.append(f"| {name} | {fmt(entry.get('roc_auc'))} | {fmt(entry.get('roc_auc_tta'))} |")
    served = "yes" if tta.get("served") else "no (the gain does not pay for the cost)"
    lines += ["", f"Served with TTA: {served}.", ""]
    return lines


def section_shortcuts(metrics: Mapping[str, Any]) -> list[str]:
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
                f"{fmt(entry.get('mean_probability_change'), 4)} | "
                f"{fmt(entry.get('benign_to_malignant'))} | "
                f"{fmt(entry.get('malignant_to_benign'))} |"
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


def draw_lines(draws: Mapping[str, Any] | None) -> list[str]:
    """The leave-one-source-out figures over several draws of the fitting photos."""
    if not isinstance(draws, Mapping) or len(draws.get("seeds", [])) < 2:
        return []
    seeds = draws["seeds"]
    frr, non_skin = draws["false_rejection"], draws["held_out_non_skin_rejection"]
    lines = [
        "",
        f"The same, repeated on {len(seeds)} random draws of the fitting photos, their copies "
        f"and the non-skin crops (seeds {', '.join(str(s) for s in seeds)}; the first is the "
        "shipped gate's): how much of the figure above is the luck of one draw.",
        "",
        "| left-out source | false rejection per draw | mean | held-out non-skin refused "
        "per draw |",
        "|---|---|---|---|",
    ]
    for name, values in frr.items():
        lines.append(
            f"| {name} | {' / '.join(pct(v) for v in values)} | "
            f"{pct(sum(values) / len(values)) if values else 'n/a'} | "
            f"{' / '.join(pct(v) for v in non_skin.get(name, []))} |"
        )
    lines += [
        "",
        f"Over every source and draw: mean {pct(draws.get('mean_false_rejection'))}, worst "
        f"{pct(draws.get('worst_false_rejection'))}; the gates fitted without a source refuse "
        f"at least {pct(draws.get('lowest_held_out_non_skin_rejection'))} of the held-out "
        "non-skin views.",
    ]
    full = draws.get("full_gate")
    if isinstance(full, Mapping) and full:
        lines += [
            "",
            "The gate fitted on every source, once per draw (the first is the shipped gate):",
            "",
            "| draw | held-out non-skin views refused | whole photos refused | validation "
            "lesions refused |",
            "|---|---|---|---|",
        ]
        lines += [
            f"| {seed} | {pct(g.get('held_out_non_skin_views_refused'))} | "
            f"{pct(g.get('held_out_non_skin_photos_refused'))} "
            f"(of {g.get('held_out_non_skin_photos', 'n/a')}) | "
            + ", ".join(f"{d} {n}" for d, n in g.get("validation_refused", {}).items())
            + " |"
            for seed, g in full.items()
        ]
    return lines


def section_gates(metadata: Mapping[str, Any], gates: Mapping[str, Any] | None) -> list[str]:
    """Quality gate, skin gate and artefact notes: thresholds and measured rates (gates.json
    next to the card, written by ``python -m model_training fit-gates``)."""
    lines = ["## Input gates", ""]
    quality = metadata.get("quality")
    report = metadata.get("quality_report")
    if isinstance(quality, Mapping):
        # Sorted: metadata read from disk and freshly fitted thresholds come in different orders.
        pairs = ", ".join(f"{k} {fmt(v, 3)}" for k, v in sorted(quality.items()))
        # Only what this artifact checks: older ones have no colour check.
        problems = ", ".join(dict.fromkeys(w for k, w in QUALITY_WORDS.items() if k in quality))
        lines.append(
            f'- **Quality gate** ("unable to assess" only for unusable photos: {problems}; '
            f"each with its own advice): {pairs}."
        )
        if isinstance(report, Mapping) and report.get("rule"):
            lines.append(f"  Rule: {report['rule']}")
        loso = report.get("leave_one_source_out_real_rejected") if report else None
        if isinstance(loso, Mapping) and loso:
            shares = ", ".join(f"{k} {float(v):.2%}" for k, v in sorted(loso.items()))
            lines.append(
                "  Leave-one-source-out (thresholds chosen without a source, its real training "
                f"photos then refused): {shares}."
            )
    else:
        lines.append("- **Quality gate**: off.")
    ood = metadata.get("ood")
    if not isinstance(ood, Mapping):
        return [*lines, "- **Skin gate**: off.", ""]
    lines.append(
        f'- **Skin gate** ("not a lesion" only for photos that are not a close-up of skin; '
        f"{ood.get('method', 'n/a')} on `{ood.get('embedding_output', 'embedding')}`, "
        f"threshold {fmt(ood.get('threshold'), 3)}). Rule: {ood.get('rule', 'n/a')}."
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
            f"{pct(e.get('false_rejection'))} | {pct(e.get('copies_false_rejection'))} | "
            f"{pct(e.get('held_out_non_skin_rejection'))} |"
        )
    lines += draw_lines(skin.get("leave_one_source_out_draws"))
    val = skin.get("validation", {})
    counts = val.get("refused_counts_by_domain", {})
    lines += [
        "",
        "Validation photos refused by the skin gate (never used in fitting): "
        + ", ".join(
            f"{d} {pct(r)} ({counts.get(d, ['?', '?'])[0]}/{counts.get(d, ['?', '?'])[1]})"
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
                f"| {kind} | {d} | {e.get('n')} | {pct(e.get('refused'))} "
                f"({pct(e.get('refused_because_of_artefact'))}) | "
                f"{pct(qe.get('refused_because_of_artefact'))} |"
            )
    ns = skin.get("non_skin_held_out", {})
    lines += [
        "",
        f"Non-skin photos not used in fitting (split by photo, never by view): "
        f"{pct(ns.get('refused'))} of {ns.get('views')} views of {ns.get('photos')} photos "
        f"refused as not a lesion ({pct(ns.get('refused_by_either_gate'))} by either gate); "
        "by source: "
        + ", ".join(f"{k} {pct(v.get('refused'))}" for k, v in ns.get("by_source", {}).items())
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
            f"{d} {pct(r)}" for d, r in e.get("flagged_on_plain_validation_photos", {}).items()
        )
        lines.append(f"| {name} | {pct(det)} | {plain} |")
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
                f"| {kind} | {d} | {e.get('n')} | {fmt(e.get('mean_probability_change'), 3)} | "
                f"{fmt(e.get('mean_abs_probability_change'), 3)} | "
                f"{pct(e.get('benign_to_malignant'))} | {pct(e.get('malignant_to_benign'))} |"
            )
    return [*lines, ""]
