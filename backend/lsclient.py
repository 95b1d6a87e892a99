"""A small client of Label Studio's REST API: the few calls ``lisa-ls prelabel`` makes, on plain ``requests``.

Not ``label-studio-sdk``: it pulls in a large dependency tree for four endpoints. The calls, as Label Studio 1.23
answers them:

- ``GET /api/projects/<id>``: the project, with its ``label_config``;
- ``GET /api/tasks?project=<id>&page=<n>&page_size=<k>&fields=all``: one page of tasks, ordered by id, each with
  its ``predictions`` (``fields=all``). Label Studio answers ``{"tasks": [...], "total": N, ...}``; older versions
  and proxies a bare list; a page past the end is a 404. ``resolve_uri=false`` keeps the image values as stored
  (``s3://...`` stays a URI that :class:`backend.images.ImageFetcher` resolves through Label Studio per task);
- ``POST /api/predictions`` ``{"task", "result", "score", "model_version"}``: 201 with the new prediction.

Authentication is Label Studio's: a legacy token goes as ``Authorization: Token <key>``; a personal access token
(a JWT refresh token) is exchanged at ``POST /api/token/refresh`` for a short-lived access token sent as
``Bearer <access>``, cached until shortly before it expires and exchanged again once if Label Studio answers 401.
(:mod:`backend.images` does the same exchange inside its SSRF-guarded fetches; :func:`jwt_claims` and
:func:`is_personal_access_token` are public here so that both can share them.)

Every failure is a :class:`LabelStudioError` whose message names the call and what to check
(``LABEL_STUDIO_URL`` / ``LABEL_STUDIO_API_KEY``).
"""

from __future__ import annotations

import base64
import binascii
import json
import re
import threading
import time
from collections.abc import Iterator
from typing import Any

import requests

__all__ = ["PAGE_SIZE", "LabelStudioClient", "LabelStudioError", "is_personal_access_token", "jwt_claims"]

PAGE_SIZE = 100
_HEADERS = {"User-Agent": "lisa-ls-prelabel", "Accept": "application/json"}
_CHECK = "check LABEL_STUDIO_URL / LABEL_STUDIO_API_KEY"
_GET_RETRY_S = (1.0, 3.0)  # sleeps before the retries of a failed page of tasks


class LabelStudioError(Exception):
    """A Label Studio API call failed; ``str(e)`` says which and what to check.

    ``code``: ``config`` (URL or key unusable), ``auth`` (401/403), ``not_found`` (404), ``unreachable``
    (connection refused, DNS, TLS, timeout), ``http`` (any other status, e.g. a 400 refusing a prediction).
    """

    def __init__(self, message: str, code: str = "http", status: int | None = None) -> None:
        super().__init__(message)
        self.code, self.status = code, status


def jwt_claims(token: str) -> dict[str, Any] | None:
    """The unverified claims of a JWT, or ``None`` when ``token`` is not one.

    Only used to tell a personal access token from a legacy one and to read ``exp``; Label Studio verifies them.
    """
    parts = token.split(".")
    if len(parts) != 3:
        return None
    try:
        header, claims = (json.loads(base64.urlsafe_b64decode(p + "=" * (-len(p) % 4))) for p in parts[:2])
    except (ValueError, binascii.Error):
        return None
    return claims if isinstance(header, dict) and "alg" in header and isinstance(claims, dict) else None


def is_personal_access_token(key: str) -> bool:
    """Whether ``LABEL_STUDIO_API_KEY`` is a personal access token (a JWT) rather than a legacy token."""
    return jwt_claims(key) is not None


