"""A dead worker's jobs move when its heartbeat lapses, not when the visibility timeout runs out (issue 16, item 1).

The process tests run a visibility timeout (120 s) far longer than the jobs' deadline (30 s): a job answered at all
was taken over through the heartbeat, since the visibility timeout cannot have run out before its deadline. Workers
are ``tests/worker_proc.py`` processes, which record for each batch who ran it, on which delivery, and which workers
had a heartbeat when it started.
"""

from __future__ import annotations

import json
import signal
import time

import pytest
from redis_fixtures import make_config, wait_for

from backend.config import BackendConfig
from worker.client.connection import connect
from worker.client.defaults import QueueConfig
from worker.client.protocol import Job, Result
from worker.client.queue import JobQueue
from worker.gpu.loop import WorkerLoop

pytest_plugins = ["redis_fixtures"]

IMAGE = b"not really a PNG, the test handler only checks the hash"
#: Visibility timeout far past the deadline: only the heartbeat path can answer in time.
LONG_VISIBILITY = {"visibility_timeout_s": 120.0, "job_deadline_s": 30.0, "result_ttl_s": 300}


def _batches(q: JobQueue) -> list[dict]:
    return [json.loads(b) for b in q.redis.lrange("test:batches", 0, -1)]


def _deliveries(q: JobQueue, job: Job) -> list[tuple[str, int, list[str]]]:
    """(worker, attempt, workers live at the batch's start) of every batch that ran ``job``."""
    return [(b["worker"], b["attempts"][b["ids"].index(job.id)], b["live"]) for b in _batches(q) if job.id in b["ids"]]


def _ready(q: JobQueue, name: str) -> None:
    wait_for(lambda: any(w["name"] == name for w in q.live_workers()), what=f"worker {name} to register")


@pytest.fixture
def slow_queue(queue_config: QueueConfig) -> JobQueue:
    cfg = make_config(queue_config.redis_url, **LONG_VISIBILITY)
    return JobQueue(connect(config=cfg), cfg)


def _submit_hanging(q: JobQueue, n: int) -> list[Job]:
    """``n`` jobs that hang their first worker for a minute (a second delivery answers at once)."""
    jobs = [Job(image=q.put_image(IMAGE), query=f"query {i}", options={"sleep_first": 60}) for i in range(n)]
    q.submit_many(jobs)
    wait_for(lambda: all(_deliveries(q, job) for job in jobs), what="the first worker to take every job")
    return jobs


def test_sigkilled_workers_jobs_move_when_its_heartbeat_lapses(slow_queue: JobQueue, spawn_worker) -> None:
    q = slow_queue
    doomed = spawn_worker("w-killed", q.config)
    _ready(q, "w-killed")
    jobs = _submit_hanging(q, 4)  # one batch of B = 4, all in w-killed's hands
    doomed.signal(signal.SIGKILL)
    doomed.wait(5)
    spawn_worker("w-heir", q.config)  # joins at once, while w-killed's heartbeat is still alive
    for job in jobs:
        result = q.wait(job)  # the job's deadline (30 s) comes long before its visibility timeout (120 s)
        assert result.ok, result.error_message
        assert result.worker == "w-heir" and result.text == job.query.upper()
    for job in jobs:
        (first, attempt1, _), (heir, attempt2, live) = _deliveries(q, job)
        assert (first, attempt1, heir, attempt2) == ("w-killed", 1, "w-heir", 2)
        assert "w-killed" not in live and "w-heir" in live  # taken over after the heartbeat lapsed, not before
    stats = q.stats()
    assert stats["depth"] == 0 and stats["dead_letter"] == 0
    consumers = {c["name"].decode() for c in q.redis.xinfo_consumers(q.config.job_stream, q.config.consumer_group)}
    wait_for(
        lambda: "w-killed" not in {
            c["name"].decode() for c in q.redis.xinfo_consumers(q.config.job_stream, q.config.consumer_group)
        },
        what=f"the dead consumer to leave the group (consumers: {consumers})",
    )


def test_restart_under_the_same_name_takes_back_the_predecessors_jobs(slow_queue: JobQueue, spawn_worker) -> None:
    """A worker restarted under its old name (``--name``, or a container keeping host name and pid) renews the
    heartbeat the dead one had: its predecessor's jobs never lapse, so the new process hands them back itself."""
    q = slow_queue
    first = spawn_worker("w-same", q.config)
    _ready(q, "w-same")
    jobs = _submit_hanging(q, 3)
    first.signal(signal.SIGKILL)
    first.wait(5)
    spawn_worker("w-same", q.config)
    for job in jobs:
        result = q.wait(job)
        assert result.ok and result.worker == "w-same", result.error_message
    for job in jobs:
        assert [attempt for _, attempt, _ in _deliveries(q, job)] == [1, 2]
    assert q.stats()["depth"] == 0


