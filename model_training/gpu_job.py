"""The GPU round trip in one call: pack here, train there (Keras on JAX), export here.

    python -m model_training.gpu_job pack --data-dir ../shared/data      # writes .gpu/
    # device call: carry [".gpu"], command: bash .gpu/remote.sh
    python -m model_training.gpu_job unpack --files <fetched dir> --run runs/gpu
    python -m model_training export --run runs/gpu --out models/default
    python -m model_training evaluate --artifact models/default

The lent machine has no network and no TensorFlow: everything it needs travels in ``.gpu``
(at most 64 MiB with the working tree): the training images as stored zips, the ImageNet
initialisation as per-channel int8 (18 MB instead of 87 MB), and wheels for Keras. The
weights come back as float16 shards under 16 MiB each (the download limit) and are rebuilt
as float32 here.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import numpy as np

from model_training.data import DEFAULT_SETS, read_dataset
from model_training.weights import imagenet_weights, quantize_int8

CARRY_LIMIT = 64 * 2**20
PER_FILE_OVERHEAD = 1024  # the transfer's cost per file in the tree
ZIP_MEMBER_OVERHEAD = 128  # headers of one member inside a stored zip
WHEELS = ("keras==3.15.1", "namex==0.1.0", "optree==0.18.0")
WHEEL_PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64")


def tree_size(repo: Path) -> int:
    """Bytes of the working tree that travels (tracked + untracked, not ignored)."""
    out = subprocess.run(
        ["git", "ls-files", "-co", "--exclude-standard", "-z"],
        cwd=repo, capture_output=True, check=True,
    ).stdout  # fmt: skip
    files = [repo / f.decode() for f in out.split(b"\0") if f]
    return sum(f.stat().st_size + PER_FILE_OVERHEAD for f in files if f.is_file())


def fetch_wheels(dest: Path) -> None:
    """cp312 manylinux wheels of Keras and the two packages the GPU image lacks."""
    dest.mkdir(parents=True, exist_ok=True)
    for spec in WHEELS:
        cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps"]
        cmd += ["--only-binary=:all:", "--python-version", "3.12", "--implementation", "cp"]
        for platform in WHEEL_PLATFORMS:
            cmd += ["--platform", platform]
        subprocess.run([*cmd, "-d", str(dest), spec], check=True)


def choose_images(
    data_dir: Path, sets: list[str], budget: int, seed: int
) -> tuple[dict[str, list[str]], dict[str, list[str]]]:
    """Split the training images into the main pack (within ``budget``) and the rest.

    Every malignant and every non-nevus image goes into the main pack; HAM10000 nevi (the
    majority class) fill what is left, at random; the remaining nevi travel in a second,
    earlier call to the same warm machine (see REMOTE), so normally nothing is left out.
    """
    rng = np.random.default_rng(seed)
    chosen: dict[str, list[str]] = {}
    sizes: dict[str, int] = {}
    optional: list[tuple[str, str]] = []
    for name in sets:
        df = read_dataset(data_dir / name, name)
        df = df[df["split"] == "train"]
        for row in df.itertuples():
            sizes[str(row.image_id)] = Path(str(row.path)).stat().st_size + ZIP_MEMBER_OVERHEAD
        is_nevus = df["diagnosis"].astype(str).str.lower().isin({"nv", "nevus", "nev"})
        thin = is_nevus & (name == "ham10000")
        chosen[name] = df.loc[~thin, "image_id"].astype(str).tolist()
        optional += [(name, str(i)) for i in df.loc[thin, "image_id"]]
    rest: dict[str, list[str]] = {name: [] for name in sets}
    used = sum(sizes[i] for ids in chosen.values() for i in ids)
    for k in rng.permutation(len(optional)):
        name, image_id = optional[k]
        if used + sizes[image_id] > budget:
            rest[name].append(image_id)
            continue
        chosen[name].append(image_id)
        used += sizes[image_id]
    return chosen, rest


def write_set_zip(
    data_dir: Path, name: str, image_ids: list[str], dest: Path, csv_name: str = "labels.csv"
) -> int:
    """One stored (uncompressed: JPEGs do not shrink) zip per set with a filtered labels CSV."""
    import pandas as pd

    labels = pd.read_csv(data_dir / name / "labels.csv", dtype={"image_id": str})
    keep = set(image_ids)
    labels = labels[labels["image_id"].isin(keep)]
    with zipfile.ZipFile(dest, "w", compression=zipfile.ZIP_STORED) as zf:
        zf.writestr(f"{name}/{csv_name}", labels.to_csv(index=False))
        df = read_dataset(data_dir / name, name)
        for row in df[df["image_id"].isin(keep)].itertuples():
            path = Path(str(row.path))
            zf.write(path, f"{name}/images/{path.name}")
    return dest.stat().st_size


REMOTE = """#!/usr/bin/env bash
# Runs on the lent GPU machine (no network, no TensorFlow): train with Keras on JAX.
set -euo pipefail
cd "$(dirname "$0")/.."
T0=$(date +%s)
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
if [ -z "${{SKIP_WHEELS:-}}" ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .gpu/wheels/*.whl
fi
export PYTHONPATH=/tmp/site:$PWD KERAS_BACKEND=jax PYTHONUNBUFFERED=1
export XLA_PYTHON_CLIENT_MEM_FRACTION=0.85
# Jobs of the same shapes (a loso plan) reuse compiled XLA programs instead of recompiling.
export JAX_COMPILATION_CACHE_DIR=/tmp/jax-cache JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS=0
mkdir -p /tmp/data && for z in .gpu/data/*.zip; do python3 -m zipfile -e "$z" /tmp/data; done
# The rest of the images arrive in an earlier call (.gpu-extra, stashed in /tmp/stash) when
# the machine stayed warm; without them training goes on with the main pack.
for z in /tmp/stash/*.zip; do
    if [ -e "$z" ]; then python3 -m zipfile -e "$z" /tmp/data; fi
done
for f in /tmp/data/*/labels-*.csv; do
    if [ -e "$f" ]; then tail -n +2 "$f" >> "$(dirname "$f")/labels.csv"; rm "$f"; fi
done
wc -l /tmp/data/*/labels.csv
echo "setup took $(( $(date +%s) - T0 ))s"
# A loso plan writes straight into $OUT, so a run cut short still returns its finished jobs.
RUN=/tmp/run; if [ "{command}" = loso ]; then RUN="$OUT/run"; fi
PLANS="{plans}"
if [ -n "$PLANS" ]; then
    # One loso process per plan, at once: host-side augmentation is bound by one process's
    # interpreter lock (about 4 of 16 cores), so processes, not threads, fill the machine.
    # GPU memory is taken as needed (no preallocation), each process capped at a share.
    N=$(echo "$PLANS" | awk -F, '{{print NF}}')
    export XLA_PYTHON_CLIENT_PREALLOCATE=false
    export XLA_PYTHON_CLIENT_MEM_FRACTION=$(python3 -c "print(round(min(0.85, 1.6 / $N), 3))")
    K=0; PIDS=""
    for PLAN in ${{PLANS//,/ }}; do
        python3 -m model_training loso --data-dir /tmp/data --sets {sets} \\
            --init-weights .gpu/imagenet_int8.npz --out "/tmp/run-$K" \\
            --workers $(( 16 / N + 2 )) --plan "$PLAN" {train_args} ${{TRAIN_EXTRA:-}} \\
            2>&1 | sed -u "s/^/[$K] /" >> "$OUT/train.log" &
        PIDS="$PIDS $!"; K=$((K + 1))
    done
    # At most 8 files come back: the plans' predictions in one file, the log, a saved job's
    # weight shards and one tar of the rest (summaries, run.json, history.json). They are
    # gathered every few seconds, so a call cut short still returns every finished job.
    collect() {{
        local files d f
        files=$(ls /tmp/run-*/predictions.csv 2>/dev/null) || files=""
        if [ -n "$files" ]; then
            {{
                head -n 1 "$(echo "$files" | head -n 1)"
                for f in $files; do tail -n +2 "$f"; done
            }} > "$OUT/predictions.tmp"
            mv "$OUT/predictions.tmp" "$OUT/predictions.csv"
        fi
        for d in /tmp/run-*; do  # run.json is written after the shards
            if [ -e "$d/run.json" ] && [ ! -e "$d/.copied" ]; then
                for f in "$d"/weights/*.npz; do
                    cp "$f" "$OUT/$(basename "$d")-$(basename "$f")"
                done
                touch "$d/.copied"
            fi
        done
        (cd /tmp && tar -cf "$OUT/runs.tmp" run-*/*.json && mv "$OUT/runs.tmp" "$OUT/runs.tar")
    }}
    (while sleep 5; do collect || true; done) >/dev/null 2>&1 &
    COPIER=$!
    wait $PIDS || true
    kill $COPIER || true
    collect
    echo "total on device $(( $(date +%s) - T0 ))s"
    exit 0
