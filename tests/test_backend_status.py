"""``/health``, ``/metrics``, ``/versions``, basic auth and JSON errors of the backend.

The end-to-end tests run the backend as Label Studio meets it, a real gunicorn process on loopback, against a real
``redis-server`` and real worker processes (``tests/worker_proc.py``, zero-cost handler, model version
``test-v1``). Edge cases that need no process (a hung Redis, a full queue, error pages) use Flask's test client
on an app built by ``create_app``.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator

import pytest
import requests
from flask import Flask
from flask.testing import FlaskClient
from prometheus_client.parser import text_string_to_metric_families
from redis_fixtures import RedisServer, make_config, wait_for

from backend.app import create_app
from backend.config import BackendConfig
from backend.state import current_state
from worker.client.connection import RedisDown
from worker.client.defaults import QueueConfig
from worker.client.protocol import Job
from worker.client.queue import BusyError, JobQueue

pytest_plugins = ["redis_fixtures", "backend_fixtures"]

IMAGE = b"not really a PNG, the test handler only checks the hash"
AUTH = ("annotator", "s3cret:with-colon")
AUTH_ENV = {"BASIC_AUTH_USER": AUTH[0], "BASIC_AUTH_PASS": AUTH[1]}


def _get(url: str, auth: tuple[str, str] | None = AUTH) -> requests.Response:
    return requests.get(url, auth=auth, timeout=5)


def _metrics(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of a Prometheus exposition, keyed by (sample name, sorted labels)."""
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


# ---- a real gunicorn backend ----


def test_health_degraded_without_workers(queue_config: QueueConfig, start_backend) -> None:
    backend = start_backend(queue_config, AUTH_ENV, auth=AUTH)
    started = time.monotonic()
    reply = _get(backend.url + "/health")
    assert time.monotonic() - started < 1.0
    assert reply.status_code == 200 and reply.headers["Content-Type"] == "application/json"
    body = reply.json()
    assert body["status"] == "DEGRADED" and body["reason"] == "no live workers"
    assert body["model_class"] == "LisaBackend" and body["workers"] == []
    assert body["queue"]["depth"] == 0 and body["queue"]["dead_letter"] == 0
    assert _get(backend.url + "/versions").json() == {"versions": []}


def test_health_up_lists_the_live_worker(queue_config: QueueConfig, start_backend, spawn_worker) -> None:
    backend = start_backend(queue_config, AUTH_ENV, auth=AUTH)
    worker = spawn_worker("w-health", queue_config)
    body = wait_for(
        lambda: (b := _get(backend.url + "/health").json())["status"] == "UP" and b, what="/health to say UP"
    )
    assert body["reason"] is None
    [entry] = body["workers"]
    assert entry["name"] == "w-health" and entry["pid"] == worker.pid and entry["host"] == socket.gethostname()
    assert entry["device"] == "cpu" and entry["model_version"] == "test-v1"
    assert {"batches_served", "jobs_served", "cache_hit_rate", "state", "seen_s_ago"} <= set(entry)
    assert _get(backend.url + "/versions").json() == {"versions": ["test-v1"]}


