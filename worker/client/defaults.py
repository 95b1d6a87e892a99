"""Every timeout, TTL and bound of the job queue, in one place.

Each constant is the documented default; :class:`QueueConfig` gathers them and :meth:`QueueConfig.from_env`
is the one place where environment overrides are read. The override for a field is ``LISA_LS_<FIELD>``
(upper case), e.g. ``LISA_LS_BATCH_SIZE=4`` or ``LISA_LS_VISIBILITY_TIMEOUT_S=30``; tuples are comma-separated
(``LISA_LS_WORKER_BACKOFF_S=0.1,1,5``). The Redis URL is read from plain ``REDIS_URL``, the name every
Redis-backed tool (and the docker compose file) uses.

This module imports only the standard library, so the backend can read the same settings without torch.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from typing import Any

REDIS_URL = "redis://127.0.0.1:6390/0"
"""Where the queue lives unless ``REDIS_URL`` says otherwise (``lisa-ls up`` starts its embedded Redis there).

Not Redis's usual 6379 on purpose: Label Studio (django-rq) hands its background jobs to whatever Redis answers on
localhost:6379, and ``label-studio start`` runs no RQ worker, so with our Redis there its jobs would silently never
run (see ``worker/gpu/up.py``)."""

ENV_PREFIX = "LISA_LS_"
"""Prefix of the environment variables that override the fields of :class:`QueueConfig`."""

KEY_PREFIX = "lisa:"
"""Namespace of every Redis key the queue writes, so that several deployments can share one Redis.

:meth:`QueueConfig.key` turns it into a Redis Cluster hash tag: the default ``lisa:`` gives keys ``{lisa}:<kind>``
(``{lisa}:jobs``, ``{lisa}:res:<job id>``, ...). Cluster hashes only the part between the first ``{`` and the next
``}``, so every key of one deployment lands in one slot, which the Lua scripts, ``MGET`` of images and the
``MULTI``/``EXEC`` pipelines need. A prefix that already holds a hash tag (``app:{lisa}:``) is used as it is.
"""

JOB_STREAM = "jobs"
"""Stream (the ``kind`` of :meth:`QueueConfig.key`) that holds queued and in-flight jobs; finished entries are
deleted."""

DEAD_LETTER_STREAM = "jobs:dead"
"""Stream (the ``kind`` of :meth:`QueueConfig.key`) that keeps jobs which failed ``MAX_ATTEMPTS`` deliveries, with
the cause."""

CONSUMER_GROUP = "lisa-workers"
"""Consumer group every worker joins; each job is delivered to one member at a time."""

BATCH_SIZE = 8
"""B: the most jobs a worker reads at once and hands to the model in one call."""

BLOCK_MS = 1000
"""How long a worker's read blocks waiting for jobs; also bounds how late it notices SIGTERM when idle."""

VISIBILITY_TIMEOUT_S = 60.0
"""A delivered job not finished (nor its lease renewed) for this long is taken over by another worker, whoever
holds it. The fallback: the job of a worker whose heartbeat lapsed is taken over after ``HEARTBEAT_TTL_S`` already
(see :meth:`~worker.client.queue.JobQueue.reclaim`); this one serves holders without a heartbeat, and failed jobs are
handed back by setting their idle time to it."""

RECLAIM_INTERVAL_S = 5.0
"""How often an idle-or-busy worker looks for jobs to take over; sooner when the heartbeat of a worker holding jobs
is about to lapse, so that a dead worker's jobs move the moment its heartbeat expires."""

MIN_RECLAIM_WAIT_S = 0.01
"""Shortest wait between two reclaims when a holder's heartbeat is about to lapse, so that a heartbeat that
expires a little late (Redis expires keys to the millisecond, a busy server later) cannot start a hot loop."""

MAX_ATTEMPTS = 3
"""Deliveries a job gets before it goes to the dead-letter stream and its waiter gets a ``dead_letter`` error."""

IMAGE_TTL_S = 3600
"""Lifetime of stored image bytes, refreshed on every reuse: an annotator asks several queries about one image."""

RESULT_TTL_S = 600
"""Lifetime of an undelivered result and of the "answered" marker; must exceed a job's deadline plus a batch."""

JOB_DEADLINE_S = 90.0
"""Default deadline of a job from submission; below Label Studio's 100 s so its request never times out first."""

MAX_QUEUE_LENGTH = 1000
"""Backpressure bound: jobs queued plus in flight above which ``submit`` refuses with a ``busy`` error."""

DEAD_LETTER_MAXLEN = 10_000
"""Approximate cap of the dead-letter stream so that a poison flood cannot fill Redis."""

HEARTBEAT_INTERVAL_S = 5.0
"""How often a worker refreshes its heartbeat and renews the lease of the jobs it is working on; must be below
``HEARTBEAT_TTL_S``."""

HEARTBEAT_TTL_S = 15.0
"""A worker whose heartbeat is older than this is dead: it is no longer listed as live, and the jobs it holds that
were not touched for this long go to other workers at once. Must lie between ``HEARTBEAT_INTERVAL_S`` and
``VISIBILITY_TIMEOUT_S``, and below every job deadline (``JOB_DEADLINE_S``, the backend's
``LISA_LS_PREDICT_DEADLINE_S``), or a killed worker's jobs could never be answered in time."""