fi
python3 -m model_training {command} --data-dir /tmp/data --sets {sets} \\
    --init-weights .gpu/imagenet_int8.npz --out "$RUN" --workers 14 \\
    {train_args} ${{TRAIN_EXTRA:-}} \\
    2>&1 | tee "$OUT/train.log"
if [ "$RUN" = /tmp/run ]; then
    cp /tmp/run/weights/*.npz /tmp/run/history.json /tmp/run/run.json "$OUT/"
    if [ -e /tmp/run/sweep.json ]; then cp /tmp/run/sweep.json "$OUT/"; fi
fi
echo "total on device $(( $(date +%s) - T0 ))s"
"""


def cmd_pack(args: argparse.Namespace) -> int:
    """Write .gpu/: int8 ImageNet weights, wheels, data zips within the carry budget."""
    out: Path = args.out
    if out.exists():
        shutil.rmtree(out)
    (out / "data").mkdir(parents=True)
    quantize_int8(imagenet_weights(), out / "imagenet_int8.npz")
    fetch_wheels(out / "wheels")
    (out / "remote.sh").write_text(
        REMOTE.format(
            command=args.command_remote,
            sets=",".join(args.sets),
            train_args=args.train_args,
            plans=",".join(args.parallel_plans),
        )
    )
    fixed = tree_size(Path.cwd()) + sum(
        f.stat().st_size + PER_FILE_OVERHEAD for f in out.rglob("*") if f.is_file()
    )
    budget = CARRY_LIMIT - fixed - args.margin_mb * 2**20 - len(args.sets) * 64 * 1024
    chosen, rest = choose_images(args.data_dir, args.sets, budget, args.seed)
    total = fixed
    for name, ids in chosen.items():
        total += write_set_zip(args.data_dir, name, ids, out / "data" / f"{name}.zip")
        print(f"{name}: {len(ids)} training images in the main pack")
    print(f"main carry {total / 2**20:.1f} MiB of {CARRY_LIMIT / 2**20:.0f} MiB")
    extra = Path(f"{out}-extra")
    if extra.exists():
        shutil.rmtree(extra)
    (extra / "data").mkdir(parents=True)
    extra_total = tree_size(Path.cwd())
    for name, ids in rest.items():
        if ids:
            zip_path = extra / "data" / f"{name}-extra.zip"
            extra_total += write_set_zip(args.data_dir, name, ids, zip_path, "labels-extra.csv")
            print(f"{name}: {len(ids)} more in {zip_path} (first call, stashed on the machine)")
    if args.command_remote in ("sweep", "loso"):  # both score validation: ship those splits
        for name in args.sets:
            df = read_dataset(args.data_dir / name, name)
            ids = df.loc[df["split"] == "valid", "image_id"].astype(str).tolist()
            zip_path = extra / "data" / f"{name}-valid.zip"
            extra_total += write_set_zip(args.data_dir, name, ids, zip_path, "labels-valid.csv")
            print(f"{name}: {len(ids)} validation images in {zip_path}")
    print(f"extra carry {extra_total / 2**20:.1f} MiB")
    if total > CARRY_LIMIT or extra_total > CARRY_LIMIT:
        print("over the carry limit", file=sys.stderr)
        return 1
    return 0


def cmd_unpack(args: argparse.Namespace) -> int:
    """Copy fetched shards, history and run.json into a run folder that ``export`` reads."""
    run: Path = args.run
    (run / "weights").mkdir(parents=True, exist_ok=True)
    # A train/sweep call returns flat files; a loso call returns run/ and run/weights/.
    # Parallel plans return run-K-weights-*.npz (into run-K/weights/, which ``export --run
    # <run>/run-K`` reads) and runs.tar (each plan's summaries, run.json and history.json).
    for f in sorted(p for p in Path(args.files).rglob("*") if p.is_file()):
        if f.name == "runs.tar":
            with tarfile.open(f) as tar:
                tar.extractall(run, filter="data")
        elif f.name.startswith("run-") and "-weights-" in f.name:
            prefix, shard = f.name.split("-weights-", 1)
            (run / prefix / "weights").mkdir(parents=True, exist_ok=True)
            shutil.copyfile(f, run / prefix / "weights" / f"weights-{shard}")
        else:
            target = run / "weights" / f.name if f.name.startswith("weights-") else run / f.name
            shutil.copyfile(f, target)
    print(f"run folder ready: {run}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point."""
    parser = argparse.ArgumentParser(prog="python -m model_training.gpu_job")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("pack")
    p.add_argument(
        "--data-dir", type=Path, default=Path(os.environ.get("SHARED_DATA_DIR", "../shared/data"))
    )
    p.add_argument("--sets", type=lambda v: v.split(","), default=list(DEFAULT_SETS))
    p.add_argument("--out", type=Path, default=Path(".gpu"))
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--margin-mb", type=int, default=2)
    p.add_argument("--command-remote", choices=["train", "sweep", "loso"], default="train")
    p.add_argument("--train-args", default="--epochs 20 --head-epochs 2 --batch-size 128")
    p.add_argument(
        "--parallel-plans",
        type=lambda v: v.split(","),
        default=[],
        help="loso plan files run as concurrent processes (--train-args then without --plan)",
    )
    p.set_defaults(func=cmd_pack)
    p = sub.add_parser("unpack")
    p.add_argument("--files", type=Path, required=True)
    p.add_argument("--run", type=Path, required=True)
    p.set_defaults(func=cmd_unpack)
    args = parser.parse_args(argv)
    code: int = args.func(args)
    return code


if __name__ == "__main__":
    raise SystemExit(main())
