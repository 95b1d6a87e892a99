"""``/setup``, ``/predict`` and ``/webhook`` as Label Studio calls them: a real gunicorn backend, a real Redis, a real
``lisa-ls worker`` with the tiny LISA, and a loopback HTTP server standing in for Label Studio's file serving."""

from __future__ import annotations

import atexit
import functools
import http.server
import os
import re
import shutil
import subprocess
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import requests
from backend_fixtures import BackendProcess
from conftest import CASES, FIXTURE, tiny_worker_argv
from redis_fixtures import ROOT, RedisServer, config_env, make_config, wait_for

from backend.brush import rle_to_mask
from backend.labeling import RECOMMENDED_CONFIG
from backend.regions import MESSAGE_ID
from worker.client.connection import connect
from worker.client.metrics import JOBS_KEY
from worker.client.queue import JobQueue

pytest_plugins = ["redis_fixtures", "backend_fixtures"]
TOKEN = "0123456789abcdef0123456789abcdef01234567"
QUERY = CASES[1][0]
#: More images the fake Label Studio serves at /data/upload/1/<name> (tests write them here).
UPLOADS = Path(tempfile.mkdtemp(prefix="lisa_uploads_"))
atexit.register(shutil.rmtree, UPLOADS, True)
#: The recommended config as it was before the message TextArea: errors are then HTTP errors.
NO_MESSAGES = RECOMMENDED_CONFIG.replace('<TextArea name="lisa"', '<Header name="lisa"')


def textarea(text: str, name: str = "query") -> dict:
    return {"id": "q1", "from_name": name, "to_name": "image", "type": "textarea", "origin": "manual",
            "value": {"text": [text]}}


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    """Redis + one tiny-model worker + a fake Label Studio serving /data/upload/1/caseN.png + the backend."""
    tmp = tmp_path_factory.mktemp("predict")
    server = RedisServer(tmp)
    server.start()
    config = make_config(server.url, job_deadline_s=60.0, result_ttl_s=300, visibility_timeout_s=30.0,
                         max_queue_length=500, batch_size=8)
    env = {**os.environ, **config_env(config), "PYTHONPATH": str(ROOT)}
    worker_log = open(tmp / "worker.log", "wb")  # noqa: SIM115 - closed at teardown
    worker = subprocess.Popen(tiny_worker_argv("tiny-test"), env=env, stdout=worker_log, stderr=subprocess.STDOUT)
    files = FIXTURE / "cases"

    class LabelStudioFiles(http.server.SimpleHTTPRequestHandler):
        def do_GET(self):
            if self.headers.get("Authorization") != f"Token {TOKEN}":
                self.send_error(401)
                return
            name = self.path.rsplit("/", 1)[-1]
            found = [d / name for d in (files, UPLOADS) if (d / name).is_file()]
            data = found[0].read_bytes() if found else None
            if self.path.startswith("/data/upload/1/") and data:
                self.send_response(200)
                self.send_header("Content-Type", "image/png")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)
            elif self.path == "/data/upload/1/broken.png":
                self.send_response(200)
                self.end_headers()
                self.wfile.write(b"\x89PNG\r\n\x1a\n garbage")
            else:
                self.send_error(404)

        def log_message(self, *args):
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(LabelStudioFiles))
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    ls_url = f"http://127.0.0.1:{httpd.server_address[1]}"
    backend = BackendProcess(config, tmp, {"LABEL_STUDIO_URL": ls_url, "LABEL_STUDIO_API_KEY": TOKEN,
                                           "MODEL_DIR": str(tmp)}, threads=64)
    backend.wait_ready()
    queue = JobQueue(connect(config=config), config)
    wait_for(queue.live_workers, timeout=90, what="the model worker")
    yield backend, queue
    backend.stop()
    worker.terminate()
    worker.wait(timeout=30)
    worker_log.close()
    httpd.shutdown()
    server.stop()
    print(Path(backend.log_path).read_text(errors="replace")[-4000:])


def task(n: int = 1, **data) -> dict:
    return {"id": n, "data": {"image": f"/data/upload/1/case{n}.png", **data}}


def predict(backend, tasks, context=None, config=RECOMMENDED_CONFIG, project="1.1700000000", timeout=90):
    body = {"tasks": tasks, "project": project, "label_config": config,
            "params": {"login": None, "password": None, "context": context}}
    return requests.post(backend.url + "/predict", json=body, timeout=timeout)


