"""Label Studio's protocol endpoints: ``/setup``, ``/predict`` and ``/webhook``.

Follow a query: Label Studio posts ``/predict`` -> :func:`predict` reads the labeling config
(:mod:`backend.labeling`), finds the typed query in ``params.context`` (interactive) or the task data (batch),
phrases it for LISA (:mod:`backend.phrasing`), fetches the image (:mod:`backend.images`), stores it in Redis once
and submits one job per task (:mod:`worker.queue`); a worker answers with masks, which become editable
``brushlabels`` regions (:mod:`backend.regions`).

Label Studio also calls ``/predict`` with ``context: null`` each time a task opens (twice) and after Submit;
task loading waits for those calls, so a request with no query to run answers at once and stores nothing.

A click or box of the smart tools arrives as an interactive call without a query: :func:`refine` turns it into a
refine job on the task's last query (:mod:`backend.refine`), answered by SAM's decoder alone.
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any

from flask import Blueprint, Response, jsonify, request

from backend import capture
from backend.errors import json_error
from backend.images import ImageFetchError
from backend.labeling import ConfigError, LabelingSetup, parse_labeling_config
from backend.multiclass import QUERIES_KEY, check_queries
from backend.phrasing import Phrasing, QueryError
from backend.polygons import TOLERANCE_KEY, check_tolerance
from backend.refine import RefineError, TaskMemory, read_clicks
from backend.regions import message_region
from backend.shapes import MASK_TYPES, prediction
from backend.state import BackendState, current_state
from worker.protocol import REFINE, Job
from worker.queue import JobQueue

log = logging.getLogger(__name__)
bp = Blueprint("protocol", __name__)

#: Per-project settings a connection can carry in ``extra_params`` (JSON in Label Studio's model settings).
PROJECT_KEYS = ("default_query", "query_field", "label", "split_instances", "min_score", "min_area",
                "phrase_template", "sentence_template", QUERIES_KEY, TOLERANCE_KEY)
PROJECT_TTL_S = 30 * 24 * 3600


def _project_id(value: Any) -> str:
    """Label Studio sends ``"<id>.<created_at>"``; the id is what identifies the project."""
    return str(value or "").split(".")[0]


def _project_key(queue: JobQueue, project: str) -> str:
    return queue.key("project", project)


def current_version(queue: JobQueue) -> str | None:
    """The model version the workers serve (the most common one while a rollout is under way)."""
    versions = [str(w["model_version"]) for w in queue.live_workers()
                if w.get("model_version") and w.get("state") != "draining"]
    return max(set(versions), key=versions.count) if versions else None


@bp.post("/setup")
def setup() -> Response | tuple[Response, int]:
    state = current_state()
    body = request.get_json(silent=True)
    if not isinstance(body, dict):
        return json_error(400, "the /setup body must be a JSON object with the labeling config in 'schema'")
    try:
        labeling = parse_labeling_config(body.get("schema", ""))
    except ConfigError as e:
        return json_error(422, f"lisa-ls cannot serve this labeling config: {e}")
    extra = body.get("extra_params")
    if isinstance(extra, str) and extra.strip():
        try:
            extra = json.loads(extra)
        except json.JSONDecodeError:
            return json_error(422, "extra_params is not valid JSON")
    try:  # curation keys (backend.multiclass, backend.polygons): a wrong label shows on the model card at once
        if isinstance(extra, dict) and QUERIES_KEY in extra:
            check_queries(extra[QUERIES_KEY], labeling)
        if isinstance(extra, dict) and TOLERANCE_KEY in extra:
            check_tolerance(extra[TOLERANCE_KEY])
    except ValueError as e:  # Label Studio 1.23.2 shows only the status when connecting: the log says why
        log.warning("/setup refused for project %s: %s", _project_id(body.get("project")), e)
        return json_error(422, f"lisa-ls cannot use these Extra params: {e}")
    if isinstance(extra, dict) and _project_id(body.get("project")):
        settings = {k: extra[k] for k in PROJECT_KEYS if k in extra}
        state.queue.redis.set(_project_key(state.queue, _project_id(body.get("project"))), json.dumps(settings),
                              ex=PROJECT_TTL_S)
    version = current_version(state.queue)
    if version is None:
        return json_error(503, "no LISA worker is running: start one with `lisa-ls worker --model ...` "
                               "(or `lisa-ls up`), then validate the connection again")
    return jsonify({"model_version": version})


def _project_settings(state: BackendState, project: str) -> dict[str, Any]:
    raw = state.queue.redis.get(_project_key(state.queue, project)) if project else None
    return json.loads(raw) if raw else {}


def _typed_query(context: dict, setup: LabelingSetup) -> str | None:
    """The query typed in the labeling UI: the last textarea result (of the config's query TextArea)."""
    texts = []
    for item in context.get("result") or []:
        if not isinstance(item, dict) or item.get("type") != "textarea":
            continue
        if setup.query_name and item.get("from_name") not in (setup.query_name, None):
            continue
        value = (item.get("value") or {}).get("text") or []
        texts.extend(t for t in (value if isinstance(value, list) else [value]) if isinstance(t, str) and t.strip())
    return texts[-1] if texts else None


@bp.post("/predict")
def predict() -> Response | tuple[Response, int]:
    state, config = current_state(), current_state().config
    started = time.time()
    body = request.get_json(silent=True)
    if not isinstance(body, dict) or not isinstance(body.get("tasks"), list):
        return json_error(400, "the /predict body must be a JSON object with a 'tasks' list")
    tasks = [t for t in body["tasks"] if isinstance(t, dict)]
    context = (body.get("params") or {}).get("context") if isinstance(body.get("params"), dict) else None
    interactive = isinstance(context, dict)
    empty = {"results": [{"result": [], "score": 0}]} if interactive else {"results": []}
    try:
        setup = parse_labeling_config(body.get("label_config", ""), require_query=False)
    except ConfigError as e:
        return json_error(422, f"lisa-ls cannot serve this labeling config: {e}")
    project = _project_settings(state, _project_id(body.get("project")))
    try:
        phrasing = Phrasing(project.get("phrase_template", config.phrase_template),
                            project.get("sentence_template", config.sentence_template))
    except ValueError as e:
        return json_error(422, str(e))
    # 1. Which task gets which query. No query anywhere: answer at once (task loading waits for this call).
    wanted: list[tuple[int, dict, str]] = []
    project_id = _project_id(body.get("project"))
    if interactive:
        query = _typed_query(context, setup)
        if query is None and tasks and setup.click_names:
            return refine(state, setup, project_id, project, phrasing, tasks[0], context, started)
        if query is not None and tasks:
            wanted.append((0, tasks[0], query))
    else:
        field = project.get("query_field", config.query_field)
        for i, task in enumerate(tasks):
            data = task.get("data") if isinstance(task.get("data"), dict) else {}
            query = data.get(field) or project.get("default_query")
            if isinstance(query, str) and query.strip():
                wanted.append((i, task, query))
    if not wanted:
        return jsonify(empty)
    # 2. Jobs: phrase, fetch and store each image once, submit all at once.
    jobs: dict[int, Job] = {}
    problems: dict[int, str] = {}
    deadline = started + config.predict_deadline_s
    for i, task, query in wanted:
        try:
            question = phrasing.question(query)
            value = (task.get("data") or {}).get(setup.image_field)
            if not value:
                raise ImageFetchError(f"the task has no '{setup.image_field}' field (the <Image> value)", "bad_url")
            image = state.fetcher.fetch(value, task_id=task.get("id"))
        except (QueryError, ImageFetchError) as e:
            problems[i] = str(e)
            continue
        key = state.queue.put_image(image.data)
        jobs[i] = Job(image=key, query=question, deadline=deadline, options={"query": query, "task": task.get("id")})
    if interactive and problems:
        return interactive_error(setup, 422, problems[0])
    if jobs:
        state.queue.submit_many(list(jobs.values()))  # BusyError -> 503 "busy" (backend.errors)
    # 3. Wait and turn masks into regions, in task order.
    results: list[dict[str, Any]] = [{"error": "no query for this task"} for _ in tasks]
    for i, message in problems.items():
        results[i] = {"error": message}
        log.warning("task %s: %s", tasks[i].get("id"), message)
    for i, job in jobs.items():
        result = state.queue.wait(job, timeout=max(0.0, deadline - time.time()))
        if not result.ok:
            if interactive:
                return interactive_error(setup, _status(result.error_code), f"{result.error_code}: "
                                                                            f"{result.error_message}")
            results[i] = {"error": f"{result.error_code}: {result.error_message}"}
            log.warning("task %s: %s: %s", tasks[i].get("id"), result.error_code, result.error_message)
            continue
        query = job.options["query"]
        results[i] = _prediction(result, setup, project, config, query, say_nothing=interactive)
        if interactive:  # what a click on this task refines next
            ids = [r["id"] for r in results[i]["result"] if r["type"] in MASK_TYPES]
            TaskMemory(query=query, image=job.image, regions=ids).save(state.queue, project_id, tasks[i].get("id"))
        log.info("task %s: %d region(s) for %r in %.2f s (%s)", tasks[i].get("id"), len(results[i]["result"]),
                 query, time.time() - started, result.model_version)
    return jsonify({"results": results})


def _status(error_code: str) -> int:
    return 504 if error_code == "timeout" else 422 if error_code == "bad_input" else 503


def _prediction(result: Any, setup: LabelingSetup, project: dict[str, Any], config: Any, query: str,
                say_nothing: bool, **kw: Any) -> dict[str, Any]:
    """A worker's masks as a prediction, with the project's label, instance splitting and noise thresholds."""
    label = setup.choose_label(query, project.get("label") or config.default_label)
    return prediction(
        result.mask_array(), result.scores, setup, label, result.model_version, query,
        bool(project.get("split_instances", config.split_instances)),
        min_score=float(project.get("min_score", config.min_score)),
        min_area=int(project.get("min_area", config.min_area)), say_nothing=say_nothing,
        tolerance=float(project.get(TOLERANCE_KEY, config.polygon_tolerance)), **kw)


def interactive_error(setup: LabelingSetup, status: int, message: str) -> Response | tuple[Response, int]:
    """An interactive call that cannot be answered. Label Studio does not show a backend's errors in the labeling
    UI, so with a message TextArea in the config the message goes there (HTTP 200, plus ``error``); else it is an
    HTTP error that Label Studio logs."""
    if setup.message_name:
        log.warning("interactive call refused: %s", message)
        return jsonify({"results": [{"result": [message_region(setup, message)], "score": 0, "error": message}]})
    return json_error(status, message)


def refine(state: BackendState, setup: LabelingSetup, project_id: str, project: dict[str, Any], phrasing: Phrasing,
           task: dict, context: dict, started: float) -> Response | tuple[Response, int]:
    """A click or box on a task: the task's last query (if any) + all its clicks -> one refine job -> regions that
    keep the ids of the regions they refine (so accepting replaces them)."""
    memory = TaskMemory.load(state.queue, project_id, task.get("id"))
    try:
        value = (task.get("data") or {}).get(setup.image_field)
        if not value:
            raise ImageFetchError(f"the task has no '{setup.image_field}' field (the <Image> value)", "bad_url")
        image = state.fetcher.fetch(value, task_id=task.get("id"))
        clicks = read_clicks(context, setup, image.width, image.height)
        if clicks is None:  # e.g. the call after Submit, with an empty context
            return jsonify({"results": [{"result": [], "score": 0}]})
        key = state.queue.put_image(image.data)
        if memory.image not in (None, key):
            memory = TaskMemory()  # the task's image changed: its query and clicks were about another picture
        merged = memory.merge(clicks)
        question = phrasing.question(memory.query) if memory.query else ""
    except (ImageFetchError, RefineError, QueryError) as e:
        return interactive_error(setup, 422, str(e))
    memory.image, memory.points, memory.box = key, merged.points, merged.box
    if not merged.points and merged.box is None:  # every click was deleted
        memory.save(state.queue, project_id, task.get("id"))
        return jsonify({"results": [{"result": [], "score": 0}]})
    points = list(merged.points.values())
    job = Job(image=key, kind=REFINE, query=question, deadline=started + state.config.predict_deadline_s,
              options={"points": points, "box": merged.box, "query": memory.query, "task": task.get("id")})
    state.queue.submit(job)  # BusyError -> 503 "busy" (backend.errors)
    result = state.queue.wait(job, timeout=max(0.0, job.remaining()))
    if not result.ok:
        return interactive_error(setup, _status(result.error_code), f"{result.error_code}: {result.error_message}")
    query = memory.query or ""
    pred = _prediction(result, setup, project, state.config, query, say_nothing=True, ids=memory.regions,
                       meta={"refined": {"points": points, "box": merged.box}})
    if not query and not any(r["type"] in MASK_TYPES for r in pred["result"]) and setup.message_name:
        pred["result"] = [message_region(setup, "LISA found nothing at these clicks")]
    memory.regions = [r["id"] for r in pred["result"] if r["type"] in MASK_TYPES] or memory.regions
    memory.save(state.queue, project_id, task.get("id"))
    log.info("task %s: refined %r with %d point(s)%s -> %d region(s) in %.2f s", task.get("id"), query, len(points),
             " and a box" if merged.box else "", len(pred["result"]), time.time() - started)
    return jsonify({"results": [pred]})


@bp.post("/webhook")
def webhook() -> Response | tuple[Response, int]:
    """Store a submitted, updated or deleted annotation for capture, then answer (Label Studio waits 1 s).

    The answer comes only once the event is in Redis (:func:`backend.capture.store_event`); the capture thread
    turns it into a dataset sample later. Other events (Label Studio sends every kind) are answered and dropped.
    """
    state = current_state()
    body = request.get_json(silent=True)
    if not isinstance(body, dict) or not isinstance(body.get("action"), str):
        return json_error(400, "a webhook body must be a JSON object with an 'action'")
    action = body["action"]
    annotation = body.get("annotation") if isinstance(body.get("annotation"), dict) else {}
    task = body.get("task") if isinstance(body.get("task"), dict) else {}
    log.info("webhook %s annotation=%s task=%s", action, annotation.get("id"), task.get("id") or annotation.get("task"))
    if action not in capture.ACTIONS:
        return jsonify({"status": "Unknown event"})
    if not state.config.capture:
        return jsonify({"status": "ok", "captured": False})
    entry = capture.store_event(state.status_queue.redis, state.config, request.get_data(),
                                state.status_queue.config.socket_timeout_s)
    return jsonify({"status": "ok", "event": entry})
