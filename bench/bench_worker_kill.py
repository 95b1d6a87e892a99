"""A worker killed with interactive requests in flight: are they all answered, and how soon? (issue 16, item 1)

    .venv/bin/python bench/bench_worker_kill.py [--requests 8] [--kill-after 1.0] [--heir cold|warm|both]

The user's scenario, with the real commands: ``lisa-ls up --workers 0`` (the embedded Redis and the gunicorn
backend; ``up`` stops its whole stack when one of its own workers dies, so the workers are started beside it, as
"more workers" are), one ``lisa-ls worker`` with the tiny checkpoint (``tests/fixtures/lisa_tiny``, CPU), then N
interactive ``/predict`` calls at once (a query in the context, the image as a data: URI), ``kill -9`` of the
worker ``--kill-after`` seconds in (once it holds the jobs), and a new ``lisa-ls worker`` started at once. All
timings are the documented defaults (heartbeat interval 5 s, TTL 15 s, visibility timeout 60 s, ``/predict``
deadline 60 s) unless ``LISA_LS_*`` variables say otherwise.

Two heirs, side by side: a *cold* one, the new process started at the kill as in the issue (its model load
counts), and a *warm* one, started before the requests, frozen (SIGSTOP) and resumed at the kill, which measures
the hand-over itself. For each it prints the answers with a mask, the slowest answer after the kill, the bound the
issue sets (heartbeat TTL + one batch, the batch measured on the same stack before the kill) and their ratio; and
what the visibility timeout alone would have given (60 s = the deadline: the held jobs would time out).
"""

from __future__ import annotations

import argparse
import base64
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import requests

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
from redis_fixtures import free_port  # noqa: E402 - the tests' helpers; the bench folder is not a package

from backend.labeling import RECOMMENDED_CONFIG  # noqa: E402
from worker.client.connection import connect  # noqa: E402
from worker.client.defaults import QueueConfig  # noqa: E402
from worker.client.queue import JobQueue  # noqa: E402

FIXTURE = ROOT / "tests" / "fixtures" / "lisa_tiny"
QUERY = "What is the red object in this image? Please output segmentation mask."  # the tiny model answers [SEG]


def _lisa_ls(*args: str) -> list[str]:
    return [sys.executable, "-m", "worker.cli", *args]


def _worker_argv(name: str) -> list[str]:
    return _lisa_ls("worker", "--model", str(FIXTURE / "checkpoint"), "--vision-tower", str(FIXTURE / "clip_tower"),
                    "--device", "cpu", "--model-version", "tiny-bench", "--name", name)


def _predict(url: str, image_uri: str, n: int) -> tuple[float, int, bool, str]:
    """One interactive call as Label Studio makes it; (finished at, status, got a mask, error text)."""
    body = {"tasks": [{"id": n, "data": {"image": image_uri}}], "project": "1.1700000000",
            "label_config": RECOMMENDED_CONFIG,
            "params": {"context": {"result": [{"id": "q", "from_name": "query", "to_name": "image",
                                                "type": "textarea", "value": {"text": [QUERY]}}]}}}
    r = requests.post(url + "/predict", json=body, timeout=120)
    done = time.monotonic()
    results = r.json().get("results", [{}]) if r.status_code == 200 else [{}]
    regions = results[0].get("result", []) if results else []
    mask = any(region.get("type") == "brushlabels" for region in regions)
    return done, r.status_code, mask, "" if mask else str(results[0].get("error") or r.text[:200])


class Stack:
    """``lisa-ls up --workers 0`` plus worker processes, each logging to its own file."""

    def __init__(self, workdir: Path, env: dict[str, str]) -> None:
        self.workdir, self.env = workdir, env
        self.port, redis_port = free_port(), free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.redis_url = f"redis://127.0.0.1:{redis_port}/0"
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.start("up", _lisa_ls("up", "--workers", "0", "--host", "127.0.0.1", "--port", str(self.port),
                                  "--redis-port", str(redis_port), "--data-dir", str(workdir / "redis"),
                                  "--model", str(FIXTURE / "checkpoint")))
        self.config = QueueConfig.from_env({**env, "REDIS_URL": self.redis_url})
        deadline = time.monotonic() + 60
        while True:
            try:
                requests.get(self.url + "/health", timeout=1)
                break
            except requests.RequestException:
                if time.monotonic() > deadline or self.procs["up"].poll() is not None:
                    raise RuntimeError(f"lisa-ls up did not come up:\n{self.log('up')}") from None
                time.sleep(0.2)
        self.queue = JobQueue(connect(config=self.config), self.config)

    def start(self, name: str, argv: list[str]) -> subprocess.Popen[bytes]:
        with open(self.workdir / f"{name}.log", "wb") as log:
            env = {**self.env, "REDIS_URL": self.redis_url} if name != "up" else self.env
            self.procs[name] = subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
        return self.procs[name]

    def wait_worker(self, name: str, timeout: float = 120) -> float:
        """Block until ``name`` has a heartbeat; returns when (monotonic)."""
        deadline = time.monotonic() + timeout
        while not any(w["name"] == name for w in self.queue.live_workers()):
            if time.monotonic() > deadline or self.procs[name].poll() is not None:
                raise RuntimeError(f"worker {name} did not register:\n{self.log(name)[-3000:]}")
            time.sleep(0.05)
        return time.monotonic()

    def log(self, name: str) -> str:
        return (self.workdir / f"{name}.log").read_text(errors="replace")

    def stop(self) -> None:
        for proc in reversed(list(self.procs.values())):  # workers first, then up (backend, Redis)
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=60)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()


