"""Fine-tuning LISA with its own recipe, resumable, on our datasets or on synthetic scenes.

Read top to bottom: the configuration (every default in one place), the data, the trainable parameters (LoRA on
the LLM's q/v projections plus the fully trained mask decoder, [SEG] projection, ``lm_head`` and embeddings - or
everything, for a tiny model trained from scratch), the loop (AdamW, warm-up then linear decay, gradient
accumulation, clipping), evaluation, and the artifact.

Unlike LISA's ``train_ds.py``, starting from a released checkpoint keeps its SAM and [SEG] projection (LISA
re-initialises them, issue #159) and sets the loss weights (LISA leaves them ``None``, issue #188).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import random
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

import numpy as np
import torch

from model import parallel
from model.checkpoint import load_lisa
from model.data import FALLBACK_VAL_PERCENT
from model.defaults import resolve_device, resolve_dtype
from model.finetune_config import FinetuneConfig
from model.losses import LossWeights
from model.metrics import IoUMeter
from model.modeling import LisaModel
from model.optim import MasterWeights, lr_lambda, param_groups
from model.phrasing import question as phrased
from model.preprocess import preprocess
from model.tokenizer import LisaTokenizer
from model.training import TrainExample, forward_losses, teacher_forced_forward

log = logging.getLogger(__name__)

#: LISA's LoRA targets: the LLM's attention q/v projections only (never CLIP's or SAM's).
LORA_TARGETS = r".*llm\.model\.layers\.\d+\.self_attn\.(q_proj|v_proj)"
#: Trained in full and saved with the adapter, as in LISA's recipe.
FULLY_TRAINED = ("mask_decoder", "text_hidden_fcs", "lm_head", "embed_tokens")


# ----------------------------------------------------------------------------------------------------- data
SYNTHETIC_VAL_SEED = 10_000_000  # held-out scenes come from a seed range training never reaches


def synthetic_examples(model: LisaModel, seed: int, val: bool = False, queries_per_scene: int = 2,
                       plain_first: int = 0, kind_weights: dict[str, float] | None = None,
                       click_share: float = 0.0) -> Iterator[TrainExample]:
    """An endless stream of synthetic (scene, query, mask) examples; ``val`` draws from the held-out seeds (every
    query of each scene), training draws ``queries_per_scene`` queries of each scene, one after the other.

    ``plain_first``: a curriculum for models trained from scratch - the first that many training examples use the
    validation phrasing ("What is ... in this image? Please output segmentation mask." / "[SEG].") and only later
    LISA's varied question and answer templates, whose variety otherwise drowns the query in noise early on.
    ``kind_weights``: draw queries by what they ask about with these weights (``{"colour": 4}``; default 1; 0 never
    draws that kind, and a scene with nothing else to ask is skipped).
    ``click_share``: that share of examples carries annotator clicks or a box (:func:`model.synthetic.correction`)
    and the mask they call for, so that SAM learns to refine an answer. Neither option changes the stream when
    left at its default.
    """
    from model.synthetic import answer, correction, make_scene, query_kind, question

    rng = random.Random(seed + (SYNTHETIC_VAL_SEED if val else 0))
    clicks_rng = random.Random(seed * 7 + 1 + (SYNTHETIC_VAL_SEED if val else 0))
    size, clip = model.lisa_config.sam_image_size, model.clip_size
    drawn = 0
    while True:
        scene = make_scene(rng.randrange(SYNTHETIC_VAL_SEED) + (SYNTHETIC_VAL_SEED if val else 0), size=size)
        pre = preprocess(scene.image, clip, size)
        k = min(queries_per_scene, len(scene.queries))
        if val:
            queries = scene.queries
        elif kind_weights:  # weighted sampling without replacement (Efraimidis-Spirakis keys); weight 0: never
            drawable = [(i, kind_weights.get(query_kind(q.phrase), 1.0)) for i, q in enumerate(scene.queries)]
            keyed = [(rng.random() ** (1.0 / w), i) for i, w in drawable if w > 0]
            queries = [scene.queries[i] for _, i in sorted(keyed, reverse=True)[:k]]
        else:
            queries = rng.sample(scene.queries, k)
        for q in queries:
            plain = val or drawn < plain_first
            text = phrased(q.phrase) if plain else question(q.phrase, rng)
            reply = "[SEG]." if plain else answer(rng)
            drawn += 1
            if click_share and clicks_rng.random() < click_share:
                fix = correction(scene, q, clicks_rng)
                target = np.zeros_like(scene.shape_masks[0])
                for i in fix.targets:
                    target |= scene.shape_masks[i]
                points = torch.tensor(fix.points, dtype=torch.float32) if fix.points else None
                box = None if fix.box is None else torch.tensor(fix.box, dtype=torch.float32)
                yield TrainExample(pre, text, reply, torch.from_numpy(target[None].astype(np.uint8)), points, box,
                                   fix.use_seg)
                continue
            mask = torch.from_numpy(scene.target_mask(q)[None].astype(np.uint8))
            yield TrainExample(pre, text, reply, mask)


@dataclasses.dataclass
class HeldOut:
    """A dataset's training and held-out samples and the rule that split them (for the log and metadata)."""

    train: list
    val: list
    rule: str


