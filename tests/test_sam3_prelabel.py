"""``lisa-ls prelabel`` on a SAM 3 project: the connection's Extra params say ``"model": "sam3"``, so the jobs go to
the SAM 3 worker (a real ``lisa-ls worker`` on a tiny random SAM 3, a real Redis) and, with no query anywhere, each
label's name is its own prompt (as CVAT does). Label Studio is tests/test_prelabel.py's fake, answering
``GET /api/ml`` with the connection."""

from __future__ import annotations

import json
import os
from urllib.parse import urlsplit

import numpy as np
import pytest
from conftest import FIXTURE, worker_argv
from PIL import Image
from redis_fixtures import ROOT, RedisServer, WorkerProcess, config_env, make_config, wait_for
from sam3_fixtures import LOW_THRESHOLD
from test_prelabel import TOKEN, FakeLabelStudio, prelabel

from backend.labeling import RECOMMENDED_CONFIG
from worker.client.connection import connect
from worker.client.queue import JobQueue

pytest_plugins = ["redis_fixtures", "sam3_fixtures"]
pytestmark = pytest.mark.slow
LABELS = ("cat", "dog")
CONFIG = RECOMMENDED_CONFIG.replace('<Label value="Target" background="#ff3b30"/>',
                                    "".join(f'<Label value="{label}"/>' for label in LABELS))
MIN_AREA = 16  # the backend's default LISA_LS_MIN_AREA: smaller instances are dropped as noise


class ConnectedFake(FakeLabelStudio):
    """The fake Label Studio with one model connection per project, carrying ``extra``."""

    def __init__(self, extra: dict) -> None:
        super().__init__()
        self.extra = extra

    def handle(self, h, method: str) -> None:
        if method == "GET" and urlsplit(h.path).path.rstrip("/") == "/api/ml":
            return self.reply(h, 200, [{"id": 1, "url": "http://backend", "extra_params": json.dumps(self.extra)}])
        return super().handle(h, method)


@pytest.fixture(scope="module")
def sam3_prelabel_stack(tmp_path_factory, sam3_tiny):
    tmp = tmp_path_factory.mktemp("sam3prelabel")
    server = RedisServer(tmp)
    server.start()
    config = make_config(server.url, job_deadline_s=60.0, result_ttl_s=300, visibility_timeout_s=30.0)
    env = {**os.environ, **config_env(config), "PYTHONPATH": str(ROOT)}
    worker = WorkerProcess("worker", config, tmp, worker_argv(sam3_tiny, "sam3-tiny"))
    queue = JobQueue(connect(config=config), config).for_family("sam3")
    wait_for(queue.live_workers, timeout=90, what="the SAM 3 worker")
    fake = ConnectedFake({"model": "sam3", "score_threshold": LOW_THRESHOLD})
    yield fake, {**env, "LABEL_STUDIO_URL": fake.url, "LABEL_STUDIO_API_KEY": TOKEN, "MODEL_DIR": str(tmp / "md")}
    worker.stop()
    print(worker.log()[-3000:])
    fake.httpd.shutdown()
    server.stop()


def test_label_names_prompt_their_own_instances(sam3_prelabel_stack, sam3_predictor):
    fake, env = sam3_prelabel_stack
    pid = fake.add_project(["case1.png", "case2.png", "case3.png"], queries=[None, None, "bird"])
    fake.projects[pid]["label_config"] = CONFIG
    proc = prelabel(env, pid)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    *unprompted, own = fake.task_ids(pid)
    [pred] = fake.predictions_of(own)  # a task with its own query keeps it: the label names are not asked
    assert {r["meta"]["prompt"] for r in pred["result"]} <= {"bird"}
    for tid, name in zip(unprompted, ("case1.png", "case2.png")):
        [pred] = fake.predictions_of(tid)
        assert pred["model_version"] == "sam3-tiny"
        with Image.open(FIXTURE / "cases" / name) as im:
            encoded = sam3_predictor.encode(np.asarray(im.convert("RGB")))
        for label in LABELS:
            found = sam3_predictor.find(encoded, label, LOW_THRESHOLD)
            expected = sorted(round(float(s), 4) for m, s in zip(found.masks, found.scores) if m.sum() >= MIN_AREA)
            regions = [r for r in pred["result"] if r["value"]["brushlabels"] == [label]]
            assert sorted(r["score"] for r in regions) == pytest.approx(expected, abs=1e-4), (label, regions)
            assert all(r["meta"]["prompt"] == label and r["meta"]["family"] == "sam3" for r in regions)
        assert len(pred["result"]) > 1
