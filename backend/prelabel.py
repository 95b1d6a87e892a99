"""``lisa-ls prelabel``: pre-label a whole Label Studio project through the job queue, for curation teams.

Follow a run: read the project's labeling config (:mod:`backend.labeling`), ask Redis which model version the live
workers serve (:func:`backend.predict.current_version`), then stream the project's tasks page by page
(:mod:`backend.lsclient`). A task that already has a prediction with that model version is skipped; for the
others the query is checked and sent as ``/predict`` does (:mod:`backend.query`), the image fetched
(:mod:`backend.images`) and stored in Redis once, and jobs are submitted in chunks of ``--batch``. At most
``2 x --batch`` jobs are in flight: the oldest is waited for before more are fetched, so a run over 100 000 tasks
holds a bounded amount of Redis and memory. Each result becomes a prediction (:func:`backend.regions.prediction`)
written back with ``POST /api/predictions``, with the worker's model version.

Rules:

- **Query**: the task's own query field (``LISA_LS_QUERY_FIELD``, default ``query``) wins over ``--query``, as a
  task's field wins over the project default in ``/predict``: tasks that say what to find keep it, ``--query``
  covers the rest. A task with neither fails ("no query").
- **Label**: ``--label`` for every region; without it, a label named in the query, else ``LISA_LS_DEFAULT_LABEL``,
  else the config's first label (``/predict``'s rule).
- **Backpressure**: a chunk refused as busy (``LISA_LS_MAX_QUEUE_LENGTH``) is never dropped: the run waits for one
  of its own jobs (which frees room) or backs off, then submits what fits.
- **Failures** of one task (no image, bad image, bad query, timeout, dead letter, a prediction Label Studio
  refuses) are printed and counted, never abort the run. Redis or Label Studio becoming unreachable (or refusing
  the token) stops new submissions; jobs in flight are still waited for.
- **Ctrl-C** stops submitting and waits for the jobs in flight, writing their predictions; a second Ctrl-C
  abandons them. Nothing is lost either way: Label Studio holds what was written, so re-running the same command
  skips it and resumes. A local state file (``--state``, default ``$MODEL_DIR/prelabel/project-<ID>.json``)
  lists the task ids done and failed (with the reason) for this model version, across runs, for the report.
- **Exit code**: 0 when every task was pre-labelled or skipped, 1 when any failed, 2 for usage or configuration
  errors (nothing submitted), 130 after Ctrl-C. The last line on stdout is a one-line summary.

Two runs on one project at once would both predict the tasks neither has finished: run one at a time. To pre-label
again with another query under the same model version, delete the project's predictions first.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import datetime
import json
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any, TextIO

from backend.config import ENV_PREFIX, BackendConfig
from backend.images import FetchSettings, ImageFetcher, ImageFetchError
from backend.labeling import ConfigError, LabelingSetup, parse_labeling_config
from backend.lsclient import LabelStudioClient, LabelStudioError
from backend.predict import current_version
from backend.query import QueryError, checked_query, phrasing
from backend.regions import prediction
from worker.client.connection import RedisDown, connect
from worker.client.protocol import Job
from worker.client.queue import BusyError, JobQueue

BUSY_BACKOFF_S = (0.2, 0.5, 1.0, 2.0, 5.0)
STATE_SAVE_INTERVAL_S = 2.0
EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130


class UsageError(Exception):
    """A usage or configuration problem found before anything was submitted (exit code 2)."""


@dataclasses.dataclass(frozen=True)
class Options:
    """The command line of one run."""

    project: int
    query: str | None = None
    label: str | None = None
    batch: int = 8
    limit: int | None = None
    state: Path | None = None


@dataclasses.dataclass
class _Work:
    task_id: int
    query: str
    label: str
    job: Job


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


class Prelabeler:
    """One run over one project; :meth:`run` returns the exit code."""

    def __init__(self, options: Options, config: BackendConfig, client: LabelStudioClient, queue: JobQueue,
                 fetcher: ImageFetcher, out: TextIO = sys.stderr) -> None:
        self.o, self.config, self.client, self.queue, self.fetcher, self.out = (
            options, config, client, queue, fetcher, out)
        self.phrasing: dict[str, str] = {}  # the templates sent with each job (checked by prepare)
        self.pending: list[_Work] = []  # images stored, jobs not yet accepted by the queue
        self.inflight: collections.deque[_Work] = collections.deque()  # submitted, oldest first
        self.stopping: str | None = None  # why no more jobs are submitted (Ctrl-C, Redis or Label Studio gone)
        self.setup: LabelingSetup | None = None
        self.version = ""
        self._limited = False  # stopped at --limit (not an interruption: exit 0 when nothing failed)
        self._announced = False
        self.busy_waits = 0  # chunks the queue refused as busy (reported in the state file's run record)

    # ---- preparation (anything wrong here is a usage error: exit 2, nothing submitted) ----

    def prepare(self) -> None:
        """Check the config, the project, the labeling config, the query, the label and the workers."""
        if self.o.query is not None:
            try:
                checked_query(self.o.query)
            except QueryError as e:
                raise UsageError(f"--query: {e}") from e
        try:
            self.phrasing = phrasing(self.config.phrase_template, self.config.sentence_template)
        except ValueError as e:
            raise UsageError(f"{ENV_PREFIX}PHRASE_TEMPLATE / {ENV_PREFIX}SENTENCE_TEMPLATE: {e}") from e
        try:
            project = self.client.project(self.o.project)
            self.setup = parse_labeling_config(project["label_config"], require_query=False)
        except (LabelStudioError, ConfigError) as e:
            raise UsageError(str(e)) from e
        if self.o.label is not None and self.o.label not in self.setup.labels:
            raise UsageError(f"--label {self.o.label!r} is not a label of the project's <BrushLabels "
                             f"name=\"{self.setup.brush_name}\">: choose one of {', '.join(self.setup.labels)}")
        try:
            version = current_version(self.queue)
        except RedisDown as e:
            raise UsageError(f"{e}: check REDIS_URL") from e
        if version is None:
            raise UsageError("no LISA worker is running: start one with `lisa-ls worker --model ...` (or "
                             "`lisa-ls up`) with the same REDIS_URL, then run prelabel again")
        self.version = version

    # ---- the run ----

    def run(self, state: StateFile) -> int:
        """Stream the tasks through the queue; returns the exit code. Ctrl-C drains, a second one abandons."""
        self.state, started, outcome = state, time.time(), "complete"
        self.progress = Progress(None, self.out)
        previous = signal.getsignal(signal.SIGINT)

        def on_sigint(_sig: int, _frame: Any) -> None:
            # Only a flag: printing from here could re-enter the progress bar's lock. _check_stop() says it.
            if self.stopping == "interrupted":
                raise KeyboardInterrupt
            self.stopping = "interrupted"

        signal.signal(signal.SIGINT, on_sigint)
        try:
            self._stream()
            self._flush()
            while self.inflight:
                self._collect(self.inflight.popleft())
            outcome = self.stopping or ("limit" if self._limited else "complete")
        except KeyboardInterrupt:
            outcome = "abandoned"
        except RedisDown as e:
            self.progress.write(f"stopped: {e} (check REDIS_URL; a re-run resumes)")
            outcome = "redis_down"
        except LabelStudioError as e:  # listing the tasks failed
            self.progress.write(f"stopped: {e}")
            outcome = "label_studio_error"
        finally:
            signal.signal(signal.SIGINT, previous)
            self.progress.close()
            c = self.progress.counts
            when = datetime.datetime.fromtimestamp(started, datetime.timezone.utc).isoformat(timespec="seconds")
            run = {"started": when, "seconds": round(time.time() - started, 1), "outcome": outcome,
                   "query": self.o.query, "done": c["done"], "skipped": c["skipped"], "failed": c["failed"],
                   "busy_waits": self.busy_waits}
            try:
                state.save(run)
            except OSError as e:
                self.progress.write(f"could not write the state file {state.path}: {e}")
        c = self.progress.counts
        tail = {"complete": "", "limit": f"; stopped at --limit {self.o.limit}, re-run to continue",
                "interrupted": "; interrupted, re-run to continue"}.get(outcome, f"; {outcome}, re-run to continue")
        print(f"prelabel project {self.o.project} ({self.version}): {c['done']} done, {c['skipped']} skipped, "
              f"{c['failed']} failed in {time.time() - started:.1f} s{tail}; state: {state.path}", flush=True)
        if outcome in ("interrupted", "abandoned"):
            return EXIT_INTERRUPTED
        return EXIT_FAILED if c["failed"] or outcome not in ("complete", "limit") else EXIT_OK

    def _check_stop(self) -> bool:
        """Whether to stop submitting; says so once (outside the signal handler)."""
        if self.stopping and not self._announced:
            self._announced = True
            why = {"interrupted": "Ctrl-C", "label_studio_error": "Label Studio refused or is unreachable"}
            self.progress.write(f"stopping ({why.get(self.stopping, self.stopping)}): waiting for "
                                f"{len(self.inflight)} job(s) in flight; Ctrl-C again abandons them, a re-run "
                                "resumes either way")
        return self.stopping is not None

    def _stream(self) -> None:
        """Walk the project's tasks; prepare and submit the ones to pre-label, keeping the in-flight window."""
        chunk = max(1, min(self.o.batch, self.queue.config.max_queue_length))
        window = max(2 * self.o.batch, chunk)
        taken = 0
        for task, total in self.client.iter_tasks(self.o.project):
            self.progress.set_total(total)
            if self._check_stop():
                return
            task_id = int(task["id"])
            if any(isinstance(p, dict) and p.get("model_version") == self.version
                   for p in task.get("predictions") or []):
                self.state.forget_failure(task_id)
                self.progress.count("skipped")
                continue
            if self.o.limit is not None and taken >= self.o.limit:
                self._limited = True
                return
            taken += 1
            work = self._prepare_task(task)
            if work is None:
                continue
            self.pending.append(work)
            if len(self.pending) >= chunk:
                self._flush()
            while len(self.inflight) >= window:
                self._collect(self.inflight.popleft())

    def _prepare_task(self, task: dict[str, Any]) -> _Work | None:
        """Query, image and job of one task; ``None`` (and the task counted failed) when it cannot run."""
        assert self.setup is not None
        task_id, data = int(task["id"]), task.get("data") if isinstance(task.get("data"), dict) else {}
        field = self.config.query_field
        own = data.get(field)
        query = own if isinstance(own, str) and own.strip() else self.o.query
        try:
            if not query:
                raise QueryError(f"no query: the task has no '{field}' field and no --query was given")
            checked = checked_query(query)
            value = data.get(self.setup.image_field)
            if not value:
                raise ImageFetchError(f"the task has no '{self.setup.image_field}' field (the <Image> value)")
            image = self.fetcher.fetch(value, task_id=task_id)
        except (QueryError, ImageFetchError) as e:
            self._fail(task_id, str(e))
            return None
        key = self.queue.put_image(image.data)
        label = self.o.label or self.setup.choose_label(query, self.config.default_label)
        job = Job(image=key, query=checked, phrasing=self.phrasing,
                  options={"query": query, "task": task_id, "source": "prelabel"})
        return _Work(task_id, query, label, job)

    def _flush(self) -> None:
        """Submit every pending job; a busy queue is waited out, never a reason to drop a job."""
        backoff = iter(BUSY_BACKOFF_S)
        n = len(self.pending)
        while self.pending:
            if self._check_stop():  # fetched but never submitted: not in flight, so left for the next run
                self.pending.clear()
                return
            batch = self.pending[:n]
            deadline = time.time() + self.queue.config.job_deadline_s  # from submission, also on a retry
            for work in batch:
                work.job.deadline = deadline
            try:
                self.queue.submit_many([w.job for w in batch])
            except BusyError as e:
                self.busy_waits += 1
                n = max(1, min(n, e.bound - e.depth))  # submit what fits next time
                if self.inflight:  # our own oldest job: useful waiting, and its slot frees up
                    self._collect(self.inflight.popleft())
                else:
                    time.sleep(next(backoff, BUSY_BACKOFF_S[-1]))
                continue
            self.inflight.extend(batch)
            del self.pending[:len(batch)]
            n, backoff = len(self.pending), iter(BUSY_BACKOFF_S)

    def _collect(self, work: _Work) -> None:
        """Wait for one job and write its prediction to Label Studio."""
        assert self.setup is not None
        self._check_stop()
        result = self.queue.wait(work.job)
        if not result.ok:
            self._fail(work.task_id, f"{result.error_code}: {result.error_message}")
            return
        pred = prediction(result.mask_array(), result.scores, self.setup, work.label,
                          result.model_version or self.version, work.query, bool(self.config.split_instances),
                          min_score=self.config.min_score, min_area=self.config.min_area)
        try:
            self.client.create_prediction(work.task_id, pred["result"], pred["score"], pred["model_version"])
        except LabelStudioError as e:
            self._fail(work.task_id, str(e))
            if e.code in ("auth", "unreachable", "config") and not self.stopping:
                self.stopping = "label_studio_error"  # every later write would fail the same way
            return
        self.state.record(work.task_id)
        self.progress.count("done")

    def _fail(self, task_id: int, message: str) -> None:
        self.state.record(task_id, message)
        self.progress.count("failed")
        self.progress.write(f"task {task_id}: failed: {message}")


