"""JSON errors: every error the backend returns is JSON with a readable message, never an HTML page.

Label Studio shows the body of a failed call on the model card or in the labeling UI, so ``message`` is written
for the person reading it there. The shape is ``{"status": <HTTP code>, "error": <reason phrase>, "message":
<what happened and what to do>}``.
"""

from __future__ import annotations

import logging
from http import HTTPStatus

from flask import Flask, Response, jsonify
from werkzeug.exceptions import HTTPException

from worker.client.connection import RedisDown
from worker.client.protocol import BUSY, QueueError

log = logging.getLogger(__name__)


def json_error(status: int, message: str, headers: dict[str, str] | None = None) -> tuple[Response, int]:
    """A JSON error response: ``return json_error(400, "the task has no image")`` from any view."""
    body = {"status": status, "error": HTTPStatus(status).phrase, "message": message}
    response = jsonify(body)
    if headers:
        response.headers.update(headers)
    return response, status


def register_error_handlers(app: Flask) -> None:
    """Turn HTTP errors, queue errors and unexpected exceptions into :func:`json_error` responses."""

    @app.errorhandler(HTTPException)
    def _http(exc: HTTPException) -> tuple[Response, int]:
        # 404s, 405s, bad JSON bodies (400) and the like: keep werkzeug's wording, drop its HTML.
        response, status = json_error(exc.code or 500, exc.description or exc.name)
        if exc.code == 405 and exc.valid_methods:
            response.headers["Allow"] = ", ".join(exc.valid_methods)
        return response, status

    @app.errorhandler(RedisDown)
    def _redis_down(exc: RedisDown) -> tuple[Response, int]:
        return json_error(503, str(exc))

    @app.errorhandler(QueueError)
    def _queue(exc: QueueError) -> tuple[Response, int]:
        # busy (backpressure) is a "try again later"; anything else the queue raises is ours to fix.
        return json_error(503 if exc.code == BUSY else 500, f"{exc.code}: {exc}")

    @app.errorhandler(Exception)
    def _unexpected(exc: Exception) -> tuple[Response, int]:
        log.exception("unhandled error")
        return json_error(500, f"internal error in the lisa-ls backend: {type(exc).__name__}: {exc}")
