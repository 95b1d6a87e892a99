"""Real backend processes for the backend tests: ``python -m backend.cli serve`` (gunicorn, threads) on loopback.

Load with ``pytest_plugins = ["redis_fixtures", "backend_fixtures"]``. :func:`start_backend` starts one backend
against a queue config (the same ``REDIS_URL`` / ``LISA_LS_*`` environment a deployed backend reads) and stops it
after the test; its log is printed then, for failure reports.

PYTEST_DONT_REWRITE: test modules also import helpers from here before pytest loads it as a plugin.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import requests
from redis_fixtures import ROOT, config_env, free_port

from worker.client.defaults import QueueConfig

START_TIMEOUT_S = 20.0


class BackendProcess:
    """One gunicorn-served backend on a free loopback port; ``url`` is its base URL."""

    def __init__(self, config: QueueConfig, log_dir: Path, env: dict[str, str] | None = None, threads: int = 4):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_dir / f"backend-{self.port}.log"
        self.env = {**os.environ, **config_env(config), **(env or {}), "PYTHONPATH": str(ROOT)}
        args = [sys.executable, "-m", "backend.cli", "serve", "--host", "127.0.0.1", "--port", str(self.port)]
        args += ["--workers", "1", "--threads", str(threads)]
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(args, env=self.env, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)

    def wait_ready(self, auth: tuple[str, str] | None = None) -> None:
        """Block until ``/health`` answers (any status); fail with the log if the process dies or hangs."""
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"backend exited with {self.proc.returncode}:\n{self.log()}")
            try:
                requests.get(self.url + "/health", auth=auth, timeout=1)
                return
            except (requests.ConnectionError, requests.Timeout):  # gunicorn listens before its worker has booted
                time.sleep(0.05)
        raise AssertionError(f"backend did not answer within {START_TIMEOUT_S} s:\n{self.log()}")

    def stop(self) -> int | None:
        """SIGTERM (gunicorn's graceful stop), then SIGKILL if it lingers; returns the exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        return self.proc.returncode

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


@pytest.fixture
def start_backend(tmp_path: Path) -> Iterator[Callable[..., BackendProcess]]:
    """``start_backend(config, env=None, auth=None)``: a ready backend process, stopped after the test."""
    started: list[BackendProcess] = []

    def start(config: QueueConfig, env: dict[str, str] | None = None, auth: tuple[str, str] | None = None):
        backend = BackendProcess(config, tmp_path, env)
        started.append(backend)
        backend.wait_ready(auth)
        return backend

    yield start
    for backend in started:
        code = backend.stop()
        print(f"--- log of backend {backend.url} (exit {code}) ---\n{backend.log()}")
