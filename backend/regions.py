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

import uuid
from typing import Any

import numpy as np

from backend.brush import mask_to_rle
from backend.labeling import LabelingSetup


def split_instances(mask: np.ndarray, min_pixels: int = 1) -> list[np.ndarray]:
    """Connected components (8-connected) of a boolean mask, largest first; specks under ``min_pixels`` dropped."""
    from scipy import ndimage

    labels, n = ndimage.label(mask, structure=np.ones((3, 3), dtype=bool))
    if n <= 1:
        return [mask] if mask.sum() >= min_pixels else []
    sizes = np.bincount(labels.ravel())[1:]
    order = [i + 1 for i in np.argsort(-sizes) if sizes[i] >= min_pixels]
    return [labels == i for i in order]


def brush_region(mask: np.ndarray, setup: LabelingSetup, label: str, score: float, meta: dict[str, Any]) -> dict:
    """One editable ``brushlabels`` region for an ``H x W`` boolean mask."""
    height, width = mask.shape
    return {
        "id": uuid.uuid4().hex[:10],
        "from_name": setup.brush_name,
        "to_name": setup.image_name,
        "type": "brushlabels",
        "origin": "prediction",
        "original_width": int(width),
        "original_height": int(height),
        "image_rotation": 0,
        "value": {"format": "rle", "rle": mask_to_rle(mask), "brushlabels": [label]},
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


def prediction(masks: np.ndarray, scores: list[float], setup: LabelingSetup, label: str, model_version: str,
               query: str, split: bool = False, *, ids: list[str] | None = None, min_score: float = float("-inf"),
               min_area: int = 0, meta: dict[str, Any] | None = None, message: bool = False) -> dict[str, Any]:
    """A Label Studio prediction: one region per kept mask (or per connected instance with ``split``).

    Args:
        masks: ``n x H x W`` bool, one per ``[SEG]`` of LISA's answer.
        scores: ``n`` SAM IoU predictions (uncalibrated: kept in ``meta.sam_score``, never shown as the score); a
            mask scoring under ``min_score``, or a region of fewer than ``min_area`` pixels, is dropped as noise.
        ids: region ids to reuse in order (a refinement answers with the ids of the regions it refines, so that
            accepting it replaces them in the annotation instead of adding a copy).
        meta: more to record in each region's ``meta`` (the clicks of a refinement).
        message: an interactive answer: add the config's message TextArea (if any), saying "found nothing" when
            nothing is kept and nothing otherwise, which clears the message of an earlier answer.
    Returns:
        ``{"result": [...], "score": None, "model_version": ...}``; ``result`` has no region when nothing is kept.
        ``score`` is None (Label Studio stores no prediction score) for the reason in the module docstring.
    """
    regions = []
    for mask, score in zip(masks, scores):
        if score < min_score:
            continue
        for part in split_instances(mask, max(1, min_area)) if split else ([mask] if mask.sum() >= max(1, min_area)
                                                                          else []):
            info = {"prompt": query, "model_version": model_version, **(meta or {})}
            regions.append(brush_region(part, setup, label, score, info))
    for region, rid in zip(regions, ids or []):
        region["id"] = rid
    if message and setup.message_name:
        regions.append(message_region(setup, "" if regions else f"LISA found nothing matching '{query}'"))
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
