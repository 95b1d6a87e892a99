"""Task images under load: bounded fetches, one deadline per request, and clicks that download nothing.

A real gunicorn backend (``BackendProcess``), a real Redis, the zero-cost worker of ``tests/worker_proc.py`` where
jobs must be answered, and image hosts on loopback (``image_fixtures.ImageHost``) that answer at once or drip one
byte a second. The hosts are loopback addresses, which the fetcher refuses unless allowed: the backends here allow
them with ``LISA_LS_ALLOWED_PRIVATE_HOSTS``, through the environment like any deployment (issue 16, item 8).
No timing assertions: the tests assert what happened (answers, messages, fetches seen by the hosts).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import redis
import requests
from backend_fixtures import BackendProcess
from image_fixtures import ImageHost, public
from redis_fixtures import wait_for

from backend.config import BackendConfig
from backend.fetching import FetchGate, fetch_each
from backend.images import FetchedImage, FetchSettings, ImageFetcher, ImageFetchError
from backend.labeling import RECOMMENDED_CONFIG
from worker.client.defaults import QueueConfig
from worker.client.queue import JobQueue

pytest_plugins = ["redis_fixtures", "backend_fixtures", "image_fixtures"]


@pytest.fixture
def hosts() -> Iterator[list[ImageHost]]:
    started = [ImageHost(), ImageHost()]
    yield started
    for host in started:
        host.close()


@pytest.fixture
def backend(queue_config: QueueConfig, tmp_path: Path, hosts: list[ImageHost]) -> Iterator[Callable[..., Any]]:
    """``backend(threads=8, **env)``: a gunicorn backend allowed to fetch from ``hosts``, stopped after the test."""
    started: list[BackendProcess] = []

    def start(threads: int = 8, **env: str) -> BackendProcess:
        allowed = ",".join(f"127.0.0.1:{h.port}" for h in hosts)
        proc = BackendProcess(queue_config, tmp_path, {"LISA_LS_ALLOWED_PRIVATE_HOSTS": allowed, "LISA_LS_CAPTURE": "0",
                                                       **env}, threads=threads)
        started.append(proc)
        proc.wait_ready()
        return proc

    yield start
    for proc in started:
        print(f"--- log of backend {proc.url} (exit {proc.stop()}) ---\n{proc.log()[-6000:]}")


def textarea(text: str) -> dict:
    return {"id": "q1", "from_name": "query", "to_name": "image", "type": "textarea", "value": {"text": [text]}}


def click(x: float, y: float, rid: str) -> dict:
    return {"id": rid, "from_name": "clicks", "to_name": "image", "type": "keypointlabels",
            "value": {"x": x, "y": y, "keypointlabels": ["Include"]}}


def predict(backend: BackendProcess, tasks: list[dict], context: dict | None = None, timeout: float = 60,
            project: str = "1.1700000000") -> requests.Response:
    body = {"tasks": tasks, "project": project, "label_config": RECOMMENDED_CONFIG,
            "params": {"login": None, "password": None, "context": context}}
    return requests.post(backend.url + "/predict", json=body, timeout=timeout)


def message(reply: requests.Response) -> str | None:
    """The ``lisa`` TextArea message of an interactive answer (None when it carries regions)."""
    assert reply.status_code == 200, reply.text
    return reply.json()["results"][0].get("error")


@pytest.mark.slow
def test_slow_image_hosts_leave_threads_for_health_and_answer_busy(backend, hosts: list[ImageHost]) -> None:
    # 8 threads: 4 fetch slots, 2 per host. 16 interactive queries on images that never finish downloading.
    proc = backend(threads=8, LISA_LS_FETCH_DEADLINE_S="10")
    a, b = hosts
    tasks = [[{"id": n, "data": {"image": f"{(a, b)[n % 2].url}/slow/{n}.png"}}] for n in range(16)]
    with ThreadPoolExecutor(16) as pool:
        replies = [pool.submit(predict, proc, t, {"result": [textarea("the dog")]}) for t in tasks]
        wait_for(lambda: a.open == 2 and b.open == 2, timeout=30, what="two slow fetches from each host")
        health = requests.get(proc.url + "/health", timeout=10)  # before: every thread held for the 30 s fetch
        webhook = requests.post(proc.url + "/webhook", json={"action": "ANNOTATION_CREATED"}, timeout=10)
        still_fetching = a.open + b.open
        said = [message(r.result()) for r in replies]
    assert health.status_code == 200 and health.json()["image_fetches"]["in_flight"] == 4
    assert webhook.status_code == 200 and still_fetching == 4  # both answered while the slow fetches held slots
    assert a.max_open == b.max_open == 2  # never more than the per-host bound
    busy = [m for m in said if m and m.startswith("busy: ") and "image fetches" in m]
    timed_out = [m for m in said if m and "took longer than 10 s" in m]
    assert (len(busy), len(timed_out)) == (12, 4), said
    # The slots are free again: a fetch from a fast host works.
    assert requests.get(proc.url + "/health", timeout=10).json()["image_fetches"]["in_flight"] == 0


def test_a_batch_fetches_concurrently_under_the_request_deadline(backend, hosts: list[ImageHost], spawn_worker,
                                                                 queue_config: QueueConfig) -> None:
    spawn_worker("w1", queue_config)
    proc = backend(threads=8, LISA_LS_PREDICT_DEADLINE_S="4", LISA_LS_FETCH_PER_HOST="4")
    a, _ = hosts
    slow = [{"id": n, "data": {"image": f"{a.url}/slow/{n}.png", "query": "the dog"}} for n in range(3)]
    reply = predict(proc, slow, timeout=25)  # before: one after another, each with its own 30 s
    assert reply.status_code == 200
    errors = [r["error"] for r in reply.json()["results"]]
    assert all("request's 4 s deadline" in e for e in errors), errors
    assert a.max_open == 3  # fetched side by side
    # Fast and slow images in one batch: the fast ones' jobs are queued (and answered) while the slow one drips.
    fast = [{"id": 10 + n, "data": {"image": f"{a.url}/fast/{n}.png", "query": "the dog"}} for n in range(2)]
    results = predict(proc, [fast[0], slow[0], fast[1]], timeout=25).json()["results"]
    assert [("error" in r) for r in results] == [False, True, False], results
    assert all(r["model_version"] == "test-v1" for r in (results[0], results[2]))
    client = redis.Redis.from_url(queue_config.redis_url)
    served = [job for batch in client.lrange("test:batches", 0, -1) for job in json.loads(batch)["ids"]]
    assert len(served) == 2 and JobQueue(client, queue_config).stats()["depth"] == 0  # no job for a slow image
    client.close()


def test_a_click_reuses_the_image_of_the_tasks_memory(backend, hosts: list[ImageHost], spawn_worker,
                                                      queue_config: QueueConfig) -> None:
    spawn_worker("w1", queue_config)
    proc = backend(threads=4)
    a, _ = hosts
    path = "/fast/photo.png"
    task = {"id": 7, "data": {"image": a.url + path}}
    assert message(predict(proc, [task], {"result": [textarea("the dog")]})) is None
    for n in range(3):
        reply = predict(proc, [task], {"result": [click(10 + n, 20, f"k{n}")]})
        assert reply.status_code == 200 and reply.json()["results"][0]["result"], reply.text
    assert a.gets[path] == 1  # the query fetched it; the three clicks did not
    # Once Redis no longer has the bytes, a click fetches them again (and stores them for the next).
    client = redis.Redis.from_url(queue_config.redis_url)
    queue = JobQueue(client, queue_config)
    assert client.delete(queue.key("img", queue.put_image(ImageHost.png("photo.png")))) == 1
    predict(proc, [task], {"result": [click(50, 50, "k9")]})
    predict(proc, [task], {"result": [click(60, 50, "k10")]})
    assert a.gets[path] == 2
    # A task whose image value changed is fetched anew.
    moved = {**task, "data": {"image": a.url + "/fast/other.png"}}
    predict(proc, [moved], {"result": [click(50, 50, "k11")]})
    assert a.gets["/fast/other.png"] == 1
    client.close()


def test_a_burst_of_quick_fetches_is_served_not_refused(backend, hosts: list[ImageHost], spawn_worker,
                                                        queue_config: QueueConfig) -> None:
    # 40 annotators ask at once, all from one host (Label Studio): more than its 16 slots, but each fetch is quick,
    # so the others wait a moment for a slot instead of being told "busy".
    spawn_worker("w1", queue_config)
    proc = backend(threads=64)
    a, _ = hosts
    tasks = [[{"id": n, "data": {"image": f"{a.url}/fast/{n}.png"}}] for n in range(40)]
    with ThreadPoolExecutor(40) as pool:
        said = list(pool.map(lambda t: message(predict(proc, t, {"result": [textarea("the dog")]})), tasks))
    assert said == [None] * 40, [m for m in said if m]
    assert a.max_open <= 16


# ---- fetch_each itself ----


def _fetcher() -> ImageFetcher:
    return ImageFetcher(FetchSettings.from_config(BackendConfig()), policy=public)


def test_a_batch_larger_than_the_slots_waits_for_its_own_fetches(hosts: list[ImageHost]) -> None:
    a, b = hosts
    gate = FetchGate(total=2, per_host=1)
    items = [(f"{(a, b)[n % 2].url}/fast/{n}.png", n) for n in range(7)]
    outcomes = dict(fetch_each(_fetcher(), gate, items, time.time() + 30, 30))
    assert sorted(outcomes) == list(range(7))
    assert all(isinstance(o, FetchedImage) for o in outcomes.values()), outcomes  # none refused "busy"
    assert a.max_open <= 1 and b.max_open <= 1 and gate.snapshot()["in_flight"] == 0


def test_nothing_is_fetched_past_the_deadline_and_a_full_gate_says_busy(hosts: list[ImageHost]) -> None:
    a, _ = hosts
    late = dict(fetch_each(_fetcher(), FetchGate(4, 4), [(f"{a.url}/fast/x.png", 1)] * 2, time.time() - 1, 60))
    assert all(isinstance(e, ImageFetchError) and e.code == "timeout" and "60 s deadline" in e.message
               for e in late.values()) and not a.gets
    gate = FetchGate(1, 1)
    assert gate.try_acquire(f"127.0.0.1:{a.port}") is None
    [(_, refusal)] = fetch_each(_fetcher(), gate, [(f"{a.url}/fast/y.png", 2)], time.time() + 30, 30)
    assert isinstance(refusal, ImageFetchError) and refusal.code == "busy" and not a.gets
    assert gate.try_acquire(None) is None  # data: URIs take no slot
