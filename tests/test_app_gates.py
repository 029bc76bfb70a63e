"""Quality gate, skin gate and artefact notes, switched on by the artifact's metadata.

They use the project's real gate implementations (model_training.quality / .skin).
"""

from __future__ import annotations

import io
import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from PIL import Image, ImageFilter

IMAGES = Path(__file__).parent / "fixtures" / "images"
PHOTO = IMAGES / "pad-ufes-20_nev_PAT_1107_427_352.jpg"
# Lenient thresholds every fixture photo passes (their sharpness is 12..180, brightness
# 76..164, no clipping, colourfulness well above 3), strict enough that a degraded copy fails.
QUALITY = {
    "min_side": 64,
    "min_sharpness": 5.0,
    "min_brightness": 30.0,
    "max_brightness": 235.0,
    "max_clipped_fraction": 0.5,
    "min_colourfulness": 3.0,
}


def png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def test_no_gate_keys_means_no_gates(artifact_dir: Path) -> None:
    from app.gates import build_gates
    from app.model import TriageModel

    model = TriageModel.load(artifact_dir)
    gates = build_gates(model.metadata, artifact_dir)
    assert gates.quality is None and gates.ood is None


@pytest.fixture(scope="module")
def quality_server(
    artifact_dir: Path, tmp_path_factory: pytest.TempPathFactory, server_factory: Any
) -> Iterator[Any]:
    model_dir = tmp_path_factory.mktemp("quality") / "artifact"
    import shutil

    shutil.copytree(artifact_dir, model_dir)
    meta = json.loads((model_dir / "metadata.json").read_text())
    meta["quality"] = QUALITY
    (model_dir / "metadata.json").write_text(json.dumps(meta))
    with server_factory(model_dir=model_dir) as live:
        yield live


def test_quality_gate_refuses_a_too_small_photo(quality_server: Any) -> None:
    tiny = Image.open(PHOTO).convert("RGB").resize((32, 32))
    with quality_server.client() as c:
        r = c.post("/predict", files={"file": ("tiny.png", png(tiny), "image/png")})
        assert r.status_code == 200
        body = r.json()
        assert body["status"] == "unable_to_assess"
        assert body["label"] is None and body["probability_malignant"] is None
        assert body["risk_tier"] is None
        codes = [reason["code"] for reason in body["reasons"]]
        assert "too_small" in codes
        assert all(reason["message"] and reason["advice"] for reason in body["reasons"])
        assert body["advice"]
        metrics = c.get("/metrics").text
        assert 'triage_rejected_inputs_total{reason="too_small"}' in metrics

        ok = c.post("/predict", files={"file": ("ok.jpg", PHOTO.read_bytes(), "image/jpeg")})
        assert ok.json()["status"] == "ok"
        gates = c.get("/model").json()["server"]["gates"]
        assert gates["quality"] is True


