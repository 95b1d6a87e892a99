"""Image loading: EXIF orientation, every PIL mode to RGB, refusals with clear messages."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from model.errors import InputError
from model.preprocess import load_image, preprocess, sam_resize_shape


def _bytes(img: Image.Image, fmt: str = "PNG", **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def test_exif_orientation_is_applied():
    rgb = np.zeros((20, 40, 3), dtype=np.uint8)
    rgb[:, :20] = 255  # left half white
    img = Image.fromarray(rgb)
    exif = img.getexif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    out = load_image(_bytes(img, "JPEG", exif=exif, quality=95))
    assert out.shape == (40, 20, 3)  # displayed size, as Label Studio shows it
    assert out[:20].mean() > 200 and out[20:].mean() < 50  # the white half is now on top


@pytest.mark.parametrize("mode", ["RGBA", "LA", "L", "P", "1", "CMYK", "I;16", "I", "F"])
def test_any_mode_becomes_rgb_uint8(mode):
    base = Image.fromarray(np.tile(np.arange(0, 250, 10, dtype=np.uint8), (8, 1)))
    if mode == "I;16":
        img = Image.fromarray(np.tile(np.arange(0, 65000, 2600, dtype=np.uint16), (8, 1)))
    else:
        img = base.convert(mode)
    fmt = "TIFF" if mode in ("CMYK", "F", "I") else "PNG"
    out = load_image(_bytes(img, fmt))
    assert out.dtype == np.uint8 and out.shape == (8, 25, 3)
    if mode == "I;16":  # 16-bit keeps its top byte, as OpenCV does
        assert out[0, :, 0].tolist() == [(v * 2600) >> 8 for v in range(25)]


def test_alpha_is_dropped_not_composited():
    rgba = np.zeros((4, 4, 4), dtype=np.uint8)
    rgba[..., 0] = 200  # red, fully transparent
    out = load_image(_bytes(Image.fromarray(rgba, "RGBA")))
    assert (out[..., 0] == 200).all()


def test_undecodable_and_missing_images():
    with pytest.raises(InputError, match="cannot be decoded"):
        load_image(b"definitely not an image")
    with pytest.raises(InputError, match="cannot be decoded"):
        load_image(_bytes(Image.new("RGB", (64, 64)))[:60])  # truncated
    with pytest.raises(InputError, match="no such file"):
        load_image("/nonexistent/picture.png")


def test_pixel_limit():
    data = _bytes(Image.new("RGB", (200, 100)))
    with pytest.raises(InputError, match="MP limit"):
        load_image(data, max_pixels=10_000)
    assert load_image(data, max_pixels=20_000).shape == (100, 200, 3)


def test_empty_array_refused():
    with pytest.raises(InputError, match="empty"):
        preprocess(np.zeros((0, 5, 3), dtype=np.uint8))
    with pytest.raises(InputError, match="uint8 RGB"):
        preprocess(np.zeros((5, 5), dtype=np.uint8))


def test_sam_resize_shape():
    assert sam_resize_shape(480, 640) == (768, 1024)
    assert sam_resize_shape(200, 300) == (683, 1024)
    assert sam_resize_shape(1000, 1000) == (1024, 1024)


def test_extreme_aspect_ratio_refused():
    with pytest.raises(InputError, match="side ratio"):
        preprocess(np.zeros((2, 5000, 3), dtype=np.uint8))
    assert preprocess(np.zeros((100, 4000, 3), dtype=np.uint8)).resized_hw == (26, 1024)
