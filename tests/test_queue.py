"""The queue's client and worker operations against a real Redis server, driven from the test process."""

from __future__ import annotations

import socket
import time

import numpy as np
import pytest
import redis

from worker.client.connection import RedisDown, connect
from worker.client.defaults import QueueConfig
from worker.client.protocol import BAD_INPUT, DEAD_LETTER, TIMEOUT, Job, Result
from worker.client.queue import BadInputError, BusyError, JobQueue

pytest_plugins = ["redis_fixtures"]

IMAGE = b"\x89PNG fake image bytes"


def _job(job_queue: JobQueue, query: str = "the red object", **kwargs) -> Job:
    return Job(image=job_queue.put_image(IMAGE), query=query, **kwargs)


def _answer(job: Job) -> Result:
    return Result.from_masks(job.id, np.ones((1, 2, 3), bool), [0.7], text=f"answer to {job.query}")


def test_put_image_moves_bytes_once_and_refreshes_ttl(job_queue: JobQueue) -> None:
    job_queue.redis.config_resetstat()
    digest = job_queue.put_image(IMAGE)
    key = job_queue.key("img", digest)
    job_queue.redis.expire(key, 5)
    assert job_queue.put_image(IMAGE) == digest
    assert job_queue.redis.ttl(key) > 5  # refreshed to image_ttl_s
    assert job_queue.redis.info("commandstats")["cmdstat_set"]["calls"] == 1  # the second put sent no bytes
    assert job_queue.get_images([digest, "0" * 64]) == {digest: IMAGE, "0" * 64: None}


def test_submit_consume_complete_wait(job_queue: JobQueue) -> None:
    job = _job(job_queue, options={"threshold": 0.5})
    assert job_queue.submit(job) == job.id
    assert job.deadline is not None and job.remaining() > 0  # the default deadline was filled in
    [got] = job_queue.consume("w1", block_ms=0)
    assert got == Job(**{**job.__dict__, "attempts": 1}) and got.attempts == 1
    assert job_queue.stats() == {"depth": 1, "pending": 1, "queued": 0, "dead_letter": 0, "max_queue_length": 100}
    assert job_queue.complete(got, _answer(got)) is True
    result = job_queue.wait(job, timeout=2)
    assert result.ok and result.text == "answer to the red object"
    assert np.array_equal(result.mask_array(), np.ones((1, 2, 3), bool))
    assert job_queue.stats()["depth"] == 0  # acknowledged and deleted


def test_finishing_a_job_twice_delivers_once(job_queue: JobQueue) -> None:
    """A reclaimed job finished by both its workers is answered once; the second answer is dropped."""
    job = _job(job_queue)
    job_queue.submit(job)
    [first] = job_queue.consume("w1", block_ms=0)
    assert job_queue.complete(first, _answer(first)) is True
    assert job_queue.complete(first, Result.error(job.id, "internal", "duplicate")) is False
    assert job_queue.wait(job.id, timeout=1).ok
    assert not job_queue.redis.exists(job_queue.key("res", job.id))
    assert job_queue.stats()["pending"] == 0


def test_wait_times_out_and_late_result_is_dropped(job_queue: JobQueue) -> None:
    job = _job(job_queue)
    job_queue.submit(job)
    start = time.monotonic()
    result = job_queue.wait(job, timeout=0.3)
    assert result.error_code == TIMEOUT and 0.25 < time.monotonic() - start < 1.5
    [got] = job_queue.consume("w1", block_ms=0)
    assert job_queue.complete(got, _answer(got)) is False
    assert not job_queue.redis.exists(job_queue.key("res", job.id))


def test_bound_refuses_at_once_with_busy(queue_config: QueueConfig) -> None:
    q = JobQueue(connect(config=queue_config), QueueConfig(**{**queue_config.__dict__, "max_queue_length": 3}))
    q.submit_many([_job(q, f"q{i}") for i in range(2)])
    with pytest.raises(BusyError) as info:
        q.submit_many([_job(q, "a"), _job(q, "b")])  # all or none
    assert info.value.code == "busy" and "busy" in str(info.value)
    assert q.stats()["depth"] == 2
    q.submit(_job(q, "third"))
    start = time.monotonic()
    with pytest.raises(BusyError):
        q.submit(_job(q, "fourth"))
    assert time.monotonic() - start < 0.5
    with pytest.raises(BadInputError):
        q.submit_many([_job(q, str(i)) for i in range(4)])
    [got] = q.consume("w1", count=1, block_ms=0)  # in flight still counts...
    with pytest.raises(BusyError):
        q.submit(_job(q, "fifth"))
    q.complete(got, _answer(got))  # ...finished does not
    q.submit(_job(q, "fifth"))


