"""The offline demo model: a tiny LISA trained from scratch on synthetic shape scenes, served by ``make run`` when no
real checkpoint is configured.

It answers queries about scenes like :mod:`model.synthetic`'s ("the shape with three corners", "red", "the largest
shape") and nothing else; it exists so that the whole stack - Label Studio, queue, workers, masks -
can be tried on a laptop without downloading 15 GB. Re-make it with one command (about ``--time-limit-s`` of 2 CPU
cores, default 70 + 25 minutes)::

    make demo-model            # = python -m model.demo --out models/demo

Two stages: :data:`DEMO_FIRST` (:data:`FROM_SCRATCH`, the recipe ``bench/bench_learning.py`` times, at a lower
learning rate for longer) learns the task, then :data:`POLISH` continues from it with more of the queries it finds
hard (size, colour) and with annotator clicks and boxes, so that refinement in the labeling UI works on the demo model
too. The resulting folder is a LISA release (``lisa-ls segment --model models/demo ...`` reads it like any other) plus
``metrics.json``.
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

from model.demo_scope import mark_demo_model

ROOT = Path(__file__).resolve().parent.parent
#: Where the committed demo model lives (``worker/gpu/up.py`` serves it by default).
DEMO_DIR = ROOT / "models" / "demo"
#: The only tokenizer available offline: the one of LISA's tiny test checkpoint (vocabulary of 704 pieces).
TOKENIZER_DIR = ROOT / "tests" / "fixtures" / "lisa_tiny" / "checkpoint"

#: How a tiny LISA is trained from scratch (``lisa-ls finetune`` options; FinetuneConfig's own defaults are LISA's
#: LoRA recipe for released checkpoints). Every module trains, vision towers included. Every example uses LISA's
#: validation phrasing ("What is ... in this image? Please output segmentation mask." / "[SEG].") - the phrasing the
#: worker puts for a typed phrase (model/phrasing.py). LISA's varied question/answer templates, which a
#: pretrained LLM takes in its stride, make a model trained from scratch ignore the query (held-out gIoU ~0.27 vs
#: 0.686 in 15 minutes), and switching to them mid-run cost ~0.2 gIoU for ~1500 steps (measured). Four queries are
#: asked of each scene, so a batch of 8 encodes 2 images (``model.training.teacher_forced_forward``) and contrasts
#: different answers about the same picture.
FROM_SCRATCH: dict[str, Any] = {
    "mode": "full", "train_vision": True, "batch_size": 8, "grad_accum": 1, "lr": 1e-3, "warmup_steps": 50,
    "plain_template_examples": 10**12, "queries_per_scene": 4, "steps": 1_000_000, "eval_every": 250,
    "eval_examples": 200, "save_every": 1000,
}


#: The demo model's first stage: FROM_SCRATCH at lr 4e-4, which learns faster (held-out 0.70 at 7k steps against
#: 0.686 after 8.4k, 15 minutes, at 1e-3) and, given an hour, crosses over to colour queries: held-out gIoU sits near
#: 0.72 (colour-only queries near 0.15-0.2) until ~13.5k steps, then reaches 0.95 by 16k and 0.996 after 70 minutes
#: (49k steps). A 25-minute run, whose learning rate has decayed by 14k steps, never crossed (colour 0.34). The
#: colour words are read through the LLM's first layer; while the rate is still high its heads learn to attend to
#: them.
DEMO_FIRST: dict[str, Any] = {**FROM_SCRATCH, "lr": 4e-4}

#: The second stage, from the first one's weights: half of the examples carry clicks or a box
#: (model.synthetic.correction) - SAM's prompt encoder, which the first stage never uses, learns at 10x the rate -
#: and size queries, the weakest kind after the first stage (~0.8), are drawn 3x as often (colour 2x).
POLISH: dict[str, Any] = {
    **DEMO_FIRST, "warmup_steps": 50, "kind_weights": {"colour": 2, "size": 3}, "click_share": 0.5,
    "lr_scales": {"prompt_encoder": 10},
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
    # Refinement: the same held-out scenes with clicks or a box added (with the query, or alone as plain SAM).
    stream = synthetic_examples(model, seed=0, val=True, click_share=1.0)
    clicked = [next(stream) for _ in range(examples // 2)]
    refined = evaluate(model, tokenizer, clicked, group=lambda ex: "with query" if ex.use_seg else "clicks alone")
    metrics["refine"] = {"giou": round(refined["giou"], 3), "masks": refined["masks"], **refined["by_group"]}
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
    refine = metrics.get("refine", {})
    refine_parts = ", ".join(f"{k} {v:.2f}" for k, v in refine.items() if k not in ("giou", "masks"))
    (folder / "README.md").write_text(f"""# lisa-ls offline demo model

