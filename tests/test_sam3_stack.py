"""SAM 3 beside LISA through the whole stack: one real Redis, one real gunicorn backend, a real ``lisa-ls worker``
of each family (the tiny LISA fixture and a tiny random SAM 3 written at test time), and a loopback HTTP server
standing in for Label Studio's file serving. A LISA project and a SAM 3 project (``"model": "sam3"`` in its Extra
params) are served at once; SAM 3's answers are compared with the predictor called directly on the same weights."""

from __future__ import annotations

import functools
import http.server
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import requests
from backend_fixtures import BackendProcess
from conftest import CASES, FIXTURE, tiny_worker_argv, worker_argv
from redis_fixtures import RedisServer, WorkerProcess, make_config, wait_for
from sam3_fixtures import LOW_THRESHOLD, png_bytes, rgb_image

from backend.brush import rle_to_mask
from backend.labeling import RECOMMENDED_CONFIG
from backend.regions import MESSAGE_ID
from worker.client.connection import connect
from worker.client.queue import JobQueue

pytest_plugins = ["redis_fixtures", "backend_fixtures", "sam3_fixtures"]
pytestmark = pytest.mark.slow
TOKEN = "0123456789abcdef0123456789abcdef01234567"
LISA_QUERY = CASES[1][0]
PHRASE = "cat"
#: The SAM 3 project's Extra params: every tiny instance scoring above LOW_THRESHOLD, no noise filter by area.
SAM3_PARAMS = {"model": "sam3", "score_threshold": LOW_THRESHOLD, "min_area": 0}
SAM3_PROJECT, LISA_PROJECT = "2.1700000000", "1.1700000000"
HEIGHT, WIDTH = 60, 80


def serve_files(folders: list[Path]) -> http.server.ThreadingHTTPServer:
    """Label Studio's ``/data/upload/1/<name>`` for the files of ``folders`` (with its token check)."""

    class Files(http.server.SimpleHTTPRequestHandler):
        def do_GET(self):
            name = self.path.rsplit("/", 1)[-1]
            found = [d / name for d in folders if (d / name).is_file()]
            if self.headers.get("Authorization") != f"Token {TOKEN}" or not found:
                self.send_error(404)
                return
            data = found[0].read_bytes()
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args):
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Files))
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    return httpd


@pytest.fixture(scope="module")
def stack(tmp_path_factory, sam3_tiny):
    """Redis + a LISA worker + a SAM 3 worker + fake Label Studio files + one backend."""
    tmp = tmp_path_factory.mktemp("sam3stack")
    (tmp / "sam3.png").write_bytes(png_bytes(rgb_image(HEIGHT, WIDTH)))
    server = RedisServer(tmp)
    server.start()
    config = make_config(server.url, job_deadline_s=60.0, result_ttl_s=300, visibility_timeout_s=30.0)
    argvs = {"lisa": tiny_worker_argv("tiny-test"), "sam3": worker_argv(sam3_tiny, "sam3-tiny")}
    workers = [WorkerProcess(name, config, tmp, argv, env={"OMP_NUM_THREADS": "1"}) for name, argv in argvs.items()]
    httpd = serve_files([FIXTURE / "cases", tmp])
    backend = BackendProcess(config, tmp, {"LABEL_STUDIO_URL": f"http://127.0.0.1:{httpd.server_address[1]}",
                                           "LABEL_STUDIO_API_KEY": TOKEN, "MODEL_DIR": str(tmp)}, threads=16)
    backend.wait_ready()
    queue = JobQueue(connect(config=config), config)
    wait_for(lambda: len(queue.live_workers()) == 2 or None, timeout=120, what="a LISA and a SAM 3 worker")
    for project, params in ((SAM3_PROJECT, SAM3_PARAMS), (LISA_PROJECT, {})):
        r = setup(backend, project, params)
        assert r.status_code == 200, r.text
    yield backend, config
    backend.stop()
    for worker in workers:
        worker.stop()
        print(f"--- {worker.log_path} ---\n{worker.log()[-3000:]}")
    httpd.shutdown()
    server.stop()
    print(backend.log()[-4000:])


def setup(backend, project: str, params: dict | None) -> requests.Response:
    body = {"project": project, "schema": RECOMMENDED_CONFIG}
    if params is not None:
        body["extra_params"] = params
    return requests.post(backend.url + "/setup", json=body, timeout=10)


