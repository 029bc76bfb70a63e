"""Train/serve parity and format handling of the one preprocessing path.

The training and evaluation path (``image_to_input``, ``train.load_images``) must give exactly
the array the server gives for the same uploaded bytes (``decode_image`` + ``resize_to_input``,
as called by ``app.service.TriageService``). Nothing is mocked: the app side runs the real
service on a real (tiny) exported model.
"""

from __future__ import annotations

import io
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import ExifTags, Image

from model_training import train
from model_training.preprocessing import (
    DRAFT_MIN_SIDE,
    MAX_DECODE_PIXELS,
    MAX_PIXELS,
    ImageDecodeError,
    crop_box,
    decode_image,
    decode_upload,
    draft_scale,
    image_to_input,
    resize_to_input,
)

IMAGES = Path(__file__).parent / "fixtures" / "images"
FIXTURES = sorted(IMAGES.glob("*.jpg"))
HAM = IMAGES / "ham10000_nv_ISIC_0024306.jpg"  # 200x150: rotation shows in its size
APP_INPUT = (72, 56)  # (height, width): not square, so a swapped axis in the app would show


def _encode(img: Image.Image, fmt: str, **kwargs: Any) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kwargs)
    return buf.getvalue()


def _exif_rotated_jpeg(path: Path, orientation: int = 6) -> bytes:
    """The file's pixels re-encoded as JPEG with an EXIF orientation tag."""
    exif = Image.Exif()
    exif[ExifTags.Base.Orientation] = orientation
    return _encode(Image.open(path).convert("RGB"), "JPEG", quality=95, exif=exif.tobytes())


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """The app's real TriageService, loaded (and warmed up) as the server loads it."""
    from app.main import load_service
    from app.metrics import Metrics
    from app.settings import Settings
    from model_training.testing import make_tiny_artifact

    artifact = make_tiny_artifact(tmp_path_factory.mktemp("pp") / "tiny", input_size=APP_INPUT)
    yield load_service(Settings(model_dir=artifact), Metrics())


def _app_model_input(service: Any, data: bytes, name: str = "upload.jpg") -> np.ndarray:
    """What the app feeds the model for an upload (TriageService._decode_and_check)."""
    from app.uploads import FilePart

    part = FilePart(index=0, filename=name, content_type="image/jpeg", data=bytearray(data))
    item = service._decode_and_check(part)
    assert item.error is None, item.error
    assert item.model_input is not None
    return np.asarray(item.model_input)


# -- parity ---------------------------------------------------------------------------------


@pytest.mark.parametrize("path", FIXTURES, ids=lambda p: p.stem)
@pytest.mark.parametrize("size", [(299, 299), APP_INPUT])
def test_training_path_equals_server_path(path: Path, size: tuple[int, int]) -> None:
    """File path (training/evaluation) and uploaded bytes (server) give identical arrays."""
    served = resize_to_input(decode_image(path.read_bytes()), size)
    evaluated = image_to_input(path, size)
    trained = train.load_images([str(path)], size, workers=1)
    assert served.dtype == evaluated.dtype == np.float32
    assert served.shape == (*size, 3)
    np.testing.assert_array_equal(evaluated, served)
    assert trained.dtype == np.uint8 and trained.shape == (1, *size, 3)
    np.testing.assert_array_equal(trained[0].astype(np.float32), served)
    assert served.min() >= 0.0 and served.max() <= 255.0
    assert np.all(served == np.round(served))  # whole 8-bit values: nothing scaled here


@pytest.mark.parametrize("path", FIXTURES, ids=lambda p: p.stem)
def test_app_model_input_equals_training_path(service: Any, path: Path) -> None:
    """The app's upload → model input equals the evaluation path's array for the same file."""
    assert service.model.metadata.input_size == APP_INPUT
    got = _app_model_input(service, path.read_bytes(), path.name)
    np.testing.assert_array_equal(got, image_to_input(path, APP_INPUT))


def test_app_applies_exif_like_training(service: Any, tmp_path: Path) -> None:
    """An EXIF-rotated upload gives the app the same input as training gets from that file."""
    data = _exif_rotated_jpeg(HAM)
    file = tmp_path / "rotated.jpg"
    file.write_bytes(data)
    expected = image_to_input(file, APP_INPUT)
    got = _app_model_input(service, data)
    np.testing.assert_array_equal(got, expected)
    # And the rotation really happened: the upright photo turned 90° cw, then resized.
    turned = Image.open(HAM).convert("RGB").transpose(Image.Transpose.ROTATE_270)
    reference = resize_to_input(turned, APP_INPUT)
    assert np.abs(got - reference).mean() < 4.0  # JPEG re-encoding only
    assert np.abs(got - image_to_input(HAM, APP_INPUT)).mean() > 10.0


