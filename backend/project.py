"""Per-project settings: what a connection's *Extra params* may set, checked once at ``/setup``, kept in Redis.

Label Studio sends the model connection's *Extra params* (free JSON typed by whoever set the connection up) with
every ``/setup``. They are checked there, with a message naming the bad key, and stored typed, so that a string
``min_score`` or a ``"split_instances": "0"`` (which Python would count as true) cannot fail or mislead every later
``/predict``. Common spellings are normalised (``"0"``/``"false"`` -> ``False``, ``"0.5"`` -> ``0.5``); anything
else, and any key not listed in :data:`KEYS`, is refused.

==================== ================================================================== ====================
Key                  Meaning                                                            Default (setting)
==================== ================================================================== ====================
``default_query``    query for batch predictions of tasks without one                   (none)
``query_field``      task data key of batch queries                                     LISA_LS_QUERY_FIELD
``label``            brush label when the query names none (one of the config's)        LISA_LS_DEFAULT_LABEL
``split_instances``  true: one region per connected instance                            LISA_LS_SPLIT_INSTANCES
``min_score``        drop masks whose SAM score is below this                           LISA_LS_MIN_SCORE
``min_area``         drop regions of fewer pixels                                       LISA_LS_MIN_AREA
``phrase_template``  question for a short phrase (``{}`` is the phrase)                 LISA_LS_PHRASE_TEMPLATE
``sentence_template`` question for a sentence (``{}`` is the sentence)                  LISA_LS_SENTENCE_TEMPLATE
``queries``          ``{label: query}``: multi-class pre-labelling (:mod:`backend.multiclass`) (none)
``polygon_tolerance`` polygon simplification in pixels (:mod:`backend.polygons`)         LISA_LS_POLYGON_TOLERANCE
``model``            the model family serving the project: ``lisa`` or ``sam3``          ``lisa``
``score_threshold``  SAM 3 only: a concept query keeps the instances scoring above this    the model's own (0.5)
==================== ================================================================== ====================

A project's ``model`` decides which workers answer it (each family has its own job stream,
:data:`worker.client.defaults.FAMILY_NAMES`), so one backend and one Redis serve LISA and SAM 3 projects at once.
LISA's phrasing templates are ignored by SAM 3, which takes the noun phrase as typed.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Callable
from typing import Any

from backend.config import BackendConfig
from backend.labeling import LabelingSetup
from backend.multiclass import QUERIES_KEY, check_queries
from backend.polygons import TOLERANCE_KEY, check_tolerance
from backend.query import QueryError, clean_query, phrasing
from backend.state import redis_call
from worker.client.defaults import CONCEPT_FAMILIES, DEFAULT_FAMILY, FAMILY_NAMES
from worker.client.queue import JobQueue

#: How long a project's settings are kept without a ``/setup`` (Label Studio calls it on every model-card visit).
PROJECT_TTL_S = 30 * 24 * 3600
_TRUE, _FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off")


class SettingsError(ValueError):
    """Extra params that cannot be used; the message names the key and says what it must be."""


def _text(key: str, value: object) -> str:
    if not isinstance(value, str):
        raise SettingsError(f"extra_params '{key}' must be a string, not {json.dumps(value)[:40]}")
    return value


def _query(key: str, value: object) -> str:
    try:
        return clean_query(_text(key, value))
    except QueryError as e:
        raise SettingsError(f"extra_params '{key}': {e}") from e


def _field(key: str, value: object) -> str:
    if not _text(key, value).strip():
        raise SettingsError(f"extra_params '{key}' must name a task data field, not be empty")
    return str(value).strip()


def _flag(key: str, value: object) -> bool:
    if isinstance(value, bool) or (isinstance(value, int) and value in (0, 1)):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in _TRUE + _FALSE:
        return value.strip().lower() in _TRUE
    raise SettingsError(f"extra_params '{key}' must be true or false (or 1 or 0), not {json.dumps(value)[:40]}")


def _number(key: str, value: object) -> float:
    try:
        number = float(value) if isinstance(value, (int, float, str)) and not isinstance(value, bool) else math.nan
    except ValueError:
        number = math.nan
    if not math.isfinite(number):
        raise SettingsError(f"extra_params '{key}' must be a number, not {json.dumps(value)[:40]}")
    return number


def _count(key: str, value: object) -> int:
    number = _number(key, value)
    if number < 0 or number != int(number):
        raise SettingsError(f"extra_params '{key}' must be a whole number of pixels, 0 or more, not {value}")
    return int(number)


def _queries(key: str, value: object) -> dict[str, str]:
    """The per-label queries' shape (their labels are checked against the config in :func:`check_extra_params`)."""
    if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
        raise SettingsError(f"extra_params '{key}' must map labels to queries, not {json.dumps(value)[:40]}")
    return {label: _query(f"{key}.{label}", query) for label, query in value.items()}


