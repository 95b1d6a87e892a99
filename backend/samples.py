"""One Label Studio annotation -> one dataset sample: the code capture (``/webhook``) and export share.

Both paths hand :func:`build_sample` the same three things - the annotation (``id``, ``result``, ``completed_by``,
timestamps), its task (``id``, ``data``) and the project's labeling config - so the same annotation gives the
same sample whichever way it arrived. An annotation that cannot be a sample raises :class:`SkipSample` with a
short code and a reason for the report; an image host that is down raises :class:`RetryLater` (capture retries
the event, export reports it).

What is read from ``result`` (see ``shared/ref/ui-check.md`` §5 for a real one):

* the query: the ``textarea`` results of the config's query TextArea (every text, in order, without repeats);
  never those of its read-only message TextArea (``lisa``: the backend's own words, saved with the annotation);
* the masks: the ``brushlabels`` results of the config's BrushLabels, decoded at the image's EXIF-applied size
  with the anti-aliasing threshold 128 (:func:`backend.brush.rle_to_mask`), and the ``polygonlabels`` results of
  its PolygonLabels, rasterised at that size as Label Studio draws them (:mod:`backend.polygons`), merged per
  label; labels containing "ignore" form the ignore mask instead. A polygon that cannot be a mask (fewer than 3
  points, crossing itself, outside the image) skips the annotation with code ``bad_polygon`` and a reason that
  names the region, and keeps the sample of its previous version, if any;
* per mask, the origin (all regions ``prediction``: ``prediction``; all ``manual``: ``manual``; any mix or edit:
  ``prediction-changed``) and the proposing model version (``meta.model_version`` of a region, else the
  annotation's ``prediction.model_version``; none for a hand-drawn mask) and model family (``meta.family`` of a
  region: ``lisa`` or ``sam3``; a proposed region that records none is LISA's, the one family before SAM 3).

Refinement clicks are metadata, never training input: the sample is still (image, query, final mask), so that
fine-tuning learns from the text. The clicks a suggestion was refined with (``meta.refined`` of its region) and any
key points or boxes left in the annotation go to the record's ``refinements``. When the query TextArea is empty
but a region says which query it answered (``meta.prompt``), that query is used.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from backend.brush import BrushRLEError, rle_to_mask
from backend.dataset import EXTENSIONS, ORIGINS, SampleDraft, sample_id
from backend.images import FetchedImage, ImageFetchError
from backend.labeling import ConfigError, LabelingSetup, parse_labeling_config
from backend.polygons import PolygonError, rasterize, region_points
from backend.regions import MESSAGE_ID
from worker.client.defaults import DEFAULT_FAMILY, FAMILY_NAMES

Fetch = Callable[[str, "int | None"], FetchedImage]
"""``fetch(image value, task id)``: :meth:`backend.images.ImageFetcher.fetch`."""

#: Image fetch failures worth trying again later (Label Studio or the storage down, a key being fixed).
TRANSIENT_FETCH = frozenset({"unreachable", "timeout", "http", "auth", "config"})


class SkipSample(Exception):
    """The annotation cannot become a sample. ``code`` groups reasons in reports; ``reason`` is for people."""

    def __init__(self, code: str, reason: str, keep_sample: bool = False) -> None:
        super().__init__(f"{code}: {reason}")
        self.code, self.reason = code, reason
        self.keep_sample = keep_sample  # the annotation's previous sample stays (a mistake to fix, not a removal)


class RetryLater(Exception):
    """A passing failure (the image host is unreachable): the same annotation may work later."""


#: The largest id Label Studio can hand out (its ids are 64-bit database keys).
MAX_ID = 2**63 - 1


def ls_id(value: object) -> int | None:
    """A Label Studio id: an int, ASCII digits in a string, or the ``id`` of an object; else None (also for a
    negative or out-of-range number, and for digits like ``"²"`` that ``str.isdigit`` accepts but ``int`` does not).
    Ids become file names (:func:`backend.dataset.sample_id`), so nothing else gets through."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value if 0 <= value <= MAX_ID else None
    if isinstance(value, str):
        text = value.strip()
        if text.isascii() and text.isdigit() and len(text) <= len(str(MAX_ID)):
            return ls_id(int(text))
        return None
    if isinstance(value, dict):
        return ls_id(value.get("id"))
    return None