@pytest.mark.parametrize(
    ("degrade", "code"),
    [
        (lambda img: img.point(lambda v: v // 12), "too_dark"),
        (lambda img: img.point(lambda v: min(255, v * 3)), "overexposed"),
        (
            lambda img: img.resize((24, 24)).resize(img.size, Image.Resampling.BILINEAR),
            "too_blurry",
        ),
        (lambda img: img.convert("L"), "no_colour"),
    ],
)
def test_quality_gate_names_what_is_wrong(
    quality_server: Any, degrade: Callable[[Image.Image], Image.Image], code: str
) -> None:
    photo = degrade(Image.open(PHOTO).convert("RGB"))
    with quality_server.client() as c:
        body = c.post("/predict", files={"file": ("p.png", png(photo), "image/png")}).json()
    assert body["status"] == "unable_to_assess"
    assert [reason["code"] for reason in body["reasons"]] == [code]


def test_every_fixture_photo_passes_the_quality_gate(quality_server: Any) -> None:
    files = [
        ("files", (p.name, p.read_bytes(), "image/jpeg")) for p in sorted(IMAGES.glob("*.jpg"))
    ]
    with quality_server.client(params={"explain": "false"}) as c:
        results = c.post("/predict/batch", files=files[:4]).json()["results"]
        results += c.post("/predict/batch", files=files[4:]).json()["results"]
    assert [r["status"] for r in results] == ["ok"] * len(files)


def test_quality_gate_in_a_batch_only_affects_the_bad_photo(quality_server: Any) -> None:
    tiny = Image.open(PHOTO).convert("RGB").resize((20, 20))
    files = [
        ("files", ("tiny.png", png(tiny), "image/png")),
        ("files", ("ok.jpg", PHOTO.read_bytes(), "image/jpeg")),
    ]
    with quality_server.client() as c:
        results = c.post("/predict/batch", files=files).json()["results"]
    assert [r["status"] for r in results] == ["unable_to_assess", "ok"]


def test_quality_gate_on_the_result_page(quality_server: Any) -> None:
    blurred = Image.open(PHOTO).convert("RGB").resize((40, 40)).filter(ImageFilter.BLUR)
    with quality_server.client() as c:
        r = c.post("/assess", files={"file": ("small.png", png(blurred), "image/png")})
    assert r.status_code == 200
    assert "We could not assess this photo" in r.text


def constant_gate(dim: int, skin_bias: float, note_bias: float | None = None) -> Any:
    """A skin gate whose heads ignore the features: every photo scores its bias."""
    from model_training.skin import SKIN_HEAD, SkinGate

    names = [SKIN_HEAD] + ([] if note_bias is None else ["hair"])
    biases = [skin_bias] + ([] if note_bias is None else [note_bias])
    return SkinGate(
        names, np.zeros((len(names), dim)), np.asarray(biases), dict.fromkeys(names, 0.0)
    )


@pytest.mark.parametrize("output", [None, "ood_embedding"])
def test_skin_gate_is_built_from_the_artifact(
    artifact_copy: Callable[..., Path], output: str | None
) -> None:
    """The gate scores the serve output metadata names (none named: ``embedding``)."""
    import tensorflow as tf

    from app.gates import build_gates
    from app.model import TriageModel

    block: dict[str, Any] = {
        "file": "skin.npz",
        "method": "skin-logistic",
        "threshold": 0.0,
        "notes": {"hair": {"threshold": 0.0}},
    }
    if output is not None:
        block["embedding_output"] = output
    model_dir = artifact_copy(ood=block)
    model = TriageModel.load(model_dir)  # the weights file is only read by build_gates
    assert model.metadata.ood_embedding_output == (output or "embedding")
    rng = np.random.default_rng(0)
    batch = rng.uniform(0, 255, (32, 64, 64, 3)).astype(np.float32)
    embeddings = model.infer(batch).embeddings
    assert embeddings is not None
    saved = tf.saved_model.load(str(model_dir / "saved_model"))  # kept: serve needs its variables
    served = saved.serve(tf.constant(batch))
    np.testing.assert_allclose(
        embeddings, served[output or "embedding"].numpy(), rtol=1e-5, atol=1e-6
    )
    for skin_bias, note_bias in ((1.0, -1.0), (-1.0, 1.0)):
        constant_gate(embeddings.shape[1], skin_bias, note_bias).save(model_dir / "skin.npz")
        gates = build_gates(model.metadata, model_dir)
        assert gates.ood is not None and gates.ood.output == (output or "embedding")
        refused, score = gates.ood.check(embeddings)
        assert refused.shape == (32,) and refused.all() == (skin_bias < 0)
        assert (not refused.any()) == (skin_bias > 0)
        np.testing.assert_allclose(score, skin_bias)
        notes = gates.ood.notes(embeddings)
        assert [[n.code for n in row] for row in notes] == [["hair"] if note_bias > 0 else []] * 32


def test_app_refuses_to_start_when_the_gate_output_is_not_served(
    artifact_copy: Callable[..., Path],
) -> None:
    """ood.embedding_output must be a serve output: in metadata, and in the SavedModel."""
    from app.main import load_service
    from app.metadata import ModelLoadError
    from app.metrics import Metrics
    from app.model import TriageModel
    from app.settings import Settings

    block = {"file": "skin.npz", "threshold": 0.0, "embedding_output": "mixed7_embedding"}
    model_dir = artifact_copy(ood=block)
    with pytest.raises(ModelLoadError, match="embedding_output 'mixed7_embedding'"):
        TriageModel.load(model_dir)
    with pytest.raises(ModelLoadError, match="mixed7_embedding"):
        load_service(Settings(model_dir=model_dir), Metrics())

    # Without embedding_output the gate reads `embedding`, which serve must then list.
    meta = json.loads((model_dir / "metadata.json").read_text())
    meta["ood"] = {"file": "skin.npz", "threshold": 0.0}
    meta["endpoints"]["serve"] = ["logit", "ood_embedding"]
    (model_dir / "metadata.json").write_text(json.dumps(meta))
    with pytest.raises(ModelLoadError, match=r"'embedding' is not an output of endpoints\.serve"):
        TriageModel.load(model_dir)

    # Listed in metadata but not returned by the SavedModel: the warm-up refuses it.
    constant_gate(4, 1.0).save(model_dir / "skin.npz")
    meta["ood"]["embedding_output"] = "mixed7_embedding"
    meta["endpoints"]["serve"] = ["logit", "embedding", "ood_embedding", "mixed7_embedding"]
    (model_dir / "metadata.json").write_text(json.dumps(meta))
    with pytest.raises(ModelLoadError, match=r"did not return.*mixed7_embedding"):
        load_service(Settings(model_dir=model_dir), Metrics())


def test_a_gate_file_of_the_old_method_stops_startup(artifact_copy: Callable[..., Path]) -> None:
    """An artifact whose gate file is not a skin gate must be refitted, not served ungated."""
    from app.gates import build_gates
    from app.metadata import ModelLoadError
    from app.model import TriageModel

    model_dir = artifact_copy(ood={"file": "ood.npz", "method": "mahalanobis", "threshold": 9.0})
    np.savez(model_dir / "ood.npz", format_version=np.int64(1), method=np.str_("mahalanobis"))
    model = TriageModel.load(model_dir)
    with pytest.raises(ModelLoadError, match="refit"):
        build_gates(model.metadata, model_dir)


def test_client_never_sees_a_500_for_odd_inputs(client: httpx.Client) -> None:
    """Odd but plausible uploads get a 2xx/4xx answer with a detail, never a 500."""
    odd = [
        b"\x89PNG\r\n\x1a\n" + b"\0" * 64,  # PNG signature, no image
        b"GIF89a" + b"\0" * 20,
        b"\xff\xd8\xff\xe0" + b"\0" * 10,  # JPEG header only
        b"RIFF\x00\x00\x00\x00WEBPVP8 ",
        b"<svg xmlns='http://www.w3.org/2000/svg'/>",
        b"%PDF-1.4\n",
    ]
    for data in odd:
        r = client.post("/predict", files={"file": ("x", data, "application/octet-stream")})
        assert r.status_code in (200, 415), (data[:10], r.status_code, r.text)
        assert "detail" in r.json() or r.json()["status"]
    # A 1x1 image is decodable; with no quality gate in this artifact it is assessed.
    r = client.post("/predict", files={"file": ("1.png", png(Image.new("RGB", (1, 1))))})
    assert r.status_code == 200


def _candidates() -> dict[str, bytes]:
    """Photos to send: the lesion fixtures plus things that are not skin-lesion photos."""
    rng = np.random.default_rng(3)
    checker = np.kron((np.indices((8, 8)).sum(axis=0) % 2) * 255, np.ones((16, 16)))
    others = {
        "white": Image.new("RGB", (128, 128), (255, 255, 255)),
        "blue": Image.new("RGB", (128, 128), (20, 60, 230)),
        "checkerboard": Image.fromarray(checker.astype(np.uint8)).convert("RGB"),
        "noise": Image.fromarray(rng.integers(0, 255, (128, 128, 3), dtype=np.uint8)),
    }
    photos = {p.name: p.read_bytes() for p in sorted(IMAGES.glob("*.jpg"))}
    return {**photos, **{name: png(img) for name, img in others.items()}}


@pytest.fixture(scope="module")
def ood_server(
    artifact_dir: Path, tmp_path_factory: pytest.TempPathFactory, server_factory: Any
) -> Iterator[tuple[Any, dict[str, bool], dict[str, list[str]]]]:
    """A server whose artifact has a skin gate fitted on the lesion fixtures (positives) and
    the made-up non-skin images (negatives), plus a hair-note head that fires on about half
    of the fixtures.

    Yields the server and, per candidate photo, whether the gate itself (run here on the
    same preprocessing) refuses it and which notes it gives: the server must agree.
    """
    import shutil

    from app.model import TriageModel
    from model_training.preprocessing import decode_image, resize_to_input
    from model_training.skin import SKIN_HEAD, SkinGate

    model_dir = tmp_path_factory.mktemp("skin") / "artifact"
    shutil.copytree(artifact_dir, model_dir)
    meta = json.loads((model_dir / "metadata.json").read_text())
    # As shipped artifacts do: the gate scores one serve output, here ood_embedding.
    block: dict[str, Any] = {
        "file": "skin.npz",
        "method": "skin-logistic",
        "embedding_output": "ood_embedding",
        "threshold": 0.0,
    }
    meta["ood"] = block
    (model_dir / "metadata.json").write_text(json.dumps(meta))
    model = TriageModel.load(model_dir)  # infer() now returns ood_embedding
    size = model.metadata.input_size
    candidates = _candidates()
    batch = np.stack([resize_to_input(decode_image(b), size) for b in candidates.values()])
    emb = model.infer(batch).embeddings
    assert emb is not None
    is_photo = np.asarray([n.endswith(".jpg") for n in candidates])
    # With more dimensions than candidates, minimum-norm least-squares lines score exactly
    # the targets: skin +1 for the photos, -1 for the made-up images; the hair note +1 for
    # every other photo, -1 for the rest.
    x = np.c_[emb.astype(np.float64), np.ones(len(emb))]
    hair = is_photo & (np.cumsum(is_photo) % 2 == 1)
    coef = np.linalg.lstsq(x, np.c_[np.where(is_photo, 1.0, -1.0), np.where(hair, 1.0, -1.0)],
                           rcond=None)[0]  # fmt: skip
    gate = SkinGate([SKIN_HEAD, "hair"], coef[:-1].T, coef[-1], {SKIN_HEAD: 0.0, "hair": 0.0})
    gate.save(model_dir / "skin.npz")
    meta["ood"] = {**block, "notes": {"hair": {"threshold": 0.0}}}
    (model_dir / "metadata.json").write_text(json.dumps(meta))

    gate = SkinGate.load(model_dir / "skin.npz", {SKIN_HEAD: 0.0, "hair": 0.0})
    refused = dict(zip(candidates, gate.not_skin(emb).tolist(), strict=True))
    notes = {n: [x.code for x in row] for n, row in zip(candidates, gate.notes(emb), strict=True)}
    with server_factory(model_dir=model_dir) as live:
        yield live, refused, notes


def test_skin_gate_refuses_what_the_gate_refuses(
    ood_server: tuple[Any, dict[str, bool], dict[str, list[str]]],
) -> None:
    live, refused, notes = ood_server
    assert not any(refused[p.name] for p in IMAGES.glob("*.jpg"))  # fitted on these
    assert any(refused.values()), "no candidate is refused: the test proves nothing"
    with live.client() as c:
        assert c.get("/model").json()["server"]["gates"]["ood"] is True
        for name, data in _candidates().items():
            body = c.post("/predict?explain=true", files={"file": (name, data)}).json()
            if refused[name]:
                assert body["status"] == "not_a_lesion", name
                assert body["label"] is None and body["probability_malignant"] is None
                assert [r["code"] for r in body["reasons"]] == ["not_a_lesion"]
                assert "heatmap_png_base64" not in body
                assert body.get("notes", []) == []
            else:
                assert body["status"] == "ok", name
                assert body["heatmap_png_base64"]
                assert [n["code"] for n in body["notes"]] == notes[name], name
        assert 'triage_rejected_inputs_total{reason="not_a_lesion"}' in c.get("/metrics").text


def test_artefact_notes_come_with_the_answer(
    ood_server: tuple[Any, dict[str, bool], dict[str, list[str]]],
) -> None:
    """A noted photo is still assessed; the note (code, message, advice) is in the JSON and
    on the result page; a photo without a note shows none."""
    from model_training.skin import NOTE_TEXTS

    live, refused, notes = ood_server
    noted = [p for p in sorted(IMAGES.glob("*.jpg")) if notes[p.name]]
    plain = [p for p in sorted(IMAGES.glob("*.jpg")) if not notes[p.name] and not refused[p.name]]
    assert noted and plain, "the note head must split the fixtures"
    message, advice = NOTE_TEXTS["hair"]
    with live.client() as c:
        body = c.post("/predict", files={"file": (noted[0].name, noted[0].read_bytes())}).json()
        assert body["status"] == "ok" and body["probability_malignant"] is not None
        assert body["notes"] == [{"code": "hair", "message": message, "advice": advice}]
        page = c.post("/assess", files={"file": (noted[0].name, noted[0].read_bytes())}).text
        assert 'data-note="hair"' in page and "Something in the photo can affect" in page
        page = c.post("/assess", files={"file": (plain[0].name, plain[0].read_bytes())}).text
        assert "data-note" not in page
