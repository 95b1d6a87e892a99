"""``lisa-ls promote``: evaluate a fine-tune against what the workers serve; promote it only if it is better.

Both models are scored on the same held-out split (teacher-forced gIoU, LISA's validation); the candidate wins on
a strictly higher gIoU (ties keep the current model: a new version makes Label Studio re-predict every task).
Promotion writes the registry key (``worker.client.registry``); running workers switch between batches.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from worker.client.defaults import QueueConfig


def better(candidate: dict[str, float], current: dict[str, float], margin: float = 0.0) -> bool:
    """The promotion rule: a strictly higher held-out gIoU (by more than ``margin``)."""
    return candidate["giou"] > current["giou"] + margin


def add_promote_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("promote", help="promote a fine-tune run if it beats the served model on held-out data")
    p.add_argument("--run", required=True, help="run folder written by lisa-ls finetune")
    p.add_argument("--data", nargs="+", required=True, help="dataset folders (their val split) or 'synthetic'")
    p.add_argument("--examples", type=int, default=200, help="synthetic data: held-out masks")
    p.add_argument("--device", default="auto")
    p.add_argument("--force", action="store_true", help="promote without comparing")
    p.set_defaults(func=run_promote)


def _score(model: str, adapter: str | None, data: list[str], examples: int, device: str,
           val_fallback_percent: int) -> dict[str, Any]:
    from model.cli_train import load_for_eval
    from model.finetune import dataset_examples, evaluate, synthetic_examples

    net, tokenizer = load_for_eval(model, adapter, None, device)
    if data == ["synthetic"]:
        stream = synthetic_examples(net, 0, val=True)
        held_out = [next(stream) for _ in range(examples)]
    else:
        held_out = dataset_examples(net, data, "val", 0, val_fallback_percent)
    if not held_out:
        raise ValueError(f"no held-out samples in {data} to compare the models on (see lisa-ls finetune's "
                         "--val-fallback-percent); use --force to promote without comparing")
    return evaluate(net, tokenizer, held_out)


def promote_run(run: Path, data: list[str], queue, examples: int = 200, device: str = "auto",
                force: bool = False) -> dict[str, Any]:
    from model.adapters import read_metadata
    from model.data import FALLBACK_VAL_PERCENT
    from worker.client import registry

    meta = read_metadata(run)
    if not meta:
        raise ValueError(f"{run} has no metadata.json: is it a finished lisa-ls finetune run?")
    adapter = str(run / "adapter") if (run / "adapter").is_dir() else None
    base = meta["base"] if adapter else str(run / "model")
    served = registry.current(queue) or {"base": meta["base"], "adapter": None, "version": "(base)"}
    decision: dict[str, Any] = {"candidate": meta["version"], "current": served.get("version")}
    if not force:
        # The split the run held out (dataset folders without a val split: the same share of their images).
        fallback = int(meta.get("val_fallback_percent", FALLBACK_VAL_PERCENT))
        decision["candidate_metrics"] = _score(base, adapter, data, examples, device, fallback)
        decision["current_metrics"] = _score(served["base"], served.get("adapter"), data, examples, device, fallback)
        decision["promoted"] = better(decision["candidate_metrics"], decision["current_metrics"])
    else:
        decision["promoted"] = True
    if decision["promoted"]:
        registry.promote(queue, meta["version"], base, adapter, decision.get("candidate_metrics", {}))
    (run / "promotion.json").write_text(json.dumps(decision, indent=2) + "\n")
    return decision


def run_promote(args: argparse.Namespace) -> int:
    from worker.client.connection import connect
    from worker.client.queue import JobQueue

    config = QueueConfig.from_env()
    queue = JobQueue(connect(config=config), config)
    try:
        decision = promote_run(Path(args.run), args.data, queue, args.examples, args.device, args.force)
    except (ValueError, OSError) as e:
        print(f"lisa-ls promote: {e}", file=sys.stderr)
        return 2
    print(json.dumps(decision))
    return 0
