"""A real Label Studio 1.23.2 and the real lisa-ls stack, for the end-to-end tests.

Load with ``pytest_plugins = ["ls_fixtures", "redis_fixtures"]`` in a test module. Everything runs on loopback:

* Label Studio from ``.lsvenv`` (``make test`` installs it there; its pins, redis 5 / numpy 2.2 / Django, stay out
  of ``.venv``), headless, on a fresh sqlite data dir, with ``HOME`` pointed into the session's tmp dir so nothing
  lands in ``~/.local`` or ``~/.config``. It is started once per session, in its own process group, and killed
  with that group after the session's last test that uses it. The data dir is seeded with a migrated empty
  database (:data:`TEMPLATE_DIR`, made by ``label-studio version`` the first time), so only the first session
  pays for Django's migrations. Its version check, analytics and Sentry are off: it sends nothing off the machine.
* The lisa-ls stack: its own ``redis-server`` (not the session server of ``redis_fixtures``, which other tests
  flush), ``lisa-ls serve`` pointed at that Label Studio, and one ``lisa-ls worker`` serving the tiny untrained
  fixture LISA on the CPU (arbitrary but real masks; it answers the fixture queries with ``[SEG]``).

:class:`LSClient` is a small client of Label Studio's REST API (``Authorization: Token <legacy token>``) with the
calls the tests make: projects, ML-backend connections, imports, interactive annotating, predictions, annotations.

Logs of all processes are kept under the session's tmp dir; their tails are printed at the end of the session.

PYTEST_DONT_REWRITE: test modules also import helpers from here before pytest loads it as a plugin.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import secrets
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import NoReturn

import numpy as np
import pytest
import requests
from ls_client import LSClient, LSError, textarea_context  # noqa: F401 - re-exported to the tests
from redis_fixtures import ROOT, RedisServer, free_port

LSVENV = ROOT / ".lsvenv"
LS_BIN = LSVENV / "bin" / "label-studio"
LS_VERSION = "1.23.2"
#: A migrated, empty Label Studio database, made once: a fresh data dir seeded with it starts in about 5 s instead
#: of running Django's migrations (30-60 s on 2 cores). It lives in .lsvenv, so it goes with the install.
TEMPLATE_DIR = LSVENV / "e2e-template"
LS_DB = "label_studio.sqlite3"
FIXTURE = ROOT / "tests" / "fixtures" / "lisa_tiny"
CASES = FIXTURE / "cases"

USERNAME = "e2e@example.com"
PASSWORD = "e2e-password-1234"
LS_START_TIMEOUT_S = 240.0
STACK_START_TIMEOUT_S = 120.0
LOG_TAIL_CHARS = 6000


def in_ci() -> bool:
    """Whether this is a CI run (CI runs ``.ci/run`` with ``CI=true``)."""
    return os.environ.get("CI", "").strip().lower() in ("true", "1", "yes")


def missing_dependency(what: str) -> NoReturn:
    """An end-to-end test cannot run because ``what`` is missing: a skip on a developer's machine, a failure under
    ``CI=true`` - there ``make test`` installs Label Studio, playwright and chromium (e2e-deps), so a missing one
    means the install is broken and the UI tests would otherwise pass without testing anything."""
    if in_ci():
        pytest.fail(f"{what}; CI=true, so this fails instead of skipping (make test installs it: see e2e-deps in "
                    "the Makefile)", pytrace=False)
    pytest.skip(what)


def case_png(case: int) -> Path:
    return CASES / f"case{case}.png"


def reference_mask(case: int) -> np.ndarray:
    """The mask LISA's own code computed for a fixture case (its generation path), as bool ``H x W``."""
    with np.load(CASES / f"case{case}.npz") as data:
        return data["gen_pred_masks"][0].astype(np.float32) > 0


#: Pixels that may differ from :func:`reference_mask` (recorded as float16 logits; ours are float32, cut at 0).
MAX_MASK_MISMATCH = 0.002


def _base_env(home: Path) -> dict[str, str]:
    """A minimal environment: nothing of ours (HOST, PORT, DEBUG, LOG_LEVEL, CI...) leaks into the children."""
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(home), "LANG": "C.UTF-8"}
    env["XDG_CONFIG_HOME"], env["XDG_CACHE_HOME"] = str(home / ".config"), str(home / ".cache")
    env["TMPDIR"] = os.environ.get("TMPDIR", "/tmp")
    return env


