"""Task images for one request: fetched concurrently, under the request's deadline, within per-process bounds.

Two rules, both about gunicorn's threads (``THREADS`` per process, shared by every endpoint):

- **Bounded fetches.** A slow image host (a 1 byte/s server, a blackholed bucket) holds a thread for the whole
  fetch deadline. Were every request allowed to fetch, 64 such tasks would hold all 64 threads and ``/health``
  would time out, so Label Studio marks the backend disconnected. :class:`FetchGate` counts the fetches in flight
  in this process, overall (``LISA_LS_FETCH_CONCURRENCY``) and per image host (``LISA_LS_FETCH_PER_HOST``), both
  below the thread count; a request that finds no free slot waits a moment for one, with only a few others
  (a waiting thread is as lost to ``/health`` as a fetching one), then is answered "busy".
- **One deadline.** A batch ``/predict`` fetches its images in parallel (:data:`~backend.config
  .FETCH_PARALLEL_PER_REQUEST` at a time), each cut at what is left of the request's deadline, so the whole request
  answers before Label Studio's 100 s ``ML_TIMEOUT_PREDICT`` however many tasks it carries.

A batch request that holds slots and finds none free for its next image waits for one of its own fetches to end
(it then frees a slot it can take); only a request with none in flight is answered busy, so a batch is never
refused half-way by itself.
"""

from __future__ import annotations

import collections
import threading
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait

from backend.config import ENV_PREFIX, FETCH_PARALLEL_PER_REQUEST, FETCH_SLOT_WAIT_S
from backend.images import FetchedImage, ImageFetcher, ImageFetchError
from worker.client.protocol import BUSY  # the code of a fetch refused for want of a slot, as of a full queue


class FetchGate:
    """Counts the image fetches in flight in this process, overall and per host; thread-safe.

    A request that finds no free slot may wait a moment for one (``wait_s``, :data:`~backend.config
    .FETCH_SLOT_WAIT_S`), so that a burst of quick fetches (twenty annotators clicking at once) is served, not
    refused; but only ``waiters`` threads wait at once, so fetching and waiting threads together stay below the
    thread count. Past either, the answer is "busy".

    Args:
        total: most fetches at once (``BackendConfig.fetch_slots``).
        per_host: most fetches at once from one ``host:port`` (``BackendConfig.fetch_slots_per_host``).
        waiters: most threads waiting for a slot at once (``BackendConfig.fetch_waiters``).
    """

    def __init__(self, total: int, per_host: int, waiters: int = 0) -> None:
        self.total, self.per_host, self.waiters = total, per_host, waiters
        self._free = threading.Condition()
        self._in_flight = self._waiting = 0
        self._hosts: collections.Counter[str] = collections.Counter()

    def try_acquire(self, host: str | None, wait_s: float = 0.0) -> ImageFetchError | None:
        """Take a slot for a fetch from ``host`` (``None``: no network, no slot), waiting up to ``wait_s`` for one;
        the refusal if none came."""
        if host is None:
            return None
        end = time.monotonic() + wait_s
        with self._free:
            while (refusal := self._refusal(host)) is not None:
                left = end - time.monotonic()
                if left <= 0 or self._waiting >= self.waiters:
                    return refusal
                self._waiting += 1
                try:
                    self._free.wait(left)
                finally:
                    self._waiting -= 1
            self._in_flight += 1
            self._hosts[host] += 1
            return None

    def _refusal(self, host: str) -> ImageFetchError | None:
        if self._in_flight >= self.total:
            return ImageFetchError(
                f"busy: {self._in_flight} image fetches are in flight in this backend process, its bound "
                f"({ENV_PREFIX}FETCH_CONCURRENCY); try again in a moment", BUSY)
        if self._hosts[host] >= self.per_host:
            return ImageFetchError(
                f"busy: {self._hosts[host]} image fetches from {host} are in flight, the bound per host "
                f"({ENV_PREFIX}FETCH_PER_HOST); that host is slow or the backend overloaded: try again in a "
                "moment", BUSY)
        return None

    def release(self, host: str | None) -> None:
        if host is None:
            return
        with self._free:
            self._in_flight -= 1
            self._hosts[host] -= 1
            if not self._hosts[host]:
                del self._hosts[host]
            self._free.notify_all()  # waiters for other hosts may still find theirs full: each checks its own

    def snapshot(self) -> dict[str, int]:
        """Fetches in flight (overall, and from the busiest host) and the bounds, for ``/health``."""
        with self._free:
            busiest = max(self._hosts.values(), default=0)
            return {"in_flight": self._in_flight, "max": self.total, "busiest_host": busiest,
                    "max_per_host": self.per_host, "waiting": self._waiting}