class LabelStudioClient:
    """Label Studio's REST API at ``url`` with ``api_key``; safe to share between threads.

    Args:
        url: Label Studio's base URL (``LABEL_STUDIO_URL``), e.g. ``http://label-studio:8080``.
        api_key: a legacy token or a personal access token (``LABEL_STUDIO_API_KEY``).
        timeout: ``(connect, read)`` seconds per call.
    """

    def __init__(self, url: str, api_key: str, timeout: tuple[float, float] = (5.0, 60.0)) -> None:
        self.url = (url or "").strip().rstrip("/")
        if not self.url.startswith(("http://", "https://")):
            shown = f"={self.url!r} " if self.url else " is not set: it "
            raise LabelStudioError(f"LABEL_STUDIO_URL{shown}must be Label Studio's base URL, e.g. "
                                   "http://localhost:8080", "config")
        if not api_key:
            raise LabelStudioError("LABEL_STUDIO_API_KEY is not set: use a legacy token or a personal access token "
                                   "(Label Studio → Account & Settings)", "config")
        self.api_key, self.timeout = api_key, timeout
        self.session = requests.Session()
        self.session.headers.update(_HEADERS)
        self._lock = threading.Lock()
        self._access: tuple[str, float] | None = None  # (access token, monotonic time to stop using it)

    # ---- the calls ----

    def project(self, project_id: int) -> dict[str, Any]:
        """The project (``id``, ``title``, ``label_config``...)."""
        body = self._request("GET", f"/api/projects/{int(project_id)}", what=f"project {project_id}")
        if not isinstance(body, dict) or not isinstance(body.get("label_config"), str):
            raise LabelStudioError(f"Label Studio's answer for project {project_id} has no label_config: {_CHECK}")
        return body

    def iter_tasks(self, project_id: int, page_size: int = PAGE_SIZE) -> Iterator[tuple[dict[str, Any], int | None]]:
        """Every task of the project, by id, page by page: ``(task, total)`` with ``total`` the project's task
        count when Label Studio reports one (the ``{"tasks": ...}`` shape), else ``None``."""
        page, seen = 1, 0
        while True:
            params = {"project": int(project_id), "page": page, "page_size": page_size, "fields": "all",
                      "resolve_uri": "false"}
            try:
                body = self._get_retrying("/api/tasks", params=params, what=f"tasks of project {project_id}")
            except LabelStudioError as e:
                if e.status == 404 and page > 1:  # DRF's "Invalid page": the previous page was the last
                    return
                raise
            tasks, total = (body.get("tasks"), body.get("total")) if isinstance(body, dict) else (body, None)
            if not isinstance(tasks, list):
                raise LabelStudioError(f"Label Studio's answer to GET /api/tasks is not a task list: {_CHECK}")
            total = total if isinstance(total, int) else None
            for task in tasks:
                if isinstance(task, dict) and "id" in task:
                    yield task, total
            seen += len(tasks)
            # Not "a short page is the last": an admin may cap the page size (TASK_API_PAGE_SIZE_MAX) below ours.
            if not tasks or (total is not None and seen >= total):
                return
            page += 1

    def ml_backends(self, project_id: int) -> list[dict[str, Any]]:
        """The project's model connections (``id``, ``url``, ``title``, ``extra_params``...)."""
        body = self._get_retrying("/api/ml", params={"project": int(project_id)},
                                  what=f"model connections of project {project_id}")
        items = body.get("results") if isinstance(body, dict) else body
        if not isinstance(items, list):
            raise LabelStudioError(f"Label Studio's answer to GET /api/ml is not a list: {_CHECK}")
        return [b for b in items if isinstance(b, dict)]

    def connection_params(self, project_id: int) -> list[dict[str, Any]]:
        """The Extra params of each of the project's model connections, as dicts (Label Studio keeps JSON or its
        text); one that is not a JSON object is left out (``/setup`` already refuses it on its model card)."""
        out = []
        for backend in self.ml_backends(project_id):
            extra = backend.get("extra_params")
            if isinstance(extra, str) and extra.strip():
                try:
                    extra = json.loads(extra)
                except json.JSONDecodeError:
                    continue
            if isinstance(extra, dict):
                out.append(extra)
        return out

    def create_prediction(self, task_id: int, result: list[dict[str, Any]], score: float | None,
                          model_version: str) -> dict[str, Any]:
        """Store a prediction for a task; returns Label Studio's record of it (with its ``id``). ``score`` None
        stores none (see :mod:`backend.regions`: SAM's score is uncalibrated)."""
        body = {"task": int(task_id), "result": result, "score": None if score is None else float(score),
                "model_version": model_version}
        answer = self._request("POST", "/api/predictions", json=body, what=f"a prediction for task {task_id}")
        return answer if isinstance(answer, dict) else {}

    # ---- plumbing ----

    def _get_retrying(self, path: str, *, what: str, **kwargs: Any) -> Any:
        """A GET retried after a dropped connection, a timeout or a 5xx (a restart or a proxy hiccup should not end
        an hours-long listing); GETs are safe to repeat, unlike the POST of a prediction."""
        for delay in _GET_RETRY_S:
            try:
                return self._request("GET", path, what=what, **kwargs)
            except LabelStudioError as e:
                if not (e.code == "unreachable" or (e.status or 0) >= 500):
                    raise
            time.sleep(delay)
        return self._request("GET", path, what=what, **kwargs)

    def _request(self, method: str, path: str, *, what: str, **kwargs: Any) -> Any:
        """One call with authentication; a stale access token is exchanged again once."""
        for attempt in range(2):
            headers = {"Authorization": self._authorization(force=attempt > 0)}
            try:
                response = self.session.request(method, self.url + path, headers=headers, timeout=self.timeout,
                                                allow_redirects=False, **kwargs)
            except requests.RequestException as e:
                raise self._transport_error(e, method, path) from e
            if response.status_code == 401 and headers["Authorization"].startswith("Bearer") and attempt == 0:
                continue  # revoked or expired early: one more exchange, then give up
            break
        status = response.status_code
        if status in (200, 201):
            try:
                return response.json()
            except ValueError as e:
                raise LabelStudioError(f"Label Studio answered {method} {path} with something other than JSON "
                                       f"(is LABEL_STUDIO_URL={self.url} Label Studio?)", "http", status) from e
        if status in (401, 403):
            raise LabelStudioError(
                f"Label Studio answered {status} to {method} {path} ({what}): {_CHECK} (the token of a user who can "
                f"see this project){_detail(response)}", "auth", status)
        if status in (301, 302, 303, 307, 308):
            raise LabelStudioError(f"Label Studio redirected {method} {path} to {response.headers.get('Location')}: "
                                   f"{_CHECK}", "auth" if "login" in response.headers.get("Location", "") else "http",
                                   status)
        if status == 404:
            raise LabelStudioError(f"Label Studio answered 404 to {method} {path}: no {what} at {self.url} (wrong id, "
                                   f"or {_CHECK}){_detail(response)}", "not_found", status)
        raise LabelStudioError(f"Label Studio answered {status} to {method} {path} ({what}){_detail(response)}",
                               "http", status)

    def _authorization(self, force: bool = False) -> str:
        """``Token <key>``, or ``Bearer <access>`` exchanged for a personal access token (cached)."""
        if not is_personal_access_token(self.api_key):
            return f"Token {self.api_key}"
        with self._lock:  # one exchange at a time; the other threads then use its result
            if not force and self._access is not None and time.monotonic() < self._access[1]:
                return f"Bearer {self._access[0]}"
            where = "/api/token/refresh"
            try:
                response = self.session.post(self.url + where, json={"refresh": self.api_key}, timeout=self.timeout,
                                             allow_redirects=False)
            except requests.RequestException as e:
                raise self._transport_error(e, "POST", where) from e
            if response.status_code in (401, 403):
                raise LabelStudioError(
                    f"Label Studio answered {response.status_code} to the personal access token in "
                    f"LABEL_STUDIO_API_KEY (POST {where}): it is revoked, expired or from another Label Studio; "
                    f"{_CHECK}", "auth", response.status_code)
            try:
                access = response.json()["access"] if response.status_code == 200 else None
            except (ValueError, KeyError, TypeError):
                access = None
            if not isinstance(access, str) or not access:
                raise LabelStudioError(f"Label Studio answered {response.status_code} without an access token to "
                                       f"POST {where}: {_CHECK}", "auth", response.status_code)
            exp = (jwt_claims(access) or {}).get("exp")
            ttl = float(exp) - time.time() if isinstance(exp, (int, float)) else 120.0
            # Stop using it 30 s before it expires (Label Studio issues ~5 min tokens); short-lived ones half-way.
            self._access = (access, time.monotonic() + max(0.0, ttl - 30.0 if ttl > 60.0 else ttl / 2))
            return f"Bearer {access}"

    def _transport_error(self, e: requests.RequestException, method: str, path: str) -> LabelStudioError:
        if isinstance(e, requests.Timeout):
            return LabelStudioError(f"Label Studio at {self.url} did not answer {method} {path} in time ({e}): "
                                    f"{_CHECK}", "unreachable")
        if isinstance(e, requests.exceptions.InvalidURL):
            return LabelStudioError(f"LABEL_STUDIO_URL={self.url!r} is not a valid URL ({e})", "config")
        # requests nests the cause in a long MaxRetryError text; the "[Errno 111] Connection refused" part says it.
        found = re.search(r"\[Errno -?\d+\] [^'\")\]]+", str(e))
        reason = found.group(0) if found else type(e).__name__
        return LabelStudioError(f"cannot reach Label Studio at {self.url} ({reason}): {_CHECK}", "unreachable")


def _detail(response: requests.Response) -> str:
    """Label Studio's own reason (``detail`` or the validation errors), shortened, for the message."""
    try:
        body = response.json()
    except ValueError:
        return ""
    text = body.get("detail") or body.get("validation_errors") or body if isinstance(body, dict) else body
    text = str(text)
    return f" — {text[:300]}" if text else ""