#: How :func:`split_samples` describes a dataset that has a val split of its own.
OWN_SPLIT = "the data's val split"


def split_samples(dirs: list[str], val_fallback_percent: int = FALLBACK_VAL_PERCENT) -> HeldOut:
    """The train and held-out samples of dataset folders: their own ``val`` split, or - when the data has none,
    as a small dataset often has (the split is by image hash, 10 % val) - ``val_fallback_percent`` of the
    training images (at least one, never all), picked by file name hash so every run and ``lisa-ls promote`` /
    ``eval`` pick the same. All samples of one image fall on the same side, so held-out images are never seen."""
    from model.data import load_samples

    samples = load_samples(dirs)
    train = [s for s in samples if s.split == "train"]
    val = [s for s in samples if s.split == "val"]
    if val or not train:
        return HeldOut(train, val, OWN_SPLIT)
    images = sorted({s.image_path.name for s in train}, key=lambda n: hashlib.sha256(n.encode()).hexdigest())
    if val_fallback_percent <= 0 or len(images) < 2:
        why = "it has one image" if len(images) < 2 else "--val-fallback-percent is 0"
        return HeldOut(train, [], f"nothing: the data has no val split and {why}, so the run is not evaluated")
    held = set(images[: min(len(images) - 1, max(1, round(len(images) * val_fallback_percent / 100)))])
    rule = (f"{len(held)} of {len(images)} training images ({val_fallback_percent} %, by file name hash): the data "
            "has no val split")
    return HeldOut([s for s in train if s.image_path.name not in held],
                   [s for s in train if s.image_path.name in held], rule)


def dataset_examples(model: LisaModel, dirs: list[str], split: str, seed: int,
                     val_fallback_percent: int = FALLBACK_VAL_PERCENT) -> list[TrainExample]:
    """Examples of our dataset folders (see ``model/data.py``); one per (sample, query). ``split`` is ``train`` or
    ``val`` as :func:`split_samples` draws them."""
    held_out = split_samples(dirs, val_fallback_percent)
    return samples_to_examples(model, held_out.val if split == "val" else held_out.train, seed)


def samples_to_examples(model: LisaModel, samples: list, seed: int) -> list[TrainExample]:
    """One :class:`TrainExample` per (sample, query), shuffled by ``seed``; each query phrased as the worker
    phrases an annotator's (``model/phrasing.py``, LISA's templates), so training sees the questions served."""
    examples = []
    for sample in samples:
        pre = preprocess(sample.image, model.clip_size, model.lisa_config.sam_image_size)
        answer = " ".join(["[SEG]"] * len(sample.masks)) + "."
        masks = torch.from_numpy(np.stack(sample.masks))
        examples.extend(TrainExample(pre, phrased(q), answer, masks) for q in sample.queries)
    random.Random(seed).shuffle(examples)
    return examples


