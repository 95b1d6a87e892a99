"""``lisa-ls serve``: the backend under gunicorn with threads.

Threads, not just processes: Label Studio gives ``/health`` 1 s, and a ``/predict`` waits seconds for a worker,
so each gunicorn process needs spare threads to answer health checks while predictions wait (measured in
``shared/ref/labelstudio.md``: one thread per process timed out ``/health``, four answered in 10 ms). The waiting
costs no CPU (it is a blocking Redis pop), so the default is many threads per process and a single process
(``THREADS`` and ``WORKERS`` in :mod:`backend.config`).

gunicorn is driven programmatically (``gunicorn.app.base.BaseApplication``) so that the settings come from
:class:`backend.config.BackendConfig` (environment, then command-line flags) rather than a second config file,
and each gunicorn worker process builds its own app with :func:`backend.app.create_app` (no ``--preload``: Redis
connection pools are per process).

:func:`add_backend_parsers` adds the subcommands to the ``lisa-ls`` parser (``serve``, and ``prelabel`` from
:mod:`backend.prelabel`); ``python -m backend.cli serve ...``
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
    """Add the backend's subcommands (``serve``, ``prelabel``) to a ``lisa-ls`` subparsers object."""
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
    _add_prelabel_parser(subparsers)
    _add_export_parser(subparsers)


def _add_prelabel_parser(subparsers: argparse._SubParsersAction) -> None:
    """``prelabel``: pre-label a whole Label Studio project through the queue (see :mod:`backend.prelabel`)."""
    p = subparsers.add_parser(
        "prelabel",
        help="pre-label every task of a Label Studio project through the job queue",
        description="Pre-label a whole Label Studio project: each task's image and query become a queued LISA job "
        "and the masks become predictions written through Label Studio's API with the workers' model version. "
        "Tasks that already have a prediction of that version are skipped, so re-running the command resumes "
        "an interrupted run. Reads LABEL_STUDIO_URL, LABEL_STUDIO_API_KEY, REDIS_URL, MODEL_DIR and the other "
        "settings of backend/config.py. Exit code: 0 all pre-labelled or skipped, 1 some failed, 2 usage or "
        "configuration error, 130 interrupted.",
    )
    p.add_argument("--project", type=int, required=True, metavar="ID", help="Label Studio project id")
    p.add_argument("--query", default=None, metavar="TEXT",
                   help="what to segment, for tasks without their own query field ($LISA_LS_QUERY_FIELD, default "
                   "'query'; a task's own query wins). Phrased for LISA as in /predict")
    p.add_argument("--label", default=None, metavar="L",
                   help="brush label for every region (default: a label named in the query, else "
                   "$LISA_LS_DEFAULT_LABEL, else the config's first label)")
    p.add_argument("--label-query", action="append", default=None, metavar="LABEL=QUERY",
                   help="ask each label its own query (repeatable): one job per task and label, one prediction "
                   "per task with every label's regions. Default without --query: the 'queries' map of the model "
                   "connection's Extra params, if any")
    p.add_argument("--batch", type=int, default=None, metavar="N",
                   help="jobs submitted at once; at most 2N are in flight (default: $LISA_LS_BATCH_SIZE or "
                   "the worker's default)")
    p.add_argument("--limit", type=int, default=None, metavar="N",
                   help="pre-label at most N tasks this run (skipped tasks do not count)")
    p.add_argument("--state", default=None, metavar="FILE",
                   help="local record of task ids done and failed (default: $MODEL_DIR/prelabel/project-ID.json)")
    p.set_defaults(func=_run_prelabel)


def _run_prelabel(args: argparse.Namespace) -> int:
    from backend.prelabel import run_prelabel  # imports Flask and requests: only for this subcommand

    return run_prelabel(args)


def _add_export_parser(subparsers: argparse._SubParsersAction) -> None:
    """``export``: resync a Label Studio project into a training dataset (see :mod:`backend.export`)."""
    p = subparsers.add_parser(
        "export",
        help="resync a Label Studio project's annotations into a training dataset",
        description="Write every annotation of a Label Studio project as a training sample (the dataset format of "
        "backend/dataset.py, the same samples /webhook capture writes), update changed ones, remove deleted ones, "
        "and print a report with the reason for each skipped annotation. With --format coco, write the dataset "
        "as COCO instances JSON (annotations/instances_train.json and instances_val.json, RLE masks) plus the "
        "images into a new or empty --out folder, from the resynced project or from an existing --dataset folder "
        "(backend/coco.py). Reads LABEL_STUDIO_URL, LABEL_STUDIO_API_KEY and LISA_LS_DATASET_DIR. Exit code: 0 "
        "done, 1 some annotations failed (run again), 2 usage, configuration or Label Studio error.",
    )
    p.add_argument("--project", type=int, default=None, metavar="ID",
                   help="Label Studio project id (required unless --format coco reads an existing --dataset)")
    p.add_argument("--out", default=None, metavar="DIR",
                   help="dataset folder (default: $LISA_LS_DATASET_DIR/project-ID, where capture writes); with "
                   "--format coco, the new or empty folder for the COCO files")
    p.add_argument("--format", choices=("lisa", "coco"), default="lisa",
                   help="lisa: the lisa-ls dataset (default); coco: COCO instances JSON (train and val files, RLE "
                   "masks) plus the images, from the project's dataset (resynced first) or from --dataset")
    p.add_argument("--dataset", default=None, metavar="DIR",
                   help="with --format coco: the dataset folder to convert (with --project: resynced first; "
                   "default $LISA_LS_DATASET_DIR/project-ID)")
    p.add_argument("--page-size", type=int, default=100, metavar="N", help="tasks per API page (default: 100)")
    p.set_defaults(func=_run_export)


def _run_export(args: argparse.Namespace) -> int:
    if getattr(args, "format", "lisa") == "coco":
        from backend.coco import run_coco_export

        return run_coco_export(args)
    if args.project is None or args.dataset is not None:
        print("lisa-ls export: give --project ID (--dataset is for --format coco)", file=sys.stderr)
        return 2
    from backend.export import run_export  # imports numpy, Pillow and requests: only for this subcommand

    return run_export(args)


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
    """Standalone entry point: ``python -m backend.cli serve [--host H] [--port P] ...`` (or ``prelabel ...``)."""
    parser = argparse.ArgumentParser(prog="python -m backend.cli")
    add_backend_parsers(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    logging.basicConfig(level=settings.env_log_level(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
