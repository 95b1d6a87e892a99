"""Which model version the workers serve: one Redis key, written by promotion, read by every worker.

``model:current`` (``{lisa}:model:current`` by default, built by :meth:`~worker.client.queue.JobQueue.key`) holds
``{"version", "base", "adapter", "promoted_at", "metrics"}``; ``model:history`` lists every promotion. A worker
checks it between batches (at most every ``MODEL_CHECK_INTERVAL_S``) and, when it names another version, loads it and
switches without a restart; ``/setup`` then reports the new version and Label Studio re-predicts its tasks. Paths
in the key must be readable by every worker (a shared volume).

Every call goes through the queue's retries (:meth:`~worker.client.queue_client.QueueClient.call`): a lost
connection is retried within ``redis_down_after_s``, then :class:`~worker.client.connection.RedisDown` is raised,
as for every other queue call.
"""

from __future__ import annotations

import json
import time
from typing import Any

import redis

from worker.client.connection import RedisDown
from worker.client.defaults import MODEL_CHECK_INTERVAL_S
from worker.client.queue import JobQueue

CHECK_INTERVAL_S = MODEL_CHECK_INTERVAL_S
"""How often a worker looks for a newly promoted version (the default lives in :mod:`worker.client.defaults`)."""


def current(queue: JobQueue) -> dict[str, Any] | None:
    """The promoted model, or ``None`` when nothing was promoted (workers serve what they were started with)."""
    raw = queue.call(lambda: queue.redis.get(queue.key("model", "current")), "registry.current")
    return json.loads(raw) if raw else None


def promote(queue: JobQueue, version: str, base: str, adapter: str | None, metrics: dict[str, Any]) -> dict:
    """Make ``version`` (``base`` + optional ``adapter``) the one every worker serves."""
    entry = {"version": version, "base": base, "adapter": adapter, "promoted_at": time.time(), "metrics": metrics}
    queue.pipeline(
        lambda pipe: (
            pipe.set(queue.key("model", "current"), json.dumps(entry)),
            pipe.rpush(queue.key("model", "history"), json.dumps(entry)),
        ),
        "registry.promote",
        transaction=True,  # both or neither: the history never lists a version that was not made current
    )
    return entry


def history(queue: JobQueue) -> list[dict[str, Any]]:
    """Every promotion, oldest first; empty when Redis cannot be read (the history is informational)."""
    try:
        raw = queue.call(lambda: queue.redis.lrange(queue.key("model", "history"), 0, -1), "registry.history")
    except (redis.RedisError, RedisDown):
        return []
    return [json.loads(x) for x in raw]
