"""A refinement click's backend overhead: re-fetching the task's image (before) vs reusing the stored one (after).

Before issue 16 item 9, every click downloaded the task image from Label Studio again, checked it, hashed it and
refreshed it in Redis, only to learn its size and hash. Now the task's memory names the stored bytes and their size,
and a click only renews their lifetime (one ``EXPIRE``). Both paths run in this one process, alternately: the
re-fetch path is the one a click still takes when the memory does not name the image (an old record, the stored
bytes expired, the task's image changed), forced here by clearing the record's ``source`` before each such click.

Set-up: a real ``redis-server`` on loopback, the real backend app (``create_app``, driven through Flask's test
client so that HTTP serving noise stays out), a Label Studio stand-in serving a 12 MP phone-size JPEG over loopback
with token auth (the best case for re-fetching: no network in between), and a zero-cost worker process that answers
each refine job with one full-size mask (so the click's answer, an RLE of 12 MP, costs what a real one does).

The backend's overhead is the click's time minus that of the same refine job submitted straight to the queue (the
worker's share: queue round trip, mask encoding), measured in the same alternating rounds.

Run: ``.venv/bin/python bench/bench_click_overhead.py`` (spawns its own Redis and worker; ~1 min).
"""

from __future__ import annotations

import http.server
import io
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
from bench_queue import start_redis
from PIL import Image

from backend.app import create_app
from backend.config import BackendConfig
from backend.labeling import RECOMMENDED_CONFIG
from backend.refine import TaskMemory
from backend.state import EXTENSION
from worker.client.connection import connect
from worker.client.defaults import QueueConfig
from worker.client.protocol import REFINE, Job, Result
from worker.client.queue import JobQueue
from worker.gpu.loop import WorkerLoop

TOKEN = "0123456789abcdef0123456789abcdef01234567"
WIDTH, HEIGHT = 4032, 3024  # a 12 MP phone photo
REPEATS = 15
PROJECT, TASK = "3", 41


