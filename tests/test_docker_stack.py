"""The composed stack, for real: ``docker/compose.yml`` with the images ``docker/harness.py`` built (redis, backend,
the worker image on ``--profile cpu`` serving the offline demo model), on 127.0.0.1 ports only.

Run by ``make docker-test`` alone (it sets ``LISA_LS_DOCKER_STACK=1``); skipped in ``make test``. The tests run in
file order and share one compose project (module fixture): health, /predict against ``lisa-ls segment``, a webhook
captured on the backend's volume, ``docker kill`` of the worker with requests in flight, ``down``/``up`` keeping
Redis' AOF and the dataset, the bad-input messages, then the demo profile: Label Studio's ``/health``, and the
Chromium walk of ``tests/test_e2e_ui.py`` once against the containers (Label Studio reaching the backend by its
compose alias, the demo model's mask for a demo query).
"""

from __future__ import annotations

import base64
import functools
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import requests
import test_e2e_ui as ui
from ls_fixtures import PASSWORD, USERNAME, LSClient

from backend.brush import mask_to_rle
from backend.dataset import Dataset
from backend.labeling import RECOMMENDED_CONFIG
from model.demo_scope import ANSWER_NOTE

pytestmark = pytest.mark.skipif(os.environ.get("LISA_LS_DOCKER_STACK") != "1",
                                reason="run by `make docker-test` (needs a Docker engine and the built images)")

ROOT = Path(__file__).resolve().parent.parent
COMPOSE_FILE = ROOT / "docker" / "compose.yml"
DEMO = ROOT / "models" / "demo"
PICTURE = DEMO / "examples" / "scene_0.png"
QUERY = "green"
TOKEN = "0123456789abcdef0123456789abcdef01234567"
#: The backend as Label Studio's container reaches it (compose.yml's network alias).
BACKEND_ALIAS = "http://backend.lisa-ls.internal:9090"
DEMO_ON = os.environ.get("LISA_LS_DOCKER_DEMO") != "0"
browser_page = ui.browser_page  # the fixture, reused


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Stack:
    """One compose project (its own name, volumes and 127.0.0.1 ports), driven through ``docker-compose``."""

    def __init__(self) -> None:
        self.project = f"lisa-ls-test-{os.getpid()}"
        self.port, self.ls_port = free_port(), free_port()
        self.env = {**os.environ, "LISA_LS_BIND": "127.0.0.1", "LISA_LS_PORT": str(self.port),
                    "LABEL_STUDIO_PORT": str(self.ls_port), "LABEL_STUDIO_API_KEY": TOKEN,
                    "LABEL_STUDIO_USERNAME": USERNAME, "LABEL_STUDIO_PASSWORD": PASSWORD}
        self.url, self.ls_url = f"http://127.0.0.1:{self.port}", f"http://127.0.0.1:{self.ls_port}"
        self.seconds: dict[str, float] = {}

    def compose(self, *args: str, check: bool = True, timeout: float = 600,
                env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
        argv = ["docker-compose", "-f", str(COMPOSE_FILE), "-p", self.project, *args]
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, env=env or self.env)
        if check and proc.returncode != 0:
            raise AssertionError(f"{' '.join(argv[5:])} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}")
        return proc

    def container(self, service: str) -> str:
        return self.compose("ps", "-q", service).stdout.strip()

    def inspect(self, service: str, fmt: str) -> str:
        return subprocess.run(["docker", "inspect", "-f", fmt, self.container(service)], capture_output=True,
                              text=True, check=True).stdout.strip()

    def health(self) -> dict:
        return requests.get(self.url + "/health", timeout=5).json()

    def wait_worker(self, timeout: float = 240, not_host: str | None = None) -> dict:
        """Until /health lists a live worker (other than ``not_host``); returns it."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                workers = [w for w in self.health().get("workers", []) if w.get("host") != not_host]
                if workers:
                    return workers[0]
            except (requests.RequestException, ValueError):
                pass
            time.sleep(1)
        logs = self.compose("logs", "--tail", "40", check=False).stdout
        raise AssertionError(f"no live worker in /health within {timeout:.0f} s:\n{logs}")

    def up(self, *profiles: str) -> None:
        t0 = time.monotonic()
        self.compose(*[a for p in profiles for a in ("--profile", p)], "up", "-d", "--no-build")
        self.wait_worker()
        self.seconds[f"up {'+'.join(profiles)}"] = round(time.monotonic() - t0, 1)

    def exec(self, service: str, *argv: str) -> str:
        return self.compose("exec", "-T", service, *argv).stdout

    def up_demo(self) -> float:
        """The demo profile (+ Label Studio) up and Label Studio's ``/health`` UP; seconds it took (0 if it was)."""
        t0 = time.monotonic()
        self.compose("--profile", "cpu", "--profile", "demo", "up", "-d", "--no-build")
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            try:
                r = requests.get(self.ls_url + "/health", timeout=5)
                if r.status_code == 200 and r.json().get("status") == "UP":
                    return round(time.monotonic() - t0, 1)
            except (requests.RequestException, ValueError):
                pass
            time.sleep(2)
        raise AssertionError(f"Label Studio /health did not answer:\n{self.compose('logs', 'label-studio').stdout}")

    def backend_log(self) -> str:
        return self.compose("logs", "--no-color", "backend").stdout

    def sample(self, project: int, name: str, into: Path) -> dict | None:
        """The sample ``name`` captured on the backend's volume (copied out with ``docker cp``), or None."""
        dest = into / f"project-{project}"
        shutil.rmtree(dest, ignore_errors=True)
        copied = subprocess.run(["docker", "cp", f"{self.container('backend')}:/data/dataset/project-{project}",
                                 str(dest)], capture_output=True, text=True, timeout=60)
        if copied.returncode != 0 or not (dest / "samples" / f"{name}.json").exists():
            return None
        return Dataset.open(dest, create=False).read_sample(name)


