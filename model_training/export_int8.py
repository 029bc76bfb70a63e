"""The int8 variant of ``export-fast``: NNCF quantisation with accuracy control.

Calibration: training images of every data set given (never validation or test). Accuracy
control: ``nncf.quantize_with_accuracy_control`` with a validation function that measures
the quantised model against TensorFlow's outputs on the validation images with the very
figures ``export-fast`` records (``export_fast.agreement``), as a share of the int8 guard
(``fastmodel.QUANTISED_GUARD``): the worst of |ROC-AUC delta| / 0.003 over sets and domains,
max calibrated-probability difference / 0.02, label and OOD-decision disagreement / 0.01.
NNCF reverts the most harmful quantisers to floating point until that worst share is below
``margin`` (0.9 by default, so the figures measured afterwards on the rebuilt model keep some
room). On the subsets NNCF uses to rank quantisers the metric is the mean probability
difference (AUC on a few hundred hand-picked images means little).

The result is stored as quantisation parameters only (``int8model``), rebuilt from the
SavedModel exactly as the server does, checked against NNCF's own model (parity), and
measured like every other variant.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from model_training import fastmodel, int8model


@dataclass
class Int8Options:
    """How the int8 variant is made."""

    margin: float = 0.9  # stop reverting when the worst guard share is below this
    max_iterations: int = 12  # most groups of quantisers NNCF may revert
    ranking_subset: int = 100  # validation images NNCF ranks quantisers on
    preset: str = "mixed"  # NNCF preset: asymmetric activations, symmetric weights


def load_inputs(paths: Sequence[str], size: tuple[int, int]) -> np.ndarray:
    """Model inputs of ``paths`` as uint8 (the shared path's float values are whole numbers)."""
    from model_training.preprocessing import image_to_input

    out = np.empty((len(paths), size[0], size[1], 3), dtype=np.uint8)
    for i, path in enumerate(paths):
        x = image_to_input(path, size)
        if not np.array_equal(x, np.clip(np.round(x), 0, 255)):
            raise ValueError(f"{path}: model input is not whole numbers 0..255")
        out[i] = x
    return out


def run_model(compiled: Any, x: np.ndarray, batch: int = 16) -> dict[str, np.ndarray]:
    """Every output of an OpenVINO compiled model on ``x`` (uint8 or float), by name."""
    request = compiled.create_infer_request()
    names = [out.get_any_name() for out in compiled.outputs]
    got: dict[str, list[np.ndarray]] = {n: [] for n in names}
    for start in range(0, len(x), batch):
        request.infer({0: np.ascontiguousarray(x[start : start + batch], dtype=np.float32)})
        for i, name in enumerate(names):
            got[name].append(np.array(request.get_output_tensor(i).data))
    return {n: np.concatenate(v) for n, v in got.items()}


def domain_key(domain_output: str | None, ood_output: str) -> str | None:
    """The serve output kept as "domain": the one the domain is read from, unless it is
    already kept as "ood" (the skin gate's) or "embedding"."""
    return None if domain_output in (None, ood_output, "embedding") else domain_output


def as_candidate(
    outputs: dict[str, np.ndarray], ood_output: str, domain_output: str | None = None
) -> dict[str, np.ndarray]:
    """The keys ``export_fast.agreement`` reads (and "domain", see :func:`domain_key`)."""
    out = {
        "logit": outputs["logit"].reshape(-1),
        "ood": outputs[ood_output],
        "embedding": outputs["embedding"],
    }
    extra = domain_key(domain_output, ood_output)
    if extra:
        out["domain"] = outputs[extra]
    return out


def guard_share(record: dict[str, Any]) -> float:
    """The worst figure of an agreement record as a share of its limit (<= 1: passes)."""
    guard = fastmodel.QUANTISED_GUARD
    shares = [
        float(record["max_abs_auc_delta"] or 0.0) / guard["max_auc_delta"],
        float(record["max_probability_diff"]) / guard["max_probability_diff"],
        (1.0 - float(record["label_agreement"])) / (1.0 - guard["min_label_agreement"]),
    ]
    if record.get("ood_decision_agreement") is not None:
        ood = float(record["ood_decision_agreement"])
        shares.append((1.0 - ood) / (1.0 - guard["min_ood_decision_agreement"]))
    return max(shares)


def make_validation_fn(
    x: np.ndarray,
    score: Callable[[np.ndarray, dict[str, np.ndarray]], dict[str, Any]],
    probabilities: Callable[[np.ndarray, dict[str, np.ndarray]], np.ndarray],
    reference_p: np.ndarray,
    ood_output: str,
    margin: float,
    domain_output: str | None = None,
) -> Callable[[Any, Iterable[Any]], tuple[float, list[float]]]:
    """NNCF's validation function; items are validation indices.

    On the whole set: ``1 + min(0, margin - guard share)`` (1 once the guard holds with room);
    on a subset: minus the mean probability difference. Per item: minus its probability
    difference.
    """

    def validate(compiled: Any, items: Iterable[Any]) -> tuple[float, list[float]]:
        index = np.fromiter((int(i) for i in items), dtype=np.int64)
        outputs = as_candidate(run_model(compiled, x[index]), ood_output, domain_output)
        diff = np.abs(probabilities(index, outputs) - reference_p[index])
        if len(index) == len(x) and np.array_equal(index, np.arange(len(x))):
            # 1 + ...: NNCF divides by the initial metric (for its relative drop) even when
            # the drop is absolute, so the float model's metric must not be 0.
            metric = 1.0 + min(0.0, margin - guard_share(score(index, outputs)))
        else:
            metric = -float(np.mean(diff))
        return metric, [-float(d) for d in diff]

    return validate


def quantise(
    model: Any,
    calibration: np.ndarray,
    validate: Callable[[Any, Iterable[Any]], tuple[float, list[float]]],
    n_validation: int,
    options: Int8Options,
) -> Any:
    """NNCF's int8 model of ``model`` with accuracy control (weights left as FakeQuantize)."""
    import nncf
    from nncf.quantization.advanced_parameters import (
        AdvancedAccuracyRestorerParameters,
        AdvancedQuantizationParameters,
    )
    from nncf.quantization.range_estimator import RangeEstimatorParametersSet

    preset = {
        "mixed": nncf.QuantizationPreset.MIXED,
        "performance": nncf.QuantizationPreset.PERFORMANCE,
    }[options.preset]
    return nncf.quantize_with_accuracy_control(
        model,
        nncf.Dataset(list(calibration), lambda img: img[None].astype(np.float32)),
        nncf.Dataset(list(range(n_validation))),
        validate,
        max_drop=0.0,
        drop_type=nncf.DropType.ABSOLUTE,
        preset=preset,
        subset_size=len(calibration),
        # FakeQuantize on the weights (not int8 constants): the form int8model stores.
        advanced_quantization_parameters=AdvancedQuantizationParameters(
            backend_params={"compress_weights": False},
            # Global min/max ranges: NNCF's default (mean of per-image extremes) clips the
            # activations of unusual images, which moved one probability by 0.33 (0.13 here).
            activations_range_estimator_params=RangeEstimatorParametersSet.MINMAX,
        ),
        advanced_accuracy_restorer_parameters=AdvancedAccuracyRestorerParameters(
            max_num_iterations=options.max_iterations,
            ranking_subset_size=options.ranking_subset,
            num_ranking_workers=1,
        ),
    )


def count_quantised(model: Any) -> dict[str, int]:
    """Convolutions and MatMuls of ``model`` with a FakeQuantize on their weights, and all."""
    total = quantised = 0
    for op in model.get_ordered_ops():
        if op.get_type_name() in ("Convolution", "MatMul"):
            total += 1
            if op.input_value(1).get_node().get_type_name() == "FakeQuantize":
                quantised += 1
    return {"weighted_layers": total, "int8_layers": quantised}


def nncf_version() -> str:
    """The installed NNCF release."""
    import nncf

    return str(nncf.__version__)


def log(message: str) -> None:
    """Progress on stderr."""
    print(f"[int8 {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def build_int8(
    artifact: Path,
    calibration: np.ndarray,
    validation: np.ndarray,
    validate: Callable[[Any, Iterable[Any]], tuple[float, list[float]]],
    options: Int8Options,
) -> tuple[Any, dict[str, Any]]:
    """Quantise, store ``int8.npz`` in the artifact, rebuild from it; (rebuilt, facts)."""
    import openvino as ov

    started = time.perf_counter()
    original, _ = fastmodel.derive_openvino(artifact)
    quantised = quantise(original.clone(), calibration, validate, len(validation), options)
    seconds = time.perf_counter() - started
    params = int8model.extract_quantisation(original, quantised)
    path = Path(artifact) / int8model.PARAMS_FILE
    int8model.save_quantisation(params, path)
    rebuilt, _ = int8model.derive_int8(artifact)
    # Parity: the rebuilt model against NNCF's own, compiled alike, on validation images.
    check = validation[: min(64, len(validation))]
    core = ov.Core()
    config = {"INFERENCE_PRECISION_HINT": "f32"}
    a = run_model(core.compile_model(quantised, "CPU", config), check)
    b = run_model(core.compile_model(rebuilt, "CPU", config), check)
    parity = {name: float(np.max(np.abs(a[name] - b[name]))) for name in a}
    facts = {
        "file": int8model.PARAMS_FILE,
        "bytes": path.stat().st_size,
        "sha256": fastmodel.file_sha256(path),
        "fake_quantize_nodes": len(params["fake_quantize"]),
        "changed_constants": len(params["constants"]),
        **count_quantised(rebuilt),
        "rebuild_parity_max_abs_diff": parity,
        "nncf_release": nncf_version(),
        "quantise_seconds": seconds,
    }
    return rebuilt, facts
