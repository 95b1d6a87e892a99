"""Capture under hostile or oversized webhooks (issue 18): a store retried after a timeout appends once, bodies past
``LISA_LS_MAX_BODY_MB`` get 413, the backlog is bounded in bytes, a deletion of 200k annotations runs in bounded
parts and survives a SIGKILL, version records are trimmed, and event fields never reach a file name or a log line
raw. Real Redis, real gunicorn backends and the loopback Label Studio of ``tests/fake_ls.py``."""

from __future__ import annotations

import json
import re
import threading
import time

import numpy as np
import redis
import requests
from backend_fixtures import BackendProcess
from fake_ls import TOKEN, FakeLabelStudio, Project, brush, textarea
from redis_fixtures import wait_for
from test_capture import drain, env_for, kill_tree, post, records, rect, stats

from backend.capture import DELETE_PART, GROUP, CaptureConsumer
from backend.capture_store import keys, store_event
from backend.config import BackendConfig
from backend.images import FetchSettings, ImageFetcher

pytest_plugins = ["redis_fixtures", "backend_fixtures"]


def project_with(n_tasks: int = 3) -> Project:
    project = Project()
    for t in range(1, n_tasks + 1):
        project.add_task(t)
    return project


def test_a_store_retried_after_a_timeout_appends_the_event_once(queue_config, start_backend, tmp_path) -> None:
    """Redis stalls 0.4 s while a webhook is stored: the backend's 0.25 s read times out and it sends the append
    again. Both appends reach Redis; the event must be stored, and captured, once."""
    project, rng = project_with(), np.random.default_rng(1)
    ls = FakeLabelStudio(project)
    backend = start_backend(queue_config, env_for(ls, tmp_path))
    assert post(backend.url, project.annotate(1, 1, [textarea("warm"), brush(rect(rng))], 1))[0] == 200
    drain(queue_config)  # the backend now holds a pooled connection: the stalled append goes out at once

    stall = redis.Redis.from_url(queue_config.redis_url)
    sleeper = threading.Thread(target=stall.execute_command, args=("DEBUG", "SLEEP", "0.4"))
    sleeper.start()
    time.sleep(0.05)  # the DEBUG SLEEP runs: Redis reads nothing for 0.4 s
    status, body, seconds = post(backend.url, project.annotate(2, 2, [textarea("once"), brush(rect(rng))], 2))
    sleeper.join()
    stall.close()
    assert status == 200 and body["status"] == "ok", body
    drain(queue_config)
    assert stats(queue_config) == {"written": 2}, f"answered in {seconds:.2f} s"  # not a second "unchanged"
    ls.close()


def test_bodies_over_the_limit_get_413_and_the_backlog_is_bounded_in_bytes(queue_config, start_backend,
                                                                           tmp_path) -> None:
    """1 MiB bodies at most, 1 MiB of backlog: two 400 kB events fit, a third waits for room (503), a 1.5 MB one is
    refused with 413 before it is read. Label Studio is down, so nothing is processed meanwhile."""
    project = project_with()
    ls = FakeLabelStudio(project)
    url = ls.url
    ls.close()  # images unreachable: each event stays in the backlog, retried
    env = {**env_for(ls, tmp_path), "LABEL_STUDIO_URL": url, "LISA_LS_MAX_BODY_MB": "1",
           "LISA_LS_CAPTURE_BACKLOG_MB": "1"}
    backend = start_backend(queue_config, env)

    def event(aid: int, pad: int) -> dict:
        e = project.annotate(aid, 1, [textarea("q"), brush(np.ones((24, 32), bool))], aid)
        e["task"]["data"]["notes"] = "x" * pad
        return e

    huge = requests.post(backend.url + "/webhook", json=event(9, 1_500_000), timeout=10)
    assert huge.status_code == 413, huge.text
    assert "LISA_LS_MAX_BODY_MB" in huge.json()["message"] and "lisa-ls export" in huge.json()["message"]
    answers = [post(backend.url, event(aid, 400_000)) for aid in (1, 2, 3)]
    assert [a[0] for a in answers] == [200, 200, 503], answers
    assert "LISA_LS_CAPTURE_BACKLOG_MB" in answers[2][1]["message"]
    client = redis.Redis.from_url(queue_config.redis_url)
    try:
        held = int(client.get(keys(queue_config)["bytes"]))
        assert 800_000 < held <= 2**20 and client.xlen(keys(queue_config)["stream"]) == 2
        drain(queue_config, timeout=40)  # the consumer gives up on the images after 5 tries: room again
        assert int(client.get(keys(queue_config)["bytes"])) == 0
    finally:
        client.close()
    assert post(backend.url, event(3, 400_000))[0] == 200
    assert stats(queue_config)["skipped:image_unreachable"] == 2


