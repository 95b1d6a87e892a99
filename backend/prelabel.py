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
- **Several labels** (:mod:`backend.multiclass`): ``--label-query LABEL=QUERY`` (repeatable), else the
  ``queries`` map of the model connection's Extra params when no ``--query`` is given, asks each label its own
  query: one job per (task, label), one prediction per task with every label's regions (a label LISA finds
  nothing for adds none), and the report counts tasks and regions per label. Tasks' own query fields are not
  used then. A label the config lacks, or a bad query, is a usage error.
- **Regions**: brush and/or polygons, as the labeling config asks (:mod:`backend.shapes`); polygons simplified to
  ``LISA_LS_POLYGON_TOLERANCE``.
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
import signal
import sys
import time
from pathlib import Path
from typing import Any, TextIO

from backend import family as families
from backend.config import ENV_PREFIX, BackendConfig
from backend.images import FetchSettings, ImageFetcher, ImageFetchError
from backend.labeling import ConfigError, LabelingSetup, parse_labeling_config
from backend.lsclient import LabelStudioClient, LabelStudioError
from backend.multiclass import (
    LabelCounts,
    QueriesError,
    TaskGroup,
    check_queries,
    connection_queries,
    parse_label_queries,
)
from backend.predict import current_version
from backend.prelabel_progress import Progress, StateFile
from backend.query import QueryError, checked_query, phrasing
from backend.shapes import MASK_TYPES, prediction
from worker.client.connection import RedisDown, connect
from worker.client.defaults import DEFAULT_FAMILY, FAMILY_NAMES
from worker.client.protocol import Job
from worker.client.queue import BusyError, JobQueue

BUSY_BACKOFF_S = (0.2, 0.5, 1.0, 2.0, 5.0)
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
    label_queries: dict[str, str] | None = None


