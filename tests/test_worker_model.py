"""The model worker: LisaHandler in process, and ``lisa-ls worker`` as a real process on a real Redis."""

from __future__ import annotations

import signal

import pytest
from conftest import CASES, CHECKPOINT, case_image, tiny_worker_argv
from redis_fixtures import wait_for

from model.preprocess import load_image
from worker.client.protocol import BAD_INPUT, Job, image_hash
from worker.gpu.handler import LisaHandler, model_version

pytest_plugins = ["redis_fixtures"]


def job_for(data: bytes, **kw) -> Job:
    job = Job(image=image_hash(data), **kw)
    job.image_bytes = data
    return job


@pytest.fixture(scope="module")
def handler(tiny_predictor):
    return LisaHandler(tiny_predictor, "tiny@test", cache_bytes=10 << 20)


def test_handler_batches_and_caches(handler, tiny_predictor):
    one, three = case_image(1).read_bytes(), case_image(3).read_bytes()
    jobs = [
        job_for(one, query=CASES[1][0], options={"max_new_tokens": 8}),
        job_for(one, query=CASES[2][0], options={"max_new_tokens": 8}),
        job_for(three, query=CASES[3][0], answer=CASES[3][1]),
    ]
    results = handler(jobs)
    assert [r.job_id for r in results] == [j.id for j in jobs] and all(r.ok for r in results)
    assert handler.cache.misses == 2 and len(handler.cache) == 2  # two images encoded, once each
    encoded = tiny_predictor.encode(load_image(case_image(1)))
    [direct] = tiny_predictor.segment([(encoded, CASES[1][0])], max_new_tokens=8)
    masks = results[0].mask_array()
    assert masks.shape == direct.masks.shape == (1, 480, 640)
    assert (masks != direct.masks).mean() < 1e-4  # batching moves logits by float noise only
    assert results[0].text == direct.text and results[0].model_version == "tiny@test"
    assert results[2].mask_array().shape == (1, 200, 300)
    handler([job_for(one, query=CASES[1][0], options={"max_new_tokens": 2})])
    assert handler.cache.hits >= 1 and handler.stats()["cache_hit_rate"] > 0


def test_bad_jobs_are_answered_alone(handler):
    good = case_image(2).read_bytes()
    jobs = [
        job_for(b"not an image", query="the cat"),
        job_for(good, query="   "),
        job_for(good, query="the cat", options={"max_new_tokens": 100000}),
        job_for(good, query="word " * 3000),
        job_for(good, query=CASES[2][0], options={"max_new_tokens": 4}),
    ]
    bad, empty, limit, long, ok = handler(jobs)
    assert (bad.error_code, empty.error_code, limit.error_code, long.error_code) == (BAD_INPUT,) * 4
    assert "cannot be decoded as an image" in bad.error_message
    assert "query is empty" in empty.error_message
    assert "max_new_tokens must be an integer" in limit.error_message
    assert "too long" in long.error_message
    assert ok.ok and len(ok.mask_array()) <= 4


def test_model_version_follows_the_files(tmp_path):
    assert model_version(CHECKPOINT) == model_version(CHECKPOINT)
    assert model_version(CHECKPOINT, "v7") == "v7"
    (tmp_path / "config.json").write_text("{}")
    assert model_version(tmp_path) != model_version(CHECKPOINT)


def test_lisa_ls_worker_process_serves_the_queue(job_queue, queue_config, spawn_worker):
    worker = spawn_worker("tiny", queue_config, tiny_worker_argv("tiny-v1"))
    workers = wait_for(job_queue.live_workers, timeout=60, what="the worker's heartbeat")
    assert workers[0]["model_version"] == "tiny-v1" and workers[0]["device"] == "cpu"
    assert workers[0]["pid"] == worker.pid
    data = case_image(1).read_bytes()
    key = job_queue.put_image(data)
    jobs = [Job(image=key, query=CASES[1][0], options={"max_new_tokens": 6}),
            Job(image=key, query=CASES[2][0], options={"max_new_tokens": 6}),
            Job(image=key, query=CASES[1][0], answer=CASES[1][1])]
    job_queue.submit_many(jobs)
    results = [job_queue.wait(job, timeout=60) for job in jobs]
    assert all(r.ok for r in results), [r.error_message for r in results]
    assert results[2].mask_array().shape == (1, 480, 640)
    assert all(r.model_version == "tiny-v1" for r in results)
    worker.signal(signal.SIGTERM)
    assert worker.wait(timeout=30) == 0
