"""The issue's job_queue guarantees, each against a real Redis server and real worker processes.

Workers run ``tests/worker_proc.py`` (zero-cost handler, see there for the job options that steer it) with the
fast timings of ``redis_fixtures.FAST``: heartbeat TTL 2 s, visibility timeout 3 s, batch size 4.
"""

from __future__ import annotations

import json
import re
import signal
import threading
import time
from pathlib import Path

import pytest
import redis
from redis_fixtures import RedisServer, make_config, wait_for

from worker.client.connection import RedisDown, connect
from worker.client.defaults import QueueConfig
from worker.client.protocol import DEAD_LETTER, TIMEOUT, Job, Result
from worker.client.queue import BusyError, JobQueue
from worker.gpu.loop import WorkerLoop, live_workers, queue_stats

pytest_plugins = ["redis_fixtures"]

IMAGE = b"not really a PNG, the test handler only checks the hash"


def _job(job_queue: JobQueue, query: str, **options) -> Job:
    return Job(image=job_queue.put_image(IMAGE), query=query, options=options)


def _batches(job_queue: JobQueue) -> list[dict]:
    return [json.loads(b) for b in job_queue.redis.lrange("test:batches", 0, -1)]


def _seen(job_queue: JobQueue, job: Job) -> list[dict]:
    return [b for b in _batches(job_queue) if job.id in b["ids"]]


def _ready(job_queue: JobQueue, name: str) -> None:
    wait_for(lambda: any(w["name"] == name for w in job_queue.live_workers()), what=f"worker {name} to register")


def _check_answer(result: Result, job: Job) -> None:
    assert result.ok, result.error_message
    assert result.text == job.query.upper() and result.model_version == "test-v1"
    assert result.mask_array()[0].sum() == 4 * (len(job.query) % 8)


def test_concurrent_jobs_are_batched_up_to_b(job_queue: JobQueue, spawn_worker) -> None:
    spawn_worker("w-batch", job_queue.config)
    _ready(job_queue, "w-batch")
    slow = _job(job_queue, "slow", sleep=0.6)
    job_queue.submit(slow)
    wait_for(lambda: _seen(job_queue, slow), what="the slow batch to start")
    jobs = [_job(job_queue, f"query {i}") for i in range(8)]
    threads = [threading.Thread(target=job_queue.submit, args=(job,)) for job in jobs]  # 8 concurrent submitters
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for job in jobs:
        _check_answer(job_queue.wait(job, timeout=10), job)
    assert job_queue.wait(slow, timeout=10).ok
    # The 8 queued while the model was busy: the next two model calls take B = 4 each.
    assert sorted(len(b["ids"]) for b in _batches(job_queue)) == [1, 4, 4]


def test_sigkill_mid_batch_loses_nothing(job_queue: JobQueue, spawn_worker) -> None:
    doomed = spawn_worker("w-doomed", job_queue.config)
    _ready(job_queue, "w-doomed")
    jobs = [_job(job_queue, f"q{i}", sleep_first=30) for i in range(3)]
    job_queue.submit_many(jobs)
    wait_for(lambda: _seen(job_queue, jobs[0]), what="the batch to start")
    doomed.signal(signal.SIGKILL)
    doomed.wait(5)
    spawn_worker("w-rescue", job_queue.config)  # reclaims once w-doomed's heartbeat lapses (2 s)
    for job in jobs:
        result = job_queue.wait(job, timeout=10)
        _check_answer(result, job)
        assert result.worker == "w-rescue"
    for job in jobs:  # exactly one result each, nothing left behind
        assert [b["attempts"][b["ids"].index(job.id)] for b in _seen(job_queue, job)] == [1, 2]
        assert not job_queue.redis.exists(job_queue.key("res", job.id))
    assert queue_stats(job_queue.redis, job_queue.config)["depth"] == 0


