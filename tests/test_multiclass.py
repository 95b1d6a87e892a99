"""Multi-class pre-labelling: ``lisa-ls prelabel --label-query`` (or the connection's Extra params ``queries``)
against a real Redis, a real ``lisa-ls worker`` serving the offline demo model (which answers "red" or "the shape
with no corners" about pictures of shapes, and nothing about an empty picture) and the fake Label Studio of
``tests/test_prelabel.py``; ``/setup`` refusing a ``queries`` map that names a label the config lacks."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import numpy as np
import pytest
import requests
from PIL import Image, ImageDraw
from redis_fixtures import ROOT, RedisServer, config_env, make_config, wait_for
from test_prelabel import TOKEN, FakeLabelStudio, prelabel, state_file, summary

from backend.brush import rle_to_mask
from backend.polygons import rasterize, region_points
from model.synthetic import COLOURS
from worker.client.connection import connect
from worker.client.queue import JobQueue

pytest_plugins = ["redis_fixtures", "backend_fixtures"]

DEMO = ROOT / "models" / "demo"
VERSION = "demo-test"
CONFIG = """<View><Image name="image" value="$image"/>
<BrushLabels name="mask" toName="image"><Label value="Red"/><Label value="Round"/></BrushLabels>
<PolygonLabels name="outline" toName="image"><Label value="Red"/><Label value="Round"/></PolygonLabels></View>"""
QUERIES = {"Red": "red", "Round": "the shape with no corners"}
SIZE = 256


def pictures(folder: Path) -> dict[str, np.ndarray]:
    """``circle.png``: a red circle (both labels' answer); ``empty.png``: no shape at all, on a strongly coloured
    ground (the demo model refuses a picture with no strong colour as unlike its scenes: this one it answers)."""
    background = np.tile(np.array([230, 225, 205], np.uint8), (SIZE, SIZE, 1))
    circle = Image.fromarray(background)
    ImageDraw.Draw(circle).ellipse([88, 88, 168, 168], fill=COLOURS["red"])
    ground = np.tile(np.array([120, 200, 255], np.uint8), (SIZE, SIZE, 1))
    shown = {"circle.png": np.asarray(circle), "empty.png": ground}
    for name, pixels in shown.items():
        Image.fromarray(pixels).save(folder / name)
    return shown


def serve_connections(fake: FakeLabelStudio, connections: dict[int, list[dict]]) -> None:
    """Let the fake answer ``GET /api/ml?project=ID`` (the project's model connections) with ``connections``."""
    handle = fake.handle

    def with_connections(h, method: str) -> None:
        split = urlsplit(h.path)
        if method == "GET" and split.path.rstrip("/") == "/api/ml":
            project = int(parse_qs(split.query).get("project", ["0"])[0])
            return fake.reply(h, 200, connections.get(project, []))
        return handle(h, method)

    fake.handle = with_connections  # the request handler calls fake.handle


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory):
    """Redis + one demo-model worker + the fake Label Studio serving the pictures; yields (fake, env, pictures)."""
    tmp = tmp_path_factory.mktemp("multiclass")
    server = RedisServer(tmp)
    server.start()
    config = make_config(server.url, job_deadline_s=60.0, result_ttl_s=300, visibility_timeout_s=30.0,
                         max_queue_length=500, batch_size=8)
    env = {**os.environ, **config_env(config), "PYTHONPATH": str(ROOT)}
    worker_log = open(tmp / "worker.log", "wb")  # noqa: SIM115 - closed at teardown
    worker = subprocess.Popen([sys.executable, "-m", "worker.cli", "worker", "--model", str(DEMO), "--device", "cpu",
                               "--model-version", VERSION], env=env, stdout=worker_log, stderr=subprocess.STDOUT)
    fake = FakeLabelStudio()
    fake.files = tmp / "files"
    fake.files.mkdir()
    shown = pictures(fake.files)
    connections: dict[int, list[dict]] = {}
    serve_connections(fake, connections)
    queue = JobQueue(connect(config=config), config)
    wait_for(queue.live_workers, timeout=90, what="the demo model worker")
    yield fake, {**env, "LABEL_STUDIO_URL": fake.url, "LABEL_STUDIO_API_KEY": TOKEN, "MODEL_DIR": str(tmp / "md")}, \
        shown, connections
    worker.terminate()
    worker.wait(timeout=30)
    worker_log.close()
    fake.httpd.shutdown()
    server.stop()


def project_of(fake: FakeLabelStudio) -> int:
    project = fake.add_project(["circle.png", "empty.png"])
    fake.projects[project]["label_config"] = CONFIG
    return project


def check_run(fake: FakeLabelStudio, env: dict[str, str], project: int, proc: subprocess.CompletedProcess,
              shown: dict) -> None:
    """One prediction per task: every label's brush and polygons on the circle, no region at all on the empty
    picture; the report counts per label."""
    assert proc.returncode == 0, proc.stderr
    assert summary(proc).startswith(f"prelabel project {project} ({VERSION}): 2 done, 0 skipped, 0 failed")
    per_label = proc.stdout.strip().splitlines()[-2]
    assert per_label == ("per label: Red: 1 task(s) with 2 region(s), nothing found in 1; "
                         "Round: 1 task(s) with 2 region(s), nothing found in 1"), proc.stdout
    circle_task, empty_task = fake.task_ids(project)
    [empty] = fake.predictions_of(empty_task)
    assert empty["result"] == [] and empty["model_version"] == VERSION
    [pred] = fake.predictions_of(circle_task)
    assert pred["model_version"] == VERSION
    by_label: dict[str, dict[str, dict]] = {}
    for region in pred["result"]:
        label = region["value"].get("brushlabels", region["value"].get("polygonlabels"))[0]
        by_label.setdefault(label, {})[region["type"]] = region
        assert region["meta"]["prompt"] == QUERIES[label]  # each label was asked its own query
    assert set(by_label) == {"Red", "Round"}
    truth = np.all(shown["circle.png"] == COLOURS["red"], axis=-1)
    for label, regions in by_label.items():
        assert set(regions) == {"brushlabels", "polygonlabels"}
        mask = rle_to_mask(regions["brushlabels"]["value"]["rle"], SIZE, SIZE)
        outline = rasterize([region_points(regions["polygonlabels"], SIZE, SIZE)], SIZE, SIZE)
        assert (mask & truth).sum() / (mask | truth).sum() > 0.9, label  # the demo model finds the circle
        assert (outline & mask).sum() / (outline | mask).sum() > 0.95, label  # and the polygon outlines it
    state = state_file(env, project)["runs"][-1]
    assert state["queries"] == QUERIES
    assert state["labels"] == {lab: {"tasks": 1, "nothing_found": 1, "regions": 2} for lab in QUERIES}


def run(env: dict[str, str], project: int, *args: str) -> subprocess.CompletedProcess:
    return prelabel(env, project, *args, timeout=180)


def test_each_label_asks_its_own_query_from_the_command_line(stack):
    fake, env, shown, _ = stack
    project = project_of(fake)
    proc = run(env, project, *[f"--label-query={lab}={q}" for lab, q in QUERIES.items()], "--batch", "4")
    check_run(fake, env, project, proc, shown)
    again = run(env, project, *[f"--label-query={lab}={q}" for lab, q in QUERIES.items()])
    assert summary(again).startswith(f"prelabel project {project} ({VERSION}): 0 done, 2 skipped, 0 failed")


def test_each_label_asks_its_own_query_from_the_extra_params(stack):
    fake, env, shown, connections = stack
    project = project_of(fake)
    connections[project] = [{"id": 1, "url": "http://backend:9090", "extra_params": json.dumps({"queries": QUERIES})}]
    check_run(fake, env, project, run(env, project), shown)


@pytest.mark.parametrize(("args", "extra", "message"), [
    (["--label-query", "Knife=what one cuts it with"], None,
     "--label-query names the label 'Knife', which the labeling config's <BrushLabels name=\"mask\"> and "
     "<PolygonLabels name=\"outline\"> lacks: its labels are Red, Round"),
    ([], {"queries": {"Red": "red", "Spoon": "a spoon"}},
     "the model connection's Extra params 'queries' names the label 'Spoon'"),
    ([], {"queries": ["red"]}, "must map labels to queries"),
    (["--label-query", "Red"], None, "write LABEL=QUERY"),
    (["--label-query", "Red=red", "--query", "red"], None, "leave out --query and --label"),
    (["--label-query", "Red=" + "x" * 1001], None, "the query of 'Red': the query is 1001 characters long"),
])
def test_bad_label_queries_are_usage_errors_and_nothing_is_submitted(stack, args, extra, message):
    fake, env, _, connections = stack
    project = project_of(fake)
    if extra is not None:
        connections[project] = [{"id": 1, "extra_params": extra}]
    proc = run(env, project, *args)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert message in proc.stderr
    assert "nothing done (usage or configuration error)" in summary(proc)
    assert all(fake.predictions_of(t) == [] for t in fake.task_ids(project))


def test_setup_refuses_a_queries_map_naming_a_label_the_config_lacks(queue_config, start_backend):
    backend = start_backend(queue_config)
    body = {"project": "5.1", "schema": CONFIG.replace("<View>", '<View><TextArea name="q" toName="image"/>', 1),
            "extra_params": {"queries": {"Red": "red", "Knife": "what one cuts it with"}}}
    r = requests.post(backend.url + "/setup", json=body, timeout=5)
    assert r.status_code == 422
    assert "names the label 'Knife', which the labeling config's" in r.json()["message"]
    body["extra_params"] = json.dumps({"queries": QUERIES, "polygon_tolerance": "wide"})
    r = requests.post(backend.url + "/setup", json=body, timeout=5)
    assert r.status_code == 422 and "polygon_tolerance' must be a number of pixels" in r.json()["message"]
    body["extra_params"] = {"queries": QUERIES, "polygon_tolerance": 2}
    r = requests.post(backend.url + "/setup", json=body, timeout=5)
    assert r.status_code == 503 and "no LISA worker" in r.json()["message"]  # the checks passed
