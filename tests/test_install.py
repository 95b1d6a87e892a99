"""What a fresh install and ``make run`` leave behind: no packaging warnings, nothing untracked in ``git status``."""

from __future__ import annotations

import shutil
import subprocess
import warnings
from pathlib import Path

import pytest

from backend.config import MODEL_DIR
from worker.gpu.up import DATA_DIR

ROOT = Path(__file__).resolve().parent.parent


def test_pyproject_builds_without_setuptools_warnings():
    """``pip install -e .`` warned three times that ``project.license`` as a TOML table is deprecated."""
    config = pytest.importorskip("setuptools.config.pyprojecttoml")
    from setuptools.dist import Distribution

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        dist = config.apply_configuration(Distribution(), str(ROOT / "pyproject.toml"))
    assert [str(w.message) for w in caught if "license" in str(w.message).lower()] == []
    assert dist.metadata.license_expression == "Apache-2.0"


@pytest.mark.skipif(shutil.which("git") is None or not (ROOT / ".git").exists(), reason="not a git checkout")
def test_what_make_run_writes_is_ignored_by_git():
    """``make run`` writes the embedded Redis's files under ``.lisa-ls/`` and the backend's (captured datasets)
    under ``MODEL_DIR`` (``./data``): neither may show up as untracked files."""
    paths = [f"{DATA_DIR}/appendonly.aof", f"{DATA_DIR}/appendonlydir/x.aof",
             f"{Path(MODEL_DIR).as_posix().removeprefix('./')}/dataset/project-1/dataset.json"]
    ignored = subprocess.run(["git", "check-ignore", "--no-index", *paths], cwd=ROOT, capture_output=True,
                             text=True).stdout.split()
    assert ignored == paths
