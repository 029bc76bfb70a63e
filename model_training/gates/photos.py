"""Photos that are not of skin: what the skin gate learns to refuse, and is measured on.

Found on the machine (nothing is downloaded at run time), each source optional:

* Debian packages: ``darknet`` (dog, eagle, giraffe, horses, kite, person, scream),
  ``mate-backgrounds`` and ``lomiri-wallpapers`` (landscapes, plants, objects, textures),
  ``opencv-doc`` (OpenCV's classic test photos: faces, fruit, buildings, a chessboard...),
  ``imagemagick-6-doc`` (the manual's example photos and drawings);
* Python packages: scikit-image's ``data`` photographs, scikit-learn's two sample photos,
  Matplotlib's Grace Hopper portrait;
* rendered here with Pillow, seeded: documents, screenshots, charts and flat skin-coloured
  surfaces with printing or objects on them (not skin, but of its colour).

Each photo gives several views (the whole photo and random square crops). Photos are split
into a "fit" and a "held_out" part by photo, never by view, alternately within each source.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from model_training.gates.features import stable_seed
from model_training.preprocessing import load_image_file, to_rgb

logger = logging.getLogger("model_training.gates")

# (source name, folder, file-name glob): folders of Debian packages holding photos.
PHOTO_FOLDERS: tuple[tuple[str, str, str], ...] = (
    ("darknet", "/usr/share/darknet/data", "*.jpg"),
    ("mate", "/usr/share/backgrounds/mate", "**/*.jpg"),
    ("lomiri", "/usr/share/backgrounds", "*.jpg"),
    ("lomiri", "/usr/share/wallpapers", "**/*.jpg"),
    ("opencv", "/usr/share/doc/opencv-doc/examples/data", "*.jpg"),
    ("opencv", "/usr/share/doc/opencv-doc/examples/data", "*.png"),
    ("imagemagick", "/usr/share/doc/imagemagick-6-common/html/images", "*.jpg"),
)
MIN_SIDE = 96  # smaller files are icons, not photos
MAX_PER_SOURCE = 60
# scikit-image sample images that are real photographs (``cat`` is ``chelsea``).
SKIMAGE_PHOTOS = (
    "astronaut", "brick", "camera", "cell", "chelsea", "clock", "coffee", "coins", "eagle",
    "grass", "gravel", "hubble_deep_field", "immunohistochemistry", "lily", "moon", "page",
    "retina", "rocket", "skin", "stereo_motorcycle", "text",
)  # fmt: skip
SYNTHETIC_KINDS = ("document", "screenshot", "chart", "skin_coloured_surface")
SYNTHETIC_PER_KIND = 16
SKIN_TONES = ((224, 172, 138), (198, 134, 96), (241, 194, 160), (160, 100, 70), (120, 74, 52))
FONT_DIRS = ("/usr/share/fonts/truetype/dejavu",)


def _rgb_from_array(arr: np.ndarray) -> Image.Image:
    a = np.asarray(arr)
    if a.dtype != np.uint8:
        a = np.clip(a * (255.0 if a.max(initial=0) <= 1.0 else 1.0), 0, 255).astype(np.uint8)
    return to_rgb(Image.fromarray(a))


def _folder_photos(missing: list[str]) -> list[tuple[str, Image.Image]]:
    out: list[tuple[str, Image.Image]] = []
    counts: dict[str, int] = {}
    seen: set[Path] = set()
    # The short name (source/folder-stem) unless taken: cache keys and the fit/held-out
    # split are by name, so the photos found before keep theirs.
    names: set[str] = set()
    for source, folder, pattern in PHOTO_FOLDERS:
        root = Path(folder)
        if not root.is_dir():
            missing.append(f"{source}: no {folder}")
            continue
        for path in sorted(root.glob(pattern)):
            if path in seen or counts.get(source, 0) >= MAX_PER_SOURCE:
                continue
            seen.add(path)
            try:
                img = load_image_file(path)
            except (ValueError, OSError) as exc:
                missing.append(f"{path}: {exc}")
                continue
            if min(img.size) < MIN_SIDE:
                continue
            if max(img.size) > 1600:  # wallpapers: no need for 4K to make 299-px views
                img.thumbnail((1600, 1600))
            counts[source] = counts.get(source, 0) + 1
            name = f"{source}/{path.parent.name}-{path.stem}"
            if name in names:  # KDE-style wallpapers: <theme>/contents/images/<size>.jpg
                name = f"{source}/" + "-".join(path.relative_to(root).with_suffix("").parts)
            names.add(name)
            out.append((name, img))
    return out


def _package_photos(missing: list[str]) -> list[tuple[str, Image.Image]]:
    out: list[tuple[str, Image.Image]] = []
    try:
        import skimage.data as skdata
    except ImportError:
        missing.append("scikit-image: skimage.data photos")
    else:
        for name in SKIMAGE_PHOTOS:
            loader = getattr(skdata, name, None)
            if loader is None:
                continue
            try:
                arr = loader()
            except (KeyboardInterrupt, SystemExit):
                raise
            except BaseException as exc:  # needs the optional download (pytest: Skipped)
                missing.append(f"skimage.data.{name}: {type(exc).__name__}")
                continue
            if isinstance(arr, tuple):  # stereo_motorcycle: (left, right, disparity)
                arr = arr[0]
            out.append((f"skimage/{name}", _rgb_from_array(arr)))
    try:
        from sklearn.datasets import load_sample_images

        for i, arr in enumerate(load_sample_images().images):
            out.append((f"sklearn/sample{i}", _rgb_from_array(arr)))
    except Exception as exc:  # optional source
        missing.append(f"sklearn sample images: {exc}")
    try:
        import matplotlib

        hopper = Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg"
        out.append(("matplotlib/grace_hopper", load_image_file(hopper)))
    except Exception as exc:  # optional source
        missing.append(f"matplotlib sample photo: {exc}")
    return out


def _font(rng: np.random.Generator, size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    fonts = sorted(p for d in FONT_DIRS for p in Path(d).glob("*.ttf")) if FONT_DIRS else []
    if fonts:
        return ImageFont.truetype(str(fonts[int(rng.integers(len(fonts)))]), size)
    return ImageFont.load_default(size=size)


def _words(rng: np.random.Generator, n: int) -> str:
    letters = "abcdefghijklmnopqrstuvwxyz"
    return " ".join(
        "".join(letters[int(i)] for i in rng.integers(0, 26, int(rng.integers(2, 10))))
        for _ in range(n)
    )


def render_synthetic(kind: str, seed: int) -> Image.Image:
    """A seeded document, screenshot, chart or skin-coloured surface with things on it."""
    rng = np.random.default_rng(seed)
    w, h = int(rng.integers(320, 900)), int(rng.integers(320, 900))
    if kind == "document":
        paper = tuple(int(v) for v in rng.integers(225, 256, 3))
        img = Image.new("RGB", (w, h), paper)
        draw = ImageDraw.Draw(img)
        size = int(rng.integers(10, 26))
        font = _font(rng, size)
        y = int(rng.integers(5, 40))
        while y < h - size:
            draw.text((int(rng.integers(8, 40)), y), _words(rng, 12), fill=(20, 20, 30), font=font)
            y += int(size * rng.uniform(1.3, 2.0))
    elif kind == "screenshot":
        img = Image.new("RGB", (w, h), tuple(int(v) for v in rng.integers(200, 256, 3)))
        draw = ImageDraw.Draw(img)
        draw.rectangle((0, 0, w, 28), fill=tuple(int(v) for v in rng.integers(30, 120, 3)))
        font = _font(rng, 14)
        for _ in range(int(rng.integers(4, 12))):
            x0, y0 = int(rng.integers(0, w - 40)), int(rng.integers(30, h - 20))
            x1, y1 = x0 + int(rng.integers(30, 260)), y0 + int(rng.integers(16, 120))
            draw.rectangle((x0, y0, x1, y1), fill=tuple(int(v) for v in rng.integers(0, 256, 3)))
            draw.text((x0 + 4, y0 + 2), _words(rng, 3), fill=(0, 0, 0), font=font)
    elif kind == "chart":
        img = Image.new("RGB", (w, h), (255, 255, 255))
        draw = ImageDraw.Draw(img)
        draw.line((30, h - 30, w - 10, h - 30), fill=(0, 0, 0), width=2)
        draw.line((30, 10, 30, h - 30), fill=(0, 0, 0), width=2)
        bars = int(rng.integers(3, 12))
        bw = (w - 60) / bars
        for i in range(bars):
            top = int(rng.integers(20, h - 40))
            colour = tuple(int(v) for v in rng.integers(0, 256, 3))
            draw.rectangle((40 + i * bw, top, 40 + (i + 0.7) * bw, h - 31), fill=colour)
    elif kind == "skin_coloured_surface":
        tone = np.asarray(SKIN_TONES[int(rng.integers(len(SKIN_TONES)))], dtype=np.float32)
        base = np.ones((h, w, 3), np.float32) * tone * rng.uniform(0.85, 1.1)
        grad = np.linspace(rng.uniform(0.85, 1.0), rng.uniform(1.0, 1.15), w, dtype=np.float32)
        arr = np.clip(base * grad[None, :, None] + rng.normal(0, 3, (h, w, 3)), 0, 255)
        img = Image.fromarray(arr.astype(np.uint8))
        draw = ImageDraw.Draw(img)
        font = _font(rng, int(rng.integers(18, 60)))
        for _ in range(int(rng.integers(2, 7))):  # printing, labels, shapes: a box, a wall
            x0, y0 = int(rng.integers(0, w - 60)), int(rng.integers(0, h - 40))
            colour = tuple(int(v) for v in rng.integers(0, 256, 3))
            if rng.random() < 0.5:
                draw.text((x0, y0), _words(rng, 2), fill=colour, font=font)
            else:
                draw.rectangle(
                    (x0, y0, x0 + int(rng.integers(20, 200)), y0 + int(rng.integers(10, 120))),
                    outline=colour,
                    width=int(rng.integers(2, 8)),
                )
    else:
        raise ValueError(f"unknown synthetic kind {kind!r}")
    return img


def synthetic_photos(per_kind: int = SYNTHETIC_PER_KIND) -> list[tuple[str, Image.Image]]:
    """Rendered non-skin images, ``per_kind`` of each of SYNTHETIC_KINDS."""
    return [
        (f"rendered_{kind}/{i:02d}", render_synthetic(kind, stable_seed("synthetic", kind, i)))
        for kind in SYNTHETIC_KINDS
        for i in range(per_kind)
    ]


def non_skin_photos(
    extra_dirs: Sequence[Path] = (), synthetic_per_kind: int = SYNTHETIC_PER_KIND
) -> tuple[list[tuple[str, Image.Image]], list[str]]:
    """(photos as (source/name, RGB image), sources looked for and not found)."""
    missing: list[str] = []
    photos = _folder_photos(missing) + _package_photos(missing)
    for folder in extra_dirs:
        for path in sorted(Path(folder).iterdir()):
            if path.suffix.lower() in (".jpg", ".jpeg", ".png", ".webp"):
                photos.append((f"{Path(folder).name}/{path.stem}", load_image_file(path)))
    photos += synthetic_photos(synthetic_per_kind)
    names = [n for n, _ in photos]
    if len(set(names)) != len(names):
        raise ValueError("non-skin photo names must be unique")
    return photos, missing


def photo_views(
    photos: Sequence[tuple[str, Image.Image]], n_crops: int, seed: int
) -> list[tuple[str, str, Image.Image]]:
    """(photo, view, image): the whole photo plus ``n_crops`` random square crops of it."""
    views: list[tuple[str, str, Image.Image]] = []
    for name, img in photos:
        views.append((name, "full", img))
        rng = np.random.default_rng(stable_seed(seed, name))
        w, h = img.size
        for i in range(n_crops):
            side = max(8, int(min(w, h) * rng.uniform(0.3, 0.75)))
            left = int(rng.integers(0, w - side + 1))
            top = int(rng.integers(0, h - side + 1))
            views.append((name, f"crop{i + 1}", img.crop((left, top, left + side, top + side))))
    return views


def split_photos(names: Iterable[str]) -> dict[str, str]:
    """Photo → "fit" | "held_out": alternate within each source in sorted order."""
    by_source: dict[str, list[str]] = {}
    for name in sorted(set(names)):
        by_source.setdefault(name.split("/", 1)[0], []).append(name)
    return {
        name: ("fit" if i % 2 == 0 else "held_out")
        for members in by_source.values()
        for i, name in enumerate(members)
    }
