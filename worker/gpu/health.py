"""Container health check of a worker: exit 0 when a worker on this host has a live heartbeat in Redis.

``python -m worker.gpu.health`` (used by docker/worker.Dockerfile and docker/compose.yml). A worker still loading its
model has no heartbeat yet; the compose file's ``start_period`` covers the download and load.
"""

from __future__ import annotations

import socket
import sys

from worker.client.connection import connect
from worker.client.defaults import QueueConfig
from worker.gpu.loop import live_workers


def main() -> int:
    config = QueueConfig.from_env()
    try:
        workers = live_workers(connect(config.redis_url, config), config)
    except Exception as e:  # Redis down: this worker cannot serve either
        print(f"unhealthy: {e}", file=sys.stderr)
        return 1
    host = socket.gethostname()
    mine = [w for w in workers if w.get("host") == host]
    print(f"{len(mine)} live worker(s) on {host}")
    return 0 if mine else 1


if __name__ == "__main__":
    sys.exit(main())