def _tolerance(key: str, value: object) -> float:
    try:
        return check_tolerance(value)
    except ValueError as e:
        raise SettingsError(str(e)) from e


#: The Extra params key naming the project's model family, and the families' names in messages.
MODEL_KEY = "model"
#: The Extra params key of a concept query's score threshold (families of ``CONCEPT_FAMILIES`` only).
THRESHOLD_KEY = "score_threshold"


def _family(key: str, value: object) -> str:
    known = ", ".join(f"{f!r} ({name})" for f, name in FAMILY_NAMES.items())
    if not isinstance(value, str) or value.strip().lower() not in FAMILY_NAMES:
        raise SettingsError(f"extra_params '{key}' is {json.dumps(value)[:40]}, which is no model family lisa-ls "
                            f"serves; the families are {known}")
    return value.strip().lower()


def _threshold(key: str, value: object) -> float:
    number = _number(key, value)
    if not 0 <= number <= 1:
        raise SettingsError(f"extra_params '{key}' must be a score from 0 to 1, not {value}")
    return number


#: Every key Extra params may set, with its check (which returns the typed value).
KEYS: dict[str, Callable[[str, object], Any]] = {
    "default_query": _query, "query_field": _field, "label": _text, "split_instances": _flag, "min_score": _number,
    "min_area": _count, "phrase_template": _text, "sentence_template": _text, QUERIES_KEY: _queries,
    TOLERANCE_KEY: _tolerance, MODEL_KEY: _family, THRESHOLD_KEY: _threshold,
}


@dataclasses.dataclass(frozen=True)
class ProjectSettings:
    """A project's settings: its checked Extra params over the backend's own (:mod:`backend.config`)."""

    default_query: str
    query_field: str
    label: str
    split_instances: bool
    min_score: float
    min_area: int
    #: The templates sent with each job (``Job.phrasing``): the worker phrases the query with them.
    phrasing: dict[str, str]
    polygon_tolerance: float
    #: The model family answering the project's jobs (:data:`worker.client.defaults.FAMILY_NAMES`).
    family: str = DEFAULT_FAMILY
    #: A concept query's score threshold (:data:`~worker.client.defaults.CONCEPT_FAMILIES`); ``None``: the
    #: model's own.
    score_threshold: float | None = None

    @property
    def model_name(self) -> str:
        """The family's name as users read it ("LISA", "SAM 3")."""
        return FAMILY_NAMES[self.family]

    def job_options(self) -> dict[str, Any]:
        """What every segmentation job of the project carries for its family (a threshold, when one is set)."""
        return {"threshold": self.score_threshold} if self.score_threshold is not None else {}

    @property
    def job_phrasing(self) -> dict[str, str] | None:
        """The jobs' ``phrasing``: the project's templates for LISA; ``None`` (the query verbatim) for a family
        that takes the text as typed (SAM 3's noun phrases)."""
        return self.phrasing if self.family == DEFAULT_FAMILY else None

    @classmethod
    def resolve(cls, values: dict[str, Any], config: BackendConfig) -> ProjectSettings:
        """``values`` (checked, see :func:`check_extra_params`) with the backend's settings for what they omit."""
        try:
            templates = phrasing(values.get("phrase_template", config.phrase_template),
                                 values.get("sentence_template", config.sentence_template))
        except ValueError as e:
            raise SettingsError(f"extra_params: {e}") from e
        return cls(default_query=values.get("default_query", ""),
                   query_field=values.get("query_field", config.query_field),
                   label=values.get("label") or config.default_label,
                   split_instances=values.get("split_instances", bool(config.split_instances)),
                   min_score=values.get("min_score", config.min_score),
                   min_area=values.get("min_area", config.min_area), phrasing=templates,
                   polygon_tolerance=values.get(TOLERANCE_KEY, config.polygon_tolerance),
                   family=values.get(MODEL_KEY, DEFAULT_FAMILY), score_threshold=values.get(THRESHOLD_KEY))