def test_setup_reports_the_workers_version_and_refuses_bad_configs(stack):
    backend, _ = stack
    ok = requests.post(backend.url + "/setup", json={"project": "1.17", "schema": RECOMMENDED_CONFIG}, timeout=5)
    assert ok.status_code == 200 and ok.json() == {"model_version": "tiny-test"}
    no_text = RECOMMENDED_CONFIG.replace("TextArea", "Header")
    r = requests.post(backend.url + "/setup", json={"project": "1.17", "schema": no_text}, timeout=5)
    assert r.status_code == 422 and "no <TextArea> for the query" in r.json()["message"]
    no_brush = '<View><Image name="image" value="$image"/><TextArea name="q" toName="image"/></View>'
    r = requests.post(backend.url + "/setup", json={"project": "1.17", "schema": no_brush}, timeout=5)
    assert r.status_code == 422 and "<BrushLabels>" in r.json()["message"]
    r = requests.post(backend.url + "/setup", json={"project": "1.17", "schema": "<View><Image"}, timeout=5)
    assert r.status_code == 422 and "not valid XML" in r.json()["message"]
    r = requests.post(backend.url + "/setup", data="{not json", timeout=5)
    assert r.status_code == 400


def test_interactive_query_gives_an_editable_brush_region(stack):
    backend, _ = stack
    r = predict(backend, [task(1)], {"result": [textarea(QUERY)]})
    assert r.status_code == 200, r.text
    [pred] = r.json()["results"]
    assert pred["model_version"] == "tiny-test"
    [region, said] = pred["result"]  # the tiny model answers "[SEG] ..." for this query: one mask (+ no message)
    assert said["from_name"] == "lisa" and said["value"] == {"text": []}
    assert region["origin"] == "prediction" and region["type"] == "brushlabels"
    assert (region["from_name"], region["to_name"]) == ("mask", "image")
    assert (region["original_width"], region["original_height"]) == (640, 480)
    assert region["value"]["brushlabels"] == ["Target"] and region["meta"]["prompt"] == QUERY
    mask = rle_to_mask(region["value"]["rle"], 480, 640)
    assert mask.any() and mask.shape == (480, 640)


def test_calls_without_a_query_answer_at_once(stack):
    backend, queue = stack
    jobs_run = queue.redis.hgetall(queue.config.key(JOBS_KEY))
    assert predict(backend, [task(1), task(2)]).json() == {"results": []}  # task open: context null
    assert predict(backend, [task(1)], {"result": []}).json() == {"results": [{"result": [], "score": 0}]}
    assert predict(backend, [task(1)], {"result": [textarea("   ")]}).json()["results"][0]["result"] == []
    # At once: answered without queueing anything for the worker (its counter of answered jobs did not move).
    assert queue.redis.hgetall(queue.config.key(JOBS_KEY)) == jobs_run and queue.stats()["depth"] == 0


def test_batch_predictions_use_the_task_query_field(stack):
    backend, _ = stack
    r = predict(backend, [task(1, query="the red object"), task(2), task(3, query="the blue square")])
    results = r.json()["results"]
    assert len(results) == 3
    assert results[0]["model_version"] == "tiny-test" and "result" in results[0]
    assert "result" not in results[1]  # no query: Label Studio skips an item without "result"
    for res in (results[0], results[2]):
        for region in res["result"]:
            assert region["origin"] == "prediction"


def test_project_default_query_from_extra_params(stack):
    backend, _ = stack
    setup = {"project": "7.123", "schema": RECOMMENDED_CONFIG, "extra_params": {"default_query": "the red object"}}
    assert requests.post(backend.url + "/setup", json=setup, timeout=5).status_code == 200
    results = predict(backend, [task(1), task(2)], project="7.123").json()["results"]
    assert all(r["model_version"] == "tiny-test" for r in results)