def _delete_event(ids: list[int]) -> dict:
    return {"action": "ANNOTATIONS_DELETED", "annotations": [{"id": i} for i in ids],
            "project": {"id": 1, "title": "capture test"}}


def test_a_deletion_of_200k_annotations_runs_in_bounded_parts_and_survives_a_sigkill(queue_config,
                                                                                     tmp_path) -> None:
    """One ``ANNOTATIONS_DELETED`` of 200k ids (three of them captured samples) is split into parts of
    DELETE_PART ids in the step that acknowledges it; the backend is killed mid-way and a new one finishes."""
    project, rng = project_with(), np.random.default_rng(2)
    listed, kept = [5, 150_005, 199_999], 300_000
    ls = FakeLabelStudio(project)
    env = env_for(ls, tmp_path)
    backend, restarted = BackendProcess(queue_config, tmp_path, env), None
    client = redis.Redis.from_url(queue_config.redis_url)
    try:
        backend.wait_ready()
        for n, aid in enumerate([*listed, kept]):
            assert post(backend.url, project.annotate(aid, n % 3 + 1, [textarea(f"q{aid}"), brush(rect(rng))],
                                                      n))[0] == 200
        drain(queue_config)
        samples = tmp_path / "datasets" / "project-1" / "samples"
        assert len(list(samples.glob("*.json"))) == 4
        status, _, _ = post(backend.url, _delete_event(list(range(1, 200_001))))
        assert status == 200
        wait_for(lambda: stats(queue_config).get("deleted", 0) >= 3, 60, "some parts of the deletion")
        kill_tree(backend.proc.pid)
        backend.proc.wait(timeout=10)
        assert stats(queue_config)["deleted"] < 200, "the deletion finished before the kill: nothing was shown"
        restarted = BackendProcess(queue_config, tmp_path, env)
        restarted.wait_ready()
        drain(queue_config, timeout=120)
        counts = stats(queue_config)
        assert counts["split"] == 1 and counts["deleted"] >= 200  # a part redone after the kill counts twice
        assert {p.stem for p in samples.glob("*.json")} == {f"ls-1-{kept}"}
        versions = client.hgetall(keys(queue_config)["versions"])
        assert len(versions) == 200_001 and all(versions[str(i).encode()].split(b":")[3] == b"del"
                                                for i in (1, 100_000, 200_000))
        assert int(client.get(keys(queue_config)["bytes"])) == 0
        steps = [int(n) for log in (backend.log(), restarted.log())
                 for n in re.findall(r"capture: (\d+) annotation\(s\) deleted", log)]
        assert steps and max(steps) <= DELETE_PART, steps
        assert post(restarted.url, project.annotate(5, 1, [textarea("late"), brush(rect(rng))], 99))[0] == 200
        drain(queue_config)
        assert stats(queue_config)["stale"] == 1  # a CREATED after its DELETE stays out
    finally:
        client.close()
        for b in (backend, restarted):
            if b is not None:
                b.stop()
                print(b.log()[-3000:])
        ls.close()


