"""Leave-one-source-out training and scoring: how a recipe does on a source it never saw.

Made for the lent GPU, where a fine-tuning run takes a minute or two. A plan is a list of jobs
``{"name", "recipe": {TrainConfig fields}, "leave_out": set name or null}``. Every training
image is decoded once; each job trains on the training split of every set except
``leave_out`` and then scores

- every image (train and valid) of the left-out set: the figure a user with a new camera,
  clinic or dermatoscope meets, and the one recipes are chosen by; and
- the validation split of every set.

Predictions are appended to ``predictions.csv`` after each job and ``loso.json`` is rewritten,
so a run cut short by its time limit still returns what it finished; a job that would not
finish before ``deadline`` seconds is skipped. A job with ``"save": true`` also writes its
weights (float16 shards) for ``export``.

A job ``{"name", "soup_of": [job a, job b], "alpha", "leave_out"}`` trains nothing: it scores
the weight average ``(1 - alpha) * a + alpha * b`` of two earlier jobs' networks (a model
soup, as ``model_training.soup`` writes for artifacts), so a soup's leave-one-source-out
figure needs no weights to leave the machine. It costs seconds and ignores the deadline; it
is skipped when a parent did not run.

A training job may name earlier jobs as ``"distil_from": [teacher, ...]`` (with a recipe
whose ``distil_weight`` is above 0): it then learns, besides the labels, the teachers' mean
logit on each of its training views (``model_training.distil``), so one network can carry
what an ensemble of several knows. ``"start_from": job`` begins it from that job's network
(a soup, say) instead of ImageNet's weights. Either is skipped when a job it names did not
run.
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
from model_training.data import class_weights, describe
from model_training.distil import assign_weights, is_weight
from model_training.metrics import auc_by_set
from model_training.model import build_classifier

PREDICTION_COLUMNS = ("job", "image_id", "dataset", "domain", "split", "label", "logit", "scored")


def job_rows(df: pd.DataFrame, leave_out: str | None) -> tuple[np.ndarray, np.ndarray]:
    """(training rows, scored rows) of ``df`` for one job, as boolean masks."""
    held = (df["dataset"] == leave_out).to_numpy()
    train = (df["split"] == "train").to_numpy() & ~held
    scored = held | (df["split"] == "valid").to_numpy()
    return train, scored


def subset_data(
    data: tr.TrainingData, mask: np.ndarray, domains: np.ndarray, config: tr.TrainConfig
) -> tr.TrainingData:
    """The decoded data restricted to ``mask`` (no copy of the images): weights balanced and
    domains repeated within the subset, so a job sees exactly what a run on it alone would."""
    rows = np.flatnonzero(mask)
    cw = class_weights(data.labels[rows])
    weights = np.where(data.labels == 1, cw[1], cw[0]).astype("float32")
    index = tr.epoch_index(domains[rows], config.domain_repeat)
    return tr.TrainingData(
        data.images, data.labels, weights, rows[index], data.diagnoses, data.dermoscopy
    )


def predict_logits(classifier: keras.Model, images: np.ndarray, chunk: int = 1024) -> np.ndarray:
    """Logits of uint8 images, converted to float in chunks (the whole set would not fit)."""
    out = [
        np.asarray(classifier.predict(images[i : i + chunk].astype("float32"), verbose=0))
        for i in range(0, len(images), chunk)
    ]
    return np.concatenate(out).reshape(-1)


def average_weights(
    a: dict[str, np.ndarray], b: dict[str, np.ndarray], alpha: float
) -> dict[str, np.ndarray]:
    """``(1 - alpha) * a + alpha * b`` per variable path; both must hold the same variables."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    if a.keys() != b.keys():
        raise ValueError(f"the networks differ in variables: {sorted(a.keys() ^ b.keys())[:5]}")
    out = {}
    for path, mine in a.items():
        if mine.shape != b[path].shape:
            raise ValueError(f"{path}: shapes {mine.shape} and {b[path].shape} differ")
        if not np.issubdtype(mine.dtype, np.floating):  # a dropout seed state: not a weight
            out[path] = mine
            continue
        out[path] = ((1.0 - alpha) * mine + alpha * b[path]).astype(mine.dtype)
    return out


