"""``lisa-ls export``: resync a whole Label Studio project into a dataset, for teams that did not run webhooks.

Reads the project (``GET /api/projects/<id>``, for its labeling config) and every task with its annotations
(``GET /api/tasks?project=<id>&fields=all``, page by page) through :class:`backend.lsclient.LabelStudioClient`,
and builds each annotation's sample with the same code as capture (:func:`backend.samples.build_sample`), so
both give the same sample files (only ``source`` and ``written_at`` differ). The output is a mirror:

* a sample is written when new, rewritten when the annotation changed, left alone when unchanged;
* a sample whose stored ``updated_at`` is later than Label Studio's (capture got a newer version while the export
  ran) is kept;
* samples and skipped records of annotations that no longer exist in Label Studio are removed (only those
  written before this export started, so a sample captured meanwhile stays);
* an annotation that cannot be a sample is recorded in ``skipped/`` with its reason, as capture does; one whose
  image could not be fetched for a passing reason (Label Studio unreachable) counts as failed and keeps its old
  sample: run the export again.

Exit code: 0 done, 1 some annotations failed (run again), 2 usage, configuration or Label Studio API error.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import sys
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import TextIO

from backend.config import BackendConfig
from backend.dataset import Dataset, DatasetError, parse_time, sample_id
from backend.images import FetchSettings, ImageFetcher
from backend.lsclient import PAGE_SIZE, LabelStudioClient, LabelStudioError
from backend.samples import Fetch, RetryLater, SkipSample, build_sample, ls_id

OUTCOMES = ("written", "updated", "unchanged", "newer-kept", "deleted", "skipped", "failed")


@dataclasses.dataclass
class ExportReport:
    """What one export did: outcome counts, and the annotations skipped or failed with their reasons."""

    project_id: int
    out: Path
    tasks: int = 0
    annotations: int = 0
    counts: Counter[str] = dataclasses.field(default_factory=Counter)
    skipped: list[tuple[str, str, str]] = dataclasses.field(default_factory=list)
    """``(sample id, code, reason)`` per skipped annotation."""
    failed: list[tuple[str, str]] = dataclasses.field(default_factory=list)
    """``(sample id, reason)`` per annotation that may work on the next run."""

    def format(self, dataset: Dataset | None = None) -> str:
        """The report as printed by ``lisa-ls export``."""
        lines = [f"lisa-ls export: project {self.project_id} -> {self.out}",
                 f"  {self.tasks} task(s), {self.annotations} annotation(s)",
                 "  " + ", ".join(f"{k} {self.counts.get(k, 0)}" for k in OUTCOMES)]
        lines += [f"  skipped {sid}: {code}: {reason}" for sid, code, reason in self.skipped]
        lines += [f"  failed {sid}: {reason}" for sid, reason in self.failed]
        if dataset is not None:
            s = dataset.summary()
            reasons = ", ".join(f"{k} {v}" for k, v in s["skipped_by_reason"].items())
            lines.append(f"  dataset: {s['samples']} sample(s) ({s['train']} train, {s['val']} val), "
                         f"{s['skipped']} skipped" + (f" ({reasons})" if reasons else ""))
        return "\n".join(lines)


def export_project(client: LabelStudioClient, project_id: int, dataset: Dataset, fetch: Fetch, *,
                   page_size: int = PAGE_SIZE, progress: Callable[[str], None] | None = None) -> ExportReport:
    """Mirror one project's annotations into ``dataset``. Raises :class:`LabelStudioError` for API failures."""
    started = dt.datetime.now(dt.timezone.utc)
    label_config = client.project(project_id)["label_config"]
    report = ExportReport(project_id, dataset.root)
    seen: set[str] = set()
    for task, total in client.iter_tasks(project_id, page_size=page_size):
        report.tasks += 1
        if progress and report.tasks % 100 == 0:
            progress(f"{report.tasks}/{total if total is not None else '?'} tasks")
        for annotation in task.get("annotations") or []:
            if not isinstance(annotation, dict):
                continue
            report.annotations += 1
            aid = ls_id(annotation.get("id"))
            sid = sample_id(project_id, aid if aid is not None else f"task{task.get('id')}")
            seen.add(sid)
            try:
                draft = build_sample(annotation, task, label_config, fetch, project_id)
            except SkipSample as s:
                report.counts["skipped"] += 1
                report.skipped.append((sid, s.code, s.reason))
                if aid is not None:
                    info = {"annotation_id": aid, "task_id": ls_id(task), "project_id": project_id,
                            "source": "export", "updated_at": annotation.get("updated_at")}
                    with dataset.lock():
                        dataset.record_skip(sid, s.code, s.reason, info, keep_sample=s.keep_sample)
                continue
            except RetryLater as e:
                report.counts["failed"] += 1
                report.failed.append((sid, str(e)))
                continue
            with dataset.lock():
                report.counts[dataset.commit(draft, "export", keep_newer=True)] += 1
    report.counts["deleted"] += _prune(dataset, project_id, seen, started)
    dataset.sweep()
    return report


def _prune(dataset: Dataset, project_id: int, seen: set[str], started: dt.datetime) -> int:
    """Remove what belongs to annotations Label Studio no longer has; returns how many samples went."""
    removed = 0
    prefix = sample_id(project_id, "")
    for record in [*dataset.samples(), *dataset.skipped()]:
        sid = str(record.get("id", ""))
        written = parse_time(record.get("written_at"))
        if not sid.startswith(prefix) or sid in seen or (written is not None and written >= started):
            continue  # still in Label Studio, or captured while this export ran
        with dataset.lock():
            removed += dataset.remove(sid)
    return removed


def dataset_folder(config: BackendConfig, project_id: int, out: str | None) -> Path:
    """Where a project's dataset is resynced: ``out``, else ``$LISA_LS_DATASET_DIR/project-<id>`` (capture's)."""
    return Path(out) if out else Path(config.dataset_root) / f"project-{project_id}"


def run_export(args: argparse.Namespace, out: TextIO | None = None, err: TextIO | None = None) -> int:
    """``lisa-ls export``: run, print the report (to ``out``, default stdout), return the exit code."""
    out, err = out or sys.stdout, err or sys.stderr
    try:
        config = BackendConfig.from_env()
        client = LabelStudioClient(config.label_studio_url, config.label_studio_api_key)
        folder = dataset_folder(config, args.project, args.out)
        dataset = Dataset.open(folder, project_id=args.project, label_studio_url=config.label_studio_url,
                               val_percent=config.val_percent)
        fetcher = ImageFetcher(FetchSettings.from_config(config))
        report = export_project(client, args.project, dataset, fetcher.fetch, page_size=args.page_size,
                                progress=lambda text: print(f"lisa-ls export: {text}", file=err, flush=True))
    except (ValueError, LabelStudioError, DatasetError) as e:
        print(f"lisa-ls export: {e}", file=err)
        return 2
    print(report.format(dataset), file=out)
    return 1 if report.failed else 0
