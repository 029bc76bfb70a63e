"""Gate latency: what the quality and skin (OOD) gates add per photo, without the model.

Builds the artifact's gates exactly as the server does (``app.gates.build_gates`` on its
``metadata.json``) and times, per photo: the quality gate on a real fixture photo as uploaded,
and the skin gate (plus its artefact notes, where the gate has them) on one feature vector of
the size the gate reads. Median and 95th percentile of ``-n`` calls after a warm-up.

    .venv/bin/python benchmarks/bench_gates.py [MODEL_DIR] [-n 300] [--with-tensorflow]

The script uses only the ``Gates`` interface (``quality.check(img)``, ``ood.check(features)``),
so it also runs on older checkouts to give the "before" figure.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parent.parent
PHOTO = REPO / "tests" / "fixtures" / "images" / "pad-ufes-20_nev_PAT_1107_427_352.jpg"


def timed(fn: Callable[[], object], n: int) -> dict[str, float]:
    """Median and p95 wall time of ``fn`` in milliseconds."""
    for _ in range(10):
        fn()
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1000.0)
    times.sort()
    return {"median_ms": statistics.median(times), "p95_ms": times[int(0.95 * (n - 1))]}


def main() -> int:
    """Print the gates' timings as JSON."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model_dir", nargs="?", type=Path, default=REPO / "models" / "default")
    parser.add_argument("-n", type=int, default=300)
    parser.add_argument("--image", type=Path, default=PHOTO)
    parser.add_argument(
        "--with-tensorflow",
        action="store_true",
        help="import TensorFlow first, as the old gates (and the server) did: it changes how "
        "the C heap returns memory, and the quality gate's half-megabyte temporaries with it "
        "(about 1.2 ms without, 0.8 ms with, on the same code)",
    )
    args = parser.parse_args()
    if args.with_tensorflow:
        import tensorflow  # noqa: F401

    from app.gates import build_gates
    from app.metadata import ModelMetadata
    from model_training.preprocessing import decode_image

    meta = ModelMetadata.from_dict(json.loads((args.model_dir / "metadata.json").read_text()))
    gates = build_gates(meta, args.model_dir)
    img: Image.Image = decode_image(args.image.read_bytes())
    out: dict[str, object] = {"model_dir": str(args.model_dir), "photo": img.size}
    if gates.quality is not None:
        quality = gates.quality
        out["quality_gate"] = timed(lambda: quality.check(img), args.n)
    if gates.ood is not None:
        ood = gates.ood
        dim = int(getattr(getattr(ood, "gate", None), "dim", 0) or ood._detector.dim)  # type: ignore[attr-defined]
        x = np.random.default_rng(0).normal(size=(1, dim)).astype(np.float32)

        def skin() -> None:
            ood.check(x)
            if hasattr(ood, "notes"):
                ood.notes(x)

        out["skin_or_ood_gate"] = {"dim": dim, **timed(skin, args.n)}
    print(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