CONNECT_TIMEOUT_S = 0.5
"""TCP connect timeout to Redis; short so that a down Redis is reported quickly."""

SOCKET_TIMEOUT_S = 1.0
"""Read/write timeout of client commands; a hung Redis is reported within about this long."""

REDIS_DOWN_AFTER_S = 1.8
"""Retry budget of a client call: past it the call raises ``RedisDown`` (the issue asks for an answer within 2 s)."""

WAIT_SLICE_S = 0.5
"""A waiter blocks on its result in slices this long, so each slice stays below the socket timeout."""

CLIENT_BACKOFF_S = (0.05, 0.1, 0.2, 0.4)
"""Sleeps between a client's retries of a lost connection (the last one repeats), within ``REDIS_DOWN_AFTER_S``."""

WORKER_BACKOFF_S = (0.1, 0.25, 0.5, 1.0, 2.0, 5.0)
"""Sleeps between a worker's retries while Redis is unreachable; the last one repeats for as long as it takes."""

MAX_DECODED_PIXELS = 64_000_000
"""Largest image (width x height) a worker decodes; larger ones are answered ``bad_input`` from their header.

A worker decodes the images of a batch one at a time and keeps only their fixed-size model inputs (CLIP 224 px,
SAM 1024 px: about 13 MB each), so the decoded pixels in flight per worker are those of one image: at most this
many, whatever the burst. Measured (``bench/bench_decode_memory.py``): 7 PNGs of 62 MP (212 kB each) at once peak
at 0.9 GB of RAM while decoding (1.9 GB when all were decoded first); a burst of more only waits longer."""

CACHE_BYTES = 1 << 30
"""Bytes of encoded images a GPU worker keeps (LISA-7B: ~6 MB per image in bf16, so ~170 images)."""

ANSWER_CACHE_BYTES = 64 << 20
"""Bytes of [SEG] prompts a GPU worker keeps for refinements (LISA-7B: 256 bf16 values, 512 B, per mask: ~100k
answers)."""

MAX_NEW_TOKENS_LIMIT = 512
"""Upper bound on a job's ``max_new_tokens`` option; enough for explanatory answers."""

MODEL_CHECK_INTERVAL_S = 5.0
"""How often a worker looks for a newly promoted version (:mod:`worker.client.registry`)."""

MALFORMED_MAX_FIELDS = 64
"""A stream entry that is not a job is copied to the dead-letter stream with at most this many of its fields..."""

MALFORMED_FIELD_BYTES = 4096
"""...each cut to this many bytes: enough to see what was sent, while a flood of huge junk cannot fill Redis
(a real job's fields are far smaller: the image travels as a hash)."""

LATENCY_BUCKETS_S = (0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 3.0, 5.0, 7.5, 10.0, 15.0, 20.0, 30.0, 45.0, 60.0, 90.0, 120.0)
"""Upper bounds (seconds) of the job latency histogram, submission to delivered result (``worker.client.metrics``).

Dense around 1–10 s, where an interactive LISA query lands (one generation plus a mask decode), and reaching past
the 90 s job deadline so that jobs which only just made it are still told apart from the rest. Fixed, not read from
the environment: every worker must write the same buckets for the sums across workers to mean anything.
"""

BATCH_SIZE_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64)
"""Upper bounds of the batch size histogram (jobs handed to the model in one call); covers B up to 64."""


