"""Capture at ``/webhook`` and ``lisa-ls export``, end to end: real Redis, real gunicorn backends, and a loopback
stand-in for Label Studio (``tests/fake_ls.py``) serving the images and the export API."""

from __future__ import annotations

import json
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
from argparse import Namespace
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import redis
import requests
from backend_fixtures import BackendProcess
from fake_ls import TOKEN, FakeLabelStudio, Project, brush, textarea
from redis_fixtures import ROOT, wait_for

from backend.capture import CaptureConsumer, store_event
from backend.config import BackendConfig
from backend.dataset import WRITE_FIELDS, read_mask
from backend.export import run_export
from backend.images import FetchSettings, ImageFetcher
from model.data import load_samples
from worker.client.defaults import QueueConfig

pytest_plugins = ["redis_fixtures", "backend_fixtures"]


def rect(rng: np.random.Generator, h: int = 24, w: int = 32) -> np.ndarray:
    y, x = rng.integers(0, h - 4), rng.integers(0, w - 4)
    m = np.zeros((h, w), bool)
    m[y : y + rng.integers(2, 10), x : x + rng.integers(2, 12)] = True
    return m


def env_for(ls: FakeLabelStudio, tmp: Path, reclaim_s: float = 1.0) -> dict[str, str]:
    return {"LABEL_STUDIO_URL": ls.url, "LABEL_STUDIO_API_KEY": TOKEN, "MODEL_DIR": str(tmp / "model_dir"),
            "LISA_LS_DATASET_DIR": str(tmp / "datasets"), "LISA_LS_CAPTURE_RECLAIM_S": str(reclaim_s)}


def post(url: str, event: dict) -> tuple[int, dict, float]:
    started = time.perf_counter()
    r = requests.post(url + "/webhook", json=event, timeout=5)
    return r.status_code, r.json(), time.perf_counter() - started


def drain(config: QueueConfig, timeout: float = 30.0) -> None:
    """Wait until every stored event was processed (acknowledged events are deleted from the stream)."""
    client = redis.Redis.from_url(config.redis_url)
    try:
        wait_for(lambda: client.xlen(config.key("capture")) == 0, timeout, "the capture backlog to drain")
    finally:
        client.close()


def stats(config: QueueConfig) -> dict[str, int]:
    client = redis.Redis.from_url(config.redis_url)
    try:
        return {k.decode(): int(v) for k, v in client.hgetall(config.key("capture:stats")).items()}
    finally:
        client.close()


def records(folder: Path) -> dict[str, dict]:
    return {p.stem: json.loads(p.read_text()) for p in sorted(folder.glob("*.json"))}


def process_tree(pid: int) -> list[int]:
    """A gunicorn arbiter and its worker processes (children found through /proc), arbiter last."""
    children = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            children.append(int(stat.parent.name))
    return [*children, pid]


def signal_all(pids: list[int], signum: int) -> None:
    for pid in pids:
        os.kill(pid, signum)


def kill_tree(pid: int) -> None:
    """SIGKILL a gunicorn arbiter and its worker processes."""
    signal_all(process_tree(pid), signal.SIGKILL)


