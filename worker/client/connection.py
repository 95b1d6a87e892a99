"""Redis connections that fail fast, and the retry-with-backoff loops around them.

redis-py's own default retries a lost connection ten times with backoff, which can keep a caller waiting for
many seconds while Redis is down. The issue asks that the backend's answers say "Redis is down" within 2 s, so
clients made by :func:`connect` have redis-py's retries switched off and short socket timeouts, and every queue
call runs through :func:`call_with_retry`, which retries lost connections on an explicit backoff schedule but
never past a time budget (``REDIS_DOWN_AFTER_S``), then raises :class:`RedisDown`. Workers use the same calls and
wrap them in their own unbounded :func:`backoff_forever` schedule: a worker should outlive a Redis restart.
"""

from __future__ import annotations

import itertools
import logging
import time
from collections.abc import Callable, Iterator, Sequence
from typing import TypeVar

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from worker.client.defaults import QueueConfig
from worker.client.protocol import REDIS_DOWN, QueueError

log = logging.getLogger(__name__)

T = TypeVar("T")

# What a lost or unreachable Redis raises. BusyLoadingError (Redis replaying its AOF after a restart) is a
# ConnectionError subclass, so a Redis that is coming back is retried too.
CONNECTION_ERRORS: tuple[type[BaseException], ...] = (redis.ConnectionError, redis.TimeoutError)


class RedisDown(QueueError):
    """Redis could not be reached within the retry budget."""

    code = REDIS_DOWN


def connect(
    url: str | None = None, config: QueueConfig | None = None, *, socket_timeout: float | None = None
) -> redis.Redis:
    """A Redis client for the queue: bytes responses, short timeouts, no hidden retries.

    ``socket_timeout`` overrides ``config.socket_timeout_s``; workers pass a longer one because their blocking
    reads legitimately wait up to ``block_ms``.
    """
    config = config or QueueConfig.from_env()
    return redis.Redis.from_url(
        url or config.redis_url,
        socket_connect_timeout=config.connect_timeout_s,
        socket_timeout=config.socket_timeout_s if socket_timeout is None else socket_timeout,
        retry=Retry(NoBackoff(), 0),
        health_check_interval=0,
    )


def call_with_retry(
    fn: Callable[[], T], *, budget_s: float, backoff_s: Sequence[float], attempt_s: float, what: str = "redis call"
) -> T:
    """Run ``fn``, retrying lost connections with ``backoff_s`` sleeps while the whole call fits in ``budget_s``.

    ``attempt_s`` is how long one more attempt may take (the socket timeout): a retry starts only if it can end
    within the budget, so the call returns or raises :class:`RedisDown` within ``budget_s`` of starting.
    """
    start = time.monotonic()
    delays = itertools.chain(backoff_s, itertools.repeat(backoff_s[-1]))
    attempt = 0
    while True:
        attempt += 1
        try:
            return fn()
        except CONNECTION_ERRORS as exc:
            delay = next(delays)
            elapsed = time.monotonic() - start
            if elapsed + delay + attempt_s > budget_s:
                raise RedisDown(
                    f"Redis is unreachable ({type(exc).__name__}: {exc}); gave up on {what} after {attempt} "
                    f"attempt(s) in {elapsed:.2f} s"
                ) from exc
            time.sleep(delay)


def backoff_forever(schedule: Sequence[float]) -> Iterator[float]:
    """The sleeps of an unbounded retry: ``schedule`` once, then its last value for ever."""
    return itertools.chain(schedule, itertools.repeat(schedule[-1]))