def check_extra_params(extra: object, config: BackendConfig, setup: LabelingSetup | None = None) -> dict[str, Any]:
    """The typed settings of a connection's Extra params (an object, or its JSON text; empty: none).

    Raises:
        SettingsError: not an object, an unknown key, a value of the wrong kind, a template without ``{}``, or
            (with ``setup``) a ``label`` the labeling config's BrushLabels do not have.
    """
    if extra is None or (isinstance(extra, str) and not extra.strip()):
        return {}
    if isinstance(extra, str):
        try:
            extra = json.loads(extra)
        except (ValueError, RecursionError) as e:
            raise SettingsError(f"extra_params is not valid JSON ({e})") from None
    if not isinstance(extra, dict):
        raise SettingsError(f"extra_params must be a JSON object of settings, not {json.dumps(extra)[:40]}")
    unknown = sorted(k for k in extra if k not in KEYS)
    if unknown:
        raise SettingsError(f"extra_params has the unknown key {unknown[0]!r}; the keys are {', '.join(KEYS)}")
    values = {key: KEYS[key](key, value) for key, value in extra.items()}
    ProjectSettings.resolve(values, config)  # the templates, together
    family = values.get(MODEL_KEY, DEFAULT_FAMILY)
    if THRESHOLD_KEY in values and family not in CONCEPT_FAMILIES:
        raise SettingsError(f"extra_params '{THRESHOLD_KEY}' is a setting of "
                            f"{' and '.join(FAMILY_NAMES[f] for f in CONCEPT_FAMILIES)} projects; this one uses "
                            f"{FAMILY_NAMES[family]} (set \"{MODEL_KEY}\" too, or use 'min_score')")
    if setup is not None and values.get("label") and values["label"] not in setup.labels:
        raise SettingsError(f"extra_params 'label' is {values['label']!r}, which is not a label of the config's "
                            f"<BrushLabels name=\"{setup.brush_name}\"> ({', '.join(setup.labels)})")
    if setup is not None and QUERIES_KEY in values:
        try:
            values[QUERIES_KEY] = check_queries(values[QUERIES_KEY], setup)
        except ValueError as e:
            raise SettingsError(f"lisa-ls cannot use these Extra params: {e}") from e
    return values


def _key(queue: JobQueue, project: str) -> str:
    return queue.key("project", project)


def save(queue: JobQueue, project: str, values: dict[str, Any]) -> None:
    """Keep a project's checked settings (``values`` empty: forget them, back to the backend's own)."""
    key = _key(queue, project)
    if values:
        redis_call(queue, lambda: queue.redis.set(key, json.dumps(values), ex=PROJECT_TTL_S), "save project settings")
    else:
        redis_call(queue, lambda: queue.redis.delete(key), "save project settings")


def load(queue: JobQueue, project: str, config: BackendConfig) -> ProjectSettings:
    """A project's settings (the backend's own for a project without any, or no project).

    Raises:
        SettingsError: the stored ones no longer pass the checks (stored by an older version, before they were
            checked): validating the connection again in Label Studio stores them anew, or says what is wrong.
    """
    raw = redis_call(queue, lambda: queue.redis.get(_key(queue, project)), "load project settings") if project else None
    try:
        values = check_extra_params(json.loads(raw), config) if raw else {}
    except (SettingsError, ValueError) as e:
        raise SettingsError(f"this project's stored model settings are unusable ({e}): open the model in the "
                            "project's Model settings and validate and save it again") from e
    return ProjectSettings.resolve(values, config)
