"""The runtime interface, the fast (OpenVINO) model, export-fast's record and the batcher.

Real components throughout: the tiny artifact made by the real exporter, OpenVINO's real
conversion of its SavedModel, TensorFlow as the reference, real threads in the batcher.
"""

from __future__ import annotations

import json
import os
import shutil
import threading
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from pathlib import Path

import httpx
import numpy as np
import pytest

from tests.conftest import IMAGES, fixture_validation

pytest.importorskip("openvino")


@pytest.fixture(scope="module")
def fast_artifact(artifact_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of the tiny artifact with the fast runtime recorded by the real export-fast."""
    from model_training.export_fast import export_fast

    dest = tmp_path_factory.mktemp("fast") / "tiny"
    shutil.copytree(artifact_dir, dest)
    # f32: the forward CAM must then equal TF's Grad-CAM to rounding (bf16 adds its own error).
    export_fast(dest, *fixture_validation(), batch_size=4, bench_seconds=0.2, precisions=["f32"])
    return dest


def _meta(path: Path) -> dict[str, object]:
    data: dict[str, object] = json.loads((path / "metadata.json").read_text())
    return data


def test_guard_applies_the_probability_bound_to_int8_only() -> None:
    from model_training.fastmodel import guard_problems

    record = {
        "max_abs_auc_delta": 0.002,
        "label_agreement": 0.9965,
        "ood_decision_agreement": 0.9994,
        "max_probability_diff": 0.0236,
    }
    assert guard_problems({**record, "precision": "bf16"}) == []
    assert any("probabilities" in p for p in guard_problems({**record, "precision": "i8"}))
    assert guard_problems({**record, "precision": "f32", "max_abs_auc_delta": 0.004})
    assert guard_problems({**record, "precision": "f32", "label_agreement": 0.98})
    assert guard_problems({**record, "precision": "f32", "ood_decision_agreement": 0.9})
    assert guard_problems({"precision": "f32"}) == ["the recorded agreement is incomplete"]


def test_export_fast_records_agreement_hashes_and_calibration(fast_artifact: Path) -> None:
    from app.runtime import guard_failures

    record = _meta(fast_artifact)["runtimes"]["openvino"]  # type: ignore[index]
    assert record["passed"] is True
    assert record["explain"] == "cam"
    agreement = record["agreement"]
    # The tiny model has both classes in isic2017, the dermoscopy domain and pooled only.
    assert {"isic2017", "domain:dermoscopy", "pooled"} <= set(agreement["roc_auc"])
    assert agreement["max_abs_auc_delta"] <= 0.003
    assert agreement["label_agreement"] == 1.0
    assert agreement["max_probability_diff"] <= 0.02
    assert agreement["max_heatmap_diff"] < 1e-3  # forward CAM == TF's Grad-CAM (map shown)
    # ... and the map of the evidence each answer did not rest on as well.
    assert agreement["max_heatmap_diff"] <= agreement["max_heatmap_diff_either_map"] < 1e-3
    files = record["source_sha256"]
    assert "saved_model/saved_model.pb" in files and all(len(h) == 64 for h in files.values())
    assert record["calibration"]["temperature"] == 1.5
    assert guard_failures(_meta(fast_artifact), fast_artifact) == []
    # What the CPU really ran: a bf16 request is computed in f32 without native bf16.
    import openvino as ov

    native_bf16 = "BF16" in ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")
    for v in record["variants"]:
        ran_as = "f32" if v["precision"] == "bf16" and not native_bf16 else v["precision"]
        assert v["effective_precision"] == ran_as
    assert _meta(fast_artifact)["runtimes"]["measured"]["cpu"]  # type: ignore[index]


def test_guard_refuses_stale_or_failing_records(fast_artifact: Path, tmp_path: Path) -> None:
    from app.runtime import guard_failures

    meta = _meta(fast_artifact)
    assert guard_failures({k: v for k, v in meta.items() if k != "runtimes"}, fast_artifact)
    recalibrated = {**meta, "temperature": 2.0}
    assert any("temperature" in p for p in guard_failures(recalibrated, fast_artifact))
    failing = json.loads(json.dumps(meta))
    failing["runtimes"]["openvino"]["agreement"]["label_agreement"] = 0.95
    assert any("labels agree" in p for p in guard_failures(failing, fast_artifact))
    # Another SavedModel (a byte changed) invalidates the record.
    other = tmp_path / "other"
    shutil.copytree(fast_artifact, other)
    with (other / "saved_model" / "saved_model.pb").open("ab") as fh:
        fh.write(b"\0")
    assert any("SavedModel files differ" in p for p in guard_failures(meta, other))


def test_auto_selection_follows_the_record(fast_artifact: Path, artifact_dir: Path) -> None:
    from app.runtime import select_runtime

    # No record: TensorFlow, whatever is installed.
    assert select_runtime(_meta(artifact_dir), artifact_dir).name == "tensorflow"
    meta = _meta(fast_artifact)
    runtimes = meta["runtimes"]
    runtimes["tensorflow"]["throughput_ips"] = 1.0  # type: ignore[index]
    runtimes["openvino"]["agreement"]["throughput_ips"] = 2.0  # type: ignore[index]
    assert select_runtime(meta, fast_artifact).name == "openvino"
    runtimes["tensorflow"]["throughput_ips"] = 3.0  # type: ignore[index]
    assert select_runtime(meta, fast_artifact).name == "tensorflow"
    assert select_runtime(meta, fast_artifact, "openvino").name == "openvino"  # override


def test_openvino_runtime_matches_tensorflow(fast_artifact: Path) -> None:
    from app.runtime import select_runtime
    from model_training.preprocessing import image_to_input

    meta = _meta(fast_artifact)
    size = (meta["input"]["height"], meta["input"]["width"])  # type: ignore[index]
    batch = np.stack([image_to_input(p, size) for p in sorted(IMAGES.glob("*.jpg"))])
    tf_rt = select_runtime(meta, fast_artifact, "tensorflow")
    ov_rt = select_runtime(meta, fast_artifact, "openvino")
    ref, got = tf_rt.serve(batch), ov_rt.serve(batch)
    np.testing.assert_allclose(got["logit"], ref["logit"], atol=0.05)
    np.testing.assert_allclose(got["embedding"], ref["embedding"], atol=0.05, rtol=0.05)
    ref_x, got_x = tf_rt.explain(batch), ov_rt.explain(batch)
    for key in ("heatmap", "heatmap_benign"):
        assert got_x[key].shape == ref_x[key].shape
        np.testing.assert_allclose(got_x[key], ref_x[key], atol=0.02)


@pytest.fixture(scope="module")
def openvino_server(
    fast_artifact: Path, server_factory: Callable[..., AbstractContextManager[object]]
) -> Iterator[object]:
    with server_factory(model_dir=fast_artifact, runtime="openvino", batch_max_wait_ms=5) as live:
        yield live


def test_openvino_server_predicts_explains_and_isolates_bad_files(
    openvino_server: object, image_bytes: dict[str, bytes]
) -> None:
    base = openvino_server.base_url  # type: ignore[attr-defined]
    name = "isic2017_melanoma_ISIC_0000002.jpg"
    one = httpx.post(f"{base}/predict?explain=true", files={"file": (name, image_bytes[name])})
    assert one.status_code == 200, one.text
    body = one.json()
    assert body["status"] == "ok" and body["heatmap_png_base64"]
    files = [("files", (n, data)) for n, data in list(image_bytes.items())[:3]]
    files.insert(1, ("files", ("broken.jpg", b"not an image")))
    batch = httpx.post(f"{base}/predict/batch", files=files, timeout=60)
    assert batch.status_code == 200
    results = batch.json()["results"]
    assert results[1]["status"] == "error" and results[1]["status_code"] == 415
    assert all(r["status"] != "error" for r in results[:1] + results[2:])
    bad = httpx.post(f"{base}/predict", files={"file": ("x.jpg", b"not a jpeg")})
    assert bad.status_code == 415 and "detail" in bad.json()
    empty = httpx.post(f"{base}/predict", files={"file": ("x.jpg", b"")})
    assert empty.status_code == 422 and "detail" in empty.json()  # as the contract says


def test_concurrent_requests_are_batched_and_answered_alike(
    openvino_server: object, image_bytes: dict[str, bytes]
) -> None:
    base = openvino_server.base_url  # type: ignore[attr-defined]
    names = list(image_bytes)
    alone = {
        n: httpx.post(f"{base}/predict", files={"file": (n, image_bytes[n])}).json() for n in names
    }
    together: dict[str, dict[str, object]] = {}

    def send(n: str) -> None:
        together[n] = httpx.post(f"{base}/predict", files={"file": (n, image_bytes[n])}).json()

    threads = [threading.Thread(target=send, args=(n,)) for n in names * 2]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for n in names:
        assert together[n]["status"] == alone[n]["status"]
        if alone[n]["status"] == "ok":
            assert together[n]["probability_malignant"] == pytest.approx(
                alone[n]["probability_malignant"], abs=1e-4
            )


def test_batcher_gathers_waiting_jobs_and_returns_each_its_rows() -> None:
    from app.batching import Batcher

    entered, release = threading.Event(), threading.Event()
    sizes: list[int] = []

    def model(x: np.ndarray) -> dict[str, np.ndarray]:
        entered.set()
        release.wait(timeout=30)  # the first call holds the worker while others queue up
        sizes.append(len(x))
        return {"sum": x.reshape(len(x), -1).sum(axis=1), "rows": x}

    batcher = Batcher(model, max_batch=4, max_wait_s=0.0, workers=1)
    results: dict[int, dict[str, np.ndarray]] = {}

    def call(i: int) -> None:
        results[i] = batcher.run(np.full((1 if i != 3 else 2, 2), float(i)))

    threads = [threading.Thread(target=call, args=(i,)) for i in range(6)]
    threads[0].start()
    assert entered.wait(timeout=30)
    for t in threads[1:]:
        t.start()
    while batcher._jobs.qsize() < 5:
        threading.Event().wait(0.01)
    release.set()
    for t in threads:
        t.join(timeout=30)
    batcher.close()
    for i in range(6):
        assert np.all(results[i]["rows"] == float(i))
        assert results[i]["rows"].shape[0] == (2 if i == 3 else 1)
    assert sizes[0] == 1 and max(sizes[1:]) > 1 and all(s <= 4 for s in sizes)
    assert sum(sizes) == 7


def test_batcher_waits_for_company_only_while_a_request_in_flight_may_bring_it() -> None:
    import time

    from app.batching import Batcher

    sizes: list[int] = []

    def model(x: np.ndarray) -> dict[str, np.ndarray]:
        sizes.append(len(x))
        return {"y": x}

    in_flight = [1]
    batcher = Batcher(model, max_batch=8, max_wait_s=5.0, workers=1, in_flight=lambda: in_flight[0])
    started = time.perf_counter()
    batcher.run(np.zeros((1, 2)))  # alone: nobody else is being assessed, so no 5 s wait
    assert time.perf_counter() - started < 2.5 and sizes == [1]

    in_flight[0] = 2  # a second request is still decoding when the first job arrives
    late: dict[str, np.ndarray] = {}
    second = threading.Thread(target=lambda: late.update(batcher.run(np.ones((1, 2)))))
    threading.Timer(0.2, second.start).start()
    first = batcher.run(np.zeros((1, 2)))
    second.join(timeout=30)
    batcher.close()
    assert sizes == [1, 2], "the worker waited for the job in flight and ran both together"
    assert np.all(first["y"] == 0) and np.all(late["y"] == 1)


def test_batcher_failure_fails_only_its_batch() -> None:
    from app.batching import Batcher

    def model(x: np.ndarray) -> dict[str, np.ndarray]:
        if np.any(x < 0):
            raise ValueError("negative input")
        return {"y": x * 2}

    batcher = Batcher(model, max_batch=1, max_wait_s=0.0, workers=2)
    with pytest.raises(ValueError, match="negative"):
        batcher.run(np.array([[-1.0]]))
    assert batcher.run(np.array([[2.0]]))["y"].tolist() == [[4.0]]
    batcher.close()


def test_default_streams_are_one_on_two_cores_and_openvinos_elsewhere() -> None:
    from app.runtime.openvino_runtime import default_streams, usable_cores

    assert default_streams(1) == 1 and default_streams(2) == 1
    assert default_streams(3) is None and default_streams(16) is None
    assert 1 <= usable_cores() <= (os.cpu_count() or 1)
