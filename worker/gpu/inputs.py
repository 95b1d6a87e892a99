"""What a worker checks of a job's inputs before any model runs, for every model family.

An image is refused from its header when its shape is one the models cannot take (``worker.client.limits``, the
rule the backend applies too) and decoded only up to the worker's pixel bound; clicks and a box must lie inside the
image. Each problem raises :class:`~model.errors.InputError` with a message for the annotator, so the handler
answers that job (or that image's jobs) with ``bad_input`` and runs the rest of the batch.
"""

from __future__ import annotations

import io
from collections.abc import Mapping
from typing import Any

import numpy as np
from PIL import Image

from model.errors import InputError
from model.preprocess import load_image
from worker.client.limits import image_shape_error
from worker.client.protocol import refine_prompts


def header_size(data: bytes) -> tuple[int, int] | None:
    """``(width, height)`` from an image's header, EXIF orientation applied (as the annotator sees it); ``None``
    when the header cannot be read (decoding then says why)."""
    try:
        with Image.open(io.BytesIO(data)) as im:
            width, height = im.size
            if im.getexif().get(0x0112) in (5, 6, 7, 8):  # rotated by 90 or 270 degrees
                width, height = height, width
    except Exception:  # any unreadable header is load_image's to report
        return None
    return width, height


def decode_image(data: bytes, max_pixels: int) -> np.ndarray:
    """A job's image bytes -> RGB ``H x W x 3`` uint8 (EXIF applied), its shape checked from the header first so
    that a refused image is never decoded."""
    size = header_size(data)
    problem = image_shape_error(*size) if size else None
    if problem:
        raise InputError(problem)
    try:
        return load_image(data, max_pixels=max_pixels)
    except InputError as e:
        raise InputError(f"the task's image: {str(e).removeprefix('image bytes: ')}") from e


def prompts_in_image(options: Mapping[str, Any], height: int, width: int
                     ) -> tuple[list[tuple[float, float, int]], list[float] | None]:
    """A refinement's clicks ``(x, y, label)`` and box ``[x0, y0, x1, y1]``, refused when outside the
    ``width x height`` image (pixels of the EXIF-applied image)."""
    try:
        points, box = refine_prompts(options)
    except ValueError as e:
        raise InputError(str(e)) from e
    for x, y, _ in points:
        if not (0 <= x <= width and 0 <= y <= height):
            raise InputError(f"the point ({x:.0f}, {y:.0f}) is outside the {width}x{height} image")
    if box is not None and not (0 <= box[0] < box[2] <= width and 0 <= box[1] < box[3] <= height):
        raise InputError(f"the box {[round(v) for v in box]} is not inside the {width}x{height} image")
    return points, box
