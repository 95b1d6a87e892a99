"""requirements.lock agrees with pyproject.toml and with the venv the tests run in (issue 17 item 3).

The lock is what `make test` and `make run` install under (`pip install -c requirements.lock`): every transitive
version of the extras the Makefile installs, the project itself excluded. Three checks:
every requirement of those extras is locked at a version it allows; the lock holds exactly the dependency closure
(nothing left over after a requirement was dropped, nothing missing); and this interpreter's environment holds
exactly the locked versions. When one fails: `make lock` (keeps the locked versions that still fit) and reinstall.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

tomllib = pytest.importorskip("tomllib", reason="the lock is for the tested Python (3.11+)")

ROOT = Path(__file__).resolve().parent.parent
LOCK = ROOT / "requirements.lock"
PROJECT = "lisa-ls"
# Extras that no test installs, so the lock cannot vouch for them; each with the reason. A new extra has to be
# either reachable from the Makefile's install or named here.
UNLOCKED_EXTRAS = {
    "quant": "bitsandbytes (4/8-bit loading) needs a CUDA GPU; the tested venv does not hold it",
}
# Installed beside the locked packages but not part of any requirement: the installer itself.
INSTALLER = {"pip"}


def read_lock(path: Path = LOCK) -> dict[str, str]:
    """Lock lines `name==version` (comments and `# via` annotations skipped) -> {canonical name: version}."""
    pins: dict[str, str] = {}
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        match = re.fullmatch(r"([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;]+)", line.strip())
        assert match, f"{path.name}:{number}: not a `name==version` line: {line!r}"
        name = canonicalize_name(match[1])
        assert name not in pins, f"{path.name}:{number}: {name} locked twice"
        pins[name] = match[2]
    return pins


def pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def installed_extras() -> list[str]:
    """The extras the Makefile installs into .venv, read from its `pip install -e '.[...]'` line."""
    makefile = (ROOT / "Makefile").read_text()
    found = re.findall(r"install -q -e '\.\[([^\]]+)\]'", makefile)
    assert len(found) == 1, f"expected one `pip install -e '.[extras]'` in the Makefile, found {found}"
    return [e.strip() for e in found[0].split(",")]


def project_requirements(extras: list[str]) -> list[Requirement]:
    """The base requirements plus those of `extras`, self-references (lisa-ls[model]) expanded."""
    project = pyproject()
    optional = project["optional-dependencies"]
    seen: set[str] = set()
    out = [Requirement(r) for r in project["dependencies"]]
    todo = list(extras)
    while todo:
        extra = todo.pop()
        if extra in seen:
            continue
        assert extra in optional, f"the Makefile installs extra {extra!r}, which pyproject.toml does not define"
        seen.add(extra)
        for text in optional[extra]:
            req = Requirement(text)
            if canonicalize_name(req.name) == PROJECT:
                todo.extend(req.extras)
            else:
                out.append(req)
    return out


def reachable_extras(extras: list[str]) -> set[str]:
    optional = pyproject()["optional-dependencies"]
    seen: set[str] = set()
    todo = list(extras)
    while todo:
        extra = todo.pop()
        if extra not in seen:
            seen.add(extra)
            todo.extend(x for r in optional[extra] if canonicalize_name(Requirement(r).name) == PROJECT
                        for x in Requirement(r).extras)
    return seen


def applies(req: Requirement, extra: str = "") -> bool:
    return req.marker is None or req.marker.evaluate({"extra": extra})


def dependency_closure(roots: list[Requirement]) -> set[str]:
    """Canonical names reachable from `roots` through the installed distributions' metadata, markers evaluated for
    this interpreter (the lock is for it: same Python, same platform) and for the extras each requirement asks."""
    names: set[str] = set()
    done: set[tuple[str, str]] = set()
    todo = [r for r in roots if applies(r)]
    while todo:
        req = todo.pop()
        name = canonicalize_name(req.name)
        names.add(name)
        for extra in ["", *sorted(req.extras)]:
            if (name, extra) not in done:
                done.add((name, extra))
                requires = [Requirement(text) for text in metadata.distribution(name).requires or []]
                todo.extend(dep for dep in requires if applies(dep, extra))
    return names


def installed() -> dict[str, str]:
    """{canonical name: version} of this interpreter's environment, first on sys.path winning (as imports do)."""
    out: dict[str, str] = {}
    # Not sys.path as it is now: importing setuptools (torch's build helpers do, earlier in a full run) appends its
    # own setuptools/_vendor folder, whose vendored dist-infos are no installs of the venv.
    path = [p for p in sys.path if "_vendor" not in Path(p).parts]
    for dist in metadata.distributions(path=path):
        out.setdefault(canonicalize_name(dist.metadata["Name"]), dist.version)
    return out