def test_stalled_worker_finishing_late_is_not_delivered_twice(job_queue: JobQueue, spawn_worker) -> None:
    """A worker frozen past its heartbeat TTL loses its job to another; its late answer is dropped."""
    slow = spawn_worker("w-stalled", job_queue.config)
    _ready(job_queue, "w-stalled")
    job = _job(job_queue, "frozen", sleep_first=0.5)
    job_queue.submit(job)
    wait_for(lambda: _seen(job_queue, job), what="the batch to start")
    slow.signal(signal.SIGSTOP)  # heartbeat and lease renewal stop too
    spawn_worker("w-fast", job_queue.config)
    result = job_queue.wait(job, timeout=10)
    assert result.ok and result.worker == "w-fast"
    slow.signal(signal.SIGCONT)  # it wakes up, finishes the batch and tries to deliver
    wait_for(lambda: any(w["name"] == "w-stalled" and w["jobs_served"] == 1 for w in job_queue.live_workers()))
    assert not job_queue.redis.exists(job_queue.key("res", job.id))  # the second answer was dropped
    assert job_queue.stats()["depth"] == 0


def test_poison_job_is_dead_lettered_with_its_cause(job_queue: JobQueue, spawn_worker) -> None:
    spawn_worker("w-poison", job_queue.config)
    _ready(job_queue, "w-poison")
    good = [_job(job_queue, "fine"), _job(job_queue, "also fine")]
    poison = _job(job_queue, "toxic", fail=True)
    job_queue.submit_many([good[0], poison, good[1]])
    for job in good:  # the failing batch is split, so its neighbours are not punished
        _check_answer(job_queue.wait(job, timeout=10), job)
    result = job_queue.wait(poison, timeout=10)
    assert result.error_code == DEAD_LETTER
    assert "3 of 3" in result.error_message and "RuntimeError: poison job 'toxic'" in result.error_message
    attempts = sorted({a for b in _seen(job_queue, poison) for i, a in zip(b["ids"], b["attempts"]) if i == poison.id})
    assert attempts == [1, 2, 3]
    stats = job_queue.stats()
    assert stats["dead_letter"] == 1 and stats["depth"] == 0


def test_expired_job_is_not_run(job_queue: JobQueue, spawn_worker) -> None:
    late = _job(job_queue, "too late")
    late.deadline = time.time() + 0.3
    job_queue.submit(late)
    answer = job_queue.wait(late, timeout=10)
    assert answer.error_code == TIMEOUT  # answered at the deadline, no worker needed: it waited for the 0.3 s left
    assert float(re.search(r"no result within ([\d.]+) s", answer.error_message)[1]) <= 0.3, answer.error_message
    spawn_worker("w-late", job_queue.config)
    sentinel = _job(job_queue, "sentinel")
    job_queue.submit(sentinel)
    assert job_queue.wait(sentinel, timeout=10).ok
    assert _seen(job_queue, late) == []  # the handler never saw it
    assert job_queue.stats()["depth"] == 0


def test_bounded_queue_refuses_with_busy(queue_config: QueueConfig, spawn_worker) -> None:
    cfg = make_config(queue_config.redis_url, max_queue_length=3)
    q = JobQueue(connect(config=cfg), cfg)
    spawn_worker("w-busy", cfg)
    _ready(q, "w-busy")
    jobs = [_job(q, f"q{i}", sleep=1.0) for i in range(3)]
    q.submit_many(jobs)  # in flight or queued: all count
    with pytest.raises(BusyError, match="busy"):
        q.submit(_job(q, "one too many"))
    assert q.stats()["depth"] == 3  # refused at once: the three (1 s each) are all still in flight
    for job in jobs:
        assert q.wait(job, timeout=10).ok
    q.submit(_job(q, "room again"))