def _stop_group(proc: subprocess.Popen, timeout: float = 15.0) -> int | None:
    """SIGTERM the process group that ``proc`` leads (start_new_session), then SIGKILL it if it lingers."""
    if proc.returncode is not None:  # stopped (and reaped) before
        return proc.returncode
    if proc.poll() is None:
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.killpg(proc.pid, sig)
            except ProcessLookupError:
                break
            try:
                proc.wait(timeout=timeout)
                break
            except subprocess.TimeoutExpired:
                continue
    with contextlib.suppress(ProcessLookupError, PermissionError):  # reap anything left in the group
        os.killpg(proc.pid, signal.SIGKILL)
    return proc.returncode


def _tail(path: Path, chars: int = LOG_TAIL_CHARS) -> str:
    try:
        text = path.read_text(errors="replace")
    except FileNotFoundError:
        return "(no log)"
    return text if len(text) <= chars else "...\n" + text[-chars:]


class LabelStudio:
    """``label-studio start`` on a free loopback port, with a fresh data dir under ``workdir``."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.token = secrets.token_hex(20)  # LS accepts a legacy token of 40 hex characters
        self.data_dir, self.files_dir = workdir / "data", workdir / "files"
        self.log_path = workdir / "label-studio.log"
        self.proc: subprocess.Popen | None = None
        self.client = LSClient(self.url, self.token)

    def env(self) -> dict[str, str]:
        home = self.workdir / "home"
        for d in (home, self.data_dir, self.files_dir):
            d.mkdir(parents=True, exist_ok=True)
        return {
            **_base_env(home),
            "LABEL_STUDIO_BASE_DATA_DIR": str(self.data_dir),
            "LABEL_STUDIO_USERNAME": USERNAME,
            "LABEL_STUDIO_PASSWORD": PASSWORD,
            "LABEL_STUDIO_USER_TOKEN": self.token,
            "LABEL_STUDIO_ENABLE_LEGACY_API_TOKEN": "true",
            "LABEL_STUDIO_DISABLE_SIGNUP_WITHOUT_LINK": "true",
            # An ML backend on 127.0.0.1: without both, POST /api/ml answers 403 (reserved address, then the
            # SSRF check of the webhook it creates at <url>/webhook).
            "ML_BLOCK_LOCAL_IP": "false",
            "SSRF_PROTECTION_ENABLED": "false",
            "LOCAL_FILES_SERVING_ENABLED": "true",
            "LOCAL_FILES_DOCUMENT_ROOT": str(self.files_dir),
            # Nothing leaves the machine: no PyPI version check, no analytics, no Sentry (server or page).
            "LATEST_VERSION_CHECK": "false",
            "COLLECT_ANALYTICS": "false",
            "SENTRY_DSN": "",
            "FRONTEND_SENTRY_DSN": "",
            "CONVERTER_DOWNLOAD_RESOURCES": "false",
            "DEBUG": "false",
            "LOG_LEVEL": "WARNING",
        }

    def start(self) -> None:
        """Start in the background (seed the data dir, then ``label-studio start``); :meth:`wait_ready` waits."""
        self.env()  # make the directories
        self._stopping = False
        self._builder: subprocess.Popen | None = None
        self._launcher = threading.Thread(target=self._launch, name="label-studio-launcher", daemon=True)
        self._launcher.start()

    def _launch(self) -> None:
        with open(self.log_path, "ab") as log:
            try:
                template = self._template(log)
                if template is not None:
                    shutil.copyfile(template, self.data_dir / LS_DB)
            except (OSError, subprocess.SubprocessError) as e:  # no template: LS migrates the fresh data dir itself
                log.write(f"e2e: no template database ({e}); Label Studio migrates from scratch\n".encode())
            if self._stopping:
                return
            args = [str(LS_BIN), "start", "--no-browser", "--internal-host", "127.0.0.1", "--port", str(self.port),
                    "--host", self.url, "--data-dir", str(self.data_dir)]
            self.proc = subprocess.Popen(args, env=self.env(), cwd=self.workdir, stdout=log, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, start_new_session=True)

    def _template(self, log) -> Path | None:
        """:data:`TEMPLATE_DIR`'s database, made first if missing (atomically: sessions may race)."""
        db = TEMPLATE_DIR / LS_DB
        if db.exists():
            return db
        tmp = TEMPLATE_DIR.with_name(f"{TEMPLATE_DIR.name}.{os.getpid()}.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        env = {**self.env(), "LABEL_STUDIO_BASE_DATA_DIR": str(tmp)}
        log.write(b"e2e: making the template database (migrations) with `label-studio version`\n")
        log.flush()
        self._builder = subprocess.Popen([str(LS_BIN), "version", "--data-dir", str(tmp)], env=env, cwd=self.workdir,
                                         stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         start_new_session=True)
        code = self._builder.wait(timeout=LS_START_TIMEOUT_S)
        if code != 0 or not (tmp / LS_DB).exists():
            shutil.rmtree(tmp, ignore_errors=True)
            raise subprocess.SubprocessError(f"`label-studio version` exited with {code}")
        (tmp / ".env").unlink(missing_ok=True)  # its SECRET_KEY: each data dir makes its own
        try:
            os.replace(tmp, TEMPLATE_DIR)
        except OSError:  # another session made it meanwhile
            shutil.rmtree(tmp, ignore_errors=True)
        return db if db.exists() else None

    def wait_ready(self, timeout: float = LS_START_TIMEOUT_S) -> None:
        """Until ``GET /health`` answers 200 and the token works; fails with the log on exit or timeout."""
        deadline = time.monotonic() + 2 * timeout  # the first session also makes the template database
        self._launcher.join(timeout=max(0.0, deadline - time.monotonic()))
        if self.proc is None:
            raise AssertionError(f"Label Studio was not started:\n{_tail(self.log_path)}")
        deadline = min(deadline, time.monotonic() + timeout)
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"Label Studio exited with {self.proc.returncode}:\n{_tail(self.log_path)}")
            try:
                if requests.get(self.url + "/health", timeout=2).status_code == 200:
                    self.client.get("/api/current-user/whoami")
                    return
            except (requests.ConnectionError, requests.Timeout):
                pass
            time.sleep(0.25)
        raise AssertionError(f"Label Studio did not answer /health within {timeout:.0f} s:\n{_tail(self.log_path)}")

    def stop(self) -> int | None:
        self._stopping = True
        if self._builder is not None:
            _stop_group(self._builder)
        self._launcher.join(timeout=30)
        return _stop_group(self.proc) if self.proc is not None else None


