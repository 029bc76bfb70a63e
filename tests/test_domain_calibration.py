"""Per-domain calibration: fitting, the file format, and the server applying it unasked."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image
from sklearn.metrics import roc_auc_score

from app.metadata import ModelLoadError
from app.model import TriageModel
from app.texts import PHOTO_KINDS
from model_training.calibration import expected_calibration_error
from model_training.domain_calibration import (
    FILE,
    DomainCalibration,
    fit_domain_calibration,
    fit_platt,
)
from model_training.preprocessing import resize_to_input
from model_training.served import ServedAnswer

IMAGES = sorted((Path(__file__).parent / "fixtures" / "images").glob("*.jpg"))


def _two_domains(seed: int = 0, n: int = 600) -> tuple[np.ndarray, ...]:
    """Logits whose meaning differs by domain, and embeddings that reveal the domain."""
    rng = np.random.default_rng(seed)
    phone = rng.random(n) < 0.2
    y = (rng.random(n) < np.where(phone, 0.4, 0.15)).astype(int)
    # Dermoscopy: logit = true log odds. Phone: over-confident by 3x and shifted by +1.
    true_logit = rng.normal(np.where(y == 1, 1.5, -1.5), 1.0)
    logits = np.where(phone, 3 * true_logit + 1.0, true_logit)
    emb = rng.normal(0, 1, (n, 16))
    emb[:, 0] += np.where(phone, 3.0, -3.0)
    return logits, emb, y, np.where(phone, "phone", "dermoscopy")


def test_platt_recovers_a_known_scaling() -> None:
    rng = np.random.default_rng(1)
    z = rng.normal(0, 2, 20000)
    y = (rng.random(z.size) < 1 / (1 + np.exp(-(z - 0.5) / 2.0))).astype(int)
    bias, temperature = fit_platt(z, y)
    assert bias == pytest.approx(-0.5, abs=0.1)
    assert temperature == pytest.approx(2.0, rel=0.08)


def test_per_domain_beats_one_temperature_and_infers_the_domain() -> None:
    logits, emb, y, domains = _two_domains()
    dc = fit_domain_calibration(logits, emb, y, domains)
    assert dc.domains == ("dermoscopy", "phone")
    assert np.mean((dc.second_domain_probability(emb) >= 0.5) == (domains == "phone")) > 0.99
    t_logits, t_emb, t_y, t_domains = _two_domains(seed=5)  # fresh images, same sources
    p = dc.calibrate(t_logits, t_emb)
    phone = t_domains == "phone"
    single = 1 / (1 + np.exp(-t_logits / 1.8))
    assert expected_calibration_error(t_y[phone], p[phone]) < expected_calibration_error(
        t_y[phone], single[phone]
    )
    assert expected_calibration_error(t_y[phone], p[phone]) < 0.08


def test_save_load_round_trip_and_refuse_a_broken_file(tmp_path: Path) -> None:
    logits, emb, y, domains = _two_domains()
    dc = fit_domain_calibration(logits, emb, y, domains)
    dc.save(tmp_path / FILE)
    again = DomainCalibration.load(tmp_path / FILE)
    np.testing.assert_allclose(again.calibrate(logits, emb), dc.calibrate(logits, emb))
    np.savez(tmp_path / "bad.npz", domains=np.asarray(["a"]), mean=np.zeros(3), scale=np.ones(3),
             coef=np.zeros(2), intercept=0.0, bias=np.zeros(2), temperature=np.ones(2))  # fmt: skip
    with pytest.raises(ValueError):
        DomainCalibration.load(tmp_path / "bad.npz")


def fixture_batch(model: TriageModel, n: int) -> np.ndarray:
    """The first ``n`` fixture photos as the model's input batch."""
    size = model.metadata.input_size
    return np.stack([resize_to_input(Image.open(p), size) for p in IMAGES[:n]]).astype(np.float32)


