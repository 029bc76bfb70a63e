"""Reduced-scale JPEG decoding does not change the answer: the shipped model's calibrated
probability from a draft-mode decode stays within 0.01 of a full decode + resize.

The shared data sets hold small images only (256 px and less), so large JPEGs are made from
real photos of each set, upscaled (Lanczos) to phone-camera sizes and re-encoded at quality
90. Smooth upscaled content favours the reduced decode, so the difference on native
high-resolution photos may be somewhat larger; the margin at DRAFT_MIN_SIDE = 1024 (0.0074
measured on 72 such images; 0.012 at 600) is why the floor is 1024.
"""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from model_training.preprocessing import DRAFT_MIN_SIDE, decode_upload, resize_to_input

REPO = Path(__file__).resolve().parents[1]
SHIPPED = REPO / "models" / "default"
DATA_DIR = Path(os.environ.get("SHARED_DATA_DIR") or REPO.parent / "shared" / "data")
SETS = ("isic2017", "ham10000", "pad-ufes-20")
PER_SET = 4
SHORT_SIDES = (2100, 4200)  # decoded at 1/2 and 1/4
TOLERANCE = 0.01

pytestmark = [
    pytest.mark.slow,
    pytest.mark.data,
    pytest.mark.skipif(not (SHIPPED / "metadata.json").is_file(), reason="no shipped model"),
    pytest.mark.skipif(
        not all((DATA_DIR / s / "images").is_dir() for s in SETS),
        reason=f"the real data sets are not at {DATA_DIR} (set SHARED_DATA_DIR)",
    ),
]


def _large_jpegs() -> list[tuple[str, bytes]]:
    out = []
    for name in SETS:
        photos = sorted((DATA_DIR / name / "images").glob("*.jpg"))
        for path in photos[:: max(1, len(photos) // PER_SET)][:PER_SET]:
            src = Image.open(path).convert("RGB")
            for short in SHORT_SIDES:
                k = short / min(src.size)
                size = (round(src.width * k), round(src.height * k))
                buf = io.BytesIO()
                src.resize(size, Image.Resampling.LANCZOS).save(buf, "JPEG", quality=90)
                out.append((f"{name}/{path.stem}@{short}", buf.getvalue()))
    return out


def test_draft_decode_keeps_the_calibrated_probability_within_0_01() -> None:
    from app.model import TriageModel

    # The reference runtime: the fast one's own rounding (bf16) is measured by export-fast.
    model = TriageModel.load(SHIPPED, runtime="tensorflow")
    size = model.metadata.input_size
    names, full, reduced = [], [], []
    for name, data in _large_jpegs():
        whole = decode_upload(data, draft_min_side=0)
        draft = decode_upload(data)
        assert whole.scale == 1 and draft.scale in (2, 4), name
        assert min(draft.image.size) >= DRAFT_MIN_SIDE
        names.append(name)
        full.append(resize_to_input(whole.image, size))
        reduced.append(resize_to_input(draft.image, size))
    p = model.infer(np.stack(full + reduced)).probabilities
    diff = np.abs(p[: len(names)] - p[len(names) :])
    worst = int(np.argmax(diff))
    assert diff[worst] <= TOLERANCE, f"{names[worst]}: {diff[worst]:.4f}"
