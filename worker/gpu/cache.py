"""An LRU cache of encoded images, bounded in bytes, keyed by (image content hash, model version).

Encoding (CLIP + the SAM ViT-H encoder) is the expensive half of a query; annotators ask several queries about one
image, so a worker keeps recent encodings. The model version is part of the key because an encoding from another
version's weights is wrong, not merely stale.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Generic, Protocol, TypeVar


class Sized(Protocol):
    @property
    def nbytes(self) -> int: ...


V = TypeVar("V", bound=Sized)


class EncodingCache(Generic[V]):
    """Least-recently-used values up to ``capacity_bytes`` in total (a value larger than that is not kept)."""

    def __init__(self, capacity_bytes: int) -> None:
        self.capacity_bytes = capacity_bytes
        self._items: OrderedDict[tuple[str, str], V] = OrderedDict()
        self._lock = threading.Lock()  # the heartbeat thread reads the stats
        self.bytes = 0
        self.hits = 0
        self.misses = 0
        self.evictions = 0

    def get(self, image_hash: str, version: str) -> V | None:
        with self._lock:
            value = self._items.get((image_hash, version))
            if value is None:
                self.misses += 1
                return None
            self._items.move_to_end((image_hash, version))
            self.hits += 1
            return value

    def put(self, image_hash: str, version: str, value: V) -> None:
        size = value.nbytes
        with self._lock:
            old = self._items.pop((image_hash, version), None)
            if old is not None:
                self.bytes -= old.nbytes
            if size > self.capacity_bytes:
                return
            while self._items and self.bytes + size > self.capacity_bytes:
                _, evicted = self._items.popitem(last=False)
                self.bytes -= evicted.nbytes
                self.evictions += 1
            self._items[(image_hash, version)] = value
            self.bytes += size

    def __len__(self) -> int:
        return len(self._items)

    def stats(self) -> dict[str, float]:
        """What the worker's heartbeat publishes."""
        with self._lock:
            lookups = self.hits + self.misses
            return {
                "cache_hit_rate": self.hits / lookups if lookups else 0.0,
                "cache_hits": self.hits,
                "cache_misses": self.misses,
                "cache_items": len(self._items),
                "cache_bytes": self.bytes,
                "cache_capacity_bytes": self.capacity_bytes,
            }
