"""Command line: ``python -m model_training train|export|evaluate|fit-gates ...``."""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

DEFAULT_DATA = Path(os.environ.get("SHARED_DATA_DIR", "../shared/data"))


def _sets(value: str) -> list[str]:
    return [s.strip() for s in value.split(",") if s.strip()]


def cmd_train(args: argparse.Namespace) -> int:
    """Train a classifier and write a run folder (weights shards, history, run.json)."""
    from model_training import train as tr
    from model_training.data import check_no_leak, describe, read_datasets
    from model_training.weights import WEIGHTS_SOURCE, imagenet_weights

    config = tr.TrainConfig(
        mode=args.mode,
        batch_size=args.batch_size,
        head_epochs=args.head_epochs,
        head_lr=args.head_lr,
        epochs=args.epochs,
        lr=args.lr,
        seed=args.seed,
        mixed_precision=args.mixed_precision,
        workers=args.workers,
        limit=args.limit,
        aux_diagnosis=args.aux_diagnosis,
    )
    df = read_datasets(args.data_dir, args.sets)
    check_no_leak(df)
    train = df[df["split"] == "train"].reset_index(drop=True)
    if args.manifest:  # the GPU pack ships a chosen subset; train on exactly that
        keep = set(Path(args.manifest).read_text().split())
        train = train[train["image_id"].isin(keep)].reset_index(drop=True)
    if config.limit:
        train = train.sample(n=min(config.limit, len(train)), random_state=config.seed)
        train = train.reset_index(drop=True)
    init = Path(args.init_weights) if args.init_weights else imagenet_weights()
    tr.log(tr.steps_summary(len(train), config))
    if config.mode == "head":
        cache = args.out / "embeddings-train.npz"
        classifier, history = tr.train_head(train, config, init, cache)
    else:
        classifier, history = tr.train_finetune(train, config, init)
    info = {
        "config": config.to_json(),
        "command": "python -m model_training " + shlex.join(sys.argv[1:]),
        "data": describe(train),
        "weights_source": WEIGHTS_SOURCE,
        "init_weights": init.name,
        "backend": __import__("keras").backend.backend(),
    }
    tr.write_run(args.out, classifier, history, info)
    tr.log(f"run written to {args.out}")
    return 0


def cmd_sweep(args: argparse.Namespace) -> int:
    """Train several recipes on one decoded data set, keep the best on validation."""
    from model_training import train as tr
    from model_training.data import check_no_leak, describe, read_datasets
    from model_training.sweep import run_sweep
    from model_training.weights import WEIGHTS_SOURCE, imagenet_weights

    base = tr.TrainConfig(batch_size=args.batch_size, seed=args.seed, workers=args.workers,
                          mixed_precision=args.mixed_precision)  # fmt: skip
    variants = json.loads(Path(args.variants).read_text())
    if args.variant_overrides:
        extra = json.loads(args.variant_overrides)
        variants = [{**v, **extra} for v in variants]
    df = read_datasets(args.data_dir, args.sets)
    check_no_leak(df)
    train = df[df["split"] == "train"].reset_index(drop=True)
    valid = df[df["split"] == "valid"].reset_index(drop=True)
    if args.limit:
        train = train.sample(n=min(args.limit, len(train)), random_state=args.seed)
        valid = valid.sample(n=min(args.limit, len(valid)), random_state=args.seed)
        train, valid = train.reset_index(drop=True), valid.reset_index(drop=True)
    init = Path(args.init_weights) if args.init_weights else imagenet_weights()
    summary = run_sweep(train, valid, base, variants, init, args.out, args.time_budget)
    info = {
        "config": summary["best_config"],
        "command": "python -m model_training " + shlex.join(sys.argv[1:]),
        "data": describe(train),
        "validation_data": describe(valid),
        "weights_source": WEIGHTS_SOURCE,
        "init_weights": init.name,
        "backend": __import__("keras").backend.backend(),
        "sweep": {k: v for k, v in summary.items() if k != "best_config"},
    }
    (args.out / "run.json").write_text(json.dumps(info, indent=2, sort_keys=True, default=str))
    return 0


