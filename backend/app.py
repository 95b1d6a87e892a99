"""The Flask app factory of the Label Studio ML backend.

Deliberately small: it wires settings, shared state, optional basic auth and JSON errors, and registers the
endpoint blueprints. Each group of endpoints is its own module with a ``bp`` blueprint that reaches the queue
through :func:`backend.state.current_state`, listed in :data:`BLUEPRINTS`: :mod:`backend.status` (``/health``,
``/metrics``, ``/versions``) and :mod:`backend.predict` (the Label Studio protocol: ``/setup``, ``/predict``,
``/webhook``).

Served by gunicorn with threads (``lisa-ls serve``, :mod:`backend.cli`); ``create_app`` is also what tests call.
"""

from __future__ import annotations

import base64
import hmac
import importlib
import logging

from flask import Flask, Response, request

from backend.config import BackendConfig
from backend.errors import json_error, register_error_handlers
from backend.state import EXTENSION, BackendState, current_state

log = logging.getLogger(__name__)

BLUEPRINTS = ("backend.status", "backend.predict")
"""Modules whose ``bp`` blueprint :func:`create_app` registers, in order."""

REALM = "lisa-ls"


def create_app(config: BackendConfig | None = None) -> Flask:
    """Build the app; ``config`` defaults to :meth:`BackendConfig.from_env`. Does not touch Redis."""
    config = config or BackendConfig.from_env()
    app = Flask("lisa_ls_backend")
    app.json.sort_keys = False  # keep "status" first in /health, where people look
    app.extensions[EXTENSION] = state = BackendState.build(config)
    app.config["MAX_CONTENT_LENGTH"] = config.max_body_mb * 2**20  # 413 before the body is read (issue 18)
    if config.capture:
        state.start_capture()  # after gunicorn's fork (no --preload): threads do not survive a fork
    register_error_handlers(app)
    app.register_error_handler(413, _too_large)
    if config.basic_auth is not None:
        app.before_request(_require_basic_auth)
    for module in BLUEPRINTS:
        app.register_blueprint(importlib.import_module(module).bp)
    log.info(
        "lisa-ls backend ready: Redis %s, basic auth %s",
        config.redis_url_redacted,
        "on" if config.basic_auth else "off",
    )
    return app


def _too_large(_exc: Exception) -> tuple[Response, int]:
    """A body over ``LISA_LS_MAX_BODY_MB``: say what the limit is and what to do about a refused webhook."""
    limit = current_state().config.max_body_mb
    return json_error(413, f"the request body is larger than {limit} MiB (LISA_LS_MAX_BODY_MB); a webhook refused "
                           "so is not captured: raise the limit, or run `lisa-ls export` to pick the annotation up")


def _require_basic_auth() -> tuple[Response, int] | None:
    """Refuse any request without the configured credentials (Label Studio sends them from the backend URL)."""
    user, password = current_state().config.basic_auth or ("", "")
    if _credentials_match(request.headers.get("Authorization", ""), user, password):
        return None
    return json_error(
        401,
        "authentication required: put the backend's BASIC_AUTH_USER and BASIC_AUTH_PASS in its URL "
        "(http://user:password@host:port) in Label Studio's model settings",
        headers={"WWW-Authenticate": f'Basic realm="{REALM}", charset="UTF-8"'},
    )


def _credentials_match(header: str, user: str, password: str) -> bool:
    """Check an ``Authorization: Basic ...`` header in constant time (no timing hints about the password)."""
    scheme, _, encoded = header.partition(" ")
    if scheme.lower() != "basic":
        return False
    try:
        given_user, sep, given_password = base64.b64decode(encoded.strip(), validate=True).decode().partition(":")
    except ValueError:  # binascii.Error, UnicodeDecodeError, and non-ASCII header text (which b64decode refuses)
        return False
    user_ok = hmac.compare_digest(given_user.encode(), user.encode())
    password_ok = hmac.compare_digest(given_password.encode(), password.encode())
    return bool(sep) and user_ok and password_ok
