"""Image loading and LISA's two preprocessing branches (CLIP 224 and SAM 1024), pixel-exact.

LISA reads images with OpenCV and feeds the same RGB uint8 array to both branches:

* CLIP: shortest side to 224 (PIL bicubic), centre crop 224x224, x/255, CLIP mean/std (float32 numpy, as
  transformers 4.31's ``CLIPImageProcessor``). Non-square images lose their borders in this view.
* SAM: longest side to 1024 with ``new = int(dim * 1024 / max(H, W) + 0.5)`` (PIL bilinear, as
  ``ResizeLongestSide.apply_image``), normalise on the 0-255 scale, then zero-pad right/bottom to 1024x1024.

Before that we apply the EXIF orientation (Label Studio shows images EXIF-rotated, so masks must have the
rotated size) and convert every PIL mode to 8-bit RGB the way OpenCV's ``IMREAD_COLOR`` would (alpha dropped,
16-bit scaled down by 256).
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

from model.errors import InputError

CLIP_SIZE = 224
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
SAM_SIZE = 1024
SAM_MEAN = (123.675, 116.28, 103.53)
SAM_STD = (58.395, 57.12, 57.375)
#: Largest image accepted, in pixels (width x height). 64 MP covers every camera in use (a 48 MP phone photo is
#: 8064x6048) while refusing decompression bombs; the SAM branch downsizes to 1024 anyway.
MAX_IMAGE_PIXELS = 64_000_000
#: Longest/shortest side ratio accepted. CLIP resizes the *short* side to 224, so a 1x5000 strip would become a
#: 224x1,120,000 image; such strips are refused rather than silently mangled.
MAX_ASPECT_RATIO = 50


def load_image(source: str | Path | bytes, max_pixels: int = MAX_IMAGE_PIXELS) -> np.ndarray:
    """Decode an image file (path or bytes) to the RGB uint8 array LISA sees.

    Returns:
        ``H x W x 3`` uint8, EXIF orientation applied.

    Raises:
        InputError: the bytes are not an image, the image is empty, or larger than ``max_pixels``.
    """
    name = "image bytes" if isinstance(source, bytes) else str(source)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(source) if isinstance(source, bytes) else source)
            w, h = img.size
            if w * h > max_pixels:
                raise InputError(
                    f"{name}: {w}x{h} is {w * h / 1e6:.1f} MP, above the {max_pixels / 1e6:.0f} MP limit; "
                    "downscale the image before segmenting it."
                )
            img = ImageOps.exif_transpose(img)
            img.load()
    except InputError:
        raise
    except FileNotFoundError as e:
        raise InputError(f"{name}: no such file.") from e
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise InputError(
            f"{name}: cannot be decoded as an image ({e}); use a PNG, JPEG, WebP, BMP or TIFF file."
        ) from e
    if img.width == 0 or img.height == 0:
        raise InputError(f"{name}: the image is empty (size {img.width}x{img.height}).")
    return to_rgb_array(img)


def to_rgb_array(img: Image.Image) -> np.ndarray:
    """Any PIL mode to ``H x W x 3`` uint8 RGB, dropping alpha as OpenCV's ``IMREAD_COLOR`` does."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        # 16-bit (or 32-bit int) greyscale: keep the top 8 bits, as OpenCV does for 16-bit PNGs.
        arr = np.asarray(img, dtype=np.int64)
        grey = np.clip(arr >> 8 if arr.max() > 255 else arr, 0, 255).astype(np.uint8)
        return np.repeat(grey[:, :, None], 3, axis=2)
    if img.mode == "F":
        grey = np.clip(np.asarray(img, dtype=np.float32), 0, 255).astype(np.uint8)
        return np.repeat(grey[:, :, None], 3, axis=2)
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    return np.ascontiguousarray(np.asarray(img.convert("RGB"), dtype=np.uint8))


