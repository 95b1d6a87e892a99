"""``lisa-ls prelabel`` against a real Redis, a real ``lisa-ls worker`` with the tiny LISA, and a fake Label Studio.

The fake Label Studio is an ``http.server`` on loopback with in-memory state implementing the calls the command
makes, as Label Studio 1.23 answers them (``backend/lsclient.py``): projects, paginated tasks with their
predictions (404 past the last page; page size capped, as ``TASK_API_PAGE_SIZE_MAX`` may), predictions, the
personal-access-token exchange, and ``/data/upload/1/...`` image files. The command runs as a subprocess, as a
curator runs it. One more test runs it against the real Label Studio 1.23.2 of ``tests/ls_fixtures.py``.
"""

from __future__ import annotations

import argparse
import base64
import http.server
import io
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest
from conftest import CASES, FIXTURE, tiny_worker_argv
from PIL import Image
from redis_fixtures import ROOT, RedisServer, config_env, free_port, make_config, wait_for

from backend.brush import rle_to_mask
from backend.cli import add_backend_parsers
from backend.labeling import RECOMMENDED_CONFIG
from backend.lsclient import LabelStudioClient, LabelStudioError
from backend.prelabel import Progress
from worker.client.connection import connect
from worker.client.queue import JobQueue

pytest_plugins = ["redis_fixtures", "ls_fixtures"]
TOKEN = "0123456789abcdef0123456789abcdef01234567"
VERSION = "tiny-test"
PAGE_CAP = 4  # the fake's largest page, below the client's 100: pagination must not stop at a "short" page


def jwt(claims: dict[str, Any]) -> str:
    """An unsigned-looking JWT (Label Studio verifies them; the client only reads ``exp``)."""
    part = lambda d: base64.urlsafe_b64encode(json.dumps(d).encode()).rstrip(b"=").decode()  # noqa: E731
    return f"{part({'alg': 'HS256', 'typ': 'JWT'})}.{part(claims)}.c2ln"


def size(image: str) -> tuple[int, int]:
    """``(width, height)`` of a fixture image (``caseN.png``)."""
    with Image.open(FIXTURE / "cases" / image) as im:
        return im.size


PAT = jwt({"token_type": "refresh", "exp": time.time() + 86400, "jti": "pat"})


