"""Label Studio's protocol endpoints: ``/setup``, ``/predict`` and ``/webhook``.

Follow a query: Label Studio posts ``/predict`` -> :func:`predict` reads the labeling config
(:mod:`backend.labeling`), finds the typed query in ``params.context`` (interactive) or the task data (batch),
checks it (:mod:`backend.query`; the worker phrases it for LISA, ``model/phrasing.py``), fetches the image
(:mod:`backend.images`), stores it in Redis once
and submits one job per task (:mod:`worker.client.queue`); a worker answers with masks, which become editable
``brushlabels`` regions (:mod:`backend.regions`).

Label Studio also calls ``/predict`` with ``context: null`` each time a task opens (twice) and after Submit;
task loading waits for those calls, so a request with no query to run answers at once and stores nothing.

A click or box of the smart tools arrives as an interactive call without a query: :func:`refine` turns it into a
refine job on the task's last query (:mod:`backend.refine`), answered by SAM's decoder alone. It reuses the image
bytes the task's memory names while Redis still has them, so a click downloads nothing.

Whatever goes wrong - a malformed request (:mod:`backend.inputs`), bad project settings (:mod:`backend.project`),
an image that cannot be fetched, a busy queue or fetcher, Redis down - answers an interactive call with
:func:`interactive_error` (the message in the config's ``lisa`` TextArea) and any other call with a JSON error.
Images are fetched under the request's deadline, concurrently and within the process's bounds
(:mod:`backend.fetching`); jobs go to the queue only while that deadline has not passed.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

import redis
from flask import Blueprint, Response, jsonify, request

from backend import capture
from backend import project as project_settings
from backend.config import ENV_PREFIX
from backend.errors import json_error
from backend.fetching import BUSY, fetch_each, fetch_one
from backend.images import FetchedImage, ImageFetchError
from backend.inputs import Refusal, context_of, image_value, json_body, project_id, task_id, tasks_of, typed_query
from backend.labeling import ConfigError, LabelingSetup, parse_labeling_config
from backend.project import ProjectSettings, SettingsError
from backend.query import QueryError, checked_query
from backend.refine import RefineError, TaskMemory, click_items, read_clicks, source_digest
from backend.regions import message_region, with_note
from backend.shapes import MASK_TYPES, prediction
from backend.state import BackendState, current_state
from worker.client.connection import RedisDown
from worker.client.protocol import REFINE, Job, QueueError
from worker.client.queue import BusyError, JobQueue

log = logging.getLogger(__name__)
bp = Blueprint("protocol", __name__)
Answer = Response | tuple[Response, int]


def current_version(queue: JobQueue) -> str | None:
    """The model version the workers serve (the most common one while a rollout is under way)."""
    versions = [str(w["model_version"]) for w in queue.live_workers()
                if w.get("model_version") and w.get("state") != "draining"]
    return max(set(versions), key=versions.count) if versions else None


@bp.post("/setup")
def setup() -> Answer:
    """Check the labeling config and the connection's Extra params, keep the params, report the model version."""
    state = current_state()
    try:
        body = json_body("with the labeling config in 'schema'")
        project = project_id(body.get("project"))
        labeling = parse_labeling_config(body.get("schema", ""))
        values = project_settings.check_extra_params(body.get("extra_params"), state.config, labeling)
    except Refusal as e:
        return json_error(e.status, e.message)
    except ConfigError as e:
        return json_error(422, f"lisa-ls cannot serve this labeling config: {e}")
    except SettingsError as e:  # Label Studio 1.23.2 shows only the status when connecting: the log says why
        log.warning("/setup refused for project %r: %s", project, e)
        return json_error(422, str(e))
    if project and "extra_params" in body:  # an emptied Extra params forgets the old ones
        project_settings.save(state.queue, project, values)  # RedisDown -> 503 (backend.errors)
    version = current_version(state.queue)
    if version is None:
        return json_error(503, "no LISA worker is running: start one with `lisa-ls worker --model ...` "
                               "(or `lisa-ls up`), then validate the connection again")
    return jsonify({"model_version": version})


@dataclass(frozen=True)
class Call:
    """One ``/predict`` call being answered: what every step of it reads."""

    state: BackendState
    setup: LabelingSetup
    settings: ProjectSettings
    project: str
    """The Label Studio project (its clicks' memory is kept under it); may be empty."""
    started: float
    """``time.time()`` when the request arrived; the deadline counts from it."""

    @property
    def deadline(self) -> float:
        return self.started + self.state.config.predict_deadline_s