def test_server_model_applies_the_artifacts_domain_calibration(
    artifact_copy: Callable[..., Path],
) -> None:
    """TriageModel.infer returns the domain-weighted calibration of the real serve outputs."""
    plain = TriageModel.load(artifact_copy("plain"))
    batch = fixture_batch(plain, 4)
    served = plain._call("serve", batch)
    dim = served["embedding"].shape[1]
    rng = np.random.default_rng(0)
    dc = DomainCalibration(
        ("dermoscopy", "phone"), np.zeros(dim), np.ones(dim), rng.normal(0, 1, dim), 0.1,
        (-0.5, 0.8), (1.3, 2.5),
    )  # fmt: skip
    model_dir = artifact_copy("per-domain", domain_calibration=dc.describe())
    dc.save(model_dir / FILE)
    model = TriageModel.load(model_dir)
    got = model.infer(batch).probabilities
    expected = dc.calibrate(served["logit"], served["embedding"])
    np.testing.assert_allclose(got, expected, rtol=1e-5)
    assert not np.allclose(got, plain.infer(batch).probabilities)  # not the single temperature
    (model_dir / FILE).unlink()
    with pytest.raises(ModelLoadError, match="domain calibration"):
        TriageModel.load(model_dir)


def test_reads_a_named_output_square_rooted_and_old_files_still_load(tmp_path: Path) -> None:
    logits, emb, y, domains = _two_domains()
    feats = np.abs(emb) ** 2  # non-negative, as the pooled mid-level features are
    dc = fit_domain_calibration(logits, feats, y, domains)
    assert dc.embedding_output == "ood_embedding" and dc.sqrt
    assert dc.describe()["embedding_output"] == "ood_embedding"
    assert dc.describe()["embedding_transform"] == "sqrt"
    dc.save(tmp_path / FILE)
    again = DomainCalibration.load(tmp_path / FILE)
    assert again.embedding_output == "ood_embedding" and again.sqrt
    np.testing.assert_allclose(again.calibrate(logits, feats), dc.calibrate(logits, feats))
    # A file from before the output could be chosen: the final embedding, not square-rooted.
    with np.load(tmp_path / FILE) as data:
        old = {k: data[k] for k in data.files if k not in ("embedding_output", "sqrt")}
    np.savez(tmp_path / "old.npz", **old)
    legacy = DomainCalibration.load(tmp_path / "old.npz")
    assert legacy.embedding_output == "embedding" and not legacy.sqrt
    assert legacy.assignment == "mixture"


def test_hard_assignment_keeps_the_ranking_within_each_inferred_domain() -> None:
    """Each photo gets its inferred domain's Platt scaling: inside a domain the calibrated
    probability is a monotone map of the logit, so its ROC-AUC there is the raw logit's."""
    logits, emb, y, domains = _two_domains(n=1500)
    feats = np.abs(emb) ** 2
    # A weaker domain signal than _two_domains gives, so that many photos get 0.05 < w < 0.95.
    feats[:, 0] = np.abs(feats[:, 0] * 0.15 + np.random.default_rng(3).normal(0, 1, len(y)))
    mixture = fit_domain_calibration(logits, feats, y, domains)
    hard = fit_domain_calibration(logits, feats, y, domains, assignment="hard")
    assert hard.assignment == "hard" and mixture.assignment == "mixture"
    assert (hard.bias, hard.temperature) == (mixture.bias, mixture.temperature)
    second = hard.is_second_domain(feats)
    np.testing.assert_array_equal(second, mixture.second_domain_probability(feats) >= 0.5)
    assert 0 < second.sum() < len(second)
    p_hard, p_mix = hard.calibrate(logits, feats), mixture.calibrate(logits, feats)
    both = hard.per_domain(logits)
    np.testing.assert_allclose(p_hard, np.where(second, both[:, 1], both[:, 0]))
    mixture_moved = False
    for read in (second, ~second):
        auc_raw = roc_auc_score(y[read], logits[read])
        assert roc_auc_score(y[read], p_hard[read]) == pytest.approx(auc_raw, abs=1e-12)
        mixture_moved |= abs(roc_auc_score(y[read], p_mix[read]) - auc_raw) > 1e-6
    assert mixture_moved  # the mixture does reorder photos inside a domain here


