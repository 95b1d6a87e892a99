"""Masks <-> Label Studio polygons: suggestions as editable ``polygonlabels`` regions, and polygons back to masks.

Coordinates. Label Studio keeps a polygon's points in percent of the image as shown (EXIF applied) and draws it
with the canvas's fill over the image at its natural size, where pixel ``(x, y)`` covers ``[x, x+1) x [y, y+1)``.
Here a pixel belongs to a polygon when its centre lies inside (nonzero winding, the canvas's default fill rule):
Label Studio's anti-aliased fill differs from that only in pixels its outline crosses (``tests/test_polygons.py``
compares the two in a real Chromium canvas).

Mask -> polygons (:func:`trace`). OpenCV's ``findContours`` (outer contours only) on the mask upsampled 2x
(nearest) follows each 8-connected piece through the centres of its boundary sub-pixels, 0.25 px inside the pixel
edges, so every pixel centre of the piece is inside: the unsimplified outline rasterises back to the mask exactly,
with its holes filled (Label Studio's polygons have none). ``approxPolyDP`` then simplifies each outline to the
tolerance (pixels of the EXIF-applied image); a simplification that makes the outline cross itself is redone at
half the tolerance, down to the unsimplified outline, which never crosses itself, so that a suggestion accepted as
is is never refused when it comes back.

Polygons -> mask (:func:`rasterize`, :func:`region_points`): for corrections captured from annotations
(:mod:`backend.samples`). An annotation's polygon with fewer than 3 points, no area, a point outside the image or
edges that cross raises :class:`PolygonError` with a message that names the problem.

Torch-free; OpenCV is imported on first use.
"""

from __future__ import annotations

import json
import math
import uuid
from typing import Any

import numpy as np

from backend.config import MAX_POLYGON_TOLERANCE_PX
from backend.labeling import LabelingSetup

#: The Extra params key of a project's polygon simplification (pixels; default ``LISA_LS_POLYGON_TOLERANCE``).
TOLERANCE_KEY = "polygon_tolerance"

#: The most polygons one mask becomes (the largest pieces are kept): a mask of salt noise has thousands of
#: pieces, and each polygon is a region the labeling UI draws and an annotator would have to delete.
MAX_POLYGONS = 100
#: The most points of a polygon read from an annotation (bounds the self-intersection check); hand-drawn polygons
#: have tens, ours hundreds.
MAX_POINTS = 20_000
#: How far (pixels) a point may lie outside the image and still count as on its edge: Label Studio keeps points in
#: percent, and a point dragged to the border can land a rounding error beyond it. Anything inside is clipped.
EDGE_SLACK_PX = 1.0
#: Decimals of the percentages written (1e-5 % of a 16 000 px side is 0.002 px).
PERCENT_DECIMALS = 5
#: Points this close (pixels) to a line count as on it: percent rounding must not turn a touch into a crossing.
ON_LINE_PX = 0.01
_PAIR_CHUNK = 1 << 20  # edge pairs tested at a time by the self-intersection check


class PolygonError(ValueError):
    """A polygon that cannot be turned into a mask; the message says what is wrong with it."""


def check_tolerance(value: object) -> float:
    """A project's polygon tolerance (Extra params) in pixels, 0 to ``MAX_POLYGON_TOLERANCE_PX``; raises
    ``ValueError`` saying what it must be."""
    try:
        number = float(value) if isinstance(value, (int, float, str)) and not isinstance(value, bool) else math.nan
    except ValueError:
        number = math.nan
    if not 0 <= number <= MAX_POLYGON_TOLERANCE_PX:  # also refuses NaN
        raise ValueError(f"extra_params '{TOLERANCE_KEY}' must be a number of pixels from 0 to "
                         f"{MAX_POLYGON_TOLERANCE_PX:g}, not {json.dumps(value)[:40]}")
    return number


# ---- mask -> polygons ------------------------------------------------------------------------------------------