@dataclasses.dataclass
class _Work:
    task_id: int
    query: str
    label: str
    job: Job
    group: TaskGroup


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
        self.queries: dict[str, str] | None = None  # label -> query, for a run over several labels
        self.labels = LabelCounts()
        self.family, self.options = DEFAULT_FAMILY, {}  # the project's model family, its jobs' options
        self.label_prompted = False  # self.queries are the label names (a concept family, no query given)

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
        try:  # the connection's Extra params "model": the family whose workers answer (backend.family)
            self.family, self.options = families.connection_settings(self.client.connection_params(self.o.project),
                                                                       self.config)
        except LabelStudioError:
            self.family, self.options = DEFAULT_FAMILY, {}
        self.queue = self.queue.for_family(self.family)
        self.queries = self._label_queries()
        try:
            version = current_version(self.queue, self.family)
        except RedisDown as e:
            raise UsageError(f"{e}: check REDIS_URL") from e
        if version is None:
            raise UsageError(families.no_worker_message(self.family, "run prelabel again (same REDIS_URL)"))
        self.version = version

    def _label_queries(self) -> dict[str, str] | None:
        """``--label-query``, else the connection's Extra params ``queries`` (without ``--query``), checked."""
        assert self.setup is not None
        given: object = self.o.label_queries
        where = "--label-query"
        if given and (self.o.query is not None or self.o.label is not None):
            raise UsageError("--label-query gives each label its own query and label: leave out --query and --label")
        if not given and self.o.query is None:
            try:
                given = connection_queries(self.client.connection_params(self.o.project))
            except LabelStudioError as e:  # e.g. a token that may not read model connections: one query per task
                print(f"lisa-ls prelabel: cannot read the project's model connections ({e}); their Extra params "
                      "'queries' are not used", file=self.out)
            except QueriesError as e:
                raise UsageError(str(e)) from e
            where = "the model connection's Extra params 'queries'"
        if not given and self.o.query is None:
            given = families.label_prompts(self.family, self.setup.labels)
            self.label_prompted = given is not None  # a task's own query still wins over the label names
            where = "the label names (as prompts)"
        if not given:
            return None
        try:
            queries = check_queries(given, self.setup, where)
        except QueriesError as e:
            raise UsageError(str(e)) from e
        for label, query in queries.items():
            try:
                checked_query(query, self.family)
            except QueryError as e:
                raise UsageError(f"{where}: the query of '{label}': {e}") from e
        return queries

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
            if self.queries:
                run.update(queries=self.queries, labels=self.labels.as_dict(list(self.queries)))
            try:
                state.save(run)
            except OSError as e:
                self.progress.write(f"could not write the state file {state.path}: {e}")
        c = self.progress.counts
        if self.queries:
            print(f"per label: {self.labels.format(list(self.queries))}", flush=True)
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
            works = self._prepare_task(task)
            if not works:
                continue
            self.pending.extend(works)
            if len(self.pending) >= chunk:
                self._flush()
            while len(self.inflight) >= window:
                self._collect(self.inflight.popleft())

    def _prepare_task(self, task: dict[str, Any]) -> list[_Work]:
        """Queries, image and jobs of one task (one job per label of a run over several); none (and the task
        counted failed) when it cannot run."""
        assert self.setup is not None
        task_id, data = int(task["id"]), task.get("data") if isinstance(task.get("data"), dict) else {}
        field = self.config.query_field
        own = data.get(field)
        query = own if isinstance(own, str) and own.strip() else self.o.query
        try:
            if not query and not self.queries:
                raise QueryError(f"no query: the task has no '{field}' field and no --query was given")
            own_first = self.label_prompted and query  # the label names prompt only tasks without a query
            prompts = {"": query} if own_first or not self.queries else self.queries
            asked = {label: (q, checked_query(q, self.family)) for label, q in prompts.items()}
            value = data.get(self.setup.image_field)
            if not value:
                raise ImageFetchError(f"the task has no '{self.setup.image_field}' field (the <Image> value)")
            image = self.fetcher.fetch(value, task_id=task_id)
        except (QueryError, ImageFetchError) as e:
            self._fail(task_id, str(e))
            return []
        key = self.queue.put_image(image.data)
        group = TaskGroup(task_id, len(asked))
        works = []
        for label, (text, checked) in asked.items():
            label = label or self.o.label or self.setup.choose_label(text, self.config.default_label)
            job = Job(image=key, query=checked, phrasing=self.phrasing if self.family == DEFAULT_FAMILY else None,
                      options={"query": text, "task": task_id, "source": "prelabel", **self.options})
            works.append(_Work(task_id, text, label, job, group))
        return works

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
        """Wait for one job; once every job of its task has answered, write the task's prediction to Label Studio."""
        assert self.setup is not None
        self._check_stop()
        result, group = self.queue.wait(work.job), work.group
        if not result.ok:
            group.fail(f"{work.label + ': ' if self.queries else ''}{result.error_code}: {result.error_message}")
        else:
            group.add(work.label, families.with_scores(prediction(
                result.mask_array(), result.scores, self.setup, work.label, result.model_version or self.version,
                work.query, bool(self.config.split_instances), min_score=self.config.min_score,
                min_area=self.config.min_area, tolerance=self.config.polygon_tolerance,
                meta={"family": self.family}, model_name=FAMILY_NAMES[self.family]), self.family))
        if not group.complete:
            return
        if group.errors:
            self._fail(work.task_id, "; ".join(group.errors))
            return
        pred = group.merged(result.model_version or self.version)
        try:
            self.client.create_prediction(work.task_id, pred["result"], pred["score"], pred["model_version"])
        except LabelStudioError as e:
            self._fail(work.task_id, str(e))
            if e.code in ("auth", "unreachable", "config") and not self.stopping:
                self.stopping = "label_studio_error"  # every later write would fail the same way
            return
        self.state.record(work.task_id)
        self.progress.count("done")
        for label, answer in group.answers:
            self.labels.add(label, sum(r["type"] in MASK_TYPES for r in answer["result"]))

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
        try:
            label_queries = parse_label_queries(getattr(args, "label_query", None) or []) or None
        except QueriesError as e:
            raise UsageError(str(e)) from e
        options = Options(project=args.project, query=args.query, label=args.label,
                          batch=args.batch or config.queue.batch_size, limit=args.limit,
                          state=Path(args.state) if args.state else None, label_queries=label_queries)
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