def test_assignment_round_trips_is_described_and_checked(tmp_path: Path) -> None:
    logits, emb, y, domains = _two_domains()
    hard = fit_domain_calibration(logits, emb, y, domains, assignment="hard")
    hard.save(tmp_path / FILE)
    again = DomainCalibration.load(tmp_path / FILE)
    assert again.assignment == "hard"
    np.testing.assert_allclose(again.calibrate(logits, emb), hard.calibrate(logits, emb))
    assert again.describe()["assignment"] == "hard"
    assert "inferred domain" in again.describe()["method"]
    mixture = replace(hard, assignment="mixture")
    assert mixture.describe()["assignment"] == "mixture"
    assert "(1 - w)" in mixture.describe()["method"]
    # A file without the field (the shipped artifact's) is the mixture.
    with np.load(tmp_path / FILE) as data:
        old = {k: data[k] for k in data.files if k != "assignment"}
    np.savez(tmp_path / "old.npz", **old)
    assert DomainCalibration.load(tmp_path / "old.npz").assignment == "mixture"
    np.savez(tmp_path / "odd.npz", **old, assignment=np.asarray("soft"))
    with pytest.raises(ValueError, match="assignment"):
        DomainCalibration.load(tmp_path / "odd.npz")
    with pytest.raises(ValueError, match="assignment"):
        replace(hard, assignment="soft")


def test_image_thresholds_follow_the_inferred_domain() -> None:
    logits, emb, y, domains = _two_domains()
    dc = fit_domain_calibration(logits, emb, y, domains)
    second = dc.second_domain_probability(emb) >= 0.5
    got = dc.image_thresholds(emb, (0.08, 0.16))
    np.testing.assert_array_equal(got, np.where(second, 0.16, 0.08))
    np.testing.assert_array_equal(dc.is_second_domain(emb), second)


def test_the_domain_cut_reads_doubtful_photos_as_the_second_domain(tmp_path: Path) -> None:
    logits, emb, y, domains = _two_domains()
    hard = fit_domain_calibration(logits, emb, y, domains, assignment="hard", cut=0.2)
    w = hard.second_domain_probability(emb)
    doubtful = (w >= 0.2) & (w < 0.5)
    assert doubtful.any()  # the test means something only with photos between the cuts
    np.testing.assert_array_equal(hard.is_second_domain(emb), w >= 0.2)
    p, t = hard.answer(logits, emb, (0.1, 0.3))
    assert t is not None
    both = hard.per_domain(logits)
    np.testing.assert_allclose(p[doubtful], both[doubtful, 1])
    np.testing.assert_array_equal(t[doubtful], 0.3)
    assert "w >= 0.2" in hard.describe()["method"] and hard.describe()["cut"] == 0.2
    hard.save(tmp_path / FILE)
    assert DomainCalibration.load(tmp_path / FILE).cut == 0.2
    # A file without the field (the shipped artifact's) reads from 0.5.
    with np.load(tmp_path / FILE) as data:
        old = {k: data[k] for k in data.files if k != "cut"}
    np.savez(tmp_path / "old.npz", **old)
    assert DomainCalibration.load(tmp_path / "old.npz").cut == 0.5
    for bad in (0.0, 1.0, float("nan")):
        with pytest.raises(ValueError, match="cut"):
            replace(hard, cut=bad)


def test_sample_weights_weigh_only_the_domain_classifiers_fit() -> None:
    logits, emb, y, domains = _two_domains()
    keep = np.arange(len(y)) < 400
    alone = fit_domain_calibration(logits[keep], emb[keep], y[keep], domains[keep])
    # Photos of weight 0 leave the classifier (they still enter the standardisation, so the
    # readings agree rather than match).
    weighted = fit_domain_calibration(
        logits, emb, y, domains, sample_weight=np.where(keep, 1.0, 0.0)
    )
    assert weighted.bias == pytest.approx(
        fit_domain_calibration(logits, emb, y, domains).bias
    )  # the scalings see every photo, unweighted
    agree = np.mean(weighted.is_second_domain(emb) == alone.is_second_domain(emb))
    assert agree > 0.99
    flipped = fit_domain_calibration(
        logits, emb, y, domains, sample_weight=np.where(keep, 1.0, 50.0)
    )
    assert not np.allclose(flipped.coef, weighted.coef)


def _reading_half_as_phone(served: dict[str, np.ndarray]) -> DomainCalibration:
    """A calibration on sqrt(ood_embedding) whose domain model reads about half the photos
    as phone photos (intercept at the median score)."""
    feats = np.sqrt(np.maximum(served["ood_embedding"].astype(np.float64), 0.0))
    dim = feats.shape[1]
    coef = np.random.default_rng(1).normal(0, 1, dim)
    mean, scale = feats.mean(axis=0), feats.std(axis=0) + 1e-6
    scores = ((feats - mean) / scale) @ coef
    return DomainCalibration(
        ("dermoscopy", "phone"), mean, scale, coef, -float(np.median(scores)), (-0.5, 0.8),
        (1.3, 2.5), "ood_embedding", True,
    )  # fmt: skip


