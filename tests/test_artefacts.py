"""The ink-marker shortcut check draws a ring and measures the model's answers with it."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from model_training.artefacts import ARTEFACTS, draw_ink_ring, ink_shortcut_check, with_artefact

FIXTURES = Path(__file__).parent / "fixtures" / "images"


def test_ring_marks_the_periphery_not_the_centre() -> None:
    img = Image.new("RGB", (200, 200), (200, 160, 140))
    marked = np.asarray(draw_ink_ring(img, (88, 60, 150), seed=0)).astype(int)
    changed = np.any(marked != np.asarray(img).astype(int), axis=2)
    assert changed.mean() > 0.01
    assert not changed[80:120, 80:120].any()  # the lesion in the middle is left alone
    assert np.all(marked[changed] == (88, 60, 150))


def test_check_reports_every_set_and_colour(artifact_dir: Path, tmp_path: Path) -> None:
    images = sorted(FIXTURES.glob("*.jpg"))
    folder = tmp_path / "pad-ufes-20"
    (folder / "images").mkdir(parents=True)
    rows = ["image_id,label,split"]
    for i, src in enumerate(images):
        shutil.copy(src, folder / "images" / src.name)
        rows.append(f"{src.stem},{i % 2},valid")
    (folder / "labels.csv").write_text("\n".join(rows) + "\n")
    result = ink_shortcut_check(artifact_dir, tmp_path, sets=("pad-ufes-20",))
    colours = [k for k in result if k.startswith("ink_rgb_")]
    assert len(colours) == 2
    for key in colours:
        entry = result[key]["pad-ufes-20"]
        assert entry["n"] == len(images)
        assert np.isfinite(entry["mean_logit_change"])
        # A random tiny model does react to a drawn ring: the check must see a change.
        assert entry["mean_logit_change"] != 0.0


@pytest.mark.parametrize("name", sorted(ARTEFACTS))
def test_each_artefact_changes_the_photo_reproducibly(name: str) -> None:
    img = Image.new("RGB", (200, 150), (190, 150, 130))
    a = np.asarray(with_artefact(img, name, seed=7)).astype(int)
    b = np.asarray(with_artefact(img, name, seed=7)).astype(int)
    c = np.asarray(with_artefact(img, name, seed=8)).astype(int)
    assert a.shape == (150, 200, 3)
    assert np.array_equal(a, b)  # seeded: the same copy every time
    assert not np.array_equal(a, c)  # and a different one for another seed
    changed = np.abs(a - np.asarray(img).astype(int)).sum(axis=2) > 30
    # Visible, but never the whole photo: the lesion must stay there to be assessed.
    assert 0.002 < changed.mean() < 0.6, changed.mean()
