"""Every setting of the Label Studio backend, in one place, read from the environment with documented defaults.

Label Studio's own ML-backend names are kept where one exists, so a deployment written for Label Studio's
examples carries over; the rest are ours, prefixed ``LISA_LS_``. The queue's settings (``REDIS_URL`` and the
``LISA_LS_*`` names of :class:`worker.client.defaults.QueueConfig`) are read by that class and kept in
:attr:`BackendConfig.queue`, so the backend and the workers parse them identically.

==============================  ==============  ===================================================================
Variable                        Default         Meaning
==============================  ==============  ===================================================================
``LABEL_STUDIO_URL``            (unset)         Label Studio's base URL, to fetch uploaded images and call its
                                                API (``LABEL_STUDIO_HOST``, the older name, is read as a fallback)
``LABEL_STUDIO_API_KEY``        (unset)         token for Label Studio's API (legacy or personal access token)
``MODEL_DIR``                   ``./data``      directory for the backend's own files (captured corrections,
                                                pre-label progress); model weights live with the workers
``LOG_LEVEL``                   ``INFO``        DEBUG, INFO, WARNING, ERROR or CRITICAL (DEBUG adds access logs)
``WORKERS``                     ``1``           gunicorn processes
``THREADS``                     ``64``          threads per gunicorn process. A /predict thread mostly waits on
                                                Redis, so many are cheap; with fewer threads than requests in
                                                flight, ``/health`` waits behind them and Label Studio
                                                disconnects
``BASIC_AUTH_USER``             (unset)         with ``BASIC_AUTH_PASS``: HTTP basic auth on every endpoint
``BASIC_AUTH_PASS``             (unset)         (Label Studio sends them from ``http://user:pass@host:9090``)
``REDIS_URL``                   see worker      the job queue's Redis (``worker.client.defaults.REDIS_URL``)
``LISA_LS_HOST``                ``0.0.0.0``     address the backend listens on
``LISA_LS_PORT``                ``9090``        port the backend listens on (Label Studio's usual ML port)
``LISA_LS_PREDICT_DEADLINE_S``  ``60``          longest a ``/predict`` waits for the workers; below Label
                                                Studio's 100 s ``ML_TIMEOUT_PREDICT`` so we answer first
``LISA_LS_HEALTH_TIMEOUT_S``    ``0.5``         Redis budget of ``/health``, ``/metrics`` and ``/versions``;
                                                past it they report Redis unreachable (Label Studio allows 1 s)
``LISA_LS_QUERY_FIELD``         ``query``       task data key holding the query of batch predictions
``LISA_LS_DEFAULT_LABEL``       (unset)         brush label used when the query names none (else the first)
``LISA_LS_SPLIT_INSTANCES``     ``0``           1: one region per connected instance instead of one per mask
``LISA_LS_MIN_SCORE``           (off)           masks whose SAM score (predicted IoU) is below this are dropped;
                                                off by default: LISA's training has no loss on SAM's IoU head,
                                                so a released LISA's score is not calibrated
``LISA_LS_MIN_AREA``            ``16``          regions of fewer pixels are dropped as noise; an answer left
                                                with none says "LISA found nothing matching ..." in the UI
``LISA_LS_POLYGON_TOLERANCE``   ``0.5``         how far (pixels) a polygon suggestion may stray from the mask's
                                                outline (OpenCV's approxPolyDP); 0 keeps every outline step
``LISA_LS_PHRASE_TEMPLATE``     (LISA's)        question for a short phrase; ``{}`` is the phrase (the worker
                                                phrases queries: ``model/phrasing.py`` has LISA's templates)
``LISA_LS_SENTENCE_TEMPLATE``   (LISA's)        question for a sentence; ``{}`` is the sentence
``LISA_LS_CAPTURE``             ``1``           1: ``/webhook`` stores submitted annotations as training samples
                                                (:mod:`backend.capture`); 0: it acknowledges and drops them
``LISA_LS_DATASET_DIR``         (unset)         where captured datasets live, one ``project-<id>/`` each
                                                (default ``$MODEL_DIR/dataset``)
``LISA_LS_VAL_PERCENT``         ``10``          share of images (by content hash) in a new dataset's val split
``LISA_LS_CAPTURE_BACKLOG``     ``100000``      webhook events stored but not yet processed, above which
                                                ``/webhook`` answers 503 rather than grow Redis without bound
``LISA_LS_CAPTURE_RECLAIM_S``   ``120``         an event a backend process took but has not finished for this
                                                long (the process died) is processed by another; keep it above
                                                ``LISA_LS_FETCH_DEADLINE_S``, so a live process keeps its events
``LISA_LS_MAX_BODY_MB``         ``16``          largest request body, in MiB; a larger one is answered 413 before
                                                it is read (a webhook refused so is not captured: run ``lisa-ls
                                                export`` to pick it up). Storing a 16 MiB webhook took 0.24 s on
                                                a loaded test machine, 32 MiB 0.6 s, of the 1 s Label Studio gives
``LISA_LS_CAPTURE_BACKLOG_MB``  ``512``         webhook bodies stored but not yet processed, in MiB, above which
                                                ``/webhook`` answers 503 (at least ``LISA_LS_MAX_BODY_MB``)
==============================  ==============  ===================================================================

The task-image fetcher (:mod:`backend.images`, built from these by ``FetchSettings.from_config``; the same for
``/predict``, capture, ``lisa-ls export`` and ``lisa-ls prelabel``):

==================================  ==============  ===============================================================
Variable                            Default         Meaning
==================================  ==============  ===============================================================
``LISA_LS_FETCH_MAX_BYTES``         ``50000000``    largest image file fetched, in bytes
``LISA_LS_FETCH_MAX_PIXELS``        ``64000000``    most pixels (read from the header); the model's own limit
``LISA_LS_FETCH_CONNECT_TIMEOUT_S`` ``5``           TCP/TLS connect timeout of one connection
``LISA_LS_FETCH_READ_TIMEOUT_S``    ``20``          longest wait for the next bytes of a response
``LISA_LS_FETCH_DEADLINE_S``        ``30``          a whole fetch (token exchange, redirects, body); inside a
                                                    ``/predict`` also cut at what is left of its deadline
``LISA_LS_FETCH_MAX_REDIRECTS``     ``5``           redirects followed (each hop checked again)
``LISA_LS_TLS_VERIFY``              ``1``           1: verify certificates; 0: do not (testing only); or the
                                                    path of a CA bundle (Label Studio behind an internal CA)
``LISA_LS_ALLOWED_PRIVATE_HOSTS``   (none)          comma-separated host names (or host:port) allowed to resolve
                                                    to private addresses, e.g. an in-cluster MinIO serving
                                                    presigned URLs; they never receive credentials
``LISA_LS_FETCH_CONCURRENCY``       THREADS / 2     image fetches in flight at once in one backend process; a
                                                    ``/predict`` that finds none free waits up to 2 s (a few at a
                                                    time), then answers "busy", so slow image hosts never hold
                                                    every thread and ``/health`` and ``/webhook`` always find one.
                                                    Must be below ``THREADS``
``LISA_LS_FETCH_PER_HOST``          half the above  the same bound per image host (host:port of the image URL),
                                                    so one slow host cannot take every fetch slot
==================================  ==============  ===============================================================

Bad values raise :class:`ValueError` naming the variable, at start-up rather than on the first request.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Mapping
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from worker.client.defaults import ENV_PREFIX, QueueConfig, parse_env_value

MODEL_CLASS = "LisaBackend"
"""What ``/health`` reports as ``model_class`` (Label Studio's backends report their Python class there)."""

LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")

HOST = "0.0.0.0"
PORT = 9090
WORKERS = 1
THREADS = 64
MODEL_DIR = "./data"
LOG_LEVEL = "INFO"
PREDICT_DEADLINE_S = 60.0
HEALTH_TIMEOUT_S = 0.5
QUERY_FIELD = "query"
VAL_PERCENT = 10
CAPTURE_BACKLOG = 100_000
CAPTURE_RECLAIM_S = 120.0  # above an image fetch's 30 s deadline, so a live process keeps its events
# -- request and capture sizes (issue 18) --
MAX_BODY_MB = 16
CAPTURE_BACKLOG_MB = 512
FETCH_MAX_BYTES = 50_000_000
FETCH_MAX_PIXELS = 64_000_000  # the model's own limit (model/preprocess.py), so nothing is fetched in vain
FETCH_CONNECT_TIMEOUT_S = 5.0
FETCH_READ_TIMEOUT_S = 20.0
FETCH_DEADLINE_S = 30.0
FETCH_MAX_REDIRECTS = 5
FETCH_PARALLEL_PER_REQUEST = 8
"""Most images one batch ``/predict`` fetches at once (each also takes a slot of ``LISA_LS_FETCH_CONCURRENCY``)."""
FETCH_SLOT_WAIT_S = 2.0
"""How long a ``/predict`` without a free fetch slot waits for one before answering "busy": quick fetches free
theirs in milliseconds, so a burst of clicks is served; a slow host's are refused soon."""
_TRUE, _FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off")
#: Polygon simplification (pixels): bench/bench_polygons.py measured IoU 0.99 with the masks at 0.5 px.
POLYGON_TOLERANCE_PX = 0.5
MAX_POLYGON_TOLERANCE_PX = 100.0  # beyond this a polygon no longer outlines the mask

# -- fixed values of the backend (not read from the environment) --
CAPTURE_GROUP = "lisa-capture"
"""The consumer group of the capture stream (:mod:`backend.capture`)."""
CAPTURE_BATCH = 8
"""Webhook events one capture round reads or reclaims."""
CAPTURE_BLOCK_S = 1.0
"""How long one capture read blocks; also how late a stopping consumer notices."""
CAPTURE_MAX_DELIVERIES = 5
"""Deliveries of a failing webhook event before it is recorded as skipped."""
CAPTURE_TRIM_COUNT, CAPTURE_TRIM_STEPS = 1000, 8
"""Version records looked at per trim step, and steps per reclaim round."""
CAPTURE_ERROR_CHARS = 2000
"""Characters of an error kept in the capture errors hash (the message may quote a large event)."""
REFINE_MEMORY_TTL_S = 24 * 3600
"""How long a task remembers its last query and clicks (an annotator may come back to a task after lunch)."""


def env_log_level(environ: Mapping[str, str] | None = None) -> str:
    """``LOG_LEVEL`` as the command line's logging starts with it (the one place it is read before a
    :class:`BackendConfig` exists); a bad value gives the default here, and ``serve`` reports it."""
    env = os.environ if environ is None else environ
    level = env.get("LOG_LEVEL", "").strip().upper() or LOG_LEVEL
    return level if level in LOG_LEVELS else LOG_LEVEL


def _tls_verify(name: str, raw: str) -> bool | str:
    """``LISA_LS_TLS_VERIFY``: a yes/no word, or the path of a CA bundle (which must exist)."""
    if raw.lower() in _TRUE or raw.lower() in _FALSE:
        return raw.lower() in _TRUE
    if not os.path.isfile(raw):
        raise ValueError(f"{name}={raw!r} is neither 1/0 nor the path of a CA bundle file")
    return raw


def _hosts(name: str, raw: str) -> tuple[str, ...]:
    """A comma-separated list of host names (or host:port)."""
    hosts = tuple(h.strip().lower() for h in raw.split(",") if h.strip())
    bad = [h for h in hosts if "/" in h or "@" in h or " " in h]
    if bad:
        raise ValueError(f"{name}: {bad[0]!r} is not a host name or host:port (no scheme, path or user)")
    return hosts


def _env(name: str, parse: Callable[[str, str], Any] | None = None) -> dict[str, Any]:
    """Field metadata: the environment variable a field is read from, and how to read it when the field's type is
    not one :func:`~worker.client.defaults.parse_env_value` reads (``parse(name, raw)``). What the setting means
    is written once, in the module docstring's table (``tests/test_settings.py`` holds the two together)."""
    return {"env": name, "parse": parse}


@dataclasses.dataclass(frozen=True)
class BackendConfig:
    """The backend's settings; the module docstring lists each variable. Build with :meth:`from_env`."""

    label_studio_url: str = dataclasses.field(default="", metadata=_env("LABEL_STUDIO_URL"))
    label_studio_api_key: str = dataclasses.field(
        default="", repr=False, metadata=_env("LABEL_STUDIO_API_KEY")
    )
    model_dir: str = dataclasses.field(default=MODEL_DIR, metadata=_env("MODEL_DIR"))
    log_level: str = dataclasses.field(default=LOG_LEVEL, metadata=_env("LOG_LEVEL"))
    workers: int = dataclasses.field(default=WORKERS, metadata=_env("WORKERS"))
    threads: int = dataclasses.field(default=THREADS, metadata=_env("THREADS"))
    basic_auth_user: str = dataclasses.field(default="", metadata=_env("BASIC_AUTH_USER"))
    basic_auth_pass: str = dataclasses.field(
        default="", repr=False, metadata=_env("BASIC_AUTH_PASS")
    )
    host: str = dataclasses.field(default=HOST, metadata=_env(ENV_PREFIX + "HOST"))
    port: int = dataclasses.field(default=PORT, metadata=_env(ENV_PREFIX + "PORT"))
    predict_deadline_s: float = dataclasses.field(
        default=PREDICT_DEADLINE_S, metadata=_env(ENV_PREFIX + "PREDICT_DEADLINE_S")
    )
    health_timeout_s: float = dataclasses.field(
        default=HEALTH_TIMEOUT_S, metadata=_env(ENV_PREFIX + "HEALTH_TIMEOUT_S")
    )
    query_field: str = dataclasses.field(
        default=QUERY_FIELD, metadata=_env(ENV_PREFIX + "QUERY_FIELD")
    )
    default_label: str = dataclasses.field(
        default="", metadata=_env(ENV_PREFIX + "DEFAULT_LABEL")
    )
    split_instances: int = dataclasses.field(
        default=0, metadata=_env(ENV_PREFIX + "SPLIT_INSTANCES")
    )
    min_score: float = dataclasses.field(
        default=float("-inf"), metadata=_env(ENV_PREFIX + "MIN_SCORE")
    )
    min_area: int = dataclasses.field(
        default=16, metadata=_env(ENV_PREFIX + "MIN_AREA")
    )
    polygon_tolerance: float = dataclasses.field(
        default=POLYGON_TOLERANCE_PX, metadata=_env(ENV_PREFIX + "POLYGON_TOLERANCE")
    )
    phrase_template: str = dataclasses.field(
        default="", metadata=_env(ENV_PREFIX + "PHRASE_TEMPLATE")
    )
    sentence_template: str = dataclasses.field(
        default="", metadata=_env(ENV_PREFIX + "SENTENCE_TEMPLATE")
    )
    capture: int = dataclasses.field(default=1, metadata=_env(ENV_PREFIX + "CAPTURE"))
    dataset_dir: str = dataclasses.field(
        default="", metadata=_env(ENV_PREFIX + "DATASET_DIR")
    )
    val_percent: int = dataclasses.field(
        default=VAL_PERCENT, metadata=_env(ENV_PREFIX + "VAL_PERCENT")
    )
    capture_backlog: int = dataclasses.field(
        default=CAPTURE_BACKLOG, metadata=_env(ENV_PREFIX + "CAPTURE_BACKLOG")
    )
    capture_reclaim_s: float = dataclasses.field(
        default=CAPTURE_RECLAIM_S, metadata=_env(ENV_PREFIX + "CAPTURE_RECLAIM_S")
    )
    # -- request and capture sizes (issue 18) --
    max_body_mb: int = dataclasses.field(
        default=MAX_BODY_MB, metadata=_env(ENV_PREFIX + "MAX_BODY_MB")
    )
    capture_backlog_mb: int = dataclasses.field(
        default=CAPTURE_BACKLOG_MB, metadata=_env(ENV_PREFIX + "CAPTURE_BACKLOG_MB")
    )
    fetch_max_bytes: int = dataclasses.field(
        default=FETCH_MAX_BYTES, metadata=_env(ENV_PREFIX + "FETCH_MAX_BYTES")
    )
    fetch_max_pixels: int = dataclasses.field(
        default=FETCH_MAX_PIXELS, metadata=_env(ENV_PREFIX + "FETCH_MAX_PIXELS")
    )
    fetch_connect_timeout_s: float = dataclasses.field(
        default=FETCH_CONNECT_TIMEOUT_S, metadata=_env(ENV_PREFIX + "FETCH_CONNECT_TIMEOUT_S")
    )
    fetch_read_timeout_s: float = dataclasses.field(
        default=FETCH_READ_TIMEOUT_S, metadata=_env(ENV_PREFIX + "FETCH_READ_TIMEOUT_S")
    )
    fetch_deadline_s: float = dataclasses.field(
        default=FETCH_DEADLINE_S, metadata=_env(ENV_PREFIX + "FETCH_DEADLINE_S")
    )
    fetch_max_redirects: int = dataclasses.field(
        default=FETCH_MAX_REDIRECTS, metadata=_env(ENV_PREFIX + "FETCH_MAX_REDIRECTS")
    )
    tls_verify: bool | str = dataclasses.field(
        default=True, metadata=_env(ENV_PREFIX + "TLS_VERIFY", _tls_verify)
    )
    allowed_private_hosts: tuple[str, ...] = dataclasses.field(
        default=(), metadata=_env(ENV_PREFIX + "ALLOWED_PRIVATE_HOSTS", _hosts)
    )
    fetch_concurrency: int = dataclasses.field(
        default=0, metadata=_env(ENV_PREFIX + "FETCH_CONCURRENCY")
    )
    fetch_per_host: int = dataclasses.field(
        default=0, metadata=_env(ENV_PREFIX + "FETCH_PER_HOST")
    )
    queue: QueueConfig = dataclasses.field(default_factory=QueueConfig)
    """The job queue's settings (``REDIS_URL`` and the queue's ``LISA_LS_*`` variables)."""

    def __post_init__(self) -> None:
        # Normalise here rather than in from_env, so that configs built in code (tests, `lisa-ls up`) agree.
        object.__setattr__(self, "log_level", self.log_level.upper())
        object.__setattr__(self, "label_studio_url", self.label_studio_url.rstrip("/"))
        if self.log_level not in LOG_LEVELS:
            raise ValueError(f"LOG_LEVEL={self.log_level!r} is not one of {', '.join(LOG_LEVELS)}")
        if self.workers < 1 or self.threads < 1:
            raise ValueError(f"WORKERS ({self.workers}) and THREADS ({self.threads}) must be at least 1")
        if not 0 < self.port < 65536:
            raise ValueError(f"{ENV_PREFIX}PORT={self.port} is not a TCP port")
        if self.predict_deadline_s <= 0 or self.health_timeout_s <= 0:
            raise ValueError(f"{ENV_PREFIX}PREDICT_DEADLINE_S and {ENV_PREFIX}HEALTH_TIMEOUT_S must be positive")
        self.queue.check_deadline(self.predict_deadline_s, f"{ENV_PREFIX}PREDICT_DEADLINE_S")  # > heartbeat TTL
        if not 0 <= self.polygon_tolerance <= MAX_POLYGON_TOLERANCE_PX:
            raise ValueError(f"{ENV_PREFIX}POLYGON_TOLERANCE={self.polygon_tolerance} must be 0-"
                             f"{MAX_POLYGON_TOLERANCE_PX:g} pixels")
        if not 0 <= self.val_percent <= 100:
            raise ValueError(f"{ENV_PREFIX}VAL_PERCENT={self.val_percent} must be 0-100")
        if self.capture_backlog < 1 or self.capture_reclaim_s <= 0:
            raise ValueError(f"{ENV_PREFIX}CAPTURE_BACKLOG and {ENV_PREFIX}CAPTURE_RECLAIM_S must be positive")
        # -- request and capture sizes (issue 18) --
        if not 1 <= self.max_body_mb <= self.capture_backlog_mb:
            raise ValueError(f"{ENV_PREFIX}MAX_BODY_MB={self.max_body_mb} must be at least 1 and at most "
                             f"{ENV_PREFIX}CAPTURE_BACKLOG_MB={self.capture_backlog_mb} (a webhook must fit)")
        self._check_fetch_settings()
        # Only one of the two is almost certainly a typo; serving without auth then would be a silent hole.
        if bool(self.basic_auth_user) != bool(self.basic_auth_pass):
            raise ValueError("set both BASIC_AUTH_USER and BASIC_AUTH_PASS, or neither")

    def _check_fetch_settings(self) -> None:
        sizes = {"FETCH_MAX_BYTES": self.fetch_max_bytes, "FETCH_MAX_PIXELS": self.fetch_max_pixels}
        times = {"FETCH_CONNECT_TIMEOUT_S": self.fetch_connect_timeout_s,
                 "FETCH_READ_TIMEOUT_S": self.fetch_read_timeout_s, "FETCH_DEADLINE_S": self.fetch_deadline_s}
        for name, value in {**sizes, **times}.items():
            if not value > 0 or value == float("inf"):
                raise ValueError(f"{ENV_PREFIX}{name}={value} must be a positive number")
        if self.fetch_max_redirects < 0:
            raise ValueError(f"{ENV_PREFIX}FETCH_MAX_REDIRECTS={self.fetch_max_redirects} must be 0 or more")
        if self.fetch_concurrency < 0 or self.fetch_per_host < 0:
            raise ValueError(f"{ENV_PREFIX}FETCH_CONCURRENCY and {ENV_PREFIX}FETCH_PER_HOST must be 0 (auto) or more")
        if self.fetch_concurrency and self.threads > 1 and self.fetch_concurrency >= self.threads:
            raise ValueError(f"{ENV_PREFIX}FETCH_CONCURRENCY={self.fetch_concurrency} must be below THREADS="
                             f"{self.threads}, so that /health and /webhook always find a thread")

    @property
    def fetch_slots(self) -> int:
        """Image fetches in flight at once in one process (``LISA_LS_FETCH_CONCURRENCY``, else ``THREADS // 2``)."""
        return self.fetch_concurrency or max(1, self.threads // 2)

    @property
    def fetch_waiters(self) -> int:
        """Threads that may wait for a fetch slot at once: what the fetching ones leave, but for an eighth of the
        threads (at least one) kept for ``/health``, ``/webhook`` and requests past their fetch."""
        return max(0, self.threads - self.fetch_slots - max(1, self.threads // 8))

    @property
    def fetch_slots_per_host(self) -> int:
        """The same per image host (``LISA_LS_FETCH_PER_HOST``, else half of :attr:`fetch_slots`), at most that."""
        return min(self.fetch_per_host or max(1, self.fetch_slots // 2), self.fetch_slots)

    @property
    def redis_url(self) -> str:
        """The job queue's Redis URL (``REDIS_URL``)."""
        return self.queue.redis_url

    @property
    def redis_url_redacted(self) -> str:
        """:attr:`redis_url` with any password masked, for logs and ``/health``."""
        return redact_url(self.redis_url)

    @property
    def dataset_root(self) -> str:
        """Where captured datasets live (``LISA_LS_DATASET_DIR``, else ``MODEL_DIR/dataset``)."""
        return self.dataset_dir or os.path.join(self.model_dir, "dataset")

    @property
    def basic_auth(self) -> tuple[str, str] | None:
        """``(user, password)`` when basic auth is on, else ``None``."""
        return (self.basic_auth_user, self.basic_auth_pass) if self.basic_auth_user else None

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: Any) -> BackendConfig:
        """Read every setting from ``environ`` (default ``os.environ``); keyword ``overrides`` win over it.

        Unset or empty variables keep their default.
        """
        env = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for f in dataclasses.fields(cls):
            name = f.metadata.get("env")
            if name is None:
                continue
            raw = env.get(name, "")
            if name == "LABEL_STUDIO_URL" and not raw:
                raw = env.get("LABEL_STUDIO_HOST", "")
            if raw.strip():
                parse = f.metadata.get("parse")
                values[f.name] = (parse(name, raw.strip()) if parse
                                  else parse_env_value(name, raw.strip(), type(f.default)))
        if "queue" not in overrides:
            values["queue"] = QueueConfig.from_env(env)
        values.update(overrides)
        return cls(**values)

    @classmethod
    def variables(cls) -> dict[str, str]:
        """Environment variable name → field name, for every backend setting (the queue's are in QueueConfig)."""
        return {f.metadata["env"]: f.name for f in dataclasses.fields(cls) if "env" in f.metadata}


def redact_url(url: str) -> str:
    """``url`` with the password of its user-info replaced by ``***`` (``redis://:***@host:6379/0``)."""
    try:
        parts = urlsplit(url)
        if parts.password is None:
            return url
        host = parts.hostname or ""
        if ":" in host:  # IPv6 literal: urlsplit strips the brackets
            host = f"[{host}]"
        netloc = f"{parts.username or ''}:***@{host}" + (f":{parts.port}" if parts.port else "")
    except ValueError:  # a malformed URL (bad port, bad IPv6): show nothing of it rather than leak a password
        return "<unparseable URL>"
    return urlunsplit(parts._replace(netloc=netloc))
