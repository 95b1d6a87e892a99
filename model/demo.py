"""The offline demo model: a tiny LISA trained from scratch on synthetic shape scenes, served by ``make run`` when no
real checkpoint is configured.

It answers queries about scenes like :mod:`model.synthetic`'s ("the shape with three corners", "the red shapes",
"the largest shape") and nothing else; it exists so that the whole stack - Label Studio, queue, workers, masks -
can be tried on a laptop without downloading 15 GB. Re-make it with one command (about ``--time-limit-s`` of 2 CPU
cores, default 90 minutes)::

    make demo-model            # = python -m model.demo --out models/demo

The recipe (:data:`FROM_SCRATCH`) is the one ``bench/bench_learning.py`` times; the resulting folder is a LISA
release (``lisa-ls segment --model models/demo ...`` reads it like any other) plus ``metrics.json``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
#: Where the committed demo model lives (``worker/up.py`` serves it by default).
DEMO_DIR = ROOT / "models" / "demo"
#: The only tokenizer available offline: the one of LISA's tiny test checkpoint (vocabulary of 704 pieces).
TOKENIZER_DIR = ROOT / "tests" / "fixtures" / "lisa_tiny" / "checkpoint"

#: How a tiny LISA is trained from scratch (``lisa-ls finetune`` options; FinetuneConfig's own defaults are LISA's
#: LoRA recipe for released checkpoints). Every module trains, vision towers included. Every example uses LISA's
#: validation phrasing ("What is ... in this image? Please output segmentation mask." / "[SEG].") - the phrasing the
#: backend sends for a typed phrase (backend/phrasing.py). LISA's varied question/answer templates, which a
#: pretrained LLM takes in its stride, make a model trained from scratch ignore the query (held-out gIoU ~0.27 vs
#: 0.686 in 15 minutes), and switching to them mid-run cost ~0.2 gIoU for ~1500 steps (measured). Four queries are
#: asked of each scene, so a batch of 8 encodes 2 images (``model.training.teacher_forced_forward``) and contrasts
#: different answers about the same picture.
FROM_SCRATCH: dict[str, Any] = {
    "mode": "full", "train_vision": True, "batch_size": 8, "grad_accum": 1, "lr": 1e-3, "warmup_steps": 50,
    "plain_template_examples": 10**12, "queries_per_scene": 4, "steps": 1_000_000, "eval_every": 250,
    "eval_examples": 200, "save_every": 1000,
}


def cli_flags(options: dict[str, Any]) -> list[str]:
    """``{"batch_size": 8, "train_vision": True, "lr_scales": {"sam.": 3}}`` ->
    ``["--batch-size", "8", "--train-vision", "--lr-scales", "sam.=3"]`` (``lisa-ls finetune`` syntax)."""
    flags: list[str] = []
    for key, value in options.items():
        flag = "--" + key.replace("_", "-")
        if value is True:
            flags.append(flag)
        elif isinstance(value, dict):
            flags += [flag, ",".join(f"{k}={v}" for k, v in value.items())]
        elif value is not False and value is not None:
            flags += [flag, str(value)]
    return flags


def held_out_metrics(model_dir: str | Path, examples: int = 1000, device: str = "cpu") -> dict[str, Any]:
    """gIoU / cIoU of a model on ``examples`` held-out synthetic masks (scenes training never draws), overall and
    by what the query asks about (``by_kind``: position, size, shape, colour)."""
    from model.checkpoint import load_lisa
    from model.finetune import evaluate, synthetic_examples
    from model.synthetic import query_kind

    model, tokenizer = load_lisa(str(model_dir), dtype="fp32", device=device)
    stream = synthetic_examples(model, seed=0, val=True)
    held_out = [next(stream) for _ in range(examples)]
    metrics = evaluate(model, tokenizer, held_out, group=lambda ex: query_kind(ex.query))
    metrics["by_kind"] = metrics.pop("by_group")
    return metrics


def write_examples(folder: Path, count: int = 4, size: int = 256) -> None:
    """A few held-out scenes to import into Label Studio, with the queries each one can answer (``queries.json``)."""
    from PIL import Image

    from model.finetune import SYNTHETIC_VAL_SEED
    from model.synthetic import make_scene

    folder.mkdir(parents=True, exist_ok=True)
    queries = {}
    for i in range(count):
        scene = make_scene(2 * SYNTHETIC_VAL_SEED + i, size=size)  # beyond both training and validation seeds
        Image.fromarray(scene.image).save(folder / f"scene_{i}.png", optimize=True)
        queries[f"scene_{i}.png"] = [q.phrase for q in scene.queries]
    (folder / "queries.json").write_text(json.dumps(queries, indent=2) + "\n")


def write_model_card(folder: Path, metrics: dict[str, Any]) -> None:
    """``README.md`` of the demo folder: what the model is for, how it was made, what it scores."""
    kinds = ", ".join(f"{k} {v:.2f}" for k, v in metrics.get("by_kind", {}).items())
    (folder / "README.md").write_text(f"""# lisa-ls offline demo model