def cmd_loso(args: argparse.Namespace) -> int:
    """Leave-one-source-out jobs (model_training.loso): train without a set, score it."""
    from model_training import train as tr
    from model_training.data import check_no_leak, read_datasets
    from model_training.loso import run_plan
    from model_training.weights import WEIGHTS_SOURCE, imagenet_weights

    base = tr.TrainConfig(batch_size=args.batch_size, seed=args.seed, workers=args.workers,
                          mixed_precision=args.mixed_precision)  # fmt: skip
    jobs = json.loads(Path(args.plan).read_text())
    df = read_datasets(args.data_dir, args.sets)
    check_no_leak(df)
    if args.limit:  # smoke run: a few images of each set and split
        df = df.groupby(["dataset", "split"], group_keys=False).head(args.limit)
    init = Path(args.init_weights) if args.init_weights else imagenet_weights()
    provenance = {
        "command": "python -m model_training " + shlex.join(sys.argv[1:]),
        "weights_source": WEIGHTS_SOURCE,
        "init_weights": init.name,
        "backend": __import__("keras").backend.backend(),
    }
    run_plan(df, jobs, base, init, args.out, args.deadline, provenance)
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    """Rebuild the classifier here (TensorFlow), load a run's weights, export the artifact."""
    from model_training.export import base_metadata, export_artifact, prior_correction
    from model_training.model import build_classifier
    from model_training.train import load_weight_shards

    run = json.loads((args.run / "run.json").read_text())
    config = run["config"]
    model = build_classifier(tuple(config["input_size"]), config["dropout"])
    load_weight_shards(model, args.run / "weights")
    history = json.loads((args.run / "history.json").read_text())
    bias = prior_correction(run["data"], config.get("domain_repeat", {}))
    metadata = base_metadata(
        model,
        version=args.version,
        logit_bias=bias,
        logit_bias_rule=(
            "log(pi / (1 - pi)) with pi the malignant share of the training epoch: undoes the "
            "class-balanced loss weights (derived from training data, not validation)"
        ),
        training={
            "command": run["command"],
            "export_command": "python -m model_training " + shlex.join(sys.argv[1:]),
            "recipe": config["mode"],
            "config": config,
            "data": run["data"],
            "backend": run.get("backend"),
            "history": history,
        },
        weights_source=run["weights_source"],
    )
    export_artifact(model, args.out, metadata)
    print(f"exported {args.out}")
    if args.fast_data_dir is not None:
        args.artifact, args.data_dir = args.out, args.fast_data_dir
        return cmd_export_fast(args)
    return 0


def cmd_soup(args: argparse.Namespace) -> int:
    """Average the weights of two artifacts into a new one."""
    from model_training.soup import soup

    out = soup(args.a, args.b, args.alpha, args.out)
    print(f"{out}: (1 - {args.alpha}) * {args.a} + {args.alpha} * {args.b}; refit it with "
          "evaluate, fit-gates and export-fast before serving")  # fmt: skip
    return 0


def cmd_reexport(args: argparse.Namespace) -> int:
    """Rewrite an artifact's SavedModel with the current exporter."""
    from model_training.reexport import reexport

    record = reexport(args.artifact)
    print(f"{args.artifact}: SavedModel re-exported, {record['variables_copied']} variables, "
          f"outputs within {max(record['max_abs_difference_on_probe'].values()):.1e} of the "
          "old ones; refit with fit-gates and export-fast")  # fmt: skip
    return 0