def network_weights(model: keras.Model) -> dict[str, np.ndarray]:
    """Every weight of ``model`` (batch-norm statistics included) by its path, on the host."""
    return {v.path: np.array(v.numpy()) for v in model.variables if is_weight(v)}


def souped_classifier(
    parents: list[dict[str, np.ndarray]], alpha: float, config: tr.TrainConfig
) -> keras.Model:
    """A fresh classifier holding the weight average of two parents' networks."""
    classifier = build_classifier(config.input_size, config.dropout)
    assign_weights(classifier, average_weights(parents[0], parents[1], alpha))
    return classifier


def uses(job: dict[str, Any]) -> list[str]:
    """Earlier jobs whose networks this job needs: a soup's parents, a student's teachers and
    the network it starts from."""
    start = [job["start_from"]] if "start_from" in job else []
    return [*job.get("soup_of", []), *job.get("distil_from", []), *start]


def check_plan(jobs: list[dict[str, Any]], base: tr.TrainConfig) -> None:
    """Refuse a plan that would fail part-way (on the lent GPU, minutes into a call): repeated
    names, unknown recipe fields, a job built on one that does not come before it, teachers
    without a distillation weight or the reverse."""
    names = [job["name"] for job in jobs]
    if len(set(names)) != len(names):
        raise ValueError(f"job names repeat: {sorted(n for n in names if names.count(n) > 1)}")
    for k, job in enumerate(jobs):
        config = replace(base, **job.get("recipe", {}))  # unknown fields raise TypeError
        late = [name for name in uses(job) if name not in names[:k]]
        if late:
            raise ValueError(f"{job['name']}: {late} must be jobs that come before it")
        if bool(job.get("distil_from")) != (config.distil_weight > 0):
            raise ValueError(f"{job['name']}: distil_from and distil_weight > 0 go together")
        if "soup_of" in job and len(job["soup_of"]) != 2:
            raise ValueError(f"{job['name']}: a soup has two parents")


def past_deadline(elapsed: float, per_epoch: list[float], epochs: int, deadline: float) -> bool:
    """Would one more job of ``epochs`` epochs end after ``deadline`` seconds, at the slowest
    seconds per epoch seen so far? (Per epoch, not per job: a short job after a long one,
    a student of three epochs after its teachers of seven, still fits. The first job always
    runs: there is nothing to judge it by.)"""
    return bool(per_epoch) and elapsed + max(per_epoch) * epochs > deadline


def summarise_job(rows: pd.DataFrame, leave_out: str | None) -> dict[str, Any]:
    """ROC-AUC on the left-out set (all its images) and on each validation split."""
    summary: dict[str, Any] = {}
    if leave_out is not None:
        held = rows[rows["dataset"] == leave_out]
        summary["left_out_auc"] = auc_by_set(
            held["label"].to_numpy(), held["logit"].to_numpy(), held["dataset"].tolist()
        ).get(leave_out)
    valid = rows[rows["split"] == "valid"]
    summary["valid_auc"] = auc_by_set(
        valid["label"].to_numpy(), valid["logit"].to_numpy(), valid["dataset"].tolist()
    )
    return summary