@pytest.mark.parametrize(("tasks", "query", "message"), [
    ([{"id": 5, "data": {"text": "no image here"}}], QUERY, "the task has no 'image' field"),
    ([task(9)], QUERY, "404"),
    ([{"id": 4, "data": {"image": "/data/upload/1/broken.png"}}], QUERY, "image"),
    ([{"id": 6, "data": {"image": "http://10.1.2.3/x.png"}}], QUERY, "private"),
    ([{"id": 7, "data": {"image": "file:///etc/passwd"}}], QUERY, "file"),
    ([task(1)], "x" * 10_000, "the limit is 1000"),
    ([task(1)], "the \x07 bell", "control characters"),
])
def test_bad_input_is_a_readable_error(stack, tasks, query, message):
    backend, _ = stack
    r = predict(backend, tasks, {"result": [textarea(query)]}, config=NO_MESSAGES)
    assert r.status_code in (400, 422), r.text
    assert message.lower() in r.json()["message"].lower()
    # With the recommended config's message TextArea, the labeling UI shows it (Label Studio hides errors).
    r = predict(backend, tasks, {"result": [textarea(query)]})
    assert r.status_code == 200, r.text
    [shown] = r.json()["results"][0]["result"]
    assert (shown["type"], shown["from_name"]) == ("textarea", "lisa")
    assert shown["value"]["text"][0] == r.json()["results"][0]["error"]
    assert message.lower() in shown["value"]["text"][0].lower()
    assert requests.get(backend.url + "/health", timeout=1).status_code == 200  # still up


def test_each_interactive_answer_replaces_the_message(stack):
    """Issue 22.1: after a refused query the next good answer clears the message (an empty text, same id), so that
    the ``lisa`` box never shows a stale one; the answer's mask carries no (uncalibrated) score."""
    backend, _ = stack
    refused = predict(backend, [task(1)], {"result": [textarea("x" * 1100)]}).json()["results"][0]["result"]
    assert [(r["id"], r["from_name"]) for r in refused] == [(MESSAGE_ID, "lisa")]
    assert "1100 characters" in refused[0]["value"]["text"][0]
    good = predict(backend, [task(1)], {"result": [textarea(QUERY)]}).json()["results"][0]
    assert [r["type"] for r in good["result"]] == ["brushlabels", "textarea"]
    assert (good["result"][1]["id"], good["result"][1]["value"]) == (MESSAGE_ID, {"text": []})
    assert "score" not in good["result"][0] and good["score"] is None
    assert isinstance(good["result"][0]["meta"]["sam_score"], float)


def test_the_message_box_is_never_read_as_the_query(stack):
    """A config whose only TextArea on the image is the read-only message box (queries from the task data): what
    the box said is not a query."""
    backend, _ = stack
    no_query = RECOMMENDED_CONFIG.replace('<TextArea name="query"', '<Header name="query"')
    said = textarea("LISA found nothing matching 'the red object'", name="lisa")
    assert predict(backend, [task(1)], {"result": [said]}, config=no_query).json() == {
        "results": [{"result": [], "score": 0}]}


def test_malformed_requests(stack):
    backend, _ = stack
    assert requests.post(backend.url + "/predict", data="{oops", timeout=5).status_code == 400
    assert requests.post(backend.url + "/predict", json={"tasks": "x"}, timeout=5).status_code == 400
    r = predict(backend, [task(1)], {"result": [textarea(QUERY)]}, config="<View/>")
    assert r.status_code == 422 and "no <Image" in r.json()["message"]


def test_webhook_acknowledges_at_once(stack):
    backend, _ = stack
    body = {"action": "ANNOTATION_CREATED", "annotation": {"id": 3, "result": []}, "task": {"id": 1}}
    r = requests.post(backend.url + "/webhook", json=body, timeout=30)  # seconds: bench/bench_backend_latency.py
    assert r.status_code == 200 and r.json()["status"] == "ok" and re.fullmatch(r"\d+-\d+", r.json()["event"])
    assert requests.post(backend.url + "/webhook", json={"action": "PROJECT_DELETED"}, timeout=1).json() == {
        "status": "Unknown event"}
    assert requests.post(backend.url + "/webhook", data="nope", timeout=1).status_code == 400


def test_health_stays_fast_with_50_interactive_requests_in_flight(stack):
    backend, _ = stack
    contexts = [{"result": [textarea(f"the red object number {i}")]} for i in range(50)]
    with ThreadPoolExecutor(50) as pool:
        futures = [pool.submit(predict, backend, [task(1 + i % 3)], c, timeout=120) for i, c in enumerate(contexts)]
        time.sleep(0.5)
        health_times = []
        while not all(f.done() for f in futures):
            t0 = time.perf_counter()
            assert requests.get(backend.url + "/health", timeout=5).status_code == 200
            health_times.append(time.perf_counter() - t0)
            time.sleep(0.2)
        statuses = [f.result().status_code for f in futures]
    assert statuses == [200] * 50
    assert health_times  # answered while predictions were in flight; its seconds: bench/bench_backend_latency.py
    print(f"/health during 50 in-flight predictions: max {max(health_times) * 1e3:.0f} ms, "
          f"median {np.median(health_times) * 1e3:.0f} ms over {len(health_times)} probes")