def annotation_identity(annotation: object, task: object = None, project: object = None) -> tuple[int, int, int]:
    """``(project id, task id, annotation id)`` of an annotation; raises :class:`SkipSample` when one is missing.

    The ids come from the annotation first and from the enclosing task / project objects second (the webhook's
    ``annotation.task`` is an int and the task a sibling; export's tasks hold their annotations).
    """
    if not isinstance(annotation, dict):
        raise SkipSample("missing_field", "the event has no annotation object")
    aid = ls_id(annotation.get("id"))
    tid = ls_id(annotation.get("task")) or ls_id(task)
    task_project = task.get("project") if isinstance(task, dict) else None
    pid = ls_id(project) or ls_id(annotation.get("project")) or ls_id(task_project)
    for name, value in (("annotation.id", aid), ("task id", tid), ("project id", pid)):
        if value is None:
            raise SkipSample("missing_field", f"the annotation has no {name} (a Label Studio id is a whole number)")
    return pid, tid, aid  # type: ignore[return-value]


def _setup(label_config: object) -> LabelingSetup | None:
    if not isinstance(label_config, str) or not label_config.strip():
        return None  # older payloads: fall back to the result types alone
    try:
        return parse_labeling_config(label_config, require_query=False)
    except ConfigError as e:
        raise SkipSample("bad_config", f"the project's labeling config cannot be read: {e}") from e


def _queries(results: list[Any], setup: LabelingSetup | None) -> list[str]:
    texts: list[str] = []
    for item in results:
        if not isinstance(item, dict) or item.get("type") != "textarea":
            continue
        if setup and setup.message_name and item.get("from_name") == setup.message_name:
            continue  # what the backend said, not what the annotator typed
        if item.get("id") == MESSAGE_ID:  # the same, when the payload has no labeling config to name the TextArea
            continue
        if setup and setup.query_name and item.get("from_name") not in (setup.query_name, None):
            continue
        value = (item.get("value") or {}).get("text") if isinstance(item.get("value"), dict) else None
        for text in value if isinstance(value, list) else [value]:
            if isinstance(text, str) and text.split():
                texts.append(" ".join(text.split()))
    return list(dict.fromkeys(texts))


def _regions(results: list[Any], setup: LabelingSetup | None) -> list[dict[str, Any]]:
    regions = []
    for item in results:
        if not isinstance(item, dict) or item.get("type") not in ("brushlabels", "polygonlabels"):
            continue
        if setup and item.get("from_name") not in (
                setup.brush_name if item["type"] == "brushlabels" else setup.polygon_name, None):
            continue
        regions.append(item)
    return regions