A tiny LISA (the released architecture at toy scale: 2-layer LLM of width 128, CLIP 112 px, SAM 128 px; about 1 M
parameters) trained from random weights on the synthetic scenes of `model/synthetic.py` - coloured circles,
triangles, squares and pentagons. It answers queries such as "the shape with three corners", "the two squares",
"the one that is not a circle", "red" or "the leftmost shape" about such pictures, and nothing else; its
answer can be refined with clicks (Include/Exclude key points) or a box. It exists so that `make run` serves a model
that does something without a download. Try it on `examples/` (`examples/queries.json` lists what each picture can
be asked).

- Held-out gIoU {metrics["giou"]:.3f}, cIoU {metrics["ciou"]:.3f} on {metrics["masks"]} masks of scenes training
  never drew (by what the query asks about: {kinds}).
- Refinement (the same held-out scenes with 1-3 clicks or a box, the masks they call for): gIoU
  {refine.get("giou", float("nan")):.3f} ({refine_parts}).
- Trained {metrics["steps"]} steps in {metrics["train_seconds"] / 60:.0f} minutes on 2 CPU cores:
  `{metrics["command"]}` (`make demo-model`), recipes `model.demo.DEMO_FIRST` then `model.demo.POLISH`.
- A LISA release folder: `lisa-ls segment --model models/demo --image examples/scene_0.png --query "the leftmost
  shape"` reads it like any other; the CLIP tower is in `clip_tower/`, the tokenizer is the one of LISA's tiny
  test checkpoint.
""")


def _train(base: str, run: Path, recipe: dict[str, Any], seconds: float, seed: int) -> dict[str, Any]:
    from model.finetune import finetune
    from model.finetune_config import FinetuneConfig

    cfg = FinetuneConfig(base=base, out=str(run), data=["synthetic"], device="cpu", seed=seed, time_limit_s=seconds,
                         **recipe)
    return finetune(cfg)


def build(out: str | Path, time_limit_s: float, seed: int = 0, work: str | Path | None = None,
          polish_s: float = 1500.0, start_from: str | Path | None = None) -> dict[str, Any]:
    """Train the demo model - :data:`DEMO_FIRST` for ``time_limit_s`` from a random initialisation (or take
    ``start_from``, a model that stage made), then :data:`POLISH` for ``polish_s`` - and write it (release folder
    + ``metrics.json``) to ``out``, replacing what was there. Returns the metrics."""
    from model.factory import save_random_tiny

    tmp = None if work else tempfile.TemporaryDirectory(prefix="lisa_demo_")
    work = Path(work or tmp.name)
    t0 = time.time()
    steps = 0
    if start_from is None:
        base = save_random_tiny(str(work / "base"), str(TOKENIZER_DIR), seed=seed)
        steps += _train(base, work / "run", DEMO_FIRST, time_limit_s, seed)["step"]
        model_dir = work / "run" / "model"  # the run's artifact: a release folder (full mode)
    else:
        model_dir = Path(start_from)
        steps += int(json.loads((model_dir / "metrics.json").read_text()).get("steps", 0))
    if polish_s > 0:
        steps += _train(str(model_dir), work / "polish", POLISH, polish_s, seed)["step"]
        model_dir = work / "polish" / "model"
    seconds = time.time() - t0
    out = Path(out)
    staging = out.with_name(out.name + ".tmp")
    shutil.rmtree(staging, ignore_errors=True)
    shutil.copytree(model_dir, staging, ignore=shutil.ignore_patterns("metrics.json", "examples", "README.md"))
    mark_demo_model(staging)  # so that a worker serving it says it is the demo (model/demo_scope.py)
    write_examples(staging / "examples")
    metrics = held_out_metrics(staging)
    command = f"python -m model.demo --out {out} --time-limit-s {time_limit_s:g} --polish-s {polish_s:g} --seed {seed}"
    if start_from is not None:  # say how the first stage was made, too
        first = json.loads((Path(start_from) / "metrics.json").read_text())
        seconds += first.get("train_seconds", 0)
        command = f"{first.get('command')}, then --start-from it: {command} --start-from {start_from}"
    metrics.update(steps=steps, train_seconds=round(seconds), seed=seed, recipe=DEMO_FIRST, polish=POLISH,
                   command=command)
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
    ap.add_argument("--time-limit-s", type=float, default=4200.0, help="first stage (default 70 minutes)")
    ap.add_argument("--polish-s", type=float, default=1500.0, help="second stage (default 25 minutes)")
    ap.add_argument("--start-from", default=None, help="a first-stage model to polish instead of training one")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--work", default=None, help="keep the run folder here (default: a temporary one)")
    args = ap.parse_args(argv)
    import logging

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    metrics = build(args.out, args.time_limit_s, args.seed, args.work, args.polish_s, args.start_from)
    print(json.dumps({k: v for k, v in metrics.items() if k not in ("recipe", "polish")}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
