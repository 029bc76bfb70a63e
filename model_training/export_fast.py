"""Add the fast runtime to an artifact: measure it against TensorFlow, record it in metadata.

``python -m model_training export-fast --artifact models/default`` (re-runnable; also run at
the end of ``export`` when validation data is at hand). For each inference precision, fastest
first, it runs the validation images of every data set through TensorFlow's ``serve`` (the
reference) and the OpenVINO model derived from the same SavedModel (``fastmodel``), through
the one shared preprocessing path, and records in ``metadata.json`` under ``runtimes``:

* per data set, per domain and pooled: ROC-AUC of both and their difference;
* the largest difference of the calibrated probability, the share of images whose label
  (at the shipped threshold) and OOD-gate decision are unchanged, the largest logit
  difference, and on a subset the largest Grad-CAM difference against TF's ``explain``;
* raw in-process throughput of both (batch 1, this machine) for the server's choice;
* what it was measured with: OpenVINO release, precision, calibration, SavedModel hashes.

Float precisions are tried fastest first until one passes the guard (``fastmodel.GUARD``).
Then, with calibration images (``--int8-calibration N`` training images per set, the
default), the int8 variant: NNCF's quantisation with accuracy control against these same
figures (``export_int8``), stored as quantisation parameters (``int8.npz``, rebuilt on the
converted SavedModel at start-up: ``int8model``) and measured like the others; it ships only
when it passes ``fastmodel.QUANTISED_GUARD`` (which adds the 0.02 probability bound), and is
recorded either way. The record's choice is the fastest variant that passed; when none
passes, the record says so and the server stays on TensorFlow.
"""

from __future__ import annotations

import datetime as dt
import platform
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from model_training import fastmodel, int8model
from model_training.export import read_metadata, write_metadata
from model_training.export_int8 import domain_key
from model_training.preprocessing import load_image_file, resize_to_input
from model_training.served import ServedAnswer

EXPLAIN_CHECK_IMAGES = 32


def _answer(
    served: ServedAnswer, outputs: dict[str, np.ndarray], ood_output: str
) -> tuple[np.ndarray, np.ndarray]:
    """(served probability, each image's threshold) of scored outputs ("logit", "ood",
    "embedding" and maybe "domain", see ``export_int8.domain_key``; "ood" is the serve output
    ``ood_output``), exactly as the server answers."""
    named = {"embedding": outputs["embedding"], ood_output: outputs["ood"]}
    if "domain" in outputs and served.output is not None:
        named[served.output] = outputs["domain"]
    return served.answer(outputs["logit"], named)


def heatmap_diffs(
    cam: np.ndarray, reference: dict[str, np.ndarray], served: ServedAnswer, ood_output: str
) -> dict[str, float]:
    """How far the fast model's Grad-CAM maps are from TensorFlow's (0..1 maps, largest
    absolute difference) on the images TensorFlow explained (the first ones):
    ``max_heatmap_diff``, the map the server shows (evidence for the positive label, or
    against it when TensorFlow's answer is negative), and ``max_heatmap_diff_either_map``,
    both maps. A map is scaled to its own peak, so the map of the evidence an answer did not
    rest on, empty or nearly so, can differ by up to 1 where rounding alone draws a spot."""
    n = len(reference["heatmap"])
    cam = cam[:n]
    fast_for = fastmodel.normalise_cam(cam, np.zeros(n, bool))
    out = {"max_heatmap_diff": float(np.max(np.abs(fast_for - reference["heatmap"])))}
    if "heatmap_benign" not in reference:
        return out
    head = {k: v[:n] for k, v in reference.items() if k in ("logit", "ood", "embedding", "domain")}
    p, t = _answer(served, head, ood_output)
    against = np.asarray(p < t, dtype=bool)  # a negative answer shows the evidence against
    fast_shown = fastmodel.normalise_cam(cam, against)
    ref_shown = np.where(against[:, None, None], reference["heatmap_benign"], reference["heatmap"])
    fast_against = fastmodel.normalise_cam(cam, np.ones(n, bool))
    either = max(
        out["max_heatmap_diff"],
        float(np.max(np.abs(fast_against - reference["heatmap_benign"]))),
    )
    return {
        "max_heatmap_diff": float(np.max(np.abs(fast_shown - ref_shown))),
        "max_heatmap_diff_either_map": either,
    }


