"""Shortcut checks: does an artefact that says nothing about the lesion move the answer?

PAD-UFES-20 photos sometimes carry surgical-marker ink circles drawn around lesions a doctor
found suspicious: a shortcut a model can learn ("ink means malignant"). Counting marked
images is unreliable (thin dark lines, dark lesions of the same hue), so this measures the
effect directly: draw a marker-like ellipse around the centre of each validation photo and
compare the model's answers with and without it. A model that learned the shortcut raises
its probabilities and flips benign answers to malignant.

    python -m model_training.artefacts --artifact models/default
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from model_training.data import read_datasets

INK_COLOURS = ((88, 60, 150), (40, 60, 150))  # gentian-violet purple, blue marker


def draw_ink_ring(img: Image.Image, colour: tuple[int, int, int], seed: int) -> Image.Image:
    """A hand-drawn-looking marker ellipse around the centre (where the lesion usually is)."""
    rng = np.random.default_rng(seed)
    out = img.copy()
    w, h = out.size
    draw = ImageDraw.Draw(out)
    rx, ry = w * rng.uniform(0.32, 0.42), h * rng.uniform(0.32, 0.42)
    cx, cy = w / 2 + rng.uniform(-0.04, 0.04) * w, h / 2 + rng.uniform(-0.04, 0.04) * h
    width = max(2, round(min(w, h) * 0.012))
    draw.ellipse((cx - rx, cy - ry, cx + rx, cy + ry), outline=colour, width=width)
    return out


def ink_shortcut_check(
    artifact: Path, data_dir: Path, sets: Sequence[str] = ("pad-ufes-20", "isic2017")
) -> dict[str, Any]:
    """Answers with vs. without a drawn marker ring, per validation set."""
    from model_training.calibration import calibrate
    from model_training.export import read_metadata
    from model_training.preprocessing import load_image_file
    from model_training.runner import Embedder

    meta = read_metadata(artifact)
    bias, temperature = float(meta.get("logit_bias", 0.0)), float(meta.get("temperature", 1.0))
    threshold = float(meta["threshold"])
    df = read_datasets(data_dir, sets)
    df = df[df["split"] == "valid"].reset_index(drop=True)
    originals = [load_image_file(p) for p in df["path"]]
    embed = Embedder(artifact)  # the SavedModel is loaded once for every pass below
    base, _ = embed(originals, len(originals), "without ink")
    p0 = calibrate(base, bias, temperature)
    result: dict[str, Any] = {"method": __doc__.split("\n\n")[1].replace("\n", " ")}
    for colour in INK_COLOURS:
        marked = [draw_ink_ring(im, colour, i) for i, im in enumerate(originals)]
        inked, _ = embed(marked, len(marked), f"ink rgb{colour}")
        p1 = calibrate(inked, bias, temperature)
        per_set = {}
        for name in sorted(df["dataset"].unique()):
            m = (df["dataset"] == name).to_numpy()
            benign0 = p0[m] < threshold
            per_set[str(name)] = {
                "n": int(m.sum()),
                "mean_logit_change": float(np.mean(inked[m] - base[m])),
                "mean_probability_change": float(np.mean(p1[m] - p0[m])),
                "benign_to_malignant": float(np.mean(p1[m][benign0] >= threshold))
                if benign0.any()
                else None,
                "malignant_to_benign": float(np.mean(p1[m][~benign0] < threshold))
                if (~benign0).any()
                else None,
            }
        result[f"ink_rgb_{'_'.join(map(str, colour))}"] = per_set
    return result


def main(argv: Sequence[str] | None = None) -> int:
    """Run the check and store it in the artifact's metrics.json (key ``shortcut_checks``)."""
    parser = argparse.ArgumentParser(prog="python -m model_training.artefacts")
    parser.add_argument("--artifact", type=Path, required=True)
    parser.add_argument(
        "--data-dir", type=Path, default=Path(os.environ.get("SHARED_DATA_DIR", "../shared/data"))
    )
    args = parser.parse_args(argv)
    result = ink_shortcut_check(args.artifact, args.data_dir)
    print(json.dumps(result, indent=2))
    metrics_path = args.artifact / "metrics.json"
    if metrics_path.exists():
        metrics = json.loads(metrics_path.read_text())
        metrics["shortcut_checks"] = {"ink_marker_ring": result}
        metrics_path.write_text(json.dumps(metrics, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