# -- formats --------------------------------------------------------------------------------


def test_exif_orientation_is_applied() -> None:
    """Orientation 6 (rotate 90° clockwise to display) turns a 200x150 photo into 150x200."""
    plain = Image.open(HAM).convert("RGB")
    stored = _encode(plain, "JPEG", quality=95)
    rotated = _exif_rotated_jpeg(HAM)
    decoded = decode_image(rotated)
    assert plain.size == (200, 150)
    assert decoded.size == (150, 200)
    # Same JPEG pixel data, so the upright decode is exactly the plain decode turned 90° cw.
    expected = decode_image(stored).transpose(Image.Transpose.ROTATE_270)
    np.testing.assert_array_equal(np.asarray(decoded), np.asarray(expected))
    assert len(decoded.getexif()) == 0  # metadata dropped


def test_exif_orientation_corner_moves_where_expected() -> None:
    """Independent of Pillow's naming: the stored bottom-left corner ends up top-left."""
    img = Image.new("RGB", (64, 32), (0, 0, 255))
    img.paste((255, 0, 0), (0, 16, 16, 32))  # red bottom-left block
    exif = Image.Exif()
    exif[ExifTags.Base.Orientation] = 6
    decoded = np.asarray(decode_image(_encode(img, "PNG", exif=exif.tobytes())))
    assert decoded.shape == (64, 32, 3)
    assert tuple(decoded[2, 2]) == (255, 0, 0)
    assert tuple(decoded[-3, -3]) == (0, 0, 255)


def test_alpha_is_flattened_onto_white() -> None:
    """Transparent → white, opaque → its colour, half transparent → blended; RGB out."""
    rgba = np.zeros((4, 6, 4), dtype=np.uint8)
    rgba[..., :3] = (10, 20, 30)
    rgba[0, :, 3] = 0
    rgba[1, :, 3] = 255
    rgba[2, :, 3] = 128
    out = decode_image(_encode(Image.fromarray(rgba, mode="RGBA"), "PNG"))
    arr = np.asarray(out)
    assert out.mode == "RGB"
    assert np.all(arr[0] == 255)
    assert np.all(arr[1] == (10, 20, 30))
    blended = 255 + (np.array([10, 20, 30]) - 255) * 128 / 255
    assert np.all(np.abs(arr[2].astype(float) - blended) <= 1.0)


def test_grey_with_alpha_is_flattened() -> None:
    """LA images: transparent parts become white too."""
    la = Image.new("LA", (4, 4), (0, 0))
    la.paste((40, 255), (0, 0, 2, 4))
    arr = np.asarray(decode_image(_encode(la, "PNG")))
    assert np.all(arr[:, :2] == 40)
    assert np.all(arr[:, 2:] == 255)


def test_palette_images_are_converted() -> None:
    """Palette PNGs give their palette colours; a transparent index becomes white."""
    colours = [(200, 30, 40), (10, 220, 90), (5, 6, 250), (0, 0, 0)]
    p = Image.new("P", (4, 1))
    p.putpalette([c for rgb in colours for c in rgb])
    p.putdata([0, 1, 2, 3])
    arr = np.asarray(decode_image(_encode(p, "PNG")))
    assert [tuple(v) for v in arr[0]] == colours
    arr_t = np.asarray(decode_image(_encode(p, "PNG", transparency=3)))
    assert [tuple(v) for v in arr_t[0]] == [*colours[:3], (255, 255, 255)]


def test_cmyk_is_converted() -> None:
    """CMYK (TIFF, lossless) comes out as the RGB colours it encodes."""
    cmyk = Image.new("CMYK", (2, 1))
    cmyk.putdata([(0, 255, 255, 0), (0, 0, 0, 0)])  # red, white
    data = _encode(cmyk, "TIFF")
    assert Image.open(io.BytesIO(data)).mode == "CMYK"
    out = decode_image(data)
    assert out.mode == "RGB"
    assert [tuple(v) for v in np.asarray(out)[0]] == [(255, 0, 0), (255, 255, 255)]


def test_cmyk_jpeg_is_close_to_its_rgb_source() -> None:
    """A CMYK JPEG of a lesion photo decodes to (nearly) the photo's RGB."""
    rgb = Image.open(HAM).convert("RGB")
    out = decode_image(_encode(rgb.convert("CMYK"), "JPEG", quality=95))
    assert out.mode == "RGB" and out.size == rgb.size
    diff = np.abs(np.asarray(out, dtype=float) - np.asarray(rgb, dtype=float))
    assert diff.mean() < 6.0


