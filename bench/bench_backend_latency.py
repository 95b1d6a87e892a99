"""How fast the backend answers the two calls Label Studio gives 1 s: ``/webhook`` and ``/health``.

    .venv/bin/python bench/bench_backend_latency.py        # ~1 minute on 2 cores; its own Redis, backend, worker

1. ``/webhook``: 120 annotation events (4 tasks, brush + query) posted by 8 threads to one backend; Label Studio
   waits 1 s for the answer. The backend stores the event in Redis and answers; capture runs later.
2. ``/health`` while 50 interactive ``/predict`` calls wait for the one CPU worker (the tiny fixture LISA, one job at
   a time): Label Studio's health check gives up after 1 s (``ML_TIMEOUT_HEALTH``).

Prints median / p95 / max and the ratio of Label Studio's limit to the max (> 1: within the limit). These were
timing assertions in tests/test_capture.py and tests/test_backend_predict.py; tests there now check the same
behaviour by events (answered while the work is still queued), and the seconds are measured here.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import requests

ROOT = Path(__file__).resolve().parent.parent
for path in (ROOT, ROOT / "tests"):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

from fake_ls import TOKEN, FakeLabelStudio, Project, brush, textarea  # noqa: E402 - tests/ helpers, path above
from redis_fixtures import RedisServer, config_env, free_port, make_config  # noqa: E402

from backend.labeling import RECOMMENDED_CONFIG  # noqa: E402

FIXTURE = ROOT / "tests" / "fixtures" / "lisa_tiny"
LS_LIMIT_S = 1.0  # Label Studio's webhook wait and ML_TIMEOUT_HEALTH


def start(args: list[str], env: dict[str, str], log: Path) -> subprocess.Popen:
    with open(log, "wb") as out:
        return subprocess.Popen([sys.executable, *args], env=env, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT)


def wait_up(url: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            requests.get(url + "/health", timeout=1)
            return
        except requests.RequestException:
            time.sleep(0.1)
    raise SystemExit(f"the backend at {url} did not answer within {timeout:.0f} s")


def summary(name: str, seconds: list[float]) -> None:
    s = np.sort(np.asarray(seconds))
    print(f"{name}: n {len(s)}, median {np.median(s) * 1e3:.1f} ms, p95 {np.percentile(s, 95) * 1e3:.1f} ms, "
          f"max {s[-1] * 1e3:.1f} ms; Label Studio's limit {LS_LIMIT_S:.0f} s = {LS_LIMIT_S / s[-1]:.1f}x the max",
          flush=True)


def main() -> int:
    work = Path(tempfile.mkdtemp(prefix="bench_backend_"))
    redis_server = RedisServer(work)
    redis_server.start()
    config = make_config(redis_server.url, job_deadline_s=120.0, result_ttl_s=300, visibility_timeout_s=60.0,
                         batch_size=1)
    project = Project()
    for t in range(1, 5):
        project.add_task(t)
    ls = FakeLabelStudio(project)
    port = free_port()
    env = {**os.environ, **config_env(config), "PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / 'tests'}",
           "LABEL_STUDIO_URL": ls.url, "LABEL_STUDIO_API_KEY": TOKEN, "MODEL_DIR": str(work / "model_dir"),
           "LISA_LS_DATASET_DIR": str(work / "datasets")}
    procs = [start(["-m", "backend.cli", "serve", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
                    "--threads", "64"], env, work / "backend.log"),
             start(["-m", "worker.cli", "worker", "--model", str(FIXTURE / "checkpoint"), "--vision-tower",
                    str(FIXTURE / "clip_tower"), "--device", "cpu", "--model-version", "bench"], env,
                   work / "worker.log")]
    url = f"http://127.0.0.1:{port}"
    try:
        wait_up(url)
        rng = np.random.default_rng(0)
        events = []
        for aid in range(1, 121):
            mask = np.zeros((24, 32), dtype=bool)
            mask[rng.integers(0, 12) :, rng.integers(0, 16) :] = True
            events.append(project.annotate(aid, aid % 4 + 1, [textarea(f"thing {aid}"), brush(mask)], aid))

        def post(event: dict) -> float:
            t0 = time.perf_counter()
            r = requests.post(url + "/webhook", json=event, timeout=30)
            r.raise_for_status()
            return time.perf_counter() - t0

        with ThreadPoolExecutor(8) as pool:
            summary("1. /webhook, 8 threads", list(pool.map(post, events)))

        def ask(i: int) -> int:
            context = {"result": [{"id": "q", "from_name": "query", "to_name": "image", "type": "textarea",
                                   "value": {"text": [f"the thing number {i}"]}}]}
            body = {"tasks": [project.tasks[1 + i % 4]], "project": "1.1", "label_config": RECOMMENDED_CONFIG,
                    "params": {"context": context}}
            return requests.post(url + "/predict", json=body, timeout=180).status_code

        times = []
        with ThreadPoolExecutor(50) as pool:
            futures = [pool.submit(ask, i) for i in range(50)]
            time.sleep(0.5)
            while sum(not f.done() for f in futures) > 5:
                t0 = time.perf_counter()
                requests.get(url + "/health", timeout=10).raise_for_status()
                times.append(time.perf_counter() - t0)
                time.sleep(0.2)
        summary("2. /health with 50 /predict calls in flight", times)
    finally:
        for proc in procs:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=30)
        ls.close()
        redis_server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
