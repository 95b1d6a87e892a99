"""The job protocol between the backend and the GPU workers: jobs, results, mask and image encodings.

Importable without torch, the model or Redis (only the standard library, numpy and Pillow), so the backend can
build jobs and read results. Everything that crosses Redis is flat bytes:

- a :class:`Job` travels as the fields of a stream entry (:meth:`Job.to_fields`, ``dict[str, bytes]``);
- a :class:`Result` travels as one value (:meth:`Result.to_bytes`), a small length-prefixed container of the same
  kind of fields, so that the mask bytes are never base64- or JSON-encoded;
- masks are an ``n×H×W`` boolean array encoded by :func:`encode_masks` as one 1-bit PNG per mask — lossless, and a
  typical object mask at 1 megapixel takes a few kB instead of the 1 MB a JSON pixel list would;
- images are stored once per content hash (:func:`image_hash`), and a job refers to the hash.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import struct
import time
import uuid
from collections.abc import Mapping
from typing import Any

import numpy as np
from PIL import Image

STATUS_OK = "ok"
"""The job ran and the result carries masks, scores and text."""
STATUS_ERROR = "error"
"""The job did not produce an answer; ``error_code`` and ``error_message`` say why."""

TIMEOUT = "timeout"
"""The job's deadline passed before a worker answered."""
BUSY = "busy"
"""The queue was above its bound and refused the job (backpressure); try again later."""
DEAD_LETTER = "dead_letter"
"""The job failed on every allowed delivery and was moved to the dead-letter stream."""
BAD_INPUT = "bad_input"
"""The job cannot be run as given (e.g. its image expired or is not an image)."""
REDIS_DOWN = "redis_down"
"""Redis could not be reached within the client's retry budget."""
INTERNAL = "internal"
"""A bug or an unexpected failure in the worker or the model."""
ERROR_CODES = frozenset({TIMEOUT, BUSY, DEAD_LETTER, BAD_INPUT, REDIS_DOWN, INTERNAL})

SEGMENT = "segment"
"""A text query: the LLM answers, each ``[SEG]`` becomes a mask (``query`` or a teacher-forced ``answer``)."""
REFINE = "refine"
"""A refinement: SAM's decoder alone on the cached image, prompted with the [SEG] embeddings of the last answer to
``query`` (when given) plus the annotator's clicks and box in ``options`` (see :func:`refine_prompts`)."""
KINDS = (SEGMENT, REFINE)
#: Most clicks one refinement may carry (SAM was trained with a handful; more only slows the decoder down).
MAX_POINTS = 64


class QueueError(RuntimeError):
    """Base of the errors the queue raises to its callers; ``code`` is one of :data:`ERROR_CODES`."""

    code = INTERNAL


_FIELDS_MAGIC = b"LSF1"
_MASKS_MAGIC = b"LSM1"
_MASKS_HEADER = struct.Struct(">4sIII")  # magic, n, H, W
_PNG_COMPRESS_LEVEL = 3  # measured: as small as level 6 within 15% on object masks, and faster


def new_job_id() -> str:
    """A fresh random job id (32 hex characters)."""
    return uuid.uuid4().hex


def image_hash(data: bytes) -> str:
    """The content address of image bytes: their SHA-256 as 64 lowercase hex characters."""
    return hashlib.sha256(data).hexdigest()


def _json(value: Any) -> bytes:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode()


def _text(fields: Mapping[Any, Any], name: str, default: str | None = None) -> str:
    """Read a field as text from a mapping whose keys and values may be ``str`` or ``bytes`` (as Redis returns)."""
    value = fields.get(name, fields.get(name.encode()))
    if value is None:
        if default is None:
            raise ValueError(f"missing field {name!r}")
        return default
    return value.decode() if isinstance(value, bytes) else str(value)


def _raw(fields: Mapping[Any, Any], name: str) -> bytes:
    value = fields.get(name, fields.get(name.encode(), b""))
    return value if isinstance(value, bytes) else str(value).encode()