@pytest.fixture(scope="module")
def stack() -> Iterator[Stack]:
    s = Stack()
    try:
        s.up("cpu")
        yield s
    finally:
        print(f"\ncompose timings (s): {json.dumps(s.seconds)}")
        s.compose("--profile", "cpu", "--profile", "demo", "down", "-v", "--remove-orphans", check=False)


def data_uri(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()


def predict(stack: Stack, query: str, timeout: float = 120) -> requests.Response:
    context = {"result": [{"id": "q1", "from_name": "query", "to_name": "image", "type": "textarea",
                           "origin": "manual", "value": {"text": [query]}}]}
    body = {"tasks": [{"id": 1, "data": {"image": data_uri(PICTURE)}}], "project": "1.1700000000",
            "label_config": RECOMMENDED_CONFIG, "params": {"context": context}}
    return requests.post(stack.url + "/predict", json=body, timeout=timeout)


def regions(response: requests.Response) -> list[dict]:
    assert response.status_code == 200, response.text
    [pred] = response.json()["results"]
    return [r for r in pred["result"] if r["type"] == "brushlabels"]


def test_health_lists_the_containerised_worker(stack):
    worker = stack.wait_worker()
    assert worker["host"] == stack.inspect("worker-cpu", "{{.Config.Hostname}}")
    assert worker["device"] == "cpu"
    assert "demo" in json.dumps(stack.health()).lower()  # the demo model says so in its version


@functools.cache
def segment(query: str) -> np.ndarray:
    """``lisa-ls segment`` on the host (.venv) with the demo model on :data:`PICTURE`: bool masks ``N x H x W``."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "segment.npz"
        proc = subprocess.run([sys.executable, "-m", "worker.cli", "segment", "--model", str(DEMO), "--device",
                               "cpu", "--image", str(PICTURE), "--query", query, "--output", str(out)],
                              capture_output=True, text=True, timeout=300, cwd=ROOT)
        assert proc.returncode == 0, proc.stderr
        return np.load(out)["masks"].astype(bool)


def test_predict_gives_the_brush_rle_of_lisa_ls_segment(stack):
    found = regions(predict(stack, QUERY))
    masks = segment(QUERY)
    assert len(masks) >= 1 and len(found) == len(masks)
    assert [r["value"]["rle"] for r in found] == [mask_to_rle(m) for m in masks]


def test_webhook_is_captured_on_the_backends_volume(stack):
    [region] = regions(predict(stack, QUERY))[:1]
    query = {"id": "q", "type": "textarea", "from_name": "query", "to_name": "image", "origin": "manual",
             "value": {"text": [QUERY]}}
    task = {"id": 7, "data": {"image": data_uri(PICTURE)}, "project": 1}
    ann = {"id": 70, "result": [query, {**region, "origin": "manual"}], "task": 7, "project": 1, "completed_by": 1,
           "was_cancelled": False, "ground_truth": False, "created_at": "2026-12-02T10:00:00.000000Z",
           "updated_at": "2026-12-02T10:00:00.000000Z"}
    body = {"action": "ANNOTATION_CREATED", "annotation": ann, "task": task,
            "project": {"id": 1, "title": "docker test", "label_config": RECOMMENDED_CONFIG}}
    r = requests.post(stack.url + "/webhook", json=body, timeout=30)
    assert r.status_code == 200 and r.json()["status"] == "ok", r.text
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        files = stack.exec("backend", "find", "/data/dataset", "-type", "f").split()
        if any("project-1" in f and f.endswith((".png", ".npz", ".json", ".jsonl")) for f in files):
            break
        time.sleep(1)
    else:
        raise AssertionError(f"no sample under /data/dataset: {files}\n{stack.compose('logs', 'backend').stdout}")
    print(f"\ncaptured on the backend volume: {sorted(files)}")


def _kill_with_requests_in_flight(stack: Stack, kill, queries: tuple[str, str]) -> float:
    """``kill()`` the worker with one request in flight and one sent right after; both must get a mask."""
    answers: dict[str, requests.Response] = {}

    def ask(query: str) -> None:
        answers[query] = predict(stack, query, timeout=300)

    before = threading.Thread(target=ask, args=(queries[0],))
    before.start()
    t0 = time.monotonic()
    kill()
    during = threading.Thread(target=ask, args=(queries[1],))  # sent while no worker runs: queued until it is back
    during.start()
    before.join(300)
    during.join(300)
    got = {q: len(regions(r)) for q, r in answers.items()}
    assert all(got.values()) and set(got) == set(queries), {q: r.text[:400] for q, r in answers.items()}
    return round(time.monotonic() - t0, 1)


def test_a_killed_worker_process_is_restarted_and_requests_in_flight_are_answered(stack):
    """The worker's process dies (SIGKILL from the host): its restart policy brings the container back."""
    container = stack.container("worker-cpu")
    pid = int(stack.inspect("worker-cpu", "{{.State.Pid}}"))
    stack.seconds["SIGKILL -> answered"] = _kill_with_requests_in_flight(
        stack, lambda: os.kill(pid, 9), ("yellow", "purple"))
    assert stack.container("worker-cpu") == container  # the same container, restarted by its policy
    assert int(stack.inspect("worker-cpu", "{{.RestartCount}}")) >= 1
    assert stack.inspect("worker-cpu", "{{.State.Running}}") == "true"


def test_docker_kill_of_the_worker_then_compose_up_and_requests_in_flight_are_answered(stack):
    """``docker kill`` is a manual stop to Docker (no restart policy applies): ``compose up -d`` restarts it."""
    container = stack.container("worker-cpu")

    def kill() -> None:
        subprocess.run(["docker", "kill", container], check=True, capture_output=True)
        stack.compose("--profile", "cpu", "up", "-d", "--no-build")

    stack.seconds["docker kill + up -d -> answered"] = _kill_with_requests_in_flight(
        stack, kill, ("the pentagon", "the smallest shape"))
    assert stack.inspect("worker-cpu", "{{.State.Running}}") == "true"


def test_down_then_up_keeps_redis_aof_and_the_dataset(stack):
    stack.exec("redis", "redis-cli", "SET", "lisa-ls-docker-test", "kept")
    time.sleep(1.5)  # appendfsync everysec
    before = sorted(stack.exec("backend", "find", "/data/dataset", "-type", "f").split())
    t0 = time.monotonic()
    stack.compose("--profile", "cpu", "down")
    stack.seconds["down"] = round(time.monotonic() - t0, 1)
    stack.up("cpu")
    assert stack.exec("redis", "redis-cli", "GET", "lisa-ls-docker-test").strip() == "kept"
    assert "appendonly" in stack.exec("redis", "ls", "/data") or stack.exec("redis", "ls", "/data/appendonlydir")
    assert before and sorted(stack.exec("backend", "find", "/data/dataset", "-type", "f").split()) == before


def test_the_backend_image_holds_no_torch_and_image_sizes():
    proc = subprocess.run(["docker", "run", "--rm", "--entrypoint", "python", "lisa-ls-backend:latest", "-c",
                           "import importlib.util as u; print(u.find_spec('torch'))"],
                          capture_output=True, text=True, timeout=120)
    assert proc.stdout.strip() == "None", proc.stderr
    torch = subprocess.run(["docker", "run", "--rm", "--entrypoint", "python", "lisa-ls-worker:latest", "-c",
                            "import torch, torchvision; print(torch.__version__, torchvision.__version__)"],
                           capture_output=True, text=True, timeout=300)
    versions = torch.stdout.split()
    assert [v.split("+")[0] for v in versions] == ["2.14.1", "0.29.1"] and "+cu" in versions[0], torch.stderr
    figures = Path(tempfile.gettempdir()) / "lisa-ls-docker-figures.json"
    sizes = {}
    for image in ("lisa-ls-redis", "lisa-ls-backend", "lisa-ls-worker", "lisa-ls-label-studio"):
        out = subprocess.run(["docker", "image", "inspect", "-f", "{{.Size}}", f"{image}:latest"],
                             capture_output=True, text=True)
        if out.returncode == 0:
            sizes[image] = f"{int(out.stdout) / 1e6:.0f} MB"
    print(f"\nimage sizes: {sizes}")
    if figures.exists():
        print(f"build figures: {figures.read_text()}")
    assert {"lisa-ls-redis", "lisa-ls-backend", "lisa-ls-worker"} <= set(sizes)


def test_gpu_profile_without_a_gpu_says_so(stack):
    """The worker image asked for CUDA on a machine without one: a plain message and exit 3, no silent loop."""
    proc = subprocess.run(["docker", "run", "--rm", "-e", "REDIS_URL=redis://127.0.0.1:1/0", "lisa-ls-worker:latest",
                           "--model", "/app/models/demo", "--device", "cuda"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 3 and "sees no CUDA GPU" in proc.stderr and "--profile cpu" in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr
    # The compose gpu profile on a host without the NVIDIA runtime: compose refuses with docker's own words.
    gpu = stack.compose("--profile", "gpu", "up", "-d", "--no-build", "worker", check=False, timeout=120)
    text = (gpu.stdout + gpu.stderr).lower()
    assert gpu.returncode != 0 and ("nvidia" in text or "gpu" in text), text
    stack.compose("--profile", "gpu", "rm", "-f", "-s", "worker", check=False)


def test_a_port_already_taken_is_named(stack):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        env = {**stack.env, "LISA_LS_PORT": str(taken.getsockname()[1])}
        other = subprocess.run(["docker-compose", "-f", str(COMPOSE_FILE), "-p", stack.project + "-port", "up", "-d",
                                "--no-build", "backend"], capture_output=True, text=True, timeout=300, env=env)
        subprocess.run(["docker-compose", "-f", str(COMPOSE_FILE), "-p", stack.project + "-port", "down", "-v"],
                       capture_output=True, text=True, timeout=300, env=env)
    text = other.stdout + other.stderr
    assert other.returncode != 0 and ("already in use" in text or "already allocated" in text), text
    assert env["LISA_LS_PORT"] in text


@pytest.mark.skipif(not DEMO_ON, reason="--no-demo")
def test_demo_profile_label_studio_answers_health(stack):
    stack.seconds["demo: Label Studio healthy"] = stack.up_demo()
    # Label Studio reaches the backend by its compose alias.
    reach = stack.exec("label-studio", "python3", "-c", "import urllib.request as u; print(u.urlopen("
                       f"'{BACKEND_ALIAS}/health', timeout=5).status)")
    assert reach.strip() == "200"


@pytest.mark.skipif(not DEMO_ON, reason="--no-demo")
def test_demo_profile_in_chromium_a_typed_query_is_suggested_accepted_and_submitted(stack, browser_page, tmp_path):
    """tests/test_e2e_ui.py's walk, once, against the containers: connect the model by its compose alias, a
    refused query's message, the demo model's mask for "green" (exactly ``lisa-ls segment``'s), accept, submit,
    and the sample captured on the backend's volume; the page reaches nothing off the machine (compose.yml turns
    Label Studio's analytics and Sentry off)."""
    stack.up_demo()
    page, blocked = browser_page
    [expected] = segment(QUERY)
    t0 = time.monotonic()
    ui.walk_in_browser(ui.UITarget(
        client=LSClient(stack.ls_url, TOKEN), ls_url=stack.ls_url, backend_url=BACKEND_ALIAS, picture=PICTURE,
        query=QUERY, expected=expected, max_mismatch=0.0, backend_log=stack.backend_log,
        sample=lambda project, name: stack.sample(project, name, tmp_path), artifacts=ROOT / "tests" / "artifacts",
        prefix="docker_ui", note=(ANSWER_NOTE,)), page)
    stack.seconds["demo: Chromium UI walk"] = round(time.monotonic() - t0, 1)
    assert not blocked, f"the composed Label Studio's page tried to reach off the machine: {blocked}"