def test_metrics_count_the_served_jobs(
    queue_config: QueueConfig, job_queue: JobQueue, start_backend, spawn_worker
) -> None:
    backend = start_backend(queue_config, AUTH_ENV, auth=AUTH)
    empty = _metrics(_get(backend.url + "/metrics").text)
    assert empty[("lisa_ls_redis_up", ())] == 1.0 and empty[("lisa_ls_live_workers", ())] == 0.0
    assert empty[("lisa_ls_job_latency_seconds_count", ())] == 0.0

    spawn_worker("w-metrics", queue_config)
    wait_for(lambda: job_queue.live_workers(), what="the worker to register")
    jobs = [Job(image=job_queue.put_image(IMAGE), query=f"query {i}") for i in range(6)]
    job_queue.submit_many(jobs)
    assert all(job_queue.wait(job, timeout=10).ok for job in jobs)

    # Workers record metrics just after delivering, so the waiter can be a moment ahead of the counters.
    def scraped() -> dict | None:
        reply = _get(backend.url + "/metrics")
        assert reply.status_code == 200 and reply.headers["Content-Type"].startswith("text/plain")
        m = _metrics(reply.text)
        return m if m[("lisa_ls_job_latency_seconds_count", ())] == len(jobs) else None

    m = wait_for(scraped, timeout=5, what="the latency histogram to count every job")
    assert m[("lisa_ls_job_latency_seconds_bucket", (("le", "+Inf"),))] == len(jobs)
    assert 0 < m[("lisa_ls_job_latency_seconds_sum", ())] < 10 * len(jobs)
    assert m[("lisa_ls_jobs_total", (("outcome", "ok"),))] == len(jobs)
    assert m[("lisa_ls_batch_size_sum", ())] == len(jobs)  # every job was handed to the model once
    assert 1 <= m[("lisa_ls_batch_size_count", ())] <= len(jobs)
    assert m[("lisa_ls_live_workers", ())] == 1.0
    assert m[("lisa_ls_queue_depth", ())] == 0.0 and m[("lisa_ls_dead_letter_jobs", ())] == 0.0
    info = [labels for (name, labels) in m if name == "lisa_ls_worker_info"]
    assert dict(info[0])["worker"] == "w-metrics" and dict(info[0])["model_version"] == "test-v1"
    worker_jobs = ("lisa_ls_worker_jobs_total", (("worker", "w-metrics"),))
    wait_for(
        lambda: _metrics(_get(backend.url + "/metrics").text)[worker_jobs] == len(jobs),
        what="the heartbeat to report the jobs served",
    )


def test_basic_auth(queue_config: QueueConfig, start_backend) -> None:
    backend = start_backend(queue_config, AUTH_ENV, auth=AUTH)
    for path in ("/health", "/metrics", "/versions", "/no-such-page"):
        refused = _get(backend.url + path, auth=None)
        assert refused.status_code == 401, path
        assert refused.headers["WWW-Authenticate"].startswith("Basic")
        assert "BASIC_AUTH_USER" in refused.json()["message"]
    assert _get(backend.url + "/health", auth=(AUTH[0], "wrong")).status_code == 401
    assert _get(backend.url + "/health", auth=("someone", AUTH[1])).status_code == 401
    assert _get(backend.url + "/health").status_code == 200
    # Label Studio sends the credentials as part of the backend URL; requests turns them into the header.
    in_url = backend.url.replace("http://", f"http://{AUTH[0]}:{requests.utils.quote(AUTH[1], safe='')}@")
    assert requests.get(in_url + "/health", timeout=5).json()["model_class"] == "LisaBackend"


def test_health_answers_fast_while_redis_is_down(tmp_path, start_backend) -> None:
    server = RedisServer(tmp_path)
    server.start()
    config = make_config(server.url)
    try:
        backend = start_backend(config)  # no auth: the default
        assert _get(backend.url + "/health", auth=None).json()["status"] == "DEGRADED"
        server.stop()
        for _ in range(3):  # repeatedly: no call may get slower as failed connections pile up
            started = time.monotonic()
            reply = _get(backend.url + "/health", auth=None)
            assert time.monotonic() - started < 2.0 and reply.status_code == 200
            body = reply.json()
            assert body["status"] == "DOWN" and "Redis is unreachable" in body["reason"]
            assert body["redis"]["reachable"] is False and body["workers"] == [] and body["queue"] is None
        scrape = _get(backend.url + "/metrics", auth=None)
        assert scrape.status_code == 200 and _metrics(scrape.text)[("lisa_ls_redis_up", ())] == 0.0
        versions = _get(backend.url + "/versions", auth=None)
        assert versions.status_code == 503 and "Redis is unreachable" in versions.json()["message"]
        server.start()  # same port: the backend reconnects by itself
        wait_for(lambda: _get(backend.url + "/health", auth=None).json()["status"] == "DEGRADED", timeout=5)
    finally:
        server.stop()


# ---- Flask's test client: edge cases ----


@pytest.fixture
def app(queue_config: QueueConfig) -> Iterator[Flask]:
    app = create_app(BackendConfig(queue=queue_config))
    yield app
    app.extensions["lisa_ls"].close()


@pytest.fixture
def client(app: Flask) -> FlaskClient:
    return app.test_client()