@dataclasses.dataclass
class Job:
    """One segmentation request.

    ``kind`` is :data:`SEGMENT` (a text query) or :data:`REFINE` (clicks/box on an earlier answer). ``image`` is
    the content hash of image bytes stored by ``JobQueue.put_image``. A segment job needs ``query`` (the question
    put to the model) or ``answer`` (a teacher-forced answer: the model is fed this text instead of generating); a
    refine job needs clicks or a box in ``options`` and may name the ``query`` whose answer it refines.
    ``deadline`` is an absolute unix time (wall clock: hosts are expected to be NTP-synchronised); ``None`` until
    submission, which fills in the queue's default. ``attempts`` counts deliveries to a worker including the
    current one; the queue sets it from Redis. ``entry_id`` (the stream entry) and ``image_bytes`` (filled by the
    worker loop) are local to a worker and never serialised.
    """

    image: str
    query: str = ""
    answer: str | None = None
    kind: str = SEGMENT
    options: dict[str, Any] = dataclasses.field(default_factory=dict)
    model_version: str = ""
    deadline: float | None = None
    id: str = dataclasses.field(default_factory=new_job_id)
    submitted: float = dataclasses.field(default_factory=time.time)
    attempts: int = 0
    entry_id: str | None = dataclasses.field(default=None, compare=False, repr=False)
    image_bytes: bytes | None = dataclasses.field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        if not self.image:
            raise ValueError("a job needs an image hash")
        if self.kind not in KINDS:
            raise ValueError(f"a job's kind must be one of {KINDS}, not {self.kind!r}")
        if self.kind == SEGMENT and not self.query and self.answer is None:
            raise ValueError("a job needs a query or a teacher-forced answer")
        if self.kind == REFINE:
            refine_prompts(self.options)  # malformed clicks are refused before they reach Redis

    def remaining(self, now: float | None = None) -> float:
        """Seconds left before the deadline (negative once it passed; infinite when no deadline is set)."""
        if self.deadline is None:
            return float("inf")
        return self.deadline - (time.time() if now is None else now)

    def expired(self, now: float | None = None) -> bool:
        """Whether the deadline has passed, so that running the job would be wasted work."""
        return self.remaining(now) <= 0

    def to_fields(self) -> dict[str, bytes]:
        """Flat ``str -> bytes`` fields for a Redis stream entry. ``answer`` is omitted when there is none."""
        if self.deadline is None:
            raise ValueError("set a deadline before serialising a job (JobQueue.submit does)")
        fields = {
            "id": self.id.encode(),
            "image": self.image.encode(),
            "query": self.query.encode(),
            "kind": self.kind.encode(),
            "options": _json(self.options),
            "model_version": self.model_version.encode(),
            "deadline": repr(float(self.deadline)).encode(),
            "submitted": repr(float(self.submitted)).encode(),
        }
        if self.answer is not None:
            fields["answer"] = self.answer.encode()
        return fields

    @classmethod
    def from_fields(cls, fields: Mapping[Any, Any], *, attempts: int = 0, entry_id: str | None = None) -> Job:
        """Rebuild a job from :meth:`to_fields` output (keys and values may be ``str`` or ``bytes``)."""
        has_answer = "answer" in fields or b"answer" in fields
        try:
            return cls(
                id=_text(fields, "id"),
                image=_text(fields, "image"),
                query=_text(fields, "query", ""),
                answer=_text(fields, "answer") if has_answer else None,
                kind=_text(fields, "kind", SEGMENT),
                options=json.loads(_text(fields, "options", "{}")),
                model_version=_text(fields, "model_version", ""),
                deadline=float(_text(fields, "deadline")),
                submitted=float(_text(fields, "submitted", "0")),
                attempts=attempts,
                entry_id=entry_id,
            )
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ValueError(f"malformed job fields: {exc}") from exc


def refine_prompts(options: Mapping[str, Any]) -> tuple[list[tuple[float, float, int]], list[float] | None]:
    """The clicks and box of a :data:`REFINE` job's options, checked: ``([(x, y, label), ...], box or None)``.

    ``options["points"]`` is a list of ``[x, y, label]`` (pixels of the EXIF-applied image; label 1 adds, 0
    removes) and ``options["box"]`` is ``[x0, y0, x1, y1]`` or absent. Raises ``ValueError`` with a message for
    people; bounds against the image size are checked where the size is known (backend and worker).
    """
    raw_points = options.get("points") or []
    box = options.get("box")
    if not isinstance(raw_points, list):
        raise ValueError("points must be a list of [x, y, label]")
    if len(raw_points) > MAX_POINTS:
        raise ValueError(f"a refinement takes at most {MAX_POINTS} points, got {len(raw_points)}: "
                         "delete some key points and click again")
    points = []
    for p in raw_points:
        if (not isinstance(p, (list, tuple)) or len(p) != 3 or p[2] not in (0, 1)
                or not all(isinstance(v, (int, float)) and np.isfinite(v) for v in p[:2])):
            raise ValueError(f"a point must be [x, y, label] with label 0 or 1, got {p!r}")
        points.append((float(p[0]), float(p[1]), int(p[2])))
    if box is not None:
        if (not isinstance(box, (list, tuple)) or len(box) != 4
                or not all(isinstance(v, (int, float)) and np.isfinite(v) for v in box)):
            raise ValueError(f"a box must be [x0, y0, x1, y1], got {box!r}")
        box = [float(v) for v in box]
        if box[2] - box[0] < 1 or box[3] - box[1] < 1:
            raise ValueError("the box has no area: drag a rectangle at least one pixel wide and high")
    if not points and box is None:
        raise ValueError("a refinement needs at least one point or a box")
    return points, box