def test_every_extra_is_locked_or_named_unlocked() -> None:
    defined = set(pyproject()["optional-dependencies"])
    reachable = reachable_extras(installed_extras())
    assert defined - reachable == set(UNLOCKED_EXTRAS), (
        f"extras outside the tested install {sorted(defined - reachable)} must be listed in UNLOCKED_EXTRAS "
        f"(or installed by the Makefile, then locked)")
    makefile = (ROOT / "Makefile").read_text()
    for line in makefile.splitlines():
        if "$(PIP) install -q" in line and "--upgrade pip" not in line:
            assert "$(LOCK_C)" in line, f"a Makefile install does not use the lock: {line.strip()}"
    assert "LOCK_C := -c $(LOCK)" in makefile and "LOCK := requirements.lock" in makefile


def test_every_requirement_is_locked_at_an_allowed_version() -> None:
    pins = read_lock()
    assert PROJECT not in pins, "the lock must not pin the project itself"
    problems = []
    for req in project_requirements(installed_extras()):
        name = canonicalize_name(req.name)
        if not applies(req):
            continue
        if name not in pins:
            problems.append(f"{req} is not in requirements.lock")
        elif not req.specifier.contains(pins[name], prereleases=True):
            problems.append(f"{req} does not allow the locked {name}=={pins[name]}")
    assert not problems, "\n".join(problems) + "\n(run `make lock`)"
    # The pins the Makefile installs first (torch, torchvision) are the locked ones.
    torch_pins = re.search(r"^TORCH_X86_64 := (.+)$", (ROOT / "Makefile").read_text(), re.M)
    assert torch_pins, "the Makefile's TORCH_X86_64 line is missing"
    for pin in torch_pins[1].split():
        name, version = pin.split("==")
        assert pins.get(canonicalize_name(name)) == version, f"Makefile pins {pin}, the lock {pins.get(name)}"


def test_lock_is_exactly_the_dependency_closure() -> None:
    pins = read_lock()
    have = installed()
    missing_dists = sorted(set(pins) - set(have))
    assert not missing_dists, f"cannot walk the closure: not installed here {missing_dists}"
    closure = dependency_closure(project_requirements(installed_extras()))
    assert not (set(pins) - closure), f"locked but required by nothing: {sorted(set(pins) - closure)} (`make lock`)"
    assert not (closure - set(pins)), f"required but not locked: {sorted(closure - set(pins))} (`make lock`)"


def test_the_venv_is_the_lock() -> None:
    pins = read_lock()
    have = installed()
    wrong = {n: (v, have.get(n)) for n, v in pins.items() if have.get(n) != v}
    assert not wrong, (f"{sys.prefix} differs from requirements.lock (name: (locked, installed)): {wrong}; "
                       f"reinstall with `pip install -e '.[all,dev]' -c requirements.lock`")
    extra = sorted(set(have) - set(pins) - INSTALLER - {PROJECT})
    assert not extra, (f"installed in {sys.prefix} but not locked: {extra}; add what the code needs to "
                       f"pyproject.toml, then `make lock`")


LS_LOCK = ROOT / "requirements-ls.lock"
LSVENV_PYTHON = ROOT / ".lsvenv" / "bin" / "python"


def test_label_studio_lock_pins_the_makefile_version() -> None:
    """requirements-ls.lock is .lsvenv's lock: it pins the Label Studio the Makefile installs, and not the project."""
    version = re.search(r"^LS_VERSION := (\S+)$", (ROOT / "Makefile").read_text(), re.M)
    assert version, "the Makefile's LS_VERSION line is missing"
    pins = read_lock(LS_LOCK)
    assert pins.get("label-studio") == version[1]
    assert PROJECT not in pins


@pytest.mark.skipif(not LSVENV_PYTHON.exists(), reason=".lsvenv is not installed (`make e2e-deps`)")
def test_the_label_studio_venv_is_its_lock() -> None:
    listing = subprocess.run(
        [str(LSVENV_PYTHON), "-c", "from importlib import metadata\n"
         "for d in metadata.distributions(): print(d.metadata['Name'], d.version)"],
        # Neither this checkout (PYTHONPATH, the current folder) nor its egg-info: only what .lsvenv holds.
        env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"}, cwd=LSVENV_PYTHON.parent,
        capture_output=True, text=True, check=True, timeout=60).stdout
    have: dict[str, str] = {}
    for line in listing.splitlines():
        name, version = line.split()
        have.setdefault(canonicalize_name(name), version)
    pins = read_lock(LS_LOCK)
    wrong = {n: (v, have.get(n)) for n, v in pins.items() if have.get(n) != v}
    assert not wrong, f".lsvenv differs from requirements-ls.lock (name: (locked, installed)): {wrong}"
    assert sorted(set(have) - set(pins) - INSTALLER) == []
