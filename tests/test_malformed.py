"""Stream entries that are not jobs, and failures outside the model, never take a worker down (issue 16, item 2).

Garbage is ``XADD``ed straight into the job stream, as a buggy client or a person with ``redis-cli`` would. Each
entry must land in the dead-letter stream with its cause (its waiter, if it names a usable job id, gets a
``bad_input`` answer), a good job after it must be answered, and the worker must keep running, also when it is
restarted on the same stream and finds the garbage a crashed worker left in its hands.
"""

from __future__ import annotations

import json
import signal
import threading

import pytest
from redis_fixtures import make_config, wait_for

from worker.client.connection import connect
from worker.client.defaults import MALFORMED_FIELD_BYTES, MALFORMED_MAX_FIELDS
from worker.client.protocol import BAD_INPUT, DEAD_LETTER, Job, Result
from worker.client.queue import JobQueue
from worker.gpu.loop import WorkerLoop

pytest_plugins = ["redis_fixtures"]

IMAGE = b"not really a PNG, the test handler only checks the hash"
GOOD = {"image": "0" * 64, "query": "q", "kind": "segment", "options": "{}", "deadline": "4102444800.0"}


def garbage(tag: str) -> dict[str, dict]:
    """Entries that are not jobs, by what is wrong with them; where one names a job id, it is ``<tag>-<name>``."""
    entries = {
        "missing-fields": {"id": "m-missing-fields", "image": "x"},
        "no-fields-we-know": {"hello": "world"},
        "non-json-options": {**GOOD, "id": "m-non-json-options", "options": "{not json"},
        "deadline-not-a-number": {**GOOD, "id": "m-deadline-not-a-number", "deadline": "soon"},
        "deadline-nan": {**GOOD, "id": "m-deadline-nan", "deadline": "nan"},
        "options-a-list": {**GOOD, "id": "m-options-a-list", "options": "[1, 2, 3]"},
        "refine-options-a-list": {**GOOD, "id": "m-refine-options-a-list", "kind": "refine", "options": "[1, 2]"},
        "refine-options-a-string": {**GOOD, "id": "m-refine-options-a-string", "kind": "refine", "options": '"x"'},
        "refine-huge-click": {**GOOD, "id": "m-refine-huge-click", "kind": "refine",
                              "options": '{"points": [[1' + "0" * 400 + ', 2, 1]]}'},
        "options-nested-too-deep": {**GOOD, "id": "m-options-nested-too-deep", "options": "[" * 100_000},
        "huge-unknown-kind": {**GOOD, "id": "m-huge-unknown-kind", "kind": "k" * 1_000_000},
        "id-too-long": {**GOOD, "id": "i" * 10_000, "kind": "nope"},
        "binary-junk": {b"\xff\xfe\x00id": b"\x80\x81", b"\x00": b"\xc3\x28" * 100, "id": b"\xff", "kind": b"\xfe"},
        "many-fields": {f"f{i}": "v" for i in range(1000)},
    }
    for fields in entries.values():
        if str(fields.get("id", "")).startswith("m-"):
            fields["id"] = f"{tag}-{fields['id'][2:]}"
    return entries


def _add_garbage(q: JobQueue, tag: str) -> dict[str, str]:
    """``XADD`` every kind of garbage; returns the stream entry id of each."""
    q.ensure_group()
    return {name: q.redis.xadd(q.config.job_stream, fields).decode() for name, fields in garbage(tag).items()}


def _dead_letters(q: JobQueue) -> dict[str, dict[bytes, bytes]]:
    """The dead-letter stream's entries by the stream entry id of the job stream they came from."""
    return {f[b"entry"].decode(): f for _, f in q.redis.xrange(q.config.dead_letter_stream) if b"entry" in f}


def _check_quarantined(q: JobQueue, added: dict[str, str], tag: str) -> None:
    dead = _dead_letters(q)
    assert set(added.values()) <= set(dead), set(added) - {n for n, e in added.items() if e in dead}
    for name, entry_id in added.items():
        fields = dead[entry_id]
        cause = fields[b"cause"].decode()
        assert cause.startswith("malformed job: ") and len(cause) < 600, (name, cause)
        assert len(fields) <= MALFORMED_MAX_FIELDS + 3 and max(map(len, fields.values())) <= MALFORMED_FIELD_BYTES
    causes = {name: dead[entry_id][b"cause"].decode() for name, entry_id in added.items()}
    assert "missing field 'deadline'" in causes["missing-fields"]
    assert "options must be a JSON object, not list" in causes["refine-options-a-list"]
    assert "finite unix time" in causes["deadline-nan"]
    assert "kind must be one of" in causes["huge-unknown-kind"]
    assert "(1000002 characters)" in causes["huge-unknown-kind"]  # the 1 MB kind is quoted, cut short
    assert "a point must be [x, y, label]" in causes["refine-huge-click"]
    for name in ("missing-fields", "refine-options-a-list", "huge-unknown-kind"):  # their waiters are told
        result = q.wait(f"{tag}-{name}", timeout=1)
        assert result.error_code == BAD_INPUT and "malformed job" in result.error_message, name


def test_every_kind_of_garbage_is_dead_lettered_with_its_cause(job_queue: JobQueue) -> None:
    q = job_queue
    added = _add_garbage(q, "m")
    good = Job(image=q.put_image(IMAGE), query="still served")
    q.submit(good)
    got = q.consume("w1", count=100, block_ms=0)
    assert [j.id for j in got] == [good.id]
    _check_quarantined(q, added, "m")
    assert q.stats() == {"depth": 1, "pending": 1, "queued": 0, "dead_letter": len(added), "max_queue_length": 100}