def run_plan(
    df: pd.DataFrame,
    jobs: list[dict[str, Any]],
    base: tr.TrainConfig,
    imagenet_npz: Path | None,
    out: Path,
    deadline: float,
    provenance: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Run the jobs in order (see the module docstring); returns the summary. ``provenance``
    (command, weights source, ...) goes into the saved job's run.json for ``export``."""
    t_start = time.time()
    check_plan(jobs, base)
    out.mkdir(parents=True, exist_ok=True)
    policy = tr.setup_precision(base.mixed_precision)
    tr.log(f"backend {keras.backend.backend()}, dtype policy {policy}, {len(jobs)} job(s)")
    aux = max(float(j.get("recipe", {}).get("aux_diagnosis", base.aux_diagnosis)) for j in jobs)
    df = df.reset_index(drop=True)
    is_train = (df["split"] == "train").to_numpy()
    train_frame = df[is_train].reset_index(drop=True)
    data = tr.prepare_training_data(train_frame, base, with_diagnoses=aux > 0)
    train_domains = train_frame["domain"].to_numpy()
    score_images = tr.load_images(df["path"].tolist(), base.input_size, base.workers)
    summary: dict[str, Any] = {"jobs": [], "plan": jobs}
    predictions = out / "predictions.csv"
    if not predictions.exists():
        predictions.write_text(",".join(PREDICTION_COLUMNS) + "\n")
    per_epoch: list[float] = []  # seconds per epoch of each finished training job
    kept = {name for job in jobs for name in uses(job)}
    networks: dict[str, dict[str, np.ndarray]] = {}  # what later jobs use, on the host
    for job in jobs:
        elapsed = time.time() - t_start
        soup_of = list(job.get("soup_of", []))
        if not all(name in networks for name in uses(job)):
            tr.log(f"skipping {job['name']}: a job it builds on did not run")
            summary["jobs"].append({"name": job["name"], "skipped": True})
            continue
        config = replace(base, **job.get("recipe", {}))
        epochs = config.head_epochs + config.epochs
        if not soup_of and past_deadline(elapsed, per_epoch, epochs, deadline):
            tr.log(f"deadline: skipping {job['name']} ({elapsed:.0f}s gone)")
            summary["jobs"].append({"name": job["name"], "skipped": True})
            continue
        t0 = time.time()
        train_mask, scored = job_rows(df, job.get("leave_out"))
        train_mask &= tr.learned_rows(df, config.ignore_diagnoses)  # scored all the same
        history: dict[str, Any] = {}
        if soup_of:
            alpha = float(job.get("alpha", 0.5))
            classifier = souped_classifier([networks[n] for n in soup_of], alpha, config)
            tr.log(f"{job['name']}: weights of {soup_of[0]} and {soup_of[1]}, alpha {alpha}")
        else:
            subset = subset_data(data, train_mask[is_train], train_domains, config)
            tr.log(f"{job['name']}: {len(subset.index)} crops/epoch, "
                   f"leave out {job.get('leave_out')}")  # fmt: skip
            teachers = [networks[name] for name in job.get("distil_from", [])]
            start = networks[job["start_from"]] if "start_from" in job else None
            classifier, history = tr.fit_finetune(
                subset, config, imagenet_npz, teachers=teachers, start=start
            )
        if job["name"] in kept:
            networks[job["name"]] = network_weights(classifier)
        logits = predict_logits(classifier, score_images[scored])
        rows = df.loc[scored, ["image_id", "dataset", "domain", "split", "label"]].copy()
        rows.insert(0, "job", job["name"])
        rows["logit"] = logits
        rows["scored"] = np.where(rows["dataset"] == job.get("leave_out"), "left_out", "valid")
        rows.to_csv(predictions, mode="a", header=False, index=False, columns=PREDICTION_COLUMNS)
        entry = {"name": job["name"], "leave_out": job.get("leave_out"),
                 "config": config.to_json(), "seconds": time.time() - t0,
                 "train_images_per_second": history.get("train_images_per_second"),
                 **summarise_job(rows, job.get("leave_out"))}  # fmt: skip
        summary["jobs"].append(entry)
        tr.log(f"{job['name']}: {json.dumps({k: entry[k] for k in entry if 'auc' in k})}")
        if job.get("save"):
            info = {**(provenance or {}), "config": config.to_json(), "job": job,
                    "data": describe(df[train_mask])}  # fmt: skip
            tr.write_run(out, classifier, history, info)
        if not soup_of:
            per_epoch.append((time.time() - t0) / max(1, epochs))
        (out / "loso.json").write_text(json.dumps(summary, indent=1, default=str))
        keras.backend.clear_session()
    (out / "loso.json").write_text(json.dumps(summary, indent=1, default=str))  # skips too
    return summary
