"""The job protocol between the backend and the GPU workers: jobs, results, mask and image encodings.

Importable without torch, the model or Redis (only the standard library, numpy and Pillow), so the backend can
build jobs and read results. Everything that crosses Redis is flat bytes:

- a :class:`Job` travels as the fields of a stream entry (:meth:`Job.to_fields`, ``dict[str, bytes]``);
- a :class:`Result` travels as one value (:meth:`Result.to_bytes`), a small length-prefixed container of the same
  kind of fields, so that the mask bytes are never base64- or JSON-encoded;
- masks are an ``n×H×W`` boolean array encoded by :func:`encode_masks` as one 1-bit PNG per mask — lossless, and a
  typical object mask at 1 megapixel takes a few kB instead of the 1 MB a JSON pixel list would;
- images are stored once per content hash (:func:`image_hash`), and a job refers to the hash.

The byte encodings (:func:`pack_fields`, :func:`encode_masks` and their inverses) live in :mod:`worker.client.codec`
and are importable from here too.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import time
import uuid
from collections.abc import Mapping
from typing import Any

import numpy as np

from worker.client.codec import decode_masks, encode_masks, pack_fields, unpack_fields

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
#: Longest job id a job may have (ours are 32 hex characters); keeps keys built from ids small.
MAX_JOB_ID_CHARS = 256
#: Most clicks one refinement may carry (SAM was trained with a handful; more only slows the decoder down).
MAX_POINTS = 64
#: The templates a job's ``phrasing`` may set (``{}`` marks where the query goes; see ``model/phrasing.py``).
TEMPLATES = ("phrase", "sentence")


class QueueError(RuntimeError):
    """Base of the errors the queue raises to its callers; ``code`` is one of :data:`ERROR_CODES`."""

    code = INTERNAL




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


def clip(text: str, limit: int = 80) -> str:
    """``text`` cut to ``limit`` characters, for messages that quote input of any size."""
    return text if len(text) <= limit else f"{text[:limit]}… ({len(text)} characters)"


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
    ``phrasing`` ``None``: ``query`` is the question verbatim; a dict (:func:`check_phrasing`; ``{}``: LISA's own
    templates): ``query`` is what an annotator typed, and the worker phrases it (``model/phrasing.py``) and says
    the question it put in :attr:`Result.question`.
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
    phrasing: dict[str, str] | None = None
    deadline: float | None = None
    id: str = dataclasses.field(default_factory=new_job_id)
    submitted: float = dataclasses.field(default_factory=time.time)
    attempts: int = 0
    entry_id: str | None = dataclasses.field(default=None, compare=False, repr=False)
    image_bytes: bytes | None = dataclasses.field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        # Every field is checked here, not where it is used: a job rebuilt from a stream entry that anyone could
        # have written must fail as one ValueError when it is read, never later inside a batch.
        if not self.image or not isinstance(self.image, str):
            raise ValueError("a job needs an image hash")
        if not self.id or not isinstance(self.id, str) or len(self.id) > MAX_JOB_ID_CHARS:
            raise ValueError(f"a job needs an id of 1 to {MAX_JOB_ID_CHARS} characters")
        if self.kind not in KINDS:
            raise ValueError(f"a job's kind must be one of {KINDS}, not {clip(repr(self.kind))}")
        if not isinstance(self.options, dict):
            raise ValueError(f"a job's options must be a JSON object, not {type(self.options).__name__}")
        for name in ("deadline", "submitted"):
            value = getattr(self, name)
            if value is not None and not (isinstance(value, (int, float)) and math.isfinite(value)):
                raise ValueError(f"a job's {name} must be a finite unix time, not {clip(repr(value))}")
        if self.phrasing is not None:
            check_phrasing(self.phrasing)
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
            "deadline": repr(float(self.deadline)).encode(),
            "submitted": repr(float(self.submitted)).encode(),
        }
        if self.answer is not None:
            fields["answer"] = self.answer.encode()
        if self.phrasing is not None:
            fields["phrasing"] = _json(self.phrasing)
        return fields

    @classmethod
    def from_fields(cls, fields: Mapping[Any, Any], *, attempts: int = 0, entry_id: str | None = None) -> Job:
        """Rebuild a job from :meth:`to_fields` output (keys and values may be ``str`` or ``bytes``)."""
        has_answer = "answer" in fields or b"answer" in fields
        phrasing = _text(fields, "phrasing", "")
        try:
            return cls(
                id=_text(fields, "id"),
                image=_text(fields, "image"),
                query=_text(fields, "query", ""),
                answer=_text(fields, "answer") if has_answer else None,
                kind=_text(fields, "kind", SEGMENT),
                options=json.loads(_text(fields, "options", "{}")),
                phrasing=json.loads(phrasing) if phrasing else None,
                deadline=float(_text(fields, "deadline")),
                submitted=float(_text(fields, "submitted", "0")),
                attempts=attempts,
                entry_id=entry_id,
            )
        except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as exc:  # RecursionError: [[[[...]]]]
            raise ValueError(f"malformed job fields: {exc}") from exc


def check_phrasing(phrasing: object) -> dict[str, str]:
    """A job's ``phrasing``, checked: ``{"phrase": ..., "sentence": ...}``, either template optional, each with
    exactly one ``{}``. Raises ``ValueError`` with a message for people (the backend shows it for bad settings)."""
    if not isinstance(phrasing, dict) or not set(phrasing) <= set(TEMPLATES):
        raise ValueError(f"a job's phrasing must be an object with keys among {TEMPLATES}, not {clip(repr(phrasing))}")
    for name, template in phrasing.items():
        if not isinstance(template, str) or template.count("{}") != 1:
            raise ValueError(f"the {name} template must contain exactly one {{}}: {clip(repr(template))}")
    return phrasing


def _finite(value: Any) -> bool:
    """Whether ``value`` is a finite JSON number (an integer too large for a float is not)."""
    try:
        return isinstance(value, (int, float)) and math.isfinite(value)
    except OverflowError:
        return False


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
                or not all(_finite(v) for v in p[:2])):
            raise ValueError(f"a point must be [x, y, label] with label 0 or 1, got {clip(repr(p))}")
        points.append((float(p[0]), float(p[1]), int(p[2])))
    if box is not None:
        if (not isinstance(box, (list, tuple)) or len(box) != 4
                or not all(_finite(v) for v in box)):
            raise ValueError(f"a box must be [x0, y0, x1, y1], got {clip(repr(box))}")
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
    ``note`` is a message for people shown with the answer (the offline demo model says what it is).
    ``question`` is the question the worker put to the model (a phrased job's, see :attr:`Job.phrasing`).
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
    note: str = ""
    question: str = ""

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
            "note": self.note.encode(),
            "question": self.question.encode(),
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
                note=_text(fields, "note", ""),
                question=_text(fields, "question", ""),
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
