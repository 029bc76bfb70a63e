"""How the shipped model answers black-and-white copies of the validation photos.

The evidence for the quality gate's colour check (README, "Photo-quality gate"): every
validation image, as it is, drained of all colour (a black-and-white filter), and with 30%
of its saturation (muted, which the gate lets through), run through the server's fast runtime
(OpenVINO) and answered as the server answers (per-domain calibration and thresholds).

    .venv/bin/python docs/quality/black_and_white.py --artifact models/default \
        --data-dir ../shared/data
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image, ImageEnhance

from model_training import fastmodel
from model_training.data import read_datasets
from model_training.metrics import roc_auc
from model_training.preprocessing import load_image_file, resize_to_input
from model_training.quality import assess_quality
from model_training.served import ServedAnswer

VARIANTS: dict[str, Callable[[Image.Image], Image.Image]] = {
    "as taken": lambda im: im,
    "black and white": lambda im: im.convert("L").convert("RGB"),
    "30% saturation": lambda im: ImageEnhance.Color(im).enhance(0.3),
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--artifact", type=Path, default=Path("models/default"))
    p.add_argument("--data-dir", type=Path, default=Path("../shared/data"))
    args = p.parse_args()
    meta = json.loads((args.artifact / "metadata.json").read_text())
    served = ServedAnswer.of(args.artifact, meta)
    model, _ = fastmodel.derive_openvino(args.artifact)
    compiled = fastmodel.compile_openvino(model, "bf16")
    request = compiled.create_infer_request()
    names = [o.get_any_name() for o in compiled.outputs]
    size = (int(meta["input"]["height"]), int(meta["input"]["width"]))
    df = read_datasets(args.data_dir)
    val = df[df["split"] == "valid"].reset_index(drop=True)
    y, domain = val["label"].to_numpy(), val["domain"].astype(str).to_numpy()
    print(f"{len(val)} validation images; thresholds as served; quality gate of the artifact")
    columns = "ROC-AUC | sensitivity | specificity | answer changed | gate refuses"
    print(f"| photos | domain | {columns} |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    base: np.ndarray | None = None
    for variant, change in VARIANTS.items():
        outputs: dict[str, list[np.ndarray]] = {n: [] for n in names}
        refused = []
        for start in range(0, len(val), 8):
            imgs = [change(load_image_file(path)) for path in val["path"][start : start + 8]]
            refused += [bool(assess_quality(im, meta.get("quality") or {})) for im in imgs]
            x = np.stack([resize_to_input(im, size) for im in imgs])
            result = request.infer({0: x})
            for out, name in zip(compiled.outputs, names, strict=True):
                outputs[name].append(np.asarray(result[out]))
        joined = {n: np.concatenate(v) for n, v in outputs.items()}
        prob, threshold = served.answer(joined["logit"].reshape(-1), joined)
        malignant = prob >= threshold
        base = malignant if base is None else base
        gate = np.asarray(refused)
        for name in ("dermoscopy", "phone"):
            m = domain == name
            sens, spec = malignant[m & (y == 1)].mean(), 1 - malignant[m & (y == 0)].mean()
            changed, refuses = np.mean(malignant[m] != base[m]), gate[m].mean()
            print(
                f"| {variant} | {name} | {roc_auc(y[m], prob[m]):.3f} | {sens:.3f} | {spec:.3f} "
                f"| {changed:.1%} | {refuses:.1%} |"
            )


if __name__ == "__main__":
    main()