# ------------------------------------------------------------------------------------------------ training
def trainable_model(model: LisaModel, cfg: FinetuneConfig) -> torch.nn.Module:
    """Mark what trains. LoRA mode wraps the model with peft; full mode trains every module (CLIP and the SAM
    image encoder only with ``train_vision``)."""
    if cfg.mode == "full":
        for name, p in model.named_parameters():
            vision = name.startswith(("vision_tower.", "sam.image_encoder."))
            p.requires_grad_(cfg.train_vision or not vision)
        return model
    from peft import LoraConfig, get_peft_model

    lora = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout, bias="none",
                      target_modules=LORA_TARGETS, modules_to_save=list(FULLY_TRAINED))
    return get_peft_model(model, lora)


@torch.no_grad()
def evaluate(model: LisaModel, tokenizer: LisaTokenizer, examples: list[TrainExample], batch: int = 8,
             group: Callable[[TrainExample], str] | None = None) -> dict:
    """gIoU / cIoU of teacher-forced masks (``logits > 0``), LISA's validation path. With ``group``, the same pass
    also reports the gIoU of each group of examples: ``"by_group": {name: gIoU}``."""
    was_training = model.training
    model.eval()
    meter, groups = IoUMeter(), {}
    for i in range(0, len(examples), batch):
        chunk = examples[i : i + batch]
        _, _, preds = teacher_forced_forward(model, tokenizer, chunk)
        for ex, pred in zip(chunk, preds):
            for p, t in zip(pred, ex.masks):
                iou = meter.add((p > 0).cpu().numpy(), t.cpu().numpy())
                if group is not None:
                    groups.setdefault(group(ex), []).append(iou)
    model.train(was_training)
    report = meter.report()
    if group is not None:
        report["by_group"] = {name: round(float(np.mean(ious)), 3) for name, ious in sorted(groups.items())}
    return report


def _trainable_state(net: torch.nn.Module, masters: MasterWeights) -> dict[str, torch.Tensor]:
    """What a checkpoint keeps of the trained parameters: their fp32 masters (not the rounded bf16 values)."""
    return {n: masters.master(p).detach().cpu() for n, p in net.named_parameters() if p.requires_grad}


def _data(model: LisaModel, cfg: FinetuneConfig, step: int, rank: int, world: int
          ) -> tuple[Iterator[TrainExample], list[TrainExample], str]:
    """``(training stream of this rank, held-out examples, how they were held out)``."""
    if cfg.data == ["synthetic"]:
        done = step * cfg.batch_size * cfg.grad_accum  # a resumed run continues the curriculum where it was
        train_iter = synthetic_examples(model, cfg.seed + step + 7919 * rank, queries_per_scene=cfg.queries_per_scene,
                                        plain_first=max(0, cfg.plain_template_examples - done),
                                        kind_weights=cfg.kind_weights or None, click_share=cfg.click_share)
        val_iter = synthetic_examples(model, cfg.seed, val=True)
        return train_iter, [next(val_iter) for _ in range(cfg.eval_examples)], "synthetic held-out scenes"
    held_out = split_samples(cfg.data, cfg.val_fallback_percent)
    train_list = samples_to_examples(model, held_out.train, cfg.seed)
    if not train_list:
        raise ValueError(f"no training samples in {cfg.data}")
    val = samples_to_examples(model, held_out.val, cfg.seed)
    if rank == 0:
        log.log(logging.INFO if held_out.rule == OWN_SPLIT else logging.WARNING,
                "%d training examples, %d held out - held out: %s", len(train_list), len(val), held_out.rule)
    first = step * cfg.batch_size * cfg.grad_accum
    train_iter = (train_list[(i * world + rank) % len(train_list)] for i in range(first, 10**12))
    return train_iter, val, held_out.rule


@dataclasses.dataclass
class _Run:
    """What one process of a fine-tune holds while it trains (made by :func:`_set_up`)."""

    cfg: FinetuneConfig
    out: Path
    rank: int
    world: int
    device: str
    model: LisaModel
    tokenizer: LisaTokenizer
    net: torch.nn.Module
    """``model`` as trained: with LoRA adapters, or itself (full mode)."""
    masters: MasterWeights
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    clock: dict[str, float]
    """``start``: when the loop started (the time-based decay counts from it, not from loading)."""

    @property
    def main(self) -> bool:
        return self.rank == 0