@bp.post("/predict")
def predict() -> Answer:
    """Label Studio's predictions: a typed query (interactive), clicks (interactive), or task queries (batch)."""
    state = current_state()
    started = time.time()
    try:
        body = json_body("with a 'tasks' list")
        tasks, context, project = tasks_of(body), context_of(body), project_id(body.get("project"))
        setup = parse_labeling_config(body.get("label_config", ""), require_query=False)
    except Refusal as e:
        return json_error(e.status, e.message)
    except ConfigError as e:
        return json_error(422, f"lisa-ls cannot serve this labeling config: {e}")
    interactive = context is not None
    try:
        call = Call(state, setup, project_settings.load(state.queue, project, state.config), project, started)
        return _interactive(call, tasks, context) if context is not None else _batch(call, tasks)
    except Exception as e:
        return _failed(setup, interactive, e)


def _interactive(call: Call, tasks: list[dict], context: dict) -> Answer:
    """A typed query (segment the first task) or clicks (refine it); nothing to do: an empty answer."""
    if not tasks:
        return jsonify(_EMPTY)
    query = typed_query(context, call.setup)
    if query is None:  # clicks, or (after Submit) nothing
        return refine(call, tasks[0], context)
    return _segment(call, tasks, [(0, query)], interactive=True)


def _failed(setup: LabelingSetup, interactive: bool, e: Exception) -> Answer:
    """The answer to a call that raised ``e``: the user's problem, Redis's, or (500) ours."""
    if isinstance(e, Refusal):
        return refused(setup, interactive, e.status, e.message)
    if isinstance(e, SettingsError):
        return refused(setup, interactive, 422, str(e))
    if isinstance(e, RedisDown):
        return refused(setup, interactive, 503, str(e))
    if isinstance(e, QueueError):  # busy (backpressure) is a "try again later"; anything else is ours to fix
        return refused(setup, interactive, 503 if e.code == BUSY else 500, f"{e.code}: {e}")
    if isinstance(e, redis.RedisError):  # reachable but refusing: out of memory, wrong password, ...
        return refused(setup, interactive, 503, f"Redis answered with an error: {type(e).__name__}: {e}")
    if not interactive:
        raise e  # backend.errors logs it and answers 500
    log.exception("interactive /predict failed", exc_info=e)
    return refused(setup, True, 500, f"internal error in the lisa-ls backend: {type(e).__name__}: {e}")


_EMPTY = {"results": [{"result": [], "score": 0}]}
"""The answer to an interactive call with nothing to do."""


def refused(setup: LabelingSetup, interactive: bool, status: int, message: str) -> Answer:
    """A call that cannot be answered: :func:`interactive_error` when interactive, else a JSON error."""
    return interactive_error(setup, status, message) if interactive else json_error(status, message)


def interactive_error(setup: LabelingSetup, status: int, message: str) -> Answer:
    """An interactive call that cannot be answered. Label Studio does not show a backend's errors in the labeling
    UI, so with a message TextArea in the config the message goes there (HTTP 200, plus ``error``); else it is an
    HTTP error that Label Studio logs."""
    if setup.message_name:
        log.warning("interactive call refused: %s", message)
        return jsonify({"results": [{"result": [message_region(setup, message)], "score": 0, "error": message}]})
    return json_error(status, message)


def _batch(call: Call, tasks: list[dict]) -> Answer:
    """Each task's query (its data's query field, else the project's default query); none anywhere: at once."""
    settings, wanted = call.settings, []
    for i, task in enumerate(tasks):
        query = (task.get("data") or {}).get(settings.query_field) or settings.default_query
        if isinstance(query, str) and query.strip():
            wanted.append((i, query))
    if not wanted:
        return jsonify({"results": []})  # task loading waits for this call
    return _segment(call, tasks, wanted, interactive=False)


def _status(error_code: str) -> int:
    return {"timeout": 504, "bad_input": 422, BUSY: 503}.get(error_code, 503)


def _fetch_status(e: Exception) -> int:
    code = getattr(e, "code", "")
    return 503 if code == BUSY else 504 if code == "timeout" else 422


