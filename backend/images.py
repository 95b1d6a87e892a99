"""Fetch the bytes of a task's image safely, for the backend (never imports torch: it runs in gunicorn threads).

A task's image value is what Label Studio put in the task data: a Label Studio path (``/data/upload/…``,
``/data/local-files/?d=…``), a cloud storage URI (``s3://``, ``gs://``, ``azure-blob://``…) that only Label Studio can
resolve (``/tasks/<id>/resolve/?fileuri=<base64>`` redirects to a presigned URL or proxies the bytes), any http(s)
URL, or a ``data:`` URI. :class:`ImageFetcher` turns each into bytes, under these rules:

- credentials (``Token <legacy key>``, or ``Bearer <access>`` exchanged for a personal access token at
  ``/api/token/refresh``) go only to the configured Label Studio origin, never along a redirect elsewhere;
- http(s) only, through :mod:`backend.netguard`: no non-public address (but the Label Studio host and operator-allowed
  hosts), no DNS rebinding; redirects are followed by hand and each hop is checked again;
- byte, pixel (read from the header, never by decoding), connect, read and overall time limits, and LISA's side
  ratio (:func:`worker.client.limits.image_shape_error`), so an image the model would refuse is refused before it
  is queued;
- every refusal is one :class:`ImageFetchError` whose message Label Studio shows to the annotator as is.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import threading
import time
from urllib.parse import quote, urljoin, urlsplit

import requests
from urllib3.exceptions import ReadTimeoutError

from backend.config import (
    FETCH_CONNECT_TIMEOUT_S,
    FETCH_DEADLINE_S,
    FETCH_MAX_BYTES,
    FETCH_MAX_PIXELS,
    FETCH_MAX_REDIRECTS,
    FETCH_READ_TIMEOUT_S,
    BackendConfig,
)
from backend.imagefile import IMAGE_FORMATS, FetchedImage, ImageFetchError, inspect_image
from backend.lsclient import jwt_claims
from backend.netguard import (
    AddressPolicy,
    GuardError,
    IPAddress,
    Resolver,
    _Deadline,
    _Guard,
    _guarded_session,
    _origin,
    _reason,
    address_problem,
    system_resolver,
)
from worker.client.protocol import image_hash

__all__ = ["CLOUD_SCHEMES", "DEFAULT_MAX_BYTES", "DEFAULT_MAX_PIXELS", "IMAGE_FORMATS", "AddressPolicy",
           "FetchSettings", "FetchedImage", "IPAddress", "ImageFetchError", "ImageFetcher", "Resolver",
           "address_problem", "inspect_image", "system_resolver"]

DEFAULT_MAX_BYTES = FETCH_MAX_BYTES
DEFAULT_MAX_PIXELS = FETCH_MAX_PIXELS
CLOUD_SCHEMES = frozenset({"s3", "gs", "azure-blob", "azure-spi", "b2"})
_REDIRECTS = frozenset({301, 302, 303, 307, 308})
_HEADERS = {"User-Agent": "lisa-ls-backend", "Accept": "image/*,*/*;q=0.5", "Accept-Encoding": "identity"}


@dataclasses.dataclass(frozen=True)
class FetchSettings:
    """What the fetcher needs from the backend's configuration; build it with :meth:`from_config` (the defaults and
    the ``LISA_LS_FETCH_*`` variables are documented in :mod:`backend.config`)."""

    label_studio_url: str = ""
    api_key: str = ""
    max_bytes: int = DEFAULT_MAX_BYTES
    max_pixels: int = DEFAULT_MAX_PIXELS
    connect_timeout_s: float = FETCH_CONNECT_TIMEOUT_S
    read_timeout_s: float = FETCH_READ_TIMEOUT_S
    deadline_s: float = FETCH_DEADLINE_S  # the whole fetch: token exchange, redirects and body together
    max_redirects: int = FETCH_MAX_REDIRECTS
    tls_verify: bool | str = True  # or the path of a CA bundle, e.g. for a Label Studio behind an internal CA
    # Host names (or host:port) allowed to resolve to non-public addresses, e.g. an in-cluster MinIO that serves
    # presigned cloud-storage URLs. They never receive credentials.
    allowed_private_hosts: tuple[str, ...] = ()

    @classmethod
    def from_config(cls, config: BackendConfig) -> FetchSettings:
        """The fetcher's settings from the backend's (``LABEL_STUDIO_*`` and ``LISA_LS_FETCH_*``…): the one place
        they are read, for ``/predict``, capture, export and pre-labelling alike."""
        return cls(label_studio_url=config.label_studio_url, api_key=config.label_studio_api_key,
                   max_bytes=config.fetch_max_bytes, max_pixels=config.fetch_max_pixels,
                   connect_timeout_s=config.fetch_connect_timeout_s, read_timeout_s=config.fetch_read_timeout_s,
                   deadline_s=config.fetch_deadline_s, max_redirects=config.fetch_max_redirects,
                   tls_verify=config.tls_verify, allowed_private_hosts=config.allowed_private_hosts)


class ImageFetcher:
    """Fetches task images under :class:`FetchSettings`; one per process, safe to share between threads.

    Args:
        resolver: host, port -> addresses; injectable for tests.
        policy: address -> reason to refuse it or None (default :func:`address_problem`); injectable for tests.
    """

    def __init__(self, settings: FetchSettings, *, resolver: Resolver = system_resolver,
                 policy: AddressPolicy = address_problem) -> None:
        self.settings = settings
        self._guard = _Guard(settings.label_studio_url, settings.allowed_private_hosts, resolver, policy)
        self._ls = settings.label_studio_url.rstrip("/")
        self._ls_origin = _origin(self._ls) if self._ls else None
        self._token_lock = threading.Lock()
        self._access: tuple[str, float] | None = None  # (access token, monotonic time to stop using it)

    def fetch(self, value: object, task_id: int | None = None, deadline_s: float | None = None) -> FetchedImage:
        """The bytes of the image a task refers to; raises :class:`ImageFetchError` with a readable message.

        ``deadline_s`` shortens the fetch's overall deadline (``settings.deadline_s``), e.g. to what is left of a
        request's own.
        """
        value = self._checked(value, task_id)
        try:
            if value[:5].lower() == "data:":
                source, data = "data: URI", self._data_uri(value)
            else:
                source = _describe(value, self._ls_origin)
                seconds = self.settings.deadline_s if deadline_s is None else min(deadline_s, self.settings.deadline_s)
                data = self._download(self._to_url(value, task_id), source, seconds)
        except ValueError as e:  # urllib and idna refuse some malformed URLs with ValueError/UnicodeError
            raise ImageFetchError(f"the image URL {value[:200]!r} is malformed ({e})") from e
        fmt, width, height = inspect_image(data, self.settings.max_pixels, f"the image {source}")
        return FetchedImage(data, image_hash(data), fmt, width, height, source)

    def host(self, value: object, task_id: int | None = None) -> str | None:
        """``host:port`` the fetch of ``value`` connects to first (for per-host bounds); ``None`` for a ``data:`` URI
        or a value :meth:`fetch` refuses before connecting anywhere."""
        try:
            value = self._checked(value, task_id)
            if value[:5].lower() == "data:":
                return None
            origin = _origin(self._to_url(value, task_id))
        except (ImageFetchError, ValueError):
            return None
        return f"{origin[1]}:{origin[2]}" if origin else None

    @staticmethod
    def _checked(value: object, task_id: int | None) -> str:
        if not isinstance(value, str) or not value.strip():
            raise ImageFetchError("the task has no image URL (its image field is empty or not a string)")
        if task_id is not None and not str(task_id).isdigit():
            raise ImageFetchError(f"the task id {str(task_id)[:40]!r} is not a number")
        return value.strip()

    def _data_uri(self, value: str) -> bytes:
        header, comma, payload = value[5:].partition(",")
        if not comma or not header.lower().endswith(";base64"):
            raise ImageFetchError("only base64 data: URIs are supported (data:image/png;base64,...)")
        payload = "".join(payload.split())
        if len(payload) * 3 // 4 > self.settings.max_bytes:
            raise ImageFetchError(f"the data: URI image is {_mb(len(payload) * 3 // 4)}, above the "
                                  f"{_mb(self.settings.max_bytes)} limit", "too_large")
        try:
            return base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError) as e:
            raise ImageFetchError(f"the data: URI is not valid base64 ({e})", "not_image") from e

    def _to_url(self, value: str, task_id: int | None) -> str:
        if value.startswith("upload/"):  # old Label Studio versions stored uploads without /data
            value = "/data/" + value
        if value.startswith("/") and not value.startswith("//"):
            return self._ls_url(value, value)
        scheme = urlsplit(value).scheme.lower()
        if scheme in CLOUD_SCHEMES:
            if task_id is None:
                raise ImageFetchError(f"{_describe(value, None)} is in cloud storage, which Label Studio resolves "
                                      "per task, but the request carries no task id")
            fileuri = quote(base64.urlsafe_b64encode(value.encode()).decode())
            return self._ls_url(f"/tasks/{int(task_id)}/resolve/?fileuri={fileuri}", value)
        if scheme in ("http", "https"):
            return value
        shown = f"the URL scheme {scheme!r}" if scheme else "a URL without http:// or https://"
        raise ImageFetchError(f"the image URL {_describe(value, None)} uses {shown}; only http(s) URLs, Label "
                              "Studio paths, cloud storage URIs and data: URIs are fetched")

    def _ls_url(self, path: str, value: str) -> str:
        what = _describe(value, None)
        if not self._ls:
            raise ImageFetchError(f"{what} is served by Label Studio, but LABEL_STUDIO_URL is not set: set it to the "
                                  "URL at which the backend reaches Label Studio", "config")
        if self._ls_origin is None or self._ls_origin[0] not in ("http", "https"):
            raise ImageFetchError(f"LABEL_STUDIO_URL={self._ls!r} must start with http:// or https://", "config")
        if not self.settings.api_key:
            raise ImageFetchError(f"{what} is served by Label Studio, which needs an API key: set "
                                  "LABEL_STUDIO_API_KEY (a legacy token or a personal access token)", "config")
        return self._ls + path

    def _download(self, url: str, source: str, deadline_s: float) -> bytes:
        with _guarded_session(self._guard, deadline_s, self.settings.tls_verify) as (session, deadline):
            return self._follow(session, url, source, deadline)

    def _follow(self, session: requests.Session, url: str, source: str, deadline: _Deadline) -> bytes:
        s = self.settings
        hops, retried, left_ls = 0, False, False
        while True:
            here = source if hops == 0 else f"{_describe(url, self._ls_origin)} (redirected from {source})"
            split = urlsplit(url)
            if split.scheme.lower() not in ("http", "https"):
                raise ImageFetchError(f"{source} redirects to a {split.scheme}: URL, which the backend refuses to "
                                      "fetch", "refused")
            # Credentials only while every hop so far was Label Studio: an outside URL must not be able to
            # redirect the backend into Label Studio files with the backend's token.
            to_ls = _origin(url) == self._ls_origin and not left_ls
            left_ls = left_ls or not to_ls
            headers = dict(_HEADERS)
            if to_ls:
                headers["Authorization"] = self._authorization(session, deadline)
            timeout = self._timeout(deadline)
            try:
                response = session.get(url, headers=headers, timeout=timeout, stream=True, allow_redirects=False)
            except requests.RequestException as e:
                raise self._transport_error(e, here, url, timeout, deadline) from e
            except GuardError as e:  # refused by the guard: say which redirect led there
                raise ImageFetchError(e.message + (f" (redirected from {source})" if hops else ""), e.code) from e
            with response:
                status = response.status_code
                if status in _REDIRECTS and response.headers.get("Location"):
                    target = urljoin(url, response.headers["Location"])
                    if to_ls and "/user/login" in urlsplit(target).path:
                        raise ImageFetchError(f"Label Studio sent the backend to its login page for {here}: check "
                                              "LABEL_STUDIO_API_KEY", "auth")
                    hops += 1
                    if hops > s.max_redirects:
                        raise ImageFetchError(f"{source} redirects more than {s.max_redirects} times", "http")
                    url = target
                    continue
                if status == 401 and to_ls and headers["Authorization"].startswith("Bearer") and not retried:
                    retried = True  # the cached access token may have been revoked early: exchange once more
                    self._access = None  # (no lock: at worst another thread's fresh token is exchanged again)
                    continue
                if status != 200:
                    raise self._status_error(status, here, to_ls, "/resolve/" in split.path)
                return self._read_body(response, here, url, timeout, deadline)

    def _read_body(self, response: requests.Response, here: str, url: str, timeout: tuple[float, float],
                   deadline: _Deadline) -> bytes:
        limit = self.settings.max_bytes
        length = response.headers.get("Content-Length", "")
        if length.isdigit() and int(length) > limit:
            raise ImageFetchError(f"the image {here} is {_mb(int(length))}, above the {_mb(limit)} limit",
                                  "too_large")
        body = bytearray()
        try:
            for chunk in response.iter_content(65536):
                body += chunk
                if len(body) > limit:
                    raise ImageFetchError(f"the image {here} is larger than the {_mb(limit)} limit (stopped after "
                                          f"{_mb(len(body))})", "too_large")
        except requests.RequestException as e:
            raise self._transport_error(e, here, url, timeout, deadline) from e
        if deadline.expired:  # a shut-down socket without Content-Length looks like a normal end of the body
            raise self._transport_error(None, here, url, timeout, deadline)
        return bytes(body)

    def _timeout(self, deadline: _Deadline) -> tuple[float, float]:
        left = deadline.remaining()
        if left <= 0:
            raise ImageFetchError(f"fetching the image took longer than {deadline.seconds:g} s", "timeout")
        return min(self.settings.connect_timeout_s, left), min(self.settings.read_timeout_s, left)

    def _authorization(self, session: requests.Session, deadline: _Deadline) -> str:
        """``Token <key>`` for a legacy token; for a personal access token, ``Bearer <access>`` (exchanged, cached)."""
        key = self.settings.api_key
        if jwt_claims(key) is None:
            return f"Token {key}"
        # One exchange at a time, the others then use its result; but wait no longer than this fetch may take.
        if not self._token_lock.acquire(timeout=max(deadline.remaining(), 0.0)):
            raise ImageFetchError(f"fetching the image took longer than {deadline.seconds:g} s (waiting for "
                                  "another request's token exchange with Label Studio)", "timeout")
        try:
            if self._access is not None and time.monotonic() < self._access[1]:
                return f"Bearer {self._access[0]}"
            where = "/api/token/refresh"
            timeout = self._timeout(deadline)
            try:
                response = session.post(self._ls + where, json={"refresh": key},
                                        headers={**_HEADERS, "Accept": "application/json"},
                                        timeout=timeout, allow_redirects=False)
            except requests.RequestException as e:
                raise self._transport_error(e, where, self._ls + where, timeout, deadline) from e
            except GuardError as e:
                raise ImageFetchError(e.message, e.code) from e
            if response.status_code in (401, 403):
                raise ImageFetchError(f"Label Studio answered {response.status_code} to the personal access token "
                                      f"in LABEL_STUDIO_API_KEY ({where}): it is revoked, expired or from another "
                                      "Label Studio; create a new one or use a legacy token", "auth")
            try:
                access = response.json()["access"] if response.status_code == 200 else None
            except (ValueError, KeyError, TypeError):
                access = None
            if not isinstance(access, str) or not access:
                raise ImageFetchError(f"Label Studio answered {response.status_code} without an access token to "
                                      f"{where}: check LABEL_STUDIO_URL, or use a legacy token", "auth")
            exp = (jwt_claims(access) or {}).get("exp")
            ttl = float(exp) - time.time() if isinstance(exp, (int, float)) else 120.0
            # Stop using it 30 s before it expires (LS issues ~5 min tokens); short-lived ones only half-way.
            self._access = (access, time.monotonic() + max(0.0, ttl - 30.0 if ttl > 60.0 else ttl / 2))
            return f"Bearer {access}"
        finally:
            self._token_lock.release()

    def _status_error(self, status: int, here: str, to_ls: bool, resolve: bool) -> ImageFetchError:
        if not to_ls:
            return ImageFetchError(f"the image server answered {status} for {here}",
                                   "not_found" if status == 404 else "http")
        if status in (401, 403):
            return ImageFetchError(f"Label Studio answered {status} for {here}: check LABEL_STUDIO_API_KEY (the "
                                   "token of a user who can see this project)", "auth")
        if status == 404 and resolve:
            return ImageFetchError(f"Label Studio answered 404 for {here}: no cloud storage connected to the "
                                   "project could resolve it", "not_found")
        if status == 404:
            return ImageFetchError(f"Label Studio answered 404 for {here}: no such file (deleted, or "
                                   "LABEL_STUDIO_URL points at another Label Studio)", "not_found")
        return ImageFetchError(f"Label Studio answered {status} for {here}", "http")

    def _transport_error(self, e: Exception | None, here: str, url: str, timeout: tuple[float, float],
                         deadline: _Deadline) -> ImageFetchError:
        if deadline.expired:
            return ImageFetchError(f"fetching {here} took longer than {deadline.seconds:g} s", "timeout")
        if isinstance(e, requests.ConnectTimeout):
            return ImageFetchError(f"could not connect to {urlsplit(url).netloc} within {round(timeout[0], 2):g} s",
                                   "timeout")
        if isinstance(e, requests.ReadTimeout) or (e is not None and any(
                isinstance(a, ReadTimeoutError) for a in e.args)):
            return ImageFetchError(f"timed out after {round(timeout[1], 2):g} s waiting for {here}", "timeout")
        reason = _reason(e)
        if isinstance(e, requests.exceptions.InvalidURL):
            return ImageFetchError(f"the image URL {here} is malformed ({reason})")
        if isinstance(e, requests.exceptions.SSLError):
            return ImageFetchError(f"TLS failed with {urlsplit(url).netloc} for {here} ({reason})", "unreachable")
        if isinstance(e, requests.ConnectionError) and self._guard.is_ls_host(url):
            return ImageFetchError(f"cannot reach Label Studio at {self._ls} ({reason}): set LABEL_STUDIO_URL to "
                                   "the URL at which the backend reaches Label Studio", "unreachable")
        if isinstance(e, requests.exceptions.ChunkedEncodingError):
            return ImageFetchError(f"the connection broke before {here} was complete ({reason})", "unreachable")
        return ImageFetchError(f"cannot fetch {here} from {urlsplit(url).netloc} ({reason})", "unreachable")

def _describe(value: str, ls_origin: tuple[str, str, int] | None) -> str:
    """The image value for messages: Label Studio URLs as paths, others without query strings or user info."""
    split = urlsplit(value)
    if value.startswith("/") or (ls_origin is not None and _origin(value) == ls_origin):
        text = split.path + (f"?{split.query}" if split.query else "")
    else:
        netloc = split.netloc.rpartition("@")[2]
        text = (f"{split.scheme}:" if split.scheme else "") + (f"//{netloc}" if netloc else "") + split.path
    return text if len(text) <= 200 else text[:197] + "..."


def _mb(n: int) -> str:
    return f"{n / 1e6:.1f} MB" if n % 1_000_000 else f"{n // 1_000_000} MB"