def _set_up(cfg: FinetuneConfig, out: Path) -> _Run:
    """Distributed set-up, the model with its trainable part, the fp32 master weights, optimizer and schedule."""
    rank, world, device = parallel.setup(resolve_device(cfg.device))
    torch.manual_seed(cfg.seed)
    model, tokenizer = load_lisa(cfg.base, cfg.vision_tower, dtype=resolve_dtype(cfg.dtype, device), device=device)
    net = trainable_model(model, cfg)
    masters = MasterWeights([p for p in net.parameters() if p.requires_grad])  # bf16 steps in fp32 (model.optim)
    optimizer = torch.optim.AdamW(masters.groups(param_groups(net, cfg)), lr=cfg.lr, betas=(0.9, 0.95),
                                  weight_decay=cfg.weight_decay)
    clock: dict[str, float] = {}  # set when the loop starts: evaluation and loading do not eat the decay
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lr_lambda(cfg, lambda: time.time() - clock["start"] if "start" in clock else 0.0))
    return _Run(cfg, out, rank, world, device, model, tokenizer, net, masters, optimizer, scheduler, clock)


def _step(run: _Run, train_iter: Iterator[TrainExample], weights: LossWeights) -> dict[str, float]:
    """One optimizer step over ``grad_accum`` batches (gradients averaged across ranks); returns the mean loss
    parts."""
    cfg, masters = run.cfg, run.masters
    parts: dict[str, float] = {}
    for _ in range(cfg.grad_accum):
        batch = [next(train_iter) for _ in range(cfg.batch_size)]
        losses = forward_losses(run.model, run.tokenizer, batch, weights, train_vision=cfg.train_vision)
        (losses["loss"] / cfg.grad_accum).backward()
        for k, v in losses.items():
            parts[k] = parts.get(k, 0.0) + float(v.detach()) / cfg.grad_accum
    masters.grads_to_masters()
    if run.world > 1:  # averaged in fp32, on the masters' gradients
        parallel.average_gradients(masters.masters, run.world)
    torch.nn.utils.clip_grad_norm_(masters.masters, cfg.clip_grad)
    run.optimizer.step()
    run.scheduler.step()
    run.optimizer.zero_grad(set_to_none=True)
    masters.masters_to_model()
    return parts


def _evaluate(run: _Run, val: list, logfile: IO[str], step: int, elapsed: float | None = None) -> dict[str, Any]:
    """Held-out metrics at ``step``, logged; the run's metrics from then on."""
    timing = {} if elapsed is None else {"elapsed_s": elapsed}
    metrics = {"step": step, **timing, **evaluate(run.model, run.tokenizer, val)}
    logfile.write(json.dumps({"eval": metrics}) + "\n")
    if elapsed is None:
        log.info("step %d: held-out gIoU %.3f cIoU %.3f", step, metrics["giou"], metrics["ciou"])
    else:
        log.info("step %d: held-out gIoU %.3f cIoU %.3f (%.0f s)", step, metrics["giou"], metrics["ciou"], elapsed)
    return metrics