def textarea(text: str) -> dict:
    return {"id": "q1", "from_name": "query", "to_name": "image", "type": "textarea", "origin": "manual",
            "value": {"text": [text]}}


def click(x: float, y: float, rid: str = "k1") -> dict:
    return {"id": rid, "from_name": "clicks", "to_name": "image", "type": "keypointlabels", "origin": "manual",
            "original_width": WIDTH, "original_height": HEIGHT, "image_rotation": 0, "is_positive": True,
            "value": {"x": x, "y": y, "width": 0.25, "keypointlabels": ["Include"]}}


def predict(backend, project: str, context: dict, image: str = "sam3.png", tid: int = 1) -> requests.Response:
    body = {"tasks": [{"id": tid, "data": {"image": f"/data/upload/1/{image}"}}], "project": project,
            "label_config": RECOMMENDED_CONFIG, "params": {"context": context}}
    return requests.post(backend.url + "/predict", json=body, timeout=90)


def split(pred: dict) -> tuple[list[dict], list[str]]:
    """The mask regions of a prediction and what its message area says."""
    regions = [r for r in pred["result"] if r["type"] == "brushlabels"]
    said = [t for r in pred["result"] if r.get("id") == MESSAGE_ID for t in r["value"]["text"]]
    return regions, said


def test_setup_reports_each_familys_version_and_refuses_bad_params(stack):
    backend, _ = stack
    assert setup(backend, "9.1", {"model": "sam3"}).json() == {"model_version": "sam3-tiny"}
    assert setup(backend, "9.2", {}).json() == {"model_version": "tiny-test"}
    unknown = setup(backend, "9.3", {"model": "sam4"})
    assert unknown.status_code == 422 and "'lisa' (LISA), 'sam3' (SAM 3)" in unknown.json()["message"]
    lisa_threshold = setup(backend, "9.4", {"score_threshold": 0.3})
    assert lisa_threshold.status_code == 422 and "SAM 3 projects" in lisa_threshold.json()["message"]
    bad = setup(backend, "9.5", {"model": "sam3", "score_threshold": 2})
    assert bad.status_code == 422 and "from 0 to 1" in bad.json()["message"]
    health = requests.get(backend.url + "/health", timeout=5).json()
    assert sorted((w["family"], w["model_version"]) for w in health["workers"]) == [
        ("lisa", "tiny-test"), ("sam3", "sam3-tiny")]


def test_concept_query_gives_the_predictors_instances(stack, sam3_predictor):
    backend, _ = stack
    r = predict(backend, SAM3_PROJECT, {"result": [textarea(PHRASE)]})
    assert r.status_code == 200, r.text
    [pred] = r.json()["results"]
    regions, said = split(pred)
    found = sam3_predictor.find(sam3_predictor.encode(rgb_image(HEIGHT, WIDTH)), PHRASE, LOW_THRESHOLD)
    expected = [(m, s) for m, s in zip(found.masks, found.scores.tolist()) if m.any()]
    assert len(expected) > 1 and len(regions) == len(expected) and said == []
    assert pred["model_version"] == "sam3-tiny"
    for region, (mask, score) in zip(regions, expected):
        got = rle_to_mask(region["value"]["rle"], HEIGHT, WIDTH)
        assert np.array_equal(got, mask)
        assert region["score"] == pytest.approx(score, abs=1e-4) and region["meta"]["family"] == "sam3"
        assert region["meta"]["question"] == PHRASE and region["value"]["brushlabels"] == ["Target"]


def test_a_lisa_and_a_sam3_project_are_served_at_once(stack):
    backend, _ = stack
    with ThreadPoolExecutor(4) as pool:
        calls = [pool.submit(predict, backend, LISA_PROJECT, {"result": [textarea(LISA_QUERY)]}, "case1.png"),
                 pool.submit(predict, backend, SAM3_PROJECT, {"result": [textarea(PHRASE)]}),
                 pool.submit(predict, backend, LISA_PROJECT, {"result": [textarea(LISA_QUERY)]}, "case1.png", 2),
                 pool.submit(predict, backend, SAM3_PROJECT, {"result": [textarea("dog")]}, "sam3.png", 2)]
        answers = [c.result().json()["results"][0] for c in calls]
    assert [a["model_version"] for a in answers] == ["tiny-test", "sam3-tiny", "tiny-test", "sam3-tiny"]
    lisa, sam3 = split(answers[0])[0], split(answers[1])[0]
    assert len(lisa) == 1 and "score" not in lisa[0] and lisa[0]["meta"]["family"] == "lisa"
    assert len(sam3) > 1 and all(r["meta"]["family"] == "sam3" for r in sam3)