def assert_phone_threshold_and_offline_answers(
    model_dir: Path, served: dict[str, np.ndarray], out: Any, phone: np.ndarray
) -> None:
    """The server's answers ``out`` use 0.9 for phone photos and 0.25 otherwise, and the
    offline figures (artefact effects, degraded photos) read answers as the server does."""
    assert out.thresholds is not None
    np.testing.assert_array_equal(out.thresholds, np.where(phone, 0.9, 0.25))
    offline = ServedAnswer.of(model_dir, json.loads((model_dir / "metadata.json").read_text()))
    p_off, t_off = offline.answer(served["logit"], served)
    np.testing.assert_allclose(p_off, out.probabilities, rtol=1e-5)
    np.testing.assert_array_equal(t_off, out.thresholds)


def test_server_applies_a_threshold_per_inferred_domain(
    artifact_copy: Callable[..., Path],
    server_factory: Callable[..., Any],
    image_bytes: dict[str, bytes],
) -> None:
    """metadata domain_calibration.thresholds: each photo is labelled, tiered and answered
    with the threshold of the domain its own features are read as, over HTTP too."""
    plain_dir = artifact_copy("plain")
    plain = TriageModel.load(plain_dir)
    names = [p.name for p in IMAGES[:6]]
    batch = fixture_batch(plain, 6)
    served = plain._call("serve", batch)
    dc = _reading_half_as_phone(served)
    phone = dc.second_domain_probability(served["ood_embedding"]) >= 0.5
    assert 0 < phone.sum() < len(phone)
    spec = {**dc.describe(), "thresholds": {"dermoscopy": 0.25, "phone": 0.9}}
    model_dir = artifact_copy("per-domain-thresholds", domain_calibration=spec)
    dc.save(model_dir / FILE)
    model = TriageModel.load(model_dir)
    out = model.infer(batch)
    np.testing.assert_allclose(
        out.probabilities, dc.calibrate(served["logit"], served["ood_embedding"]), rtol=1e-5
    )
    assert_phone_threshold_and_offline_answers(model_dir, served, out, phone)
    assert out.domains == ["phone" if s else "dermoscopy" for s in phone]
    assert plain.infer(batch).domains is None
    p_plain, t_plain = ServedAnswer.of(plain_dir, plain.metadata.raw).answer(served["logit"], {})
    np.testing.assert_allclose(p_plain, plain.infer(batch).probabilities, rtol=1e-5)
    assert set(t_plain) == {plain.metadata.raw["threshold"]}
    # The tiers (low 0-0.2, moderate 0.2-0.4, high 0.4-1, threshold 0.4) follow the threshold.
    assert [(t.name, t.lower, t.upper) for t in model.tiers_for(0.9)] == [
        ("low", 0.0, 0.2), ("moderate", 0.2, 0.9), ("high", 0.9, 1.0)
    ]  # fmt: skip
    assert model.tier_for(0.5, 0.9).name == "moderate" and model.tier_for(0.5).name == "high"
    assert model.label_for(0.5, 0.9) == "benign" and model.label_for(0.5) == "malignant"
    assert model.tier_position(model.tier_for(0.95, 0.9), 0.9) == "above"

    with server_factory(model_dir=model_dir) as live, live.client() as c:
        for name, p, t in zip(names, out.probabilities, out.thresholds, strict=True):
            body = c.post(
                "/predict?explain=false", files={"file": (name, image_bytes[name], "image/jpeg")}
            ).json()
            assert body["status"] == "ok", body
            assert body["threshold"] == pytest.approx(t)
            assert body["photo_domain"] == ("phone" if t == 0.9 else "dermoscopy")
            assert body["label"] == ("malignant" if p >= t else "benign")
            tier = model.tier_for(float(p), float(t))
            assert body["risk_tier"]["name"] == tier.name
            assert body["risk_tier"]["upper"] == pytest.approx(tier.upper)
        page = c.post("/assess", files={"file": (names[0], image_bytes[names[0]], "image/jpeg")})
        assert page.status_code == 200
        want = "90%" if phone[0] else "25%"
        assert f"doctor's check from {want}" in page.text
        # The card names the kind of photo it was read as (static/app.js shows the same line).
        kind = "phone" if phone[0] else "dermoscopy"
        assert f'class="hint photo-kind" data-photo-domain="{kind}"' in page.text
        assert f"Read as {PHOTO_KINDS[kind]}." in page.text
        # Operators see the mix of photo kinds (the page's photo counted too).
        metrics = c.get("/metrics").text
        for domain, n in (
            ("phone", int(phone.sum()) + int(phone[0])),
            ("dermoscopy", int((~phone).sum()) + int(not phone[0])),
        ):
            assert f'triage_assessed_by_domain_total{{domain="{domain}"}} {n}.0' in metrics