def test_replayed_shuffled_webhooks_give_the_newest_state(queue_config, start_backend, tmp_path) -> None:
    project, rng = Project(), np.random.default_rng(1)
    for t in range(1, 5):
        project.add_task(t)
    events, newest, minute = [], {}, 0
    for aid in range(1, 13):
        for version in range(1 + aid % 3):
            minute += 1
            mask, query = rect(rng), f"object {aid}, version {version}"
            events.append(project.annotate(aid, aid % 4 + 1, [textarea(query), brush(mask, origin="prediction")],
                                           minute))
            newest[aid] = (query, mask)
    first_of_deleted = next(e for e in events if e["annotation"]["id"] == 2)
    for aid in (2, 6, 11):
        events.append(project.delete(aid))
        newest.pop(aid)
    replay = events * 3
    random.Random(7).shuffle(replay)
    ls = FakeLabelStudio(project)
    backends = [start_backend(queue_config, env_for(ls, tmp_path)) for _ in range(2)]  # two processes, one dataset
    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda ie: post(backends[ie[0] % 2].url, ie[1]), enumerate(replay)))
    assert all(status == 200 and body["status"] == "ok" for status, body, _ in answers)
    latencies = sorted(seconds for _, _, seconds in answers)  # against Label Studio's 1 s: bench_backend_latency
    print(f"webhook answers: median {latencies[len(latencies) // 2] * 1000:.1f} ms, max {latencies[-1] * 1000:.1f} ms")
    drain(queue_config)
    assert post(backends[0].url, first_of_deleted)[0] == 200  # a late CREATED after the DELETE
    drain(queue_config)

    folder = tmp_path / "datasets" / "project-1"
    samples = records(folder / "samples")
    assert set(samples) == {f"ls-1-{aid}" for aid in newest}
    for aid, (query, mask) in newest.items():
        record = samples[f"ls-1-{aid}"]
        assert record["queries"] == [query] and record["origins"] == ["prediction"]
        assert record["model_versions"] == ["tiny-1"] and record["source"] == "webhook"
        assert np.array_equal(read_mask(folder / record["masks"][0]), mask)
    assert not list((folder / "skipped").glob("*.json")) and not list(folder.rglob("*.tmp"))
    counts = stats(queue_config)
    assert counts["deleted"] == 9 and counts["stale"] > 0 and counts.get("skipped", 0) == 0
    for backend in backends:
        assert "Traceback" not in backend.log()


def test_acknowledged_events_survive_a_sigkill_mid_burst(queue_config, tmp_path) -> None:
    project = Project()
    for t in range(1, 5):
        project.add_task(t)
    rng = np.random.default_rng(2)
    events = [project.annotate(aid, aid % 4 + 1, [textarea(f"thing {aid}"), brush(rect(rng))], aid)
              for aid in range(1, 201)]
    ls = FakeLabelStudio(project, image_delay_s=0.02)  # the consumer lags behind the burst
    env = env_for(ls, tmp_path)
    backend = BackendProcess(queue_config, tmp_path, env, threads=8)
    restarted = None
    try:
        backend.wait_ready()
        acked: list[int] = []
        lock = threading.Lock()
        watch = redis.Redis.from_url(queue_config.redis_url)
        killed = False
        tree: list[int] = []

        def holding() -> bool:
            return watch.xpending(queue_config.key("capture"), "lisa-capture")["pending"] > 0

        def send(event: dict) -> None:
            nonlocal killed
            try:
                status, _, _ = post(backend.url, event)
            except requests.RequestException:
                return  # not acknowledged: Label Studio would log a failed webhook
            with lock:
                if status == 200:
                    acked.append(event["annotation"]["id"])
                    # From the 100th acknowledgement on, kill while other requests are in flight - once the
                    # consumer holds events (a starved capture thread may not have read any yet on a busy machine).
                    # The processes are frozen before looking, so the consumer cannot acknowledge its batch
                    # between the look and the kill; when it holds nothing they run on until the next try.
                    if not killed and len(acked) >= 100:
                        pids = tree or process_tree(backend.proc.pid)
                        tree[:] = pids
                        signal_all(pids, signal.SIGSTOP)
                        if holding():
                            killed = True
                            signal_all(pids, signal.SIGKILL)
                        else:
                            signal_all(pids, signal.SIGCONT)

        with ThreadPoolExecutor(8) as pool:
            list(pool.map(send, events))
        watch.close()
        backend.proc.wait(timeout=10)
        folder = tmp_path / "datasets" / "project-1"
        done_before = len(list((folder / "samples").glob("*.json")))
        assert 100 <= len(acked) < 200 and done_before < len(acked)
        client = redis.Redis.from_url(queue_config.redis_url)
        held = client.xpending(queue_config.key("capture"), "lisa-capture")["pending"]
        client.close()
        assert held > 0  # the dead process held events mid-processing: the restart must reclaim them
        restarted = BackendProcess(queue_config, tmp_path, env, threads=8)
        restarted.wait_ready()
        drain(queue_config, timeout=40)
        captured = set(records(folder / "samples"))
        assert {f"ls-1-{aid}" for aid in acked} <= captured
        whole = load_samples(folder)  # no half-written sample: every file a sample names is complete
        assert {s.id for s in whole} == captured and all(len(s.masks) == 1 for s in whole)
    finally:
        for b in (backend, restarted):
            if b is not None:
                b.stop()
                print(b.log()[-3000:])
        ls.close()


