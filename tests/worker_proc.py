"""A worker process for the queue tests: a real WorkerLoop with a zero-cost handler steered by job options.

Usage: ``python tests/worker_proc.py NAME`` with ``REDIS_URL`` and ``LISA_LS_*`` in the environment.

The handler answers each job with one mask made from its query (the first ``len(query) % 8`` columns of a 4×8
image) and the query upper-cased as text, after recording the batch in the Redis list ``test:batches`` so that
tests can see what the model was handed, by whom, on which delivery, and which workers were live (had a heartbeat)
when it started. Job options steer it:

- ``sleep``: seconds to sleep in the batch (the longest in the batch wins);
- ``sleep_first``: the same, but only on a job's first delivery (so a reclaiming worker answers quickly);
- ``fail``: raise ``RuntimeError("poison ...")`` whenever the job is in the batch;
- ``bad_result``: answer the job with a result that cannot be encoded (its timings are not numbers), a failure
  outside the model call that the loop must survive.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import sys
import time

import numpy as np
import redis

from worker.client.connection import connect
from worker.client.defaults import QueueConfig
from worker.client.protocol import Job, Result
from worker.gpu.loop import WorkerLoop


def make_handler(recorder: redis.Redis, name: str, config: QueueConfig):
    """The zero-cost batch function; ``recorder`` is a fail-fast client used only to record what it saw."""

    def live() -> list[str]:
        names = [n.decode() for n in recorder.zrange(config.key("workers"), 0, -1)]
        return [n for n in names if recorder.exists(config.key("worker", n))]

    def handler(jobs: list[Job]) -> list[Result]:
        record = {
            "worker": name,
            "pid": os.getpid(),
            "ids": [j.id for j in jobs],
            "attempts": [j.attempts for j in jobs],
        }
        with contextlib.suppress(redis.RedisError):  # best effort: the Redis-down test stops Redis under us
            record["live"] = live()
            recorder.rpush("test:batches", json.dumps(record))
        for job in jobs:  # the loop must hand over the right image bytes
            if job.image_bytes is None or hashlib.sha256(job.image_bytes).hexdigest() != job.image:
                raise AssertionError(f"job {job.id} arrived without its image bytes")
        delay = max(
            [j.options.get("sleep", 0) for j in jobs]
            + [j.options.get("sleep_first", 0) for j in jobs if j.attempts == 1]
        )
        time.sleep(delay)
        poison = [j for j in jobs if j.options.get("fail")]
        if poison:
            raise RuntimeError(f"poison job {poison[0].query!r}")
        results = []
        for job in jobs:
            mask = np.zeros((1, 4, 8), dtype=bool)
            mask[0, :, : len(job.query) % 8] = True
            results.append(Result.from_masks(job.id, mask, [0.5], text=job.query.upper()))
            if job.options.get("bad_result"):
                results[-1].timings["model_s"] = "not a number"
        return results

    return handler


def main() -> int:
    name = sys.argv[1]
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s {name} %(levelname)s %(name)s: %(message)s")
    config = QueueConfig.from_env()
    recorder = connect(config=config)  # fails fast, so recording never stalls a batch while Redis is down
    loop = WorkerLoop.from_url(
        make_handler(recorder, name, config), config=config, name=name, device="cpu", model_version="test-v1"
    )
    return loop.run()


if __name__ == "__main__":
    sys.exit(main())
