"""The Redis side of capture (:mod:`backend.capture`): its keys, its Lua scripts and :func:`store_event`.

Keys (all in the queue's hash-tag slot, built by ``config.key``), each bounded:

* ``capture`` - the stream of stored webhook bodies. An acknowledged event is deleted, so the stream is the
  backlog, bounded by ``LISA_LS_CAPTURE_BACKLOG`` events and ``LISA_LS_CAPTURE_BACKLOG_MB`` bytes of bodies;
* ``capture:bytes`` - the body bytes the stream holds (kept with each append and acknowledgement);
* ``capture:stored:<token>`` - which entry one :func:`store_event` call appended, for
  :data:`STORED_TTL_S`: a retried append returns that entry instead of storing the body again;
* ``capture:versions`` - annotation id -> newest version seen (or a tombstone); records older than
  :data:`VERSIONS_KEEP_S` are trimmed once no older event waits in the stream (:data:`TRIM`);
* ``capture:stats`` - outcome counters (a fixed set of names); ``capture:errors`` - the last error of each event
  that is waiting to be retried (removed with the event).
"""

from __future__ import annotations

import datetime as dt
import json
import re
import time
import uuid
from typing import Any

import redis

from backend.config import BackendConfig
from backend.dataset import parse_time
from backend.samples import ls_id
from worker.client.connection import call_with_retry
from worker.client.defaults import QueueConfig
from worker.client.protocol import BUSY, QueueError

CREATED, UPDATED, DELETED = "ANNOTATION_CREATED", "ANNOTATION_UPDATED", "ANNOTATIONS_DELETED"
#: Label Studio's bulk creation (annotations imported with tasks): lists of annotations and of their tasks, in order.
BULK_CREATED = "ANNOTATIONS_CREATED"
DELETE_PART = 1000  # annotation ids per part of a large deletion: one versions script call, one dataset lock
WEBHOOK_BUDGET_S = 0.8  # Label Studio gives the whole call 1 s
STORED_TTL_S = 60  # far above WEBHOOK_BUDGET_S: the retries of one store call all happen within it
VERSIONS_KEEP_S = 24 * 3600
"""How long a version record (or tombstone) outlives the event that wrote it. It only has to outlast the events
still on their way that it must win against: a webhook Label Studio sent earlier but that arrived later (seconds)
and events held in the stream (the trim never passes the oldest unacknowledged one)."""

# Append one event unless the backlog is full, once per store call. KEYS: stream, bytes, token key. ARGV: most
# events, most bytes, event, received, token ttl. Returns the entry id (the first append's, for a retried call),
# or false when full.
APPEND = """
local done = redis.call('GET', KEYS[3])
if done then return done end
local len = redis.call('XLEN', KEYS[1])
local held = tonumber(redis.call('GET', KEYS[2]) or '0')
if len == 0 then held = 0 end
if len >= tonumber(ARGV[1]) or held + #ARGV[3] > tonumber(ARGV[2]) then return false end
local id = redis.call('XADD', KEYS[1], '*', 'event', ARGV[3], 'received', ARGV[4])
redis.call('SET', KEYS[2], string.format('%d', held + #ARGV[3]))
redis.call('SET', KEYS[3], id, 'EX', ARGV[5])
return id
"""

# Acknowledge one event: delete it, count its outcomes and, if it was split, append its parts (in one step, so a
# crash leaves either the event or all of its parts; the parts pass the backlog's bounds: the event they replace
# was already acknowledged to Label Studio). KEYS: stream, bytes, errors, stats. ARGV: group, entry id, its body
# bytes, received, number of outcome names, the names, then the parts' bodies.
DONE = """
redis.call('XACK', KEYS[1], ARGV[1], ARGV[2])
local held = tonumber(redis.call('GET', KEYS[2]) or '0')
local gone = redis.call('XDEL', KEYS[1], ARGV[2])
redis.call('HDEL', KEYS[3], ARGV[2])
local n = tonumber(ARGV[5])
for i = 6, 5 + n do redis.call('HINCRBY', KEYS[4], ARGV[i], 1) end
if gone == 1 then
  held = held - tonumber(ARGV[3])
  for i = 6 + n, #ARGV do
    redis.call('XADD', KEYS[1], '*', 'event', ARGV[i], 'received', ARGV[4], 'part_of', ARGV[2], 'index',
               tostring(i - 6 - n))
    held = held + #ARGV[i]
  end
end
if held < 0 then held = 0 end
redis.call('SET', KEYS[2], string.format('%d', held))
return gone
"""

# Compare-and-set of annotation versions. KEYS: versions hash. ARGV: updated_at (us), entry ms, entry seq, kind
# ('put' or 'del'), project id ('' unknown), then annotation ids. A tombstone is final; a put needs a version >=
# the stored one (equal: the same event again, harmless to apply twice). Per id, returns the project the record
# names if admitted ('' unknown: a deletion falls back on the project stored with the annotation), else 0.
OFFER = """
local out = {}
local nu, nms, nseq = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
for i = 6, #ARGV do
  local cur = redis.call('HGET', KEYS[1], ARGV[i])
  local ok, where = true, ARGV[5]
  if cur then
    local u, ms, seq, kind, proj = string.match(cur, '^(%d+):(%d+):(%d+):(%a+):?(%d*)')
    if where == '' and proj then where = proj end
    if kind == 'del' then
      ok = ARGV[4] == 'del'
    elseif u and ARGV[4] ~= 'del' then
      u, ms, seq = tonumber(u), tonumber(ms), tonumber(seq)
      if nu < u or (nu == u and (nms < ms or (nms == ms and nseq < seq))) then ok = false end
    end
  end
  if ok then
    redis.call('HSET', KEYS[1], ARGV[i], ARGV[1] .. ':' .. ARGV[2] .. ':' .. ARGV[3] .. ':' .. ARGV[4] .. ':' .. where)
    out[#out + 1] = where
  else
    out[#out + 1] = 0
  end
end
return out
"""

