"""The client half of the job queue: what the backend needs (images, submit, wait, workers and stats), and the
Redis plumbing both halves share. :class:`worker.client.queue.JobQueue` adds the worker side; see
:mod:`worker.client.queue` for the design. Torch-free."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Self, TypeVar

import redis
from redis.client import Pipeline

from worker.client import scripts
from worker.client.connection import call_with_retry
from worker.client.defaults import DEFAULT_FAMILY, QueueConfig
from worker.client.protocol import BAD_INPUT, BUSY, TIMEOUT, Job, QueueError, Result, image_hash

T = TypeVar("T")


class BusyError(QueueError):
    """The queue is above its bound (backpressure): the jobs were not enqueued; retry later."""

    code = BUSY

    def __init__(self, depth: int, adding: int, bound: int) -> None:
        super().__init__(
            f"queue is busy: {depth} jobs queued or running, adding {adding} would exceed the bound of {bound}; "
            "retry later or start more workers"
        )
        self.depth, self.adding, self.bound = depth, adding, bound


class BadInputError(QueueError):
    """A job cannot be enqueued as given."""

    code = BAD_INPUT


def _s(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)



def _b(value: Any) -> bytes:
    return value if isinstance(value, bytes) else str(value).encode()



class QueueClient:
    """The client operations on one queue. Thread-safe as far as the redis-py client is.

    Pass a client made by :func:`worker.client.connection.connect`: the 2 s "Redis is down" answer relies on its short
    timeouts and on redis-py's own retries being off.
    """

    def __init__(self, client: redis.Redis, config: QueueConfig | None = None) -> None:
        self.redis = client
        self.config = config or QueueConfig.from_env()
        timeout = client.connection_pool.connection_kwargs.get("socket_timeout")
        self._attempt_s = float(timeout) if timeout else self.config.socket_timeout_s
        self._submit = client.register_script(scripts.SUBMIT)

    def for_family(self, family: str) -> Self:
        """This queue on ``family``'s streams, sharing the Redis client (``ValueError`` for an unknown family)."""
        if family == self.config.family:
            return self
        return type(self)(self.redis, self.config.for_family(family))

    def key(self, kind: str, name: str = "") -> str:
        """The Redis key of ``kind`` (``img``, ``res``, ``done``, ``err``, ``worker``, ``workers``); see
        :meth:`QueueConfig.key <worker.client.defaults.QueueConfig.key>`."""
        return self.config.key(kind, name)

    def call(self, fn: Callable[[], T], what: str) -> T:
        """Run one Redis call ``fn`` with retries of a lost connection; raises ``RedisDown`` past the budget."""
        cfg = self.config
        return call_with_retry(
            fn, budget_s=cfg.redis_down_after_s, backoff_s=cfg.client_backoff_s, attempt_s=self._attempt_s, what=what
        )

    def pipeline(
        self, build: Callable[[Pipeline], Any], what: str, *, transaction: bool = False, raise_on_error: bool = True
    ) -> list[Any]:
        """Run the commands ``build`` queues as one round trip; a retry rebuilds them (``execute`` clears them)."""

        def run() -> list[Any]:
            pipe = self.redis.pipeline(transaction=transaction)
            build(pipe)
            return pipe.execute(raise_on_error=raise_on_error)

        return self.call(run, what)


    def put_image(self, data: bytes) -> str:
        """Store image bytes under their content hash (once) and return the hash; a reuse only refreshes the TTL.

        The bytes cross the network only when Redis does not have them: ``EXPIRE`` on an existing key answers 1.
        """
        digest = image_hash(data)
        key, ttl = self.key("img", digest), self.config.image_ttl_s
        self.call(lambda: self.redis.expire(key, ttl) or self.redis.set(key, data, ex=ttl, nx=True), "put_image")
        return digest

    def get_images(self, digests: Iterable[str]) -> dict[str, bytes | None]:
        """Fetch image bytes by hash in one round trip; ``None`` for an image that expired or was never stored."""
        unique = list(dict.fromkeys(digests))
        if not unique:
            return {}
        values = self.call(lambda: self.redis.mget([self.key("img", d) for d in unique]), "get_images")
        return dict(zip(unique, values))

    def submit(self, job: Job) -> str:
        """Enqueue one job and return its id at once; raises :class:`BusyError` above the bound."""
        return self.submit_many([job])[0]

    def submit_many(self, jobs: Sequence[Job]) -> list[str]:
        """Enqueue jobs all-or-none (one round trip) and return their ids; fills in missing deadlines.

        Raises :class:`BusyError` if they do not all fit under ``max_queue_length`` (chunk big pre-label runs), and
        :class:`BadInputError` for a batch that could never fit.
        """
        if not jobs:
            return []
        if len(jobs) > self.config.max_queue_length:
            raise BadInputError(f"{len(jobs)} jobs can never fit a queue bounded at {self.config.max_queue_length}")
        now = time.time()
        args: list[Any] = [self.config.max_queue_length, len(jobs)]
        for job in jobs:
            if job.deadline is None:
                job.deadline = now + self.config.job_deadline_s
            fields = job.to_fields()
            args.append(2 * len(fields))
            for name, value in fields.items():
                args += [name, value]
        reply = self.call(lambda: self._submit(keys=[self.config.job_stream], args=args), "submit")
        if not reply[0]:
            raise BusyError(int(reply[1]), len(jobs), self.config.max_queue_length)
        for job, entry_id in zip(jobs, reply[2:]):
            job.entry_id = _s(entry_id)
        return [job.id for job in jobs]

    def wait(self, job: Job | str, timeout: float | None = None) -> Result:
        """Block until the job's result arrives; a ``timeout`` error result once ``timeout`` or the deadline passes.

        A timed-out waiter marks the job answered, so a worker finishing it later is dropped and the job is never
        answered twice. Raises :class:`~worker.client.connection.RedisDown` when Redis is unreachable.
        """
        job_id = job.id if isinstance(job, Job) else job
        limit = self.config.job_deadline_s if timeout is None else timeout
        if isinstance(job, Job):
            limit = min(limit, job.remaining())
        end, res_key = time.monotonic() + limit, self.key("res", job_id)
        while (left := end - time.monotonic()) > 0.01:  # BLPOP rounds to ms, and 0 would mean "for ever"
            slice_s = min(left, self.config.wait_slice_s)
            popped = self.call(lambda s=slice_s: self.redis.blpop([res_key], timeout=s), "wait")
            if popped:
                return Result.from_bytes(popped[1])
        claimed = self.call(
            lambda: self.redis.set(self.key("done", job_id), "timeout", nx=True, ex=self.config.result_ttl_s), "wait"
        )
        if not claimed:  # a worker answered between our last pop and the claim: that answer wins
            late = self.call(lambda: self.redis.lpop(res_key), "wait")
            if late:
                return Result.from_bytes(late)
        return Result.error(
            job_id,
            TIMEOUT,
            f"no result within {max(limit, 0):.1f} s: the job's deadline passed while it was queued "
            "or running (workers overloaded, too few, or down)",
        )

    def live_workers(self, family: str | None = None) -> list[dict[str, Any]]:
        """Heartbeats of the workers seen within ``heartbeat_ttl_s``, oldest registration first; with ``family``,
        only that family's (a heartbeat naming none is :data:`~worker.client.defaults.DEFAULT_FAMILY`'s)."""
        names = self.call(lambda: self.redis.zrange(self.key("workers"), 0, -1), "live_workers")
        if not names:
            return []
        beats = self.pipeline(lambda p: [p.hgetall(self.key("worker", _s(n))) for n in names], "live_workers")
        live, gone = [], []
        for name, beat in zip(names, beats):
            if beat:
                live.append({_s(k): json.loads(v) for k, v in beat.items()})
            else:
                gone.append(name)
        if gone:  # the hash expired: the worker died without unregistering
            self.call(lambda: self.redis.zrem(self.key("workers"), *gone), "live_workers")
        if family is not None:
            live = [w for w in live if (w.get("family") or DEFAULT_FAMILY) == family]
        return sorted(live, key=lambda w: w.get("started", 0))

    def stats(self) -> dict[str, int]:
        """Queue depth (queued + in flight), in-flight (pending), queued, dead-letter count and the bound."""

        def build(pipe: Pipeline) -> None:
            pipe.xlen(self.config.job_stream)
            pipe.xpending(self.config.job_stream, self.config.consumer_group)
            pipe.xlen(self.config.dead_letter_stream)

        depth, pending, dead = self.pipeline(build, "stats", raise_on_error=False)
        in_flight = 0 if isinstance(pending, Exception) else int(pending["pending"])  # no group yet: none
        return {
            "depth": int(depth),
            "pending": in_flight,
            "queued": int(depth) - in_flight,
            "dead_letter": int(dead),
            "max_queue_length": self.config.max_queue_length,
        }