def _batches(paths: Sequence[str], size: tuple[int, int], batch: int) -> Iterator[np.ndarray]:
    rows: list[np.ndarray] = []
    for path in paths:
        rows.append(resize_to_input(load_image_file(path), size))
        if len(rows) == batch:
            yield np.stack(rows)
            rows = []
    if rows:
        yield np.stack(rows)


def _throughput(call: Callable[[np.ndarray], Any], one: np.ndarray, seconds: float) -> float:
    """Images per second of ``call`` on batch-1 input, after two warm-up calls."""
    for _ in range(2):
        call(one)
    n, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds or n < 3:
        call(one)
        n += 1
    return n / (time.perf_counter() - started)


def _async_throughput(compiled: Any, one: np.ndarray, seconds: float) -> float:
    """Images per second of batch-1 requests kept in flight on every infer request."""
    import openvino as ov

    queue = ov.AsyncInferQueue(
        compiled, int(compiled.get_property("OPTIMAL_NUMBER_OF_INFER_REQUESTS"))
    )
    for _ in range(2 * len(queue)):
        queue.start_async({0: one})
    queue.wait_all()
    n, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds or n < 3:
        queue.start_async({0: one})  # blocks while every request is busy
        n += 1
    queue.wait_all()
    return n / (time.perf_counter() - started)


def agreement(
    y: np.ndarray,
    sets: Sequence[str],
    domains: Sequence[str],
    reference: dict[str, np.ndarray],
    candidate: dict[str, np.ndarray],
    served: ServedAnswer,
    ood: Any | None,
    ood_output: str,
) -> dict[str, Any]:
    """Agreement figures of ``candidate`` outputs against ``reference`` (TF) on validation;
    probabilities and labels as the server gives them (``served``: per-domain calibration
    and thresholds when the artifact has them)."""
    from model_training.metrics import auc_by_set

    labels = np.concatenate([y, y, y])
    names = [*sets, *(f"domain:{d}" for d in domains), *(["pooled"] * len(y))]
    auc_ref = auc_by_set(labels, np.tile(reference["logit"], 3), names)
    auc_new = auc_by_set(labels, np.tile(candidate["logit"], 3), names)
    auc: dict[str, dict[str, float]] = {}
    for name, ref in auc_ref.items():
        new = auc_new[name]
        if ref is not None and new is not None:
            auc[name] = {"tensorflow": ref, "fast": new, "delta": new - ref}
    p_ref, t_ref = _answer(served, reference, ood_output)
    p_new, t_new = _answer(served, candidate, ood_output)
    out: dict[str, Any] = {
        "images": len(y),
        "roc_auc": auc,
        "max_abs_auc_delta": max(abs(v["delta"]) for v in auc.values()) if auc else None,
        "max_probability_diff": float(np.max(np.abs(p_ref - p_new))),
        "label_agreement": float(np.mean((p_ref >= t_ref) == (p_new >= t_new))),
        "max_logit_diff": float(np.max(np.abs(reference["logit"] - candidate["logit"]))),
    }
    if ood is not None:
        out["ood_decision_agreement"] = float(
            np.mean(ood.not_skin(reference["ood"]) == ood.not_skin(candidate["ood"]))
        )
    return out


def passes(record: dict[str, Any]) -> bool:
    """Whether recorded agreement figures meet the guard of their precision (fastmodel)."""
    return not fastmodel.guard_problems(record)


def ood_detector(artifact: Path, meta: dict[str, Any]) -> Any | None:
    """The artifact's skin gate with its thresholds (None: it has none)."""
    if not meta.get("ood"):
        return None
    from model_training.skin import SKIN_HEAD, SkinGate

    ood = meta["ood"]
    thresholds = {SKIN_HEAD: float(ood["threshold"])}
    thresholds.update({str(n): float(v["threshold"]) for n, v in (ood.get("notes") or {}).items()})
    return SkinGate.load(artifact / str(ood["file"]), thresholds)