def run(requests_n: int = 8, kill_after_s: float = 1.0, heir: str = "cold", workdir: Path | None = None) -> dict:
    """One kill scenario on a fresh stack; returns what it measured (see the module docstring).

    ``heir="cold"``: the new worker process is started at the kill, as in the issue (its model load counts).
    ``heir="warm"``: it was started (and frozen with SIGSTOP) before the requests and resumes at the kill, so the
    answers measure the hand-over itself, the heartbeat TTL plus a batch.
    """
    workdir = workdir or Path(tempfile.mkdtemp(prefix=f"bench_kill_{heir}_"))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "MODEL_DIR": str(workdir / "backend"), "LOG_LEVEL": "INFO"}
    env.pop("REDIS_URL", None)
    image_uri = "data:image/png;base64," + base64.b64encode((FIXTURE / "cases" / "case1.png").read_bytes()).decode()
    stack = Stack(workdir, env)
    out: dict = {"heir": heir, "requests": requests_n, "heartbeat_ttl_s": stack.config.heartbeat_ttl_s,
                 "visibility_timeout_s": stack.config.visibility_timeout_s}
    try:
        stack.start("w-first", _worker_argv("w-first"))
        stack.wait_worker("w-first")
        with ThreadPoolExecutor(requests_n) as pool:  # one batch on a live worker: the bound's "one batch"
            t0 = time.monotonic()
            warm = list(pool.map(lambda n: _predict(stack.url, image_uri, n), range(requests_n)))
        out["batch_s"] = max(done for done, *_ in warm) - t0
        out["warm_masks"] = sum(mask for _, _, mask, _ in warm)
        if heir == "warm":
            stack.start("w-heir", _worker_argv("w-heir"))
            stack.wait_worker("w-heir")
            stack.procs["w-heir"].send_signal(signal.SIGSTOP)

        with ThreadPoolExecutor(requests_n) as pool:
            sent = time.monotonic()
            futures = [pool.submit(_predict, stack.url, image_uri, 100 + n) for n in range(requests_n)]
            while time.monotonic() - sent < kill_after_s or not stack.queue.stats()["pending"]:
                time.sleep(0.01)
            out["held_at_kill"] = stack.queue.stats()["pending"]
            stack.procs["w-first"].send_signal(signal.SIGKILL)
            killed = time.monotonic()
            if heir == "warm":
                stack.procs["w-heir"].send_signal(signal.SIGCONT)
                out["heir_ready_s"] = 0.0
            else:
                stack.start("w-heir", _worker_argv("w-heir"))
                threading.Thread(target=lambda: out.setdefault("heir_ready_s", stack.wait_worker("w-heir") - killed),
                                 daemon=True).start()
            answers = [f.result() for f in futures]
        out["masks"] = sum(mask for _, _, mask, _ in answers)
        out["errors"] = [err for _, _, mask, err in answers if not mask]
        out["slowest_after_kill_s"] = max(done for done, *_ in answers) - killed
        out["bound_s"] = stack.config.heartbeat_ttl_s + out["batch_s"]
    finally:
        stack.stop()
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=8)
    parser.add_argument("--kill-after", type=float, default=1.0)
    parser.add_argument("--heir", choices=("cold", "warm", "both"), default="both",
                        help="new worker started at the kill (cold), resumed at the kill (warm), or both in turn")
    args = parser.parse_args()
    for heir in ("cold", "warm") if args.heir == "both" else (args.heir,):
        r = run(args.requests, args.kill_after, heir)
        print(f"{heir} heir: {r['masks']} of {r['requests']} answered with a mask after kill -9 "
              f"({r['held_at_kill']} in the killed worker's hands; warm-up {r['warm_masks']} of {r['requests']})")
        print(f"  slowest answer after the kill {r['slowest_after_kill_s']:.1f} s  vs  bound heartbeat TTL "
              f"{r['heartbeat_ttl_s']:.0f} s + one batch {r['batch_s']:.1f} s = {r['bound_s']:.1f} s  "
              f"(ratio {r['slowest_after_kill_s'] / r['bound_s']:.2f}); new worker serving "
              f"{r.get('heir_ready_s', float('nan')):.1f} s after the kill")
        for err in r["errors"]:
            print(f"  not answered with a mask: {err}")
    print(f"the visibility timeout alone would reclaim {r['visibility_timeout_s']:.0f} s after the last lease "
          "renewal: at or past the 60 s /predict deadline")
    return 0


if __name__ == "__main__":
    sys.exit(main())