def test_slow_but_alive_worker_is_never_robbed(job_queue: JobQueue, spawn_worker) -> None:
    """A batch far longer than the heartbeat TTL (2 s) and the visibility timeout (3 s) stays with its worker
    while another worker looks for jobs to take over every 0.2 s."""
    q = job_queue
    slow = spawn_worker("w-slow", q.config)
    _ready(q, "w-slow")
    jobs = [Job(image=q.put_image(IMAGE), query=f"long {i}", options={"sleep": 7.0}) for i in range(2)]
    q.submit_many(jobs)
    wait_for(lambda: all(_deliveries(q, job) for job in jobs), what="w-slow to take both jobs")
    spawn_worker("w-eager", q.config)
    _ready(q, "w-eager")
    for job in jobs:
        result = q.wait(job, timeout=20)
        assert result.ok and result.worker == "w-slow", result.error_message
    for job in jobs:
        assert [(w, a) for w, a, _ in _deliveries(q, job)] == [("w-slow", 1)]  # delivered once, never taken
    assert slow.proc.poll() is None


def test_reclaim_takes_a_silent_holders_jobs_once_its_heartbeat_lapses(queue_config: QueueConfig) -> None:
    """The queue operation itself: a holder's jobs move once the holder has no heartbeat and they were untouched
    for the heartbeat TTL; a holder that keeps its heartbeat keeps them; ``next_check_s`` says when to look."""
    cfg = make_config(queue_config.redis_url, heartbeat_interval_s=0.1, heartbeat_ttl_s=1.0, **LONG_VISIBILITY)
    q = JobQueue(connect(config=cfg), cfg)
    ghost_job, alive_job = (Job(image=q.put_image(IMAGE), query=name) for name in ("ghost's", "alive's"))
    q.submit(ghost_job)
    [held] = q.consume("ghost", block_ms=0)  # a consumer without a heartbeat: it died before its first beat lapsed
    q.heartbeat("alive", {"name": "alive"})
    q.submit(alive_job)
    [kept] = q.consume("alive", block_ms=0)
    first = q.reclaim_round("heir")
    assert first.jobs == [] and first.next_check_s is not None and 0 < first.next_check_s <= 1.0

    def rounds(seconds: float):
        """Reclaim rounds for ``seconds`` while "alive" keeps beating (but never renews its lease)."""
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            q.heartbeat("alive", {"name": "alive"})
            yield q.reclaim_round("heir").jobs
            time.sleep(0.05)

    taken = next((jobs for jobs in rounds(5.0) if jobs), [])
    assert [(j.id, j.attempts) for j in taken] == [(ghost_job.id, 2)]
    assert all(jobs == [] for jobs in rounds(1.5))  # past the TTL for alive's job too: it stays with alive
    assert q.redis.xpending_range(cfg.job_stream, cfg.consumer_group, "-", "+", 10, consumername="alive")
    assert q.complete(taken[0], Result(job_id=ghost_job.id, text="rescued"))
    assert q.wait(ghost_job, timeout=1).text == "rescued"
    assert q.complete(kept, Result(job_id=alive_job.id, text="mine")) and held.id == ghost_job.id


def test_settings_that_cannot_work_together_are_refused_at_start_up(job_queue: JobQueue) -> None:
    QueueConfig().check_timings()  # the defaults: interval 5 s < TTL 15 s < visibility 60 s, deadline 90 s
    cases = [
        ({"LISA_LS_HEARTBEAT_INTERVAL_S": "20"}, "LISA_LS_HEARTBEAT_INTERVAL_S \\(20\\) must be positive and below"),
        ({"LISA_LS_HEARTBEAT_INTERVAL_S": "0"}, "LISA_LS_HEARTBEAT_INTERVAL_S"),
        ({"LISA_LS_VISIBILITY_TIMEOUT_S": "15"}, "HEARTBEAT_TTL_S \\(15\\) must be below LISA_LS_VISIBILITY_TIMEOUT_S"),
        ({"LISA_LS_HEARTBEAT_TTL_S": "90"}, "LISA_LS_HEARTBEAT_TTL_S \\(90\\) must be below"),
        ({"LISA_LS_JOB_DEADLINE_S": "10"}, "LISA_LS_JOB_DEADLINE_S \\(10\\) must exceed LISA_LS_HEARTBEAT_TTL_S"),
    ]
    for env, message in cases:
        with pytest.raises(ValueError, match=message):
            QueueConfig.from_env(env)
    # A worker built in code is checked too, and so is the backend's /predict deadline against the queue's TTL.
    bad = QueueConfig(**{**job_queue.config.__dict__, "heartbeat_ttl_s": 5.0})  # visibility is 3 s
    with pytest.raises(ValueError, match="VISIBILITY_TIMEOUT_S"):
        WorkerLoop(JobQueue(connect(config=bad, socket_timeout=2.0), bad), lambda jobs: [])
    with pytest.raises(ValueError, match="LISA_LS_PREDICT_DEADLINE_S \\(10\\) must exceed"):
        BackendConfig(predict_deadline_s=10.0)
    BackendConfig.from_env({"LISA_LS_PREDICT_DEADLINE_S": "10", "LISA_LS_HEARTBEAT_TTL_S": "8"})