@dataclasses.dataclass
class Result:
    """The answer to one job: masks and scores on success, an error code and message otherwise.

    ``masks`` holds :func:`encode_masks` bytes (use :meth:`mask_array` to decode), one mask per ``[SEG]`` token in
    ``text``, with ``scores[i]`` the model's confidence in mask ``i``. ``timings`` maps stage names to seconds.
    ``worker`` names the worker that produced the result (empty for answers made by the client itself).
    """

    job_id: str
    status: str = STATUS_OK
    masks: bytes = b""
    scores: list[float] = dataclasses.field(default_factory=list)
    text: str = ""
    model_version: str = ""
    timings: dict[str, float] = dataclasses.field(default_factory=dict)
    error_code: str = ""
    error_message: str = ""
    worker: str = ""

    def __post_init__(self) -> None:
        if self.status not in (STATUS_OK, STATUS_ERROR):
            raise ValueError(f"status must be {STATUS_OK!r} or {STATUS_ERROR!r}, not {self.status!r}")
        if self.status == STATUS_ERROR and self.error_code not in ERROR_CODES:
            raise ValueError(f"error_code must be one of {sorted(ERROR_CODES)}, not {self.error_code!r}")

    @classmethod
    def error(cls, job_id: str, code: str, message: str, **extra: Any) -> Result:
        """An error result; ``message`` is shown to people, so say what happened and what to do."""
        return cls(job_id=job_id, status=STATUS_ERROR, error_code=code, error_message=message, **extra)

    @classmethod
    def from_masks(cls, job_id: str, masks: np.ndarray, scores: list[float] | None = None, **extra: Any) -> Result:
        """A success result from an ``n×H×W`` boolean mask array (scores default to 1.0 each)."""
        scores = [1.0] * len(masks) if scores is None else [float(s) for s in scores]
        if len(scores) != len(masks):
            raise ValueError(f"{len(masks)} masks but {len(scores)} scores")
        return cls(job_id=job_id, masks=encode_masks(masks), scores=scores, **extra)

    @property
    def ok(self) -> bool:
        """Whether the job succeeded."""
        return self.status == STATUS_OK

    def mask_array(self) -> np.ndarray:
        """The masks as an ``n×H×W`` boolean array (``0×0×0`` when the result carries none)."""
        return decode_masks(self.masks) if self.masks else np.zeros((0, 0, 0), dtype=bool)

    def to_fields(self) -> dict[str, bytes]:
        """Flat ``str -> bytes`` fields; the masks stay raw bytes."""
        return {
            "job_id": self.job_id.encode(),
            "status": self.status.encode(),
            "masks": self.masks,
            "scores": _json([float(s) for s in self.scores]),
            "text": self.text.encode(),
            "model_version": self.model_version.encode(),
            "timings": _json({k: float(v) for k, v in self.timings.items()}),
            "error_code": self.error_code.encode(),
            "error_message": self.error_message.encode(),
            "worker": self.worker.encode(),
        }

    @classmethod
    def from_fields(cls, fields: Mapping[Any, Any]) -> Result:
        """Rebuild a result from :meth:`to_fields` output (keys and values may be ``str`` or ``bytes``)."""
        try:
            return cls(
                job_id=_text(fields, "job_id"),
                status=_text(fields, "status"),
                masks=_raw(fields, "masks"),
                scores=json.loads(_text(fields, "scores", "[]")),
                text=_text(fields, "text", ""),
                model_version=_text(fields, "model_version", ""),
                timings=json.loads(_text(fields, "timings", "{}")),
                error_code=_text(fields, "error_code", ""),
                error_message=_text(fields, "error_message", ""),
                worker=_text(fields, "worker", ""),
            )
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ValueError(f"malformed result fields: {exc}") from exc

    def to_bytes(self) -> bytes:
        """One self-describing value (see :func:`pack_fields`), what a worker pushes to the waiter."""
        return pack_fields(self.to_fields())

    @classmethod
    def from_bytes(cls, data: bytes) -> Result:
        """Inverse of :meth:`to_bytes`."""
        return cls.from_fields(unpack_fields(data))


