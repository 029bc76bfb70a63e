"""What the fitted gates do on images they were not fitted on.

* validation photos: refused per domain and per set (skin gate; either gate);
* validation artefact copies: refused per artefact and domain, and refused although the
  photo without the artefact is accepted (a refusal caused by the artefact alone);
* held-out non-skin photos (never used in fitting; split by photo): refused, per source;
* artefact notes: detection on the artefact copies, false notes on the plain photos;
* the effect of each artefact on the model's answer (``artefacts.answer_changes``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from model_training.artefacts import ARTEFACTS, answer_changes
from model_training.gates.collect import Collected
from model_training.gates.loso import rate
from model_training.quality import QualityMeasures, issues_from_measures
from model_training.served import ServedAnswer
from model_training.skin import SkinGate


def _quality_refused(frame: Any, thresholds: Mapping[str, float]) -> np.ndarray:
    out = []
    for r in frame.to_dict("records"):
        out.append(bool(issues_from_measures(QualityMeasures.from_dict(r), thresholds)))
    return np.asarray(out, dtype=bool)


def measure_gate(
    c: Collected,
    gate: SkinGate,
    output: str,
    thresholds: Mapping[str, float],
    served: ServedAnswer,
) -> dict[str, Any]:
    """The figures of gates.json's ``skin`` block that need the fitted gate; answers are
    calibrated as the server calibrates them (``served``)."""
    val = c.valid.frame
    refused_val = gate.not_skin(c.valid.features(output))
    by_path = dict(zip(val["path"].astype(str), refused_val, strict=True))
    vdom = val["domain"].to_numpy()

    af = c.valid_artefacts.frame
    refused_art = gate.not_skin(c.valid_artefacts.features(output))
    orig_refused = np.asarray([by_path[str(p)] for p in af["path"]])
    artefact_rates: dict[str, Any] = {}
    for kind in ARTEFACTS:
        m = (af["artefact"] == kind).to_numpy()
        artefact_rates[kind] = {
            str(d): {
                "n": int((m & (af["domain"] == d).to_numpy()).sum()),
                "refused": rate(refused_art[m & (af["domain"] == d).to_numpy()]),
                "refused_because_of_artefact": rate(
                    (refused_art & ~orig_refused)[m & (af["domain"] == d).to_numpy()]
                ),
            }
            for d in sorted(af["domain"].unique())
        }

    vf = c.views.frame
    held = (vf["part"] == "held_out").to_numpy()
    refused_views = gate.not_skin(c.views.features(output))
    quality_views = _quality_refused(vf, thresholds)
    full = (vf["view"] == "full").to_numpy()
    per_source = {
        str(s): {
            "views": int((held & (vf["source"] == s).to_numpy()).sum()),
            "refused": rate(refused_views[held & (vf["source"] == s).to_numpy()]),
        }
        for s in sorted(vf["source"].unique())
    }
    passed = [
        {"photo": p, "view": v}
        for p, v, r, h in zip(vf["photo"], vf["view"], refused_views, held, strict=True)
        if h and not r
    ]

    notes_v = gate.scores(c.valid.features(output))
    notes_a = gate.scores(c.valid_artefacts.features(output))
    note_rates: dict[str, Any] = {}
    for name in gate.note_names:
        col = gate.names.index(name)
        flag_v = notes_v[:, col] >= gate.thresholds[name]
        flag_a = notes_a[:, col] >= gate.thresholds[name]
        note_rates[name] = {
            "detected_on_validation_copies": {
                kind: rate(flag_a[(af["artefact"] == kind).to_numpy()]) for kind in ARTEFACTS
            },
            "flagged_on_plain_validation_photos": {
                str(d): rate(flag_v[vdom == d]) for d in sorted(np.unique(vdom))
            },
        }

    p_all, t_all = served.answer(c.valid.logits, c.valid.outputs)
    p_val = {str(k): (p, t) for k, p, t in zip(val["path"], p_all, t_all, strict=True)}
    p0 = np.asarray([p_val[str(p)][0] for p in af["path"]])
    t0 = np.asarray([p_val[str(p)][1] for p in af["path"]])
    p1, t1 = served.answer(c.valid_artefacts.logits, c.valid_artefacts.outputs)
    effects = {
        kind: {
            str(d): answer_changes(p0[sel], p1[sel], t0[sel], t1[sel])
            for d in sorted(af["domain"].unique())
            if (sel := ((af["artefact"] == kind) & (af["domain"] == d)).to_numpy()).any()
        }
        for kind in ARTEFACTS
    }

    return {
        "validation": {
            "refused_by_domain": {str(d): rate(refused_val[vdom == d]) for d in np.unique(vdom)},
            "refused_counts_by_domain": {
                str(d): [int(refused_val[vdom == d].sum()), int((vdom == d).sum())]
                for d in np.unique(vdom)
            },
            "refused_by_set": {
                str(s): rate(refused_val[(val["dataset"] == s).to_numpy()])
                for s in sorted(val["dataset"].unique())
            },
        },
        "artefact_copies": artefact_rates,
        "non_skin_held_out": {
            "photos": int(vf.loc[held, "photo"].nunique()),
            "views": int(held.sum()),
            "refused": rate(refused_views[held]),
            "refused_full_photos": rate(refused_views[held & full]),
            "refused_by_either_gate": rate((refused_views | quality_views)[held]),
            "by_source": per_source,
            "passed": passed,
        },
        "non_skin_fit_views_refused_in_sample": rate(refused_views[~held]),
        "notes_measured": note_rates,
        "artefact_effects": effects,
    }