def _strip(record: dict) -> dict:
    return {k: v for k, v in record.items() if k not in (*WRITE_FIELDS, "event")}


def test_export_and_capture_write_the_same_samples(queue_config, start_backend, tmp_path, capsys) -> None:
    project, rng = Project(), np.random.default_rng(3)
    for t in range(1, 6):
        project.add_task(t)
    events = [
        project.annotate(1, 1, [textarea("a"), brush(rect(rng), origin="prediction")], 1),
        project.annotate(2, 2, [textarea("b"), brush(rect(rng), origin="prediction-changed"),
                                brush(rect(rng), "Ignore")], 2),
        project.annotate(3, 3, [textarea("c"), brush(rect(rng)) | {"id": "x1"}, brush(rect(rng)) | {"id": "x2"},
                                brush(rect(rng), "Other", origin="prediction")], 3),
        project.annotate(4, 4, [brush(rect(rng))], 4),  # no query: skipped by both
        project.annotate(5, 5, [textarea("e"), brush(rect(rng))], 5, was_cancelled=True),
        project.annotate(6, 1, [textarea("same image as 1"), brush(rect(rng))], 6),
        project.annotate(1, 1, [textarea("a, edited"), brush(rect(rng), origin="prediction-changed")], 7),
    ]
    ls = FakeLabelStudio(project)
    backend = start_backend(queue_config, env_for(ls, tmp_path))
    for event in events:
        assert post(backend.url, event)[0] == 200
    drain(queue_config)
    captured = tmp_path / "datasets" / "project-1"

    out = tmp_path / "export"
    env = {**os.environ, **env_for(ls, tmp_path), "PYTHONPATH": str(ROOT)}
    cli = [sys.executable, "-m", "backend.cli", "export", "--project", "1", "--out", str(out), "--page-size", "2"]
    run = subprocess.run(cli, env=env, capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    assert "written 4, updated 0, unchanged 0, newer-kept 0, deleted 0, skipped 2, failed 0" in run.stdout
    assert "skipped ls-1-4: no_query" in run.stdout and "skipped ls-1-5: cancelled" in run.stdout

    for kind in ("samples", "skipped"):
        mine, theirs = records(captured / kind), records(out / kind)
        assert set(mine) == set(theirs) and len(mine) == (4 if kind == "samples" else 2)
        assert {k: _strip(v) for k, v in mine.items()} == {k: _strip(v) for k, v in theirs.items()}
        assert {v["source"] for v in mine.values()} == {"webhook"} and {v["source"] for v in theirs.values()} == {
            "export"}
    for sub in ("images", "masks"):
        files = sorted(p.name for p in (captured / sub).iterdir())
        assert files == sorted(p.name for p in (out / sub).iterdir())
        assert all((captured / sub / f).read_bytes() == (out / sub / f).read_bytes() for f in files)
    sample = records(out / "samples")
    assert sample["ls-1-1"]["split"] == sample["ls-1-6"]["split"] and sample["ls-1-1"]["queries"] == ["a, edited"]
    assert sample["ls-1-3"]["labels"] == ["Target", "Other"] and sample["ls-1-2"]["ignore"]

    # Again, through the bare-list answer of older Label Studio versions: nothing to do; then a deletion.
    ls.list_shape = True
    args = Namespace(project=1, out=str(out), page_size=3)
    for name, value in env_for(ls, tmp_path).items():
        os.environ[name] = value
    try:
        assert run_export(args) == 0
        assert "written 0, updated 0, unchanged 4, newer-kept 0, deleted 0, skipped 2" in capsys.readouterr().out
        project.delete(3)
        project.annotations[4]["result"].append(textarea("now with a query"))
        assert run_export(args) == 0
        report = capsys.readouterr().out
        assert "written 1, updated 0, unchanged 3, newer-kept 0, deleted 1, skipped 1" in report, report
    finally:
        for name in env_for(ls, tmp_path):
            os.environ.pop(name, None)
    assert not (out / "samples" / "ls-1-3.json").exists() and not list((out / "masks").glob("ls-1-3_*"))
    assert not (out / "skipped" / "ls-1-4.json").exists() and (out / "samples" / "ls-1-4.json").exists()
    ls.close()


def test_bad_webhooks_are_recorded_as_skipped_with_their_reason(queue_config, start_backend, tmp_path) -> None:
    project, rng = Project(), np.random.default_rng(4)
    for t in range(1, 4):
        project.add_task(t)
    del project.images["/data/upload/1/img3.png"]  # the image disappeared
    good = [textarea("q"), brush(rect(rng))]
    bad_rle = brush(rect(rng)) | {"value": {"format": "rle", "rle": [7, 7, 7], "brushlabels": ["Target"]}}
    bad_config = project.annotate(18, 1, good, 1)
    bad_config["project"]["label_config"] = "<View><Image"
    expected = {
        "ls-1-11": ("no_query", project.annotate(11, 1, [brush(rect(rng))], 1)),
        "ls-1-12": ("bad_rle", project.annotate(12, 1, [textarea("q"), bad_rle], 1)),
        "ls-1-13": ("size_mismatch", project.annotate(13, 1, [textarea("q"), brush(np.ones((10, 10), bool))], 1)),
        "ls-1-14": ("image_gone", project.annotate(14, 3, good, 1)),
        "ls-1-15": ("cancelled", project.annotate(15, 1, good, 1, was_cancelled=True)),
        "ls-1-16": ("no_mask", project.annotate(16, 1, [textarea("q")], 1)),
        "ls-1-18": ("bad_config", bad_config),
    }
    event_level = [
        {"action": "ANNOTATION_CREATED", "annotation": {"result": []}, "project": {"id": 1}},
        {"action": "ANNOTATION_UPDATED", "annotation": {"id": 99, "result": [], "task": 1}},
        {"action": "ANNOTATION_CREATED", "annotation": "not an object", "project": {"id": 1}},
        {"action": "ANNOTATIONS_DELETED", "project": {"id": 1}},
    ]
    ls = FakeLabelStudio(project)
    backend = start_backend(queue_config, env_for(ls, tmp_path))
    for _, event in expected.values():
        assert post(backend.url, event)[0] == 200
    assert post(backend.url, project.annotate(17, 2, good, 1))[0] == 200
    assert post(backend.url, project.annotate(17, 2, [brush(rect(rng))], 2))[0] == 200  # v2 drops the query
    expected["ls-1-17"] = ("no_query", None)
    for event in event_level:
        assert post(backend.url, event)[0] == 200
    assert post(backend.url, {"action": "PROJECT_UPDATED", "project": {"id": 1}})[1] == {"status": "Unknown event"}
    assert requests.post(backend.url + "/webhook", data=b"{oops", timeout=5).status_code == 400
    drain(queue_config)

    folder = tmp_path / "datasets" / "project-1"
    skipped = records(folder / "skipped")
    assert {sid: r["code"] for sid, r in skipped.items()} == {sid: code for sid, (code, _) in expected.items()}
    assert all(r["reason"] and r["annotation_id"] for r in skipped.values())
    assert "404" in skipped["ls-1-14"]["reason"] or "not found" in skipped["ls-1-14"]["reason"].lower()
    assert not list((folder / "samples").glob("*.json"))  # ls-1-17's first version was replaced by its skip
    unplaced = records(tmp_path / "datasets" / "skipped")
    assert sorted(r["code"] for r in unplaced.values()) == ["missing_field"] * 4
    counts = stats(queue_config)
    assert counts["skipped"] == 12 and counts["skipped:missing_field"] == 4 and counts["skipped:no_query"] == 2
    assert requests.get(backend.url + "/health", timeout=5).status_code in (200, 503)  # alive
    assert "Traceback" not in backend.log()
    ls.close()


def test_bulk_created_annotations_are_each_captured(queue_config, start_backend, tmp_path) -> None:
    """``ANNOTATIONS_CREATED`` (annotations imported with tasks) lists annotations and their tasks in order: each
    becomes its own sample; one unusable annotation is skipped alone; a replay changes nothing."""
    project, rng = Project(), np.random.default_rng(9)
    for t in range(1, 4):
        project.add_task(t)
    masks = {aid: rect(rng) for aid in (21, 22)}
    singles = [project.annotate(21, 1, [textarea("the cup"), brush(masks[21])], 1),
               project.annotate(22, 3, [textarea("the plate"), brush(masks[22])], 1),
               project.annotate(23, 2, [brush(rect(rng))], 1)]  # no query
    bulk = {"action": "ANNOTATIONS_CREATED", "annotation": [e["annotation"] for e in singles],
            "task": [e["task"] for e in singles], "project": singles[0]["project"]}
    broken = {"action": "ANNOTATIONS_CREATED", "annotation": {"id": 5}, "project": {"id": 1}}
    ls = FakeLabelStudio(project)
    backend = start_backend(queue_config, env_for(ls, tmp_path))
    for event in (bulk, bulk, broken):
        status, body, _ = post(backend.url, event)
        assert status == 200 and body["status"] == "ok"
    drain(queue_config)
    folder = tmp_path / "datasets" / "project-1"
    samples = records(folder / "samples")
    assert set(samples) == {"ls-1-21", "ls-1-22"}
    for aid, query in ((21, "the cup"), (22, "the plate")):
        assert samples[f"ls-1-{aid}"]["queries"] == [query]
        assert np.array_equal(read_mask(folder / samples[f"ls-1-{aid}"]["masks"][0]), masks[aid])
    assert {sid: r["code"] for sid, r in records(folder / "skipped").items()} == {"ls-1-23": "no_query"}
    assert [r["code"] for r in records(tmp_path / "datasets" / "skipped").values()] == ["missing_field"]
    counts = stats(queue_config)
    assert counts["written"] == 2 and counts["unchanged"] == 2 and counts["skipped:no_query"] == 2
    assert "Traceback" not in backend.log()
    ls.close()


def test_unreachable_images_are_retried_then_recorded_as_skipped(queue_config, tmp_path) -> None:
    project = Project()
    project.add_task(1)
    event = project.annotate(1, 1, [textarea("q"), brush(np.ones((24, 32), bool))], 1)
    with socket.socket() as closed:  # a port nothing listens on: Label Studio is down
        closed.bind(("127.0.0.1", 0))
        down = f"http://127.0.0.1:{closed.getsockname()[1]}"
    config = BackendConfig(queue=queue_config, label_studio_url=down, label_studio_api_key=TOKEN,
                           dataset_dir=str(tmp_path), capture_reclaim_s=0.05)
    consumer = CaptureConsumer(config, ImageFetcher(FetchSettings(label_studio_url=down, api_key=TOKEN)))
    stream = queue_config.key("capture")
    try:
        entry = store_event(consumer.redis, config, json.dumps(event).encode(), 1.0)
        consumer.poll(block_s=0)
        assert consumer.redis.xlen(stream) == 1  # kept for another try, with the cause
        assert b"Connection refused" in consumer.redis.hget(stream + ":errors", entry)
        deadline = time.monotonic() + 10
        while consumer.redis.xlen(stream) and time.monotonic() < deadline:
            time.sleep(0.06)
            consumer.poll(block_s=0)
        assert consumer.redis.xlen(stream) == 0 and not consumer.redis.hlen(stream + ":errors")
    finally:
        consumer.redis.close()
    [skipped] = records(tmp_path / "project-1" / "skipped").values()
    assert skipped["code"] == "image_unreachable" and "5 tries" in skipped["reason"]