def cmd_finetune_top(args: argparse.Namespace) -> int:
    """Fine-tune the top blocks on cached mid-level features; report against the start."""
    from model_training import top_finetune
    from model_training.data import check_no_leak, read_datasets
    from model_training.export import read_metadata
    from model_training.preprocessing import image_to_input

    config = top_finetune.TopConfig(
        split=args.split,
        train_after=args.train_after or args.split,
        lr=args.lr,
        epochs=args.epochs,
        views=args.views,
        seed=args.seed,
        ignore_diagnoses=tuple(args.ignore_diagnoses),
    )
    df = read_datasets(args.data_dir, args.sets)
    check_no_leak(df)
    if args.limit:  # smoke run: a few images of each set and split
        df = df.groupby(["dataset", "split"], group_keys=False).head(args.limit)
    meta = read_metadata(args.artifact)
    size = (int(meta["input"]["height"]), int(meta["input"]["width"]))
    report = top_finetune.run(
        args.artifact, df, config, args.out, lambda path: image_to_input(path, size), args.export_to
    )
    print("\n".join(top_finetune.summary_lines(report)))
    print(f"report: {top_finetune.report_path(args.out, config)}")
    return 0


def cmd_export_fast(args: argparse.Namespace) -> int:
    """Derive the fast (OpenVINO) model, measure it against TensorFlow, record it."""
    from model_training.export_fast import export_fast_from_data, summary
    from model_training.export_int8 import Int8Options

    runtimes = export_fast_from_data(
        args.artifact,
        args.data_dir,
        args.sets,
        limit=args.limit,
        bench_seconds=args.bench_seconds,
        int8_calibration=args.int8_calibration,
        int8_options=Int8Options(
            max_iterations=args.int8_max_iterations, ranking_subset=args.int8_ranking_subset
        ),
    )
    print(summary(runtimes))
    chosen = runtimes["openvino"]
    print(
        f"{args.artifact}: fast runtime openvino {chosen['precision']}"
        if chosen["passed"]
        else f"{args.artifact}: no fast model passed the guard; the server stays on TensorFlow"
    )
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    """Score an artifact on validation; calibrate, choose threshold and tiers; write reports."""
    import tempfile

    from model_training.evaluate import evaluate_artifact

    report_dir = args.report_dir
    if args.no_update and report_dir is None:
        report_dir = Path(tempfile.mkdtemp(prefix="evaluate-"))
    evaluate_artifact(
        args.artifact,
        args.data_dir,
        args.sets,
        target_sensitivity=args.target_sensitivity,
        tta=args.tta,
        update_metadata=not args.no_update,
        reuse_predictions=args.reuse_predictions,
        calibration=args.calibration,
        thresholds=args.thresholds,
        assignment=args.domain_assignment,
        report_dir=report_dir,
    )
    print(f"report (metrics.json, MODEL_CARD.md, plots): {report_dir or args.artifact}")
    return 0


def _fast_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--sets", type=_sets, default=["isic2017", "ham10000", "pad-ufes-20"])
    p.add_argument("--limit", type=int, default=0, help="at most N validation images per set")
    p.add_argument("--bench-seconds", type=float, default=5.0, help="per throughput figure")
    p.add_argument(
        "--int8-calibration", type=int, default=120,
        help="training images per set to calibrate the int8 (NNCF) variant on; 0: no int8",
    )  # fmt: skip
    p.add_argument(
        "--int8-max-iterations", type=int, default=12,
        help="most groups of quantisers NNCF's accuracy control may revert to float",
    )  # fmt: skip
    p.add_argument(
        "--int8-ranking-subset", type=int, default=100,
        help="validation images NNCF ranks the quantisers on",
    )  # fmt: skip


