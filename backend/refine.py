"""Refinement in the labeling UI: smart key points and boxes -> pixel prompts, and what each task remembers.

With Auto-Annotation on, a click of the smart key-point tool or a box of the smart rectangle tool posts an
interactive ``/predict`` whose ``context.result`` holds the image's dynamic regions (the clicks and boxes, not the
query TextArea; measured on Label Studio 1.23.2). Their coordinates are percentages of the image the annotator
sees - the EXIF-applied image - so :func:`read_clicks` converts them at that size.

Accepting a suggestion deletes the clicks from the UI, so the backend keeps, per task, a small record
(:class:`TaskMemory`, in Redis, expiring): the last query asked, the image it was asked about, the ids of the
regions it answered with, and the clicks so far. A click adds to the clicks kept; a request that brings no new
click means one was deleted, so what it carries is what the annotator keeps. A new query starts afresh.

The record also names the image's stored bytes (their hash), its size and a digest of the task's image value, so a
click on the same image neither downloads nor hashes it again: while the stored bytes are still in Redis
(:meth:`TaskMemory.reusable_image`), the click only needs their hash and the size to convert its coordinates. (An
image replaced under the same URL is seen by the next typed query, which always fetches, or once the stored bytes
expire, ``LISA_LS_IMAGE_TTL_S`` after their last use.)
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math

from backend.config import REFINE_MEMORY_TTL_S
from backend.labeling import LabelingSetup
from backend.state import redis_call
from worker.client.protocol import MAX_POINTS
from worker.client.queue import JobQueue

MEMORY_TTL_S = REFINE_MEMORY_TTL_S


class RefineError(ValueError):
    """The clicks cannot be used; the message is for the annotator."""


@dataclasses.dataclass
class Clicks:
    """Prompts read from a context: ``points`` by region id -> ``[x, y, label]`` (pixels; 1 keep, 0 remove) and
    the newest box ``[x0, y0, x1, y1]`` (pixels) or ``None``."""

    points: dict[str, list[float]]
    box: list[float] | None


@dataclasses.dataclass
class TaskMemory:
    """What one task remembers between interactive calls (see the module docstring)."""

    query: str | None = None
    image: str | None = None
    """Hash of the image's bytes as stored in Redis (``JobQueue.put_image``)."""
    regions: list[str] = dataclasses.field(default_factory=list)
    points: dict[str, list[float]] = dataclasses.field(default_factory=dict)
    box: list[float] | None = None
    source: str | None = None
    """:func:`source_digest` of the task's image value when ``image`` was fetched."""
    size: list[int] | None = None
    """``[width, height]`` of that image, EXIF-applied (what the clicks' percentages are of)."""

    @staticmethod
    def key(queue: JobQueue, project: str, task: int | None) -> str:
        return queue.key("task-memory", f"{project or '-'}:{task}")  # both checked by backend.inputs

    @classmethod
    def load(cls, queue: JobQueue, project: str, task: int | None) -> TaskMemory:
        raw = redis_call(queue, lambda: queue.redis.get(cls.key(queue, project, task)), "load task memory")
        if not raw:
            return cls()
        try:
            return cls(**{k: v for k, v in json.loads(raw).items() if k in {f.name for f in dataclasses.fields(cls)}})
        except (TypeError, ValueError):
            return cls()  # an unreadable record is forgotten, not an error for the annotator

    def save(self, queue: JobQueue, project: str, task: int | None) -> None:
        record = json.dumps(dataclasses.asdict(self))
        redis_call(queue, lambda: queue.redis.set(self.key(queue, project, task), record, ex=MEMORY_TTL_S),
                   "save task memory")

    def reusable_image(self, queue: JobQueue, value: object) -> tuple[str, int, int] | None:
        """``(hash, width, height)`` of the image this record names, if it is still the task's image (same value)
        and its bytes are still in Redis; their lifetime is renewed then, as a new upload would renew it."""
        size = self.size
        if not (self.image and self.source and self.source == source_digest(value) and isinstance(size, list)
                and len(size) == 2 and all(isinstance(n, int) and n > 0 for n in size)):
            return None
        key, ttl = queue.key("img", self.image), queue.config.image_ttl_s
        if not redis_call(queue, lambda: queue.redis.expire(key, ttl), "renew image"):
            return None  # expired: fetch it again
        return self.image, size[0], size[1]

    def merge(self, clicks: Clicks) -> Clicks:
        """The clicks to send: earlier ones plus new ones, or exactly the context's when none is new."""
        if set(clicks.points) - set(self.points) or (clicks.box is not None and clicks.box != self.box):
            points = {**self.points, **clicks.points}
            box = clicks.box if clicks.box is not None else self.box
        else:
            points, box = dict(clicks.points), clicks.box
        if len(points) > MAX_POINTS:
            raise RefineError(f"{len(points)} points is more than the {MAX_POINTS} a refinement takes: type the "
                              "query again to start over, or delete some points")
        return Clicks(points, box)