def test_16_bit_is_scaled_to_8_bit() -> None:
    """16-bit greyscale spans 0..65535 → 0..255 (not clipped at 255)."""
    values = np.array([[0, 1000, 32768, 65535]], dtype=np.uint16)
    data = _encode(Image.fromarray(values), "PNG")
    assert Image.open(io.BytesIO(data)).mode in ("I;16", "I")
    arr = np.asarray(decode_image(data))
    assert arr.shape == (1, 4, 3) and arr.dtype == np.uint8
    expected = (values.astype(np.float64) * 255 / 65535).astype(np.uint8)
    np.testing.assert_array_equal(arr[..., 0], expected)
    assert np.all(arr[..., 0] == arr[..., 2])


def test_greyscale_becomes_three_equal_channels() -> None:
    """L images are replicated into R, G and B."""
    grey = Image.fromarray(np.arange(16, dtype=np.uint8).reshape(4, 4) * 16)
    arr = np.asarray(decode_image(_encode(grey, "PNG")))
    assert arr.shape == (4, 4, 3)
    assert np.all(arr[..., 0] == arr[..., 1]) and np.all(arr[..., 1] == arr[..., 2])


def test_resize_is_height_width() -> None:
    """``size`` is (height, width) and the whole image is squashed (no crop)."""
    img = Image.new("RGB", (40, 10), (0, 0, 0))
    img.paste((255, 255, 255), (0, 0, 1, 10))  # a white first column survives (no crop)
    arr = resize_to_input(img, (30, 20))
    assert arr.shape == (30, 20, 3)
    assert arr[:, 0].mean() > 20


# -- refusals -------------------------------------------------------------------------------


def test_text_file_raises_image_decode_error() -> None:
    """A text file is not an image."""
    with pytest.raises(ImageDecodeError, match="not a decodable image"):
        decode_image(b"patient notes: mole on the left arm, 4 mm\n" * 20)


def test_empty_file_raises_image_decode_error() -> None:
    """Zero bytes are refused with their own message."""
    with pytest.raises(ImageDecodeError, match="empty"):
        decode_image(b"")