A tiny LISA (the released architecture at toy scale: 2-layer LLM of width 128, CLIP 112 px, SAM 128 px; about 1 M
parameters) trained from random weights on the synthetic scenes of `model/synthetic.py` - coloured circles,
triangles, squares and pentagons. It answers queries such as "the shape with three corners", "the two squares",
"the one that is not a circle" or "the leftmost shape" about such pictures (queries by colour alone, "the red
object", are its weak spot), and nothing else: it exists so that `make run` serves a model that does something
without a download. Try it on `examples/` (`examples/queries.json` lists what each
picture can be asked).

- Held-out gIoU {metrics["giou"]:.3f}, cIoU {metrics["ciou"]:.3f} on {metrics["masks"]} masks of scenes training
  never drew (by what the query asks about: {kinds}).
- Trained {metrics["steps"]} steps in {metrics["train_seconds"] / 60:.0f} minutes on 2 CPU cores:
  `{metrics["command"]}` (`make demo-model`), recipe `model.demo.FROM_SCRATCH`.
- A LISA release folder: `lisa-ls segment --model models/demo --image examples/scene_0.png --query "the leftmost
  shape"` reads it like any other; the CLIP tower is in `clip_tower/`, the tokenizer is the one of LISA's tiny
  test checkpoint.
""")


def build(out: str | Path, time_limit_s: float, seed: int = 0, work: str | Path | None = None) -> dict[str, Any]:
    """Train the demo model from a random initialisation and write it (release folder + ``metrics.json``) to
    ``out``, replacing what was there. Returns the metrics."""
    from model.factory import save_random_tiny
    from model.finetune import finetune
    from model.finetune_config import FinetuneConfig

    tmp = None if work else tempfile.TemporaryDirectory(prefix="lisa_demo_")
    work = Path(work or tmp.name)
    base = save_random_tiny(str(work / "base"), str(TOKENIZER_DIR), seed=seed)
    cfg = FinetuneConfig(base=base, out=str(work / "run"), data=["synthetic"], device="cpu", seed=seed,
                         time_limit_s=time_limit_s, **FROM_SCRATCH)
    t0 = time.time()
    result = finetune(cfg)
    seconds = time.time() - t0
    out = Path(out)
    staging = out.with_name(out.name + ".tmp")
    shutil.rmtree(staging, ignore_errors=True)
    shutil.copytree(work / "run" / "model", staging)  # the run's artifact: a release folder (full mode)
    write_examples(staging / "examples")
    metrics = held_out_metrics(staging)
    metrics.update(steps=result["step"], train_seconds=round(seconds), seed=seed, recipe=FROM_SCRATCH,
                   command=f"python -m model.demo --out {out} --time-limit-s {time_limit_s:g} --seed {seed}")
    (staging / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    write_model_card(staging, metrics)
    shutil.rmtree(out, ignore_errors=True)
    staging.rename(out)
    if tmp is not None:
        tmp.cleanup()
    return metrics


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m model.demo", description="(re)make the offline demo model")
    ap.add_argument("--out", default=str(DEMO_DIR))
    ap.add_argument("--time-limit-s", type=float, default=5400.0, help="training time (default 90 minutes)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--work", default=None, help="keep the run folder here (default: a temporary one)")
    args = ap.parse_args(argv)
    import logging

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    metrics = build(args.out, args.time_limit_s, args.seed, args.work)
    print(json.dumps({k: v for k, v in metrics.items() if k != "recipe"}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