def _refinements(results: list[Any], regions: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The clicks behind the masks (metadata): each refined region's ``meta.refined`` (points in pixels) and the
    key points / boxes still in the annotation (``value`` in percent, as Label Studio keeps them)."""
    out: list[dict[str, Any]] = []
    for region in regions:
        refined = region.get("meta", {}).get("refined") if isinstance(region.get("meta"), dict) else None
        if isinstance(refined, dict):
            out.append({"region": region.get("id"), "points": refined.get("points") or [], "box": refined.get("box")})
    for item in results:
        if isinstance(item, dict) and item.get("type") in ("keypointlabels", "rectanglelabels"):
            out.append({"type": item["type"], "value": item.get("value"), "is_positive": item.get("is_positive")})
    return out


def _image_value(task: dict[str, Any], setup: LabelingSetup | None) -> str:
    data = task.get("data") if isinstance(task.get("data"), dict) else {}
    field = setup.image_field if setup else "image"
    value = data.get(field)
    if not isinstance(value, str) or not value.strip():
        raise SkipSample("missing_field", f"the task has no image in its '{field}' field")
    return value


def _fetch(fetch: Fetch, value: str, task_id: int) -> FetchedImage:
    try:
        return fetch(value, task_id)
    except ImageFetchError as e:
        if e.code in TRANSIENT_FETCH:
            raise RetryLater(str(e)) from e
        code = "image_gone" if e.code == "not_found" else "image_error"
        raise SkipSample(code, str(e)) from e


def _decode(region: dict[str, Any], image: FetchedImage) -> np.ndarray:
    value = region.get("value") if isinstance(region.get("value"), dict) else {}
    if region.get("type") == "polygonlabels":  # points in percent: drawn at the image's size as it is shown
        try:
            return rasterize([region_points(region, image.width, image.height)], image.width, image.height)
        except PolygonError as e:
            label = ", ".join(str(v) for v in value.get("polygonlabels") or []) or "no label"
            raise SkipSample("bad_polygon", f"the polygon region {str(region.get('id'))[:40]!r} ({label[:80]}) {e}",
                             keep_sample=True) from e
    if value.get("format", "rle") != "rle" or "rle" not in value:
        raise SkipSample("bad_rle", f"a brush region has no RLE (format {value.get('format')!r})")
    size = (region.get("original_width"), region.get("original_height"))
    if all(isinstance(v, int) for v in size) and size != (image.width, image.height):
        raise SkipSample("size_mismatch", f"a brush region was drawn on a {size[0]}x{size[1]} image, but the "
                                          f"task's image is {image.width}x{image.height}")
    try:
        return rle_to_mask(value["rle"], image.height, image.width)
    except BrushRLEError as e:
        code = "size_mismatch" if "image of another size" in str(e) else "bad_rle"
        raise SkipSample(code, str(e)) from e


def _labels(region: dict[str, Any]) -> list[str]:
    value = region.get("value") if isinstance(region.get("value"), dict) else {}
    kind = "polygonlabels" if region.get("type") == "polygonlabels" else "brushlabels"
    labels = [lab for lab in value.get(kind) or [] if isinstance(lab, str) and lab]
    if not labels:
        raise SkipSample("bad_region", f"a {'polygon' if kind == 'polygonlabels' else 'brush'} region has no label")
    return labels


def _origin(origins: list[str]) -> str:
    """The origin of a merged mask from those of its regions (an unknown origin counts as manual)."""
    kinds = {o if o in ORIGINS else "manual" for o in origins}
    if kinds == {"prediction"}:
        return "prediction"
    return "manual" if kinds == {"manual"} else "prediction-changed"


def _version(region: dict[str, Any], annotation: dict[str, Any]) -> str | None:
    if region.get("origin") not in ("prediction", "prediction-changed"):
        return None
    meta = region.get("meta") if isinstance(region.get("meta"), dict) else {}
    prediction = annotation.get("prediction") if isinstance(annotation.get("prediction"), dict) else {}
    for value in (meta.get("model_version"), region.get("model_version"), prediction.get("model_version")):
        if isinstance(value, str) and value:
            return value
    return None


def _family(region: dict[str, Any]) -> str | None:
    """The model family that proposed a region (None for a hand-drawn one)."""
    if region.get("origin") not in ("prediction", "prediction-changed"):
        return None
    meta = region.get("meta") if isinstance(region.get("meta"), dict) else {}
    family = meta.get("family")
    return family if isinstance(family, str) and family in FAMILY_NAMES else DEFAULT_FAMILY


def build_sample(annotation: object, task: object, label_config: object, fetch: Fetch,
                 project: object = None) -> SampleDraft:
    """The sample of one annotation (image fetched, masks decoded), or :class:`SkipSample` / :class:`RetryLater`.

    Args:
        annotation: the annotation as Label Studio serialises it (webhook or ``/api/tasks?fields=all``).
        task: its task (``id``, ``data``); ``annotation["task"]`` is used when it is the task object itself.
        label_config: the project's labeling config XML (``None``: go by result types only).
        fetch: fetches the task image (:meth:`backend.images.ImageFetcher.fetch`).
        project: the project object or id, when the annotation does not name it.
    """
    if isinstance(annotation, dict) and isinstance(annotation.get("task"), dict):
        task = annotation["task"]
    pid, tid, aid = annotation_identity(annotation, task, project)
    assert isinstance(annotation, dict)  # annotation_identity refuses anything else
    if not isinstance(task, dict) or not isinstance(task.get("data"), dict):
        raise SkipSample("missing_field", "the event carries no task data (older Label Studio versions send only "
                                          "the task id); run `lisa-ls export` to resync this project")
    if annotation.get("was_cancelled"):
        raise SkipSample("cancelled", "the annotator skipped the task")
    setup = _setup(label_config)
    results = annotation.get("result") if isinstance(annotation.get("result"), list) else []
    queries = _queries(results, setup)
    regions = _regions(results, setup)
    if not queries:  # e.g. the query text was deleted after its answer was refined and accepted
        prompts = [r["meta"].get("prompt") for r in regions if isinstance(r.get("meta"), dict)]
        queries = list(dict.fromkeys(" ".join(p.split()) for p in prompts if isinstance(p, str) and p.split()))
    if not queries:
        raise SkipSample("no_query", "the annotation has no query text (the TextArea is empty)")
    if not regions:
        raise SkipSample("no_mask", "the annotation has a query but no brush or polygon region")
    region_labels = [_labels(r) for r in regions]  # checked before the (slow) image fetch
    image = _fetch(fetch, _image_value(task, setup), tid)
    order = list(setup.labels) if setup else []
    merged: dict[str, np.ndarray] = {}
    origins: dict[str, list[str]] = {}
    versions: dict[str, list[str]] = {}
    families: dict[str, list[str]] = {}
    for region, labels in zip(regions, region_labels):
        mask = _decode(region, image)
        version, family = _version(region, annotation), _family(region)
        for label in labels:
            if family:
                families.setdefault(label, []).append(family)
            merged[label] = merged[label] | mask if label in merged else mask
            origins.setdefault(label, []).append(str(region.get("origin") or "manual"))
            if version:
                versions.setdefault(label, []).append(version)
    ignore_labels = [lab for lab in merged if "ignore" in lab.lower()]
    targets = sorted((lab for lab in merged if lab not in ignore_labels),
                     key=lambda lab: (order.index(lab) if lab in order else len(order), list(merged).index(lab)))
    if not targets:
        raise SkipSample("no_mask", "the annotation has only ignore regions, no target mask")
    ignore = None
    for lab in ignore_labels:
        ignore = merged[lab] if ignore is None else ignore | merged[lab]
    completed_by = ls_id(annotation.get("completed_by"))
    record = {
        "width": image.width, "height": image.height, "queries": queries, "labels": targets,
        "origins": [_origin(origins[lab]) for lab in targets],
        "model_versions": [versions[lab][0] if lab in versions else None for lab in targets],
        "model_families": [families[lab][0] if lab in families else None for lab in targets],
        "refinements": _refinements(results, regions),
        "annotator": completed_by, "created_at": annotation.get("created_at"),
        "updated_at": annotation.get("updated_at") or annotation.get("created_at"),
        "task_id": tid, "annotation_id": aid, "project_id": pid,
    }
    return SampleDraft(id=sample_id(pid, aid), image=image.data, image_sha256=image.sha256,
                       image_ext=EXTENSIONS.get(image.format, "img"), masks=[merged[lab] for lab in targets],
                       ignore=ignore, record=record)