def test_truncated_jpeg_raises_image_decode_error() -> None:
    """Half a JPEG is refused, not decoded into grey."""
    data = HAM.read_bytes()
    with pytest.raises(ImageDecodeError):
        decode_image(data[: len(data) // 2])


def test_giant_image_is_refused_before_decoding() -> None:
    """A PNG declaring over 2x MAX_PIXELS is refused (Pillow's hard bomb limit)."""
    side = int((2 * MAX_PIXELS) ** 0.5) + 2
    data = _encode(Image.new("1", (side, side)), "PNG")
    with pytest.raises(ImageDecodeError, match="larger than"):
        decode_image(data)


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
def test_image_over_max_pixels_is_refused() -> None:
    """MAX_PIXELS is documented as the refusal limit: 60 MP must be refused."""
    data = _encode(Image.new("1", (8000, 7500)), "PNG")  # 60 MP, 7 kB of PNG
    with pytest.raises(ImageDecodeError, match="larger than"):
        decode_image(data)


# -- scaling lives in the model -------------------------------------------------------------


def test_pixel_scaling_is_the_models_first_layer() -> None:
    """The layer after the input is Rescaling(1/128, offset -1): raw 0..255 in, (x-128)/128."""
    import keras

    from model_training.model import build_tiny_classifier

    model = build_tiny_classifier((32, 32))
    first = model.layers[1]
    assert isinstance(model.layers[0], keras.layers.InputLayer)
    assert isinstance(first, keras.layers.Rescaling)
    assert first.scale == pytest.approx(1.0 / 128.0)
    assert first.offset == pytest.approx(-1.0)
    x = np.array([0.0, 128.0, 255.0], dtype=np.float32).reshape(1, 1, 3, 1).repeat(3, axis=-1)
    np.testing.assert_allclose(np.asarray(first(x))[0, 0, :, 0], [-1.0, 0.0, 127.0 / 128.0])


# -- memory budget: reduced-scale JPEG decode and the full-decode cap ----------------------------


def _claimed_jpeg(width: int, height: int) -> bytes:
    """A ~630-byte JPEG (16x16) whose SOF0 header claims width x height."""
    data = bytearray(_encode(Image.new("RGB", (16, 16), (180, 120, 100)), "JPEG", quality=90))
    sof = data.find(b"\xff\xc0")
    data[sof + 5 : sof + 9] = height.to_bytes(2, "big") + width.to_bytes(2, "big")
    return bytes(data)


def test_a_header_claiming_49_megapixels_is_decoded_at_one_quarter() -> None:
    decoded = decode_upload(_claimed_jpeg(7000, 7000))
    assert decoded.original_size == (7000, 7000)
    assert decoded.scale == 4 and decoded.image.size == (1750, 1750)


@pytest.mark.parametrize(
    ("size", "scale"),
    [((2047, 1500), 1), ((2048, 2048), 2), ((4032, 3024), 2), ((4200, 4096), 4), ((8192, 6000), 4)],
)
def test_draft_scale_keeps_the_shorter_side_at_least_draft_min_side(
    size: tuple[int, int], scale: int
) -> None:
    assert draft_scale(*size) == scale
    assert min(size) // scale >= DRAFT_MIN_SIDE or scale == 1


def test_a_large_jpeg_is_reduced_upright_with_its_original_size() -> None:
    """EXIF orientation 6 on a 2400x2200 JPEG: decoded at 1/2, upright, size swapped."""
    exif = Image.Exif()
    exif[ExifTags.Base.Orientation] = 6
    img = Image.open(HAM).convert("RGB").resize((2400, 2200))
    decoded = decode_upload(_encode(img, "JPEG", quality=90, exif=exif.tobytes()))
    assert decoded.scale == 2
    assert decoded.original_size == (2200, 2400)
    assert decoded.image.size == (1100, 1200)


def test_other_formats_over_the_full_decode_cap_are_refused() -> None:
    side = int(MAX_DECODE_PIXELS**0.5) + 8
    data = _encode(Image.new("1", (side, side)), "PNG")
    with pytest.raises(ImageDecodeError, match="larger than"):
        decode_image(data)
    # The same pixel count as a JPEG is decoded reduced, within the cap.
    assert decode_upload(_claimed_jpeg(side, side)).scale > 1


# -- a user's crop --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("size", "crop", "box"),
    [
        ((200, 150), (0.25, 0.2, 0.5, 0.5), (50, 30, 100, 75)),
        ((200, 150), (0.0, 0.0, 1.0, 1.0), (0, 0, 200, 150)),
        ((200, 150), (0.999, 0.999, 0.0001, 0.0001), (199, 149, 1, 1)),  # at least one pixel
        ((200, 150), (0.5, 0.5, 0.5000001, 0.5000001), (100, 75, 100, 75)),  # rounding slack
        ((150, 200), (0.25, 0.3125, 0.5, 0.375), (38, 63, 75, 75)),  # .5 pixels: still square
        ((150, 200), (0.9, 0.9, 0.5, 0.5), (135, 180, 15, 20)),  # cut at the edges
    ],
)
def test_crop_box_is_whole_pixels_inside_the_image(
    size: tuple[int, int], crop: tuple[float, float, float, float], box: tuple[int, ...]
) -> None:
    assert crop_box(size, crop) == box


def test_a_crop_is_taken_from_the_upright_photo() -> None:
    """EXIF orientation 6: the crop's fractions are of the photo as shown, not as stored, and
    the pixels are exactly the upright decode's."""
    rotated = _exif_rotated_jpeg(HAM)
    crop = (0.1, 0.5, 0.8, 0.25)  # a wide band across the lower half of the upright photo
    decoded = decode_upload(rotated, crop=crop)
    whole = decode_upload(rotated)
    assert decoded.original_size == whole.original_size == (150, 200)
    assert decoded.crop_box == (15, 100, 120, 50) and whole.crop_box is None
    expected = whole.image.crop((15, 100, 135, 150))
    np.testing.assert_array_equal(np.asarray(decoded.image), np.asarray(expected))


def test_a_crop_of_a_large_jpeg_keeps_draft_min_side_pixels() -> None:
    """A 4000x3000 JPEG is decoded at 1/2 whole (1500 px high), but a crop a fifth of its
    height needs its own 1024 px: decoded in full, then cropped."""
    img = Image.open(HAM).convert("RGB").resize((4000, 3000))
    data = _encode(img, "JPEG", quality=85)
    assert decode_upload(data).scale == 2
    decoded = decode_upload(data, crop=(0.4, 0.4, 0.2, 0.2))
    assert decoded.scale == 1 and decoded.image.size == (800, 600)
    half = decode_upload(data, crop=(0.25, 0.25, 0.5, 0.5))  # 2000x1500 px: 1/2 keeps 1000 x 750
    assert half.scale == 1 and half.image.size == (2000, 1500)
    assert decode_upload(data, crop=(0, 0, 1, 1)).scale == 2