def test_sigterm_drains_and_exits_zero(job_queue: JobQueue, spawn_worker) -> None:
    worker = spawn_worker("w-drain", job_queue.config)
    _ready(job_queue, "w-drain")
    first = [_job(job_queue, f"first {i}", sleep=0.8) for i in range(2)]
    job_queue.submit_many(first)
    wait_for(lambda: _seen(job_queue, first[0]), what="the batch to start")
    worker.signal(signal.SIGTERM)
    later = [_job(job_queue, f"later {i}") for i in range(2)]
    job_queue.submit_many(later)
    assert worker.wait(10) == 0
    for job in first:
        _check_answer(job_queue.wait(job, timeout=1), job)
    assert all(_seen(job_queue, job) == [] for job in later)  # nothing new was taken
    assert job_queue.stats() == {"depth": 2, "pending": 0, "queued": 2, "dead_letter": 0, "max_queue_length": 100}
    assert job_queue.live_workers() == []  # unregistered on the way out


def test_live_workers_show_the_processes(job_queue: JobQueue, spawn_worker) -> None:
    procs = [spawn_worker(f"w-live{i}", job_queue.config) for i in range(2)]
    for proc in procs:
        _ready(job_queue, proc.name)
    workers = {w["name"]: w for w in live_workers(job_queue.redis, job_queue.config)}
    for proc in procs:
        w = workers[proc.name]
        assert (w["pid"], w["device"], w["model_version"], w["state"]) == (proc.pid, "cpu", "test-v1", "idle")
        assert w["host"] and "cache_hit_rate" in w
    procs[0].signal(signal.SIGKILL)  # no unregistering: it drops out when its heartbeat expires (2 s here)
    wait_for(lambda: [w["name"] for w in job_queue.live_workers()] == ["w-live1"], timeout=5)
    procs[1].signal(signal.SIGTERM)  # an idle worker blocked in its read stops within block_ms
    assert procs[1].wait(5) == 0
    assert job_queue.live_workers() == []


def test_redis_down_then_back(tmp_path: Path, spawn_worker) -> None:
    server = RedisServer(tmp_path)
    server.start()
    try:
        cfg = make_config(server.url)
        q = JobQueue(connect(config=cfg), cfg)
        spawn_worker("w-outage", cfg)
        _ready(q, "w-outage")
        assert q.wait(q.submit(_job(q, "before")), timeout=10).ok

        pending = _job(q, "in the air")
        server.stop()
        for call in (lambda: q.submit(pending), lambda: q.wait("some-job", timeout=10), q.live_workers):
            # within its retry budget (cfg.redis_down_after_s), by construction of call_with_retry
            with pytest.raises(RedisDown, match=r"gave up on \w+ after \d+ attempt\(s\)"):
                call()
        time.sleep(0.5)  # let the worker notice and back off

        server.start()  # same port, empty (no persistence): the image must be stored again
        job = _job(q, "after")
        q.submit(job)
        _check_answer(q.wait(job, timeout=10), job)  # the worker reconnected and recreated its group
        _ready(q, "w-outage")  # and registered its heartbeat again
    finally:
        server.stop()


def test_handler_exception_in_process_loop_releases_for_retry(job_queue: JobQueue) -> None:
    """The loop itself (in-process, no signals): a failure is retried on the next delivery and then answered."""
    calls: list[int] = []

    def flaky(jobs: list[Job]) -> list[Result]:
        calls.append(jobs[0].attempts)
        if len(calls) == 1:
            raise RuntimeError("transient")
        return [Result(job_id=j.id, text="ok") for j in jobs]

    loop = WorkerLoop.from_url(flaky, config=job_queue.config, name="w-inproc")
    job = _job(job_queue, "flaky")
    job_queue.submit(job)
    deadline = time.monotonic() + 10
    while len(calls) < 2 and time.monotonic() < deadline:
        loop.serve_once()
    result = job_queue.wait(job, timeout=2)
    assert result.ok and result.worker == "w-inproc" and calls == [1, 2]
    assert {"queue_s", "batch_s"} <= set(result.timings)
    with pytest.raises(ValueError, match="socket_timeout"):
        WorkerLoop(JobQueue(redis.Redis(socket_timeout=0.1), job_queue.config), flaky)
