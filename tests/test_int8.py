"""The int8 fast model: NNCF quantisation stored as parameters and rebuilt by graph surgery.

Real components: the tiny artifact made by the real exporter, OpenVINO's conversion of its
SavedModel, NNCF's quantisation (with accuracy control) calibrated on the fixture photos,
and the server's runtime selection.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests.conftest import IMAGES, fixture_validation

pytest.importorskip("openvino")
pytest.importorskip("nncf")


def _inputs(artifact: Path) -> np.ndarray:
    from model_training.preprocessing import image_to_input

    meta = json.loads((artifact / "metadata.json").read_text())
    size = (meta["input"]["height"], meta["input"]["width"])
    return np.stack([image_to_input(p, size) for p in sorted(IMAGES.glob("*.jpg"))])


def _run(model: Any, x: np.ndarray) -> dict[str, np.ndarray]:
    from model_training.export_int8 import run_model
    from model_training.fastmodel import compile_openvino

    return run_model(compile_openvino(model, "int8"), x)


@pytest.fixture(scope="module")
def int8_artifact(artifact_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny artifact with f32 and int8 variants recorded by the real export-fast."""
    from model_training.export_fast import export_fast
    from model_training.export_int8 import Int8Options

    dest = tmp_path_factory.mktemp("int8") / "tiny"
    shutil.copytree(artifact_dir, dest)
    paths, y, sets, domains = fixture_validation()
    export_fast(
        dest, paths, y, sets, domains, batch_size=4, bench_seconds=0.2, precisions=["f32"],
        calibration_paths=paths, calibration_sets=sets,
        int8_options=Int8Options(max_iterations=2, ranking_subset=3),
    )  # fmt: skip
    return dest


def _meta(path: Path) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((path / "metadata.json").read_text())
    return data


def test_rebuilt_model_equals_nncf_model(artifact_dir: Path, tmp_path: Path) -> None:
    import nncf
    from nncf.quantization.advanced_parameters import AdvancedQuantizationParameters

    from model_training import fastmodel, int8model

    x = _inputs(artifact_dir)
    original, _ = fastmodel.derive_openvino(artifact_dir)
    quantised = nncf.quantize(
        original.clone(),
        nncf.Dataset(list(x), lambda img: img[None]),
        subset_size=len(x),
        advanced_parameters=AdvancedQuantizationParameters(
            backend_params={"compress_weights": False}
        ),
    )
    params = int8model.extract_quantisation(original, quantised)
    assert params["fake_quantize"], "NNCF inserted no quantisers"
    path = tmp_path / int8model.PARAMS_FILE
    int8model.save_quantisation(params, path)
    assert path.stat().st_size < 100_000  # parameters, not weights
    # A fresh conversion (other node names: convert_model numbers them process-wide).
    fresh, _ = fastmodel.derive_openvino(artifact_dir)
    rebuilt = int8model.apply_quantisation(fresh, int8model.load_quantisation(path))
    kinds = [op.get_type_name() for op in rebuilt.get_ordered_ops()]
    assert kinds.count("FakeQuantize") == len(params["fake_quantize"])
    want, got = _run(quantised, x), _run(rebuilt, x)
    assert set(want) == set(got)
    for name in want:
        np.testing.assert_allclose(got[name], want[name], rtol=0, atol=1e-6)
    # The int8 model is not the float one.
    plain = _run(fastmodel.derive_openvino(artifact_dir)[0], x)
    assert not np.array_equal(plain["embedding"], got["embedding"])


def test_rebuild_refuses_parameters_of_another_graph(int8_artifact: Path, tmp_path: Path) -> None:
    from model_training import fastmodel, int8model
    from model_training.testing import make_tiny_artifact

    params = int8model.load_quantisation(int8_artifact / int8model.PARAMS_FILE)
    other = make_tiny_artifact(tmp_path / "other", input_size=(48, 48))
    model, _ = fastmodel.derive_openvino(other)
    with pytest.raises(int8model.QuantisationMismatch, match="graph"):
        int8model.apply_quantisation(model, params)
    model, _ = fastmodel.derive_openvino(int8_artifact)
    broken = {**params, "fake_quantize": [{**params["fake_quantize"][0], "source": (10**6, 0)}]}
    with pytest.raises(int8model.QuantisationMismatch, match="no node"):
        int8model.apply_quantisation(model, broken)


