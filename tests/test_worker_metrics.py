"""The Redis format of the serving metrics (``worker.client.metrics``), written and read against a real Redis server."""

from __future__ import annotations

import math

import pytest
import redis
from redis_fixtures import free_port

from worker.client.connection import connect
from worker.client.defaults import BATCH_SIZE_BUCKETS, LATENCY_BUCKETS_S, QueueConfig
from worker.client.metrics import LATENCY_KEY, Histogram, bucket_field, read_metrics, record_batch
from worker.client.queue import JobQueue

pytest_plugins = ["redis_fixtures"]


def test_bucket_field_is_the_smallest_bound_at_or_above() -> None:
    bounds = (0.5, 1.0, 2.0)
    assert [bucket_field(v, bounds) for v in (0.0, 0.5, 0.51, 1.0, 2.0, 2.01, 1e9)] == [
        "0.5",
        "0.5",
        "1.0",
        "1.0",
        "2.0",
        "+Inf",
        "+Inf",
    ]


def test_default_bounds_are_sorted_and_cover_the_deadline() -> None:
    for bounds in (LATENCY_BUCKETS_S, BATCH_SIZE_BUCKETS):
        assert list(bounds) == sorted(set(bounds))
    assert LATENCY_BUCKETS_S[-1] >= QueueConfig().job_deadline_s


def test_record_and_read_back(job_queue: JobQueue) -> None:
    cfg = job_queue.config
    assert record_batch(job_queue.redis, cfg, 3, [(0.2, "ok"), (0.3, "ok"), (200.0, "internal")])
    assert record_batch(job_queue.redis, cfg, 1, [(0.01, "ok")])
    assert record_batch(job_queue.redis, cfg, 0, [])  # nothing reached the model: nothing to record
    m = read_metrics(job_queue.redis, cfg)
    assert m.jobs == {"ok": 3, "internal": 1}
    assert m.latency_s.count == 4 and m.latency_s.sum == pytest.approx(200.51)
    cumulative = dict(m.latency_s.buckets)
    assert cumulative[0.05] == 1 and cumulative[0.25] == 2 and cumulative[0.5] == 3 and cumulative[math.inf] == 4
    assert m.batch_size.count == 2 and m.batch_size.sum == 4
    assert dict(m.batch_size.buckets) == {1.0: 1, 3.0: 2, math.inf: 2}


def test_histogram_tolerates_other_bounds_and_unknown_fields() -> None:
    # Two workers with different bounds, a field a newer version might add, bytes as HGETALL returns them.
    raw = {b"1.0": b"2", b"1.5": b"1", b"+Inf": b"1", b"sum": b"9.5", b"count": b"999", b"p99": b"7"}
    h = Histogram.from_hash(raw)
    assert h.buckets == [(1.0, 2), (1.5, 3), (math.inf, 4)]
    assert h.count == 4 and h.sum == 9.5  # the count comes from the buckets, so +Inf and _count agree
    assert Histogram.from_hash({}).buckets == [(math.inf, 0)]


def test_recording_never_raises_when_redis_is_down(queue_config: QueueConfig) -> None:
    down = connect(f"redis://127.0.0.1:{free_port()}/0", queue_config)
    assert record_batch(down, queue_config, 2, [(0.1, "ok")]) is False
    with pytest.raises(redis.ConnectionError):  # reading is the backend's call to report, so it does raise
        read_metrics(down, queue_config)


def test_keys_follow_the_prefix(job_queue: JobQueue) -> None:
    other = QueueConfig(redis_url=job_queue.config.redis_url, key_prefix="other:")
    record_batch(job_queue.redis, other, 1, [(0.1, "ok")])
    assert job_queue.redis.exists("{other}:" + LATENCY_KEY) and not job_queue.redis.exists("{lisa}:" + LATENCY_KEY)
    assert read_metrics(job_queue.redis, job_queue.config).latency_s.count == 0