def pack_fields(fields: Mapping[str, bytes]) -> bytes:
    """Pack ``str -> bytes`` fields into one value: magic, count, then per field key and value lengths and bytes."""
    parts = [_FIELDS_MAGIC, struct.pack(">I", len(fields))]
    for key, value in fields.items():
        kb = key.encode()
        parts += [struct.pack(">HI", len(kb), len(value)), kb, bytes(value)]
    return b"".join(parts)


def unpack_fields(data: bytes) -> dict[str, bytes]:
    """Inverse of :func:`pack_fields`; raises ``ValueError`` on anything truncated or foreign."""
    view = memoryview(data)
    if bytes(view[:4]) != _FIELDS_MAGIC or len(view) < 8:
        raise ValueError("not a packed result (bad magic)")
    (count,) = struct.unpack_from(">I", view, 4)
    pos, out = 8, {}
    for _ in range(count):
        if pos + 6 > len(view):
            raise ValueError("packed fields truncated")
        klen, vlen = struct.unpack_from(">HI", view, pos)
        pos += 6
        if pos + klen + vlen > len(view):
            raise ValueError("packed fields truncated")
        key = bytes(view[pos : pos + klen]).decode()
        out[key] = bytes(view[pos + klen : pos + klen + vlen])
        pos += klen + vlen
    if pos != len(view):
        raise ValueError("trailing bytes after packed fields")
    return out


def encode_masks(masks: np.ndarray) -> bytes:
    """Encode an ``n×H×W`` mask array losslessly as a header ``(n, H, W)`` and one 1-bit PNG per mask.

    Accepts ``bool`` or integer arrays holding only 0 and 1; a float array (probabilities, logits) is refused
    rather than silently thresholded. ``n`` may be 0 (no object found); the header then keeps the image size.
    """
    arr = np.asarray(masks)
    if arr.ndim != 3:
        raise ValueError(f"masks must be n×H×W, got shape {arr.shape}")
    if arr.dtype != bool:
        if not np.issubdtype(arr.dtype, np.integer) or (arr.size and (arr.min() < 0 or arr.max() > 1)):
            raise ValueError(f"masks must be boolean (or 0/1 integers), got {arr.dtype}")
        arr = arr.astype(bool)
    n, height, width = arr.shape
    if n and (height == 0 or width == 0):
        raise ValueError(f"masks must have a non-empty H×W, got shape {arr.shape}")
    parts = [_MASKS_HEADER.pack(_MASKS_MAGIC, n, height, width)]
    for mask in arr:
        buf = io.BytesIO()
        Image.fromarray(np.ascontiguousarray(mask)).save(buf, format="PNG", compress_level=_PNG_COMPRESS_LEVEL)
        png = buf.getvalue()
        parts += [struct.pack(">I", len(png)), png]
    return b"".join(parts)


def decode_masks(data: bytes) -> np.ndarray:
    """Inverse of :func:`encode_masks`: an ``n×H×W`` boolean array. Raises ``ValueError`` on malformed bytes."""
    if len(data) < _MASKS_HEADER.size:
        raise ValueError("mask bytes truncated")
    magic, n, height, width = _MASKS_HEADER.unpack_from(data, 0)
    if magic != _MASKS_MAGIC:
        raise ValueError("not encoded masks (bad magic)")
    out = np.zeros((n, height, width), dtype=bool)
    pos = _MASKS_HEADER.size
    for i in range(n):
        if pos + 4 > len(data):
            raise ValueError("mask bytes truncated")
        (size,) = struct.unpack_from(">I", data, pos)
        pos += 4
        try:
            with Image.open(io.BytesIO(data[pos : pos + size])) as image:
                if image.size != (width, height):
                    raise ValueError(f"mask {i} is {image.size}, header says {(width, height)}")
                pixels = np.asarray(image)
        except OSError as exc:  # Pillow's UnidentifiedImageError and truncation errors are OSErrors
            raise ValueError(f"mask {i} is not a readable PNG: {exc}") from exc
        out[i] = pixels if pixels.dtype == bool else pixels != 0
        pos += size
    if pos != len(data):
        raise ValueError("trailing bytes after encoded masks")
    return out
