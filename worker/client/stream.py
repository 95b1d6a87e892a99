"""One Redis Streams consumer group: the reading, reclaiming and ghost-retiring that the job queue
(:class:`worker.client.queue.JobQueue`) and the capture consumer (:class:`backend.capture.CaptureConsumer`) share.

Every Redis call goes through the owner's :meth:`~worker.client.queue_client.QueueClient.call` (that is,
:func:`~worker.client.connection.call_with_retry`), so a lost connection is retried within
``redis_down_after_s`` and then raises :class:`~worker.client.connection.RedisDown`, as for every queue call.

What the group handles so that its users do not:

- ``NOGROUP``: the group is created on first read (first consumer ever, or Redis restarted without persistence),
  from the stream's start, so earlier entries are served too; a pending list asked of a missing group is empty.
- Reclaiming: ``XPENDING ... IDLE`` lists entries held too long, ``XCLAIM`` with the same minimum idle time takes
  them atomically (an entry another consumer reclaimed a moment ago is skipped), and each comes back with its
  delivery number (times delivered before, plus one).
- Ghosts: Redis 6.2 keeps pending ids whose stream entry was deleted; ``XCLAIM`` answers nothing for them, so they
  would be listed for ever. Those that ``XRANGE`` confirms gone are acknowledged (retired) and reported.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, NamedTuple

import redis

if TYPE_CHECKING:
    from worker.client.queue_client import QueueClient

Entry = tuple[str, dict[bytes, bytes]]
"""A stream entry: its id and its fields."""


def _s(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _missing(exc: redis.ResponseError) -> bool:
    """The error says the group (or the stream itself) does not exist yet."""
    return "NOGROUP" in str(exc) or "no such key" in str(exc)


class Claimed(NamedTuple):
    """What one :meth:`StreamGroup.reclaim` took over."""

    entries: list[Entry]
    deliveries: dict[str, int]
    """Entry id -> the delivery this one is (times delivered before, plus one), for every listed entry."""
    retired: list[str]
    """Ghost ids acknowledged because their stream entry no longer exists."""


class StreamGroup:
    """The consumer group ``group`` on the stream ``stream``, reached through ``queue``'s retrying calls."""

    def __init__(self, queue: QueueClient, stream: str, group: str) -> None:
        self.queue, self.stream, self.group = queue, stream, group

    @property
    def redis(self) -> redis.Redis:
        return self.queue.redis

    def ensure(self) -> None:
        """Create the stream and the group if missing (from the start: earlier entries are read too)."""
        try:
            self.queue.call(
                lambda: self.redis.xgroup_create(self.stream, self.group, "0", mkstream=True), "ensure_group"
            )
        except redis.ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    def read(self, consumer: str, count: int, block_ms: int | None, what: str = "consume") -> list[Entry]:
        """Up to ``count`` new entries for ``consumer``, blocking up to ``block_ms`` (0 or None: do not block)."""

        def read() -> Any:
            # BLOCK 0 means "for ever" to Redis; None leaves BLOCK out, which means "do not block".
            args = (self.group, consumer, {self.stream: ">"})
            try:
                return self.redis.xreadgroup(*args, count=count, block=block_ms or None)
            except redis.ResponseError as exc:
                if "NOGROUP" not in str(exc):
                    raise
                self.ensure()
                return self.redis.xreadgroup(*args, count=count, block=block_ms or None)

        reply = self.queue.call(read, what)
        if isinstance(reply, dict):  # RESP3 clients
            reply = list(reply.items())
        return [(_s(entry_id), fields) for _stream, entries in reply or [] for entry_id, fields in entries]

    def pending(self, count: int, *, idle_ms: int | None = None, consumer: str | None = None,
                what: str = "reclaim") -> list[dict[str, Any]]:
        """``XPENDING`` details of up to ``count`` entries (idle at least ``idle_ms``, held by ``consumer`` if
        given); empty when the stream or group does not exist yet."""
        try:
            return self.queue.call(
                lambda: self.redis.xpending_range(
                    self.stream, self.group, "-", "+", count, idle=idle_ms, consumername=consumer
                ),
                what,
            )
        except redis.ResponseError as exc:
            if _missing(exc):
                return []
            raise

    def oldest_pending(self) -> str | None:
        """The id of the oldest unacknowledged entry (None: none, or no group yet)."""
        try:
            summary = self.queue.call(lambda: self.redis.xpending(self.stream, self.group), "pending")
        except redis.ResponseError as exc:
            if _missing(exc):
                return None
            raise
        oldest = summary.get("min")
        return _s(oldest) if oldest else None

    def reclaim(self, consumer: str, count: int, idle_ms: int, what: str = "reclaim") -> Claimed:
        """Take over up to ``count`` entries pending for at least ``idle_ms``, retiring ghosts (module docstring)."""
        stale = self.pending(count, idle_ms=idle_ms, what=what)
        if not stale:
            return Claimed([], {}, [])
        ids = [_s(p["message_id"]) for p in stale]
        deliveries = {_s(p["message_id"]): int(p["times_delivered"]) + 1 for p in stale}
        # XCLAIM re-checks the idle time atomically, so an entry another consumer reclaimed a moment ago is skipped.
        claimed = self.queue.call(lambda: self.redis.xclaim(self.stream, self.group, consumer, idle_ms, ids), what)
        entries = [(_s(e[0]), e[1]) for e in claimed if e[0] is not None and e[1] is not None]
        got = {entry_id for entry_id, _fields in entries}
        retired = [i for i in ids if i not in got and self._retire_ghost(i, what)]
        return Claimed(entries, deliveries, retired)

    def _retire_ghost(self, entry_id: str, what: str) -> bool:
        """Acknowledge ``entry_id`` if its stream entry is gone; whether it was."""
        if self.queue.call(lambda: self.redis.xrange(self.stream, entry_id, entry_id), what):
            return False
        self.queue.call(lambda: self.redis.xack(self.stream, self.group, entry_id), what)
        return True

    def hand_back(self, consumer: str, ids: Sequence[Any], idle_ms: int, what: str = "hand_back_own") -> None:
        """Keep ``ids`` pending under ``consumer`` but make them look idle for ``idle_ms`` (reclaimable now)."""
        if ids:
            self.queue.call(
                lambda: self.redis.xclaim(self.stream, self.group, consumer, 0, list(ids), idle=idle_ms, justid=True),
                what,
            )
