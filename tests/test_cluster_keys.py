"""Redis Cluster readiness: every key of a deployment hashes to one cluster slot.

On a cluster, a Lua script call, an ``MGET`` or a ``MULTI``/``EXEC`` is refused (``CROSSSLOT``) unless all of its
keys hash to one slot, and a script must reach its keys through ``KEYS``. The queue gives every key the
deployment's hash tag (``{lisa}:...``, :meth:`worker.client.defaults.QueueConfig.key`). Checked here without a
cluster of several nodes:

- :func:`key_hash_slot` is Redis Cluster's algorithm written out (CRC16/XMODEM of the hash tag, mod 16384) and
  agrees with the server's ``CLUSTER KEYSLOT``;
- every kind of key the code builds, for several prefixes, lands in its deployment's one slot;
- every Lua script of the project names its keys only through ``KEYS``;
- a full cycle (submit, consume, lease renewal, release, reclaim, complete, waiter timeout, dead letter,
  heartbeats, unregister, metrics, promotion, webhook capture) runs against a one-node cluster, which refuses
  cross-slot requests as a real cluster does, while every script call is recorded: the ``KEYS`` of each call are
  in the queue's slot, every script was called, and every key left in Redis is in that slot.
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import redis
from redis_fixtures import RedisServer, make_config, wait_for

from backend import capture
from backend.capture import CaptureConsumer, store_event
from backend.config import BackendConfig
from backend.images import FetchSettings, ImageFetcher
from worker.client import registry, scripts
from worker.client.connection import connect
from worker.client.defaults import QueueConfig
from worker.client.metrics import BATCH_SIZE_KEY, JOBS_KEY, LATENCY_KEY, read_metrics, record_batch
from worker.client.protocol import DEAD_LETTER, TIMEOUT, Job, Result
from worker.client.queue import JobQueue

pytest_plugins = ["redis_fixtures"]

SLOTS = 16384

#: Every Lua script of the project, by where it is defined: new ones are picked up (and must be exercised below).
SCRIPTS = {
    f"{module.__name__}.{name}": source
    for module in (scripts, capture)
    for name, source in vars(module).items()
    if name.isupper() and isinstance(source, str) and "redis.call" in source
}


def crc16(data: bytes) -> int:
    """CRC16/XMODEM (polynomial 0x1021, initial value 0): the checksum Redis Cluster hashes keys with."""
    crc = 0
    for byte in data:
        crc ^= byte << 8
        for _ in range(8):
            crc = ((crc << 1) ^ 0x1021 if crc & 0x8000 else crc << 1) & 0xFFFF
    return crc


def key_hash_slot(key: str | bytes) -> int:
    """Redis Cluster's slot of a key: only what lies between the first ``{`` and the next ``}`` is hashed, if that
    is not empty; otherwise the whole key."""
    raw = key.encode() if isinstance(key, str) else key
    start = raw.find(b"{")
    if start >= 0:
        end = raw.find(b"}", start + 1)
        if end > start + 1:
            raw = raw[start + 1 : end]
    return crc16(raw) % SLOTS


def all_key_kinds(config: QueueConfig) -> list[str]:
    """One key of every kind the code builds (queue, registry, metrics, capture, backend project settings)."""
    q = JobQueue(redis.Redis(), config)  # builds keys only; never connects
    job_id, digest = "0123abcd", "f" * 64
    return [
        config.job_stream,
        config.dead_letter_stream,
        *(q.key(kind, job_id) for kind in ("res", "done", "err")),
        q.key("img", digest),
        q.key("worker", "host:42:cuda:0"),
        q.key("workers"),
        q.key("model", "current"),
        q.key("model", "history"),
        q.key("project", "7"),  # backend.predict's per-project settings
        *(config.key(kind) for kind in (LATENCY_KEY, BATCH_SIZE_KEY, JOBS_KEY)),
        *capture.keys(config).values(),
    ]


# ---- the slot function and the key builder ----


@pytest.fixture(scope="module")
def cluster_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """A one-node Redis Cluster owning every slot (``CROSSSLOT`` errors as on a real cluster)."""
    server = RedisServer(tmp_path_factory.mktemp("cluster"), cluster=True)
    server.start()
    yield server
    server.stop()


@pytest.fixture
def cluster_config(cluster_server: RedisServer) -> QueueConfig:
    client = redis.Redis.from_url(cluster_server.url)
    client.flushall()
    client.close()
    return make_config(cluster_server.url)


def test_slot_function_agrees_with_redis(cluster_server: RedisServer) -> None:
    assert crc16(b"123456789") == 0x31C3  # the check value of CRC16/XMODEM, as in the Redis Cluster spec
    keys = [
        "foo",
        "bar",
        "{user1000}.following",
        "{user1000}.followers",
        "foo{}{bar}",
        "foo{{bar}}zap",
        "foo{bar}{zap}",
        "{}",
        "{lisa}:jobs",
        "lisa:jobs",
        "app:{lisa}:res:x",
        "ü{ñ}",
    ]
    client = redis.Redis.from_url(cluster_server.url)
    try:
        for key in keys:
            assert key_hash_slot(key) == client.execute_command("CLUSTER", "KEYSLOT", key), key
    finally:
        client.close()
    assert key_hash_slot("{user1000}.following") == key_hash_slot("{user1000}.followers")
    assert key_hash_slot("foo{bar}{zap}") == key_hash_slot("bar")


@pytest.mark.parametrize(
    ("prefix", "tag"),
    [
        ("lisa:", "{lisa}:"),
        ("other:", "{other}:"),
        ("lisa", "{lisa}:"),
        ("app:{x}:", "app:{x}:"),
        ("app:{x}", "app:{x}:"),
    ],
)
def test_every_key_of_a_deployment_is_in_one_slot(prefix: str, tag: str) -> None:
    config = QueueConfig(key_prefix=prefix)
    assert config.key_tag == tag
    keys = all_key_kinds(config)
    assert all(k.startswith(tag) for k in keys), keys
    assert len(set(keys)) == len(keys)  # no two kinds collide
    assert {key_hash_slot(k) for k in keys} == {key_hash_slot(config.job_stream)}, keys


def test_default_layout_and_separate_deployments() -> None:
    config = QueueConfig()
    assert config.job_stream == "{lisa}:jobs" and config.key("res", "j1") == "{lisa}:res:j1"
    assert capture.keys(config)["versions"] == "{lisa}:capture:versions"
    assert key_hash_slot(QueueConfig(key_prefix="a:").job_stream) != key_hash_slot(config.job_stream)
    for bad in ("", ":"):
        with pytest.raises(ValueError, match="key_prefix"):
            QueueConfig(key_prefix=bad)


# ---- the scripts ----

CALL = re.compile(r"redis\.call\((?P<args>[^()]*(?:\([^()]*\)[^()]*)*)\)")


def test_scripts_reach_keys_only_through_KEYS() -> None:
    assert {name.rsplit(".", 1)[1] for name in SCRIPTS} >= {"SUBMIT", "FINISH", "TOUCH", "PRUNE", "APPEND", "OFFER"}
    for name, source in SCRIPTS.items():
        calls = [[a.strip() for a in m["args"].split(",")] for m in CALL.finditer(source)]
        assert len(calls) == source.count("redis.call"), f"{name}: a redis.call the test cannot parse"
        for args in calls:
            command = args[0].strip("'\"").upper()
            key = args[2] if command == "XGROUP" else args[1]  # XGROUP <subcommand> <key> ...
            if key.startswith("unpack("):  # an argument table built in the script: its first element is the key
                table = key[len("unpack(") : -1]
                assert re.search(rf"local {table} = {{KEYS\[\d\]", source), f"{name}: {command} on a built key"
            else:
                assert re.fullmatch(r"KEYS\[[^\]]+\]", key), f"{name}: {command} on {key}, not on a KEYS entry"


# ---- a full cycle on a one-node cluster ----


class ScriptCalls:
    """Records the ``KEYS`` of every ``EVALSHA`` any redis-py client of this process sends."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.calls: list[tuple[str, list[str]]] = []
        self._lock = threading.Lock()
        evalsha = redis.Redis.evalsha
        names = {hashlib.sha1(source.encode()).hexdigest(): name for name, source in SCRIPTS.items()}

        def recording(client: redis.Redis, sha: str, numkeys: int, *keys_and_args: object) -> object:
            keys = [k.decode() if isinstance(k, bytes) else str(k) for k in keys_and_args[:numkeys]]
            with self._lock:
                self.calls.append((names.get(sha, sha), keys))
            return evalsha(client, sha, numkeys, *keys_and_args)

        monkeypatch.setattr(redis.Redis, "evalsha", recording)