@dataclasses.dataclass
class LisaStack:
    """Redis + ``lisa-ls serve`` + one ``lisa-ls worker`` (tiny fixture LISA, or ``model``, CPU)."""

    workdir: Path
    label_studio_url: str
    label_studio_token: str
    model: Path | None = None  # a LISA release folder with its CLIP tower inside (default: the tiny fixture)
    redis: RedisServer = dataclasses.field(init=False)
    port: int = dataclasses.field(init=False, default_factory=free_port)
    procs: dict[str, subprocess.Popen] = dataclasses.field(init=False, default_factory=dict)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def log_path(self, name: str) -> Path:
        return self.workdir / f"{name}.log"

    def backend_log(self) -> str:
        """The gunicorn-served backend's log (its /webhook logs each event at INFO)."""
        return self.log_path("backend").read_text(errors="replace")

    def env(self) -> dict[str, str]:
        env = _base_env(self.workdir / "home")
        env.update({
            "PYTHONPATH": str(ROOT),
            "REDIS_URL": self.redis.url,
            "LABEL_STUDIO_URL": self.label_studio_url,
            "LABEL_STUDIO_API_KEY": self.label_studio_token,
            "MODEL_DIR": str(self.workdir / "model_dir"),
            "LOG_LEVEL": "INFO",
            "HF_HUB_OFFLINE": "1",
            "TRANSFORMERS_OFFLINE": "1",
            "OMP_NUM_THREADS": "2",
        })
        return env

    def _spawn(self, name: str, args: list[str]) -> None:
        with open(self.log_path(name), "wb") as log:
            self.procs[name] = subprocess.Popen(
                [sys.executable, "-m", "worker.cli", *args], env=self.env(), cwd=ROOT, stdout=log,
                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
            )

    def start(self) -> None:
        (self.workdir / "home").mkdir(parents=True, exist_ok=True)
        self.redis = RedisServer(self.workdir)
        self.redis.start()
        self._spawn("backend", ["serve", "--host", "127.0.0.1", "--port", str(self.port)])
        model = ["--model", str(self.model)] if self.model else [
            "--model", str(FIXTURE / "checkpoint"), "--vision-tower", str(FIXTURE / "clip_tower")]
        self._spawn("worker", ["worker", *model, "--device", "cpu", "--name", "e2e-worker"])

    def health(self) -> dict:
        return requests.get(self.url + "/health", timeout=2).json()

    def wait_ready(self, timeout: float = STACK_START_TIMEOUT_S) -> dict:
        """Until ``/health`` is UP with the worker live; returns that health body."""
        deadline, health = time.monotonic() + timeout, None
        while time.monotonic() < deadline:
            for name, proc in self.procs.items():
                if proc.poll() is not None:
                    raise AssertionError(f"{name} exited with {proc.returncode}:\n{_tail(self.log_path(name))}")
            try:
                health = self.health()
                if health.get("status") == "UP" and health.get("workers"):
                    return health
            except (requests.ConnectionError, requests.Timeout, ValueError):
                pass
            time.sleep(0.25)
        logs = "\n".join(f"--- {n} ---\n{_tail(self.log_path(n))}" for n in self.procs)
        raise AssertionError(f"lisa-ls stack not UP within {timeout:.0f} s (last /health {health}):\n{logs}")

    def stop(self) -> None:
        for name in ("worker", "backend"):
            if name in self.procs:
                _stop_group(self.procs[name], timeout=30)
        if getattr(self, "redis", None) is not None:
            self.redis.stop()