def trace(mask: np.ndarray, tolerance: float, min_area: int = 1, limit: int | None = MAX_POLYGONS,
          ) -> list[np.ndarray]:
    """The outer outlines of a mask's 8-connected pieces, simplified, largest piece first (:func:`outlines`)."""
    return outlines(mask, tolerance, min_area, limit)[0]


def outlines(mask: np.ndarray, tolerance: float, min_area: int = 1, limit: int | None = MAX_POLYGONS,
             ) -> tuple[list[np.ndarray], int]:
    """The outer outlines of a mask's 8-connected pieces, simplified, largest piece first.

    Args:
        mask: ``H x W`` bool.
        tolerance: the most a simplified outline may stray from the traced one, in pixels (0: unsimplified).
        min_area: pieces of fewer pixels are dropped (as :func:`backend.regions.prediction` drops specks).
        limit: keep at most this many pieces (the largest); ``None``: all.
    Returns:
        One ``K x 2`` float64 array of ``(x, y)`` pixel coordinates per piece kept (``K >= 3``), each a simple
        polygon; and how many pieces of at least ``min_area`` pixels there were (more than kept past ``limit``).
    """
    import cv2

    mask = np.asarray(mask, dtype=bool)
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    if rows.size == 0:
        return [], 0
    top, left = int(rows[0]), int(cols[0])
    crop = np.ascontiguousarray(mask[top:rows[-1] + 1, left:cols[-1] + 1], dtype=np.uint8)
    _, labels, stats, _ = cv2.connectedComponentsWithStats(crop, connectivity=8)
    area = stats[:, cv2.CC_STAT_AREA]
    up = cv2.resize(crop, (2 * crop.shape[1], 2 * crop.shape[0]), interpolation=cv2.INTER_NEAREST)
    contours, _ = cv2.findContours(up, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    del up
    pieces = []
    for contour in contours:
        x, y = contour[0, 0]
        pixels = int(area[labels[y // 2, x // 2]])  # a contour point lies on a boundary pixel of its piece
        if pixels >= max(1, min_area):
            pieces.append((pixels, contour))
    pieces.sort(key=lambda p: -p[0])
    offset = np.array([left, top], dtype=np.float64)
    return [_simplify(contour, tolerance) / 2 + offset for _, contour in pieces[:limit]], len(pieces)


def _simplify(contour: np.ndarray, tolerance: float) -> np.ndarray:
    """A traced outline (upsampled pixel indices) simplified as much as ``tolerance`` allows without crossing
    itself; returned in upsampled continuous coordinates (index + 0.5)."""
    import cv2

    raw = contour.reshape(-1, 2).astype(np.float64) + 0.5
    if len(raw) <= 4:  # a pixel, a straight line or a rectangle: nothing to simplify
        return raw
    eps = 2 * tolerance  # in upsampled pixels
    while eps >= 0.5:  # below half an upsampled pixel, approxPolyDP only drops collinear points
        points = cv2.approxPolyDP(contour, eps, True).reshape(-1, 2).astype(np.float64) + 0.5
        if len(points) >= 3 and abs(_signed_area(points)) > 0 and _crossing(points) is None:
            return points
        eps /= 2
    return raw  # every piece is at least 2x2 upsampled pixels: 4 points or more


# ---- polygons -> mask ------------------------------------------------------------------------------------------


def rasterize(polygons: list[np.ndarray], width: int, height: int) -> np.ndarray:
    """The pixels whose centres lie inside any of ``polygons`` (``K x 2`` pixel coordinates each), as an
    ``height x width`` bool mask.

    Each polygon is filled by the nonzero rule; polygons are oriented alike first, so overlapping ones add up
    (their union) instead of cancelling. Every edge's crossings with the pixel-centre rows are accumulated at once
    and summed left to right.
    """
    polygons = [np.asarray(p, dtype=np.float64).reshape(-1, 2) for p in polygons]
    polygons = [p for p in polygons if len(p) >= 3]
    winding = np.zeros((height, width + 1), dtype=np.int32)
    if not polygons:
        return winding[:, :width] != 0
    a = np.concatenate(polygons)
    sizes = np.array([len(p) for p in polygons])
    starts = np.cumsum(sizes) - sizes
    following = np.arange(len(a)) + 1
    following[starts + sizes - 1] = starts  # each polygon closes on its first point
    b = a[following]
    areas = np.add.reduceat(a[:, 0] * b[:, 1] - b[:, 0] * a[:, 1], starts)
    sign = np.repeat(np.where(areas >= 0, 1, -1), sizes)
    lo, hi = np.minimum(a[:, 1], b[:, 1]), np.maximum(a[:, 1], b[:, 1])
    first = np.clip(np.ceil(lo - 0.5), 0, height).astype(np.int64)  # rows whose centre y + 0.5 is in [lo, hi)
    spans = np.maximum(np.clip(np.ceil(hi - 0.5), 0, height).astype(np.int64) - first, 0)
    edge = np.repeat(np.arange(len(a)), spans)
    row = first[edge] + np.arange(edge.size) - np.repeat(np.cumsum(spans) - spans, spans)
    ya, yb, xa, xb = a[edge, 1], b[edge, 1], a[edge, 0], b[edge, 0]
    x = xa + (row + 0.5 - ya) * (xb - xa) / (yb - ya)
    col = np.clip(np.ceil(x - 0.5), 0, width).astype(np.int64)  # the first pixel whose centre is right of x
    np.add.at(winding, (row, col), np.where(yb > ya, sign[edge], -sign[edge]).astype(np.int32))
    return np.cumsum(winding[:, :width], axis=1) != 0


def _signed_area(p: np.ndarray) -> float:
    x, y = p[:, 0], p[:, 1]
    return 0.5 * float(np.dot(x, np.roll(y, -1)) - np.dot(np.roll(x, -1), y))


def _crossing(p: np.ndarray) -> tuple[int, int] | None:
    """The first pair of non-adjacent edges of a closed polygon that cross each other (edge ``i`` runs from point
    ``i`` to point ``i + 1``), or None. Touching and overlapping along a line do not count as crossing.

    Edges are sorted by their left end and only pairs whose boxes overlap are tested, a chunk at a time.
    """
    n = len(p)
    if n < 4:
        return None
    a, b = p, np.roll(p, -1, axis=0)
    lo, hi = np.minimum(a, b), np.maximum(a, b)
    order = np.argsort(lo[:, 0], kind="stable")
    # For the k-th edge by left end: the later ones whose left end is left of its right end (x-ranges overlap).
    ends = np.searchsorted(lo[order, 0], hi[order, 0], side="right")
    counts = np.maximum(ends - np.arange(1, n + 1), 0)
    length = np.maximum(np.hypot(*(b - a).T), 1e-12)
    total = np.concatenate([[0], np.cumsum(counts)])  # pairs before the k-th edge
    start = 0
    while start < n:  # a chunk of edges with at most _PAIR_CHUNK pairs (or one edge)
        stop = min(n, max(start + 1, int(np.searchsorted(total, total[start] + _PAIR_CHUNK, side="right")) - 1))
        c = counts[start:stop]
        k = np.repeat(np.arange(start, stop), c)
        m = k + 1 + np.arange(k.size) - np.repeat(np.cumsum(c) - c, c)
        i, j = order[k], order[m]
        gap = np.abs(i - j)
        near = (lo[i, 1] <= hi[j, 1]) & (lo[j, 1] <= hi[i, 1]) & (gap != 1) & (gap != n - 1)
        i, j = i[near], j[near]
        if i.size:
            hit = _proper(a[i], b[i], a[j], b[j], length[i], length[j])
            if hit.any():
                first = int(np.argmax(hit))
                return tuple(sorted((int(i[first]), int(j[first]))))  # type: ignore[return-value]
        start = stop
    return None


def _proper(a: np.ndarray, b: np.ndarray, c: np.ndarray, d: np.ndarray, ab: np.ndarray, cd: np.ndarray) -> np.ndarray:
    """Whether segments ``a-b`` and ``c-d`` (rows) cross at one point inside both, each end clear of the other
    segment's line by more than :data:`ON_LINE_PX`."""

    def side(p: np.ndarray, q: np.ndarray, r: np.ndarray, norm: np.ndarray) -> np.ndarray:
        s = ((q[:, 0] - p[:, 0]) * (r[:, 1] - p[:, 1]) - (q[:, 1] - p[:, 1]) * (r[:, 0] - p[:, 0])) / norm
        return np.where(np.abs(s) <= ON_LINE_PX, 0.0, np.sign(s))

    return ((side(a, b, c, ab) * side(a, b, d, ab)) < 0) & ((side(c, d, a, cd) * side(c, d, b, cd)) < 0)


def check(points: np.ndarray, width: int, height: int) -> str | None:
    """What is wrong with a polygon (``K x 2`` pixel coordinates) on a ``width x height`` image, or None."""
    distinct = len({(round(x, 6), round(y, 6)) for x, y in points.tolist()})
    if distinct < 3:
        return f"has {distinct} distinct point(s); a polygon needs at least 3"
    if len(points) > MAX_POINTS:
        return f"has {len(points)} points; at most {MAX_POINTS} are read"
    outside = (points[:, 0] < -EDGE_SLACK_PX) | (points[:, 0] > width + EDGE_SLACK_PX) | \
              (points[:, 1] < -EDGE_SLACK_PX) | (points[:, 1] > height + EDGE_SLACK_PX)
    if outside.any():
        x, y = points[int(np.argmax(outside))]
        return (f"has a point at ({100 * x / width:.1f} %, {100 * y / height:.1f} %), outside the "
                f"{width}x{height} image")
    crossing = _crossing(points)
    if crossing is not None:
        i, j = crossing
        return (f"crosses itself (its edge from point {i + 1} to {i + 2} crosses the one from point {j + 1} to "
                f"{(j + 1) % len(points) + 1}); redraw it without crossing lines")
    if abs(_signed_area(points)) < 1e-6:
        return "encloses no area (its points lie on one line)"
    return None


def region_points(region: dict[str, Any], width: int, height: int) -> np.ndarray:
    """The points of a Label Studio ``polygonlabels`` region in pixels of the ``width x height`` image it was drawn
    on (points in percent). Raises :class:`PolygonError` for a polygon that cannot be a mask."""
    value = region.get("value") if isinstance(region.get("value"), dict) else {}
    raw = value.get("points")
    if not isinstance(raw, list) or not all(
            isinstance(pt, (list, tuple)) and len(pt) == 2 and all(_is_number(v) for v in pt) for pt in raw):
        raise PolygonError("its points are not a list of [x, y] percentages")
    points = np.array(raw, dtype=np.float64).reshape(-1, 2) * np.array([width, height]) / 100.0
    problem = check(points, width, height)
    if problem:
        raise PolygonError(problem)
    return np.clip(points, 0, [width, height])


def _is_number(v: object) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and bool(np.isfinite(v))


# ---- Label Studio regions --------------------------------------------------------------------------------------


def new_id() -> str:
    """A region id for a polygon: ``p`` + 9 hex digits (brush ids are 10 hex digits, so ids tell the kinds apart,
    which lets a refinement reuse each kind's ids for its own kind)."""
    return "p" + uuid.uuid4().hex[:9]


def polygon_region(points: np.ndarray, width: int, height: int, setup: LabelingSetup, label: str, score: float,
                   meta: dict[str, Any]) -> dict[str, Any]:
    """One editable ``polygonlabels`` region for a polygon in pixels of a ``width x height`` image."""
    percent = np.round(points * (100.0 / np.array([width, height])), PERCENT_DECIMALS)
    return {
        "id": new_id(),
        "from_name": setup.polygon_name,
        "to_name": setup.image_name,
        "type": "polygonlabels",
        "origin": "prediction",
        "original_width": int(width),
        "original_height": int(height),
        "image_rotation": 0,
        "value": {"points": percent.tolist(), "closed": True, "polygonlabels": [label]},
        "readonly": False,
        "meta": {**meta, "sam_score": round(float(score), 4)},  # no "score": uncalibrated (backend.regions)
    }
