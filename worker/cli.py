"""The ``lisa-ls`` command. Subcommands stay thin and import their package lazily, so that a backend-only
install (no torch) can still run the backend's subcommands."""

from __future__ import annotations

import argparse
import logging
import sys


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lisa-ls", description="LISA reasoning segmentation for Label Studio")
    parser.add_argument("--log-level", default=None, help="default: $LOG_LEVEL, else INFO")
    sub = parser.add_subparsers(dest="command", required=True)
    from backend.cli import add_backend_parsers

    add_backend_parsers(sub)
    try:
        from model.cli import add_segment_parser
    except ImportError as e:  # backend-only install: the model extras are absent
        p = sub.add_parser("segment", help="(needs the model extras: pip install 'lisa-ls[model]')")
        p.set_defaults(func=lambda _a, e=e: _missing("segment", e))
    else:
        add_segment_parser(sub)
        from model.cli_train import add_training_parsers
        from worker.gpu.promote import add_promote_parser
        from worker.gpu.run import add_worker_parser
        from worker.gpu.up import add_up_parser

        add_worker_parser(sub)
        add_up_parser(sub)
        add_training_parsers(sub)
        add_promote_parser(sub)
    return parser


def _missing(command: str, error: ImportError) -> int:
    print(f"lisa-ls {command}: {error}. Install the model extras: pip install 'lisa-ls[model]'", file=sys.stderr)
    return 2


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from backend.config import env_log_level  # the one reader of LOG_LEVEL (torch-free)

    level = (args.log_level or env_log_level()).upper()
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