def test_reclaim_counts_attempts_then_dead_letters(queue_config: QueueConfig) -> None:
    cfg = QueueConfig(**{**queue_config.__dict__, "visibility_timeout_s": 0.2, "max_attempts": 2})
    q = JobQueue(connect(config=cfg), cfg)
    job = _job(q)
    q.submit(job)
    [got] = q.consume("w1", block_ms=0)
    assert q.reclaim("w2") == []  # not idle long enough yet
    time.sleep(0.25)
    [again] = q.reclaim("w2")
    assert again.id == job.id and again.attempts == 2
    q.release("w2", [again], "RuntimeError: CUDA out of memory")  # failed: immediately reclaimable
    assert q.release("w1", [got], "stale owner") == 0  # w1 no longer owns it: must not steal it back
    assert q.reclaim("w3") == []  # two failed deliveries: dead-lettered instead
    result = q.wait(job, timeout=1)
    assert result.error_code == DEAD_LETTER
    assert "2 of 2" in result.error_message and "CUDA out of memory" in result.error_message
    [(_, fields)] = q.redis.xrange(cfg.dead_letter_stream)
    assert fields[b"id"] == job.id.encode() and b"CUDA out of memory" in fields[b"cause"]
    assert q.stats() == {"depth": 0, "pending": 0, "queued": 0, "dead_letter": 1, "max_queue_length": 100}


def test_expired_job_is_not_handed_out(job_queue: JobQueue) -> None:
    job = _job(job_queue, deadline=time.time() + 0.1)
    job_queue.submit(job)
    assert job_queue.wait(job).error_code == TIMEOUT  # the waiter is answered at the deadline
    assert job_queue.consume("w1", block_ms=0) == []
    assert job_queue.stats()["depth"] == 0


def test_malformed_entry_is_answered_bad_input(job_queue: JobQueue) -> None:
    job_queue.ensure_group()
    job_queue.redis.xadd(job_queue.config.job_stream, {"id": "broken", "image": "x"})  # no query, no deadline
    assert job_queue.consume("w1", block_ms=0) == []
    result = job_queue.wait("broken", timeout=1)
    assert result.error_code == BAD_INPUT and "malformed" in result.error_message


def test_heartbeats_list_live_workers(job_queue: JobQueue) -> None:
    cfg = QueueConfig(**{**job_queue.config.__dict__, "heartbeat_ttl_s": 0.3})
    q = JobQueue(job_queue.redis, cfg)
    q.heartbeat("w1", {"host": "h", "pid": 7, "device": "cuda:0", "cache_hit_rate": None, "started": 1.0})
    q.heartbeat("w2", {"host": "h", "pid": 8, "device": "cuda:1", "started": 2.0})
    assert [(w["pid"], w["device"]) for w in q.live_workers()] == [(7, "cuda:0"), (8, "cuda:1")]
    q.unregister("w2")
    assert [w["pid"] for w in q.live_workers()] == [7]
    time.sleep(0.4)
    assert q.live_workers() == []
    assert q.redis.zcard(q.key("workers")) == 0  # expired names are cleaned up


def _silent_server() -> socket.socket:
    """A TCP listener that accepts connections but never answers: a hung Redis."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(16)
    return sock


@pytest.mark.parametrize("kind", ["refused", "hung"])
def test_client_reports_redis_down_within_two_seconds(kind: str) -> None:
    hung = _silent_server() if kind == "hung" else None
    if hung is not None:
        port = hung.getsockname()[1]
    else:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]  # closed again: connections are refused
    cfg = QueueConfig(redis_url=f"redis://127.0.0.1:{port}/0")
    q = JobQueue(connect(config=cfg), cfg)
    job = Job(image="0" * 64, query="q")
    for call in (lambda: q.submit(job), lambda: q.wait(job.id, timeout=10)):
        start = time.monotonic()
        with pytest.raises(RedisDown) as info:
            call()
        assert time.monotonic() - start < 2.0
        assert info.value.code == "redis_down" and "unreachable" in str(info.value)
    if hung is not None:
        hung.close()


def test_config_from_env() -> None:
    env = {"REDIS_URL": "redis://h:1/2", "LISA_LS_BATCH_SIZE": "4", "LISA_LS_WORKER_BACKOFF_S": "0.1, 2"}
    cfg = QueueConfig.from_env(env, max_attempts=5)
    assert (cfg.redis_url, cfg.batch_size, cfg.worker_backoff_s, cfg.max_attempts) == (
        "redis://h:1/2",
        4,
        (0.1, 2.0),
        5,
    )
    assert cfg.job_stream == "{lisa}:jobs" and cfg.dead_letter_stream == "{lisa}:jobs:dead"
    with pytest.raises(ValueError, match="LISA_LS_BATCH_SIZE"):
        QueueConfig.from_env({"LISA_LS_BATCH_SIZE": "eight"})
    with pytest.raises(ValueError, match="result_ttl_s"):
        QueueConfig(result_ttl_s=10, job_deadline_s=90)


def test_redis_errors_other_than_connection_are_not_swallowed(job_queue: JobQueue) -> None:
    job_queue.redis.set(job_queue.config.job_stream, "not a stream")
    with pytest.raises(redis.ResponseError):
        job_queue.submit(_job(job_queue))
