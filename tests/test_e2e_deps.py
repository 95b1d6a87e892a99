"""The end-to-end tests' missing dependencies: skipped on a developer's machine, failed under ``CI=true``.

``make test`` (what CI runs) installs Label Studio, playwright and chromium first (``e2e-deps``); if one is missing
there anyway, the UI tests must fail rather than skip, or CI would pass without testing the UI. Checked by running
pytest on a small module that uses the real fixtures with the dependency pointed at a path that does not exist.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from redis_fixtures import ROOT

pytestmark = pytest.mark.slow

PROBE = '''
from pathlib import Path

import ls_fixtures
import test_e2e_ui

pytest_plugins = ["ls_fixtures", "redis_fixtures"]
ls_fixtures.LS_BIN = Path("/nonexistent/label-studio")
test_e2e_ui.CHROMIUM = Path("/nonexistent/chromium")
browser_page = test_e2e_ui.browser_page


def test_needs_label_studio(_label_studio_process):
    pass


def test_needs_chromium(browser_page):
    pass
'''


def _run_probe(tmp_path: Path, ci: str | None) -> subprocess.CompletedProcess:
    (tmp_path / "test_probe.py").write_text(PROBE)
    env = {k: v for k, v in os.environ.items() if k != "CI"}
    if ci is not None:
        env["CI"] = ci
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(ROOT / "tests")])
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", "--rootdir",
                           str(tmp_path), str(tmp_path / "test_probe.py")], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)


def test_missing_label_studio_or_chromium_fails_under_ci(tmp_path):
    run = _run_probe(tmp_path, "true")
    out = run.stdout + run.stderr
    assert run.returncode == 1, out
    assert "2 errors" in out and "skipped" not in out, out
    assert "Label Studio 1.23.2 is not installed" in out and "/nonexistent/chromium is missing" in out, out
    assert "CI=true, so this fails instead of skipping" in out, out


def test_missing_label_studio_or_chromium_skips_elsewhere(tmp_path):
    run = _run_probe(tmp_path, None)
    out = run.stdout + run.stderr
    assert run.returncode == 0, out
    assert "2 skipped" in out and "Label Studio 1.23.2 is not installed" in out, out
