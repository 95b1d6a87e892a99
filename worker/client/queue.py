"""The job queue: a Redis stream read by a consumer group of GPU workers.

Why Streams with a consumer group, rather than rq or plain lists:

- A worker must read up to B jobs at once so that concurrent queries become one model call. ``XREADGROUP COUNT B``
  does that in one round trip; rq hands one job to one (usually forked) work horse, which cannot share a model
  that takes 16 GB of GPU memory, and a list needs B pops (or a Lua loop) per batch.
- A job must survive a worker killed mid-batch. The group's pending entries list (PEL) records, server-side, who
  holds each delivered job, for how long, and how many times it was delivered. Reclaiming is one ``XCLAIM`` with a
  minimum idle time, which is atomic, so two workers reclaiming at once never both get a job; the delivery count
  gives the attempt number for the dead-letter rule for free. The jobs of a worker whose heartbeat lapsed become
  reclaimable at once (:data:`worker.client.scripts.REAP`), any other job after the visibility timeout. With lists
  (``BLMOVE`` to a per-worker processing list) all of that bookkeeping — owners, idle times, counts, scans of
  other workers' lists — would be ours to write and get right.
- It needs nothing beyond redis-py and Redis >= 6.2 (for ``XPENDING ... IDLE``), both in the base install.

Keys, all built by :meth:`~worker.client.defaults.QueueConfig.key`, which starts each with the deployment's Redis
Cluster hash tag (``{lisa}:`` for the default ``key_prefix`` ``lisa:``, so ``{lisa}:jobs``, ``{lisa}:res:<job id>``):

==================  =====================================================================================
``jobs``            stream of queued and in-flight jobs; finished entries are acknowledged *and deleted*,
                    so its length is exactly "queued + in flight", the quantity the backpressure bound limits
``jobs:dead``       stream of dead-lettered jobs, with the cause
``img:<sha256>``    image bytes, stored once per content, TTL refreshed on reuse
``res:<job id>``    list holding the job's one result until the waiter pops it
``done:<job id>``   "answered" marker: the first of (worker result, dead letter, waiter's timeout) sets it,
                    every later answer is dropped — the exactly-once rule
``err:<job id>``    the last handler error, quoted in the dead-letter message
``worker:<name>``   a worker's heartbeat hash (JSON values), expiring after ``heartbeat_ttl_s``
``workers``         sorted set of worker names by last heartbeat, to list live workers without ``SCAN``
==================  =====================================================================================

Others share the tag: ``model:current``/``model:history`` (:mod:`worker.client.registry`), ``metrics:*``
(:mod:`worker.client.metrics`), ``capture*`` (:mod:`backend.capture`), ``project:<id>`` (:mod:`backend.predict`). One
tag means one slot: on Redis Cluster the scripts of :mod:`worker.client.scripts` (which touch only the keys passed in
``KEYS``), the ``MGET`` of images and the ``MULTI``/``EXEC`` pipelines never span slots. It also puts a whole
deployment on one shard, as its single job stream would anyway; a cluster adds failover, not throughput, to one
queue. (:func:`~worker.client.connection.connect` still makes a plain, single-node client: reaching a cluster takes a
cluster-aware proxy in front of it, or a cluster client.)

Semantics: a job is *run* at least once (a reclaimed job may be run twice if its first worker was merely slow) and
*answered* exactly once. Client calls fail with :class:`~worker.client.connection.RedisDown` within
``redis_down_after_s`` when Redis is unreachable; a submit retried after a lost reply may enqueue a job twice,
which the exactly-once rule makes harmless. A stream entry that is not a job is dead-lettered with its cause when
it is read, never handed to a worker.

:class:`JobQueue` is the whole queue; its client half, :class:`worker.client.queue_client.QueueClient`, is what
the backend uses.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
import time
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import redis
from redis.client import Pipeline

from worker.client import scripts
from worker.client.defaults import MALFORMED_FIELD_BYTES, MALFORMED_MAX_FIELDS, QueueConfig
from worker.client.protocol import BAD_INPUT, DEAD_LETTER, MAX_JOB_ID_CHARS, TIMEOUT, Job, Result, clip
from worker.client.queue_client import BadInputError, BusyError, QueueClient, _b, _s
from worker.client.stream import StreamGroup

__all__ = ["BadInputError", "BusyError", "JobQueue", "Reclaimed"]

log = logging.getLogger(__name__)


class Reclaimed(NamedTuple):
    """What :meth:`JobQueue.reclaim_round` took over, and when to look again."""

    jobs: list[Job]
    next_check_s: float | None
    """Seconds until the heartbeat of a worker holding jobs could lapse; ``None`` when no other worker holds any."""


def quarantine_fields(fields: Any) -> dict[bytes, bytes]:
    """What the dead-letter stream keeps of an entry that is not a job: at most ``MALFORMED_MAX_FIELDS`` of its
    fields, names and values cut to ``MALFORMED_FIELD_BYTES``, so that a flood of junk cannot fill Redis."""
    items = fields.items() if isinstance(fields, Mapping) else ()
    return {
        _b(name)[:MALFORMED_FIELD_BYTES]: _b(value)[:MALFORMED_FIELD_BYTES]
        for name, value in itertools.islice(items, MALFORMED_MAX_FIELDS)
    }


def entry_job_id(fields: Mapping[bytes, bytes], entry_id: str) -> str:
    """The job id a malformed entry names, if it names a usable one (its waiter is answered there), else the
    stream entry id."""
    try:
        named = fields.get(b"id", b"").decode()
    except UnicodeDecodeError:
        return entry_id
    return named if 0 < len(named) <= MAX_JOB_ID_CHARS and named.isprintable() else entry_id


class JobQueue(QueueClient):
    """Client and worker operations on one queue (the client half is
    :class:`worker.client.queue_client.QueueClient`)."""

    def __init__(self, client: redis.Redis, config: QueueConfig | None = None) -> None:
        super().__init__(client, config)
        self._finish = client.register_script(scripts.FINISH)
        self._touch = client.register_script(scripts.TOUCH)
        self._prune = client.register_script(scripts.PRUNE)
        self._reap = client.register_script(scripts.REAP)
        self.group = StreamGroup(self, self.config.job_stream, self.config.consumer_group)

    def ensure_group(self) -> None:
        """Create the stream and the consumer group if missing (from the start: earlier jobs are served too)."""
        self.group.ensure()

    def consume(self, consumer: str, count: int | None = None, block_ms: int | None = None) -> list[Job]:
        """Read up to ``count`` new jobs for ``consumer``, blocking up to ``block_ms`` (0: do not block).

        Jobs past their deadline are retired without being returned (their waiter was answered with a timeout).
        """
        cfg = self.config
        block = cfg.block_ms if block_ms is None else block_ms
        entries = self.group.read(consumer, count or cfg.batch_size, block)
        return self._admit(entries, dict.fromkeys((entry_id for entry_id, _fields in entries), 1))

    def reclaim(self, consumer: str, count: int | None = None) -> list[Job]:
        """Take over up to ``count`` jobs whose holder died or went silent; see :meth:`reclaim_round`."""
        return self.reclaim_round(consumer, count).jobs

    def reclaim_round(self, consumer: str, count: int | None = None) -> Reclaimed:
        """Take over up to ``count`` jobs from workers that died, and say when to look again.

        A job is taken over when its holder's heartbeat has lapsed and the job was not touched for the heartbeat
        TTL (a killed worker's jobs move within ``heartbeat_ttl_s`` of its death), or, whoever holds it, when it
        was not touched for the visibility timeout. A live worker is never robbed: it renews its heartbeat and
        the leases of its jobs every heartbeat interval, however long its batch takes.

        Each job comes back with ``attempts`` one higher; one that has already failed ``max_attempts`` deliveries
        goes to the dead-letter stream instead, and its waiter gets a ``dead_letter`` error naming the cause.
        """
        cfg = self.config
        try:
            next_check_s = self._hand_back_lapsed(consumer)
        except redis.ResponseError as exc:
            if "NOGROUP" in str(exc) or "no such key" in str(exc):  # no group or no stream yet: nothing to take
                return Reclaimed([], None)
            raise
        claimed = self.group.reclaim(consumer, count or cfg.batch_size, int(cfg.visibility_timeout_s * 1000))
        return Reclaimed(self._admit(claimed.entries, claimed.deliveries), next_check_s)

    def _hand_back_lapsed(self, consumer: str) -> float | None:
        """Make the jobs of consumers whose heartbeat lapsed reclaimable now (:data:`worker.client.scripts.REAP`).

        Returns the seconds until another holder's heartbeat could lapse (``None``: nobody else holds jobs).
        """
        cfg = self.config
        found = self.call(lambda: self.redis.xinfo_consumers(cfg.job_stream, cfg.consumer_group), "reclaim")
        others = [c for c in found if _s(c["name"]) != consumer]
        if not others:
            return None
        # Names as the raw bytes Redis holds, so that no consumer name, however odd, can break the reclaim.
        names = [c["name"] if isinstance(c["name"], bytes) else str(c["name"]).encode() for c in others]
        beat = (self.key("worker") + ":").encode()
        keys = [cfg.job_stream, *(beat + name for name in names)]
        args: list[Any] = [cfg.consumer_group, int(cfg.heartbeat_ttl_s * 1000), int(cfg.visibility_timeout_s * 1000)]
        args += [cfg.max_queue_length, len(names), *names, *(int(c["idle"]) for c in others)]
        _handed, wake_ms = self.call(lambda: self._reap(keys=keys, args=args), "reclaim")
        return None if int(wake_ms) < 0 else int(wake_ms) / 1000

    def hand_back_own(self, consumer: str) -> int:
        """Make every job the group lists under ``consumer`` reclaimable now; returns how many.

        For a worker that starts under a name a dead predecessor used (``--name``, or a container restarted with
        the same host name and pid): a process that is just starting holds nothing, so whatever the group lists
        under its name was in the hands of the predecessor, and waits for nobody's heartbeat to lapse.
        """
        cfg = self.config
        held = self.group.pending(cfg.max_queue_length, consumer=consumer, what="hand_back_own")
        ids = [p["message_id"] for p in held]
        self.group.hand_back(consumer, ids, int(cfg.visibility_timeout_s * 1000))
        return len(ids)

    def _admit(self, entries: list[tuple[Any, Any]], attempts: Mapping[str, int]) -> list[Job]:
        """Turn stream entries into runnable jobs; answer and retire the malformed, exhausted and expired ones."""
        jobs, now = [], time.time()
        for raw_id, fields in entries:
            entry_id = _s(raw_id)
            try:
                job = Job.from_fields(fields, attempts=attempts[entry_id], entry_id=entry_id)
            except Exception as exc:  # anything that is not a job, whatever it trips over, must not reach a batch
                self._quarantine(entry_id, fields, attempts[entry_id], exc)
                continue
            if job.attempts > self.config.max_attempts:
                self.dead_letter(job)
            elif job.expired(now):
                msg = f"deadline passed {now - (job.deadline or now):.1f} s before a worker could start the job"
                self._retire(job.id, entry_id, Result.error(job.id, TIMEOUT, msg))
            else:
                jobs.append(job)
        return jobs

    def _quarantine(self, entry_id: str, fields: Any, attempts: int, exc: Exception) -> None:
        """Dead-letter a stream entry that is not a job, with the cause, and answer its waiter (if it names one)
        with ``bad_input``: a malformed entry is refused once, never retried, and never crashes a worker."""
        reason = str(exc) if isinstance(exc, ValueError) else f"{type(exc).__name__}: {exc}"
        cause = clip(f"malformed job: {reason}", 500)
        log.warning("stream entry %s is not a job; dead-lettered: %s", entry_id, cause)
        copied = quarantine_fields(fields)
        job_id = entry_job_id(copied, entry_id)
        dead = {**copied, b"cause": cause.encode(), b"attempts": str(attempts).encode(), b"entry": entry_id.encode()}
        self._retire(job_id, entry_id, Result.error(job_id, BAD_INPUT, cause), dead=dead)

    def dead_letter(self, job: Job) -> bool:
        """Move a job to the dead-letter stream and answer its waiter with the cause."""
        last = self.call(lambda: self.redis.get(self.key("err", job.id)), "dead_letter")
        cause = _s(last) if last else "no error recorded (the worker died, hung or lost Redis mid-batch)"
        failed = job.attempts - 1
        msg = f"job failed {failed} of {self.config.max_attempts} allowed deliveries; last error: {cause}"
        fields = {**job.to_fields(), "cause": cause.encode(), "attempts": str(failed).encode()}
        return self._retire(job.id, job.entry_id, Result.error(job.id, DEAD_LETTER, msg), dead=fields)

    def complete(self, job: Job, result: Result) -> bool:
        """Deliver ``result`` and acknowledge the job. Returns ``False`` (and delivers nothing) if it was answered."""
        if result.job_id != job.id:
            raise ValueError(f"result for job {result.job_id} given to complete job {job.id}")
        return self._retire(job.id, job.entry_id, result)

    def _retire(
        self, job_id: str, entry_id: str | None, result: Result, dead: Mapping[Any, bytes] | None = None
    ) -> bool:
        cfg = self.config
        keys = [self.key("done", job_id), self.key("res", job_id), cfg.job_stream, cfg.dead_letter_stream]
        args: list[Any] = [cfg.consumer_group, entry_id or "", result.to_bytes(), cfg.result_ttl_s, result.status]
        args.append(str(cfg.dead_letter_maxlen) if dead is not None else "")
        for name, value in (dead or {}).items():
            args += [name, value]
        return bool(self.call(lambda: self._finish(keys=keys, args=args), "complete"))

    def release(self, consumer: str, jobs: Sequence[Job], error: str) -> int:
        """Give failed jobs back for an immediate retry by any worker (attempts are counted on redelivery).

        ``error`` is remembered so that a job that exhausts its attempts is dead-lettered with its cause. Jobs this
        consumer no longer owns (another worker reclaimed them) are left alone. Returns how many were released.
        """
        return self._touch_entries(consumer, jobs, int(self.config.visibility_timeout_s * 1000), error)

    def extend(self, consumer: str, jobs: Sequence[Job]) -> int:
        """Renew the lease of jobs still being worked on, so a long batch is not reclaimed from a live worker."""
        return self._touch_entries(consumer, jobs, 0, "")

    def _touch_entries(self, consumer: str, jobs: Sequence[Job], idle_ms: int, error: str) -> int:
        owned = [job for job in jobs if job.entry_id]
        if not owned:
            return 0
        keys = [self.config.job_stream, *(self.key("err", job.id) for job in owned)]
        args = [self.config.consumer_group, consumer, idle_ms, error, self.config.result_ttl_s]
        args += [job.entry_id for job in owned]
        return int(self.call(lambda: self._touch(keys=keys, args=args), "touch"))

    def heartbeat(self, name: str, info: Mapping[str, Any]) -> None:
        """Publish a worker's heartbeat (JSON-encoded values) that expires after ``heartbeat_ttl_s``."""
        key, ttl_ms = self.key("worker", name), int(self.config.heartbeat_ttl_s * 1000)
        mapping = {k: json.dumps(v) for k, v in info.items()}

        def build(pipe: Pipeline) -> None:
            pipe.hset(key, mapping=mapping)
            pipe.pexpire(key, ttl_ms)
            pipe.zadd(self.key("workers"), {name: time.time()})

        self.pipeline(build, "heartbeat", transaction=True)

    def unregister(self, name: str) -> None:
        """Remove a stopping worker's heartbeat, and its consumer from the group if it holds no jobs."""
        self.pipeline(lambda p: (p.delete(self.key("worker", name)), p.zrem(self.key("workers"), name)), "unregister")
        with contextlib.suppress(redis.ResponseError):  # no stream or group (Redis restarted): nothing to prune
            self.call(
                lambda: self._prune(keys=[self.config.job_stream], args=[self.config.consumer_group, name]),
                "unregister",
            )