def _score(
    saved: Any,
    run_fast: Callable[[np.ndarray], dict[str, np.ndarray]],
    paths: Sequence[str],
    size: tuple[int, int],
    batch_size: int,
    ood_output: str,
    with_reference: bool,
    domain_output: str | None = None,
) -> dict[str, dict[str, np.ndarray]]:
    """Outputs of the fast model (and of TensorFlow when asked) on every image; "domain" is
    ``domain_output`` when it is not already kept under another key."""
    import tensorflow as tf

    extra = domain_key(domain_output, ood_output)

    got: dict[str, dict[str, list[np.ndarray]]] = {"tensorflow": {}, "fast": {}}

    def add(side: str, key: str, value: np.ndarray) -> None:
        got[side].setdefault(key, []).append(value)

    done, started = 0, time.perf_counter()
    for batch in _batches(paths, size, batch_size):
        fast = run_fast(batch)
        if fast:  # empty: TensorFlow's outputs only
            add("fast", "logit", fast["logit"].reshape(-1))
            add("fast", "ood", fast[ood_output])
            add("fast", "embedding", fast["embedding"])
            if extra:
                add("fast", "domain", fast[extra])
        explain = done < EXPLAIN_CHECK_IMAGES
        if explain and fastmodel.CAM_OUTPUT in fast:
            add("fast", "cam", fast[fastmodel.CAM_OUTPUT])
        if with_reference:
            outs = saved.serve(tf.constant(batch))
            add("tensorflow", "logit", outs["logit"].numpy().reshape(-1))
            add("tensorflow", "ood", outs[ood_output].numpy())
            add("tensorflow", "embedding", outs["embedding"].numpy())
            if extra:
                add("tensorflow", "domain", outs[extra].numpy())
            if explain and fastmodel.CAM_OUTPUT in fast:
                maps = saved.explain(tf.constant(batch))
                add("tensorflow", "heatmap", maps["heatmap"].numpy())
                if "heatmap_benign" in maps:
                    add("tensorflow", "heatmap_benign", maps["heatmap_benign"].numpy())
        done += len(batch)
        elapsed = time.perf_counter() - started
        print(f"\r  {done}/{len(paths)} images, {elapsed:.0f} s", end="", file=sys.stderr)
    print(file=sys.stderr)
    return {side: {k: np.concatenate(v) for k, v in d.items()} for side, d in got.items()}