def _segment(call: Call, tasks: list[dict], wanted: list[tuple[int, str]], *, interactive: bool) -> Answer:
    """Text queries (``wanted``: task index, query): check them, fetch the images (concurrently, under the
    deadline), queue each task's job as soon as its image is stored, wait, and turn masks into regions in task
    order. An interactive call (one task) answers its problems in the message TextArea and remembers the answer
    for clicks, under the call's project."""
    state, setup, settings, project, started = call.state, call.setup, call.settings, call.project, call.started
    config, deadline = state.config, call.deadline
    problems: dict[int, Exception] = {}
    asked: list[tuple[int, str, str, object]] = []  # (task index, query, checked query, image value)
    for i, query in wanted:
        try:
            asked.append((i, query, checked_query(query), image_value(tasks[i], setup)))
        except (QueryError, ImageFetchError) as e:
            problems[i] = e
    jobs: dict[int, tuple[Job, FetchedImage, object]] = {}
    items = [(value, task_id(tasks[i], i)) for i, _, _, value in asked]
    for n, image in fetch_each(state.fetcher, state.fetch_gate, items, deadline, config.predict_deadline_s):
        i, query, checked, value = asked[n]
        if isinstance(image, ImageFetchError):
            problems[i] = image
            continue
        if time.time() >= deadline:  # never queue a job that is dead on arrival
            problems[i] = ImageFetchError(f"the request's {config.predict_deadline_s:g} s deadline "
                                          f"({ENV_PREFIX}PREDICT_DEADLINE_S) passed while its image was fetched; "
                                          "nothing was queued", "timeout")
            continue
        job = Job(image=state.queue.put_image(image.data), query=checked, phrasing=settings.phrasing,
                  deadline=deadline, options={"query": query, "task": task_id(tasks[i], i)})
        try:
            state.queue.submit(job)
        except BusyError as e:
            if interactive:
                raise  # -> "busy" in the message TextArea (predict)
            problems[i] = e
            continue
        jobs[i] = (job, image, value)
    if interactive and problems:
        [problem] = problems.values()
        return interactive_error(setup, _fetch_status(problem), str(problem))
    if not jobs and problems and all(getattr(e, "code", "") == BUSY for e in problems.values()):
        return json_error(503, str(next(iter(problems.values()))))  # nothing done: the whole call is "busy"
    results: list[dict[str, Any]] = [{"error": "no query for this task"} for _ in tasks]
    for i, e in problems.items():
        results[i] = {"error": str(e)}
        log.warning("task %s: %s", tasks[i].get("id"), e)
    for i, (job, image, value) in sorted(jobs.items()):
        result = state.queue.wait(job, timeout=max(0.0, deadline - time.time()))
        if not result.ok:
            message = f"{result.error_code}: {result.error_message}"
            if interactive:
                return interactive_error(setup, _status(result.error_code), message)
            results[i] = {"error": message}
            log.warning("task %s: %s", tasks[i].get("id"), message)
            continue
        query = job.options["query"]
        results[i] = _prediction(result, setup, settings, query, message=interactive)
        if interactive:  # what a click on this task refines next, and the image it need not fetch again
            ids = [r["id"] for r in results[i]["result"] if r["type"] in MASK_TYPES]
            TaskMemory(query=query, image=job.image, regions=ids, source=source_digest(value),
                       size=[image.width, image.height]).save(state.queue, project, task_id(tasks[i], i))
        log.info("task %s: %d region(s) for %r in %.2f s (%s)", tasks[i].get("id"), len(results[i]["result"]),
                 query, time.time() - started, result.model_version)
    return jsonify({"results": results})


def _prediction(result: Any, setup: LabelingSetup, settings: ProjectSettings, query: str, message: bool,
                **kw: Any) -> dict[str, Any]:
    """A worker's masks as a prediction, with the project's label, instance splitting and noise thresholds;
    ``message``: an interactive answer, which always carries the message TextArea (see :func:`prediction`).
    Each region's ``meta.question`` is the question the worker put to LISA for ``query``."""
    if result.question:
        kw["meta"] = {"question": result.question, **kw.get("meta", {})}
    label = setup.choose_label(query, settings.label)
    pred = prediction(result.mask_array(), result.scores, setup, label, result.model_version, query,
                      settings.split_instances, min_score=settings.min_score, min_area=settings.min_area,
                      tolerance=settings.polygon_tolerance, message=message, **kw)
    return with_note(pred, setup, result.note)  # e.g. the offline demo model saying what it is