def test_export_fast_records_and_ships_the_int8_variant(int8_artifact: Path) -> None:
    from model_training import fastmodel

    record = _meta(int8_artifact)["runtimes"]["openvino"]
    int8 = next(v for v in record["variants"] if v["precision"] == "int8")
    assert int8["inference_precision"] == "f32"
    for key in ("max_abs_auc_delta", "max_probability_diff", "label_agreement", "roc_auc"):
        assert key in int8
    assert int8["throughput_ips"] > 0
    q = int8["quantisation"]
    assert q["parity_passed"] and max(q["rebuild_parity_max_abs_diff"].values()) == 0.0
    assert q["calibration_split"] == "train"
    assert q["int8_layers"] >= 1 and q["fake_quantize_nodes"] >= 2
    assert int8["passed"] is True and q["shipped"] is True  # the tiny model keeps its outputs
    path = int8_artifact / q["file"]
    assert fastmodel.file_sha256(path) == q["sha256"] and path.stat().st_size == q["bytes"]
    # The export's choice is the fastest variant that passed.
    passing = [v for v in record["variants"] if v["passed"]]
    assert record["agreement"]["throughput_ips"] == max(v["throughput_ips"] for v in passing)


def test_server_uses_int8_only_while_its_parameters_are_trusted(
    int8_artifact: Path, tmp_path: Path
) -> None:
    from app.runtime import guard_failures, select_runtime, trusted_precision

    art = tmp_path / "art"
    shutil.copytree(int8_artifact, art)
    meta = _meta(art)
    runtimes = meta["runtimes"]
    runtimes["tensorflow"]["throughput_ips"] = 1.0
    for variant in runtimes["openvino"]["variants"]:
        variant["throughput_ips"] = {"int8": 3.0, "f32": 2.0}[variant["precision"]]
    runtimes["openvino"]["agreement"] = runtimes["openvino"]["variants"][-1]
    assert guard_failures(meta, art, "int8") == []
    assert trusted_precision(meta, art) == ("int8", 3.0)
    x = _inputs(art)
    runtime = select_runtime(meta, art)
    assert runtime.name == "openvino" and runtime.precision.startswith("int8")
    reference = select_runtime(meta, art, "tensorflow").serve(x)
    got = runtime.serve(x)
    np.testing.assert_allclose(got["logit"], reference["logit"], atol=0.05)
    assert "cam" in got and runtime.explain(x)["heatmap"].shape[0] == len(x)
    runtime.close()
    # Another int8.npz than the one measured: int8 is refused, f32 (still trusted) serves.
    with (art / "int8.npz").open("ab") as fh:
        fh.write(b"\0")
    assert any("differs" in p for p in guard_failures(meta, art, "int8"))
    assert trusted_precision(meta, art) == ("f32", 2.0)
    runtime = select_runtime(meta, art)
    assert runtime.name == "openvino" and runtime.precision == "f32"
    runtime.close()
    # Without the file (an artifact that never had int8) the same holds.
    (art / "int8.npz").unlink()
    assert any("missing" in p for p in guard_failures(meta, art, "int8"))
    assert select_runtime(meta, art, "openvino").precision == "f32"


def test_failing_int8_variant_is_recorded_but_not_shipped(
    int8_artifact: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from app.runtime import select_runtime, trusted_precision
    from model_training import fastmodel
    from model_training.export_fast import export_fast
    from model_training.export_int8 import Int8Options

    art = tmp_path / "art"
    shutil.copytree(int8_artifact, art)
    paths, y, sets, domains = fixture_validation()
    # A probability bound no int8 model meets: accuracy control gives up, the variant fails.
    strict = {**fastmodel.QUANTISED_GUARD, "max_probability_diff": 1e-9}
    monkeypatch.setattr(fastmodel, "QUANTISED_GUARD", strict)
    runtimes = export_fast(
        art, paths, y, sets, domains, batch_size=4, bench_seconds=0.2, precisions=["f32"],
        calibration_paths=paths, calibration_sets=sets,
        int8_options=Int8Options(max_iterations=1, ranking_subset=3),
    )  # fmt: skip
    monkeypatch.undo()
    int8 = runtimes["openvino"]["variants"][-1]
    assert int8["precision"] == "int8" and int8["passed"] is False
    assert int8["quantisation"]["shipped"] is False
    assert not (art / "int8.npz").exists()
    assert runtimes["openvino"]["precision"] == "f32"
    meta = _meta(art)
    assert trusted_precision(meta, art)[0] == "f32"
    assert select_runtime(meta, art, "openvino").precision == "f32"


def test_cli_offers_the_int8_options() -> None:
    from model_training.__main__ import build_parser

    args = build_parser().parse_args(
        ["export-fast", "--artifact", "x", "--int8-calibration", "0", "--int8-max-iterations", "3"]
    )
    assert args.int8_calibration == 0 and args.int8_max_iterations == 3
    assert build_parser().parse_args(["export-fast", "--artifact", "x"]).int8_calibration > 0
