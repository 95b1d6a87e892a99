"""One ``ANNOTATIONS_DELETED`` of 200k annotations through capture, before and after issue 18, on a real Redis.

The case of the issue: the event lists 200 000 ids of a project whose dataset holds 2000 samples (one mask each),
all among them. "before" is the deletion loop capture had (one compare-and-set script call, one dataset lock and
one listing of the masks folder per id, tombstones kept for ever), kept below as it was; "after" is
:class:`backend.capture.CaptureConsumer` now: the event is split into parts of ``DELETE_PART`` ids, each one
script call, one lock and one listing, and version records are trimmed once ``VERSIONS_KEEP_S`` has passed (the
bench trims with a keep window of 0 s to show what is left then).

Printed: the longest single step of the capture thread (how long it cannot stop, reclaim or take another event),
the total time, and the Redis memory of the versions hash right after and once the keep window has passed. The
"before" loop costs the same for every id (a few ms on a loaded machine), so it is timed on the first
``BEFORE_IDS`` ids (all the samples among them) and scaled to the whole event; the rest of its tombstones are
then written untimed, so that its memory is that of all 200k.
Run: ``.venv/bin/python bench/bench_capture.py`` (~1-3 min).
"""

from __future__ import annotations

import json
import shutil
import socket
import sys
import tempfile
import time
from pathlib import Path

import redis
from bench_queue import start_redis

from backend.capture import DELETE_PART, CaptureConsumer
from backend.capture_store import keys, store_event
from backend.config import BackendConfig
from backend.dataset import Dataset, sample_id
from backend.images import FetchSettings, ImageFetcher
from worker.client.defaults import QueueConfig

IDS, SAMPLES, PROJECT = 200_000, 2000, 1
BEFORE_IDS = 10_000

# ---- before: the deletion of backend/capture.py as it was ----

_BEFORE_OFFER = """
local cur = redis.call('HGET', KEYS[1], ARGV[1])
if cur then
  local u, ms, seq, kind = string.match(cur, '^(%d+):(%d+):(%d+):(%a+)')
  if kind == 'del' then
    if ARGV[5] == 'del' then return 1 end
    return 0
  end
  if u and ARGV[5] ~= 'del' then
    local nu, nms, nseq = tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
    u, ms, seq = tonumber(u), tonumber(ms), tonumber(seq)
    if nu < u or (nu == u and (nms < ms or (nms == ms and nseq < seq))) then return 0 end
  end
end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2] .. ':' .. ARGV[3] .. ':' .. ARGV[4] .. ':' .. ARGV[5] .. ':' .. ARGV[6])
return 1
"""


def _before_delete(client: redis.Redis, versions: str, root: Path, ids: list[int], pid: int) -> None:
    offer = client.register_script(_BEFORE_OFFER)
    for aid in ids:
        folder = root / f"project-{pid}"
        if not (folder / "dataset.json").exists():
            offer(keys=[versions], args=[aid, 0, 0, 0, "del", pid])
            continue
        dataset = Dataset.open(folder, create=False)
        with dataset.lock():
            offer(keys=[versions], args=[aid, 0, 0, 0, "del", pid])
            dataset.remove(sample_id(pid, aid))


# ---- the setup ----

def make_dataset(root: Path) -> None:
    """``SAMPLES`` samples of annotations 1..SAMPLES, one mask each (only their files matter to a deletion)."""
    shutil.rmtree(root, ignore_errors=True)
    dataset = Dataset.open(root / f"project-{PROJECT}", project_id=PROJECT)
    for aid in range(1, SAMPLES + 1):
        sid = sample_id(PROJECT, aid)
        (dataset.root / "masks" / f"{sid}_0.png").write_bytes(b"png")
        dataset.sample_path(sid).write_text("{}")


def event() -> bytes:
    return json.dumps({"action": "ANNOTATIONS_DELETED", "annotations": [{"id": i} for i in range(1, IDS + 1)],
                       "project": {"id": PROJECT, "title": "bench"}}).encode()


def memory_mb(client: redis.Redis, key: str) -> float:
    return (client.memory_usage(key, samples=0) or 0) / 2**20


def main() -> int:
    work = Path(tempfile.mkdtemp(prefix="bench_capture_"))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = start_redis(work, port)
    queue = QueueConfig(redis_url=f"redis://127.0.0.1:{port}/0")
    client = redis.Redis(port=port)
    root = work / "datasets"
    try:
        make_dataset(root)
        versions = queue.key("bench:before:versions")
        raw = event()
        t0 = time.perf_counter()
        ids = [item["id"] for item in json.loads(raw)["annotations"]]  # what the old handler parsed, per event
        _before_delete(client, versions, root, ids[:BEFORE_IDS], PROJECT)
        before_s = (time.perf_counter() - t0) * IDS / BEFORE_IDS
        assert not list((root / f"project-{PROJECT}" / "samples").glob("*.json"))
        for start in range(BEFORE_IDS, IDS, 10_000):  # the other tombstones, as the loop writes them (untimed)
            client.hset(versions, mapping={aid: f"0:0:0:del:{PROJECT}" for aid in ids[start : start + 10_000]})
        before = {"step": before_s, "total": before_s, "mem": memory_mb(client, versions),
                  "kept": memory_mb(client, versions)}  # never trimmed

        make_dataset(root)
        config = BackendConfig(queue=queue, dataset_dir=str(root))
        consumer = CaptureConsumer(config, ImageFetcher(FetchSettings()), versions_keep_s=0)
        steps: list[float] = []
        process = consumer.process

        def timed(*args: object) -> str | None:
            t = time.perf_counter()
            try:
                return process(*args)  # type: ignore[arg-type]
            finally:
                steps.append(time.perf_counter() - t)

        consumer.process = timed  # type: ignore[method-assign]
        consumer._next_reclaim = time.monotonic() + 3600  # no trim while it runs: measured after
        store_event(client, config, raw, 5.0)
        t0 = time.perf_counter()
        while client.xlen(keys(queue)["stream"]):
            consumer.poll(block_s=0)
        after_s = time.perf_counter() - t0
        assert not list((root / f"project-{PROJECT}" / "samples").glob("*.json"))
        name = keys(queue)["versions"]
        mem = memory_mb(client, name)
        while consumer.trim_versions():
            pass
        after = {"step": max(steps), "total": after_s, "mem": mem, "kept": memory_mb(client, name)}
        consumer.redis.close()
    finally:
        client.close()
        server.terminate()
        server.wait(10)
        shutil.rmtree(work, ignore_errors=True)

    print(f"ANNOTATIONS_DELETED of {IDS} ids, {SAMPLES} of them samples on disk; before: timed on {BEFORE_IDS} "
          f"ids, x{IDS // BEFORE_IDS}; after: {len(steps)} steps (1 split + parts of {DELETE_PART} ids), all timed")
    print(f"{'':44}{'before':>10}{'after':>10}{'ratio':>9}")
    rows = (("longest capture step (s)", "step"), ("whole deletion (s)", "total"),
            ("versions hash right after (MB)", "mem"), ("versions hash after the keep window (MB)", "kept"))
    for label, key in rows:
        b, a = before[key], after[key]
        ratio = f"{b / a:8.1f}x" if a else "      inf"
        print(f"{label:44}{b:10.2f}{a:10.2f}{ratio}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
