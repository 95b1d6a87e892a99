"""``lisa-ls up`` (what ``make run`` starts): embedded Redis, backend and a worker; Ctrl-C stops them all."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import psutil
from redis_fixtures import ROOT, RedisServer, free_port

from model.demo_scope import REAL_LISA_COMMAND
from worker.client.defaults import REDIS_URL
from worker.gpu import up

pytest_plugins = ["sam3_fixtures"]


def health_with(port: int, n_workers: int, timeout: float = 120) -> dict | None:
    """The backend's ``/health`` once it lists ``n_workers`` workers (the last answer after ``timeout``)."""
    health, deadline = None, time.time() + timeout
    while time.time() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                health = json.loads(r.read())
            if len(health["workers"]) >= n_workers:
                break
        except OSError:
            pass
        time.sleep(0.5)
    return health


def test_up_serves_health_with_one_live_worker_and_stops_cleanly(tmp_path):
    port, redis_port = free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if k not in ("REDIS_URL", "MODEL_DIR")}
    proc = subprocess.Popen(
        [sys.executable, "-m", "worker.cli", "up", "--port", str(port), "--redis-port", str(redis_port),
         "--data-dir", str(tmp_path / "data"), "--host", "127.0.0.1", "--device", "cpu"],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        health, deadline = None, time.time() + 90
        while time.time() < deadline:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                    health = json.loads(r.read())
                if health["workers"]:
                    break
            except OSError:
                pass
            time.sleep(0.5)
        assert health and health["status"] == "UP", health
        [worker] = health["workers"]
        assert worker["device"] == "cpu" and worker["model_version"].startswith("models/demo@")  # the demo model
        assert f"(DEMO: coloured shapes only; real LISA: {REAL_LISA_COMMAND})" in worker["model_version"]
        assert health["redis"]["url"] == f"redis://127.0.0.1:{redis_port}/0"
        children = psutil.Process(proc.pid).children(recursive=True)
        assert len(children) >= 3  # redis, backend (+ its gunicorn worker), model worker
        proc.send_signal(signal.SIGINT)
        out = proc.communicate(timeout=60)[0].decode(errors="replace")
        assert proc.returncode == 0, out
        assert "offline DEMO model" in out and f"REDIS_URL=redis://127.0.0.1:{redis_port}/0" in out
        assert f"For real images serve LISA: {REAL_LISA_COMMAND}" in out
        assert not [c for c in children if c.is_running() and c.status() != psutil.STATUS_ZOMBIE]
        assert (tmp_path / "data" / "appendonly.aof").exists() or any((tmp_path / "data").iterdir())
    finally:
        if proc.poll() is None:
            proc.kill()  # its children get SIGTERM through PR_SET_PDEATHSIG (see worker/gpu/up.py)


def test_children_do_not_outlive_a_killed_up(tmp_path):
    port, redis_port = free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if k not in ("REDIS_URL", "MODEL_DIR")}
    proc = subprocess.Popen(
        [sys.executable, "-m", "worker.cli", "up", "--port", str(port), "--redis-port", str(redis_port),
         "--data-dir", str(tmp_path / "data"), "--host", "127.0.0.1", "--device", "cpu"],
        cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 60
    children: list[psutil.Process] = []
    while time.time() < deadline and len(children) < 3:
        children = psutil.Process(proc.pid).children()
        time.sleep(0.2)
    assert len(children) >= 3
    proc.kill()
    proc.wait()
    _, alive = psutil.wait_procs(children, timeout=30)
    assert not alive, [c.cmdline() for c in alive]


def up_refused(tmp_path, redis_port: int) -> str:
    """``lisa-ls up`` with its embedded Redis on ``redis_port``: it must refuse at once; its output."""
    env = {k: v for k, v in os.environ.items() if k not in ("REDIS_URL", "MODEL_DIR")}
    proc = subprocess.run(
        [sys.executable, "-m", "worker.cli", "up", "--port", str(free_port()), "--redis-port", str(redis_port),
         "--data-dir", str(tmp_path / "data"), "--host", "127.0.0.1", "--device", "cpu"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0, proc.stdout
    assert "started worker" not in proc.stdout + proc.stderr  # nothing was started
    return proc.stdout + proc.stderr


def test_the_embedded_redis_stays_off_label_studios_port():
    """Label Studio uses any Redis on localhost:6379 for its background jobs (never run without an RQ worker):
    the embedded Redis defaults elsewhere, to the port the queue's clients look at, and 6379 gets a warning."""
    assert up.REDIS_PORT != up.LABEL_STUDIO_REDIS_PORT == 6379
    assert f"redis://127.0.0.1:{up.REDIS_PORT}/0" == REDIS_URL
    assert up.label_studio_clash(REDIS_URL) is None
    for url in ("redis://127.0.0.1:6379/0", "redis://localhost/1", "redis://:pw@localhost:6379/0"):
        assert "Label Studio" in up.label_studio_clash(url), url
    assert up.label_studio_clash("redis://redis:6379/0") is None  # another machine (docker compose)


def test_a_taken_redis_port_is_refused_with_what_listens_there(tmp_path):
    server = RedisServer(tmp_path)
    server.start()
    try:
        out = up_refused(tmp_path, server.port)
    finally:
        server.stop()
    assert f"a Redis already listens on 127.0.0.1:{server.port}" in out
    assert f"REDIS_URL=redis://127.0.0.1:{server.port}/0" in out and "--redis-port" in out
    with socket.socket() as other:  # not a Redis: a plain listener that says nothing
        other.bind(("127.0.0.1", 0))
        other.listen()
        out = up_refused(tmp_path, other.getsockname()[1])
    assert "is taken by something that is not Redis" in out


def test_up_serves_lisa_and_sam3_side_by_side(tmp_path, sam3_tiny):
    """``--sam3-model`` starts a SAM 3 worker beside the LISA one: ``/health`` lists both with family and version."""
    port, redis_port = free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if k not in ("REDIS_URL", "MODEL_DIR", "SAM3_MODEL_DIR")}
    proc = subprocess.Popen(
        [sys.executable, "-m", "worker.cli", "up", "--port", str(port), "--redis-port", str(redis_port),
         "--data-dir", str(tmp_path / "data"), "--host", "127.0.0.1", "--device", "cpu",
         "--sam3-model", str(sam3_tiny)],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        health = health_with(port, 2)
        assert health and health["status"] == "UP", health
        families = {w["family"]: w for w in health["workers"]}
        assert set(families) == {"lisa", "sam3"}, health["workers"]
        assert families["lisa"]["model_version"].startswith("models/demo@")
        assert families["sam3"]["model_version"] and families["sam3"]["device"] == "cpu"
        proc.send_signal(signal.SIGINT)
        out = proc.communicate(timeout=60)[0].decode(errors="replace")
        assert proc.returncode == 0, out
        assert "started worker-sam3-1" in out
    finally:
        if proc.poll() is None:
            proc.kill()
