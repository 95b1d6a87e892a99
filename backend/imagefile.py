"""What a fetched image file is, checked without decoding it at full size: the checks every task image passes.

Split from :mod:`backend.images` (which fetches the bytes, safely) along the seam between the network and the file:
:func:`inspect_image` reads the format and size from the header, refuses too many pixels and sides LISA refuses
(:func:`worker.client.limits.image_shape_error`, the rule the worker applies too), and walks the file to catch
truncation. :class:`ImageFetchError` is the one error of both modules; :mod:`backend.images` re-exports all three
names.
"""

from __future__ import annotations

import dataclasses
import io
import re

from PIL import Image, UnidentifiedImageError

from backend.config import FETCH_MAX_PIXELS
from worker.client.limits import image_shape_error

# Formats a browser shows and Pillow decodes without external programs (EPS would run Ghostscript).
IMAGE_FORMATS = ("JPEG", "MPO", "PNG", "WEBP", "GIF", "BMP", "TIFF", "AVIF")


class ImageFetchError(Exception):
    """The image could not be fetched or was refused; ``str(e)`` is written for the Label Studio user.

    ``code`` groups the causes for the caller: ``bad_url``, ``config``, ``refused`` (SSRF policy), ``auth``,
    ``not_found``, ``http``, ``unreachable``, ``timeout``, ``too_large``, ``not_image``, ``bad_shape`` (a side
    ratio LISA refuses), ``busy`` (no free fetch slot, :mod:`backend.fetching`).
    """

    def __init__(self, message: str, code: str = "bad_url") -> None:
        super().__init__(message)
        self.message = message
        self.code = code


@dataclasses.dataclass(frozen=True)
class FetchedImage:
    """The fetched bytes and what their header says; ``width``/``height`` are EXIF-oriented, as Label Studio shows."""

    data: bytes
    sha256: str
    format: str
    width: int
    height: int
    source: str  # the image value, shortened and without query strings (presigned URLs carry signatures)


def inspect_image(data: bytes, max_pixels: int = FETCH_MAX_PIXELS, name: str = "the image") -> tuple[str, int, int]:
    """Check that ``data`` is a complete image of at most ``max_pixels``, without decoding it at full size.

    Returns:
        ``(format, width, height)``, the size with the EXIF orientation applied.
    Raises:
        ImageFetchError: empty, not an image, too many pixels (checked from the header), corrupt or truncated, or
            so elongated that LISA would refuse it.
    """
    if not data:
        raise ImageFetchError(f"{name} is empty (0 bytes)", "not_image")
    Image.init()
    try:
        with Image.open(io.BytesIO(data), formats=[f for f in IMAGE_FORMATS if f in Image.OPEN]) as im:
            fmt, (width, height) = str(im.format), im.size
            if width * height > max_pixels:
                raise ImageFetchError(
                    f"{name} is {width}x{height} pixels ({width * height / 1e6:.1f} MP), above the "
                    f"{max_pixels / 1e6:g} MP limit; downscale it", "too_large")
            if width == 0 or height == 0:
                raise ImageFetchError(f"{name} is empty ({width}x{height} pixels)", "not_image")
            im.verify()  # PNG: walks every chunk and checks its CRC, so truncation shows without decoding
        with Image.open(io.BytesIO(data)) as im:  # verify() leaves the image unusable: open it again
            orientation = im.getexif().get(0x0112)
            if fmt in ("JPEG", "MPO") and not im.info.get("progressive"):
                # verify() does nothing for JPEG; decoding at 1/8 scale (DCT scaling) reads the whole stream cheaply.
                # (Progressive files are left to the worker: libjpeg buffers all their coefficients, ~2 B/pixel.)
                im.draft("RGB", (max(1, width // 8), max(1, height // 8)))
                im.load()
    except ImageFetchError:
        raise
    except Image.DecompressionBombError as e:  # Pillow's own guard fires in open(), before the size is seen
        found = re.search(r"\((\d+) pixels\)", str(e))
        size = f"{int(found.group(1)) / 1e6:.1f} MP" if found else "too many pixels"
        raise ImageFetchError(f"{name} has {size}, above the {max_pixels / 1e6:g} MP limit; downscale it",
                              "too_large") from e
    except UnidentifiedImageError as e:
        if data[:512].lstrip().startswith(b"<"):
            what = "an HTML or XML page (an error or login page?)"
        else:
            what = f"data starting with {data[:8]!r}"
        raise ImageFetchError(f"{name} is not an image in a supported format (PNG, JPEG, WebP, GIF, BMP, TIFF, "
                              f"AVIF): got {what}", "not_image") from e
    except Exception as e:  # Pillow's parsers raise many types (OSError, SyntaxError, struct.error…) on bad data
        raise ImageFetchError(f"{name} is corrupt or truncated ({e})", "not_image") from e
    if orientation in (5, 6, 7, 8):  # rotated by 90 or 270 degrees
        width, height = height, width
    problem = image_shape_error(width, height)  # the worker's own words, so the annotator reads the same either way
    if problem:
        raise ImageFetchError(problem, "bad_shape")
    return fmt, width, height

