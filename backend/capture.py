"""Capture: submitted annotations -> dataset samples, from Label Studio's webhooks, off the request path.

Label Studio gives a webhook 1 s and never retries, so ``/webhook`` only makes the event durable and answers:
:func:`store_event` appends the raw JSON to a Redis stream (as durable as Redis is configured; the compose file
runs it with an append-only file) and refuses with 503 past ``LISA_LS_CAPTURE_BACKLOG`` unprocessed events rather
than trim events it already acknowledged. A :class:`CaptureConsumer` thread in each backend process reads the
stream through a consumer group, does the slow work (image download, RLE decoding) and acknowledges an event only
once its outcome is on disk; an event whose process died is taken over after ``LISA_LS_CAPTURE_RECLAIM_S``, as
:mod:`worker.queue` does with jobs.

Order. Events arrive late, twice, or out of order (redelivery, reclaim, several processes). Each annotation's
newest version wins: a version is ``(updated_at, stream entry id)``, and a Lua compare-and-set on one Redis hash
(``{lisa}:capture:versions`` by default, annotation id -> version) admits only a version at least as new as the
last one. Deletion is final (Label Studio never reuses an annotation id): it leaves a tombstone, so a CREATED that
arrives after its DELETE is dropped. The check and the file writes happen together under the dataset's lock
(:meth:`backend.dataset.Dataset.lock`), so a slow older event can never overwrite a newer one.

Outcomes, counted in the hash ``{lisa}:capture:stats``: ``written``/``updated``/``unchanged`` (a sample),
``deleted``, ``stale`` (superseded), ``skipped`` plus ``skipped:<code>`` (written to ``skipped/<id>.json`` of the
project's dataset, or of ``$LISA_LS_DATASET_DIR/skipped/`` when the event names no project or annotation).

Requires every backend process to see the same dataset directory (one host, or a shared volume).
"""

from __future__ import annotations

import atexit
import contextlib
import datetime as dt
import json
import logging
import os
import socket
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import redis

from backend.config import BackendConfig
from backend.dataset import Dataset, atomic_write, now_iso, parse_time, sample_id
from backend.images import ImageFetcher
from backend.samples import RetryLater, SkipSample, annotation_identity, build_sample, ls_id
from worker import scripts
from worker.connection import CONNECTION_ERRORS, backoff_forever, call_with_retry, connect
from worker.defaults import QueueConfig
from worker.protocol import BUSY, QueueError

log = logging.getLogger(__name__)

CREATED, UPDATED, DELETED = "ANNOTATION_CREATED", "ANNOTATION_UPDATED", "ANNOTATIONS_DELETED"
#: Label Studio's bulk creation (annotations imported with tasks): lists of annotations and of their tasks, in order.
BULK_CREATED = "ANNOTATIONS_CREATED"
ACTIONS = (CREATED, BULK_CREATED, UPDATED, DELETED)
GROUP = "lisa-capture"
BATCH = 8
BLOCK_S = 1.0  # also how late a stopping consumer notices
MAX_DELIVERIES = 5
WEBHOOK_BUDGET_S = 0.8  # Label Studio gives the whole call 1 s

# Append one event unless the backlog is at its bound. KEYS: stream. ARGV: bound, event, received.
APPEND = """
if redis.call('XLEN', KEYS[1]) >= tonumber(ARGV[1]) then return false end
return redis.call('XADD', KEYS[1], '*', 'event', ARGV[2], 'received', ARGV[3])
"""

