"""Capture: submitted annotations -> dataset samples, from Label Studio's webhooks, off the request path.

Label Studio gives a webhook 1 s and never retries, so ``/webhook`` only makes the event durable and answers:
:func:`store_event` appends the raw JSON to a Redis stream (as durable as Redis is configured; the compose file
runs it with an append-only file), once however often a slow append is retried, and refuses with 503 past
``LISA_LS_CAPTURE_BACKLOG`` unprocessed events or ``LISA_LS_CAPTURE_BACKLOG_MB`` of them rather than trim events
it already acknowledged (the keys and scripts: :mod:`backend.capture_store`). A :class:`CaptureConsumer` thread in
each backend process reads the stream through a consumer group, does the slow work (image download, RLE decoding)
and acknowledges an event only once its outcome is on disk; an event whose process died is taken over after
``LISA_LS_CAPTURE_RECLAIM_S``, as :mod:`worker.client.queue` does with jobs.

Bounded steps. An ``ANNOTATIONS_DELETED`` listing more than :data:`DELETE_PART` ids, or an ``ANNOTATIONS_CREATED``
listing more than one annotation, is not processed at once: its acknowledgement appends its parts (one annotation,
or :data:`DELETE_PART` ids, each) to the stream in the same atomic step, so no step of the capture thread holds
more than one image fetch or one part's deletions, and a process killed mid-way redoes at most one part.

Order. Events arrive late, twice, or out of order (redelivery, reclaim, several processes). Each annotation's
newest version wins: a version is ``(updated_at, stream entry id)``, and a Lua compare-and-set on one Redis hash
(``{lisa}:capture:versions`` by default, annotation id -> version) admits only a version at least as new as the
last one. Deletion is final (Label Studio never reuses an annotation id): it leaves a tombstone, so a CREATED that
arrives after its DELETE is dropped. The check and the file writes happen together under the dataset's lock
(:meth:`backend.dataset.Dataset.lock`), so a slow older event can never overwrite a newer one. Records are trimmed
:data:`~backend.capture_store.VERSIONS_KEEP_S` after the event that wrote them, never while an older event is
still unacknowledged.

Outcomes, counted in the hash ``{lisa}:capture:stats``: ``written``/``updated``/``unchanged`` (a sample),
``deleted`` (one per deletion part), ``stale`` (superseded), ``split`` (an event replaced by its parts),
``skipped`` plus ``skipped:<code>`` (written to ``skipped/<id>.json`` of the project's dataset, or of
``$LISA_LS_DATASET_DIR/skipped/`` when the event names no project or annotation).

Requires every backend process to see the same dataset directory (one host, or a shared volume).
"""

from __future__ import annotations

import atexit
import contextlib
import json
import logging
import os
import socket
import threading
import time
import uuid
from pathlib import Path
from typing import Any

from backend.capture_store import APPEND as APPEND
from backend.capture_store import (
    BULK_CREATED,
    CREATED,
    DELETE_PART,
    DELETED,
    DONE,
    OFFER,
    TRIM,
    UPDATED,
    VERSIONS_KEEP_S,
    CaptureFull,
    bulk_parts,
    delete_parts,
    deleted_ids,
    keys,
    part_of,
    store_event,
    version_of,
)
from backend.config import (
    CAPTURE_BATCH,
    CAPTURE_BLOCK_S,
    CAPTURE_ERROR_CHARS,
    CAPTURE_GROUP,
    CAPTURE_MAX_DELIVERIES,
    CAPTURE_TRIM_COUNT,
    CAPTURE_TRIM_STEPS,
    BackendConfig,
)
from backend.dataset import Dataset, atomic_write, now_iso, sample_id
from backend.images import ImageFetcher
from backend.samples import RetryLater, SkipSample, annotation_identity, build_sample, ls_id
from worker.client import scripts
from worker.client.connection import CONNECTION_ERRORS, RedisDown, backoff_forever, connect
from worker.client.queue_client import QueueClient
from worker.client.stream import StreamGroup

__all__ = ["ACTIONS", "CaptureConsumer", "CaptureFull", "keys", "store_event"]

