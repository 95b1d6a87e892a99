"""One phrasing rule for serving and training: the question a worker puts to LISA for an annotator's query is the
question fine-tuning builds from the captured sample of that answer (``model/phrasing.py``).

A real gunicorn backend, Redis, a ``lisa-ls worker`` with the tiny LISA and the capture thread; a fake Label
Studio serves the task's image and receives nothing (the webhook carries the annotation).
"""

from __future__ import annotations

import os
import subprocess

import requests
from conftest import case_image, tiny_worker_argv
from fake_ls import CONFIG, FakeLabelStudio, Project, textarea
from redis_fixtures import ROOT, config_env, make_config, wait_for
from test_capture import drain, env_for

from model.data import load_samples
from model.finetune import samples_to_examples
from worker.client.connection import connect
from worker.client.queue import JobQueue

pytest_plugins = ["redis_fixtures", "backend_fixtures"]
#: Starts with a question word and has no final mark: a sentence to the backend, a phrase to the old training.
QUERY = "which object is red"


def test_training_asks_what_the_worker_asked(queue_config, start_backend, tmp_path, tiny_predictor) -> None:
    config = make_config(queue_config.redis_url, job_deadline_s=120.0, visibility_timeout_s=60.0, result_ttl_s=300)
    project = Project()
    task = project.add_task(1)
    project.images[task["data"]["image"]] = case_image(1).read_bytes()  # a picture the tiny model answers [SEG] on
    ls = FakeLabelStudio(project)
    env = {**os.environ, **config_env(config), "PYTHONPATH": str(ROOT)}
    with open(tmp_path / "worker.log", "wb") as log:
        worker = subprocess.Popen(tiny_worker_argv("tiny-1"), env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        backend = start_backend(config, {**env_for(ls, tmp_path), "LISA_LS_PREDICT_DEADLINE_S": "110"})
        wait_for(JobQueue(connect(config=config), config).live_workers, timeout=90, what="the model worker")
        body = {"tasks": [task], "project": "1.1700000000", "label_config": CONFIG,
                "params": {"context": {"result": [textarea(QUERY)]}}}
        r = requests.post(backend.url + "/predict", json=body, timeout=120)
        assert r.status_code == 200, r.text
        [region] = [x for x in r.json()["results"][0]["result"] if x["type"] == "brushlabels"]
        asked = region["meta"]["question"]  # what the worker put to LISA, echoed in its result
        assert QUERY in asked

        # The annotator accepts the suggestion and submits: the webhook's annotation becomes a dataset sample.
        event = project.annotate(1, 1, [textarea(QUERY), region], 1)
        assert requests.post(backend.url + "/webhook", json=event, timeout=10).status_code == 200
        drain(config)
    finally:
        worker.terminate()
        worker.wait(timeout=30)
        ls.close()
    [sample] = load_samples([str(tmp_path / "datasets" / "project-1")])
    assert sample.queries == [QUERY]
    [example] = samples_to_examples(tiny_predictor.model, [sample], seed=0)
    assert example.query == asked
