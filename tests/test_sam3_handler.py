"""worker/gpu/sam3_handler.py: SAM 3 jobs in process, and ``lisa-ls worker --model <SAM 3 folder>`` as a real
process on a real Redis."""

from __future__ import annotations

import signal

import numpy as np
import pytest
from conftest import worker_argv
from redis_fixtures import wait_for
from sam3_fixtures import LOW_THRESHOLD, png_bytes, rgb_image
from test_worker_model import job_for

from model.errors import CheckpointError
from worker.client.protocol import BAD_INPUT, REFINE, Job
from worker.gpu.handler import LisaHandler, load_handler
from worker.gpu.sam3_handler import Sam3Handler

pytest_plugins = ["redis_fixtures", "sam3_fixtures"]


@pytest.fixture
def handler(sam3_predictor):
    return Sam3Handler(sam3_predictor, "sam3-tiny@test", cache_bytes=10 << 20)


def test_concept_queries_and_clicks_share_one_encoding(handler, sam3_predictor):
    image = rgb_image()
    data = png_bytes(image)
    jobs = [
        job_for(data, query="cat", options={"threshold": LOW_THRESHOLD}),
        job_for(data, query="the red car"),  # SAM 3's own threshold, 0.5: nothing on random weights
        job_for(data, kind=REFINE, options={"points": [[10, 20, 1], [60, 30, 0]]}),
        job_for(data, kind=REFINE, query="cat", options={"box": [5, 5, 40, 30]}),
    ]
    cat, car, clicks, box = handler(jobs)
    assert all(r.ok for r in (cat, car, clicks, box)) and handler.cache.misses == 1 and len(handler.cache) == 1
    encoded = sam3_predictor.encode(image)
    found = sam3_predictor.find(encoded, "cat", LOW_THRESHOLD)
    assert len(found.scores) > 1 and np.array_equal(cat.mask_array(), found.masks)
    assert cat.scores == pytest.approx(found.scores.tolist()) and cat.question == "cat"
    assert car.mask_array().shape == (0, 60, 80) and car.scores == [] and car.question == "the red car"
    clicked = sam3_predictor.click(encoded, [(10.0, 20.0, 1), (60.0, 30.0, 0)])
    assert np.array_equal(clicks.mask_array(), clicked.mask[None]) and clicks.scores == pytest.approx([clicked.score])
    assert clicks.question == "" and box.question == "cat" and box.mask_array().shape == (1, 60, 80)
    assert all(r.model_version == "sam3-tiny@test" for r in (cat, car, clicks, box))
    handler([job_for(data, query="dog")])
    assert handler.cache.hits == 1 and handler.stats()["cache_hit_rate"] == 0.5


def test_bad_jobs_are_answered_alone(handler):
    good = png_bytes(rgb_image())
    jobs = [
        job_for(b"not an image", query="cat"),
        job_for(png_bytes(rgb_image(1, 60)), query="cat"),  # 60:1, past worker.client.limits
        job_for(good, query="big " * 12),
        job_for(good, query="cat", options={"threshold": 1.5}),
        job_for(good, query="cat", answer="Sure, [SEG]."),
        job_for(good, kind=REFINE, options={"points": [[100, 10, 1]]}),
        job_for(good, query="cat", options={"threshold": LOW_THRESHOLD}),
    ]
    *bad, ok = handler(jobs)
    assert [r.error_code for r in bad] == [BAD_INPUT] * 6
    undecodable, strip, long, threshold, forced, outside = (r.error_message for r in bad)
    assert "cannot be decoded as an image" in undecodable and "crop it into tiles" in strip
    assert "SAM 3 reads at most 30" in long and "threshold must be a number from 0 to 1" in threshold
    assert "not a teacher-forced answer" in forced and "outside the 80x60 image" in outside
    assert ok.ok and len(ok.scores) > 1


def test_load_handler_picks_the_family(sam3_tiny):
    from conftest import CHECKPOINT, CLIP_TOWER

    handler = load_handler(str(sam3_tiny), None, "fp32", "cpu", None)
    assert isinstance(handler, Sam3Handler) and handler.family == "sam3" and LisaHandler.family == "lisa"
    with pytest.raises(CheckpointError, match="LISA options"):
        load_handler(str(sam3_tiny), str(CLIP_TOWER), "fp32", "cpu", None)
    assert load_handler(str(CHECKPOINT), str(CLIP_TOWER), "fp32", "cpu", None).family == "lisa"


def test_lisa_ls_worker_serves_sam3_jobs(job_queue, queue_config, sam3_tiny, spawn_worker):
    worker = spawn_worker("sam3", queue_config, worker_argv(sam3_tiny, "sam3-v1"))
    job_queue = job_queue.for_family("sam3")  # SAM 3 jobs have their own stream (worker/client/defaults.py)
    workers = wait_for(job_queue.live_workers, timeout=60, what="the worker's heartbeat")
    assert workers[0]["family"] == "sam3" and workers[0]["model_version"] == "sam3-v1"
    data = png_bytes(rgb_image())
    key = job_queue.put_image(data)
    jobs = [Job(image=key, query="cat", options={"threshold": LOW_THRESHOLD}),
            Job(image=key, kind=REFINE, options={"points": [[10, 20, 1]]}),
            Job(image=key, query="big " * 12)]
    job_queue.submit_many(jobs)
    cat, click, long = [job_queue.wait(job, timeout=60) for job in jobs]
    assert cat.ok and len(cat.scores) > 1 and cat.mask_array().shape[1:] == (60, 80)
    assert click.ok and click.mask_array().shape == (1, 60, 80) and len(click.scores) == 1
    assert long.error_code == BAD_INPUT and "SAM 3 reads at most 30" in long.error_message
    assert {r.model_version for r in (cat, click)} == {"sam3-v1"}
    worker.signal(signal.SIGTERM)
    assert worker.wait(timeout=30) == 0
