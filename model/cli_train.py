"""``lisa-ls finetune``, ``lisa-ls eval`` and ``lisa-ls merge``: the training side of the command line."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

from model.defaults import AUTO, resolve_device, resolve_dtype
from model.errors import LisaError


def add_training_parsers(sub: argparse._SubParsersAction) -> None:
    from model.finetune_config import FinetuneConfig

    p = sub.add_parser("finetune", help="fine-tune LISA (LoRA, LISA's recipe) on dataset folders; resumable")
    p.add_argument("--base", required=True, help="LISA checkpoint folder or Hub id")
    p.add_argument("--data", nargs="+", required=True, help="dataset folders (lisa-ls export / capture) or 'synthetic'")
    p.add_argument("--out", required=True, help="run folder (re-running resumes from its last checkpoint)")
    for f in dataclasses.fields(FinetuneConfig):
        if f.name in ("base", "data", "out"):
            continue
        flag = "--" + f.name.replace("_", "-")
        kind = {int: int, float: float, bool: None}.get(type(f.default), str)
        helptext = f.metadata.get("help", "")
        if f.default_factory is not dataclasses.MISSING and isinstance(f.default_factory(), dict):
            default = f.default_factory()
            shown = ",".join(f"{k}={v}" for k, v in default.items()) or "none"
            p.add_argument(flag, type=_mapping, default=default, metavar="KEY=VALUE[,KEY=VALUE]",
                           help=f"{helptext} (default {shown})")
        elif isinstance(f.default, bool):
            p.add_argument(flag, action="store_true", help=helptext)
        elif f.name == "time_limit_s":
            p.add_argument(flag, type=float, default=None, help=helptext)
        else:
            p.add_argument(flag, type=kind, default=f.default, help=f"{helptext} (default {f.default})")
    p.set_defaults(func=run_finetune)

    e = sub.add_parser("eval", help="gIoU / cIoU of a model (and adapter) on a dataset's held-out split")
    e.add_argument("--model", required=True)
    e.add_argument("--adapter", default=None, help="run folder or adapter folder of a fine-tune")
    e.add_argument("--vision-tower", default=None)
    e.add_argument("--data", nargs="+", required=True, help="dataset folders or 'synthetic'")
    e.add_argument("--split", default="val", choices=["train", "val"])
    e.add_argument("--examples", type=int, default=200, help="synthetic data: how many held-out masks")
    e.add_argument("--val-fallback-percent", type=int, default=FinetuneConfig.val_fallback_percent,
                   help="data without a val split: the share of images held out, as lisa-ls finetune's option")
    e.add_argument("--device", default=AUTO)
    e.add_argument("--report", default=None, help="write the JSON report here (default: print it)")
    e.set_defaults(func=run_eval)

    m = sub.add_parser("merge", help="merge a LoRA adapter into its base and write a LISA release folder")
    m.add_argument("--base", required=True)
    m.add_argument("--adapter", required=True, help="run folder or adapter folder")
    m.add_argument("--vision-tower", default=None)
    m.add_argument("--out", required=True)
    m.set_defaults(func=run_merge)


def _mapping(text: str) -> dict[str, float]:
    """``"sam.=3,llm.=0.5"`` -> ``{"sam.": 3.0, "llm.": 0.5}`` (for --weights, --lr-scales and --weight-decays)."""
    out: dict[str, float] = {}
    for item in filter(None, (x.strip() for x in text.split(","))):
        key, sep, value = item.rpartition("=")
        try:
            out[key] = float(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{item!r} is not KEY=NUMBER") from None
        if not sep or not key:
            raise argparse.ArgumentTypeError(f"{item!r} is not KEY=NUMBER")
    return out


def run_finetune(args: argparse.Namespace) -> int:
    from model.finetune import finetune
    from model.finetune_config import FinetuneConfig

    names = {f.name for f in dataclasses.fields(FinetuneConfig)}
    cfg = FinetuneConfig(**{k: v for k, v in vars(args).items() if k in names})
    try:
        result = finetune(cfg)
    except (LisaError, ValueError) as e:
        print(f"lisa-ls finetune: {e}", file=sys.stderr)
        return 2
    # One write per line: under torchrun every rank prints its result to the same pipe, and print() writes the text
    # and the newline separately, so two ranks' lines could interleave.
    sys.stdout.write(json.dumps(result) + "\n")
    if result["rank"] == 0:
        sys.stdout.write(finetune_summary(result) + "\n")
    sys.stdout.flush()
    return 0


def finetune_summary(result: dict) -> str:
    """The last line of ``lisa-ls finetune``: where the artifact went and how it scored on held-out data."""
    where = f"wrote {result['out']}" if result.get("out") else f"stopped at step {result['step']} (resumable)"
    if "giou" in result:
        score = (f"held-out gIoU {result['giou']:.3f}, cIoU {result['ciou']:.3f} on {result['masks']} masks "
                 f"(held out: {result['held_out']})")
    else:
        score = f"not evaluated (held out: {result['held_out']})"
    return f"lisa-ls finetune: {where} after {result['step']} steps; {score}"


def load_for_eval(model: str, adapter: str | None, vision_tower: str | None, device: str):
    from model.adapters import apply_adapter
    from model.checkpoint import load_lisa

    device = resolve_device(device)
    net, tokenizer = load_lisa(model, vision_tower, dtype=resolve_dtype(AUTO, device), device=device)
    return (apply_adapter(net, adapter) if adapter else net), tokenizer


def run_eval(args: argparse.Namespace) -> int:
    from model.finetune import dataset_examples, evaluate, synthetic_examples

    try:
        net, tokenizer = load_for_eval(args.model, args.adapter, args.vision_tower, args.device)
        if args.data == ["synthetic"]:
            stream = synthetic_examples(net, 0, val=True)
            examples = [next(stream) for _ in range(args.examples)]
        else:
            examples = dataset_examples(net, args.data, args.split, 0, args.val_fallback_percent)
        if not examples:
            raise ValueError(f"no {args.split} samples in {args.data}")
        report = {"model": args.model, "adapter": args.adapter, "data": args.data, "split": args.split,
                  **evaluate(net, tokenizer, examples)}
    except (LisaError, ValueError) as e:
        print(f"lisa-ls eval: {e}", file=sys.stderr)
        return 2
    text = json.dumps(report, indent=2)
    if args.report:
        Path(args.report).write_text(text + "\n")
    print(text)
    return 0


def run_merge(args: argparse.Namespace) -> int:
    from model.checkpoint import resolve_model_dir, resolve_vision_tower
    from model.release import save_release

    try:
        net, _ = load_for_eval(args.base, args.adapter, args.vision_tower, "cpu")
        tower = args.vision_tower or resolve_vision_tower(net.lisa_config.vision_tower, resolve_model_dir(args.base))
        clip = None if Path(tower).is_dir() else tower  # a local tower travels with the release
        out = save_release(net, resolve_model_dir(args.base), args.out, clip_name=clip)
    except LisaError as e:
        print(f"lisa-ls merge: {e}", file=sys.stderr)
        return 2
    print(f"merged {args.adapter} into {args.base} -> {out}")
    return 0