def refine(call: Call, task: dict, context: dict) -> Answer:
    """A click or box on a task: the task's last query (if any) + all its clicks -> one refine job -> regions that
    keep the ids of the regions they refine (so accepting replaces them)."""
    state, setup, settings, project, started = call.state, call.setup, call.settings, call.project, call.started
    if not setup.click_names or not click_items(context, setup):  # e.g. the call after Submit, with an empty context
        return jsonify(_EMPTY)
    tid = task_id(task, 0)
    memory = TaskMemory.load(state.queue, project, tid)
    deadline = call.deadline
    try:
        value = image_value(task, setup)
        reused = memory.reusable_image(state.queue, value)
        if reused is not None:
            key, width, height = reused
        else:
            image = fetch_one(state.fetcher, state.fetch_gate, value, tid, deadline, state.config.predict_deadline_s)
            key, width, height = state.queue.put_image(image.data), image.width, image.height
        clicks = read_clicks(context, setup, width, height)
        if memory.image not in (None, key):
            memory = TaskMemory()  # the task's image changed: its query and clicks were about another picture
        merged = memory.merge(clicks)
        checked = checked_query(memory.query) if memory.query else ""
    except (ImageFetchError, RefineError, QueryError) as e:
        return interactive_error(setup, _fetch_status(e), str(e))
    memory.image, memory.points, memory.box = key, merged.points, merged.box
    memory.source, memory.size = source_digest(value), [width, height]
    if not merged.points and merged.box is None:  # every click was deleted
        memory.save(state.queue, project, tid)
        said = [message_region(setup, "")] if setup.message_name else []  # an answer: clear the last message
        return jsonify({"results": [{"result": said, "score": 0}]})
    points = list(merged.points.values())
    job = Job(image=key, kind=REFINE, query=checked, phrasing=settings.phrasing, deadline=deadline,
              options={"points": points, "box": merged.box, "query": memory.query, "task": tid})
    if job.expired():
        return interactive_error(setup, 504, f"the request's {state.config.predict_deadline_s:g} s deadline "
                                             f"({ENV_PREFIX}PREDICT_DEADLINE_S) passed before the click was queued")
    state.queue.submit(job)  # BusyError -> "busy" (predict)
    result = state.queue.wait(job, timeout=max(0.0, job.remaining()))
    if not result.ok:
        return interactive_error(setup, _status(result.error_code), f"{result.error_code}: {result.error_message}")
    query = memory.query or ""
    pred = _prediction(result, setup, settings, query, message=True, ids=memory.regions,
                       meta={"refined": {"points": points, "box": merged.box}})
    if not query and not any(r["type"] in MASK_TYPES for r in pred["result"]) and setup.message_name:
        pred["result"] = [message_region(setup, "LISA found nothing at these clicks")]
    memory.regions = [r["id"] for r in pred["result"] if r["type"] in MASK_TYPES] or memory.regions
    memory.save(state.queue, project, tid)
    log.info("task %s: refined %r with %d point(s)%s -> %d region(s) in %.2f s%s", tid, query, len(points),
             " and a box" if merged.box else "", len(pred["result"]), time.time() - started,
             " (image reused)" if reused else "")
    return jsonify({"results": [pred]})


def _loggable(value: object, known: tuple[str, ...] = ()) -> str:
    """An untrusted request value for a log line: as is when it is a known word or a plain id, else quoted and cut
    (``%r``), so that a value holding a newline cannot forge a log line."""
    if (isinstance(value, str) and value in known) or (isinstance(value, int) and not isinstance(value, bool)):
        return str(value)
    return repr(value)[:100]


@bp.post("/webhook")
def webhook() -> Answer:
    """Store a submitted, updated or deleted annotation for capture, then answer (Label Studio waits 1 s).

    The answer comes only once the event is in Redis (:func:`backend.capture.store_event`); the capture thread
    turns it into a dataset sample later. Other events (Label Studio sends every kind) are answered and dropped.
    """
    state = current_state()
    try:
        body = json_body("with an 'action'")
    except Refusal as e:
        return json_error(e.status, e.message)
    if not isinstance(body.get("action"), str):
        return json_error(400, "a webhook body must be a JSON object with an 'action'")
    action = body["action"]
    annotation = body.get("annotation") if isinstance(body.get("annotation"), dict) else {}
    task = body.get("task") if isinstance(body.get("task"), dict) else {}
    log.info("webhook %s annotation=%s task=%s", _loggable(action, capture.ACTIONS), _loggable(annotation.get("id")),
             _loggable(task.get("id") or annotation.get("task")))
    if action not in capture.ACTIONS:
        return jsonify({"status": "Unknown event"})
    if not state.config.capture:
        return jsonify({"status": "ok", "captured": False})
    entry = capture.store_event(state.status_queue.redis, state.config, request.get_data(),
                                state.status_queue.config.socket_timeout_s)
    return jsonify({"status": "ok", "event": entry})
