"""A worker's masks as a prediction in the kinds of region the labeling config asks for: brush and/or polygons.

A config with ``<BrushLabels>`` gets brush regions (:func:`backend.regions.prediction`); one with
``<PolygonLabels>`` gets the outer outline of each piece of each mask as an editable polygon
(:mod:`backend.polygons`), simplified to the project's tolerance; one with both gets both, so that the annotator
keeps whichever suits the object. Every region carries the same ``meta`` (the query, the model version, a
refinement's clicks) and ``origin: "prediction"``.

Region ids say their kind (polygon ids start with ``p``, brush ids are hex digits), so that a refinement, which
answers with the ids of the regions it refines (accepting it then replaces them), gives each kind's ids back to the
same kind.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

from backend import regions
from backend.labeling import LabelingSetup
from backend.polygons import MAX_POLYGONS, outlines, polygon_region
from backend.regions import MESSAGE_ID, message_region

log = logging.getLogger(__name__)

#: The region types that hold a mask (what the task remembers to refine, what capture reads).
MASK_TYPES = ("brushlabels", "polygonlabels")


def split_ids(ids: list[str] | None) -> tuple[list[str], list[str]]:
    """``(brush ids, polygon ids)`` of a list of region ids, each in its order."""
    ids = list(ids or [])
    return [i for i in ids if not i.startswith("p")], [i for i in ids if i.startswith("p")]


def prediction(masks: np.ndarray, scores: list[float], setup: LabelingSetup, label: str, model_version: str,
               query: str, split: bool = False, *, tolerance: float, ids: list[str] | None = None,
               min_score: float = float("-inf"), min_area: int = 0, meta: dict[str, Any] | None = None,
               message: bool = False, model_name: str = "LISA") -> dict[str, Any]:
    """A Label Studio prediction for ``masks`` (``n x H x W`` bool): brush regions as
    :func:`backend.regions.prediction` makes them (same arguments) when ``label`` is one of the config's
    BrushLabels, plus polygons of each mask's pieces (each of at least ``min_area`` pixels; masks scoring under
    ``min_score`` dropped) when it is one of its PolygonLabels. ``tolerance``: polygon simplification in pixels.
    ``model_name``: the model that answered, as the messages name it.

    Returns ``{"result": [...], "score": None, "model_version": ...}``: brush regions first, then polygons; with
    ``message`` (an interactive answer), the config's message TextArea last, as :func:`backend.regions.prediction`
    says it: "found nothing" when neither kind has a region, what was left out of a capped answer, else nothing.
    """
    brush_ids, polygon_ids = split_ids(ids)
    polygons: list[dict[str, Any]] = []
    found = 0
    if setup.polygon_name is not None and label in setup.polygon_labels:
        for mask, score in zip(masks, scores):
            if score < min_score:
                continue
            height, width = mask.shape
            info = {"prompt": query, "model_version": model_version, **(meta or {})}
            kept, pieces = outlines(mask, tolerance, max(1, min_area))
            found += pieces
            polygons += [polygon_region(points, width, height, setup, label, score, dict(info)) for points in kept]
        for region, rid in zip(polygons, polygon_ids):
            region["id"] = rid
    if found > len(polygons):
        log.warning("the answer for %r has %d pieces; kept the %d largest as polygons", query, found, len(polygons))
    brushed = setup.brush_name and label in setup.brush_labels
    pred = regions.prediction(masks if brushed else np.asarray(masks)[:0], scores if brushed else [], setup, label,
                              model_version, query, split, ids=brush_ids, min_score=min_score, min_area=min_area,
                              meta=meta, message=message, model_name=model_name)
    said = [t for r in pred["result"] if r.get("id") == MESSAGE_ID for t in r["value"]["text"]]
    shown = [r for r in pred["result"] if r.get("id") != MESSAGE_ID] + polygons
    if said and polygons and not any(r["type"] == "brushlabels" for r in shown):
        said = []  # "found nothing" spoke of brushes only: the polygons are the answer
    if found > len(polygons):
        said.append(f"{model_name} found {found} separate pieces for '{query}'; showing the {MAX_POLYGONS} largest as "
                    f"polygons (at most {MAX_POLYGONS} per mask).")
    if message and setup.message_name:
        shown.append(message_region(setup, " ".join(said)))
    pred["result"] = shown
    return pred