# Compare-and-set of one annotation's version. KEYS: versions hash. ARGV: annotation id, updated_at (us), entry id
# ms, entry id seq, kind ('put' or 'del'), project id. A tombstone is final; a put needs a version >= the stored
# one (equal: the same event again, which is harmless to apply twice). Returns 1 if admitted, else 0.
OFFER = """
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


class CaptureFull(QueueError):
    """Too many webhook events wait to be processed: answered 503 (Label Studio logs it)."""

    code = BUSY


def keys(config: QueueConfig) -> dict[str, str]:
    """The Redis keys of capture, built by ``config.key``: in the queue's hash-tag slot, like every key the
    scripts and transactions here touch together."""
    return {name: config.key(kind) for name, kind in
            (("stream", "capture"), ("versions", "capture:versions"), ("stats", "capture:stats"),
             ("errors", "capture:errors"))}


def store_event(client: redis.Redis, config: BackendConfig, raw: bytes, attempt_s: float) -> str:
    """Append a raw webhook body to the capture stream; returns its entry id. Raises :class:`CaptureFull`, or
    :class:`~worker.connection.RedisDown` within :data:`WEBHOOK_BUDGET_S`."""
    stream = keys(config.queue)["stream"]
    script = client.register_script(APPEND)
    args = [config.capture_backlog, raw, f"{time.time():.6f}"]
    q = config.queue
    entry = call_with_retry(lambda: script(keys=[stream], args=args), budget_s=WEBHOOK_BUDGET_S,
                            backoff_s=q.client_backoff_s, attempt_s=attempt_s, what="storing a webhook event")
    if entry is None:
        raise CaptureFull(f"{config.capture_backlog} webhook events wait to be captured (LISA_LS_CAPTURE_BACKLOG); "
                          "the backend's capture threads cannot keep up or cannot reach Label Studio's images")
    return entry.decode() if isinstance(entry, bytes) else str(entry)


def _s(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _version(annotation: dict[str, Any], entry_id: str) -> tuple[int, int, int]:
    """``(updated_at in microseconds, entry ms, entry seq)``: the order in which versions supersede each other.

    The stream entry id breaks ties (the later arrival wins); an annotation without timestamps counts as oldest.
    """
    when = parse_time(annotation.get("updated_at")) or parse_time(annotation.get("created_at"))
    micros = (when - _EPOCH) // dt.timedelta(microseconds=1) if when else 0
    ms, _, seq = entry_id.partition("-")
    return int(micros), int(ms), int(seq or 0)


_EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.timezone.utc)


class CaptureConsumer:
    """The background thread of one backend process that turns stored events into samples.

    ``poll()`` is one round (reclaim if due, then read and process new events); ``start()``/``stop()`` run it
    on a daemon thread. Thread-safe to stop from any thread.
    """

    def __init__(self, config: BackendConfig, fetcher: ImageFetcher, name: str | None = None) -> None:
        self.config, self.fetcher = config, fetcher
        q = config.queue
        self.redis = connect(q.redis_url, q, socket_timeout=BLOCK_S + q.socket_timeout_s)
        self.keys = keys(q)
        self.name = name or f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self.root = Path(config.dataset_root)
        self._offer = self.redis.register_script(OFFER)
        self._prune = self.redis.register_script(scripts.PRUNE)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._reclaim_ms = int(config.capture_reclaim_s * 1000)
        self._next_reclaim = 0.0

    # ---- lifecycle ----

    def start(self) -> None:
        """Run :meth:`poll` on a daemon thread until :meth:`stop` (also called at interpreter exit)."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="lisa-capture", daemon=True)
            self._thread.start()
            atexit.register(self.stop, 10.0)  # gunicorn's graceful exit: let the current event finish

    def stop(self, timeout: float = 0.2) -> None:
        """Ask the thread to stop after the current event and wait up to ``timeout`` s. Unfinished events stay
        pending and are reclaimed by another process."""
        self._stop.set()
        atexit.unregister(self.stop)
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout)

    def _run(self) -> None:
        for folder in self.root.glob("project-*"):  # what processes killed mid-write left behind
            with contextlib.suppress(Exception):
                Dataset.open(folder, create=False).sweep()
        delays = None
        while not self._stop.is_set():
            try:
                self.poll()
                delays = None
            except CONNECTION_ERRORS as e:
                delays = delays or backoff_forever(self.config.queue.worker_backoff_s)
                log.warning("capture: Redis unreachable (%s); retrying", e)
                self._stop.wait(next(delays))
            except Exception:  # a bug must not end capture for the life of the process
                log.exception("capture: unexpected error; retrying in 1 s")
                self._stop.wait(1.0)
        with contextlib.suppress(Exception):  # leave the group tidy unless we still hold events
            self._prune(keys=[self.keys["stream"]], args=[GROUP, self.name])
        self.redis.close()

    # ---- reading ----

    def _ensure_group(self) -> None:
        try:
            self.redis.xgroup_create(self.keys["stream"], GROUP, "0", mkstream=True)
        except redis.ResponseError as e:
            if "BUSYGROUP" not in str(e):
                raise

    def poll(self, block_s: float = BLOCK_S) -> int:
        """Reclaim stale events if due, then read and process new ones (blocking up to ``block_s``)."""
        done = 0
        if time.monotonic() >= self._next_reclaim:
            self._next_reclaim = time.monotonic() + min(self.config.capture_reclaim_s / 4, 10.0)
            done += self._reclaim()
        args = (GROUP, self.name, {self.keys["stream"]: ">"})
        block = int(block_s * 1000) or None
        try:
            reply = self.redis.xreadgroup(*args, count=BATCH, block=block)
        except redis.ResponseError as e:
            if "NOGROUP" not in str(e):
                raise
            self._ensure_group()  # first start, or Redis restarted empty
            reply = self.redis.xreadgroup(*args, count=BATCH, block=block)
        if isinstance(reply, dict):  # RESP3
            reply = list(reply.items())
        for _stream, entries in reply or []:
            for entry_id, fields in entries:
                if self._stop.is_set():
                    return done  # the rest stay pending for a reclaim
                self.process(_s(entry_id), fields, 1)
                done += 1
        return done

    def _reclaim(self) -> int:
        stream = self.keys["stream"]
        try:
            stale = self.redis.xpending_range(stream, GROUP, "-", "+", BATCH, idle=self._reclaim_ms)
        except redis.ResponseError as e:
            if "NOGROUP" in str(e):
                return 0
            raise
        if not stale:
            return 0
        deliveries = {_s(p["message_id"]): int(p["times_delivered"]) + 1 for p in stale}
        # XCLAIM re-checks the idle time, so an event another process took a moment ago is not taken twice.
        claimed = self.redis.xclaim(stream, GROUP, self.name, self._reclaim_ms, list(deliveries))
        for entry_id, fields in claimed:
            if entry_id is None or fields is None or self._stop.is_set():
                continue
            self.process(_s(entry_id), fields, deliveries.get(_s(entry_id), MAX_DELIVERIES))
        gone = set(deliveries) - {_s(e[0]) for e in claimed if e[0] is not None and e[1] is not None}
        for entry_id in gone:  # Redis 6.2 keeps pending ids whose entry was deleted: retire them
            if not self.redis.xrange(stream, entry_id, entry_id):
                self.redis.xack(stream, GROUP, entry_id)
        return len(claimed)

    # ---- processing ----

    def process(self, entry_id: str, fields: dict[bytes, bytes], deliveries: int) -> str | None:
        """Apply one event; acknowledge it unless it should be tried again. Returns the outcome (None: retry)."""
        final = deliveries >= MAX_DELIVERIES
        try:
            try:
                event = json.loads(fields.get(b"event") or b"")
            except (TypeError, ValueError):
                event = None
            if not isinstance(event, dict):
                outcomes = [self._skip_event(entry_id, "bad_json", "the webhook body is not a JSON object", None)]
            elif event.get("action") in (CREATED, UPDATED):
                outcomes = [self._upsert(event, entry_id, final)]
            elif event.get("action") == BULK_CREATED:
                outcomes = self._bulk(event, entry_id, final)
            elif event.get("action") == DELETED:
                outcomes = [self._delete(event, entry_id)]
            else:
                outcomes = [self._skip_event(entry_id, "unknown_action", f"action {event.get('action')!r} is not "
                                             "captured", event)]
        except CONNECTION_ERRORS:
            raise
        except RetryLater as e:  # only raised before the last delivery (see _upsert)
            log.info("capture: event %s will be retried: %s", entry_id, e)
            self.redis.hset(self.keys["errors"], entry_id, str(e))
            return None
        except Exception as e:  # a bug, a full disk: try again later, give up after MAX_DELIVERIES
            if not final:
                log.warning("capture: event %s failed (delivery %d): %s", entry_id, deliveries, e, exc_info=True)
                self.redis.hset(self.keys["errors"], entry_id, f"{type(e).__name__}: {e}")
                return None
            outcomes = [self._skip_event(entry_id, "failed", f"gave up after {deliveries} tries: "
                                         f"{type(e).__name__}: {e}", None)]
        pipe = self.redis.pipeline(transaction=True)
        pipe.xack(self.keys["stream"], GROUP, entry_id)
        pipe.xdel(self.keys["stream"], entry_id)  # the stream's length stays the backlog
        pipe.hdel(self.keys["errors"], entry_id)
        for outcome in outcomes:
            for name in {outcome.partition(":")[0], outcome}:
                pipe.hincrby(self.keys["stats"], name, 1)
        pipe.execute()
        return ",".join(outcomes)

    def _dataset(self, project_id: int) -> Dataset:
        return Dataset.open(self.root / f"project-{project_id}", project_id=project_id,
                            label_studio_url=self.config.label_studio_url, val_percent=self.config.val_percent)

    def _admit(self, annotation_id: int, version: tuple[int, int, int], kind: str, project_id: object) -> bool:
        reply = self._offer(keys=[self.keys["versions"]],
                            args=[annotation_id, *version, kind, "" if project_id is None else project_id])
        return bool(reply)

    def _superseded(self, annotation_id: int, version: tuple[int, int, int]) -> bool:
        """The cheap pre-check (the Lua check under the lock decides): a newer version or a tombstone exists."""
        cur = self.redis.hget(self.keys["versions"], annotation_id)
        if not cur:
            return False
        parts = _s(cur).split(":")
        return parts[3] == "del" or tuple(int(p) for p in parts[:3]) > version

    def _upsert(self, event: dict[str, Any], entry_id: str, final: bool) -> str:
        annotation, task, project = event.get("annotation"), event.get("task"), event.get("project")
        try:
            pid, tid, aid = annotation_identity(annotation, task, project)
        except SkipSample as s:
            return self._skip_event(entry_id, s.code, s.reason, event)
        assert isinstance(annotation, dict)
        version = _version(annotation, entry_id)
        if self._superseded(aid, version):
            return "stale"
        label_config = project.get("label_config") if isinstance(project, dict) else None
        draft, skip = None, None
        try:
            draft = build_sample(annotation, task, label_config, self.fetcher.fetch, pid)
        except SkipSample as s:
            skip = s
        except RetryLater as e:
            if not final:
                raise
            skip = SkipSample("image_unreachable", f"gave up after {MAX_DELIVERIES} tries: {e}")
        dataset = self._dataset(pid)
        sid = sample_id(pid, aid)
        with dataset.lock():
            if not self._admit(aid, version, "put", pid):
                return "stale"
            if draft is not None:  # keep_newer: an export may already hold a later version than this event
                return dataset.commit(draft, "webhook", keep_newer=True)
            assert skip is not None
            info = {"annotation_id": aid, "task_id": tid, "project_id": pid, "source": "webhook",
                    "updated_at": annotation.get("updated_at"), "event": entry_id}
            dataset.record_skip(sid, skip.code, skip.reason, info, keep_sample=skip.keep_sample)
        log.warning("capture: annotation %s of project %s skipped: %s", aid, pid, skip)
        return f"skipped:{skip.code}"

    def _bulk(self, event: dict[str, Any], entry_id: str, final: bool) -> list[str]:
        """``ANNOTATIONS_CREATED``: each listed annotation as its own ``ANNOTATION_CREATED`` with its task. Applying
        the event again after a retry is harmless (versions make each annotation's write idempotent)."""
        annotations, tasks = event.get("annotation"), event.get("task")
        if not isinstance(annotations, list) or not annotations:
            return [self._skip_event(entry_id, "missing_field", "the bulk event lists no annotations", event)]
        if not isinstance(tasks, list) or len(tasks) != len(annotations):
            tasks = [None] * len(annotations)  # each annotation is then skipped with missing_field, as usual
        return [self._upsert({"action": BULK_CREATED, "annotation": annotation, "task": task,
                              "project": event.get("project"), "bulk_index": i}, entry_id, final)
                for i, (annotation, task) in enumerate(zip(annotations, tasks))]

    def _delete(self, event: dict[str, Any], entry_id: str) -> str:
        listed = event.get("annotations")
        items = listed if isinstance(listed, list) else [event.get("annotation")]
        ids = [i for i in map(ls_id, items) if i is not None]
        if not ids:
            return self._skip_event(entry_id, "missing_field", "the deletion names no annotation ids", event)
        pid = ls_id(event.get("project"))
        removed = 0
        for aid in ids:
            where = pid
            if where is None:  # older payloads: the project we stored with the annotation's version
                known = self.redis.hget(self.keys["versions"], aid)
                where = ls_id(_s(known).split(":")[4]) if known else None
            folder = self.root / f"project-{where}"
            if where is None or not (folder / "dataset.json").exists():
                # Nothing on disk (a writer creates the folder before it admits a version): the tombstone alone
                # keeps a late CREATED out.
                self._admit(aid, (0, 0, 0), "del", "" if where is None else where)
                continue
            dataset = Dataset.open(folder, create=False)
            with dataset.lock():
                self._admit(aid, (0, 0, 0), "del", where)
                removed += dataset.remove(sample_id(where, aid))
        log.info("capture: %d annotation(s) deleted, %d sample(s) removed", len(ids), removed)
        return "deleted"

    def _skip_event(self, entry_id: str, code: str, reason: str, event: dict[str, Any] | None) -> str:
        """Record an event that names no annotation we can place (written under the datasets' root)."""
        folder = self.root / "skipped"
        folder.mkdir(parents=True, exist_ok=True)
        action = event.get("action") if isinstance(event, dict) else None
        name = f"event-{entry_id}"
        if isinstance(event, dict) and "bulk_index" in event:  # one record per annotation of a bulk event
            name += f"-{event['bulk_index']}"
        record = {"id": name, "code": code, "reason": reason, "action": action, "event": entry_id,
                  "source": "webhook", "written_at": now_iso()}
        atomic_write(folder / f"{name}.json", (json.dumps(record, indent=1) + "\n").encode())
        log.warning("capture: event %s (%s) skipped: %s: %s", entry_id, action, code, reason)
        return f"skipped:{code}"

