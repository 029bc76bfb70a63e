"""The shipped model ``models/default``: its metadata is complete, consistent and reproducible.

Re-scores the validation splits through the exported SavedModel exactly as
``model_training.evaluate.predict_artifact`` does (shared preprocessing, batches of 16,
``serve``), independently of that code, and checks the headline metrics stored in
``metadata.json``. HAM10000 (1444 images) is skipped to save time.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

REPO = Path(__file__).resolve().parents[1]
SHIPPED = REPO / "models" / "default"
DATA_DIR = Path(os.environ.get("SHARED_DATA_DIR") or REPO.parent / "shared" / "data")
OPTIONAL_KEYS = {"ood", "quality"}  # "may be absent" per docs/ARTIFACT.md
TOLERANCE = 1e-3
# A case whose probability is within this of the threshold may fall either side of it after
# a last-bit difference in the arithmetic: the threshold *is* one validation probability.
TIE_BAND = 1e-5

pytestmark = [
    pytest.mark.slow,
    pytest.mark.data,
    pytest.mark.skipif(
        not (SHIPPED / "metadata.json").is_file(),
        reason=f"no shipped model yet: {SHIPPED / 'metadata.json'} does not exist",
    ),
]
needs_data = pytest.mark.skipif(
    not (DATA_DIR / "isic2017" / "labels.csv").is_file(),
    reason=f"the real data sets are not at {DATA_DIR} (set SHARED_DATA_DIR)",
)


@pytest.fixture(scope="module")
def artifact() -> Path:
    """The shipped artifact folder."""
    return SHIPPED


@pytest.fixture(scope="module")
def metadata(artifact: Path) -> dict[str, Any]:
    """Its metadata.json."""
    data: dict[str, Any] = json.loads((artifact / "metadata.json").read_text())
    return data


def documented_metadata_keys() -> set[str]:
    """Top-level keys of the metadata.json example in docs/ARTIFACT.md."""
    text = (REPO / "docs" / "ARTIFACT.md").read_text()
    block = text.split("## metadata.json", 1)[1].split("```json", 1)[1].split("```", 1)[0]
    keys = set(re.findall(r'^  "([a-z_]+)":', block, flags=re.MULTILINE))
    assert {"schema_version", "threshold", "risk_tiers"} <= keys  # the parse itself worked
    return keys


def test_metadata_has_every_documented_key(artifact: Path, metadata: dict[str, Any]) -> None:
    """Every key of docs/ARTIFACT.md (ood/quality only where present) and the listed files."""
    missing = documented_metadata_keys() - OPTIONAL_KEYS - set(metadata)
    assert not missing, f"metadata.json lacks {sorted(missing)}"
    assert metadata["schema_version"] == 1
    assert (artifact / "saved_model" / "saved_model.pb").is_file()
    assert (artifact / "metrics.json").is_file()
    assert (artifact / "MODEL_CARD.md").is_file()
    if "ood" in metadata:
        assert (artifact / metadata["ood"]["file"]).is_file()
        assert math.isfinite(float(metadata["ood"]["threshold"]))
    inp = metadata["input"]
    assert (inp["height"], inp["width"], inp["channels"]) == (299, 299, 3)
    assert metadata["architecture"] == "InceptionV3"
    validation = metadata["metrics"]["validation"]
    for name in ("isic2017", "pad-ufes-20", "pooled"):
        assert {"n", "n_positive", "roc_auc", "sensitivity", "specificity"} <= set(
            validation[name]
        ), name


def test_threshold_and_risk_tiers_are_consistent(metadata: dict[str, Any]) -> None:
    """Tiers cover [0, 1] without gaps or overlaps; the lowest tier ends at the threshold.

    So the tier never contradicts the label: "low" is exactly what the threshold calls benign.
    """
    threshold = float(metadata["threshold"])
    assert 0.0 < threshold < 1.0
    assert float(metadata["temperature"]) > 0.0
    tiers = metadata["risk_tiers"]
    assert len(tiers) >= 2
    assert tiers[0]["lower"] == 0.0
    assert tiers[-1]["upper"] == 1.0
    for below, above in itertools.pairwise(tiers):
        assert below["upper"] == above["lower"], (below["name"], above["name"])
    for tier in tiers:
        assert tier["lower"] <= tier["upper"], tier["name"]
        assert tier["name"] and isinstance(tier["name"], str)
    assert tiers[0]["upper"] == pytest.approx(threshold, abs=1e-12)
    assert all(t["lower"] >= threshold - 1e-12 for t in tiers[1:])
    assert len({t["name"] for t in tiers}) == len(tiers)


def rescore(
    artifact: Path, paths: Sequence[str], batch_size: int = 16, output: str = "embedding"
) -> tuple[np.ndarray, np.ndarray]:
    """Logits of the SavedModel's ``serve`` as predict_artifact computes them (identity view),
    and its ``output`` (what a per-domain calibration reads)."""
    import tensorflow as tf

    from model_training.preprocessing import image_to_input

    meta = json.loads((artifact / "metadata.json").read_text())
    size = (meta["input"]["height"], meta["input"]["width"])
    model = tf.saved_model.load(str(artifact / "saved_model"))
    logits, features = [], []
    for start in range(0, len(paths), batch_size):
        batch = np.stack([image_to_input(p, size) for p in paths[start : start + batch_size]])
        out = model.serve(tf.constant(batch))
        logits.append(out["logit"].numpy())
        features.append(out[output].numpy())
    return np.concatenate(logits).astype(np.float64), np.concatenate(features)


@needs_data
def test_evaluate_scores_the_output_the_domain_classifier_reads(artifact: Path) -> None:
    """``evaluate`` fits (and caches) the domain classifier on the serve output that the
    calibration file names, as the server reads it: not the final embedding (2,048 values,
    which an earlier version scored under the mid-level output's name)."""
    from model_training.domain_calibration import FILE, DomainCalibration
    from model_training.evaluate import DOMAIN_OUTPUT, predict_artifact

    paths = sorted(str(p) for p in (DATA_DIR / "pad-ufes-20" / "images").glob("*.jpg"))[:3]
    paths += sorted(str(p) for p in (DATA_DIR / "isic2017" / "images").glob("*.jpg"))[:3]
    _, features, _ = predict_artifact(artifact, paths)
    _, served = rescore(artifact, paths, output=DOMAIN_OUTPUT)
    np.testing.assert_allclose(features, served, rtol=1e-4, atol=1e-4)
    domain = DomainCalibration.load(artifact / FILE)
    assert domain.embedding_output == DOMAIN_OUTPUT
    assert features.shape == (len(paths), domain.mean.shape[0])


def served_probabilities(
    artifact: Path, metadata: dict[str, Any], paths: Sequence[str]
) -> tuple[np.ndarray, np.ndarray]:
    """(calibrated p, each image's decision threshold) as the server computes them: the
    single temperature, or the per-domain calibration and thresholds metadata names."""
    spec = metadata.get("domain_calibration")
    if spec is None:
        logits, _ = rescore(artifact, paths)
        shifted = logits + float(metadata.get("logit_bias", 0.0))
        p = 1.0 / (1.0 + np.exp(-shifted / float(metadata["temperature"])))
        return p, np.full(p.shape, float(metadata["threshold"]))
    from model_training.domain_calibration import DomainCalibration

    dc = DomainCalibration.load(artifact / spec["file"])
    logits, features = rescore(artifact, paths, output=dc.embedding_output)
    p = dc.calibrate(logits, features)
    thresholds = spec.get("thresholds")
    if thresholds is None:
        return p, np.full(p.shape, float(metadata["threshold"]))
    second = dc.second_domain_probability(features) >= 0.5
    return p, np.where(second, thresholds[dc.domains[1]], thresholds[dc.domains[0]])


def _rate_bounds(
    p: np.ndarray, threshold: float | np.ndarray, positive: bool
) -> tuple[float, float]:
    """(lowest, highest) rate of ``p >= threshold`` (or ``<``) when ties may go either way."""
    above_surely = p >= threshold + TIE_BAND
    above_maybe = p >= threshold - TIE_BAND
    if positive:
        return float(above_surely.mean()), float(above_maybe.mean())
    return float((~above_maybe).mean()), float((~above_surely).mean())


@needs_data
@pytest.mark.parametrize("name", ["isic2017", "pad-ufes-20"])
def test_validation_metrics_reproduce(artifact: Path, metadata: dict[str, Any], name: str) -> None:
    """ROC-AUC, sensitivity and specificity at the shipped threshold(s) match metadata.json."""
    from model_training.data import read_dataset

    df = read_dataset(DATA_DIR / name, name)
    df = df[df["split"] == "valid"].reset_index(drop=True)
    y = df["label"].to_numpy().astype(int)
    p, threshold = served_probabilities(artifact, metadata, df["path"].tolist())
    stored = metadata["metrics"]["validation"][name]

    assert stored["n"] == len(df)
    assert stored["n_positive"] == int(y.sum())
    assert roc_auc_score(y, p) == pytest.approx(stored["roc_auc"], abs=TOLERANCE)
    ties = int(np.sum(np.abs(p - threshold) < TIE_BAND))
    assert ties <= 2, f"{ties} validation cases sit on the threshold"
    for key, positive in (("sensitivity", True), ("specificity", False)):
        mask = y == (1 if positive else 0)
        low, high = _rate_bounds(p[mask], threshold[mask], positive)
        assert low - TOLERANCE <= stored[key] <= high + TOLERANCE, (key, low, high, stored[key])


def test_shipped_gates_answer_lesions_with_artefacts_and_refuse_non_skin(artifact: Path) -> None:
    """Through the server's own model and gates: every fixture lesion photo, plain and with
    each everyday artefact drawn on it, passes both gates; photos that are not of skin (a
    cat, a rendered document and a screenshot, none used to fit the shipped gate) are refused.
    """
    from app.gates import build_gates
    from app.model import TriageModel
    from model_training.artefacts import ARTEFACTS, with_artefact
    from model_training.gates.photos import render_synthetic
    from model_training.preprocessing import load_image_file, resize_to_input

    model = TriageModel.load(artifact)
    gates = build_gates(model.metadata, artifact)
    assert gates.quality is not None and gates.ood is not None
    size = model.metadata.input_size
    fixtures = sorted((REPO / "tests" / "fixtures" / "images").glob("*.jpg"))
    lesions = {}
    for path in fixtures:
        photo = load_image_file(path)
        lesions[path.stem] = photo
        for kind in ARTEFACTS:
            lesions[f"{path.stem}+{kind}"] = with_artefact(photo, kind, 3)
    for name, img in lesions.items():
        assert gates.quality.check(img) == [], name
    emb = model.infer(np.stack([resize_to_input(im, size) for im in lesions.values()])).embeddings
    assert emb is not None
    refused, _ = gates.ood.check(emb)
    assert not refused.any(), [n for n, r in zip(lesions, refused, strict=True) if r]

    others = {
        "document": render_synthetic("document", 10_001),
        "screenshot": render_synthetic("screenshot", 10_002),
    }
    skdata = pytest.importorskip("skimage.data")
    from PIL import Image

    others["cat"] = Image.fromarray(skdata.chelsea()).convert("RGB")
    emb = model.infer(np.stack([resize_to_input(im, size) for im in others.values()])).embeddings
    assert emb is not None
    refused, _ = gates.ood.check(emb)
    assert refused.all(), dict(zip(others, refused.tolist(), strict=True))
