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

import numpy as np
import psutil
import requests
from fake_ls import TOKEN, FakeLabelStudio, Project, brush, textarea
from redis_fixtures import ROOT, RedisServer, free_port, wait_for

from model.defaults import MODEL_ENV, SAM3_MODEL_ENV
from model.demo import DEMO_DIR
from model.demo_scope import REAL_LISA_COMMAND
from worker.cli import build_parser
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
    env = {k: v for k, v in os.environ.items() if k not in ("REDIS_URL", "MODEL_DIR", MODEL_ENV)}
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
    env = {k: v for k, v in os.environ.items() if k not in ("REDIS_URL", "MODEL_DIR", MODEL_ENV)}
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
    env = {k: v for k, v in os.environ.items() if k not in ("REDIS_URL", "MODEL_DIR", MODEL_ENV)}
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


def test_model_dir_is_the_backends_data_folder_and_never_the_model(tmp_path):
    """Label Studio's ML backends read ``MODEL_DIR`` as the backend's data folder, and so does ours; ``up`` hands
    the backend and the workers one environment, so with ``MODEL_DIR`` set the workers still serve the demo model
    (before, they tried to load ``MODEL_DIR`` as one), and an annotation captured at ``/webhook`` lands under it."""
    project = Project()
    project.add_task(1)
    ls = FakeLabelStudio(project)
    model_dir = tmp_path / "md"
    port, redis_port = free_port(), free_port()
    env = {**{k: v for k, v in os.environ.items() if k not in ("REDIS_URL", MODEL_ENV, "LISA_LS_DATASET_DIR")},
           "MODEL_DIR": str(model_dir), "LABEL_STUDIO_URL": ls.url, "LABEL_STUDIO_API_KEY": TOKEN}
    proc = subprocess.Popen(
        [sys.executable, "-m", "worker.cli", "up", "--port", str(port), "--redis-port", str(redis_port),
         "--data-dir", str(tmp_path / "data"), "--host", "127.0.0.1", "--device", "cpu"],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        def one_worker() -> bool:
            try:
                return bool(requests.get(f"{url}/health", timeout=2).json()["workers"])
            except (OSError, ValueError):
                time.sleep(0.3)  # not listening yet
                return proc.poll() is not None  # up died: the assertions below say how
        wait_for(one_worker, 120, "a live worker in /health")
        assert proc.poll() is None, proc.communicate()[0].decode(errors="replace")
        [worker] = requests.get(f"{url}/health", timeout=2).json()["workers"]
        assert worker["model_version"].startswith("models/demo@"), worker  # not MODEL_DIR
        mask = np.zeros((24, 32), bool)
        mask[4:12, 6:20] = True
        event = project.annotate(1, 1, [textarea("the red square"), brush(mask)], minute=1)
        answer = requests.post(f"{url}/webhook", json=event, timeout=10)
        assert answer.status_code == 200, answer.text
        record = model_dir / "dataset" / "project-1" / "samples" / "ls-1-1.json"
        wait_for(record.exists, 60, f"the captured sample in {record}")
        assert json.loads(record.read_text())["queries"] == ["the red square"]
        proc.send_signal(signal.SIGINT)
        out = proc.communicate(timeout=60)[0].decode(errors="replace")
        assert proc.returncode == 0, out
        assert f"MODEL_DIR={model_dir} is the backend's data folder, not a model" in out
        assert "Traceback" not in out
    finally:
        if proc.poll() is None:
            proc.kill()
        ls.close()


def test_lisa_ls_model_names_the_model_and_model_dir_does_not(monkeypatch, caplog):
    """``LISA_LS_MODEL`` is ``--model``'s default for ``worker``, ``up`` and ``segment`` (so ``worker`` runs without
    ``--model``); ``MODEL_DIR`` alone leaves ``up`` on the demo model and says why in the log."""
    monkeypatch.delenv(MODEL_ENV, raising=False)
    monkeypatch.setenv("MODEL_DIR", "/srv/lisa-data")
    assert build_parser().parse_args(["up"]).model is None
    with caplog.at_level("WARNING", logger="lisa-ls.up"):
        assert up.served_model(None) == str(DEMO_DIR)
    assert "MODEL_DIR=/srv/lisa-data is the backend's data folder, not a model" in caplog.text
    assert f"no --model or {MODEL_ENV} given" in caplog.text
    monkeypatch.setenv(MODEL_ENV, "xinlai/LISA-7B-v1")
    for command in (["worker"], ["up"], ["segment", "--image", "x.png", "--query", "q", "--output", "o.npz"]):
        assert build_parser().parse_args(command).model == "xinlai/LISA-7B-v1", command
    assert build_parser().parse_args(["worker", "--model", "other"]).model == "other"
    assert up.served_model("xinlai/LISA-7B-v1") == "xinlai/LISA-7B-v1"


def test_up_serves_lisa_and_sam3_side_by_side(tmp_path, sam3_tiny):
    """``--sam3-model`` starts a SAM 3 worker beside the LISA one: ``/health`` lists both with family and version."""
    port, redis_port = free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if k not in ("REDIS_URL", "MODEL_DIR", MODEL_ENV, SAM3_MODEL_ENV)}
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
