"""``/health``, ``/metrics`` and ``/versions``: what the backend knows about the queue and the workers.

Everything here is read from Redis at request time, because the workers run in other processes, often on other
machines: their heartbeats (``worker:<name>`` hashes, see :mod:`worker.client.queue`), the queue's stream lengths, and
the counters they add after each batch (:mod:`worker.client.metrics`). Reads go through the state's fast-failing client
(:func:`backend.state.status_config`), so each endpoint answers within about ``health_timeout_s`` plus a few
milliseconds even when Redis is down or hung.

``/health`` always answers HTTP 200 with a JSON body, because Label Studio only looks at the status code and
marks the backend disconnected otherwise; the body says what is wrong:

- ``DOWN``: Redis is unreachable (or answers with errors), so no prediction can be queued;
- ``DEGRADED``: Redis is fine but no worker is serving (none alive, or all draining), or the queue is full;
- ``UP``: at least one live worker and room in the queue.

``/metrics`` is Prometheus' text exposition format, rendered with ``prometheus_client`` from a snapshot taken per
scrape (no process-local state, so any number of gunicorn processes give the same answer).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Iterator
from typing import Any

import redis
from flask import Blueprint, Response, jsonify
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    InfoMetricFamily,
    Metric,
)
from prometheus_client.utils import floatToGoString

from backend.config import MODEL_CLASS
from backend.errors import json_error
from backend.state import BackendState, current_state
from worker.client.connection import RedisDown, call_with_retry
from worker.client.defaults import DEFAULT_FAMILY, FAMILY_NAMES
from worker.client.metrics import Histogram, ServingMetrics, read_metrics

log = logging.getLogger(__name__)

UP, DEGRADED, DOWN = "UP", "DEGRADED", "DOWN"
NO_WORKERS = "no live workers"

bp = Blueprint("status", __name__)


@dataclasses.dataclass
class Snapshot:
    """One reading of Redis: ``error`` is set (and the rest empty) when it could not be read."""

    workers: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    queue: dict[str, int] | None = None
    #: Each other family's queue stats (``queue`` is the default family's, as before there were several).
    family_queues: dict[str, dict[str, int]] = dataclasses.field(default_factory=dict)
    metrics: ServingMetrics | None = None
    error: str | None = None
    elapsed_s: float = 0.0

    @property
    def redis_ok(self) -> bool:
        return self.error is None

    @property
    def serving(self) -> list[dict[str, Any]]:
        """Live workers that take new jobs (a draining worker finishes its batch and exits)."""
        return [w for w in self.workers if w.get("state") != "draining"]

    @property
    def versions(self) -> list[str]:
        """Model versions served by live workers, sorted, without duplicates."""
        return sorted({str(w["model_version"]) for w in self.serving if w.get("model_version")})

    def families(self) -> dict[str, dict[str, Any]]:
        """Per model family: its name, live workers taking jobs, the versions they serve and its queue."""
        out = {}
        for family, name in FAMILY_NAMES.items():
            serving = [w for w in self.serving if (w.get("family") or DEFAULT_FAMILY) == family]
            out[family] = {"name": name, "workers": len(serving),
                           "model_versions": sorted({str(w["model_version"]) for w in serving
                                                     if w.get("model_version")}),
                           "queue": self.queue if family == DEFAULT_FAMILY else self.family_queues.get(family)}
        return out


def take_snapshot(state: BackendState, *, with_metrics: bool = False) -> Snapshot:
    """Read workers and queue stats (and the serving metrics) from Redis; never raises for Redis trouble."""
    sq, start = state.status_queue, time.monotonic()
    snap = Snapshot()
    try:
        snap.workers = sq.live_workers()
        snap.queue = sq.stats()
        snap.family_queues = {f: sq.for_family(f).stats() for f in FAMILY_NAMES if f != DEFAULT_FAMILY}
        if with_metrics:
            cfg = sq.config
            snap.metrics = call_with_retry(
                lambda: read_metrics(sq.redis, cfg),
                budget_s=cfg.redis_down_after_s,
                backoff_s=cfg.client_backoff_s,
                attempt_s=cfg.socket_timeout_s,
                what="read_metrics",
            )
    except RedisDown as exc:
        cause = exc.__cause__ or exc  # the connection error, without the retry bookkeeping around it
        snap = Snapshot(
            error=f"Redis is unreachable at {state.config.redis_url_redacted}: {type(cause).__name__}: {cause}"
        )
    except redis.RedisError as exc:  # reachable but refusing: wrong password, out of memory, wrong key types
        snap = Snapshot(
            error=f"Redis at {state.config.redis_url_redacted} answered with an error: {type(exc).__name__}: {exc}"
        )
    except Exception as exc:  # e.g. a corrupt heartbeat; /health must still answer, so report instead of raise
        log.exception("reading the queue status failed")
        snap = Snapshot(error=f"could not read the queue status from Redis: {type(exc).__name__}: {exc}")
    snap.elapsed_s = time.monotonic() - start
    return snap


def health_status(snap: Snapshot) -> tuple[str, str | None]:
    """``(status, reason)`` for a snapshot; see the module docstring for the rules."""
    if not snap.redis_ok:
        return DOWN, snap.error
    if not snap.serving:
        draining = len(snap.workers)
        return DEGRADED, NO_WORKERS + (f" ({draining} draining)" if draining else "")
    queue = snap.queue or {}
    if queue.get("depth", 0) >= queue.get("max_queue_length", float("inf")):
        return DEGRADED, (
            f"queue is full ({queue['depth']} jobs queued or running, bound {queue['max_queue_length']}): "
            "new predictions are refused until workers catch up"
        )
    return UP, None


def health_body(state: BackendState, snap: Snapshot) -> dict[str, Any]:
    """The ``/health`` JSON."""
    status, reason = health_status(snap)
    now = time.time()
    workers = [{**w, "seen_s_ago": round(max(0.0, now - float(w.get("last_seen") or now)), 3)} for w in snap.workers]
    return {
        "status": status,
        "model_class": MODEL_CLASS,
        "reason": reason,
        "workers": workers,
        "queue": snap.queue,
        "model_versions": snap.versions,
        "families": snap.families() if snap.redis_ok else {},
        "redis": {"url": state.config.redis_url_redacted, "reachable": snap.redis_ok},
        "image_fetches": state.fetch_gate.snapshot(),  # this process's; "busy" answers start at the bounds
        "elapsed_ms": round(snap.elapsed_s * 1000, 1),
    }


@bp.get("/")
@bp.get("/health")
def health() -> Response:
    """Liveness and readiness in one: always 200, the body says UP, DEGRADED or DOWN and why."""
    state = current_state()
    return jsonify(health_body(state, take_snapshot(state)))


@bp.get("/versions")
def versions() -> Response | tuple[Response, int]:
    """The model versions live workers serve (Label Studio's model-version dropdown)."""
    snap = take_snapshot(current_state())
    if not snap.redis_ok:
        return json_error(503, snap.error or "Redis is unreachable")
    return jsonify({"versions": snap.versions})


@bp.get("/metrics")
def metrics() -> Response:
    """Prometheus text exposition of the queue, the workers and the serving histograms."""
    collector = SnapshotCollector(take_snapshot(current_state(), with_metrics=True))
    return Response(generate_latest(collector), mimetype=CONTENT_TYPE_LATEST)


def _histogram(name: str, doc: str, hist: Histogram) -> HistogramMetricFamily:
    buckets = [(floatToGoString(bound), float(count)) for bound, count in hist.buckets]
    return HistogramMetricFamily(name, doc, buckets=buckets, sum_value=hist.sum)


class SnapshotCollector:
    """A ``prometheus_client`` collector over one snapshot (``generate_latest`` only needs ``collect``)."""

    def __init__(self, snap: Snapshot) -> None:
        self.snap = snap

    def collect(self) -> Iterator[Metric]:
        snap = self.snap
        yield GaugeMetricFamily("lisa_ls_redis_up", "1 if the queue's Redis answered this scrape", value=snap.redis_ok)
        yield GaugeMetricFamily(
            "lisa_ls_status_read_seconds", "Time this scrape spent reading Redis", value=snap.elapsed_s
        )
        if not snap.redis_ok:
            return  # absent series, not zeros: "unknown" must not look like "idle" on a dashboard
        queue = snap.queue or {}
        for key, doc in (
            ("depth", "Jobs queued or running (the quantity the backpressure bound limits)"),
            ("pending", "Jobs delivered to a worker and not finished"),
            ("queued", "Jobs waiting for a worker"),
            ("max_queue_length", "Backpressure bound: above it new jobs are refused as busy"),
        ):
            yield GaugeMetricFamily(f"lisa_ls_queue_{key}", doc, value=queue.get(key, 0))
        yield GaugeMetricFamily(
            "lisa_ls_dead_letter_jobs", "Jobs in the dead-letter stream", value=queue.get("dead_letter", 0)
        )
        yield GaugeMetricFamily("lisa_ls_live_workers", "Workers with a fresh heartbeat", value=len(snap.workers))
        yield from self._workers()
        if snap.metrics is not None:
            m = snap.metrics
            yield _histogram(
                "lisa_ls_job_latency_seconds", "Job latency from submission to delivered result", m.latency_s
            )
            yield _histogram("lisa_ls_batch_size", "Jobs handed to the model in one call", m.batch_size)
            jobs = CounterMetricFamily("lisa_ls_jobs", "Results delivered by workers, by outcome", labels=["outcome"])
            for outcome, count in sorted(m.jobs.items()):
                jobs.add_metric([outcome], count)
            yield jobs

    def _workers(self) -> Iterator[Metric]:
        info = InfoMetricFamily(
            "lisa_ls_worker", "A live worker", labels=["worker", "host", "pid", "device", "model_version", "state"]
        )
        hit = GaugeMetricFamily(
            "lisa_ls_worker_cache_hit_rate", "Share of images found in the worker's image cache", labels=["worker"]
        )
        batches = CounterMetricFamily(
            "lisa_ls_worker_batches", "Batches served since the worker started", labels=["worker"]
        )
        served = CounterMetricFamily("lisa_ls_worker_jobs", "Jobs served since the worker started", labels=["worker"])
        for w in self.snap.workers:
            name = str(w.get("name", ""))
            labels = [str(w.get(k, "")) for k in ("host", "pid", "device", "model_version", "state")]
            info.add_metric([name, *labels], {})
            if isinstance(w.get("cache_hit_rate"), (int, float)):  # None until the worker has a cache
                hit.add_metric([name], float(w["cache_hit_rate"]))
            batches.add_metric([name], float(w.get("batches_served") or 0))
            served.add_metric([name], float(w.get("jobs_served") or 0))
        yield from (info, hit, batches, served)