def finetune(cfg: FinetuneConfig) -> dict[str, Any]:
    """Run (or resume) a fine-tune; returns the final metrics, ``out`` (the artifact's folder) and ``held_out``
    (how the evaluation data was chosen). See the module docstring.

    Under ``torchrun --nproc_per_node N`` each process trains on its own share of the data and gradients are
    averaged before every optimizer step; rank 0 alone evaluates, logs and writes checkpoints and the artifact.
    """
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    run = _set_up(cfg, out)
    main, world = run.main, run.world
    step = _resume(out, run.net, run.masters, run.optimizer, run.scheduler)
    if main:
        (out / "config.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=2))
    train_iter, val, held_out = _data(run.model, cfg, step, run.rank, world)
    if not main:
        val = []  # rank 0 evaluates; the others wait for it at the next gradient average
    logfile = (out / "log.jsonl").open("a") if main else open(os.devnull, "w")  # noqa: SIM115 - closed below
    start = time.time()
    metrics: dict[str, Any] = _evaluate(run, val, logfile, 0) if step == 0 and val else {}
    run.net.train()
    bar = _progress(cfg.steps, step) if main else None
    run.clock["start"] = start
    out_of_time = False
    weights = LossWeights(**cfg.weights)
    while step < cfg.steps:
        parts = _step(run, train_iter, weights)
        step += 1
        elapsed = time.time() - start
        logfile.write(json.dumps({"step": step, "lr": run.scheduler.get_last_lr()[0], "elapsed_s": elapsed, **parts})
                      + "\n")
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{parts['loss']:.3f}")
        out_of_time = cfg.time_limit_s is not None and elapsed > cfg.time_limit_s
        if world > 1 and cfg.time_limit_s is not None:  # every rank must stop at the same step
            out_of_time = parallel.any_rank(out_of_time, run.device)
        if val and (step % cfg.eval_every == 0 or step == cfg.steps or out_of_time):
            metrics = _evaluate(run, val, logfile, step, elapsed)
        logfile.flush()
        if main and (step % cfg.save_every == 0 or step == cfg.steps or out_of_time):
            _checkpoint(out, run.net, run.masters, run.optimizer, run.scheduler, step)
        if out_of_time:
            break
    if bar is not None:
        bar.close()
    logfile.close()
    artifact = None
    if main and (step >= cfg.steps or out_of_time):  # a run ended by its time limit is finished too (lr at 0)
        artifact = _write_artifact(out, cfg, run.net, run.model, run.tokenizer, metrics, step, held_out)
    parallel.finish(world)
    return {"step": step, "rank": run.rank, "world_size": world, **metrics,
            "out": str(artifact) if artifact else None, "held_out": held_out}


def _write_artifact(out: Path, cfg: FinetuneConfig, net, model: LisaModel, tokenizer: LisaTokenizer,
                    metrics: dict[str, Any], step: int, held_out: str) -> Path:
    """The run's product: a peft adapter (LoRA mode) or a whole release (full mode), plus metadata; returns the
    folder it went to."""
    from model.adapters import adapter_version, data_fingerprint, write_metadata
    from model.checkpoint import resolve_model_dir
    from model.release import save_release

    base_dir = resolve_model_dir(cfg.base)
    if cfg.mode == "full":
        artifact = save_release(model, base_dir, out / "model")
        version = f"{out.name}@full"
    else:
        artifact = out / "adapter"
        net.save_pretrained(str(artifact))
        version = adapter_version(out)
    write_metadata(out, base=cfg.base, mode=cfg.mode, version=version, data=cfg.data,
                   data_fingerprint=data_fingerprint(cfg.data), metrics=metrics, steps=step, held_out=held_out,
                   val_fallback_percent=cfg.val_fallback_percent)
    return artifact


def _progress(total: int, initial: int):
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm(total=total, initial=initial, desc="finetune", unit="step")


def _checkpoint(out: Path, net, masters: MasterWeights, optimizer, scheduler, step: int) -> None:
    """Resumable state, written to a temporary folder then renamed, so a crash never leaves half a checkpoint."""
    tmp, final = out / "checkpoint.tmp", out / "checkpoint"
    tmp.mkdir(exist_ok=True)
    torch.save({"trainable": _trainable_state(net, masters), "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(), "step": step, "rng": torch.get_rng_state()}, tmp / "state.pt")
    if final.exists():
        import shutil

        shutil.rmtree(final)
    tmp.rename(final)


def _resume(out: Path, net, masters: MasterWeights, optimizer, scheduler) -> int:
    state_file = out / "checkpoint" / "state.pt"
    if not state_file.is_file():
        return 0
    state = torch.load(state_file, map_location="cpu", weights_only=False)
    named = dict(net.named_parameters())
    for name, value in state["trainable"].items():
        masters.load(named[name], value)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["rng"])
    log.info("resumed %s at step %d", out, state["step"])
    return int(state["step"])