log = logging.getLogger(__name__)

ACTIONS = (CREATED, BULK_CREATED, UPDATED, DELETED)
# The capture's fixed values, under the short names this module uses (documented in backend/config.py).
GROUP, BATCH, BLOCK_S, MAX_DELIVERIES = CAPTURE_GROUP, CAPTURE_BATCH, CAPTURE_BLOCK_S, CAPTURE_MAX_DELIVERIES
TRIM_COUNT, TRIM_STEPS, ERROR_CHARS = CAPTURE_TRIM_COUNT, CAPTURE_TRIM_STEPS, CAPTURE_ERROR_CHARS


def _s(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class CaptureConsumer:
    """The background thread of one backend process that turns stored events into samples.

    ``poll()`` is one round (reclaim and trim if due, then read and process new events); ``start()``/``stop()``
    run it on a daemon thread. Thread-safe to stop from any thread.
    """

    def __init__(self, config: BackendConfig, fetcher: ImageFetcher, name: str | None = None, *,
                 versions_keep_s: float = VERSIONS_KEEP_S) -> None:
        self.config, self.fetcher = config, fetcher
        q = config.queue
        self.redis = connect(q.redis_url, q, socket_timeout=BLOCK_S + q.socket_timeout_s)
        self.keys = keys(q)
        self.name = name or f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self.root = Path(config.dataset_root)
        self._offer = self.redis.register_script(OFFER)
        self._done = self.redis.register_script(DONE)
        self._trim = self.redis.register_script(TRIM)
        self._prune = self.redis.register_script(scripts.PRUNE)
        self.group = StreamGroup(QueueClient(self.redis, q), self.keys["stream"], GROUP)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._reclaim_ms = int(config.capture_reclaim_s * 1000)
        self._next_reclaim = 0.0
        self._keep_ms = int(versions_keep_s * 1000)
        self._trim_cursor = 0

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
            except (*CONNECTION_ERRORS, RedisDown) as e:
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

    def poll(self, block_s: float = BLOCK_S) -> int:
        """Reclaim stale events and trim old versions if due, then read and process new events (blocking up to
        ``block_s``)."""
        done = 0
        if time.monotonic() >= self._next_reclaim:
            self._next_reclaim = time.monotonic() + min(self.config.capture_reclaim_s / 4, 10.0)
            done += self._reclaim()
            self.trim_versions()
        for entry_id, fields in self.group.read(self.name, BATCH, int(block_s * 1000), "capture"):
            if self._stop.is_set():
                return done  # the rest stay pending for a reclaim
            self.process(entry_id, fields, 1)
            done += 1
        return done

    def _reclaim(self) -> int:
        claimed = self.group.reclaim(self.name, BATCH, self._reclaim_ms, "capture.reclaim")
        for entry_id, fields in claimed.entries:
            if self._stop.is_set():
                break
            self.process(entry_id, fields, claimed.deliveries.get(entry_id, MAX_DELIVERIES))
        if claimed.retired:  # ghosts of deleted entries: their error notes go with them
            self.redis.hdel(self.keys["errors"], *claimed.retired)
        return len(claimed.entries)

    def trim_versions(self) -> int:
        """Drop version records written more than ``versions_keep_s`` ago and before the oldest unacknowledged
        event (which may still need them), a few thousand records per call; returns how many went."""
        now_s, now_us = self.redis.time()
        cutoff = now_s * 1000 + now_us // 1000 - self._keep_ms
        oldest = self.group.oldest_pending()
        if oldest:
            cutoff = min(cutoff, int(oldest.partition("-")[0]))
        removed = 0
        for _ in range(TRIM_STEPS):
            cursor, gone = self._trim(keys=[self.keys["versions"]], args=[self._trim_cursor, TRIM_COUNT, cutoff])
            self._trim_cursor, removed = int(cursor), removed + int(gone)
            if self._trim_cursor == 0:  # a whole pass done: the next round starts another
                break
        return removed

    # ---- processing ----

    def process(self, entry_id: str, fields: dict[bytes, bytes], deliveries: int) -> str | None:
        """Apply one event; acknowledge it unless it should be tried again. Returns the outcome (None: retry)."""
        final = deliveries >= MAX_DELIVERIES
        raw = fields.get(b"event") or b""
        where = part_of(fields) or (entry_id, None)
        parts: list[bytes] = []
        try:
            try:
                event = json.loads(raw)
            except (TypeError, ValueError):
                event = None
            action = event.get("action") if isinstance(event, dict) else None
            if not isinstance(event, dict):
                outcomes = [self._skip_event(where, "bad_json", "the webhook body is not a JSON object", None)]
            elif action in (CREATED, UPDATED):
                outcomes = [self._upsert(event, entry_id, final, where)]
            elif action == BULK_CREATED:
                parts = bulk_parts(event)
                outcomes = ["split"] if parts else self._bulk(event, entry_id, final, where)
            elif action == DELETED:
                ids = deleted_ids(event)
                parts = delete_parts(ids, event) if len(ids) > DELETE_PART else []
                outcomes = ["split"] if parts else [self._delete(ids, event, entry_id, where)]
            else:
                outcomes = [self._skip_event(where, "unknown_action", f"action {_short(action)} is not captured",
                                             action)]
        except CONNECTION_ERRORS:
            raise
        except RetryLater as e:  # only raised before the last delivery (see _upsert)
            log.info("capture: event %s will be retried: %r", entry_id, str(e))
            self.redis.hset(self.keys["errors"], entry_id, str(e)[:ERROR_CHARS])
            return None
        except Exception as e:  # a bug, a full disk: try again later, give up after MAX_DELIVERIES
            if not final:
                log.warning("capture: event %s failed (delivery %d): %r", entry_id, deliveries, e, exc_info=True)
                self.redis.hset(self.keys["errors"], entry_id, f"{type(e).__name__}: {e}"[:ERROR_CHARS])
                return None
            outcomes = [self._skip_event(where, "failed", f"gave up after {deliveries} tries: "
                                         f"{type(e).__name__}: {e}"[:ERROR_CHARS], None)]
        names = [n for outcome in outcomes for n in dict.fromkeys((outcome.partition(":")[0], outcome))]
        self._done(keys=[self.keys[k] for k in ("stream", "bytes", "errors", "stats")],
                   args=[GROUP, entry_id, len(raw), fields.get(b"received") or b"", len(names), *names, *parts])
        return ",".join(outcomes)

    def _dataset(self, project_id: int) -> Dataset:
        return Dataset.open(self.root / f"project-{project_id}", project_id=project_id,
                            label_studio_url=self.config.label_studio_url, val_percent=self.config.val_percent)

    def _admit(self, annotation_ids: list[int], version: tuple[int, int, int], kind: str,
               project_id: int | None) -> list[int | None]:
        """The versions compare-and-set (:data:`~backend.capture_store.OFFER`) for some annotations of one
        event. Per id: the project its record names (None: unknown) if admitted, else -1."""
        reply = self._offer(keys=[self.keys["versions"]],
                            args=[*version, kind, "" if project_id is None else project_id, *annotation_ids])
        return [-1 if r == 0 else ls_id(_s(r)) for r in reply]

    def _superseded(self, annotation_id: int, version: tuple[int, int, int]) -> bool:
        """The cheap pre-check (the Lua check under the lock decides): a newer version or a tombstone exists."""
        cur = self.redis.hget(self.keys["versions"], annotation_id)
        if not cur:
            return False
        parts = _s(cur).split(":")
        return parts[3] == "del" or tuple(int(p) for p in parts[:3]) > version

    def _upsert(self, event: dict[str, Any], entry_id: str, final: bool, where: tuple[str, int | None]) -> str:
        annotation, task, project = event.get("annotation"), event.get("task"), event.get("project")
        try:
            pid, tid, aid = annotation_identity(annotation, task, project)
        except SkipSample as s:
            return self._skip_event(where, s.code, s.reason, event.get("action"))
        assert isinstance(annotation, dict)
        version = version_of(annotation, entry_id)
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
            if self._admit([aid], version, "put", pid) == [-1]:
                return "stale"
            if draft is not None:  # keep_newer: an export may already hold a later version than this event
                return dataset.commit(draft, "webhook", keep_newer=True)
            assert skip is not None
            info = {"annotation_id": aid, "task_id": tid, "project_id": pid, "source": "webhook",
                    "updated_at": annotation.get("updated_at"), "event": entry_id}
            dataset.record_skip(sid, skip.code, skip.reason, info, keep_sample=skip.keep_sample)
        log.warning("capture: annotation %d of project %d skipped: %s: %r", aid, pid, skip.code, skip.reason)
        return f"skipped:{skip.code}"

    def _bulk(self, event: dict[str, Any], entry_id: str, final: bool, where: tuple[str, int | None]) -> list[str]:
        """``ANNOTATIONS_CREATED`` of at most one annotation (longer ones were split into such parts), processed as
        an ``ANNOTATION_CREATED`` with its task. Applying it again after a retry is harmless (versions make each
        annotation's write idempotent)."""
        annotations, tasks = event.get("annotation"), event.get("task")
        if not isinstance(annotations, list) or not annotations:
            return [self._skip_event(where, "missing_field", "the bulk event lists no annotations", BULK_CREATED)]
        if not isinstance(tasks, list) or len(tasks) != len(annotations):
            tasks = [None] * len(annotations)  # each annotation is then skipped with missing_field, as usual
        origin, index = where
        return [self._upsert({"action": BULK_CREATED, "annotation": annotation, "task": task,
                              "project": event.get("project")}, entry_id, final,
                             (origin, i if index is None else index))
                for i, (annotation, task) in enumerate(zip(annotations, tasks))]

    def _delete(self, ids: list[int], event: dict[str, Any], entry_id: str, where: tuple[str, int | None]) -> str:
        """Tombstone up to :data:`DELETE_PART` annotations in one script call, then remove their samples, one
        dataset lock per project. The tombstones come first: a writer that was admitted before them commits under
        the lock, so its sample is there to be removed; one that comes after is refused."""
        if not ids:
            return self._skip_event(where, "missing_field", "the deletion names no annotation ids", DELETED)
        pid = ls_id(event.get("project"))
        _, ms, seq = version_of({}, entry_id)
        projects: dict[int, list[int]] = {}
        for aid, project in zip(ids, self._admit(ids, (0, ms, seq), "del", pid)):
            if project is not None and project >= 0:  # unknown: the tombstone alone keeps a late CREATED out
                projects.setdefault(project, []).append(aid)
        removed = 0
        for project, aids in projects.items():
            folder = self.root / f"project-{project}"
            if not (folder / "dataset.json").exists():  # nothing on disk (a writer creates it before it admits)
                continue
            dataset = Dataset.open(folder, create=False)
            with dataset.lock():
                removed += dataset.remove_many([sample_id(project, aid) for aid in aids])
        log.info("capture: %d annotation(s) deleted, %d sample(s) removed", len(ids), removed)
        return "deleted"

    def _skip_event(self, where: tuple[str, int | None], code: str, reason: str, action: object) -> str:
        """Record an event that names no annotation we can place (written under the datasets' root). ``where``:
        the stream entry, and the annotation's index in a bulk event - both set by us, never by the event."""
        folder = self.root / "skipped"
        folder.mkdir(parents=True, exist_ok=True)
        origin, index = where
        name = f"event-{origin}" if index is None else f"event-{origin}-{index}"
        record = {"id": name, "code": code, "reason": reason, "action": action if isinstance(action, str) else None,
                  "event": origin, "source": "webhook", "written_at": now_iso()}
        atomic_write(folder / f"{name}.json", (json.dumps(record, indent=1) + "\n").encode())
        log.warning("capture: event %s (action %s) skipped: %s: %r", name, _short(action), code, reason)
        return f"skipped:{code}"


def _short(value: object, chars: int = 80) -> str:
    """An untrusted value for a log line or a reason: quoted (no line breaks get through) and cut short."""
    text = repr(value)
    return text if len(text) <= chars else text[: chars - 3] + "..."
