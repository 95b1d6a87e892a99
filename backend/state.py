"""What every request handler of one app shares: the settings and the Redis clients, built once per app.

Two clients on purpose. ``queue`` has the queue's own timeouts and retry budget (``REDIS_DOWN_AFTER_S``, under
2 s), suited to submitting jobs and waiting for results. ``status_queue`` fails much faster (the whole Redis
budget of a status request is ``health_timeout_s``), because Label Studio gives ``/health`` only 1 s and a
health check that answers late is worse than one that says "Redis is unreachable" in time.

Every handler (``/health`` and the status endpoints, ``/setup``, ``/predict``, ``/webhook``) reaches the state
with :func:`current_state`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import TypeVar

from flask import current_app

from backend.capture import CaptureConsumer
from backend.config import BackendConfig
from backend.fetching import FetchGate
from backend.images import FetchSettings, ImageFetcher
from worker.client.connection import call_with_retry, connect
from worker.client.defaults import QueueConfig
from worker.client.queue import JobQueue

T = TypeVar("T")

EXTENSION = "lisa_ls"
"""Key of the :class:`BackendState` in ``app.extensions``."""


@dataclasses.dataclass
class BackendState:
    """The per-app shared objects. Thread-safe: redis-py clients pool their connections."""

    config: BackendConfig
    queue: JobQueue
    """Client-side job queue for submitting jobs and waiting on results (the queue's normal timeouts)."""
    status_queue: JobQueue
    """The same queue on a fast-failing client, for ``/health``, ``/metrics`` and ``/versions``."""
    fetcher: ImageFetcher
    """Fetches task images (one per process, so its Label Studio access token is shared by all threads)."""
    fetch_gate: FetchGate
    """Bounds the image fetches in flight in this process (:mod:`backend.fetching`)."""
    capture: CaptureConsumer | None = None
    """The thread turning stored webhook events into dataset samples (:mod:`backend.capture`), once started."""

    @classmethod
    def build(cls, config: BackendConfig) -> BackendState:
        """Make the clients; nothing connects until the first command, so this works while Redis is down."""
        fast = status_config(config)
        return cls(
            config=config,
            queue=JobQueue(connect(config=config.queue), config.queue),
            status_queue=JobQueue(connect(config=fast), fast),
            fetcher=ImageFetcher(FetchSettings.from_config(config)),
            fetch_gate=FetchGate(config.fetch_slots, config.fetch_slots_per_host, config.fetch_waiters),
        )

    def start_capture(self) -> None:
        """Start this process's capture thread (each gunicorn process builds its own app, so each gets one)."""
        if self.capture is None:
            self.capture = CaptureConsumer(self.config, self.fetcher)
            self.capture.start()

    def close(self) -> None:
        """Stop the capture thread and release the connection pools (tests create many apps in one process)."""
        if self.capture is not None:
            self.capture.stop()
        self.queue.redis.close()
        self.status_queue.redis.close()


def redis_call(queue: JobQueue, fn: Callable[[], T], what: str) -> T:
    """Run one Redis command of the backend's own (project settings, task memory) as the queue runs its: lost
    connections retried within ``redis_down_after_s``, then :class:`~worker.client.connection.RedisDown` ("Redis is
    unreachable"), never a bare connection error that would surface as an internal error."""
    cfg = queue.config
    return call_with_retry(fn, budget_s=cfg.redis_down_after_s, backoff_s=cfg.client_backoff_s,
                           attempt_s=cfg.socket_timeout_s, what=what)


def status_config(config: BackendConfig) -> QueueConfig:
    """The queue config with timeouts that fit one status request into ``health_timeout_s``.

    Each attempt (connect or read) may take half the budget, so a blackholed or hung Redis is given up on after
    one attempt and a refused connection after two or three quick retries.
    """
    budget = config.health_timeout_s
    return dataclasses.replace(
        config.queue,
        connect_timeout_s=budget / 2,
        socket_timeout_s=budget / 2,
        redis_down_after_s=budget,
        wait_slice_s=min(config.queue.wait_slice_s, budget / 4),  # unused here, but must stay below the timeout
    )


def current_state() -> BackendState:
    """The state of the app handling the current request."""
    return current_app.extensions[EXTENSION]
