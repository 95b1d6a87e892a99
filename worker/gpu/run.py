"""``lisa-ls worker``: one long-lived model process serving the queue at ``REDIS_URL``.

Start one per GPU (``--device cuda:N``); more can join from any machine that reaches the same Redis.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from worker.client.defaults import QueueConfig
from worker.gpu.switch import STRATEGIES

log = logging.getLogger(__name__)


def add_worker_parser(sub: argparse._SubParsersAction) -> None:
    from model.cli import add_model_options

    p = sub.add_parser("worker", help="serve LISA or SAM 3 jobs (the family of --model) from the Redis queue at "
                                      "REDIS_URL (one process per GPU)")
    add_model_options(p, default_device="auto")
    p.add_argument("--name", default=None, help="worker name in /health (default host:pid:device)")
    p.add_argument("--batch-size", type=int, default=None, help="most jobs per model call (default LISA_LS_BATCH_SIZE)")
    p.add_argument("--cache-bytes", type=int, default=None, help="bytes of encoded images kept (default 1 GiB)")
    p.add_argument("--model-version", default=None, help="version reported to Label Studio (default: from files)")
    p.add_argument("--switch", default="auto", choices=STRATEGIES,
                   help="switching to a promoted model: load it next to the old one if both fit (auto), or always "
                        "free the old one first, or always load side by side")
    p.set_defaults(func=run_worker)


def run_worker(args: argparse.Namespace) -> int:
    from model.errors import LisaError
    from worker.gpu.handler import DEFAULT_CACHE_BYTES, load_handler
    from worker.gpu.loop import WorkerLoop

    config = QueueConfig.from_env()
    if str(args.device).startswith("cuda"):
        import torch

        if not torch.cuda.is_available():  # say it once, plainly, instead of a CUDA traceback per restart
            print(f"lisa-ls worker: --device {args.device} but this container/host sees no CUDA GPU (torch "
                  f"{torch.__version__}, CUDA {torch.version.cuda}). On a GPU host install the NVIDIA container "
                  "toolkit; without a GPU use `--device cpu` (docker compose: --profile cpu).", file=sys.stderr)
            return 3
    try:
        handler = load_handler(args.model, args.vision_tower, args.dtype, args.device, args.quantize,
                               args.model_version, args.cache_bytes or DEFAULT_CACHE_BYTES, config.max_decoded_pixels,
                               args.switch)
    except LisaError as e:
        print(f"lisa-ls worker: {e}", file=sys.stderr)
        return 2
    device = str(handler.predictor.device)
    name = args.name or f"{os.uname().nodename}:{os.getpid()}:{device}"
    loop = WorkerLoop.from_url(handler, config.redis_url, config, name=name, device=device,
                               model_version=handler.version, family=handler.family, batch_size=args.batch_size,
                               stats=handler.stats)
    log.info("worker %s: %s model version %s, queue %s", name, handler.family, handler.version, config.redis_url)
    return loop.run()