def test_a_worker_survives_garbage_and_a_restart_on_the_same_stream(job_queue: JobQueue, spawn_worker) -> None:
    q = job_queue
    first = spawn_worker("w-garbage", q.config)
    wait_for(lambda: q.live_workers(), what="the worker to register")
    added = _add_garbage(q, "first")
    good = Job(image=q.put_image(IMAGE), query="after the garbage")
    q.submit(good)
    result = q.wait(good, timeout=10)
    assert result.ok and result.worker == "w-garbage", result.error_message
    _check_quarantined(q, added, "first")
    assert first.proc.poll() is None and [w["name"] for w in q.live_workers()] == ["w-garbage"]

    # A fleet that crashed on garbage left it in a dead worker's hands, with more queued behind it.
    first.signal(signal.SIGTERM)
    assert first.wait(10) == 0
    q.redis.delete(q.config.dead_letter_stream)
    held = _add_garbage(q, "held")
    assert len(q.redis.xreadgroup(q.config.consumer_group, "crashed", {q.config.job_stream: ">"})[0][1]) == len(held)
    queued = _add_garbage(q, "queued")
    second = spawn_worker("w-restarted", q.config)
    after = Job(image=q.put_image(IMAGE), query="after the restart")
    q.submit(after)
    assert q.wait(after, timeout=15).worker == "w-restarted"
    wait_for(lambda: len(_dead_letters(q)) == len(held) + len(queued), timeout=15, what="the crashed worker's garbage")
    _check_quarantined(q, held, "held")
    _check_quarantined(q, queued, "queued")
    assert second.proc.poll() is None and q.stats()["depth"] == 0


def test_a_result_that_cannot_be_delivered_fails_its_job_not_the_worker(job_queue: JobQueue, spawn_worker) -> None:
    """An exception outside the model call (here: a result whose timings are not numbers) fails the batch by the
    usual rules: the job is retried, then dead-lettered with the cause; its neighbours are answered."""
    q = job_queue
    worker = spawn_worker("w-bad-result", q.config)
    wait_for(lambda: q.live_workers(), what="the worker to register")
    bad = Job(image=q.put_image(IMAGE), query="unencodable", options={"bad_result": True})
    fine = Job(image=q.put_image(IMAGE), query="fine")
    q.submit_many([bad, fine])
    assert q.wait(fine, timeout=10).ok
    result = q.wait(bad, timeout=10)
    assert result.error_code == DEAD_LETTER and "3 of 3" in result.error_message
    assert "ValueError: could not convert string to float" in result.error_message
    batches = [json.loads(b) for b in q.redis.lrange("test:batches", 0, -1)]
    attempts = [a for b in batches for i, a in zip(b["ids"], b["attempts"]) if i == bad.id]
    assert attempts == [1, 2, 3]
    assert worker.proc.poll() is None and q.stats()["depth"] == 0


class SwitchFailsOnce:
    """A handler whose model switch (run between batches) fails the first time, as a bad promotion might."""

    def __init__(self) -> None:
        self.switches = 0

    def maybe_switch(self, _queue: JobQueue) -> str | None:
        self.switches += 1
        if self.switches == 1:
            raise FileNotFoundError("adapter_model.safetensors")
        return None

    def __call__(self, jobs: list[Job]) -> list[Result]:
        return [Result(job_id=j.id, text="served") for j in jobs]


def test_an_error_between_batches_is_logged_and_the_loop_goes_on(job_queue: JobQueue, caplog) -> None:
    handler = SwitchFailsOnce()
    loop = WorkerLoop.from_url(handler, config=job_queue.config, name="w-switch")
    runner = threading.Thread(target=loop.run, kwargs={"install_signals": False})
    runner.start()
    try:
        job = Job(image=job_queue.put_image(IMAGE), query="after a failed switch")
        job_queue.submit(job)
        assert job_queue.wait(job, timeout=10).text == "served"
    finally:
        loop.stop()
        runner.join(10)
    assert handler.switches >= 2 and not runner.is_alive()
    assert "FileNotFoundError: adapter_model.safetensors" in caplog.text


@pytest.mark.parametrize("options", ["[]", '"text"', "null", "3"])
def test_job_options_must_be_an_object(options: str) -> None:
    with pytest.raises(ValueError, match="options must be a JSON object"):
        Job.from_fields({**GOOD, "id": "j", "options": options})


def test_a_redis_error_mid_batch_hands_the_jobs_back_at_once(queue_config) -> None:
    """A Redis error while a batch is delivered (here: the result list's key holds a string) must not leave the
    job with a worker that keeps its heartbeat until the visibility timeout (120 s here): it is retried at once."""
    cfg = make_config(queue_config.redis_url, visibility_timeout_s=120.0, job_deadline_s=30.0, result_ttl_s=300)
    q = JobQueue(connect(config=cfg), cfg)
    attempts: list[int] = []

    def handler(jobs: list[Job]) -> list[Result]:
        attempts.append(jobs[0].attempts)
        if jobs[0].attempts == 1:  # the answer's RPUSH fails with WRONGTYPE
            q.redis.set(q.key("res", jobs[0].id), "not a list")
        else:
            q.redis.delete(q.key("res", jobs[0].id))
        return [Result(job_id=j.id, text=f"attempt {j.attempts}") for j in jobs]

    loop = WorkerLoop.from_url(handler, config=cfg, name="w-redis-error")
    runner = threading.Thread(target=loop.run, kwargs={"install_signals": False})
    runner.start()
    try:
        job = Job(image=q.put_image(IMAGE), query="delivered on the second try")
        q.submit(job)
        wait_for(lambda: len(attempts) >= 2, timeout=20, what="the job's second delivery")
        assert q.wait(job, timeout=10).text == "attempt 2"
    finally:
        loop.stop()
        runner.join(10)
    assert attempts == [1, 2]