def test_click_without_query_is_the_trackers_mask(stack, sam3_predictor):
    backend, _ = stack
    r = predict(backend, SAM3_PROJECT, {"result": [click(50.0, 25.0)]}, tid=7)
    assert r.status_code == 200, r.text
    regions, _ = split(r.json()["results"][0])
    clicked = sam3_predictor.click(sam3_predictor.encode(rgb_image(HEIGHT, WIDTH)), [(40.0, 15.0, 1)], None)
    if not clicked.mask.any():
        assert regions == []
        return
    [region] = regions
    assert np.array_equal(rle_to_mask(region["value"]["rle"], HEIGHT, WIDTH), clicked.mask)
    assert region["meta"]["refined"]["points"] == [[40.0, 15.0, 1]]


def test_nothing_matching_and_an_over_long_phrase_are_said_in_the_message_area(stack):
    backend, _ = stack
    assert setup(backend, "3.1", {"model": "sam3", "score_threshold": 1.0}).status_code == 200
    regions, said = split(predict(backend, "3.1", {"result": [textarea(PHRASE)]}).json()["results"][0])
    assert regions == [] and said == [f"SAM 3 found nothing matching '{PHRASE}'"]
    long = " ".join(["red"] * 31)
    _, said = split(predict(backend, SAM3_PROJECT, {"result": [textarea(long)]}).json()["results"][0])
    assert "31 words" in said[0] and "at most 30 words" in said[0]
    almost = " ".join(["red,"] * 20)  # 20 words, 40 tokens: the worker's exact count says so
    _, said = split(predict(backend, SAM3_PROJECT, {"result": [textarea(almost)]}).json()["results"][0])
    assert said and "bad_input" in said[0] and "30" in said[0]


def test_no_sam3_worker_is_said_at_once(stack, start_backend):
    """A deployment (its own key prefix on the same Redis) with no SAM 3 worker and a 200 s deadline: the answer
    comes as soon as the backend has looked at the worker registry (the request's own 30 s timeout would fail
    the test long before the deadline)."""
    _, config = stack
    env = {"LISA_LS_KEY_PREFIX": "other:", "LISA_LS_PREDICT_DEADLINE_S": "200", "LISA_LS_RESULT_TTL_S": "600",
           "LISA_LS_JOB_DEADLINE_S": "200", "LABEL_STUDIO_URL": "http://127.0.0.1:9", "LABEL_STUDIO_API_KEY": TOKEN}
    lonely = start_backend(config, env)
    r = setup(lonely, "4.1", {"model": "sam3"})
    assert r.status_code == 503 and "no SAM 3 worker is running" in r.json()["message"]
    body = {"tasks": [{"id": 1, "data": {"image": "/data/upload/1/sam3.png"}}], "project": "4.1",
            "label_config": RECOMMENDED_CONFIG, "params": {"context": {"result": [textarea(PHRASE)]}}}
    answer = requests.post(lonely.url + "/predict", json=body, timeout=30)
    _, said = split(answer.json()["results"][0])
    assert said and said[0].startswith("no SAM 3 worker is running: start one with `lisa-ls worker --model")


def test_a_click_after_a_concept_query_adds_one_object_and_later_clicks_refine_it(stack):
    """A concept answer holds many instances; a click segments one object, so it takes over no instance's id (its
    mask would replace an unrelated instance on accept); the next click refines that clicked region."""
    backend, _ = stack
    [pred] = predict(backend, SAM3_PROJECT, {"result": [textarea(PHRASE)]}, tid=8).json()["results"]
    instances = {r["id"] for r in split(pred)[0]}
    assert len(instances) > 1
    first, _ = split(predict(backend, SAM3_PROJECT, {"result": [click(30.0, 40.0)]}, tid=8).json()["results"][0])
    second, _ = split(predict(backend, SAM3_PROJECT, {"result": [click(30.0, 40.0), click(60.0, 50.0, "k2")]},
                              tid=8).json()["results"][0])
    assert len(first) == len(second) == 1 and first[0]["id"] not in instances and second[0]["id"] == first[0]["id"]
    assert first[0]["meta"]["question"] == PHRASE and len(second[0]["meta"]["refined"]["points"]) == 2
