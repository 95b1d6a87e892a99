"""Serving metrics that workers write to Redis and the backend's ``/metrics`` reads back. Torch-free.

Workers run on other machines than the backend, so an in-process Prometheus registry in a worker could not be
scraped through the backend. Instead each worker adds its observations to shared Redis hashes, and the backend
turns them into Prometheus histograms and counters at scrape time. Keys, built by ``config.key`` (so
``{lisa}:metrics:jobs`` by default, in the queue's hash-tag slot):

=====================  ==========================================================================================
``metrics:latency_s``  histogram of job latency: submission (``job.submitted``) to the result being delivered
``metrics:batch_size`` histogram of the number of jobs handed to the model in one call
``metrics:jobs``       counter of delivered results by outcome: ``ok`` or the error code (``internal``, ...)
=====================  ==========================================================================================

A histogram hash holds one field per bucket, named by its upper bound (``repr(float)``, or ``+Inf``), counting the
observations that fell in that bucket alone (not cumulative: one ``HINCRBY`` per observation, whatever its size),
plus ``sum`` and ``count``. The reader accumulates the buckets in bound order; it takes whatever bounds it finds,
so a worker built with other bounds (``worker.client.defaults.LATENCY_BUCKETS_S``) still yields a valid, monotonic
histogram. The hashes never expire: they are counters for the life of the Redis database, summed over all
workers, as Prometheus expects (a Redis flush looks like a counter reset, which Prometheus handles).

Writing is one transaction per batch (one round trip) and never raises: a metric lost to a Redis hiccup must not
fail, delay or re-run a job whose result was already delivered.
"""

from __future__ import annotations

import bisect
import dataclasses
import logging
import math
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import redis

from worker.client.defaults import BATCH_SIZE_BUCKETS, LATENCY_BUCKETS_S, QueueConfig

log = logging.getLogger(__name__)

LATENCY_KEY = "metrics:latency_s"
"""Hash (the kind given to ``config.key``) of the job latency histogram, in seconds."""
BATCH_SIZE_KEY = "metrics:batch_size"
"""Hash (the kind given to ``config.key``) of the batch size histogram."""
JOBS_KEY = "metrics:jobs"
"""Hash (the kind given to ``config.key``) counting delivered results by outcome."""

INF_FIELD = "+Inf"
SUM_FIELD = "sum"
COUNT_FIELD = "count"
OUTCOME_OK = "ok"
"""The outcome of a successful result; failed results count under their error code."""


def bucket_field(value: float, bounds: Sequence[float]) -> str:
    """The hash field of the bucket ``value`` falls in: the smallest bound ``>= value`` (Prometheus' ``le``)."""
    i = bisect.bisect_left(bounds, value)
    return repr(float(bounds[i])) if i < len(bounds) else INF_FIELD


def _add_histogram(pipe: Any, key: str, values: Sequence[float], bounds: Sequence[float]) -> None:
    # One HINCRBY per touched bucket rather than per observation keeps a batch of 64 at a handful of commands.
    for field, n in Counter(bucket_field(v, bounds) for v in values).items():
        pipe.hincrby(key, field, n)
    pipe.hincrbyfloat(key, SUM_FIELD, float(sum(values)))
    pipe.hincrby(key, COUNT_FIELD, len(values))


def record_batch(
    client: redis.Redis,
    config: QueueConfig,
    batch_size: int,
    delivered: Iterable[tuple[float, str]],
    *,
    latency_bounds: Sequence[float] = LATENCY_BUCKETS_S,
    batch_bounds: Sequence[float] = BATCH_SIZE_BUCKETS,
) -> bool:
    """Add one served batch to the shared metrics; returns whether it was recorded. Never raises.

    ``batch_size`` is the number of jobs handed to the model (0: nothing reached it, no batch is recorded);
    ``delivered`` holds ``(latency_s, outcome)`` for each result this worker delivered, where the outcome is
    ``"ok"`` or the result's error code.
    """
    delivered = list(delivered)
    if batch_size <= 0 and not delivered:
        return True
    try:
        pipe = client.pipeline(transaction=True)  # MULTI/EXEC: a scrape never sees half a batch
        if batch_size > 0:
            _add_histogram(pipe, config.key(BATCH_SIZE_KEY), [batch_size], batch_bounds)
        if delivered:
            _add_histogram(pipe, config.key(LATENCY_KEY), [max(0.0, lat) for lat, _ in delivered], latency_bounds)
            for outcome, n in Counter(outcome for _, outcome in delivered).items():
                pipe.hincrby(config.key(JOBS_KEY), outcome or "unknown", n)
        pipe.execute()
        return True
    except Exception as exc:  # metrics are best effort by design; see the module docstring
        log.warning("could not record metrics of a batch of %d: %s: %s", batch_size, type(exc).__name__, exc)
        return False


@dataclasses.dataclass(frozen=True)
class Histogram:
    """A histogram read back from Redis: cumulative ``(upper bound, count)`` pairs ending with ``+inf``."""

    buckets: list[tuple[float, int]]
    sum: float
    count: int

    @classmethod
    def from_hash(cls, raw: Mapping[Any, Any]) -> Histogram:
        """Build from a histogram hash as ``HGETALL`` returns it (bytes or str keys and values)."""
        per_bucket: dict[float, int] = {}
        total_sum = 0.0
        for key, value in raw.items():
            name = key.decode() if isinstance(key, bytes) else str(key)
            text = value.decode() if isinstance(value, bytes) else str(value)
            if name == SUM_FIELD:
                total_sum = float(text)
            elif name != COUNT_FIELD:
                try:
                    bound = float(name)  # float("+Inf") is inf
                except ValueError:
                    continue  # a field this version does not know: ignore rather than break the scrape
                per_bucket[bound] = per_bucket.get(bound, 0) + int(text)
        per_bucket.setdefault(math.inf, 0)
        cumulative, running = [], 0
        for bound in sorted(per_bucket):
            running += per_bucket[bound]
            cumulative.append((bound, running))
        # The count is the +Inf bucket by construction, so the exposition is consistent even if the stored
        # ``count`` field was written by a buggy or older worker.
        return cls(buckets=cumulative, sum=total_sum, count=running)


@dataclasses.dataclass(frozen=True)
class ServingMetrics:
    """Everything workers recorded: the two histograms and the results delivered by outcome."""

    latency_s: Histogram
    batch_size: Histogram
    jobs: dict[str, int]


def read_metrics(client: redis.Redis, config: QueueConfig) -> ServingMetrics:
    """Read the shared metrics in one round trip. Raises redis-py's errors (the caller reports Redis as down)."""
    pipe = client.pipeline(transaction=False)
    for key in (LATENCY_KEY, BATCH_SIZE_KEY, JOBS_KEY):
        pipe.hgetall(config.key(key))
    latency, batch, jobs = pipe.execute()
    return ServingMetrics(
        latency_s=Histogram.from_hash(latency),
        batch_size=Histogram.from_hash(batch),
        jobs={(k.decode() if isinstance(k, bytes) else str(k)): int(v) for k, v in jobs.items()},
    )
