"""Image shapes the model refuses, as one rule the backend and the worker share (standard library only).

The backend checks it from the image header before a job is queued, so the annotator reads the reason at once; the
worker checks it again from the header before decoding (a job may come from another client), and answers
``bad_input`` for that job alone. ``model.preprocess`` enforces the same bound inside the library
(``MAX_ASPECT_RATIO`` there; a test keeps the two equal, since ``model`` may not import the worker's modules).
"""

from __future__ import annotations

MAX_ASPECT_RATIO = 50
"""Longest/shortest side ratio the model takes. CLIP resizes the *short* side to 224 px, so a 50000x1 strip would
become a 224x11,200,000 image; SAM's 1024 px view of it would be one pixel high."""


def image_shape_error(width: int, height: int) -> str | None:
    """Why the model refuses a ``width`` x ``height`` image (EXIF-oriented pixels), for people; ``None`` if it
    takes it."""
    if width <= 0 or height <= 0:
        return f"the image is empty ({width}x{height} pixels)"
    if max(width, height) > MAX_ASPECT_RATIO * min(width, height):
        return (f"the image is {width}x{height} pixels: one side is more than {MAX_ASPECT_RATIO} times the other, "
                "which the model cannot take; crop it into tiles first")
    return None