def test_domain_thresholds_outside_the_neighbouring_tiers_are_refused(
    artifact_copy: Callable[..., Path],
) -> None:
    plain = TriageModel.load(artifact_copy("plain"))
    batch = fixture_batch(plain, 4)
    dc = _reading_half_as_phone(plain._call("serve", batch))
    bad_thresholds: list[dict[str, Any]] = [
        {"dermoscopy": 0.1, "phone": 0.5},  # below the tier under the threshold (0.2-0.4)
        {"dermoscopy": 0.3},  # a domain missing
        {"dermoscopy": "x", "phone": 0.5},
    ]
    for i, bad in enumerate(bad_thresholds):
        model_dir = artifact_copy(
            f"bad-{i}", domain_calibration={**dc.describe(), "thresholds": bad}
        )
        dc.save(model_dir / FILE)
        with pytest.raises(ModelLoadError, match="thresholds"):
            TriageModel.load(model_dir)


def test_server_and_offline_answers_apply_a_hard_assignment_from_the_artifact(
    artifact_copy: Callable[..., Path],
) -> None:
    """The assignment travels in the calibration file: TriageModel.infer and ServedAnswer
    give each photo its inferred domain's scaling and threshold, with nothing else told."""
    plain = TriageModel.load(artifact_copy("plain"))
    batch = fixture_batch(plain, 6)
    served = plain._call("serve", batch)
    dc = replace(_reading_half_as_phone(served), assignment="hard")
    phone = dc.is_second_domain(served["ood_embedding"])
    assert 0 < phone.sum() < len(phone)
    spec = {**dc.describe(), "thresholds": {"dermoscopy": 0.25, "phone": 0.9}}
    model_dir = artifact_copy("hard", domain_calibration=spec)
    dc.save(model_dir / FILE)
    out = TriageModel.load(model_dir).infer(batch)
    both = dc.per_domain(served["logit"])
    np.testing.assert_allclose(
        out.probabilities, np.where(phone, both[:, 1], both[:, 0]), rtol=1e-5
    )
    assert_phone_threshold_and_offline_answers(model_dir, served, out, phone)


def test_export_fast_reads_the_domain_from_its_own_output_when_the_gate_reads_another(
    artifact_copy: Callable[..., Path],
) -> None:
    """The skin gate may score ``skin_embedding`` (or no gate, ``embedding``) while the domain
    is read from ``ood_embedding``: export-fast keeps both, and answers as the server does."""
    pytest.importorskip("openvino")
    from model_training.export_fast import export_fast
    from tests.conftest import fixture_validation

    plain = TriageModel.load(artifact_copy("plain"))
    dc = _reading_half_as_phone(plain._call("serve", fixture_batch(plain, 6)))
    spec = {**dc.describe(), "thresholds": {"dermoscopy": 0.25, "phone": 0.9}}
    model_dir = artifact_copy("domain-apart", domain_calibration=spec)
    dc.save(model_dir / FILE)
    assert "ood" not in json.loads((model_dir / "metadata.json").read_text())
    export_fast(
        model_dir, *fixture_validation(), batch_size=4, bench_seconds=0.2, precisions=["f32"]
    )
    record = json.loads((model_dir / "metadata.json").read_text())["runtimes"]["openvino"]
    assert record["passed"] is True
    assert record["agreement"]["label_agreement"] == 1.0
    assert record["agreement"]["max_probability_diff"] < 1e-4