def clip_preprocess(image: np.ndarray, size: int = CLIP_SIZE) -> torch.Tensor:
    """CLIP branch (openai processor semantics of transformers 4.31, PIL resampling).

    Args:
        image: ``H x W x 3`` uint8 RGB.
        size: the tower's input side (224 for LISA's CLIP ViT-L/14).
    Returns:
        ``1 x 3 x size x size`` float32.
    """
    h, w = image.shape[:2]
    short, long = (w, h) if w <= h else (h, w)
    if short != size:
        new_short, new_long = size, int(size * long / short)
        new_w, new_h = (new_short, new_long) if w <= h else (new_long, new_short)
        image = np.asarray(Image.fromarray(image).resize((new_w, new_h), resample=Image.BICUBIC, reducing_gap=None))
    h, w = image.shape[:2]
    top, left = (h - size) // 2, (w - size) // 2
    image = image[top : top + size, left : left + size]
    x = (image * (1 / 255)).astype(np.float32)
    x = (x - np.array(CLIP_MEAN, dtype=np.float32)) / np.array(CLIP_STD, dtype=np.float32)
    return torch.from_numpy(np.ascontiguousarray(x.transpose(2, 0, 1)))[None]


def sam_resize_shape(h: int, w: int, target: int = SAM_SIZE) -> tuple[int, int]:
    """``ResizeLongestSide.get_preprocess_shape``: (h', w') with the longest side equal to ``target``."""
    scale = target / max(h, w)
    return int(h * scale + 0.5), int(w * scale + 0.5)


def sam_resize(image: np.ndarray, size: int = SAM_SIZE) -> np.ndarray:
    """``ResizeLongestSide(1024).apply_image``: ``H x W x 3`` uint8 -> ``h' x w' x 3`` uint8 (PIL bilinear)."""
    nh, nw = sam_resize_shape(*image.shape[:2], size)
    return np.asarray(Image.fromarray(image).resize((nw, nh), resample=Image.BILINEAR))


def sam_preprocess(resized: np.ndarray, size: int = SAM_SIZE) -> torch.Tensor:
    """Normalise then zero-pad to ``size`` x ``size`` (1024 for LISA's SAM).

    Args:
        resized: ``h' x w' x 3`` uint8 from :func:`sam_resize`.
    Returns:
        ``1 x 3 x size x size`` float32.
    """
    x = torch.from_numpy(np.array(resized, dtype=np.uint8)).permute(2, 0, 1).float()
    x = (x - torch.tensor(SAM_MEAN).view(3, 1, 1)) / torch.tensor(SAM_STD).view(3, 1, 1)
    h, w = x.shape[-2:]
    return torch.nn.functional.pad(x, (0, size - w, 0, size - h))[None]


@dataclass
class PreprocessedImage:
    """Both model inputs for one image, plus the sizes needed to map masks back.

    Attributes:
        clip_pixels: ``1 x 3 x 224 x 224`` float32.
        sam_pixels: ``1 x 3 x 1024 x 1024`` float32.
        original_hw: (H, W) of the EXIF-applied image; masks come back at this size.
        resized_hw: (h', w') of the un-padded SAM input.
    """

    clip_pixels: torch.Tensor
    sam_pixels: torch.Tensor
    original_hw: tuple[int, int]
    resized_hw: tuple[int, int]


def preprocess(image: np.ndarray, clip_size: int = CLIP_SIZE, sam_size: int = SAM_SIZE) -> PreprocessedImage:
    """Run both branches on an ``H x W x 3`` uint8 RGB image (sizes: LISA's unless a smaller model says so)."""
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise InputError(f"expected an H x W x 3 uint8 RGB array, got {image.dtype} of shape {image.shape}")
    if image.shape[0] == 0 or image.shape[1] == 0:
        raise InputError(f"the image is empty (shape {image.shape})")
    h, w = image.shape[:2]
    if max(h, w) / min(h, w) > MAX_ASPECT_RATIO:
        raise InputError(f"the image is {w}x{h}, a side ratio above {MAX_ASPECT_RATIO}:1; crop it into tiles first.")
    resized = sam_resize(image, sam_size)
    return PreprocessedImage(
        clip_pixels=clip_preprocess(image, clip_size),
        sam_pixels=sam_preprocess(resized, sam_size),
        original_hw=(int(image.shape[0]), int(image.shape[1])),
        resized_hw=(int(resized.shape[0]), int(resized.shape[1])),
    )
