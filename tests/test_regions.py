"""Instance splitting (``split_instances``) of large, fragmented answers: bounded memory, a capped region count said in
the ``lisa`` TextArea, and the same RLEs as encoding each instance's full mask.

The end-to-end test runs a real gunicorn backend, a real Redis and a real :class:`~worker.gpu.loop.WorkerLoop` (in a
thread of the test) whose handler answers with a grid of squares at the task image's size.
"""

from __future__ import annotations

import io
import threading
import tracemalloc

import numpy as np
import pytest
import requests
from fake_ls import TOKEN, FakeLabelStudio, Project
from PIL import Image
from redis_fixtures import wait_for

from backend.brush import mask_to_rle, rle_to_mask
from backend.labeling import RECOMMENDED_CONFIG, parse_labeling_config
from backend.regions import MAX_REGIONS, Instances, prediction
from worker.client.protocol import Job, Result
from worker.client.queue import JobQueue
from worker.gpu.loop import WorkerLoop

pytest_plugins = ["redis_fixtures", "backend_fixtures"]
SETUP = parse_labeling_config(RECOMMENDED_CONFIG)


def grid(height: int, width: int, n: int, specks: int = 0, cell: int = 40) -> np.ndarray:
    """``n`` squares (sides 4-35 px) on a ``height x width`` canvas, one per ``cell``-px cell row-major, plus
    ``specks`` single pixels along the bottom rows."""
    mask = np.zeros((height, width), bool)
    per_row = width // cell
    for i in range(n):
        y, x = (i // per_row) * cell, (i % per_row) * cell
        side = 4 + (i * 7) % (cell - 8)
        mask[y : y + side, x : x + side] = True
    for j in range(specks):
        mask[height - 1 - 2 * (j // (width // 2)), 2 * (j % (width // 2))] = True
    return mask


def blobs(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    field = Image.fromarray(rng.random((height // 8, width // 8)).astype(np.float32))
    return np.asarray(field.resize((width, height), Image.BILINEAR)) > 0.62


def test_instances_encode_like_their_full_masks() -> None:
    rng = np.random.default_rng(5)
    for height, width in ((64, 48), (97, 131), (1, 50), (50, 1)):
        mask = blobs(rng, max(height, 8), max(width, 8))[:height, :width]
        found = Instances.find(mask)
        assert len(found.order) == int(found.labels.max())
        sizes = [int((found.labels == k).sum()) for k in found.order]
        assert sizes == sorted(sizes, reverse=True)
        for k in found.order:
            full = found.labels == k
            assert found.rle(k) == mask_to_rle(full)
            assert np.array_equal(rle_to_mask(found.rle(k), height, width), full)
    # Specks under min_pixels are left out; an empty mask has none.
    assert len(Instances.find(grid(200, 200, 5, specks=30), min_pixels=2).order) == 5
    assert Instances.find(np.zeros((9, 9), bool)).order == []


def test_splitting_a_fragmented_answer_holds_one_instance_at_a_time() -> None:
    """300 instances on a 1200 x 1600 canvas. Before: one full-size mask per instance at once (300 x 1.9 MB);
    now the label image (4 bytes a pixel) and one instance's rows."""
    height, width = 1200, 1600
    masks = grid(height, width, 300, specks=2000)[None]
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        before = tracemalloc.get_traced_memory()[0]
        pred = prediction(masks, [0.9], SETUP, "Target", "v1", "squares", split=True, min_area=16,
                          max_regions=400)
        peak = tracemalloc.get_traced_memory()[1] - before
    finally:
        tracemalloc.stop()
    assert len(pred["result"]) == 300
    pixels = height * width
    assert peak < 12 * pixels, f"peak {peak / 2**20:.1f} MiB for a {pixels / 1e6:.1f} MP answer"


def test_a_capped_answer_keeps_the_largest_and_says_so() -> None:
    masks = grid(400, 600, 150, specks=50)[None]
    sizes = sorted((int(v) for v in np.bincount(Instances.find(masks[0]).labels.ravel())[1:]), reverse=True)
    interactive = prediction(masks, [0.8], SETUP, "Target", "v1", "the squares", split=True, min_area=16,
                             message=True)
    brushes = [r for r in interactive["result"] if r["type"] == "brushlabels"]
    [said] = [r for r in interactive["result"] if r["type"] == "textarea"]
    assert len(brushes) == MAX_REGIONS
    assert [int(rle_to_mask(r["value"]["rle"], 400, 600).sum()) for r in brushes] == sizes[:MAX_REGIONS]
    assert said["from_name"] == "lisa" and said["readonly"]
    assert said["value"]["text"] == [f"LISA found 150 separate regions for 'the squares'; showing the {MAX_REGIONS} "
                                     f"largest (at most {MAX_REGIONS} per answer). Turn split_instances off for "
                                     "this project to get the whole mask as one region."]
    batch = prediction(masks, [0.8], SETUP, "Target", "v1", "the squares", split=True, min_area=16)
    assert [r["type"] for r in batch["result"]] == ["brushlabels"] * MAX_REGIONS  # a stored prediction: no text
    # Under the cap nothing is said; without split the mask stays one region.
    few = prediction(masks[:, :80], [0.8], SETUP, "Target", "v1", "q", split=True, min_area=16, message=True)
    said_few = [r["value"]["text"] for r in few["result"] if r["type"] == "textarea"]
    assert said_few == [[]] and len([r for r in few["result"] if r["type"] == "brushlabels"]) == 30
    whole = prediction(masks, [0.8], SETUP, "Target", "v1", "q", min_area=16, message=True)
    assert len([r for r in whole["result"] if r["type"] == "brushlabels"]) == 1


def squares_handler(jobs: list[Job]) -> list[Result]:
    """A worker's batch function: each answer is a grid of N squares at the image's size, N the query's number."""
    out = []
    for job in jobs:
        with Image.open(io.BytesIO(job.image_bytes or b"")) as im:
            width, height = im.size
        n = int(str(job.options.get("query", "0")).split()[0])
        out.append(Result.from_masks(job.id, grid(height, width, n, specks=40)[None], [0.7]))
    return out


@pytest.fixture
def squares_worker(queue_config):
    loop = WorkerLoop.from_url(squares_handler, config=queue_config, name="squares", model_version="squares-1")
    thread = threading.Thread(target=loop.run, kwargs={"install_signals": False}, daemon=True)
    thread.start()
    queue = JobQueue(loop.queue.redis, queue_config)
    wait_for(queue.live_workers, timeout=20, what="the squares worker")
    yield
    loop.stop()
    thread.join(10)


def test_a_fragmented_answer_is_capped_through_the_backend(queue_config, squares_worker, start_backend,
                                                           tmp_path) -> None:
    project = Project()
    project.add_task(1, width=1000, height=800)
    ls = FakeLabelStudio(project)
    backend = start_backend(queue_config, {"LABEL_STUDIO_URL": ls.url, "LABEL_STUDIO_API_KEY": TOKEN,
                                           "MODEL_DIR": str(tmp_path), "LISA_LS_SPLIT_INSTANCES": "1"})
    task = {"id": 1, "data": {"image": "/data/upload/1/img1.png"}}

    def ask(query: str, interactive: bool = True) -> list[dict]:
        context = {"result": [{"id": "q", "from_name": "query", "to_name": "image", "type": "textarea",
                               "value": {"text": [query]}}]} if interactive else None
        body = {"tasks": [{**task, "data": {**task["data"], "query": query}}], "project": "1.1",
                "label_config": RECOMMENDED_CONFIG, "params": {"context": context}}
        r = requests.post(backend.url + "/predict", json=body, timeout=60)
        assert r.status_code == 200, r.text
        return r.json()["results"][0]["result"]

    try:
        answer = ask("300 squares")
        assert [r["type"] for r in answer] == ["brushlabels"] * MAX_REGIONS + ["textarea"]
        assert answer[-1]["value"]["text"][0].startswith("LISA found 300 separate regions for '300 squares'")
        assert all(r["original_width"] == 1000 and r["original_height"] == 800 for r in answer[:-1])
        assert [r["type"] for r in ask("300 squares", interactive=False)] == ["brushlabels"] * MAX_REGIONS
        assert [r["type"] for r in ask("12 squares")] == ["brushlabels"] * 12 + ["textarea"]  # specks dropped
        assert "Traceback" not in backend.log()
    finally:
        ls.close()