def build_parser() -> argparse.ArgumentParser:
    """The CLI's argument parser."""
    parser = argparse.ArgumentParser(prog="python -m model_training", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train a classifier into a run folder")
    p.add_argument("--data-dir", type=Path, default=DEFAULT_DATA)
    p.add_argument("--sets", type=_sets, default=["isic2017", "ham10000", "pad-ufes-20"])
    p.add_argument("--mode", choices=["finetune", "head"], default="finetune")
    p.add_argument("--out", type=Path, required=True, help="run folder to write")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--head-epochs", type=int, default=2)
    p.add_argument("--head-lr", type=float, default=1e-3)
    p.add_argument("--epochs", type=int, default=15)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--mixed-precision", default="auto")
    p.add_argument("--workers", type=int, default=8)
    p.add_argument("--limit", type=int, default=0, help="smoke run on N images")
    p.add_argument(
        "--aux-diagnosis", type=float, default=0.0,
        help="weight of an auxiliary diagnosis loss (0: off; the served model is unchanged)",
    )  # fmt: skip
    p.add_argument("--init-weights", default="", help="ImageNet .npz (default: pinned cache)")
    p.add_argument("--manifest", default="", help="file of image_ids to train on (GPU pack)")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("sweep", help="train several recipes, keep the best on validation")
    p.add_argument("--data-dir", type=Path, default=DEFAULT_DATA)
    p.add_argument("--sets", type=_sets, default=["isic2017", "ham10000", "pad-ufes-20"])
    p.add_argument("--variants", required=True, help="JSON file: list of {name, field: value}")
    p.add_argument("--variant-overrides", default="", help="JSON merged into every variant")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--mixed-precision", default="auto")
    p.add_argument("--workers", type=int, default=8)
    p.add_argument("--limit", type=int, default=0)
    p.add_argument("--time-budget", type=float, default=330.0, help="seconds; stop new variants")
    p.add_argument("--init-weights", default="")
    p.set_defaults(func=cmd_sweep)

    p = sub.add_parser("loso", help="leave-one-source-out jobs: train without a set, score it")
    p.add_argument("--data-dir", type=Path, default=DEFAULT_DATA)
    p.add_argument("--sets", type=_sets, default=["isic2017", "ham10000", "pad-ufes-20"])
    p.add_argument("--plan", required=True, help="JSON file: list of {name, recipe, leave_out}")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--mixed-precision", default="auto")
    p.add_argument("--workers", type=int, default=8)
    p.add_argument("--limit", type=int, default=0, help="smoke run: N images per set and split")
    p.add_argument("--deadline", type=float, default=1e9, help="seconds; skip jobs past it")
    p.add_argument("--init-weights", default="")
    p.set_defaults(func=cmd_loso)

    p = sub.add_parser("export", help="export a run as SavedModel + metadata.json")
    p.add_argument("--run", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--version", default="1.0.0")
    p.add_argument(
        "--fast-data-dir", type=Path, default=None,
        help="also run export-fast on this data's validation split (run it again after "
        "evaluate: the recorded agreement is tied to the calibration)",
    )  # fmt: skip
    _fast_options(p)
    p.set_defaults(func=cmd_export)

    p = sub.add_parser(
        "export-fast",
        help="add the fast (OpenVINO) runtime to an artifact: agreement with TF on validation",
    )
    p.add_argument("--artifact", type=Path, required=True)
    p.add_argument("--data-dir", type=Path, default=DEFAULT_DATA)
    _fast_options(p)
    p.set_defaults(func=cmd_export_fast)

    p = sub.add_parser("soup", help="average the weights of two artifacts (same architecture)")
    p.add_argument("--a", type=Path, required=True, help="artifact whose metadata is kept")
    p.add_argument("--b", type=Path, required=True)
    p.add_argument("--alpha", type=float, default=0.5, help="weight of b")
    p.add_argument("--out", type=Path, required=True)
    p.set_defaults(func=cmd_soup)

    p = sub.add_parser(
        "finetune-top", help="fine-tune the top blocks on cached mid-level features (CPU)"
    )
    p.add_argument("--artifact", type=Path, required=True)
    p.add_argument("--data-dir", type=Path, default=DEFAULT_DATA)
    p.add_argument("--sets", type=_sets, default=["isic2017", "ham10000", "pad-ufes-20"])
    p.add_argument("--out", type=Path, required=True, help="folder for the cache and report.json")
    p.add_argument("--split", default="mixed8", help="layer whose output is cached")
    p.add_argument("--train-after", default="", help="train the layers after this one "
                   "(default: the split; 'embedding' trains the dense unit alone)")  # fmt: skip
    p.add_argument("--lr", type=float, default=2e-5)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--views", type=int, default=2, help="cached views per training image")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--limit", type=int, default=0, help="smoke run: N images per set and split")
    p.add_argument("--export-to", type=Path, default=None, help="write the candidate artifact")
    p.add_argument("--ignore-diagnoses", type=_sets, default=[],
                   help="diagnoses left out of the loss, e.g. akiec,ACK")  # fmt: skip
    p.set_defaults(func=cmd_finetune_top)

    p = sub.add_parser(
        "reexport", help="write an artifact's SavedModel again with this exporter (same weights)"
    )
    p.add_argument("--artifact", type=Path, required=True)
    p.set_defaults(func=cmd_reexport)

    p = sub.add_parser("evaluate", help="validate, calibrate and report on an artifact")
    p.add_argument("--artifact", type=Path, required=True)
    p.add_argument("--data-dir", type=Path, default=DEFAULT_DATA)
    p.add_argument("--sets", type=_sets, default=["isic2017", "ham10000", "pad-ufes-20"])
    p.add_argument("--target-sensitivity", type=float, default=0.90)
    p.add_argument("--tta", action="store_true", help="also measure flip test-time augmentation")
    p.add_argument(
        "--no-update", action="store_true",
        help="leave the artifact untouched (metadata.json, calibration, metrics.json, plots, "
        "model card); the report goes to --report-dir (default: a new temporary folder)",
    )  # fmt: skip
    p.add_argument(
        "--report-dir", type=Path, default=None,
        help="where metrics.json, the predictions, plots and the model card go (default: the "
        "artifact)",
    )  # fmt: skip
    p.add_argument(
        "--reuse-predictions", action="store_true",
        help="re-use this artifact's cached validation logits and embeddings",
    )  # fmt: skip
    p.add_argument(
        "--calibration", choices=["single", "per-domain"], default="single",
        help="one temperature, or one scaling per photo domain (domain read off the network's "
        "mid-level features)",
    )  # fmt: skip
    p.add_argument(
        "--thresholds", choices=["shared", "per-domain"], default="shared",
        help="one threshold (sensitivity averaged over the domains), or one per inferred domain "
        "(each domain's sensitivity; needs --calibration per-domain)",
    )  # fmt: skip
    p.add_argument(
        "--domain-assignment", choices=["mixture", "hard"], default="mixture",
        help="per-domain calibration: weight the domains' scalings by the domain probability, "
        "or give each photo its inferred domain's scaling (docs/calibration.md, candidate H)",
    )  # fmt: skip
    p.set_defaults(func=cmd_evaluate)

    # Listed for --help; parsed by model_training.gates (see main()).
    sub.add_parser("fit-gates", help="fit the quality gate, the skin gate and the artefact notes")
    sub.add_parser("compare", help="evaluated artifacts on validation, alone and as ensembles")
    sub.add_parser("loso-report", help="leave-one-source-out table from a loso run")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point."""
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["fit-gates"]:  # the gates' own parser (model_training.gates)
        from model_training.gates.cli import main as gates_main

        code: int = gates_main(argv[1:])
        return code
    if argv[:1] == ["compare"]:  # its own parser (model_training.compare)
        from model_training.compare import main as compare_main

        code = compare_main(argv[1:])
        return code
    if argv[:1] == ["loso-report"]:  # its own parser (model_training.selection)
        from model_training.selection import main as report_main

        code = report_main(argv[1:])
        return code
    args = build_parser().parse_args(argv)
    if args.command in ("train", "sweep", "loso"):
        args.out.mkdir(parents=True, exist_ok=True)
    result: int = args.func(args)
    return result


if __name__ == "__main__":
    raise SystemExit(main())