def source_digest(value: object) -> str:
    """A short digest of a task's image value (a URL, or a data: URI of megabytes) to tell whether it changed."""
    return hashlib.sha256(json.dumps(value).encode()).hexdigest()[:32]


def _number(value: dict, key: str, what: str, default: float | None = None) -> float:
    v = value.get(key)
    v = default if v is None else v
    if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v):
        raise RefineError(f"the {what} has no valid '{key}' coordinate" if default is None
                          else f"the {what}'s '{key}' is {json.dumps(v)[:40]}, not a number")
    return float(v)


def click_items(context: dict, setup: LabelingSetup) -> list[dict]:
    """The key-point and rectangle regions of an interactive context that are prompts (of the config's smart
    tools); ``context["result"]`` is a list (checked by :func:`backend.inputs.context_of`)."""
    return [item for item in context.get("result") or []
            if isinstance(item, dict) and item.get("type") in ("keypointlabels", "rectanglelabels")
            and (not setup.click_names or item.get("from_name") in setup.click_names)]


def read_clicks(context: dict, setup: LabelingSetup, width: int, height: int) -> Clicks | None:
    """The key points and box of an interactive context in pixels of the ``width x height`` (EXIF-applied) image;
    ``None`` when the context holds none (a typed query, or an empty context after Submit)."""
    points: dict[str, list[float]] = {}
    box = None
    items = click_items(context, setup)
    for item in items:
        value = item.get("value") if isinstance(item.get("value"), dict) else {}
        rid = str(item.get("id") or f"anon-{len(points)}")
        if item["type"] == "keypointlabels":
            x, y = _number(value, "x", "point"), _number(value, "y", "point")
            if not (0 <= x <= 100 and 0 <= y <= 100):
                raise RefineError(f"the point at ({x:.1f}%, {y:.1f}%) is outside the image")
            labels = value.get("keypointlabels") or []
            if not isinstance(labels, list) or not all(isinstance(lab, str) for lab in labels):
                raise RefineError(f"the point's 'keypointlabels' is {json.dumps(labels)[:40]}, not a list of labels")
            negative = item.get("is_positive") is False or any(lab in setup.negative_labels for lab in labels)
            points[rid] = [round(x / 100 * width, 3), round(y / 100 * height, 3), 0 if negative else 1]
        else:
            box = _box(value, width, height)
    return Clicks(points, box) if items else None


def _box(value: dict, width: int, height: int) -> list[float]:
    """A rectangle (percent, rotated about its top-left corner by ``rotation`` degrees) -> its axis-aligned
    bounding box in pixels, clipped to the image."""
    x, y = _number(value, "x", "box") / 100 * width, _number(value, "y", "box") / 100 * height
    w, h = _number(value, "width", "box") / 100 * width, _number(value, "height", "box") / 100 * height
    if w < 1 or h < 1:
        raise RefineError("the box has no area: drag a rectangle at least one pixel wide and high")
    angle = math.radians(_number(value, "rotation", "box", default=0))  # NaN would make a whole-image box
    cos, sin = math.cos(angle), math.sin(angle)
    xs = [x + dx * cos - dy * sin for dx, dy in ((0, 0), (w, 0), (w, h), (0, h))]
    ys = [y + dx * sin + dy * cos for dx, dy in ((0, 0), (w, 0), (w, h), (0, h))]
    x0, y0, x1, y1 = max(0.0, min(xs)), max(0.0, min(ys)), min(float(width), max(xs)), min(float(height), max(ys))
    if x1 - x0 < 1 or y1 - y0 < 1:
        raise RefineError("the box lies outside the image")
    return [round(v, 3) for v in (x0, y0, x1, y1)]  # float noise of the rotation off