def test_version_records_are_trimmed_but_never_past_an_unacknowledged_older_event(queue_config, tmp_path) -> None:
    """With records kept 0 s, a trim still keeps every record newer than the oldest event a dead process holds:
    that event (an older CREATED of a deleted annotation) must find the tombstone when it is reclaimed."""
    project, rng = project_with(), np.random.default_rng(3)
    ls = FakeLabelStudio(project)
    config = BackendConfig(queue=queue_config, label_studio_url=ls.url, label_studio_api_key=TOKEN,
                           dataset_dir=str(tmp_path), capture_reclaim_s=0.05)
    consumer = CaptureConsumer(config, ImageFetcher(FetchSettings(label_studio_url=ls.url, api_key=TOKEN)),
                               versions_keep_s=0)
    names = keys(queue_config)
    r = consumer.redis
    try:
        def store(event: dict) -> str:
            return store_event(r, config, json.dumps(event).encode(), 1.0)

        old = store(project.annotate(1, 1, [textarea("old"), brush(rect(rng))], 1))
        r.xgroup_create(names["stream"], GROUP, "0", mkstream=True)
        [[_, [(held, _)]]] = r.xreadgroup(GROUP, "dead-process", {names["stream"]: ">"}, count=1)
        assert held.decode() == old  # held by a process that died
        store(project.annotate(1, 1, [textarea("new"), brush(rect(rng))], 2))
        store(project.annotate(2, 2, [textarea("other"), brush(rect(rng))], 3))
        store(project.delete(1))
        consumer._next_reclaim = time.monotonic() + 60  # no reclaim yet
        while consumer.poll(block_s=0):
            pass
        assert r.hlen(names["versions"]) == 2
        assert consumer.trim_versions() == 0  # all were written after the held event was stored
        assert r.hget(names["versions"], 1).split(b":")[3] == b"del"
        time.sleep(0.1)
        consumer._next_reclaim = 0.0
        assert consumer.poll(block_s=0) == 1  # the reclaim: the old CREATED meets the tombstone ...
        assert stats(queue_config)["stale"] == 1 and r.xlen(names["stream"]) == 0
        assert not (tmp_path / "project-1" / "samples" / "ls-1-1.json").exists()
        assert r.hlen(names["versions"]) == 0  # ... and the same round's trim finds nothing that needs them
    finally:
        r.close()
        ls.close()


def test_event_fields_never_reach_a_file_name_or_a_raw_log_line(queue_config, start_backend, tmp_path) -> None:
    """A forged ``bulk_index``, ids that ``str.isdigit`` accepts but ``int`` does not, an id too large for Label
    Studio, and line breaks in the action and ids: each event is recorded on its first delivery, under a name of
    our own, and the log holds no forged line."""
    project = project_with()
    ls = FakeLabelStudio(project)
    backend = start_backend(queue_config, env_for(ls, tmp_path))
    forged = "2026-01-01 00:00:00,000 ERROR backend.forged: owned"
    good = project.annotate(1, 1, [textarea("q"), brush(np.ones((24, 32), bool))], 1)
    events = [
        {"action": "ANNOTATION_CREATED", "annotation": {"result": []}, "project": {"id": 1},
         "bulk_index": "/../../escaped"},
        {**good, "annotation": {**good["annotation"], "id": "²"}},
        {**good, "annotation": {**good["annotation"], "id": 10**30}},
        {**good, "annotation": {**good["annotation"], "id": "3\n" + forged, "task": "١"}},
        {"action": "ANNOTATIONS_DELETED", "annotations": [{"id": "⁵"}, {"id": -4}], "project": {"id": "1\n" + forged}},
    ]
    for event in events:
        assert post(backend.url, event)[0] == 200
    assert post(backend.url, {"action": "X\n" + forged})[1] == {"status": "Unknown event"}
    drain(queue_config, timeout=20)
    counts = stats(queue_config)
    assert counts == {"skipped": 5, "skipped:missing_field": 5}, counts  # not "failed" after five deliveries
    unplaced = records(tmp_path / "datasets" / "skipped")
    assert len(unplaced) == 5 and all(re.fullmatch(r"event-\d+-\d+", name) for name in unplaced), unplaced
    assert not [p for p in tmp_path.rglob("*escaped*")]
    log = backend.log()
    assert "failed (delivery" not in log and "Traceback" not in log
    assert not [line for line in log.splitlines() if line.startswith(forged)]
    assert re.search(r"INFO backend.predict: webhook 'X\\n" + re.escape(forged), log)  # logged, quoted
    ls.close()