def export_fast(
    artifact: Path,
    paths: Sequence[str],
    y: np.ndarray,
    sets: Sequence[str],
    domains: Sequence[str],
    batch_size: int = 16,
    bench_seconds: float = 5.0,
    precisions: Sequence[str] = fastmodel.PRECISIONS,
    calibration_paths: Sequence[str] = (),
    calibration_sets: Sequence[str] = (),
    int8_options: Any | None = None,
) -> dict[str, Any]:
    """Measure the fast model(s) on the given validation images; write ``metadata.runtimes``.

    With ``calibration_paths`` (training images) it also makes and measures the int8 variant
    (``export_int8``); its parameters ship as ``int8.npz`` only when it passes its guard.
    """
    import tensorflow as tf

    meta = read_metadata(artifact)
    size = (int(meta["input"]["height"]), int(meta["input"]["width"]))
    ood_output = str((meta.get("ood") or {}).get("embedding_output", "embedding"))
    saved = tf.saved_model.load(str(artifact / fastmodel.SAVED_MODEL_DIR))
    model, has_cam = fastmodel.derive_openvino(artifact)
    detector = ood_detector(artifact, meta)
    served = ServedAnswer.of(artifact, meta)
    one = next(_batches(paths[:1], size, 1))
    tf_ips = _throughput(lambda b: saved.serve(tf.constant(b))["logit"].numpy(), one, bench_seconds)
    reference: dict[str, np.ndarray] = {}
    variants: list[dict[str, Any]] = []
    for precision in precisions:  # fastest first; stop at the first that passes
        compiled = fastmodel.compile_openvino(model, precision)
        request = compiled.create_infer_request()

        def run_fast(batch: np.ndarray, request: Any = request) -> dict[str, np.ndarray]:
            result = request.infer({0: batch})
            return {out.get_any_name(): np.array(v) for out, v in result.items()}

        outputs = _score(
            saved, run_fast, paths, size, batch_size, ood_output, not reference, served.output
        )
        if not reference:
            reference = outputs["tensorflow"]
        record = agreement(
            y, sets, domains, reference, outputs["fast"], served, detector, ood_output
        )
        if "heatmap" in reference and "cam" in outputs["fast"]:
            record.update(heatmap_diffs(outputs["fast"]["cam"], reference, served, ood_output))
        record["precision"] = precision
        record["effective_precision"] = fastmodel.effective_precision(compiled)
        record["throughput_ips"] = _async_throughput(compiled, one, bench_seconds)
        record["passed"] = passes(record)
        variants.append(record)
        print(summary_line(record), file=sys.stderr)
        if record["passed"]:
            break
    stale = artifact / int8model.PARAMS_FILE
    stale.unlink(missing_ok=True)
    if calibration_paths:
        if not reference:  # no float variant measured: TensorFlow's outputs alone
            reference = _score(
                saved, lambda b: {}, paths, size, batch_size, ood_output, True, served.output
            )["tensorflow"]
        variants.append(
            _int8_variant(
                artifact, paths, (calibration_paths, calibration_sets), size, (y, sets, domains),
                reference, meta, detector, served, ood_output, bench_seconds, int8_options,
            )
        )  # fmt: skip
    passing = [v for v in variants if v["passed"]]
    chosen = max(passing, key=lambda v: v["throughput_ips"]) if passing else None
    runtimes: dict[str, Any] = {
        "reference": "tensorflow",
        "guard": {"default": fastmodel.GUARD, "quantised": fastmodel.QUANTISED_GUARD},
        "measured": {
            "at": dt.datetime.now(dt.UTC).replace(microsecond=0).isoformat(),
            "machine": f"{platform.machine()}, {platform.processor() or 'cpu'}",
            "cpu": fastmodel.cpu_name(),
            "validation_images": len(y),
            "note": "throughput: raw in-process, batch 1, this machine at export time",
        },
        "tensorflow": {"throughput_ips": tf_ips},
        "openvino": {
            "derived_from": fastmodel.SAVED_MODEL_DIR,
            "derivation": "openvino.convert_model(saved_model) of the serve signature"
            + (", plus the class-activation map output `cam`" if has_cam else ""),
            "openvino_release": fastmodel.openvino_release(),
            "explain": "cam" if has_cam else None,
            "source_sha256": fastmodel.saved_model_hashes(artifact),
            "calibration": {
                "temperature": meta.get("temperature", 1.0),
                "logit_bias": meta.get("logit_bias", 0.0),
                "threshold": meta["threshold"],
                "domain_calibration": meta.get("domain_calibration"),
            },
            "passed": chosen is not None,
            "precision": None if chosen is None else chosen["precision"],
            "agreement": chosen,
            "variants": variants,
        },
    }
    meta["runtimes"] = runtimes
    write_metadata(artifact, meta)
    return runtimes


