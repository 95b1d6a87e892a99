"""Two ``lisa-ls worker`` processes on one Redis: both show in ``/health`` and the jobs spread over both.

Each worker is the real command (the tiny fixture LISA on CPU), started from its own temporary working directory
with its own ``--device`` and ``--name``, as two GPU processes of one deployment would be. Redis runs as a
one-node cluster (``RedisServer(cluster=True)``), which refuses any script call, ``MGET`` or transaction whose keys
span slots, so the run also shows that the queue works on Redis Cluster (``tests/test_cluster_keys.py``).
"""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import CHECKPOINT, CLIP_TOWER
from PIL import Image
from redis_fixtures import ROOT, RedisServer, config_env, make_config, wait_for

from backend.app import create_app
from backend.config import BackendConfig
from worker.client.connection import connect
from worker.client.protocol import Job
from worker.client.queue import JobQueue

pytestmark = pytest.mark.slow

WORKERS = {"w-a": "cpu:0", "w-b": "cpu:1"}
JOBS = 12


def lisa_ls() -> list[str]:
    """The installed ``lisa-ls`` command of this interpreter's environment (else its module)."""
    script = Path(sys.executable).with_name("lisa-ls")
    return [str(script)] if script.exists() else [sys.executable, "-m", "worker.cli"]


def png(rng: np.random.Generator) -> bytes:
    pixels = rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="PNG")
    return out.getvalue()


def test_two_workers_from_separate_directories_share_the_jobs(tmp_path: Path) -> None:
    started = time.monotonic()
    server = RedisServer(tmp_path, cluster=True)
    server.start()
    config = make_config(
        server.url,
        batch_size=2,
        job_deadline_s=60.0,
        result_ttl_s=300,
        visibility_timeout_s=30.0,
        heartbeat_interval_s=0.5,
        heartbeat_ttl_s=10.0,
    )
    # One thread each: two workers on a small machine would otherwise fight over every core.
    env = {**os.environ, **config_env(config), "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    procs: dict[str, subprocess.Popen[bytes]] = {}
    app = create_app(BackendConfig(queue=config))
    queue = JobQueue(connect(config=config), config)
    try:
        for name, device in WORKERS.items():
            cwd = tmp_path / name
            cwd.mkdir()
            argv = [
                *lisa_ls(),
                "worker",
                "--model",
                str(CHECKPOINT),
                "--vision-tower",
                str(CLIP_TOWER),
                "--device",
                device,
                "--name",
                name,
                "--model-version",
                "tiny-two",
            ]
            with open(tmp_path / f"{name}.log", "wb") as log:
                procs[name] = subprocess.Popen(argv, cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT)

        health = app.test_client()
        body = wait_for(
            lambda: (b := health.get("/health").get_json())["status"] == "UP" and len(b["workers"]) == 2 and b,
            timeout=60,
            what="/health to list both workers",
        )
        assert {w["name"] for w in body["workers"]} == set(WORKERS)
        assert {w["pid"] for w in body["workers"]} == {p.pid for p in procs.values()}
        assert body["model_versions"] == ["tiny-two"] and body["queue"]["depth"] == 0
        for name, proc in procs.items():  # each really runs from its own directory
            assert os.readlink(f"/proc/{proc.pid}/cwd") == str(tmp_path / name)
        ready = time.monotonic()

        rng = np.random.default_rng(0)
        jobs = [
            Job(image=queue.put_image(png(rng)), query="What is the red object?", answer="Sure, [SEG].")
            for _ in range(JOBS)
        ]
        queue.submit_many(jobs)  # all at once: each idle worker's blocked read takes a batch of two
        results = [queue.wait(job, timeout=60) for job in jobs]
        assert all(r.ok for r in results), [r.error_message for r in results if not r.ok]
        served = {name: sum(r.worker == name for r in results) for name in WORKERS}
        print(f"workers up in {ready - started:.1f} s, {JOBS} jobs in {time.monotonic() - ready:.1f} s: {served}")
        assert sum(served.values()) == JOBS and min(served.values()) >= 1, served
        assert {r.model_version for r in results} == {"tiny-two"}

        body = health.get("/health").get_json()
        counted = {w["name"]: w["jobs_served"] for w in body["workers"]}
        wait_for(
            lambda: {w["name"]: w["jobs_served"] for w in queue.live_workers()} == served,
            timeout=5,
            what=f"the heartbeats to count {served} (last /health: {counted})",
        )

        for proc in procs.values():
            proc.send_signal(signal.SIGTERM)
        assert [proc.wait(timeout=30) for proc in procs.values()] == [0, 0]
        assert queue.live_workers() == []  # both unregistered on the way out
    finally:
        for name, proc in procs.items():
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=10)
            print(f"--- log of {name} (exit {proc.returncode}) ---")
            print((tmp_path / f"{name}.log").read_text(errors="replace")[-3000:])
        app.extensions["lisa_ls"].close()
        queue.redis.close()
        server.stop()
