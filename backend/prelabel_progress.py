"""The record and the progress display of a ``lisa-ls prelabel`` run (:mod:`backend.prelabel`).

:class:`StateFile` is the run's local record across runs of one project and model version (Label Studio holds the
predictions themselves, which is what a resumed run trusts); :class:`Progress` shows the run as it goes.
"""

from __future__ import annotations

import collections
import datetime
import json
import os
import time
from pathlib import Path
from typing import Any, TextIO

STATE_SAVE_INTERVAL_S = 2.0


class StateFile:
    """The run's local record (task ids done and failed for one project and model version), written atomically.

    Label Studio is what a resumed run trusts; this file is the report: which tasks this command pre-labelled and
    which failed and why, carried across runs of the same project and model version.
    """

    def __init__(self, path: Path, project: int, model_version: str) -> None:
        self.path, self._saved = path, 0.0
        old = self._load()
        same = old.get("project") == project and old.get("model_version") == model_version
        self.data: dict[str, Any] = {
            "project": project, "model_version": model_version,
            "done": old.get("done", []) if same else [], "failed": old.get("failed", {}) if same else {},
            "runs": old.get("runs", []) if same else [],
        }
        self.done: set[int] = {int(i) for i in self.data["done"]}
        self.failed: dict[str, str] = dict(self.data["failed"])

    def _load(self) -> dict[str, Any]:
        try:
            data = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return {}
        return data if isinstance(data, dict) else {}

    def record(self, task_id: int, error: str | None = None) -> None:
        """A task finished: pre-labelled (``error`` None) or failed."""
        if error is None:
            self.done.add(task_id)
            self.failed.pop(str(task_id), None)
        else:
            self.failed[str(task_id)] = error
        if time.monotonic() - self._saved > STATE_SAVE_INTERVAL_S:
            self.save()

    def forget_failure(self, task_id: int) -> None:
        """A task is now predicted (by another run or by ``/predict``): it is no longer a failure to report."""
        self.failed.pop(str(task_id), None)

    def save(self, run: dict[str, Any] | None = None) -> None:
        """Write the file (tmp file + rename, so an interruption never leaves half a file)."""
        self.data.update(done=sorted(self.done), failed=self.failed,
                         updated=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"))
        if run is not None:
            self.data["runs"] = [*self.data["runs"][-19:], run]
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text(json.dumps(self.data, indent=1))
        os.replace(tmp, self.path)
        self._saved = time.monotonic()


class Progress:
    """A tqdm bar when tqdm is installed and stderr is a terminal; else a plain line every 10 s."""

    def __init__(self, total: int | None, out: TextIO) -> None:
        self.out, self.counts, self._last, self.total = out, collections.Counter(), time.monotonic(), total
        try:
            from tqdm import tqdm
        except ImportError:
            self.bar = None
        else:
            self.bar = tqdm(total=total, unit="task", file=out, disable=None, dynamic_ncols=True)
            if self.bar.disable:
                self.bar = None

    def set_total(self, total: int | None) -> None:
        self.total = total if total is not None else self.total
        if self.bar is not None and total is not None and self.bar.total != total:
            self.bar.total = total
            self.bar.refresh()

    def count(self, what: str) -> None:
        self.counts[what] += 1
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(done=self.counts["done"], skipped=self.counts["skipped"],
                                 failed=self.counts["failed"], refresh=False)
        elif time.monotonic() - self._last > 10.0:
            self._last = time.monotonic()
            seen = sum(self.counts.values())
            of = f"{seen} of {self.total} tasks" if self.total is not None else f"{seen} task(s) so far"
            self.write(f"progress: {of} ({self.counts['done']} done, {self.counts['skipped']} skipped, "
                       f"{self.counts['failed']} failed)")

    def write(self, line: str) -> None:
        if self.bar is not None:
            self.bar.write(line, file=self.out)
        else:
            print(line, file=self.out, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