class FakeLabelStudio:
    """In-memory projects, tasks and predictions behind Label Studio's REST paths."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.projects: dict[int, dict[str, Any]] = {}
        self.tasks: dict[int, dict[str, Any]] = {}
        self.predictions: list[dict[str, Any]] = []
        self.access_tokens: set[str] = set()
        self.exchanges = 0
        self.fail_lists = 0  # answer this many task listings with 502 (a proxy in front of a restarting LS)
        self.files = FIXTURE / "cases"
        fake = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                fake.handle(self, "GET")

            def do_POST(self) -> None:
                fake.handle(self, "POST")

            def log_message(self, *args: Any) -> None:
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def add_project(self, images: list[str], queries: list[str | None] | None = None, shape: str = "dict") -> int:
        """A project of image tasks (``caseN.png`` names under /data/upload/1/); returns its id."""
        with self.lock:
            pid = len(self.projects) + 1
            self.projects[pid] = {"id": pid, "title": f"p{pid}", "label_config": RECOMMENDED_CONFIG, "shape": shape}
            for i, name in enumerate(images):
                tid = 100 * pid + i + 1
                data = {"image": f"/data/upload/1/{name}"}
                if queries and queries[i]:
                    data["query"] = queries[i]
                self.tasks[tid] = {"id": tid, "project": pid, "data": data}
        return pid

    def task_ids(self, project: int) -> list[int]:
        return sorted(t for t, task in self.tasks.items() if task["project"] == project)

    def predictions_of(self, task: int) -> list[dict[str, Any]]:
        with self.lock:
            return [p for p in self.predictions if p["task"] == task]

    def count(self, project: int) -> int:
        ids = set(self.task_ids(project))
        with self.lock:
            return sum(p["task"] in ids for p in self.predictions)

    # ---- the HTTP side ----

    def handle(self, h: http.server.BaseHTTPRequestHandler, method: str) -> None:
        split = urlsplit(h.path)
        path, query = split.path.rstrip("/"), {k: v[-1] for k, v in parse_qs(split.query).items()}
        body = json.loads(h.rfile.read(int(h.headers.get("Content-Length") or 0)) or b"null")
        if (method, path) == ("POST", "/api/token/refresh"):
            if body != {"refresh": PAT}:
                return self.reply(h, 401, {"detail": "Token is invalid or expired"})
            with self.lock:
                self.exchanges += 1
                access = jwt({"token_type": "access", "exp": time.time() + 300, "n": self.exchanges})
                self.access_tokens.add(access)
            return self.reply(h, 200, {"access": access})
        auth = h.headers.get("Authorization", "")
        if auth != f"Token {TOKEN}" and auth.removeprefix("Bearer ") not in self.access_tokens:
            return self.reply(h, 401, {"detail": "Invalid token."})
        if method == "GET" and path.startswith("/data/upload/1/"):
            name = path.rsplit("/", 1)[-1]
            if name == "broken.png":
                return self.reply(h, 200, b"\x89PNG\r\n\x1a\n garbage", "image/png")
            if (self.files / name).is_file() and name.endswith(".png"):
                return self.reply(h, 200, (self.files / name).read_bytes(), "image/png")
            return self.reply(h, 404, {"detail": "Not found."})
        if method == "GET" and path.startswith("/api/projects/"):
            project = self.projects.get(int(path.rsplit("/", 1)[-1]))
            return self.reply(h, 200, project) if project else self.reply(h, 404, {"detail": "Not found."})
        if (method, path) == ("GET", "/api/tasks"):
            with self.lock:
                failing, self.fail_lists = self.fail_lists > 0, max(0, self.fail_lists - 1)
            return self.reply(h, 502, b"Bad Gateway", "text/plain") if failing else self.list_tasks(h, query)
        if (method, path) == ("POST", "/api/predictions"):
            with self.lock:
                if not isinstance(body, dict) or body.get("task") not in self.tasks:
                    return self.reply(h, 400, {"validation_errors": {"task": ["Invalid pk"]}})
                record = {"id": len(self.predictions) + 1, **body}
                self.predictions.append(record)
            return self.reply(h, 201, record)
        return self.reply(h, 404, {"detail": "Not found."})

    def list_tasks(self, h: http.server.BaseHTTPRequestHandler, query: dict[str, str]) -> None:
        project = self.projects.get(int(query.get("project", 0)))
        if project is None:
            return self.reply(h, 404, {"detail": "Not found."})
        size, page = min(int(query.get("page_size", 100)), PAGE_CAP), int(query.get("page", 1))
        ids = self.task_ids(project["id"])
        if page < 1 or (page > 1 and (page - 1) * size >= len(ids)):
            return self.reply(h, 404, {"detail": "Invalid page."})  # as Django REST framework answers
        with self.lock:
            tasks = [{**self.tasks[t], "predictions": [p for p in self.predictions if p["task"] == t]}
                     for t in ids[(page - 1) * size: page * size]]
        shaped = {"tasks": tasks, "total": len(ids)} if project["shape"] == "dict" else tasks
        return self.reply(h, 200, shaped)

    @staticmethod
    def reply(h: http.server.BaseHTTPRequestHandler, status: int, body: Any, ctype: str = "application/json") -> None:
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        h.send_response(status)
        h.send_header("Content-Type", ctype)
        h.send_header("Content-Length", str(len(data)))
        h.end_headers()
        h.wfile.write(data)


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory):
    """Redis + one tiny-model worker + the fake Label Studio; yields (fake, env for the command)."""
    tmp = tmp_path_factory.mktemp("prelabel")
    server = RedisServer(tmp)
    server.start()
    config = make_config(server.url, job_deadline_s=60.0, result_ttl_s=300, visibility_timeout_s=30.0,
                         max_queue_length=500, batch_size=8)
    env = {**os.environ, **config_env(config), "PYTHONPATH": str(ROOT)}
    worker_log = open(tmp / "worker.log", "wb")  # noqa: SIM115 - closed at teardown
    worker = subprocess.Popen(tiny_worker_argv(VERSION), env=env, stdout=worker_log, stderr=subprocess.STDOUT)
    fake = FakeLabelStudio()
    queue = JobQueue(connect(config=config), config)
    wait_for(queue.live_workers, timeout=90, what="the model worker")
    yield fake, {**env, "LABEL_STUDIO_URL": fake.url, "LABEL_STUDIO_API_KEY": TOKEN, "MODEL_DIR": str(tmp / "md")}
    worker.terminate()
    worker.wait(timeout=30)
    worker_log.close()
    fake.httpd.shutdown()
    server.stop()


def command(project: int, *args: str) -> list[str]:
    return [sys.executable, "-m", "backend.cli", "prelabel", "--project", str(project), *args]


def prelabel(env: dict[str, str], project: int, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(command(project, *args), env=env, cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout)


def summary(proc: subprocess.CompletedProcess) -> str:
    """The last stdout line (the one-line summary)."""
    return proc.stdout.strip().splitlines()[-1]


def state_file(env: dict[str, str], project: int) -> dict[str, Any]:
    return json.loads((Path(env["MODEL_DIR"]) / "prelabel" / f"project-{project}.json").read_text())


def assert_one_prediction_each(fake: FakeLabelStudio, project: int) -> list[dict[str, Any]]:
    preds = []
    for task in fake.task_ids(project):
        found = fake.predictions_of(task)
        assert len(found) == 1, f"task {task} has {len(found)} predictions"
        preds += found
    return preds


def test_full_run_writes_one_prediction_per_task_and_a_rerun_skips_all(stack):
    fake, env = stack
    images = ["case1.png", "case2.png", "case3.png"] * 2
    own = [CASES[1][0], CASES[2][0], CASES[3][0], None, None, None]  # half carry their own query
    project = fake.add_project(images, own)
    proc = prelabel(env, project, "--query", CASES[1][0], "--batch", "4")
    assert proc.returncode == 0, proc.stderr
    assert summary(proc).startswith(f"prelabel project {project} ({VERSION}): 6 done, 0 skipped, 0 failed")
    regions = 0
    for i, pred in enumerate(assert_one_prediction_each(fake, project)):
        assert pred["model_version"] == VERSION and pred["score"] is None  # SAM's score is uncalibrated: none
        width, height = size(images[i])
        for region in pred["result"]:
            regions += 1
            assert region["type"] == "brushlabels" and region["origin"] == "prediction"
            assert (region["original_width"], region["original_height"]) == (width, height)
            assert (region["from_name"], region["to_name"]) == ("mask", "image")
            assert region["value"]["brushlabels"] == ["Target"]
            assert region["meta"]["prompt"] == (own[i] or CASES[1][0])  # a task's own query wins over --query
            assert rle_to_mask(region["value"]["rle"], height, width).any()
    assert regions >= 2  # the tiny model answers the fixture queries with [SEG]
    state = state_file(env, project)
    assert state["model_version"] == VERSION and state["done"] == fake.task_ids(project) and state["failed"] == {}

    again = prelabel(env, project, "--query", CASES[1][0])
    assert again.returncode == 0, again.stderr
    assert ": 0 done, 6 skipped, 0 failed" in summary(again)
    assert_one_prediction_each(fake, project)


def test_limit_then_resume_completes_the_rest_without_duplicates(stack):
    fake, env = stack
    project = fake.add_project(["case1.png", "case2.png", "case3.png", "case1.png", "case2.png"], shape="list")
    first = prelabel(env, project, "--query", CASES[1][0], "--limit", "3")
    assert first.returncode == 0, first.stderr
    assert ": 3 done, 0 skipped, 0 failed" in summary(first) and "--limit 3" in summary(first)
    assert fake.count(project) == 3
    rest = prelabel(env, project, "--query", CASES[1][0])
    assert rest.returncode == 0, rest.stderr
    assert ": 2 done, 3 skipped, 0 failed" in summary(rest)
    assert_one_prediction_each(fake, project)
    assert state_file(env, project)["done"] == fake.task_ids(project)


def test_ctrl_c_writes_the_jobs_in_flight_and_a_rerun_resumes(stack):
    fake, env = stack
    project = fake.add_project(["case1.png", "case2.png", "case3.png"] * 2)
    proc = subprocess.Popen(command(project, "--query", CASES[1][0], "--batch", "1"), env=env, cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_for(lambda: fake.count(project) >= 1, timeout=60, what="the first prediction")
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, err
    assert "stopping (Ctrl-C)" in err and "interrupted, re-run to continue" in out
    written = fake.count(project)
    state = state_file(env, project)
    assert 1 <= written < 6 and len(state["done"]) == written and state["failed"] == {}  # nothing in flight lost
    assert state["runs"][-1]["outcome"] == "interrupted"
    rest = prelabel(env, project, "--query", CASES[1][0])
    assert rest.returncode == 0, rest.stderr
    assert f": {6 - written} done, {written} skipped, 0 failed" in summary(rest)
    assert_one_prediction_each(fake, project)


def test_a_broken_image_fails_only_its_task(stack):
    fake, env = stack
    q = CASES[1][0]
    project = fake.add_project(["case1.png", "broken.png", "missing.png", "case3.png", "case2.png"],
                               [q, q, q, None, q])  # no --query: the task without its own query fails too
    proc = prelabel(env, project)
    assert proc.returncode == 1
    assert ": 2 done, 0 skipped, 3 failed" in summary(proc)
    broken, missing, no_query = fake.task_ids(project)[1:4]
    assert f"task {broken}: failed: the image /data/upload/1/broken.png is" in proc.stderr
    assert f"task {missing}: failed: Label Studio answered 404" in proc.stderr
    assert f"task {no_query}: failed: no query: the task has no 'query' field and no --query" in proc.stderr
    assert [len(fake.predictions_of(t)) for t in fake.task_ids(project)] == [1, 0, 0, 0, 1]
    assert sorted(map(int, state_file(env, project)["failed"])) == [broken, missing, no_query]


def test_backpressure_with_a_tiny_queue_bound_still_completes_every_task(stack):
    fake, env = stack
    project = fake.add_project(["case1.png", "case2.png", "case3.png", "case1.png", "case2.png"])
    proc = prelabel({**env, "LISA_LS_MAX_QUEUE_LENGTH": "2"}, project, "--query", "the red object", "--batch", "4")
    assert proc.returncode == 0, proc.stderr
    assert ": 5 done, 0 skipped, 0 failed" in summary(proc)
    assert_one_prediction_each(fake, project)
    assert state_file(env, project)["runs"][-1]["busy_waits"] > 0  # the bound was hit, and waited out


CHECK = "check LABEL_STUDIO_URL / LABEL_STUDIO_API_KEY"


def test_a_wrong_token_is_a_clear_message_and_exit_2(stack):
    fake, env = stack
    project = fake.add_project(["case1.png"])
    proc = prelabel({**env, "LABEL_STUDIO_API_KEY": "f" * 40}, project, "--query", "the red object")
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    assert f"Label Studio answered 401 to GET /api/projects/{project}" in proc.stderr and CHECK in proc.stderr
    assert "nothing done" in summary(proc) and fake.count(project) == 0


@pytest.mark.parametrize(("change", "args", "messages"), [
    ({"LABEL_STUDIO_API_KEY": ""}, [], ["LABEL_STUDIO_API_KEY is not set"]),
    ({"LABEL_STUDIO_URL": f"http://127.0.0.1:{free_port()}"}, [], ["cannot reach Label Studio", "refused", CHECK]),
    ({"LABEL_STUDIO_URL": "label-studio:8080"}, [], ["LABEL_STUDIO_URL='label-studio:8080' must be"]),
    ({}, ["--project", "999"], ["answered 404 to GET /api/projects/999", CHECK]),
    ({}, ["--label", "Cat"], ["--label 'Cat' is not a label", "Target"]),
    ({}, ["--query", "a \x07 bell"], ["control characters"]),
    ({}, ["--batch", "0"], ["--batch must be at least 1"]),
    ({"REDIS_URL": "redis://127.0.0.1:1/0", "LISA_LS_REDIS_URL": ""}, [], ["Redis is unreachable", "REDIS_URL"]),
    ({"LISA_LS_BATCH_SIZE": "many"}, [], ["LISA_LS_BATCH_SIZE='many' is not a valid int"]),
])
def test_usage_and_configuration_errors_exit_2_with_a_clear_message(stack, monkeypatch, capsys, change, args,
                                                                     messages):
    """In-process through the real argument parser (``add_backend_parsers``), to keep these quick."""
    fake, env = stack
    project = fake.add_project(["case1.png"])
    for name, value in {**env, **change}.items():
        monkeypatch.setenv(name, value)
    parser = argparse.ArgumentParser()
    add_backend_parsers(parser.add_subparsers(dest="command", required=True))
    parsed = parser.parse_args(["prelabel", "--project", str(project), "--query", "the red object", *args])
    assert parsed.func(parsed) == 2
    out, err = capsys.readouterr()
    for message in messages:
        assert message in err
    assert "nothing done" in out and fake.count(project) == 0


def test_client_exchanges_a_personal_access_token_and_again_when_it_is_refused(stack):
    fake, _ = stack
    project = fake.add_project(["case1.png", "case2.png"])
    client = LabelStudioClient(fake.url, PAT)
    before = fake.exchanges
    assert client.project(project)["id"] == project
    assert [t["id"] for t, _ in client.iter_tasks(project)] == fake.task_ids(project)
    assert fake.exchanges == before + 1  # cached between calls
    fake.access_tokens.clear()  # revoked early: one 401, one new exchange, the call succeeds
    assert client.project(project)["id"] == project and fake.exchanges == before + 2
    with pytest.raises(LabelStudioError, match="personal access token") as e:
        LabelStudioClient(fake.url, jwt({"exp": time.time() + 60, "jti": "other"})).project(project)
    assert e.value.code == "auth"


def test_client_retries_a_page_of_tasks_after_a_502(stack):
    fake, _ = stack
    project = fake.add_project(["case1.png"] * 6)  # two pages of PAGE_CAP
    fake.fail_lists = 1
    assert [t["id"] for t, _ in LabelStudioClient(fake.url, TOKEN).iter_tasks(project)] == fake.task_ids(project)
    assert fake.fail_lists == 0


def test_progress_bar_shows_the_counts_on_a_terminal():
    pytest.importorskip("tqdm")

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    out = Terminal()
    progress = Progress(3, out)
    for what in ("done", "skipped", "failed"):
        progress.count(what)
    progress.write("task 7: failed: the image is corrupt")
    progress.close()
    text = out.getvalue()
    assert "3/3" in text and "done=1" in text and "skipped=1" in text and "failed=1" in text
    assert "task 7: failed: the image is corrupt" in text


def test_progress_line_says_how_many_of_how_many():
    """Not on a terminal (a log, CI): a line every 10 s with the project's task count, "72 of 120 tasks"."""
    out = io.StringIO()
    progress = Progress(None, out)
    progress.set_total(120)
    for what in ["done"] * 70 + ["skipped", "failed"]:
        progress._last = time.monotonic() - 11  # as if 10 s had passed since the last line
        progress.count(what)
    assert out.getvalue().splitlines()[-1] == "progress: 72 of 120 tasks (70 done, 1 skipped, 1 failed)"
    unknown = Progress(None, out := io.StringIO())
    unknown._last = time.monotonic() - 11
    unknown.count("done")
    assert out.getvalue() == "progress: 1 task(s) so far (1 done, 0 skipped, 0 failed)\n"