def test_full_cycle_on_a_cluster_node_keeps_every_key_in_one_slot(
    cluster_config: QueueConfig, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    recorded = ScriptCalls(monkeypatch)
    cfg = cluster_config
    q = JobQueue(connect(config=cfg), cfg)
    slot = key_hash_slot(cfg.job_stream)

    # client side: images (MGET across keys), an all-or-none submit
    digest = q.put_image(b"\x89PNG not really")
    assert q.get_images([digest, "0" * 64]) == {digest: b"\x89PNG not really", "0" * 64: None}
    jobs = [Job(image=digest, query=f"query {i}") for i in range(4)]
    q.submit_many(jobs)

    # worker side: heartbeats (MULTI/EXEC), lease renewal, release + reclaim, answers, a dead letter
    q.heartbeat("w1", {"name": "w1", "started": 1.0})
    q.heartbeat("w2", {"name": "w2", "started": 2.0})
    assert [w["name"] for w in q.live_workers()] == ["w1", "w2"] and q.stats()["pending"] == 0
    got = q.consume("w1", block_ms=0)
    assert [j.id for j in got] == [j.id for j in jobs]
    assert q.extend("w1", got) == 4
    assert q.release("w1", got[2:3], "RuntimeError: boom") == 1
    [retry] = q.reclaim("w2")
    assert retry.id == got[2].id and retry.attempts == 2
    answer = Result.from_masks(got[0].id, np.ones((1, 2, 2), bool), [0.9], worker="w1")
    assert q.complete(got[0], answer) and q.wait(got[0].id, timeout=2).worker == "w1"
    assert q.wait(got[1].id, timeout=0.05).error_code == TIMEOUT  # the waiter gives up first ...
    assert not q.complete(got[1], Result.from_masks(got[1].id, np.ones((1, 2, 2), bool), [0.5]))  # ... and wins
    assert q.complete(retry, Result.from_masks(retry.id, np.ones((1, 2, 2), bool), [0.5], worker="w2"))
    assert q.dead_letter(got[3]) and q.wait(got[3].id, timeout=2).error_code == DEAD_LETTER
    assert q.stats() == {"depth": 0, "pending": 0, "queued": 0, "dead_letter": 1, "max_queue_length": 100}
    q.unregister("w1")
    q.unregister("w2")

    # metrics (MULTI/EXEC over three hashes), promotion (MULTI/EXEC over two keys)
    assert record_batch(q.redis, cfg, 4, [(0.1, "ok"), (0.2, "internal")])
    assert read_metrics(q.redis, cfg).jobs == {"ok": 1, "internal": 1}
    registry.promote(q, "v2", "/models/base", None, {"giou": 0.7})
    assert registry.current(q)["version"] == "v2" and len(registry.history(q)) == 1

    # webhook capture: append, the version compare-and-set, the acknowledging transaction, the consumer's prune
    backend_config = BackendConfig(queue=cfg, dataset_dir=str(tmp_path))
    consumer = CaptureConsumer(backend_config, ImageFetcher(FetchSettings()))
    event = {"action": "ANNOTATIONS_DELETED", "annotations": [{"id": 5}], "project": {"id": 3}}
    store_event(q.redis, backend_config, json.dumps(event).encode(), 1.0)
    consumer.start()
    try:
        wait_for(lambda: q.redis.hget(capture.keys(cfg)["stats"], "deleted") == b"1", 10, "the event's capture")
    finally:
        consumer.stop(5.0)
    assert not consumer._thread.is_alive()

    seen = {name for name, _ in recorded.calls}
    assert seen == set(SCRIPTS), f"scripts never called in the cycle: {set(SCRIPTS) - seen}"
    for name, keys in recorded.calls:
        assert keys and {key_hash_slot(k) for k in keys} == {slot}, (name, keys)
    client = redis.Redis.from_url(cfg.redis_url)
    try:
        stored = [k.decode() for k in client.scan_iter(count=1000)]
        assert len(stored) > 10 and client.execute_command("CLUSTER", "COUNTKEYSINSLOT", slot) == len(stored), stored
        assert all(k.startswith(cfg.key_tag) for k in stored), stored
    finally:
        client.close()
        q.redis.close()
