"""What differs between the model families a project may use (``"model"`` in its Extra params), for the backend.

Everything else - fetching, the queue, regions, refinement, capture - is shared. Per family:

- **Routing.** A project's jobs go to its family's stream (:meth:`JobQueue.for_family
  <worker.client.queue_client.QueueClient.for_family>`), read by that family's workers only.
- **No worker.** A job of a family no live worker serves would wait out its whole deadline; for every family but
  the default one the backend looks at the worker registry first and answers "no SAM 3 worker is running" at
  once. LISA keeps its behaviour: a job queued before the first LISA worker starts waits for it (``lisa-ls up``
  starts the backend before the model has loaded, and the queue's own tests rely on queueing with no worker).
- **Scores.** SAM 3's instance scores are calibrated (query logit x presence, the number its threshold is on), so
  its regions show them as the region's ``score``; LISA's SAM IoU guess is not, and stays in ``meta`` only
  (:mod:`backend.regions`).
- **Prompts.** SAM 3 takes the noun phrase as typed (no phrasing templates) and is limited in length
  (:func:`backend.query.checked_query`).
"""

from __future__ import annotations

from typing import Any

from backend.config import BackendConfig
from backend.inputs import Refusal
from backend.project import MODEL_KEY, THRESHOLD_KEY, ProjectSettings, SettingsError, check_extra_params
from backend.shapes import MASK_TYPES
from worker.client.defaults import CONCEPT_FAMILIES, DEFAULT_FAMILY, FAMILY_NAMES
from worker.client.queue import JobQueue

#: Families whose result scores are calibrated probabilities, shown as each region's ``score``.
SCORED_FAMILIES = CONCEPT_FAMILIES


def no_worker_message(family: str, then: str = "try again") -> str:
    """What an annotator reads when no live worker serves ``family``."""
    name = FAMILY_NAMES[family]
    return (f"no {name} worker is running: start one with `lisa-ls worker --model <{name} checkpoint>` "
            f"(or `lisa-ls up --model ...`), then {then}")


def family_queue(queue: JobQueue, settings: ProjectSettings) -> JobQueue:
    """The project's family's queue (its own streams, the same Redis client and keys of images and results)."""
    return queue.for_family(settings.family)


def require_worker(queue: JobQueue, settings: ProjectSettings) -> None:
    """Refuse at once (503) a job no live worker of the project's family would take (see the module docstring);
    the default family is never refused here."""
    if settings.family == DEFAULT_FAMILY:
        return
    serving = [w for w in queue.live_workers(settings.family) if w.get("state") != "draining"]
    if not serving:
        raise Refusal(503, no_worker_message(settings.family))


def with_scores(pred: dict[str, Any], family: str) -> dict[str, Any]:
    """``pred`` with each mask region's ``score`` set from its model score, for a family of calibrated scores."""
    if family in SCORED_FAMILIES:
        for region in pred["result"]:
            if region.get("type") in MASK_TYPES and "sam_score" in region.get("meta", {}):
                region["score"] = region["meta"]["sam_score"]
    return pred


def refined_ids(settings: ProjectSettings, regions: list[str]) -> list[str]:
    """The region ids a click's answer takes over (so that accepting it replaces them). LISA's answer is one
    object, refined as a whole; a SAM 3 concept answer is many instances and a click segments one object, so the
    clicked mask replaces a region only when the task's last answer had a single one (e.g. an earlier click)."""
    if settings.family in SCORED_FAMILIES and len(regions) > 1:
        return []
    return regions


def region_meta(settings: ProjectSettings) -> dict[str, Any]:
    """What every region a project's model proposes records of it (the family, read back by capture)."""
    return {"family": settings.family}


def connection_settings(params: list[dict[str, Any]], config: BackendConfig) -> tuple[str, dict[str, Any]]:
    """The family and job options (a score threshold) that the project's model connections' Extra params
    (``LabelStudioClient.connection_params``) set, for ``lisa-ls prelabel``: the first connection naming a family,
    read by ``/setup``'s own rules; a connection they refuse counts as the default family (its card says why)."""
    for extra in params:
        if extra.get(MODEL_KEY):
            try:
                values = check_extra_params({k: extra[k] for k in (MODEL_KEY, THRESHOLD_KEY) if k in extra},
                                            config)
            except SettingsError:
                continue
            threshold = values.get(THRESHOLD_KEY)
            return values[MODEL_KEY], ({"threshold": threshold} if threshold is not None else {})
    return DEFAULT_FAMILY, {}


def label_prompts(family: str, labels: list[str]) -> dict[str, str] | None:
    """Without any query, a concept-prompted family's labels are their own prompts (as CVAT does with SAM 3):
    ``{label: label}``; ``None`` for LISA, which needs a question."""
    return {label: label for label in labels} if family in SCORED_FAMILIES else None
