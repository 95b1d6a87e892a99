"""What a Label Studio request may carry, checked before anything is done with it.

Label Studio sends well-formed requests, but anyone who can reach the backend (or an SDK script, or a proxy that
mangles bodies) can send anything: a ``task.data`` that is a list, a ``context.result`` that is a number, JSON
nested 100,000 deep, a 10 MB project id. Each is refused here with :class:`Refusal`, a 4xx whose message says what
was wrong; the endpoints show it in the ``lisa`` TextArea when the call is interactive. Nothing past this module
needs to guess at types.

Ids become parts of Redis keys (project settings, task memory), so they are checked against the shapes Label
Studio uses: a project is ``N`` or ``N.<created-at timestamp>``, a task is a number.
"""

from __future__ import annotations

import re
from typing import Any

from flask import request

from backend.images import ImageFetchError
from backend.labeling import LabelingSetup

#: Label Studio's project ids in ML requests: ``"<id>.<created_at unix time>"`` (or a bare id).
PROJECT_ID = re.compile(r"(\d{1,19})(?:\.\d{1,19})?")
#: Longest task id accepted (Label Studio's are database integers).
MAX_ID_DIGITS = 19


class Refusal(Exception):
    """A request refused for what it carries; ``message`` is for the person reading it in Label Studio."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status, self.message = status, message


def _kind(value: object) -> str:
    """``value``'s JSON type for messages: "a list", "a string", "a number"..."""
    if isinstance(value, bool):
        return "a boolean"
    return {dict: "an object", list: "a list", str: "a string", int: "a number", float: "a number",
            type(None): "null"}.get(type(value), type(value).__name__)


def json_body(what: str) -> dict[str, Any]:
    """The request's JSON object body; ``what`` says what it must hold, for the 400 message."""
    try:
        body = request.get_json(silent=True)
    except RecursionError:  # Python's parser gives up on deep nesting with RecursionError, not a ValueError
        raise Refusal(400, "the request body is JSON nested too deeply to be a Label Studio request") from None
    if not isinstance(body, dict):
        raise Refusal(400, f"the {request.path} body must be a JSON object {what}")
    return body


def project_id(value: object) -> str:
    """The project's id (``"7.1700000000"`` -> ``"7"``); ``""`` when the request names none."""
    if value is None or value == "":
        return ""
    text = str(value) if isinstance(value, int) and not isinstance(value, bool) else value
    match = PROJECT_ID.fullmatch(text) if isinstance(text, str) else None
    if match is None:
        shown = repr(text[:40]) + ("..." if len(text) > 40 else "") if isinstance(text, str) else _kind(value)
        raise Refusal(422, f"the project id is {shown}, not a Label Studio project id (a number, or "
                           "'<number>.<timestamp>')")
    return match.group(1)


def task_id(task: dict[str, Any], n: int) -> int | None:
    """The id of the ``n``-th task (0-based), a number; ``None`` when absent."""
    value = task.get("id")
    if value is None:
        return None
    if isinstance(value, str) and value.isdigit() and len(value) <= MAX_ID_DIGITS:
        return int(value)
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < 10**MAX_ID_DIGITS:
        shown = repr(value[:40]) if isinstance(value, str) else _kind(value)
        raise Refusal(422, f"task {n + 1} of the request has the id {shown}, not a Label Studio task id (a number)")
    return value


def tasks_of(body: dict[str, Any]) -> list[dict[str, Any]]:
    """The request's tasks: a list of objects, each with an object ``data`` and a numeric ``id`` (checked)."""
    tasks = body.get("tasks")
    if not isinstance(tasks, list):
        raise Refusal(400, "the /predict body must be a JSON object with a 'tasks' list")
    for n, task in enumerate(tasks):
        if not isinstance(task, dict):
            raise Refusal(422, f"task {n + 1} of the request is {_kind(task)}, not a task object")
        if not isinstance(task.get("data", {}), dict):
            raise Refusal(422, f"the data of task {n + 1} is {_kind(task['data'])}, not an object of fields")
        task_id(task, n)
    return tasks


def context_of(body: dict[str, Any]) -> dict[str, Any] | None:
    """``params.context`` of an interactive call (with its ``result`` a list), or ``None`` for a batch call."""
    params = body.get("params")
    if params is None:
        return None
    if not isinstance(params, dict):
        raise Refusal(422, f"'params' is {_kind(params)}, not an object")
    context = params.get("context")
    if context is None:
        return None
    if not isinstance(context, dict):
        raise Refusal(422, f"'params.context' is {_kind(context)}, not an object (or null)")
    if not isinstance(context.get("result") or [], list):
        raise Refusal(422, f"'params.context.result' is {_kind(context['result'])}, not a list of regions")
    return context


def typed_query(context: dict[str, Any], setup: LabelingSetup) -> str | None:
    """The query typed in the labeling UI: the last textarea result (of the config's query TextArea)."""
    texts: list[str] = []
    for item in context.get("result") or []:
        if not isinstance(item, dict) or item.get("type") != "textarea":
            continue
        if setup.query_name and item.get("from_name") not in (setup.query_name, None):
            continue
        if setup.message_name and item.get("from_name") == setup.message_name:
            continue  # the backend's own message, never a query (a config without a query TextArea)
        value = item.get("value") or {}
        if not isinstance(value, dict):
            raise Refusal(422, f"the value of the query textarea is {_kind(value)}, not an object with 'text'")
        text = value.get("text") or []
        if isinstance(text, str):  # a single string, as some SDK scripts send it
            text = [text]
        if not isinstance(text, list) or not all(isinstance(t, str) for t in text):
            raise Refusal(422, f"the text of the query textarea is {_kind(text)}, not a list of strings")
        texts.extend(t for t in text if t.strip())
    return texts[-1] if texts else None


def image_value(task: dict[str, Any], setup: LabelingSetup) -> object:
    """The task's image value (the ``<Image>`` field of its data, checked by the fetcher); a missing one raises
    :class:`~backend.images.ImageFetchError`, so that a batch reports it for that task alone."""
    value = (task.get("data") or {}).get(setup.image_field)
    if not value:
        raise ImageFetchError(f"the task has no '{setup.image_field}' field (the <Image> value)", "bad_url")
    return value
