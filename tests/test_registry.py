"""The model registry's Redis calls go through the queue's retries (issue 16, item 6, the worker part)."""

from __future__ import annotations

import socket
import threading
from pathlib import Path

import pytest
from redis_fixtures import RedisServer

from worker.client import registry
from worker.client.connection import RedisDown, connect
from worker.client.defaults import QueueConfig
from worker.client.queue import JobQueue

pytest_plugins = ["redis_fixtures"]


def _restart_soon(server: RedisServer) -> threading.Timer:
    """Stop Redis now and start it again (empty: no persistence) a moment later, as a Redis restart does."""
    server.stop()
    restart = threading.Timer(0.3, server.start)
    restart.start()
    return restart


def test_registry_calls_ride_out_a_redis_restart(tmp_path: Path) -> None:
    server = RedisServer(tmp_path)
    server.start()
    restarts: list[threading.Timer] = []
    try:
        cfg = QueueConfig(redis_url=server.url, redis_down_after_s=20.0)  # a generous budget: starts vary in time
        q = JobQueue(connect(config=cfg), cfg)
        registry.promote(q, "v0", "/models/base", None, {})  # connected once, so the restart breaks a connection
        restarts.append(_restart_soon(server))
        registry.promote(q, "v1", "/models/base", "/runs/7/adapter", {"giou": 0.6})  # retried until Redis is back
        restarts[-1].join()
        assert registry.current(q)["adapter"] == "/runs/7/adapter"
        assert [e["version"] for e in registry.history(q)] == ["v1"]
        restarts.append(_restart_soon(server))
        assert registry.current(q) is None  # retried, then read from the restarted (empty) Redis
    finally:
        for restart in restarts:
            restart.join()
        server.stop()


def test_registry_reports_redis_down() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]  # closed again: connections are refused
    cfg = QueueConfig(redis_url=f"redis://127.0.0.1:{port}/0")
    q = JobQueue(connect(config=cfg), cfg)
    for call in (lambda: registry.current(q), lambda: registry.promote(q, "v", "/b", None, {})):
        with pytest.raises(RedisDown, match="registry"):  # the queue's answer, naming the call
            call()
    assert registry.history(q) == []  # informational: an unreachable Redis reads as no history