def photo() -> bytes:
    """A JPEG with photo-like content (smooth shading plus grain), so its size and decode cost are realistic."""
    y, x = np.mgrid[0:HEIGHT, 0:WIDTH]
    base = np.stack([x * 255 // WIDTH, y * 255 // HEIGHT, (x + y) * 255 // (WIDTH + HEIGHT)], axis=-1)
    grain = np.random.default_rng(0).integers(-12, 13, base.shape)
    out = io.BytesIO()
    Image.fromarray(np.clip(base + grain, 0, 255).astype(np.uint8)).save(out, "JPEG", quality=90)
    return out.getvalue()


def worker_main() -> int:
    """The zero-cost worker: one full-size mask (a rectangle) per job."""

    def handler(jobs: list[Job]) -> list[Result]:
        results = []
        for job in jobs:
            with Image.open(io.BytesIO(job.image_bytes or b"")) as im:
                width, height = im.size
            mask = np.zeros((1, height, width), dtype=bool)
            mask[0, height // 4 : height // 2, width // 4 : width // 2] = True
            results.append(Result.from_masks(job.id, mask, [0.9]))
        return results

    return WorkerLoop.from_url(handler, config=QueueConfig.from_env(), name="bench", device="cpu").run()


def serve_photo(data: bytes) -> http.server.ThreadingHTTPServer:
    """Label Studio's upload serving: ``/data/upload/1/photo.jpg`` behind ``Authorization: Token``."""

    class Files(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            ok = self.headers.get("Authorization") == f"Token {TOKEN}" and self.path == "/data/upload/1/photo.jpg"
            self.send_response(200 if ok else 404)
            self.send_header("Content-Length", str(len(data) if ok else 0))
            self.end_headers()
            self.wfile.write(data if ok else b"")

        def log_message(self, *args: object) -> None:
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Files)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    return httpd


def main() -> None:
    data = photo()
    with tempfile.TemporaryDirectory() as tmp:
        port = 6400 + os.getpid() % 1000
        redis_proc = start_redis(Path(tmp), port)
        env = {**os.environ, "REDIS_URL": f"redis://127.0.0.1:{port}/0"}
        config = QueueConfig.from_env(env)
        worker = subprocess.Popen([sys.executable, __file__, "--worker"], env=env)
        httpd = serve_photo(data)
        app = create_app(BackendConfig(label_studio_url=f"http://127.0.0.1:{httpd.server_address[1]}",
                                       label_studio_api_key=TOKEN, capture=0, queue=config))
        client, queue = app.test_client(), JobQueue(connect(config=config), config)
        try:
            while not queue.live_workers():
                time.sleep(0.05)
            task = {"id": TASK, "data": {"image": "/data/upload/1/photo.jpg"}}

            def post(result: list[dict]) -> dict:
                body = {"tasks": [task], "project": f"{PROJECT}.1700000000", "label_config": RECOMMENDED_CONFIG,
                        "params": {"context": {"result": result}}}
                reply = client.post("/predict", json=body)
                assert reply.status_code == 200 and "error" not in reply.get_json()["results"][0], reply.get_json()
                return reply.get_json()

            query = {"id": "q", "from_name": "query", "to_name": "image", "type": "textarea",
                     "value": {"text": ["the shaded region"]}}
            click = {"id": "k1", "from_name": "clicks", "to_name": "image", "type": "keypointlabels",
                     "value": {"x": 30.0, "y": 30.0, "keypointlabels": ["Include"]}}
            post([query])  # the text query fetches and stores the image and writes the task's memory
            key = TaskMemory.key(queue, PROJECT, TASK)

            def refetch() -> None:
                record = json.loads(queue.redis.get(key))
                queue.redis.set(key, json.dumps({**record, "source": None}))  # the memory no longer names it
                post([click])

            def reuse() -> None:
                post([click])

            memory = TaskMemory.load(queue, PROJECT, TASK)

            def worker_only() -> None:  # the same refine job straight through the queue: no backend work
                job = Job(image=memory.image or "", kind=REFINE, options={"points": [[1209.6, 907.2, 1]]})
                queue.submit(job)
                assert queue.wait(job, timeout=30).ok

            rounds: dict[str, list[float]] = {"before": [], "after": [], "worker": []}
            for n in range(REPEATS + 2):  # alternating, so all three see the same machine; 2 warm-up rounds
                for name, fn in (("before", refetch), ("after", reuse), ("worker", worker_only)):
                    t0 = time.perf_counter()
                    fn()
                    if n >= 2:
                        rounds[name].append(time.perf_counter() - t0)
            before, after, work = (statistics.median(rounds[k]) for k in ("before", "after", "worker"))
            sizes = (len(data) / 1e6, WIDTH * HEIGHT / 1e6)
        finally:
            app.extensions[EXTENSION].close()
            worker.terminate()
            worker.wait(timeout=30)
            httpd.shutdown()
            redis_proc.terminate()
            redis_proc.wait(timeout=10)
    print(f"a click on a {WIDTH}x{HEIGHT} JPEG ({sizes[0]:.1f} MB, {sizes[1]:.0f} MP) served by Label Studio on "
          f"loopback; zero-cost worker answering a full-size mask; medians of {REPEATS} alternating rounds")
    print(f"{'':34}{'before (re-fetch)':>18}{'after (reuse)':>16}{'ratio':>9}")
    rows = (("click, request to answer", before, after), ("backend overhead (the click minus", before - work,
                                                               after - work))
    for label, b, a in rows:
        print(f"{label:34}{b * 1e3:15.1f} ms{a * 1e3:13.1f} ms{b / a:8.2f}x")
    print(f"{'  the job straight via the queue)':34}{work * 1e3:15.1f} ms{work * 1e3:13.1f} ms")
    spread = [f"{min(rounds[k]) * 1e3:.0f}-{max(rounds[k]) * 1e3:.0f} ms" for k in ("before", "after")]
    print(f"{'range of the click over the rounds':34}{spread[0]:>18}{spread[1]:>16}")


if __name__ == "__main__":
    if sys.argv[1:] == ["--worker"]:
        sys.exit(worker_main())
    main()
