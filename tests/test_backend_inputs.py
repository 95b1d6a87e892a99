"""What a request may carry: wrong types, ids, deep JSON, headers, Extra params, Redis trouble and image shapes.

Each is a 4xx (or a 503 for Redis/busy) with a message, shown in the ``lisa`` TextArea when the call is interactive,
never a 500. The app is the real one (``create_app``) on Flask's test client against a real Redis; images are
``data:`` URIs, so no HTTP server is needed, and no worker: every case is refused before a job is queued (the
busy case fills the queue's bound with a job of its own).
"""

from __future__ import annotations

import base64
import dataclasses
import io
import json
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import redis
from flask.testing import FlaskClient
from PIL import Image
from redis_fixtures import RedisServer, make_config

from backend.app import create_app
from backend.config import BackendConfig
from backend.labeling import RECOMMENDED_CONFIG
from backend.state import EXTENSION
from worker.client.defaults import QueueConfig
from worker.client.limits import image_shape_error
from worker.client.protocol import Job
from worker.client.queue import JobQueue

pytest_plugins = ["redis_fixtures"]

NO_MESSAGES = RECOMMENDED_CONFIG.replace('<TextArea name="lisa"', '<Header name="lisa"')


def data_uri(width: int = 32, height: int = 24) -> str:
    buf = io.BytesIO()
    Image.new("L", (width, height), 128).save(buf, "PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


IMAGE = data_uri()


def textarea(text: Any) -> dict:
    return {"id": "q1", "from_name": "query", "to_name": "image", "type": "textarea", "value": {"text": [text]}}


def click(**value: Any) -> dict:
    return {"id": "k1", "from_name": "clicks", "to_name": "image", "type": "keypointlabels",
            "value": {"x": 50, "y": 50, "keypointlabels": ["Include"], **value}}


def box(**value: Any) -> dict:
    return {"id": "b1", "from_name": "box", "to_name": "image", "type": "rectanglelabels",
            "value": {"x": 10, "y": 10, "width": 50, "height": 50, "rotation": 0, **value}}


def body(context: Any = None, tasks: Any = None, project: Any = "1.1700000000", **kw: Any) -> dict:
    tasks = [{"id": 1, "data": {"image": IMAGE}}] if tasks is None else tasks
    return {"tasks": tasks, "project": project, "label_config": kw.pop("config", RECOMMENDED_CONFIG),
            "params": {"login": None, "password": None, "context": context}, **kw}


@pytest.fixture
def make_client(queue_config: QueueConfig) -> Iterator[Callable[..., FlaskClient]]:
    """``make_client(**config)``: the real app (capture off) on the test Redis, closed after the test."""
    apps = []

    def make(**overrides: Any) -> FlaskClient:
        app = create_app(BackendConfig(**{"queue": queue_config, "capture": 0, **overrides}))
        apps.append(app)
        return app.test_client()

    yield make
    for app in apps:
        app.extensions[EXTENSION].close()


@pytest.fixture
def client(make_client: Callable[..., FlaskClient]) -> FlaskClient:
    return make_client()


def shown(reply: Any) -> str:
    """The message an interactive answer puts in the ``lisa`` TextArea."""
    assert reply.status_code == 200, reply.get_data(as_text=True)
    [item] = reply.get_json()["results"]
    [region] = item["result"]
    assert (region["type"], region["from_name"]) == ("textarea", "lisa")
    assert region["value"]["text"][0] == item["error"]
    return item["error"]


WRONG = [
    (body({"result": []}, tasks=[{"id": 1, "data": ["image.png"]}]), "the data of task 1 is a list"),
    (body({"result": []}, tasks=[{"id": 1, "data": "image.png"}]), "the data of task 1 is a string"),
    (body({"result": 5}), "'params.context.result' is a number"),
    (body({"result": [{**textarea("x"), "value": "the dog"}]}), "value of the query textarea is a string"),
    (body({"result": [{**textarea("x"), "value": ["the dog"]}]}), "value of the query textarea is a list"),
    (body({"result": [{**textarea("x"), "value": {"text": 7}}]}), "text of the query textarea is a number"),
    (body({"result": [click(keypointlabels=5)]}), "'keypointlabels' is 5"),
    (body({"result": [box(rotation="45deg")]}), "'rotation' is \"45deg\""),
    (body({"result": [box(rotation=float("nan"))]}), "'rotation' is NaN"),
    (body({"result": [box(rotation=float("inf"))]}), "'rotation' is Infinity"),
    (body({"result": [click(x=[1])]}), "no valid 'x' coordinate"),
    (body({"result": []}, tasks=[{"id": "x" * 100, "data": {"image": IMAGE}}]), "not a Label Studio task id"),
    (body({"result": [textarea("the dog")]}, project="7" * 100_000), "not a Label Studio project id"),
    (body({"result": [textarea("the dog")]}, project=[7]), "the project id is a list"),
]


@pytest.mark.parametrize(("request_body", "message"), WRONG)
def test_wrong_types_are_a_4xx_with_a_message(client: FlaskClient, request_body: dict, message: str) -> None:
    in_ui = client.post("/predict", json=request_body)
    if in_ui.status_code == 200:  # the labeling config is known: the message goes to the lisa TextArea
        assert message in shown(in_ui)
        plain = client.post("/predict", json={**request_body, "label_config": NO_MESSAGES})
    else:  # refused before the config is read (the tasks or the project id): a plain 4xx
        plain = in_ui
    assert 400 <= plain.status_code < 500, plain.get_data(as_text=True)
    assert message in plain.get_json()["message"]


def test_non_object_tasks_and_params_are_refused(client: FlaskClient) -> None:
    for bad, message in (({"tasks": [1, "x"]}, "task 1 of the request is a number"),
                         ({"tasks": [], "params": "ctx"}, "'params' is a string"),
                         ({"tasks": [], "params": {"context": []}}, "'params.context' is a list")):
        reply = client.post("/predict", json=bad)
        assert reply.status_code == 422 and message in reply.get_json()["message"], reply.get_json()


def test_request_ids_never_become_long_redis_keys(client: FlaskClient, queue_config: QueueConfig) -> None:
    huge = "1." + "9" * 10_000_000  # a 10 MB project id, as the issue sent
    setup = {"project": huge, "schema": RECOMMENDED_CONFIG, "extra_params": {"min_area": 4}}
    reply = client.post("/setup", json=setup)
    assert reply.status_code == 422 and "not a Label Studio project id" in reply.get_json()["message"]
    assert len(reply.get_data()) < 1000  # the message quotes 40 characters of it, not 10 MB
    client.post("/predict", json=body({"result": [click()]}, project=huge))
    client.post("/predict", json=body({"result": [click()]}, tasks=[{"id": "9" * 10_000, "data": {"image": IMAGE}}]))
    r = redis.Redis.from_url(queue_config.redis_url)
    assert max((len(k) for k in r.scan_iter()), default=0) < 200
    r.close()
    # Label Studio's own ids pass: "N.timestamp", a bare N, or a number.
    for project in ("12.1700000000", "12", 12):
        ok = client.post("/setup", json={**setup, "project": project})
        assert ok.status_code == 503, ok.get_json()  # no worker running: checked and stored, then "no worker"


@pytest.mark.parametrize("path", ["/predict", "/setup", "/webhook"])
def test_json_nested_100k_deep_is_a_400(client: FlaskClient, path: str) -> None:
    reply = client.post(path, data="[" * 100_000 + "]" * 100_000, content_type="application/json")
    assert reply.status_code == 400 and "nested too deeply" in reply.get_json()["message"]


def test_a_non_ascii_authorization_header_is_a_401(make_client: Callable[..., FlaskClient]) -> None:
    client = make_client(basic_auth_user="annotator", basic_auth_pass="secret")
    for header in ("Basic é", "Basic YW5ub3RhdG9yOnNlY3JldA==é", "Bäsic xyz"):
        reply = client.get("/health", headers={"Authorization": header.encode("utf-8").decode("latin-1")})
        assert reply.status_code == 401 and "authentication required" in reply.get_json()["message"]
    good = base64.b64encode(b"annotator:secret").decode()
    assert client.get("/health", headers={"Authorization": f"Basic {good}"}).status_code == 200


# ---- Extra params ----


def setup(client: FlaskClient, extra: Any, project: str = "5.1700000000") -> Any:
    return client.post("/setup", json={"project": project, "schema": RECOMMENDED_CONFIG, "extra_params": extra})


@pytest.mark.parametrize(("extra", "key"), [
    ({"min_score": "high"}, "'min_score' must be a number"),
    ({"min_score": float("nan")}, "'min_score' must be a number"),
    ({"min_area": 2.5}, "'min_area' must be a whole number"),
    ({"min_area": -1}, "'min_area' must be a whole number"),
    ({"split_instances": "sometimes"}, "'split_instances' must be true or false"),
    ({"split_instances": 2}, "'split_instances' must be true or false"),
    ({"query_field": 3}, "'query_field' must be a string"),
    ({"label": "Dog"}, "'label' is 'Dog', which is not a label"),
    ({"phrase_template": "no placeholder"}, "phrase template must contain exactly one {}"),
    ({"default_query": "x" * 5000}, "'default_query': the query is 5000 characters"),
    ({"min_scor": 0.5}, "unknown key 'min_scor'"),
    ("{not json", "extra_params is not valid JSON"),
    ([1, 2], "extra_params must be a JSON object"),
])
def test_bad_extra_params_are_refused_at_setup_naming_the_key(client: FlaskClient, extra: Any, key: str) -> None:
    reply = setup(client, extra)
    assert reply.status_code == 422 and key in reply.get_json()["message"], reply.get_json()


def test_extra_params_are_stored_typed(client: FlaskClient, queue_config: QueueConfig) -> None:
    extra = {"split_instances": "0", "min_score": "0.25", "min_area": 8.0, "label": "Target", "default_query": "a"}
    assert setup(client, json.dumps(extra)).status_code == 503  # checked and stored; then "no worker is running"
    r = redis.Redis.from_url(queue_config.redis_url)
    key = JobQueue(r, queue_config).key("project", "5")
    stored = json.loads(r.get(key))
    assert stored == {"split_instances": False, "min_score": 0.25, "min_area": 8, "label": "Target",
                      "default_query": "a"}
    setup(client, None)  # emptied in Label Studio: the project's settings are forgotten
    assert r.get(key) is None
    # Settings stored unchecked by an older version: a message to validate again, not a 500 on every /predict.
    r.set(key, json.dumps({"min_score": "high"}))
    message = shown(client.post("/predict", json=body({"result": [textarea("the dog")]}, project="5.1")))
    assert "stored model settings are unusable" in message and "'min_score'" in message
    r.close()


# ---- Redis trouble and a busy queue, in the lisa TextArea ----


def test_redis_down_reaches_the_annotator(make_client: Callable[..., FlaskClient], tmp_path: Any) -> None:
    server = RedisServer(tmp_path)  # never started: nothing listens on its port
    client = make_client(queue=make_config(server.url, redis_down_after_s=0.3))
    for context in ({"result": [textarea("the dog")]}, {"result": [click()]}):
        message = shown(client.post("/predict", json=body(context)))
        assert "Redis is unreachable" in message, message
        plain = client.post("/predict", json=body(context, config=NO_MESSAGES))
        assert plain.status_code == 503 and "Redis is unreachable" in plain.get_json()["message"]
    reply = setup(client, {"min_area": 4})
    assert reply.status_code == 503 and "Redis is unreachable" in reply.get_json()["message"]


def test_a_busy_queue_reaches_the_annotator(make_client: Callable[..., FlaskClient], queue_config: QueueConfig,
                                            job_queue: JobQueue) -> None:
    client = make_client(queue=make_config(queue_config.redis_url, max_queue_length=1))
    job_queue.submit(Job(image=job_queue.put_image(b"x"), query="fills the queue"))
    for context in ({"result": [textarea("the dog")]}, {"result": [click()]}):
        message = shown(client.post("/predict", json=body(context)))
        assert message.startswith("busy: queue is busy"), message


# ---- image shapes LISA refuses ----


@pytest.mark.parametrize(("width", "height"), [(50000, 1), (1, 50000), (6000, 100)])
def test_elongated_images_are_refused_with_the_workers_message(client: FlaskClient, width: int, height: int) -> None:
    expected = image_shape_error(width, height)  # the words the worker answers such a job with
    assert expected is not None and f"the image is {width}x{height} pixels" in expected
    task = [{"id": 3, "data": {"image": data_uri(width, height)}}]
    for context in ({"result": [textarea("the dog")]}, {"result": [click()]}):
        assert shown(client.post("/predict", json=body(context, tasks=task))) == expected
    batch = client.post("/predict", json=body(None, tasks=[{**task[0], "data": {**task[0]["data"], "query": "a"}}]))
    assert batch.status_code == 200 and batch.get_json()["results"] == [{"error": expected}]
    assert image_shape_error(5000, 100) is None and image_shape_error(100, 5000) is None  # 50:1 is fine


def test_no_job_is_queued_once_the_deadline_has_passed(make_client: Callable[..., FlaskClient],
                                                       job_queue: JobQueue, queue_config: QueueConfig) -> None:
    # A 1 ms deadline passes while the request is read and its image checked: nothing may reach the queue (a job
    # submitted already expired would only be dropped by a worker, after taking a slot in the bounded queue).
    # (A deadline must exceed the heartbeat TTL, so that a killed worker's jobs can move in time: shrink it too.)
    client = make_client(predict_deadline_s=0.001, queue=dataclasses.replace(queue_config, heartbeat_ttl_s=0.0005))
    said = shown(client.post("/predict", json=body({"result": [textarea("the dog")]})))
    batch = client.post("/predict", json=body(None, tasks=[{"id": n, "data": {"image": data_uri(64 + n), "query": "a"}}
                                                          for n in range(3)]))
    errors = [r["error"] for r in batch.get_json()["results"]]
    assert all("0.001 s deadline" in e for e in [said, *errors]), (said, errors)
    assert job_queue.stats()["depth"] == 0