# One step of trimming the versions hash: drop records written (entry ms) before a cutoff. KEYS: versions. ARGV:
# cursor, count, cutoff ms. Returns {next cursor, records removed}.
TRIM = """
local reply = redis.call('HSCAN', KEYS[1], ARGV[1], 'COUNT', ARGV[2])
local fields, removed, cutoff = reply[2], 0, tonumber(ARGV[3])
for i = 1, #fields, 2 do
  local ms = tonumber(string.match(fields[i + 1], '^%d+:(%d+):') or '0')
  if ms < cutoff then
    redis.call('HDEL', KEYS[1], fields[i])
    removed = removed + 1
  end
end
return {reply[1], removed}
"""


def version_of(annotation: dict[str, Any], entry_id: str) -> tuple[int, int, int]:
    """``(updated_at in microseconds, entry ms, entry seq)``: the order in which versions supersede each other.

    The stream entry id breaks ties (the later arrival wins); an annotation without timestamps counts as oldest.
    """
    when = parse_time(annotation.get("updated_at")) or parse_time(annotation.get("created_at"))
    micros = (when - _EPOCH) // dt.timedelta(microseconds=1) if when else 0
    ms, _, seq = entry_id.partition("-")
    return int(micros), int(ms), int(seq or 0)


_EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.timezone.utc)


class CaptureFull(QueueError):
    """Too many webhook events (or bytes of them) wait to be processed: answered 503 (Label Studio logs it)."""

    code = BUSY


def keys(config: QueueConfig) -> dict[str, str]:
    """The Redis keys of capture, built by ``config.key``: in the queue's hash-tag slot, like every key the
    scripts and transactions here touch together."""
    return {name: config.key(kind) for name, kind in
            (("stream", "capture"), ("versions", "capture:versions"), ("stats", "capture:stats"),
             ("errors", "capture:errors"), ("bytes", "capture:bytes"))}


def store_event(client: redis.Redis, config: BackendConfig, raw: bytes, attempt_s: float) -> str:
    """Append a raw webhook body to the capture stream; returns its entry id. Raises :class:`CaptureFull`, or
    :class:`~worker.client.connection.RedisDown` within :data:`WEBHOOK_BUDGET_S`.

    A retry after a timed-out attempt (a large body, a slow Redis) returns the entry the first attempt appended,
    through a token of this call: the body is stored once however many attempts ran.
    """
    names = keys(config.queue)
    token = config.queue.key("capture:stored", uuid.uuid4().hex)
    script = client.register_script(APPEND)
    limit = config.capture_backlog_mb * 2**20
    args = [config.capture_backlog, limit, raw, f"{time.time():.6f}", STORED_TTL_S]
    entry = call_with_retry(lambda: script(keys=[names["stream"], names["bytes"], token], args=args),
                            budget_s=WEBHOOK_BUDGET_S, backoff_s=config.queue.client_backoff_s, attempt_s=attempt_s,
                            what="storing a webhook event")
    if entry is None:
        raise CaptureFull(f"the capture backlog is full ({config.capture_backlog} events or "
                          f"{config.capture_backlog_mb} MB waiting: LISA_LS_CAPTURE_BACKLOG, "
                          "LISA_LS_CAPTURE_BACKLOG_MB); the backend's capture threads cannot keep up or cannot reach "
                          "Label Studio's images. Run `lisa-ls export` later to pick up what was refused")
    return entry.decode() if isinstance(entry, bytes) else str(entry)


# ---- the parts of a split event (stream fields ``part_of`` and ``index``: written by us, never by a webhook) ----

_PART_OF = re.compile(rb"\d{1,20}-\d{1,20}")


def part_of(fields: dict[bytes, bytes]) -> tuple[str, int] | None:
    """``(original entry id, index)`` of a part that splitting an event appended (fields only we write)."""
    origin, index = fields.get(b"part_of"), fields.get(b"index")
    if origin and index and _PART_OF.fullmatch(origin) and index.isdigit() and len(index) < 10:
        return origin.decode(), int(index)
    return None


def deleted_ids(event: dict[str, Any]) -> list[int]:
    """The annotation ids an ``ANNOTATIONS_DELETED`` names, once each, in order (invalid ones left out)."""
    listed = event.get("annotations")
    items = listed if isinstance(listed, list) else [event.get("annotation")]
    return list(dict.fromkeys(i for i in map(ls_id, items) if i is not None))


def delete_parts(ids: list[int], event: dict[str, Any]) -> list[bytes]:
    """A long deletion as events of :data:`DELETE_PART` ids each."""
    project = ls_id(event.get("project"))
    return [json.dumps({"action": DELETED, "annotations": ids[i : i + DELETE_PART], "project": project}).encode()
            for i in range(0, len(ids), DELETE_PART)]


def bulk_parts(event: dict[str, Any]) -> list[bytes]:
    """A bulk creation of several annotations as one event per annotation (with its task), else none."""
    annotations, tasks = event.get("annotation"), event.get("task")
    if not isinstance(annotations, list) or len(annotations) < 2:
        return []
    if not isinstance(tasks, list) or len(tasks) != len(annotations):
        tasks = [None] * len(annotations)
    return [json.dumps({"action": BULK_CREATED, "annotation": [a], "task": [t], "project": event.get("project")})
            .encode() for a, t in zip(annotations, tasks)]