# ---- the real Label Studio 1.23.2 (tests/ls_fixtures.py; skipped where .lsvenv is not installed) ----

@pytest.mark.slow
def test_prelabel_a_real_label_studio_project(e2e):
    client = e2e.client
    project = client.create_project("prelabel e2e")["id"]
    tasks = client.upload_images(project, [FIXTURE / "cases" / f"case{n}.png" for n in (1, 2, 3)])
    env = {**e2e.stack.env(), "PYTHONPATH": str(ROOT), "MODEL_DIR": str(e2e.stack.workdir / "prelabel")}
    proc = prelabel(env, project, "--query", CASES[1][0])
    assert proc.returncode == 0, (proc.stdout, proc.stderr)
    version = summary(proc).split("(", 1)[1].split(")", 1)[0]
    regions = 0
    for n, task in enumerate(tasks, 1):
        [pred] = client.predictions(task["id"])  # Label Studio's own Prediction rows
        assert pred["model_version"] == version
        for region in pred["result"]:
            regions += 1
            assert region["origin"] == "prediction" and region["type"] == "brushlabels"
            assert (region["original_width"], region["original_height"]) == size(f"case{n}.png")
    assert regions >= 1
    again = prelabel(env, project, "--query", CASES[1][0])
    assert again.returncode == 0 and ": 0 done, 3 skipped, 0 failed" in summary(again)
