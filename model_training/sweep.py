"""Train several configurations on one decoded data set; keep the best on validation.

Made for the lent GPU, where a whole fine-tuning run takes about a minute: one call trains a
few recipes, scores each (and their uniform weight average, a "model soup", Wortsman et al.
2022: all start from the same ImageNet weights) on the validation splits, and returns only
the winner's weights. Selection uses validation data only; the test splits are never seen.
"""

from __future__ import annotations

import json
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import keras
import numpy as np
import pandas as pd

from model_training import train as tr
from model_training.metrics import auc_by_set
from model_training.model import build_classifier


def score_valid(
    classifier: keras.Model, images: np.ndarray, valid: pd.DataFrame
) -> dict[str, float | None]:
    """ROC-AUC per validation set and their mean (the selection criterion)."""
    if len(valid) == 0:
        return {"mean": None}
    logits = np.asarray(classifier.predict(images.astype("float32"), batch_size=256, verbose=0))
    out = auc_by_set(valid["label"].to_numpy(), logits.reshape(-1), valid["dataset"].tolist())
    scores = [v for v in out.values() if v is not None]
    out["mean"] = float(np.mean(scores)) if scores else None
    return out


def run_sweep(
    train: pd.DataFrame,
    valid: pd.DataFrame,
    base: tr.TrainConfig,
    variants: list[dict[str, Any]],
    imagenet_npz: Path,
    out: Path,
    time_budget: float,
) -> dict[str, Any]:
    """Train each variant, score it, write the best so far to ``out`` after every step."""
    t_start = time.time()
    policy = tr.setup_precision(base.mixed_precision)
    tr.log(f"backend {keras.backend.backend()}, dtype policy {policy}")
    aux = [float(v.get("aux_diagnosis", base.aux_diagnosis)) for v in variants]
    data = tr.prepare_training_data(train, base, with_diagnoses=max(aux, default=0.0) > 0)
    if len(valid) == 0:  # nothing to select with: train the first recipe only
        tr.log("no validation images: training the first variant only")
        variants = variants[:1]
    valid_images = tr.load_images(valid["path"].tolist(), base.input_size, base.workers)
    results: list[dict[str, Any]] = []
    weights: list[list[np.ndarray]] = []
    best: dict[str, Any] = {"score": -1.0}
    classifier: keras.Model | None = None
    for variant in variants:
        if results and time.time() - t_start > time_budget:
            tr.log(f"time budget reached: skipping {variant.get('name')}")
            continue
        fields = {k: v for k, v in variant.items() if k != "name"}
        config = replace(base, **fields)
        t0 = time.time()
        classifier, history = tr.fit_finetune(data, config, imagenet_npz)
        scores = score_valid(classifier, valid_images, valid)
        entry = {"name": variant["name"], "config": config.to_json(), "valid_auc": scores,
                 "seconds": time.time() - t0,
                 "train_images_per_second": history.get("train_images_per_second")}  # fmt: skip
        results.append(entry)
        tr.log(f"{variant['name']}: validation AUC {scores}")
        weights.append([np.asarray(w) for w in classifier.get_weights()])
        if (scores["mean"] or 0.0) > best["score"]:
            best = {"score": scores["mean"], "name": variant["name"], "config": config}
            tr.write_run(out, classifier, history, {"config": config.to_json()})
    if len(weights) > 1 and classifier is not None:
        soup = build_classifier(base.input_size, base.dropout)
        soup.set_weights([np.mean(ws, axis=0) for ws in zip(*weights, strict=True)])
        scores = score_valid(soup, valid_images, valid)
        results.append({"name": "soup", "members": [r["name"] for r in results],
                        "valid_auc": scores})  # fmt: skip
        tr.log(f"soup of {len(weights)}: validation AUC {scores}")
        if (scores["mean"] or 0.0) > best["score"]:
            best = {"score": scores["mean"], "name": "soup", "config": best["config"]}
            tr.save_weight_shards(soup, out / "weights")
    summary = {"best": best["name"], "best_score": best["score"], "results": results,
               "selection": "highest mean validation ROC-AUC over the validation sets"}  # fmt: skip
    (out / "sweep.json").write_text(json.dumps(summary, indent=2, default=str))
    best_config: tr.TrainConfig = best["config"]
    summary["best_config"] = best_config.to_json()
    return summary
