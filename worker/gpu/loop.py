"""The worker loop: read batches of jobs, hand them to a batch function, deliver the results. Torch-free.

The GPU model plugs in as the ``handler``: ``handler(jobs) -> results``, one call per batch, where each job carries
its image bytes in ``job.image_bytes`` (unless ``fetch_images=False``, for a handler that finds encoded images in
its own cache and fetches bytes itself through ``loop.queue.get_images``). The loop owns everything else:

- batching: it reads up to B jobs at once, so the jobs that queued while the model was busy form the next batch;
- reliability: it takes over the jobs of a worker as soon as that worker's heartbeat lapses (and, as a fallback,
  any job untouched for the visibility timeout), looking every ``reclaim_interval_s`` and at the moment a
  holder's heartbeat is due to lapse; a worker starting under a dead predecessor's name hands its jobs back first.
  A handler exception hands the jobs back for another delivery (after retrying each job of a failed batch alone,
  so one poison job does not fail its neighbours), and a job that keeps failing reaches the dead-letter stream.
  Nothing a job or a stream entry holds can end the process: an entry that is not a job is dead-lettered when it
  is read, and any other exception in a batch is logged and fails that batch's jobs by the same retry rules;
- liveness: a heartbeat thread publishes host, pid, device, model version and counters, and renews the lease of
  the jobs in hand so that a batch longer than the visibility timeout is not taken from a live worker;
- metrics: after each batch one round trip adds the job latencies and the batch size to counters in Redis
  (:mod:`worker.client.metrics`), which the backend's ``/metrics`` serves; a failure there never fails a job;
- shutdown: SIGTERM or SIGINT finishes the batch in hand, takes nothing new and returns 0 from :meth:`run`
  (a second signal exits at once; the jobs in hand are then reclaimed by other workers);
- Redis outages: every Redis call is retried on the ``worker_backoff_s`` schedule for as long as it takes.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import signal
import socket
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import redis

from worker.client import metrics
from worker.client.connection import CONNECTION_ERRORS, RedisDown, backoff_forever, connect
from worker.client.defaults import MIN_RECLAIM_WAIT_S, QueueConfig
from worker.client.protocol import BAD_INPUT, INTERNAL, Job, Result
from worker.client.queue import JobQueue
from worker.client.queue_client import QueueClient

log = logging.getLogger(__name__)

Handler = Callable[[list[Job]], Sequence[Result]]
"""A batch function: one result per job (matched by ``job_id``, in any order); raising fails the whole batch."""


class WorkerLoop:
    """Serve jobs from ``queue`` with ``handler`` until stopped. See the module docstring for the guarantees.

    ``stats`` is called at each heartbeat, from the heartbeat thread, and its items are published with it (e.g.
    ``{"cache_hit_rate": 0.8}`` from the model's image cache); it must only read. ``batch_size`` defaults to the
    queue's ``config.batch_size``.
    """

    def __init__(
        self,
        queue: JobQueue,
        handler: Handler,
        name: str | None = None,
        *,
        device: str = "cpu",
        model_version: str = "",
        batch_size: int | None = None,
        stats: Callable[[], Mapping[str, Any]] | None = None,
        fetch_images: bool = True,
        split_on_error: bool = True,
    ) -> None:
        self.queue, self.handler, self.config = queue, handler, queue.config
        self.device, self.model_version, self.stats = device, model_version, stats
        self.host, self.pid = socket.gethostname(), os.getpid()
        self.name = name or f"{self.host}:{self.pid}:{device}"
        self.batch_size = batch_size or self.config.batch_size
        self.config.check_timings()  # a worker must not start on timings that would rob it or lose its jobs
        self.fetch_images, self.split_on_error = fetch_images, split_on_error
        read_timeout = queue.redis.connection_pool.connection_kwargs.get("socket_timeout")
        if read_timeout is not None and read_timeout <= self.config.block_ms / 1000:
            raise ValueError(
                f"the Redis client's socket_timeout ({read_timeout} s) must exceed block_ms "
                f"({self.config.block_ms} ms), or every idle read times out; use WorkerLoop.from_url"
            )
        self.batches_served = 0
        self.jobs_served = 0
        self.started = time.time()
        self._stop = threading.Event()
        self._beat_stop = threading.Event()
        self._lock = threading.Lock()
        self._in_hand: list[Job] = []
        self._next_reclaim = 0.0
        self._predecessor_checked = False

    @classmethod
    def from_url(
        cls, handler: Handler, url: str | None = None, config: QueueConfig | None = None, **kwargs: Any
    ) -> WorkerLoop:
        """A loop on a fresh connection whose read timeout suits the blocking reads of a worker."""
        config = config or QueueConfig.from_env()
        client = connect(url, config, socket_timeout=config.block_ms / 1000 + config.socket_timeout_s)
        return cls(JobQueue(client, config), handler, **kwargs)

    # ---- lifecycle ----

    def run(self, install_signals: bool = True) -> int:
        """Serve until :meth:`stop` or a signal; returns the process exit code (0 after a clean drain)."""
        previous = {}
        if install_signals and threading.current_thread() is threading.main_thread():
            previous = {sig: signal.signal(sig, self._on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
        log.info(
            "worker %s serving %s (device %s, batch %d)",
            self.name,
            self.config.job_stream,
            self.device,
            self.batch_size,
        )
        self._beat()
        beater = threading.Thread(target=self._beat_loop, name=f"heartbeat-{self.name}", daemon=True)
        beater.start()
        delays = None
        try:
            while not self._stop.is_set():
                try:
                    self.serve_once()
                    delays = None
                except Exception as exc:
                    if not isinstance(exc, (RedisDown, *CONNECTION_ERRORS)):
                        # e.g. Redis out of memory, or a bug outside any batch (a model switch that fails).
                        # Reloading the model costs minutes, so log and back off rather than crash; a failure
                        # inside a batch has already handed that batch's jobs back (_serve).
                        log.exception("worker %s: unexpected error", self.name)
                    delays = delays or backoff_forever(self.config.worker_backoff_s)
                    self._pause(exc, next(delays))
        finally:
            self._beat_stop.set()
            beater.join(timeout=self.config.socket_timeout_s * 2)
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            try:
                self.queue.unregister(self.name)
            except Exception as exc:  # best effort: the heartbeat expires anyway
                log.warning("could not unregister worker %s: %s", self.name, exc)
        log.info("worker %s stopped after %d batches, %d jobs", self.name, self.batches_served, self.jobs_served)
        return 0

    def stop(self) -> None:
        """Ask the loop to finish the batch in hand and return; takes no new jobs from now on."""
        self._stop.set()

    def _on_signal(self, signum: int, _frame: Any) -> None:
        if self._stop.is_set():
            log.warning("second signal %d: exiting now; jobs in hand will be reclaimed by other workers", signum)
            raise SystemExit(128 + signum)
        log.info("signal %d: finishing the current batch, then exiting", signum)
        self._stop.set()

    def _pause(self, exc: BaseException, delay: float) -> None:
        log.warning("worker %s: %s: %s; retrying in %.2f s", self.name, type(exc).__name__, exc, delay)
        self._stop.wait(delay)

    # ---- one iteration ----

    def serve_once(self) -> int:
        """Reclaim stale jobs when due, read new ones up to B, and serve them as one batch; returns how many."""
        switch = getattr(self.handler, "maybe_switch", None)
        if switch is not None:
            # Between batches only, so no batch ever mixes two model versions.
            version = switch(self.queue)
            if version and version != self.model_version:
                log.info("worker %s now serves model version %s", self.name, version)
                self.model_version = version
                self._beat()
        if not self._predecessor_checked:
            handed = self.queue.hand_back_own(self.name)
            if handed:
                log.warning("worker %s: %d jobs held under this name by a dead predecessor go back to the queue",
                            self.name, handed)
            self._predecessor_checked = True
        jobs: list[Job] = []
        if time.monotonic() >= self._next_reclaim:
            jobs, lapse_s = self.queue.reclaim_round(self.name, self.batch_size)
            wait_s = self.config.reclaim_interval_s
            if lapse_s is not None:  # look again the moment a holder's heartbeat lapses
                wait_s = min(wait_s, max(lapse_s, MIN_RECLAIM_WAIT_S))
            self._next_reclaim = time.monotonic() + wait_s
        if len(jobs) < self.batch_size and not self._stop.is_set():
            # Do not block when reclaimed jobs are already waiting to run, nor past the next reclaim.
            until_ms = math.ceil((self._next_reclaim - time.monotonic()) * 1000)
            block = 0 if jobs else max(1, min(self.config.block_ms, until_ms))
            jobs += self.queue.consume(self.name, self.batch_size - len(jobs), block_ms=block)
        if jobs:
            self._serve(jobs)
        return len(jobs)

    def _serve(self, jobs: list[Job]) -> None:
        with self._lock:
            self._in_hand = list(jobs)
        try:
            if self.fetch_images:
                jobs = self._attach_images(jobs)
            answered = self._handle(jobs)
            delivered = []  # (latency, outcome) of the results that reached their waiter, for worker.client.metrics
            for job, result in answered:
                try:
                    if not self._deliver(job, result):
                        continue
                except (RedisDown, redis.RedisError):
                    raise
                except Exception as exc:  # e.g. a result that cannot be encoded: this job fails, not its batch
                    self._fail(jobs=[job], exc=exc, what=f"the result of job {job.id}")
                    continue
                outcome = metrics.OUTCOME_OK if result.ok else result.error_code
                delivered.append((time.time() - job.submitted, outcome))
            self.batches_served += 1
            self.jobs_served += len(answered)
            metrics.record_batch(self.queue.redis, self.config, len(jobs), delivered)  # never raises
        except (RedisDown, redis.RedisError) as exc:
            # run() backs off. Hand the unanswered jobs back if Redis still takes a call, or, since this worker
            # keeps its heartbeat, they would wait for the visibility timeout.
            with contextlib.suppress(Exception):
                self.queue.release(self.name, jobs, f"Redis failed mid-batch: {type(exc).__name__}: {exc}")
            raise
        except Exception as exc:  # not the handler's own failure (_handle deals with that), e.g. a bug of ours
            self._fail(jobs, exc, f"a batch of {len(jobs)}")
        finally:
            with self._lock:
                self._in_hand = []

    def _fail(self, jobs: list[Job], exc: Exception, what: str) -> None:
        """Fail jobs by the usual rules (another delivery, then the dead-letter stream with ``exc`` as the cause)
        after an unexpected exception, rather than the process; jobs already answered are left alone."""
        log.exception("worker %s: %s failed outside the model", self.name, what, exc_info=exc)
        self.queue.release(self.name, jobs, f"{type(exc).__name__}: {exc}")
        self._next_reclaim = 0.0  # retry now rather than at the next scheduled reclaim

    def _attach_images(self, jobs: list[Job]) -> list[Job]:
        """Give each job its image bytes; answer jobs whose image is gone with ``bad_input`` right away."""
        images = self.queue.get_images(job.image for job in jobs)
        ready = []
        for job in jobs:
            job.image_bytes = images.get(job.image)
            if job.image_bytes is None:
                msg = f"image {job.image[:12]}… is not in Redis (expired after {self.config.image_ttl_s} s?)"
                self._deliver(job, Result.error(job.id, BAD_INPUT, msg, worker=self.name))
            else:
                ready.append(job)
        return ready

    def _handle(self, jobs: list[Job]) -> list[tuple[Job, Result]]:
        """Run the handler; on an exception isolate the failing jobs and hand them back for another delivery."""
        if not jobs:
            return []
        start_wall, start = time.time(), time.perf_counter()
        try:
            results = list(self.handler(jobs))
        except Exception as exc:
            if self.split_on_error and len(jobs) > 1:
                log.warning("batch of %d failed (%s: %s); retrying each job alone", len(jobs), type(exc).__name__, exc)
                return [pair for job in jobs for pair in self._handle([job])]
            log.exception("handler failed on job %s (attempt %d)", jobs[0].id, jobs[0].attempts)
            self.queue.release(self.name, jobs, f"{type(exc).__name__}: {exc}")
            self._next_reclaim = 0.0  # retry now rather than at the next scheduled reclaim
            return []
        elapsed = time.perf_counter() - start
        by_id = {result.job_id: result for result in results}
        pairs = []
        for job in jobs:
            result = by_id.get(job.id) or Result.error(job.id, INTERNAL, "the model returned no result for this job")
            result.timings.setdefault("queue_s", max(0.0, start_wall - job.submitted))
            result.timings.setdefault("batch_s", elapsed)
            result.worker = result.worker or self.name
            result.model_version = result.model_version or self.model_version
            pairs.append((job, result))
        return pairs

    def _deliver(self, job: Job, result: Result) -> bool:
        """Complete a job, retrying through a Redis outage until its deadline (after that nobody is waiting)."""
        delays = backoff_forever(self.config.worker_backoff_s)
        while True:
            try:
                return self.queue.complete(job, result)
            except RedisDown as exc:
                if job.expired():
                    raise
                delay = min(next(delays), max(job.remaining(), 0.0))
                log.warning("worker %s: cannot deliver job %s (%s); retrying in %.2f s", self.name, job.id, exc, delay)
                time.sleep(delay)  # not self._stop.wait: a draining worker still owes this answer

    # ---- heartbeat ----

    def info(self) -> dict[str, Any]:
        """What the heartbeat publishes; ``/health`` lists it for each live worker."""
        with self._lock:
            busy = bool(self._in_hand)
        state = "draining" if self._stop.is_set() else "busy" if busy else "idle"
        info: dict[str, Any] = {
            "name": self.name,
            "host": self.host,
            "pid": self.pid,
            "device": self.device,
            "model_version": self.model_version,
            "batch_size": self.batch_size,
            "started": self.started,
            "last_seen": time.time(),
            "state": state,
            "batches_served": self.batches_served,
            "jobs_served": self.jobs_served,
            "cache_hit_rate": None,  # filled in by the model's stats callback once it has an image cache
        }
        if self.stats is not None:
            info.update(self.stats())
        return info

    def _beat(self) -> None:
        try:
            self.queue.heartbeat(self.name, self.info())
            with self._lock:
                live = [job for job in self._in_hand if not job.expired()]
            if live:
                self.queue.extend(self.name, live)
        except Exception as exc:  # a missed beat must not kill the worker
            log.debug("heartbeat of %s failed: %s", self.name, exc)

    def _beat_loop(self) -> None:
        while not self._beat_stop.wait(self.config.heartbeat_interval_s):
            self._beat()


def live_workers(client: redis.Redis, config: QueueConfig | None = None) -> list[dict[str, Any]]:
    """The heartbeats of live workers (host, pid, device, model version, counters), for ``/health``."""
    return QueueClient(client, config).live_workers()  # the client half: no worker scripts to register


def queue_stats(client: redis.Redis, config: QueueConfig | None = None) -> dict[str, int]:
    """Queue depth, in-flight, queued and dead-letter counts, for ``/metrics``."""
    return QueueClient(client, config).stats()
