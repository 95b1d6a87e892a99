"""Every backend setting is documented exactly once (the table of backend/config.py's docstring), and the default
that table names is the one the code uses."""

from __future__ import annotations

import dataclasses
import re

from backend import config as settings
from backend.config import BackendConfig

#: Words the table uses for a default that is not a literal, and the field value each stands for.
WORDS = {"(unset)": "", "(LISA's)": "", "(off)": float("-inf"), "(none)": (), "THREADS / 2": 0,
         "half the above": 0}
ROW = re.compile(r"^``([A-Z_]+)``\s+(\S.*?)\s{2,}\S")


def documented() -> list[tuple[str, str]]:
    """(variable, default as written) of every row of the docstring's tables."""
    rows = []
    for line in (settings.__doc__ or "").splitlines():
        match = ROW.match(line)
        if match and match.group(1) != "Variable":
            rows.append((match.group(1), match.group(2).strip()))
    return rows


def value_of(written: str, like: object) -> object:
    if written in WORDS:
        return WORDS[written]
    literal = written.strip("`")
    if isinstance(like, bool):
        return literal == "1"
    return type(like)(literal) if isinstance(like, (int, float)) else literal


def test_every_backend_setting_is_documented_exactly_once() -> None:
    names = [name for name, _ in documented()]
    variables = BackendConfig.variables()
    assert sorted(n for n in names if n in variables) == sorted(variables)  # each once, none missing
    assert set(names) - set(variables) == {"REDIS_URL"}  # the queue's, documented by worker.client.defaults
    for f in dataclasses.fields(BackendConfig):  # ... and nowhere else: the field holds only how to read it
        assert "doc" not in f.metadata and "help" not in f.metadata, f.name


def test_documented_defaults_are_the_codes() -> None:
    defaults = BackendConfig()
    for name, written in documented():
        if name == "REDIS_URL":
            continue
        field = BackendConfig.variables()[name]
        code = getattr(defaults, field)
        assert value_of(written, code) == code, (name, written, code)


def test_log_level_is_read_in_one_place() -> None:
    assert settings.env_log_level({}) == settings.LOG_LEVEL
    assert settings.env_log_level({"LOG_LEVEL": " debug "}) == "DEBUG"
    assert settings.env_log_level({"LOG_LEVEL": "LOUD"}) == settings.LOG_LEVEL  # serve reports the bad value