@dataclasses.dataclass(frozen=True)
class QueueConfig:
    """The queue settings, defaulting to the module constants; see the module docstring for overrides."""

    redis_url: str = REDIS_URL
    key_prefix: str = KEY_PREFIX
    consumer_group: str = CONSUMER_GROUP
    batch_size: int = BATCH_SIZE
    block_ms: int = BLOCK_MS
    visibility_timeout_s: float = VISIBILITY_TIMEOUT_S
    reclaim_interval_s: float = RECLAIM_INTERVAL_S
    max_attempts: int = MAX_ATTEMPTS
    image_ttl_s: int = IMAGE_TTL_S
    result_ttl_s: int = RESULT_TTL_S
    job_deadline_s: float = JOB_DEADLINE_S
    max_queue_length: int = MAX_QUEUE_LENGTH
    dead_letter_maxlen: int = DEAD_LETTER_MAXLEN
    heartbeat_interval_s: float = HEARTBEAT_INTERVAL_S
    heartbeat_ttl_s: float = HEARTBEAT_TTL_S
    connect_timeout_s: float = CONNECT_TIMEOUT_S
    socket_timeout_s: float = SOCKET_TIMEOUT_S
    redis_down_after_s: float = REDIS_DOWN_AFTER_S
    wait_slice_s: float = WAIT_SLICE_S
    client_backoff_s: tuple[float, ...] = CLIENT_BACKOFF_S
    worker_backoff_s: tuple[float, ...] = WORKER_BACKOFF_S
    max_decoded_pixels: int = MAX_DECODED_PIXELS

    def __post_init__(self) -> None:
        # Catch settings that would silently break a guarantee rather than fail later in a worker.
        if self.batch_size < 1 or self.max_attempts < 1 or self.max_queue_length < 1:
            raise ValueError("batch_size, max_attempts and max_queue_length must be at least 1")
        if not self.client_backoff_s or not self.worker_backoff_s:
            raise ValueError("backoff schedules must not be empty")
        if self.wait_slice_s >= self.socket_timeout_s:
            raise ValueError("wait_slice_s must be below socket_timeout_s, or every wait would time out its socket")
        if self.result_ttl_s <= self.job_deadline_s:
            raise ValueError("result_ttl_s must exceed job_deadline_s so a late duplicate result is still dropped")
        if not self.key_prefix.strip(":"):
            raise ValueError("key_prefix must name the deployment (e.g. 'lisa:'): it becomes the keys' hash tag")

    def check_timings(self) -> None:
        """Refuse heartbeat, lease and deadline settings that cannot work together, naming the variables.

        Called where a process starts (:meth:`from_env`, :class:`~worker.gpu.loop.WorkerLoop`) rather than in
        ``__post_init__``: a client or a test may build a config with timings no worker would run under.
        """
        interval, ttl, visibility = self.heartbeat_interval_s, self.heartbeat_ttl_s, self.visibility_timeout_s
        if not 0 < interval < ttl:
            raise ValueError(
                f"{ENV_PREFIX}HEARTBEAT_INTERVAL_S ({interval:g}) must be positive and below "
                f"{ENV_PREFIX}HEARTBEAT_TTL_S ({ttl:g}): otherwise a live worker's heartbeat expires between two "
                "beats and its jobs are taken from it"
            )
        if not ttl < visibility:
            raise ValueError(
                f"{ENV_PREFIX}HEARTBEAT_TTL_S ({ttl:g}) must be below {ENV_PREFIX}VISIBILITY_TIMEOUT_S "
                f"({visibility:g}): a worker counts as dead after the heartbeat TTL, and the visibility timeout is "
                "the later fallback for holders without a heartbeat"
            )
        self.check_deadline(self.job_deadline_s, f"{ENV_PREFIX}JOB_DEADLINE_S")

    def check_deadline(self, deadline_s: float, variable: str) -> None:
        """Refuse a job deadline (``variable`` names its setting) that a killed worker's jobs could never meet."""
        if not deadline_s > self.heartbeat_ttl_s:
            raise ValueError(
                f"{variable} ({deadline_s:g}) must exceed {ENV_PREFIX}HEARTBEAT_TTL_S ({self.heartbeat_ttl_s:g}): "
                "the jobs of a killed worker move to another worker only once its heartbeat has lapsed"
            )

    @property
    def key_tag(self) -> str:
        """The start of every key: ``key_prefix`` as a Redis Cluster hash tag (see :data:`KEY_PREFIX`)."""
        prefix = self.key_prefix.rstrip(":")
        start = prefix.find("{")
        if start >= 0 and prefix.find("}", start + 1) > start + 1:  # a non-empty {tag}: the prefix decides
            return prefix + ":"
        return "{" + prefix + "}:"

    def key(self, kind: str, name: str = "") -> str:
        """The Redis key of ``kind`` (``jobs``, ``img``, ``res``, ``capture:stats``, ...) and optional ``name``.

        The one place keys are built: every key of a deployment starts with :attr:`key_tag`, so all of them hash
        to one Redis Cluster slot and any script or transaction may touch any of them together.
        """
        return f"{self.key_tag}{kind}:{name}" if name else f"{self.key_tag}{kind}"

    @property
    def job_stream(self) -> str:
        """Redis key of the job stream."""
        return self.key(JOB_STREAM)

    @property
    def dead_letter_stream(self) -> str:
        """Redis key of the dead-letter stream."""
        return self.key(DEAD_LETTER_STREAM)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: Any) -> QueueConfig:
        """Build a config from ``REDIS_URL`` and ``LISA_LS_*`` variables; keyword ``overrides`` win over both.

        Raises ``ValueError`` naming the variable for a bad value or for timings that cannot work together
        (:meth:`check_timings`).
        """
        env = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        if env.get("REDIS_URL"):
            values["redis_url"] = env["REDIS_URL"]
        for f in dataclasses.fields(cls):
            raw = env.get(ENV_PREFIX + f.name.upper())
            if raw is None or raw == "":
                continue
            values[f.name] = parse_env_value(ENV_PREFIX + f.name.upper(), raw, type(f.default))
        values.update(overrides)
        config = cls(**values)
        config.check_timings()
        return config


def parse_env_value(variable: str, raw: str, kind: type) -> Any:
    """Convert one environment string to ``kind`` (int, float, tuple of floats or str); a bad value raises
    ``ValueError`` naming the variable (shared with ``backend.config``)."""
    try:
        if kind is tuple:
            return tuple(float(part) for part in raw.split(",") if part.strip())
        if kind is int:
            return int(raw)
        if kind is float:
            return float(raw)
        return raw
    except ValueError as exc:
        raise ValueError(f"{variable}={raw!r} is not a valid {kind.__name__}") from exc
