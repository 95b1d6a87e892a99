"""``lisa-ls serve``: the backend under gunicorn with threads.

Threads, not just processes: Label Studio gives ``/health`` 1 s, and a ``/predict`` waits seconds for a worker,
so each gunicorn process needs spare threads to answer health checks while predictions wait (measured in
``shared/ref/labelstudio.md``: one thread per process timed out ``/health``, four answered in 10 ms). The waiting
costs no CPU (it is a blocking Redis pop), so the default is 8 threads per process and a single process.

gunicorn is driven programmatically (``gunicorn.app.base.BaseApplication``) so that the settings come from
:class:`backend.config.BackendConfig` (environment, then command-line flags) rather than a second config file,
and each gunicorn worker process builds its own app with :func:`backend.app.create_app` (no ``--preload``: Redis
connection pools are per process).

:func:`add_backend_parsers` adds the subcommands to the ``lisa-ls`` parser; ``python -m backend.cli serve ...``
runs the same thing standalone. Importing this module imports neither Flask nor gunicorn, so it costs other
subcommands nothing.
"""

from __future__ import annotations

import argparse
import logging
import math
import sys
from typing import Any

from backend import config as settings
from backend.config import BackendConfig

log = logging.getLogger(__name__)

SHUTDOWN_GRACE_S = 5.0
"""Added to the predict deadline for gunicorn's graceful timeout, so a stop lets in-flight predictions answer."""


def add_backend_parsers(subparsers: argparse._SubParsersAction) -> None:
    """Add the backend's subcommands (``serve``) to a ``lisa-ls`` subparsers object."""
    p = subparsers.add_parser(
        "serve",
        help="serve the Label Studio ML backend (gunicorn with threads)",
        description="Serve the Label Studio ML backend. Every flag defaults to its environment variable, then to "
        "the built-in default; see backend/config.py for all settings (REDIS_URL, BASIC_AUTH_USER, ...).",
    )
    p.add_argument("--host", default=None, help=f"listen address (default: $LISA_LS_HOST or {settings.HOST})")
    p.add_argument("--port", type=int, default=None, help=f"listen port (default: $LISA_LS_PORT or {settings.PORT})")
    p.add_argument(
        "--workers", type=int, default=None, help=f"gunicorn processes (default: $WORKERS or {settings.WORKERS})"
    )
    p.add_argument(
        "--threads", type=int, default=None, help=f"threads per process (default: $THREADS or {settings.THREADS})"
    )
    p.set_defaults(func=run_serve)


def config_from_args(args: argparse.Namespace) -> BackendConfig:
    """The environment's settings with the flags that were given on top. Raises ``ValueError`` on bad values."""
    flags = {name: getattr(args, name, None) for name in ("host", "port", "workers", "threads")}
    return BackendConfig.from_env(**{k: v for k, v in flags.items() if v is not None})


def gunicorn_options(config: BackendConfig) -> dict[str, Any]:
    """The gunicorn settings for ``config``."""
    debug = config.log_level == "DEBUG"
    return {
        "bind": f"[{config.host}]:{config.port}" if ":" in config.host else f"{config.host}:{config.port}",
        "workers": config.workers,
        "threads": config.threads,
        "worker_class": "gthread",
        # gthread notifies the arbiter from its main loop, not per request, so this only catches a wedged
        # process; keep it above Label Studio's 100 s so a slow request is never the reason a worker is killed.
        "timeout": 120,
        "graceful_timeout": math.ceil(config.predict_deadline_s + SHUTDOWN_GRACE_S),
        "loglevel": config.log_level.lower(),
        "errorlog": "-",
        # Label Studio polls /health on every settings view and before each batch; log requests only on DEBUG.
        "accesslog": "-" if debug else None,
        "proc_name": "lisa-ls-backend",
        # gunicorn >= 24 opens a control socket at one fixed path per user, so two backends on one machine (or a
        # backend beside another gunicorn app) would fight over it; nothing here uses it.
        "control_socket_disable": True,
    }


def _application(config: BackendConfig) -> Any:
    """A gunicorn application serving :func:`backend.app.create_app` with ``config``."""
    from gunicorn.app.base import BaseApplication

    class LisaBackendApplication(BaseApplication):
        def load_config(self) -> None:
            for key, value in gunicorn_options(config).items():
                if key in self.cfg.settings:  # skip settings an older gunicorn (>= 23 is allowed) does not have
                    self.cfg.set(key, value)

        def load(self) -> Any:
            from backend.app import create_app

            return create_app(config)

    return LisaBackendApplication(prog="lisa-ls serve")


def run_serve(args: argparse.Namespace) -> int:
    """Run gunicorn in the foreground until SIGINT or SIGTERM (gunicorn exits the process itself)."""
    try:
        config = config_from_args(args)
    except ValueError as exc:
        print(f"lisa-ls serve: {exc}", file=sys.stderr)
        return 2
    if config.threads < 2:
        log.warning("THREADS=%d: /health will wait behind running predictions; use 2 or more", config.threads)
    log.info(
        "serving on %s:%d with %d process(es) x %d threads; Redis %s",
        config.host,
        config.port,
        config.workers,
        config.threads,
        config.redis_url_redacted,
    )
    _application(config).run()
    return 0


def main(argv: list[str] | None = None) -> int:
    """Standalone entry point: ``python -m backend.cli serve [--host H] [--port P] ...``."""
    parser = argparse.ArgumentParser(prog="python -m backend.cli")
    add_backend_parsers(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    try:
        level = BackendConfig.from_env().log_level
    except ValueError:
        level = settings.LOG_LEVEL  # run_serve reports the bad variable
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