def _int8_variant(
    artifact: Path,
    paths: Sequence[str],
    calibration_images: tuple[Sequence[str], Sequence[str]],
    size: tuple[int, int],
    labels: tuple[np.ndarray, Sequence[str], Sequence[str]],
    reference: dict[str, np.ndarray],
    meta: dict[str, Any],
    detector: Any | None,
    served: ServedAnswer,
    ood_output: str,
    bench_seconds: float,
    options: Any | None,
) -> dict[str, Any]:
    """Make, store, rebuild and measure the int8 variant (``export_int8``)."""
    from model_training import export_int8 as q8

    options = options or q8.Int8Options()
    y, sets, domains = labels
    calibration_paths, calibration_sets = calibration_images
    q8.log(f"loading {len(paths)} validation and {len(calibration_paths)} calibration images")
    validation = q8.load_inputs(paths, size)
    calibration = q8.load_inputs(calibration_paths, size)
    reference_p = _answer(served, reference, ood_output)[0]

    def score(index: np.ndarray, outputs: dict[str, np.ndarray]) -> dict[str, Any]:
        ref = {
            k: v[index]
            for k, v in reference.items()
            if k in ("logit", "ood", "embedding", "domain")
        }
        return agreement(
            y[index], [sets[i] for i in index], [domains[i] for i in index], ref, outputs,
            served, detector, ood_output,
        )  # fmt: skip

    def probabilities(index: np.ndarray, outputs: dict[str, np.ndarray]) -> np.ndarray:
        return _answer(served, outputs, ood_output)[0]

    validate = q8.make_validation_fn(
        validation, score, probabilities, reference_p, ood_output, options.margin, served.output
    )
    q8.log("NNCF quantize_with_accuracy_control")
    model, facts = q8.build_int8(artifact, calibration, validation, validate, options)
    q8.log(f"rebuilt from {facts['file']} ({facts['bytes']} bytes); measuring")
    compiled = fastmodel.compile_openvino(model, fastmodel.INT8)
    outputs = q8.run_model(compiled, validation)
    record = agreement(
        y, sets, domains, reference, q8.as_candidate(outputs, ood_output, served.output),
        served, detector,
        ood_output,
    )  # fmt: skip
    if "heatmap" in reference and fastmodel.CAM_OUTPUT in outputs:
        record.update(heatmap_diffs(outputs[fastmodel.CAM_OUTPUT], reference, served, ood_output))
    record["precision"] = fastmodel.INT8
    record["inference_precision"] = fastmodel.INFERENCE_HINT[fastmodel.INT8]
    one = validation[:1].astype(np.float32)
    record["throughput_ips"] = _async_throughput(compiled, one, bench_seconds)
    record["passed"] = passes(record)
    record["guard_share"] = q8.guard_share(record)
    facts["parity_passed"] = all(v <= 1e-4 for v in facts["rebuild_parity_max_abs_diff"].values())
    if not facts["parity_passed"]:
        record["passed"] = False
    record["quantisation"] = {
        **facts,
        "method": "nncf.quantize_with_accuracy_control, preset "
        f"{options.preset}, weights per channel; FakeQuantize nodes and changed constants "
        "stored, rebuilt on the converted SavedModel (model_training.int8model)",
        "calibration_images": dict(Counter(calibration_sets)) or len(calibration_paths),
        "calibration_split": "train",
        "accuracy_control": {
            "metric": "1 + min(0, margin - worst share of the int8 guard) on validation",
            "margin": options.margin,
            "max_iterations": options.max_iterations,
            "ranking_subset": options.ranking_subset,
        },
        "shipped": bool(record["passed"]),
    }
    if not record["passed"]:
        (artifact / int8model.PARAMS_FILE).unlink(missing_ok=True)
    return record


def export_fast_from_data(
    artifact: Path,
    data_dir: Path,
    sets: Sequence[str],
    limit: int = 0,
    int8_calibration: int = 0,
    seed: int = 0,
    **kwargs: Any,
) -> dict[str, Any]:
    """``export_fast`` on the validation split of ``sets`` under ``data_dir``.

    ``int8_calibration``: training images per set to calibrate the int8 variant on (0: no
    int8 variant). Only the training split is read for it.
    """
    import pandas as pd

    from model_training.data import read_datasets

    data = read_datasets(data_dir, sets)
    df = data[data["split"] == "valid"].reset_index(drop=True)
    if limit:
        df = df.groupby("dataset", group_keys=False).head(limit).reset_index(drop=True)
    calibration = pd.DataFrame({"path": [], "dataset": []})
    if int8_calibration:
        train = data[data["split"] == "train"]
        picked = [
            group.sample(n=min(len(group), int8_calibration), random_state=seed)
            for _, group in train.groupby("dataset", sort=True)
        ]
        calibration = pd.concat(picked)
    return export_fast(
        artifact,
        df["path"].tolist(),
        df["label"].to_numpy(),
        df["dataset"].tolist(),
        df["domain"].tolist(),
        calibration_paths=calibration["path"].tolist(),
        calibration_sets=calibration["dataset"].tolist(),
        **kwargs,
    )


def summary_line(v: dict[str, Any]) -> str:
    """One variant's figures in a line."""
    return (
        f"openvino {v['precision']}"
        + (
            f" (ran as {v['effective_precision']} on this CPU)"
            if v.get("effective_precision", v["precision"]) != v["precision"]
            else ""
        )
        + f": {v['throughput_ips']:.1f} img/s, max |AUC delta| "
        f"{v['max_abs_auc_delta']:.4f}, max prob diff {v['max_probability_diff']:.4f}, "
        f"label agreement {v['label_agreement']:.4f}, "
        f"OOD decisions {v.get('ood_decision_agreement', float('nan')):.4f}, passed={v['passed']}"
    )


def summary(runtimes: dict[str, Any]) -> str:
    """One line per variant, for the command's output."""
    lines = [f"tensorflow: {runtimes['tensorflow']['throughput_ips']:.1f} img/s (batch 1)"]
    lines += [summary_line(v) for v in runtimes["openvino"]["variants"]]
    return "\n".join(lines)