Outcome = FetchedImage | ImageFetchError
"""One image of a request: its bytes, or why there are none."""


def fetch_one(fetcher: ImageFetcher, gate: FetchGate, value: object, task: int | None, deadline: float,
              request_deadline_s: float) -> FetchedImage:
    """One image, in the calling thread (an interactive call), within a slot; raises
    :class:`~backend.images.ImageFetchError` (code ``busy`` without a free slot). Arguments as :func:`fetch_each`."""
    host = fetcher.host(value, task)
    refusal = gate.try_acquire(host, _grace(deadline))
    if refusal is not None:
        raise refusal
    try:
        outcome = _fetch(fetcher, (value, task), deadline, request_deadline_s)
    finally:
        gate.release(host)
    if isinstance(outcome, ImageFetchError):
        raise outcome
    return outcome


def fetch_each(fetcher: ImageFetcher, gate: FetchGate, items: Sequence[tuple[object, int | None]],
               deadline: float, request_deadline_s: float) -> Iterator[tuple[int, Outcome]]:
    """Fetch the images ``items`` name (``(image value, task id)`` each) concurrently, none past ``deadline``;
    yields ``(index in items, outcome)`` as each ends, in the calling thread, so its job can be queued at once.

    Args:
        deadline: absolute wall-clock time (``time.time()``) by which every fetch has ended: each is given what is
            left of it (or the fetcher's own, shorter, deadline).
        request_deadline_s: the request's whole deadline, for messages (``LISA_LS_PREDICT_DEADLINE_S``).
    """
    hosts = [fetcher.host(value, task) for value, task in items]

    def one(i: int) -> Outcome:
        try:
            return _fetch(fetcher, items[i], deadline, request_deadline_s)
        finally:
            gate.release(hosts[i])

    pending = collections.deque(range(len(items)))
    running: dict[Future[Outcome], int] = {}
    lanes = min(FETCH_PARALLEL_PER_REQUEST, len(items))
    with ThreadPoolExecutor(max_workers=max(lanes, 1), thread_name_prefix="fetch") as pool:
        while pending or running:
            waiting: list[int] = []  # no free slot right now
            while pending and len(running) < lanes:
                i = pending.popleft()
                refusal = gate.try_acquire(hosts[i], 0.0 if running else _grace(deadline))
                if refusal is None:
                    running[pool.submit(one, i)] = i
                elif running:
                    waiting.append(i)  # one of ours ends soon and frees a slot
                else:
                    yield i, refusal
            pending.extendleft(reversed(waiting))
            if not running:
                continue  # every waiting one is retried, and refused if still nothing of ours runs
            done, _ = wait(running, return_when=FIRST_COMPLETED)  # each fetch ends by its deadline (netguard)
            for future in done:
                yield running.pop(future), future.result()


def _grace(deadline: float) -> float:
    """How long a request without a slot waits for one: a moment, never past its deadline."""
    return max(0.0, min(FETCH_SLOT_WAIT_S, deadline - time.time()))


def _fetch(fetcher: ImageFetcher, item: tuple[object, int | None], deadline: float,
           request_deadline_s: float) -> Outcome:
    value, task = item
    left = round(deadline - time.time(), 2)  # (messages quote it)
    if left <= 0:
        return ImageFetchError(f"the image was not fetched: the request's {request_deadline_s:g} s deadline "
                               f"({ENV_PREFIX}PREDICT_DEADLINE_S) passed first", "timeout")
    try:
        return fetcher.fetch(value, task, deadline_s=left)
    except ImageFetchError as e:
        if e.code == "timeout" and left < fetcher.settings.deadline_s:  # cut by the request, not the fetcher
            return ImageFetchError(f"{e.message}, all that was left of the request's {request_deadline_s:g} s "
                                   f"deadline ({ENV_PREFIX}PREDICT_DEADLINE_S)", "timeout")
        return e
