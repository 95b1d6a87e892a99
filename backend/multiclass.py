"""Multi-class pre-labelling: each label of a project asked with its own query, one region set per label.

A curation team that labels fruit and knives does not want to run ``lisa-ls prelabel`` once per label (each run
writes its own prediction per task, and a task with a prediction of the served version is skipped by the next).
Instead each label gets its own query - ``{"queries": {"Fruit": "the food rich in vitamin C", "Knife": "what one
cuts it with"}}`` in the model connection's *Extra params*, or ``--label-query Fruit="..."`` (repeatable, wins) on
the command line - and :mod:`backend.prelabel` submits one job per (task, label), all batched as usual, and writes
one prediction per task holding every label's regions, each region with its label. A label LISA finds nothing for
in a task (no ``[SEG]`` in the answer, or nothing left after ``min_score`` / ``min_area``) adds no region to it.

Every label must be one of the config's BrushLabels or PolygonLabels and every query a valid query
(:func:`backend.query.clean_query`); :func:`check_queries` says which is not, and ``/setup`` uses it too, so the
mistake shows on the model card as soon as the Extra params are saved.
"""

from __future__ import annotations

import collections
import dataclasses
from typing import Any

from backend.labeling import LabelingSetup
from backend.query import QueryError, clean_query

#: The Extra params key of the per-label queries.
QUERIES_KEY = "queries"


class QueriesError(ValueError):
    """Per-label queries that cannot be used; the message names the label and what to change."""


def _controls(setup: LabelingSetup) -> str:
    names = [f'<BrushLabels name="{setup.brush_name}">' if setup.brush_name else "",
             f'<PolygonLabels name="{setup.polygon_name}">' if setup.polygon_name else ""]
    return " and ".join(n for n in names if n)


def check_queries(value: object, setup: LabelingSetup, where: str = f"extra_params '{QUERIES_KEY}'") -> dict[str, str]:
    """``{label: query}`` checked against the labeling config; raises :class:`QueriesError` naming the problem."""
    if not isinstance(value, dict) or not value:
        raise QueriesError(f'{where} must map labels to queries, e.g. {{"{setup.labels[0]}": "the red object"}}')
    queries: dict[str, str] = {}
    for label, query in value.items():
        if label not in setup.labels:
            raise QueriesError(f"{where} names the label '{label}', which the labeling config's {_controls(setup)} "
                               f"lacks: its labels are {', '.join(setup.labels)}")
        try:
            text = clean_query(query)
        except QueryError as e:
            raise QueriesError(f"{where}: the query of '{label}': {e}") from e
        if not text:
            raise QueriesError(f"{where}: the query of '{label}' is empty")
        queries[label] = text
    return queries


def parse_label_queries(items: list[str]) -> dict[str, str]:
    """``["Fruit=the food rich in vitamin C", ...]`` (``--label-query``) -> ``{"Fruit": "the food ..."}``."""
    out: dict[str, str] = {}
    for item in items:
        label, sep, query = item.partition("=")
        if not sep or not label.strip():
            raise QueriesError(f"--label-query {item!r}: write LABEL=QUERY, e.g. Fruit=\"the food rich in vitamin C\"")
        if label.strip() in out:
            raise QueriesError(f"--label-query names '{label.strip()}' twice")
        out[label.strip()] = query
    return out


def connection_queries(params: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The ``queries`` of a project's model connections' Extra params (``LabelStudioClient.connection_params``), or
    None when none sets them. Raises :class:`QueriesError` when two connections set different ones (which one would
    be meant?)."""
    found: list[Any] = []
    for extra in params:
        if QUERIES_KEY in extra and extra[QUERIES_KEY] not in found:
            found.append(extra[QUERIES_KEY])
    if len(found) > 1:
        raise QueriesError("the project's model connections set different 'queries' in their Extra params: keep "
                           "one, or give them with --label-query")
    return found[0] if found else None


@dataclasses.dataclass
class LabelCounts:
    """Per label, over a run: tasks that got regions, tasks where LISA found nothing, and regions written."""

    tasks: collections.Counter[str] = dataclasses.field(default_factory=collections.Counter)
    empty: collections.Counter[str] = dataclasses.field(default_factory=collections.Counter)
    regions: collections.Counter[str] = dataclasses.field(default_factory=collections.Counter)

    def add(self, label: str, regions: int) -> None:
        (self.tasks if regions else self.empty)[label] += 1
        self.regions[label] += regions

    def as_dict(self, labels: list[str]) -> dict[str, dict[str, int]]:
        return {lab: {"tasks": self.tasks[lab], "nothing_found": self.empty[lab], "regions": self.regions[lab]}
                for lab in labels}

    def format(self, labels: list[str]) -> str:
        """``Fruit: 12 task(s) with 15 region(s), nothing found in 3; Knife: ...``."""
        return "; ".join(f"{lab}: {self.tasks[lab]} task(s) with {self.regions[lab]} region(s), nothing found in "
                         f"{self.empty[lab]}" for lab in labels)


@dataclasses.dataclass
class TaskGroup:
    """The jobs of one task in a pre-labelling run - one per label (one in all for a single query) - and the
    predictions they gave so far. The task's prediction is written once every job has answered, so a task whose job
    for one label failed gets no prediction at all (a re-run then asks every label again, rather than skipping a
    task that lacks a label)."""

    task_id: int
    expected: int
    answers: list[tuple[str, dict[str, Any]]] = dataclasses.field(default_factory=list)
    errors: list[str] = dataclasses.field(default_factory=list)

    def add(self, label: str, pred: dict[str, Any]) -> None:
        self.answers.append((label, pred))

    def fail(self, message: str) -> None:
        self.errors.append(message)

    @property
    def complete(self) -> bool:
        return len(self.answers) + len(self.errors) >= self.expected

    def merged(self, model_version: str) -> dict[str, Any]:
        """One prediction holding every label's regions, in label order; no score (SAM's is uncalibrated, see
        :mod:`backend.regions`)."""
        result = [region for _, pred in self.answers for region in pred["result"]]
        return {"result": result, "score": None, "model_version": model_version}
