"""Masks -> Label Studio ``brushlabels`` regions (and predictions made of them).

Each region carries ``"origin": "prediction"`` so that Label Studio saves it as ``prediction`` when the annotator
accepts it unchanged and ``prediction-changed`` after an edit (without it, it is saved as ``manual`` and
corrections cannot be told apart), and ``original_width``/``original_height`` equal to the EXIF-applied image
size, which is the size the labeling UI draws the brush at.

Regions carry no ``score``: the one LISA gives is SAM's IoU prediction, and LISA never trains SAM's IoU head, so the
number is uncalibrated (the demo model gives -0.40 ... -0.28) and Label Studio's Regions panel would show it as if
it meant something. It is kept in ``meta.sam_score`` (and ``LISA_LS_MIN_SCORE`` still filters on it).
"""

from __future__ import annotations

import dataclasses
import logging
import uuid
from collections.abc import Iterator
from typing import Any

import numpy as np

from backend.brush import band_to_rle, mask_to_rle
from backend.labeling import LabelingSetup

log = logging.getLogger(__name__)


#: The most regions one answer holds when it is split into instances: a mask of salt noise or a crowd can have
#: thousands of connected components, and each region costs the labeling UI a canvas and the answer an RLE of the
#: whole image. Past it the largest are kept and the interactive answer says so in the message TextArea.
MAX_REGIONS = 100
_COUNT_CHUNK = 1 << 20  # pixels counted per step when sizing instances


@dataclasses.dataclass
class Instances:
    """The connected components (8-connected) of one ``H x W`` mask, labelled once.

    ``labels`` is the ``H x W`` int32 label image (component ``k`` is ``labels == k``); ``order`` the labels of the
    components of at least ``min_pixels`` pixels, largest first (ties: in label order); ``rows[k - 1]`` the rows
    component ``k`` spans. Nothing here holds a full-size mask per component: :meth:`rle` and :meth:`mask` make one
    component's at a time.
    """

    labels: np.ndarray
    order: list[int]
    rows: list[slice]

    @classmethod
    def find(cls, mask: np.ndarray, min_pixels: int = 1) -> Instances:
        from scipy import ndimage

        labels, n = ndimage.label(mask, structure=np.ones((3, 3), dtype=bool), output=np.int32)
        flat, sizes = labels.ravel(), np.zeros(n + 1, dtype=np.int64)
        for start in range(0, flat.size, _COUNT_CHUNK):  # bincount copies its input to int64: a slice at a time
            sizes += np.bincount(flat[start : start + _COUNT_CHUNK], minlength=n + 1)
        sizes = sizes[1:]
        kept = np.flatnonzero(sizes >= max(1, min_pixels))  # specks go before anything is allocated for them
        order = (kept[np.argsort(-sizes[kept], kind="stable")] + 1).tolist()
        rows = [box[0] for box in ndimage.find_objects(labels)] if order else []
        return cls(labels=labels, order=order, rows=rows)

    def band(self, k: int) -> tuple[np.ndarray, int]:
        """Component ``k`` as the rows it spans: ``(rows x W bool, first row)``."""
        span = self.rows[k - 1]
        return self.labels[span] == k, span.start

    def rle(self, k: int) -> list[int]:
        """Component ``k`` as Label Studio brush RLE of the whole image."""
        band, top = self.band(k)
        return band_to_rle(band, top, self.labels.shape[0])

    def mask(self, k: int) -> np.ndarray:
        """Component ``k`` as an ``H x W`` bool mask."""
        return self.labels == k


def split_instances(mask: np.ndarray, min_pixels: int = 1, limit: int | None = None) -> Iterator[np.ndarray]:
    """Connected components (8-connected) of a boolean mask, largest first, one ``H x W`` mask at a time (at most
    ``limit``); specks under ``min_pixels`` dropped."""
    found = Instances.find(mask, min_pixels)
    for k in found.order[:limit]:
        yield found.mask(k)


def brush_region(mask: np.ndarray, setup: LabelingSetup, label: str, score: float, meta: dict[str, Any]) -> dict:
    """One editable ``brushlabels`` region for an ``H x W`` boolean mask."""
    height, width = mask.shape
    return rle_region(mask_to_rle(mask), width, height, setup, label, score, meta)


def rle_region(rle: list[int], width: int, height: int, setup: LabelingSetup, label: str, score: float,
               meta: dict[str, Any]) -> dict:
    """One editable ``brushlabels`` region for a mask already encoded as brush RLE of a ``width x height`` image."""
    return {
        "id": uuid.uuid4().hex[:10],
        "from_name": setup.brush_name,
        "to_name": setup.image_name,
        "type": "brushlabels",
        "origin": "prediction",
        "original_width": int(width),
        "original_height": int(height),
        "image_rotation": 0,
        "value": {"format": "rle", "rle": rle, "brushlabels": [label]},
        "readonly": False,
        "meta": {**meta, "sam_score": round(float(score), 4)},
    }