def run_prelabel(args: argparse.Namespace) -> int:
    """``lisa-ls prelabel``: build everything from the environment and the flags, then run."""
    try:
        if (args.batch is not None and args.batch < 1) or (args.limit is not None and args.limit < 0):
            raise UsageError("--batch must be at least 1 and --limit at least 0")
        config = BackendConfig.from_env()
        options = Options(project=args.project, query=args.query, label=args.label,
                          batch=args.batch or config.queue.batch_size, limit=args.limit,
                          state=Path(args.state) if args.state else None)
        client = LabelStudioClient(config.label_studio_url, config.label_studio_api_key)
        queue = JobQueue(connect(config=config.queue), config.queue)
        fetcher = ImageFetcher(FetchSettings.from_config(config))
        runner = Prelabeler(options, config, client, queue, fetcher)
        runner.prepare()
        path = options.state or Path(config.model_dir) / "prelabel" / f"project-{options.project}.json"
        state = StateFile(path, options.project, runner.version)
        try:
            state.save()  # fail now, before any GPU time is spent, if the file cannot be written
        except OSError as e:
            raise UsageError(f"cannot write the state file {path} ({e}): set MODEL_DIR or --state") from e
    except (UsageError, LabelStudioError, ValueError) as e:  # ValueError: a bad environment variable
        print(f"lisa-ls prelabel: {e}", file=sys.stderr)
        print(f"prelabel project {args.project}: nothing done (usage or configuration error)", flush=True)
        return EXIT_USAGE
    except KeyboardInterrupt:  # Ctrl-C while checking Label Studio or Redis: nothing was submitted yet
        print(f"prelabel project {args.project}: nothing done (interrupted)", flush=True)
        return EXIT_INTERRUPTED
    return runner.run(state)
