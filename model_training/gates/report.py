"""Write the fitted gates into the artifact and summarise them.

``skin.npz`` (the linear heads), ``gates.json`` (every figure) and three keys of
``metadata.json``: ``quality`` (the thresholds the server reads), ``quality_report`` and
``ood`` (the skin gate: file, serve output, thresholds and headline figures). A gate file of an
older method (``ood.npz``) is removed.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from model_training.quality import THRESHOLD_KEYS
from model_training.skin import METHOD, SKIN_HEAD, SkinGate

GATES_FILE = "gates.json"
SKIN_FILE = "skin.npz"
OLD_FILES = ("ood.npz",)


def jsonable(value: Any) -> Any:
    """Plain JSON: NumPy scalars to Python, NaN and infinities to null."""
    if isinstance(value, Mapping):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [jsonable(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def metadata_blocks(
    report: Mapping[str, Any], gate: SkinGate, thresholds: Mapping[str, float]
) -> dict[str, Any]:
    """The ``quality``, ``quality_report`` and ``ood`` keys of metadata.json."""
    q, s = report["quality"], report["skin"]
    return jsonable(
        {
            "quality": {k: thresholds[k] for k in THRESHOLD_KEYS if k in thresholds},
            "quality_report": {
                "rule": q["rule"],
                "report": GATES_FILE,
                "validation_real_rejected": q["validation"]["real"]["rejected_by_set"],
                "validation_degraded_rejected": {
                    k: v["rejected"] for k, v in q["validation"]["degraded"].items()
                },
                "choice_real_rejected": q["choice"]["real"]["rejected_by_set"],
                # Each set's real photos refused when its photos were left out of the choice.
                "leave_one_source_out_real_rejected": {
                    k: v["refused"] for k, v in q.get("leave_one_source_out", {}).items()
                },
            },
            "ood": {
                "file": SKIN_FILE,
                "method": METHOD,
                "question": "is this a close-up of skin?",
                "embedding_output": s["embedding_output"],
                "transform": s["transform"],
                "threshold": gate.thresholds[SKIN_HEAD],
                "notes": {
                    n: {
                        "threshold": gate.thresholds[n],
                        **{k: v for k, v in s["notes"][n].items() if k != "threshold"},
                    }
                    for n in gate.note_names
                },
                "rule": (
                    f"logistic regression (features {s['transform']}-transformed, standardised, "
                    f"PCA {s['pca_components'] or 'none'}, L2 C {s.get('cost', 0.5):g}) on "
                    f"serve output {s['embedding_output']}: lesion photos of every source plus "
                    "varied copies, and phone-look copies of the dermoscopy photos as phone "
                    "photos, against non-skin photos; threshold = the lowest per-domain "
                    f"{s['target_false_rejection']:.2%} quantile of out-of-fold lesion scores"
                ),
                "leave_one_source_out_false_rejection": {
                    k: v["false_rejection"] for k, v in s["leave_one_source_out"].items()
                },
                "false_rejection": s["validation"]["refused_by_domain"],
                "non_skin_held_out_rejection": s["non_skin_held_out"]["refused"],
                "non_skin_held_out": {
                    "photos": s["non_skin_held_out"]["photos"],
                    "views": s["non_skin_held_out"]["views"],
                },
                "report": GATES_FILE,
            },
        }
    )


def write_outputs(
    artifact: Path, report: Mapping[str, Any], gate: SkinGate, thresholds: Mapping[str, float]
) -> None:
    """skin.npz, gates.json and the metadata keys; older gate files removed."""
    from model_training.export import read_metadata, write_metadata

    gate.save(artifact / SKIN_FILE)
    for name in OLD_FILES:
        (artifact / name).unlink(missing_ok=True)
    (artifact / GATES_FILE).write_text(json.dumps(jsonable(report), indent=2) + "\n")
    meta = read_metadata(artifact)  # read again: only this command's keys change
    meta.update(metadata_blocks(report, gate, thresholds))
    write_metadata(artifact, meta)
    metrics = artifact / "metrics.json"
    if metrics.is_file():  # the card's gates section reads gates.json
        from model_training.report import write_model_card

        write_model_card(meta, json.loads(metrics.read_text()), artifact / "MODEL_CARD.md")


def _pct(rates: Mapping[str, Any]) -> str:
    return ", ".join(
        f"{k} {v:.2%}" if isinstance(v, float) else f"{k} {v}" for k, v in rates.items()
    )


def _draw_lines(draws: Mapping[str, Any] | None) -> list[str]:
    if not draws or len(draws.get("seeds", [])) < 2:
        return []
    spread = ", ".join(
        f"{k} {min(v):.2%}-{max(v):.2%}" for k, v in draws["false_rejection"].items() if v
    )
    return [
        f"  ... over {len(draws['seeds'])} draws (seeds {draws['seeds']}): {spread}; "
        f"mean {draws['mean_false_rejection']:.2%}, worst {draws['worst_false_rejection']:.2%}; "
        f"held-out non-skin refused >= {draws['lowest_held_out_non_skin_rejection']:.1%}",
        *(
            f"  gate on every source, draw {seed}: held-out non-skin views refused "
            f"{g['held_out_non_skin_views_refused']:.1%}, whole photos "
            f"{g['held_out_non_skin_photos_refused']:.1%}; validation lesions refused "
            f"{_pct(g['validation_refused'])}"
            for seed, g in draws.get("full_gate", {}).items()
        ),
    ]


def summary(report: Mapping[str, Any]) -> str:
    """The headline figures as a few lines of text."""
    q, s = report["quality"], report["skin"]
    loso = s["leave_one_source_out"]
    worst_art = {
        kind: max(d["refused_because_of_artefact"] for d in per.values())
        for kind, per in s["artefact_copies"].items()
    }
    lines = [
        "quality thresholds: " + json.dumps(q["thresholds"]),
        "  real validation images refused by set: "
        + _pct(q["validation"]["real"]["rejected_by_set"]),
        "  degraded validation copies refused: "
        + _pct({k: v["rejected"] for k, v in q["validation"]["degraded"].items()}),
        "  leave-one-source-out real photos refused: "
        + _pct({k: v["refused"] for k, v in q.get("leave_one_source_out", {}).items()}),
        f"skin gate: serve output {s['embedding_output']!r}, transform {s['transform']}, "
        f"C {s.get('cost', 0.5):g}, threshold {s['threshold']:.3f}",
        "  leave-one-source-out lesions refused: "
        + ", ".join(
            f"{k} {v['false_rejection']:.2%} ({v['refused']}/{v['images']})"
            for k, v in loso.items()
        ),
        *_draw_lines(s.get("leave_one_source_out_draws")),
        "  validation lesions refused by domain: " + _pct(s["validation"]["refused_by_domain"]),
        "  artefact copies refused because of the artefact (worst domain): " + _pct(worst_art),
        f"  held-out non-skin refused: {s['non_skin_held_out']['refused']:.1%} of "
        f"{s['non_skin_held_out']['views']} views of {s['non_skin_held_out']['photos']} photos"
        f" (either gate {s['non_skin_held_out']['refused_by_either_gate']:.1%})",
        "  notes detected on validation copies: "
        + ", ".join(
            f"{n} {v['detected_on_validation_copies'][n]:.0%} (plain photos flagged "
            + _pct(v["flagged_on_plain_validation_photos"])
            + ")"
            for n, v in s["notes_measured"].items()
        ),
        f"run time {report['seconds']['total']:.0f} s "
        f"({report['images_run_through_the_model']} images through the model)",
    ]
    return "\n".join(lines)