def _beat(job_queue: JobQueue, name: str, **info) -> None:
    """A heartbeat as a worker would publish it, without a worker process."""
    base = {"name": name, "host": "gpu-box", "pid": 4242, "device": "cuda:0", "model_version": "v7", "state": "idle"}
    job_queue.heartbeat(name, {**base, "batches_served": 3, "jobs_served": 5, **info})


def test_health_is_degraded_when_every_worker_drains(client: FlaskClient, job_queue: JobQueue) -> None:
    _beat(job_queue, "w-drain", state="draining")
    body = client.get("/health").get_json()
    assert body["status"] == "DEGRADED" and body["reason"] == "no live workers (1 draining)"
    assert [w["name"] for w in body["workers"]] == ["w-drain"]


def test_health_is_degraded_when_the_queue_is_full(queue_config: QueueConfig, job_queue: JobQueue) -> None:
    small = make_config(queue_config.redis_url, max_queue_length=2)
    app = create_app(BackendConfig(queue=small))
    try:
        _beat(job_queue, "w-full")
        JobQueue(job_queue.redis, small).submit_many([Job(image="0" * 64, query="q") for _ in range(2)])
        body = app.test_client().get("/health").get_json()
        assert body["status"] == "DEGRADED" and body["reason"].startswith("queue is full")
    finally:
        app.extensions["lisa_ls"].close()


def test_metrics_per_worker_cache_hit_rate(client: FlaskClient, job_queue: JobQueue) -> None:
    _beat(job_queue, "w-cache", cache_hit_rate=0.75)
    _beat(job_queue, "w-nocache", cache_hit_rate=None)
    m = _metrics(client.get("/metrics").get_data(as_text=True))
    assert m[("lisa_ls_worker_cache_hit_rate", (("worker", "w-cache"),))] == 0.75
    assert ("lisa_ls_worker_cache_hit_rate", (("worker", "w-nocache"),)) not in m  # unknown, not zero
    assert m[("lisa_ls_worker_batches_total", (("worker", "w-cache"),))] == 3.0
    assert m[("lisa_ls_live_workers", ())] == 2.0


def test_health_gives_up_on_a_hung_redis_in_time(queue_config: QueueConfig) -> None:
    # A socket that accepts connections (into its backlog) but never answers: the worst case for a client.
    with socket.socket() as hung:
        hung.bind(("127.0.0.1", 0))
        hung.listen(16)
        url = f"redis://127.0.0.1:{hung.getsockname()[1]}/0"
        app = create_app(BackendConfig(queue=make_config(url)))
        try:
            started = time.monotonic()
            body = app.test_client().get("/health").get_json()
            assert time.monotonic() - started < 1.0
            assert body["status"] == "DOWN" and "Redis is unreachable" in body["reason"]
        finally:
            app.extensions["lisa_ls"].close()


def test_errors_are_json(app: Flask) -> None:
    def boom() -> None:
        raise ValueError("a bug")

    def redis_down() -> None:
        raise RedisDown("Redis is unreachable (test)")

    def busy() -> None:
        raise BusyError(10, 1, 10)

    for rule, view in (("/boom", boom), ("/redis-down", redis_down), ("/busy", busy)):
        app.add_url_rule(rule, view_func=view)
    client = app.test_client()
    cases = {
        "/no-such-page": (404, "not found"),
        "/boom": (500, "ValueError: a bug"),
        "/redis-down": (503, "Redis is unreachable"),
        "/busy": (503, "queue is busy"),
    }
    for path, (status, words) in cases.items():
        reply = client.get(path)
        assert reply.status_code == status and reply.is_json, path
        body = reply.get_json()
        assert body["status"] == status and words.lower() in body["message"].lower(), path
    not_allowed = client.post("/health")
    assert not_allowed.status_code == 405 and not_allowed.is_json and "GET" in not_allowed.headers["Allow"]


def test_state_is_per_app(queue_config: QueueConfig) -> None:
    one, two = (create_app(BackendConfig(queue=queue_config, predict_deadline_s=s)) for s in (10.0, 20.0))
    try:
        with one.app_context():
            assert current_state().config.predict_deadline_s == 10.0
        with two.app_context():
            assert current_state().config.predict_deadline_s == 20.0
            assert current_state().status_queue.config.socket_timeout_s == 0.25  # health_timeout_s / 2
    finally:
        for app in (one, two):
            app.extensions["lisa_ls"].close()
