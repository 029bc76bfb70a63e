"""``python -m model_training fit-gates --artifact DIR``: fit, measure and write the gates.

1. Quality (``quality_fit``): thresholds on every training image and degraded copies.
2. Images (``collect``): training lesions and varied copies, validation images and their
   artefact copies, non-skin photos; the artifact's serve outputs for them (cached).
3. Skin gate (``skin_fit``): variants (serve output x regularisation strength C) compared by
   their leave-one-source-out false rejection (``loso``) on every draw of the fitting photos
   (``--loso-seeds``), then the kept one fitted on everything (the ``--seed`` draw).
4. Artefact notes (``skin_fit.fit_note``) for hair, ink and rulers.
5. ``skin.npz``, ``gates.json`` and ``metadata.json`` (``quality``, ``quality_report``,
   ``ood``) written into the artifact (``report``).
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import shlex
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from model_training.data import DEFAULT_SETS
from model_training.gates.collect import Collected, collect, collect_draw
from model_training.gates.features import DEFAULT_CACHE, FeatureStore, ServeRunner
from model_training.gates.loso import (
    draw_spread,
    full_gate_draws,
    leave_one_source_out,
    rate,
    skin_training_data,
)
from model_training.gates.measure import measure_gate
from model_training.gates.quality_fit import (
    DEGRADED_SHARE,
    artefact_quality,
    fit_quality,
    quality_sensitivity,
)
from model_training.gates.report import summary, write_outputs
from model_training.gates.skin_fit import fit_note, fit_skin
from model_training.runner import saved_model_fingerprint
from model_training.served import ServedAnswer
from model_training.skin import NOTE_HEADS, SKIN_HEAD, SkinGate, transform_features

logger = logging.getLogger("model_training.gates")


def argv_used(argv: Sequence[str]) -> list[str]:
    """The options of this run, whichever entry point started it."""
    args = list(argv[1:])
    return args[1:] if args[:1] == ["fit-gates"] else args


def parse_variants(text: str) -> list[tuple[str, str]]:
    """ "embedding:none,ood_embedding:sqrt" → [("embedding", "none"), ("ood_embedding", "sqrt")]."""
    out: list[tuple[str, str]] = []
    for item in (s.strip() for s in text.split(",") if s.strip()):
        name, _, transform = item.partition(":")
        out.append((name, transform or "none"))
    return out


def with_transformed(c: Collected, output: str, transform: str) -> str:
    """Add ``output`` as the heads read it to every part; return the key it is stored under."""
    key = f"{output}|{transform}"
    for part in (c.lesions, c.copies, c.valid, c.valid_artefacts, c.views):
        if key not in part.outputs:
            part.outputs[key] = transform_features(part.outputs[output], transform)
    return key


def variant_rank(worst: float, non_skin: float, loso_limit: float) -> tuple[float, float, float]:
    """Sort key of a variant (lower is better): first whether its worst leave-one-source-out
    false rejection (over every source and draw) is within ``loso_limit`` (by how much it
    misses), then the most held-out non-skin views its leave-one-source-out gates refuse
    (the lowest over sources and draws), then the worst false rejection itself."""
    return (max(worst - loso_limit, 0.0), -non_skin, worst)


def choose_variant(
    draws: Mapping[int, Collected],
    variants: Sequence[tuple[str, str]],
    costs: Sequence[float],
    target_frr: float,
    k: int | None = None,
    loso_limit: float = 0.01,
) -> tuple[tuple[str, str, float], dict[int, dict[str, Any]], list[dict[str, Any]]]:
    """((output, transform, C), its leave-one-source-out per draw {seed: result}, the
    comparison): every serve-output variant with every regularisation strength C, scored on
    every draw of the fitting photos (a single draw's figure moves by points from one seed to
    the next) and ranked by ``variant_rank``."""
    table = []
    best: tuple[tuple[float, float, float], tuple[str, str, float], dict[int, Any]] | None = None
    for output, transform in variants:
        if any(output not in c.valid.outputs for c in draws.values()):
            continue
        for cost in costs:
            t0 = time.perf_counter()
            per_draw = {
                seed: leave_one_source_out(
                    c, with_transformed(c, output, transform), target_frr, k, cost
                )
                for seed, c in draws.items()
            }
            spread = draw_spread(per_draw)
            worst = spread["worst_false_rejection"]
            non_skin = spread["lowest_held_out_non_skin_rejection"]
            table.append(
                {
                    "output": output,
                    "transform": transform,
                    "cost": cost,
                    "loso_false_rejection": spread["false_rejection"],
                    "loso_mean_false_rejection": spread["mean_false_rejection"],
                    "loso_worst_false_rejection": worst,
                    "loso_held_out_non_skin_rejection": non_skin,
                    "seconds": time.perf_counter() - t0,
                }
            )
            rank = variant_rank(worst, non_skin, loso_limit)
            if best is None or rank < best[0]:
                best = (rank, (output, transform, cost), per_draw)
    if best is None:
        raise SystemExit(f"no variant's serve output is available: {variants}")
    return best[1], best[2], table


def fitting_draws(
    c: Collected, store: FeatureStore, args: argparse.Namespace
) -> dict[int, Collected]:
    """The shipped draw ``c`` and the ``--loso-seeds`` draws of the fitting photos (lesions,
    copies, non-skin crops; validation images are shared), keyed by seed."""
    draws = {int(args.seed): c}
    for seed in args.loso_seeds:
        if seed == args.seed:
            continue
        lesions, copies, views = collect_draw(
            store, c.data, c.photos, args.per_set, args.copies, args.crops, seed,
            args.phone_copies,
        )  # fmt: skip
        draws[int(seed)] = dataclasses.replace(c, lesions=lesions, copies=copies, views=views)
    return draws


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Fit the gates into ``args.artifact``; return the report written to gates.json."""
    from model_training.export import read_metadata

    started = time.perf_counter()
    artifact: Path = args.artifact
    meta = read_metadata(artifact)
    store = FeatureStore(
        args.cache_dir,
        saved_model_fingerprint(artifact),
        lambda: ServeRunner(artifact, args.batch_size),
        enabled=not args.no_cache,
    )
    c = collect(
        store, args.data_dir, args.sets, args.per_set, args.copies, args.artefact_per_set,
        args.crops, args.seed, args.non_skin_dir, args.phone_copies,
    )  # fmt: skip
    t_embed = time.perf_counter() - started

    train_all = c.data[c.data["split"] == "train"].sort_values("path").reset_index(drop=True)
    thresholds, quality_report = fit_quality(
        train_all, c.valid.frame, args.degrade_per_set, args.keep, args.seed,
        args.degraded_share,
    )  # fmt: skip
    quality_report["artefact_copies"] = artefact_quality(c.valid_artefacts.frame, thresholds)
    served = ServedAnswer.of(artifact, meta)
    quality_report["model_sensitivity"] = quality_sensitivity(
        store, c.valid.frame, c.valid.logits, args.sensitivity_per_set, thresholds, served,
        args.seed, c.valid.outputs,
    )  # fmt: skip

    k = args.pca or None
    every_draw = fitting_draws(c, store, args)
    (output, transform, cost), per_draw, variants = choose_variant(
        every_draw, parse_variants(args.variants), args.costs, args.target_frr, k,
        args.loso_limit,
    )  # fmt: skip
    logger.info("skin gate: serve output %s, transform %s, C %s", output, transform, cost)
    loso = per_draw[int(args.seed)]
    key = with_transformed(c, output, transform)
    pos, groups, domains, neg, photos = skin_training_data(c, key)
    skin = fit_skin(pos, groups, domains, neg, photos, args.target_frr, k, cost)
    full_gate = full_gate_draws(every_draw, key, args.target_frr, k, cost, {int(args.seed): skin})
    draws = {**draw_spread(per_draw), "full_gate": full_gate}

    x_note = np.concatenate([c.lesions.features(key), c.copies.features(key)])
    art = np.r_[np.full(len(c.lesions.frame), ""), c.copies.frame["artefact"].to_numpy()]
    note_groups = [*c.lesions.frame["group"].astype(str), *c.copies.frame["group"].astype(str)]
    notes = {
        name: fit_note(x_note, art == name, note_groups, args.note_fpr, k, args.cost)
        for name in NOTE_HEADS
    }
    heads = [SKIN_HEAD, *notes]
    gate = SkinGate(
        heads,
        np.stack([skin.head.weight, *(n.head.weight for n in notes.values())]),
        np.asarray([skin.head.bias, *(n.head.bias for n in notes.values())]),
        {SKIN_HEAD: skin.threshold, **{n: f.threshold for n, f in notes.items()}},
        transform,
    )
    measured = measure_gate(c, gate, output, thresholds, served)
    skin_report: dict[str, Any] = {
        "embedding_output": output,
        "transform": transform,
        "pca_components": k,
        "cost": cost,
        "variants": variants,
        "threshold": skin.threshold,
        "target_false_rejection": args.target_frr,
        "threshold_per_domain_quantile": skin.per_domain_quantile,
        "out_of_fold": {
            "lesions_and_copies_refused": rate(skin.oof_pos < skin.threshold),
            "fit_non_skin_views_refused": rate(skin.oof_neg < skin.threshold),
        },
        "leave_one_source_out": loso,
        "leave_one_source_out_draws": draws,
        "notes": {
            n: {
                "threshold": f.threshold,
                "out_of_fold_detected": f.oof_detected,
                "out_of_fold_false_flag": f.oof_false_flag,
            }
            for n, f in notes.items()
        },
        **measured,
        "fitted_on": {
            "lesion_photos": len(c.lesions.frame),
            "lesion_copies": len(c.copies.frame),
            "copies_by_kind": {
                str(k): int(v) for k, v in c.copies.frame["kind"].value_counts().items()
            },
            "by_set": {
                str(s): int(v) for s, v in c.lesions.frame["dataset"].value_counts().items()
            },
            "non_skin_fit_views": len(neg),
            "non_skin_fit_photos": len(set(photos)),
        },
    }
    report = {
        "command": "python -m model_training fit-gates " + shlex.join(argv_used(sys.argv)),
        "artifact_fingerprint": saved_model_fingerprint(artifact),
        "data": {"sets": list(args.sets), "validation_images": len(c.valid.frame)},
        "quality": quality_report,
        "skin": skin_report,
        "non_skin_sources_missing": c.missing_sources,
        "seconds": {"embedding": t_embed, "total": time.perf_counter() - started},
        "images_run_through_the_model": store.runner.images_done if store._runner else 0,
    }
    write_outputs(artifact, report, gate, thresholds)
    return report


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Options shared by ``python -m model_training fit-gates`` and ``-m model_training.gates``."""
    p.add_argument("--artifact", type=Path, required=True, help="artifact folder to write into")
    p.add_argument(
        "--data-dir", type=Path,
        default=Path(os.environ.get("SHARED_DATA_DIR", "../shared/data")),
    )  # fmt: skip
    p.add_argument(
        "--sets", type=lambda s: [x for x in s.split(",") if x], default=list(DEFAULT_SETS)
    )
    p.add_argument("--per-set", type=int, default=500, help="training photos per set")
    p.add_argument("--copies", type=int, default=1, help="varied copies per training photo")
    p.add_argument(
        "--phone-copies", type=int, default=2,
        help="phone-look copies per dermoscopy training photo (positives of the phone domain)",
    )  # fmt: skip
    p.add_argument(
        "--artefact-per-set", type=int, default=60, help="validation photos given artefacts"
    )
    p.add_argument("--crops", type=int, default=4, help="random crops per non-skin photo")
    p.add_argument(
        "--variants",
        default="skin_embedding:sqrt,ood_embedding:sqrt",
        help="skin-gate variants compared by LOSO: serve output:feature transform",
    )
    p.add_argument(
        "--loso-limit",
        type=float,
        default=0.01,
        help="worst leave-one-source-out false rejection a variant must meet to be preferred",
    )
    p.add_argument("--pca", type=int, default=0, help="PCA components before the heads (0: none)")
    p.add_argument(
        "--target-frr", type=float, default=0.0005, help="lesions refused per domain (out of fold)"
    )
    p.add_argument("--note-fpr", type=float, default=0.05, help="artefact notes given wrongly")
    p.add_argument(
        "--costs", type=lambda s: [float(x) for x in s.split(",") if x],
        default=[0.5, 0.1, 0.05, 0.02, 0.01],
        help="skin-gate logistic regression C values compared by LOSO (smaller: stronger L2)",
    )  # fmt: skip
    p.add_argument("--cost", type=float, default=0.5, help="artefact notes' logistic regression C")
    p.add_argument("--keep", type=float, default=0.99, help="real images kept by the quality gate")
    p.add_argument("--degrade-per-set", type=int, default=400)
    p.add_argument(
        "--degraded-share", type=float, default=DEGRADED_SHARE,
        help="quality thresholds: least share of each kind's degraded copies refused when "
        "that widens the margin toward them (1: the nearest degraded copy bounds the margin)",
    )  # fmt: skip
    p.add_argument("--sensitivity-per-set", type=int, default=30)
    p.add_argument("--non-skin-dir", type=Path, action="append", default=[])
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument(
        "--loso-seeds", type=lambda s: [int(x) for x in s.split(",") if x], default=[1, 2],
        help="other draws of the fitting photos on which every variant's leave-one-source-out "
        "is measured too (the variant is chosen on all draws)",
    )  # fmt: skip
    p.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE)
    p.add_argument("--no-cache", action="store_true")


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m model_training.gates``."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    p = argparse.ArgumentParser(prog="python -m model_training.gates", description=__doc__)
    add_arguments(p)
    report = run(p.parse_args(argv))
    print(summary(report))
    return 0