#: The id of every message result. Label Studio 1.23.2 applies a textarea result of an interactive answer at once
#: (no suggestion to accept) and, when the annotation already has an area of that id, replaces its text; with a new
#: id each time it would add a second message next to the stale one (seen in tests/test_e2e_ui.py).
MESSAGE_ID = "lisa-message"


def message_region(setup: LabelingSetup, text: str) -> dict[str, Any]:
    """The config's read-only message TextArea saying ``text``, the one way a backend can say something in the
    labeling UI (Label Studio does not show a backend's errors there). Every interactive answer carries one, so that
    each answer replaces the last message; ``text=""`` says nothing: ``{"text": []}`` hides the box (an empty
    string would leave an empty box)."""
    return {"id": MESSAGE_ID, "from_name": setup.message_name, "to_name": setup.image_name, "type": "textarea",
            "value": {"text": [text] if text else []}, "readonly": True}


def capped_message(query: str, found: int, kept: int, model_name: str = "LISA") -> str:
    """What the message TextArea says when an answer split into more instances than it may hold."""
    return (f"{model_name} found {found} separate regions for '{query}'; showing the {kept} largest (at most {kept} "
            "per answer). Turn split_instances off for this project to get the whole mask as one region.")


def prediction(masks: np.ndarray, scores: list[float], setup: LabelingSetup, label: str, model_version: str,
               query: str, split: bool = False, *, ids: list[str] | None = None, min_score: float = float("-inf"),
               min_area: int = 0, meta: dict[str, Any] | None = None, message: bool = False,
               max_regions: int = MAX_REGIONS, model_name: str = "LISA") -> dict[str, Any]:
    """A Label Studio prediction: one region per kept mask (or per connected instance with ``split``).

    Args:
        masks: ``n x H x W`` bool, one per ``[SEG]`` of LISA's answer.
        scores: ``n`` SAM IoU predictions (uncalibrated: kept in ``meta.sam_score``, never shown as the score); a
            mask scoring under ``min_score``, or a region of fewer than ``min_area`` pixels, is dropped as noise.
        ids: region ids to reuse in order (a refinement answers with the ids of the regions it refines, so that
            accepting it replaces them in the annotation instead of adding a copy).
        meta: more to record in each region's ``meta`` (the clicks of a refinement).
        message: an interactive answer: add the config's message TextArea (if any), saying "found nothing" when
            nothing is kept, :func:`capped_message` when ``max_regions`` cut the answer, and nothing otherwise,
            which clears the message of an earlier answer.
        max_regions: the most regions of the answer (the largest instances are kept; whole masks are never cut).
        model_name: the model that answered, as the messages name it ("LISA", "SAM 3").
    Returns:
        ``{"result": [...], "score": None, "model_version": ...}``; ``result`` has no region when nothing is kept.
        ``score`` is None (Label Studio stores no prediction score) for the reason in the module docstring.
    """
    regions: list[dict[str, Any]] = []
    found = 0
    min_pixels = max(1, min_area)
    for mask, score in zip(masks, scores):
        if score < min_score:
            continue
        info = {"prompt": query, "model_version": model_version, **(meta or {})}
        height, width = mask.shape
        if not split:
            if mask.sum() >= min_pixels:
                regions.append(rle_region(mask_to_rle(mask), width, height, setup, label, score, info))
            continue
        parts = Instances.find(mask, min_pixels)  # one label image per mask; each instance encoded in turn
        found += len(parts.order)
        for k in parts.order[:max(0, max_regions - len(regions))]:
            regions.append(rle_region(parts.rle(k), width, height, setup, label, score, dict(info)))
        del parts
    for region, rid in zip(regions, ids or []):
        region["id"] = rid
    capped = split and found > len(regions)
    if capped:
        log.warning("the answer for %r has %d instances; kept the %d largest", query, found, len(regions))
    if message and setup.message_name:
        said = (capped_message(query, found, len(regions), model_name) if capped
                else "" if regions else f"{model_name} found nothing matching '{query}'")
        regions.append(message_region(setup, said))
    return {"result": regions, "score": None, "model_version": model_version}


def with_note(pred: dict[str, Any], setup: LabelingSetup, note: str) -> dict[str, Any]:
    """``pred`` with a worker's note about the answer (the demo model saying what it is) in the config's message
    TextArea: after the message already there ("found nothing"), or as the message. Unchanged without either."""
    if not note or not setup.message_name:
        return pred
    for region in pred["result"]:
        if region.get("id") == MESSAGE_ID:
            region["value"]["text"] = [" - ".join([*region["value"]["text"], note])]
            return pred
    pred["result"].append(message_region(setup, note))
    return pred
