"""Leave-one-source-out: the false rejection a user with a new camera or clinic meets.

For each source (ISIC 2017, HAM10000, PAD-UFES-20) the skin gate is fitted again, threshold
rule included, without any image of that source (neither its photos nor their varied copies),
and scored on every image of it that was embedded: its training sample and all its
validation images (real photos only; the copies are reported apart).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from model_training.gates.collect import Collected
from model_training.gates.skin_fit import SkinFit, fit_skin


def rate(mask: np.ndarray) -> float:
    """Mean of a boolean mask; NaN when empty."""
    return float(np.mean(mask)) if len(mask) else float("nan")


def skin_training_data(
    c: Collected, output: str, exclude: str | None = None
) -> tuple[np.ndarray, list[str], np.ndarray, np.ndarray, list[str]]:
    """(positives, their groups, their domains, negatives, their photos) for fitting."""
    keep_l = (c.lesions.frame["dataset"] != exclude).to_numpy()
    keep_c = (c.copies.frame["dataset"] != exclude).to_numpy()
    fit_v = (c.views.frame["part"] == "fit").to_numpy()
    pos = np.concatenate([c.lesions.features(output)[keep_l], c.copies.features(output)[keep_c]])
    groups = [
        *c.lesions.frame["group"].astype(str)[keep_l],
        *c.copies.frame["group"].astype(str)[keep_c],
    ]
    domains = np.r_[
        c.lesions.frame["domain"].to_numpy()[keep_l], c.copies.frame["domain"].to_numpy()[keep_c]
    ]
    neg = c.views.features(output)[fit_v]
    photos = c.views.frame["photo"][fit_v].astype(str).tolist()
    return pos, groups, domains, neg, photos


def leave_one_source_out(
    c: Collected, output: str, target_frr: float, n_components: int | None, cost: float
) -> dict[str, Any]:
    """Per left-out source: threshold, false rejection of its photos and copies, and the
    held-out non-skin rejection of the gate fitted without it."""
    held = (c.views.frame["part"] == "held_out").to_numpy()
    out: dict[str, Any] = {}
    for source in sorted(c.lesions.frame["dataset"].unique()):
        pos, groups, domains, neg, photos = skin_training_data(c, output, exclude=source)
        fit = fit_skin(pos, groups, domains, neg, photos, target_frr, n_components, cost)
        t = fit.threshold
        lv = (c.lesions.frame["dataset"] == source).to_numpy()
        vv = (c.valid.frame["dataset"] == source).to_numpy()
        cv = (c.copies.frame["dataset"] == source).to_numpy()
        real = np.r_[
            fit.head.score(c.lesions.features(output)[lv]),
            fit.head.score(c.valid.features(output)[vv]),
        ]
        copies = fit.head.score(c.copies.features(output)[cv])
        out[str(source)] = {
            "images": len(real),
            "refused": int((real < t).sum()),
            "false_rejection": rate(real < t),
            "copies": len(copies),
            "copies_false_rejection": rate(copies < t),
            "threshold": t,
            "held_out_non_skin_rejection": rate(fit.head.score(c.views.features(output)[held]) < t),
            "lowest_scores_minus_threshold": sorted((real - t).tolist())[:5],
        }
    return out


def draw_spread(draws: Mapping[int, Mapping[str, Mapping[str, Any]]]) -> dict[str, Any]:
    """Leave-one-source-out over several seeded draws of the fitting photos ({seed: the
    ``leave_one_source_out`` result}): per source the false rejection of each draw, with
    the mean and the worst, and the same for the held-out non-skin rejection."""
    seeds = list(draws)
    sources = sorted({s for result in draws.values() for s in result})

    def per_source(key: str) -> dict[str, list[float]]:
        return {s: [float(draws[d][s][key]) for d in seeds if s in draws[d]] for s in sources}

    frr = per_source("false_rejection")
    non_skin = per_source("held_out_non_skin_rejection")
    every_frr = [v for values in frr.values() for v in values]
    every_non_skin = [v for values in non_skin.values() for v in values]
    return {
        "seeds": seeds,
        "false_rejection": frr,
        "held_out_non_skin_rejection": non_skin,
        "mean_false_rejection": float(np.mean(every_frr)) if every_frr else float("nan"),
        "worst_false_rejection": max(every_frr, default=float("nan")),
        "lowest_held_out_non_skin_rejection": min(every_non_skin, default=float("nan")),
    }


def full_gate_draws(
    draws: Mapping[int, Collected],
    key: str,
    target_frr: float,
    n_components: int | None,
    cost: float,
    fitted: Mapping[int, SkinFit] | None = None,
) -> dict[str, Any]:
    """The gate fitted on every source, once per draw of the fitting photos: the held-out
    non-skin views and whole photos it refuses and the validation lesions it refuses per
    domain (the shipped gate is the ``--seed`` draw's). ``fitted``: gates already fitted
    on some draws with the same settings, used instead of fitting them again."""
    out: dict[str, Any] = {}
    for seed, c in draws.items():
        fit = (fitted or {}).get(seed)
        if fit is None:
            pos, groups, domains, neg, photos = skin_training_data(c, key)
            fit = fit_skin(pos, groups, domains, neg, photos, target_frr, n_components, cost)
        views = c.views.frame
        held = (views["part"] == "held_out").to_numpy()
        whole = held & (views["view"] == "full").to_numpy()
        refused = fit.head.score(c.views.features(key)) < fit.threshold
        valid = fit.head.score(c.valid.features(key)) < fit.threshold
        domain = c.valid.frame["domain"].to_numpy()
        out[str(seed)] = {
            "threshold": fit.threshold,
            "held_out_non_skin_views_refused": rate(refused[held]),
            "held_out_non_skin_photos_refused": rate(refused[whole]),
            "held_out_non_skin_photos": int(whole.sum()),
            "validation_refused": {
                str(d): int(valid[domain == d].sum()) for d in np.unique(domain)
            },
        }
    return out
