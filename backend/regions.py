"""Masks -> Label Studio ``brushlabels`` regions (and predictions made of them).

Each region carries ``"origin": "prediction"`` so that Label Studio saves it as ``prediction`` when the annotator
accepts it unchanged and ``prediction-changed`` after an edit (without it, it is saved as ``manual`` and
corrections cannot be told apart), and ``original_width``/``original_height`` equal to the EXIF-applied image
size, which is the size the labeling UI draws the brush at.
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
        "score": round(float(score), 4),
        "readonly": False,
        "meta": meta,
    }


def prediction(masks: np.ndarray, scores: list[float], setup: LabelingSetup, label: str, model_version: str,
               query: str, split: bool = False) -> dict[str, Any]:
    """A Label Studio prediction: one region per non-empty mask (or per connected instance with ``split``).

    Args:
        masks: ``n x H x W`` bool, one per ``[SEG]`` of LISA's answer.
        scores: ``n`` SAM IoU predictions.
    Returns:
        ``{"result": [...], "score": ..., "model_version": ...}``; ``result`` is empty when every mask is empty.
    """
    regions = []
    for mask, score in zip(masks, scores):
        for part in split_instances(mask) if split else ([mask] if mask.any() else []):
            regions.append(brush_region(part, setup, label, score, {"prompt": query, "model_version": model_version}))
    best = max((r["score"] for r in regions), default=0.0)
    return {"result": regions, "score": best, "model_version": model_version}