@dataclasses.dataclass
class E2E:
    """What an end-to-end test works with."""

    ls: LabelStudio
    stack: LisaStack
    artifacts: Path

    @property
    def client(self) -> LSClient:
        return self.ls.client


#: Label Studio and stacks started by the fixtures and not yet stopped (see pytest_runtest_teardown).
_RUNNING: list[LabelStudio | LisaStack] = []
_FIXTURES = frozenset({"_label_studio_process", "label_studio", "lisa_stack", "e2e", "demo_stack"})


def pytest_runtest_teardown(item: pytest.Item, nextitem: pytest.Item | None) -> None:
    """After the session's last test that uses them, stop Label Studio and the stack (about 1.5 GB of memory), so
    that the rest of the session runs without them; their fixtures' finalizers then only print the logs."""
    if not _RUNNING:
        return
    items = item.session.items
    later = items[items.index(item) + 1:] if item in items else []
    if any(_FIXTURES.intersection(getattr(i, "fixturenames", ())) for i in later):
        return
    while _RUNNING:
        _RUNNING.pop().stop()


@pytest.fixture(scope="session")
def _label_studio_process(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LabelStudio]:
    """Label Studio, started (not yet ready): the stack starts meanwhile, to overlap the 30 s of migrations."""
    if not LS_BIN.exists():
        missing_dependency(f"Label Studio {LS_VERSION} is not installed in {LSVENV} (`make test` installs it)")
    ls = LabelStudio(tmp_path_factory.mktemp("label-studio"))
    ls.start()
    _RUNNING.append(ls)
    yield ls
    if ls in _RUNNING:
        _RUNNING.remove(ls)
    code = ls.stop()
    print(f"\n--- Label Studio {ls.url} (exit {code}), log tail ---\n{_tail(ls.log_path)}")


def _serve(stack: LisaStack, what: str) -> Iterator[LisaStack]:
    """Start a stack, hand it out UP, stop it and print its logs' tails."""
    try:
        _RUNNING.append(stack)
        stack.start()
        stack.wait_ready()
        yield stack
    finally:
        if stack in _RUNNING:
            _RUNNING.remove(stack)
        stack.stop()
        for name in stack.procs:
            print(f"\n--- {what} {name} log tail ---\n{_tail(stack.log_path(name))}")


@pytest.fixture(scope="session")
def lisa_stack(_label_studio_process: LabelStudio, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LisaStack]:
    """Redis, ``lisa-ls serve`` (pointed at the session's Label Studio) and one tiny-LISA CPU worker, all UP."""
    ls = _label_studio_process
    yield from _serve(LisaStack(tmp_path_factory.mktemp("lisa-stack"), ls.url, ls.token), "lisa-ls")


@pytest.fixture(scope="session")
def demo_stack(_label_studio_process: LabelStudio, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LisaStack]:
    """A second stack serving the offline demo model (models/demo), whose SAM has learnt clicks."""
    ls = _label_studio_process
    yield from _serve(LisaStack(tmp_path_factory.mktemp("demo-stack"), ls.url, ls.token, ROOT / "models" / "demo"),
                      "lisa-ls demo")


@pytest.fixture(scope="session")
def label_studio(_label_studio_process: LabelStudio) -> LabelStudio:
    """The session's Label Studio, answering ``/health`` and accepting its API token."""
    _label_studio_process.wait_ready()
    return _label_studio_process


@pytest.fixture(scope="session")
def e2e_artifacts() -> Path:
    """``tests/artifacts/`` (git-ignored): screenshots and other evidence of the end-to-end runs."""
    path = ROOT / "tests" / "artifacts"
    path.mkdir(exist_ok=True)
    return path


@pytest.fixture(scope="session")
def e2e(lisa_stack: LisaStack, label_studio: LabelStudio, e2e_artifacts: Path) -> E2E:
    """Label Studio and the lisa-ls stack, both ready (started in parallel)."""
    return E2E(label_studio, lisa_stack, e2e_artifacts)
