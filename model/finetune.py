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
import fnmatch
import json
import logging
import math
import os
import random
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from model.checkpoint import load_lisa
from model.finetune_config import FinetuneConfig
from model.losses import LossWeights
from model.metrics import IoUMeter
from model.modeling import LisaModel
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


def _question(query: str) -> str:
    """LISA's validation phrasing: short phrase vs sentence."""
    if query.rstrip().endswith((".", "?", "!")):
        return f"{query} Please output segmentation mask."
    return f"What is {query} in this image? Please output segmentation mask."


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
            text = _question(q.phrase) if plain else question(q.phrase, rng)
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


def dataset_examples(model: LisaModel, dirs: list[str], split: str, seed: int) -> list[TrainExample]:
    """Examples of our dataset folders (see ``model/data.py``); one per (sample, query)."""
    from model.data import load_samples

    examples = []
    for sample in load_samples(dirs, split=split):
        pre = preprocess(sample.image, model.clip_size, model.lisa_config.sam_image_size)
        answer = " ".join(["[SEG]"] * len(sample.masks)) + "."
        masks = torch.from_numpy(np.stack(sample.masks))
        examples.extend(TrainExample(pre, _question(q), answer, masks) for q in sample.queries)
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


def param_groups(net: torch.nn.Module, cfg: FinetuneConfig) -> list[dict[str, Any]]:
    """AdamW parameter groups: one per (learning-rate multiplier of ``cfg.lr_scales``, weight decay of
    ``cfg.weight_decays``) pair, the rest at ``cfg.lr`` and ``cfg.weight_decay``. In both, the first matching key
    wins; a key matches a parameter name as a substring (``sam.mask_decoder``) or, if it holds a wildcard, as a
    whole-name glob (``llm.*.self_attn.[qk]_proj.*``)."""
    groups: dict[tuple[float, float], list[torch.nn.Parameter]] = {}
    for name, p in net.named_parameters():
        if p.requires_grad:
            scale = next((v for k, v in cfg.lr_scales.items() if _name_matches(name, k)), 1.0)
            decay = next((v for k, v in cfg.weight_decays.items() if _name_matches(name, k)), cfg.weight_decay)
            groups.setdefault((scale, decay), []).append(p)
    return [{"params": ps, "lr": cfg.lr * scale, "weight_decay": decay} for (scale, decay), ps in groups.items()]


def _name_matches(name: str, key: str) -> bool:
    """``key`` as a substring of ``name``, or as a glob over the whole name when it holds ``*``, ``?`` or ``[``."""
    return fnmatch.fnmatchcase(name, key) if any(c in key for c in "*?[") else key in name


def lr_lambda(cfg: FinetuneConfig, elapsed_s: Callable[[], float] = lambda: 0.0):
    """Linear warm-up over ``warmup_steps``, then linear decay to 0 at ``steps`` - or, with ``time_limit_s``, at
    whichever of the two comes first (``elapsed_s`` is the clock of this invocation), so that a run cut by its
    time limit still ends with its learning rate decayed instead of stopping at the peak."""

    def f(step: int) -> float:
        if step < cfg.warmup_steps:
            return step / max(1, cfg.warmup_steps)
        by_step = (cfg.steps - step) / max(1, cfg.steps - cfg.warmup_steps)
        by_time = 1.0 - elapsed_s() / cfg.time_limit_s if cfg.time_limit_s else 1.0
        return max(0.0, min(by_step, by_time))

    return f


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


def _trainable_state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().cpu() for n, p in module.named_parameters() if p.requires_grad}


def _distributed(device: str) -> tuple[int, int, str]:
    """``(rank, world size, device)``; joins the process group when started by ``torchrun`` / ``accelerate launch``
    (one process per GPU, each on ``cuda:LOCAL_RANK``; gloo on CPU)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1, device
    import torch.distributed as dist

    if device.startswith("cuda"):
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    return dist.get_rank(), world, device


def _average_gradients(params: list[torch.nn.Parameter], world: int) -> None:
    """Data parallelism by hand: sum every rank's gradients and divide (a rank whose batch had no mask for some
    module contributes zeros, so every rank makes the same all-reduce calls in the same order)."""
    import torch.distributed as dist

    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        dist.all_reduce(p.grad)
        p.grad /= world


def finetune(cfg: FinetuneConfig) -> dict[str, Any]:
    """Run (or resume) a fine-tune; returns the final metrics. See the module docstring.

    Under ``torchrun --nproc_per_node N`` each process trains on its own share of the data and gradients are
    averaged before every optimizer step; rank 0 alone evaluates, logs and writes checkpoints and the artifact.
    """
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    device = cfg.device if cfg.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    rank, world, device = _distributed(device)
    main = rank == 0
    dtype = cfg.dtype if cfg.dtype != "auto" else ("bf16" if device.startswith("cuda") else "fp32")
    torch.manual_seed(cfg.seed)
    model, tokenizer = load_lisa(cfg.base, cfg.vision_tower, dtype=dtype, device=device)
    net = trainable_model(model, cfg)
    params = [p for p in net.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(param_groups(net, cfg), lr=cfg.lr, betas=(0.9, 0.95),
                                  weight_decay=cfg.weight_decay)
    clock: dict[str, float] = {}  # set when the loop starts: evaluation and loading do not eat the decay
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lr_lambda(cfg, lambda: time.time() - clock["start"] if "start" in clock else 0.0))
    weights = LossWeights(**cfg.weights)
    step = _resume(out, net, optimizer, scheduler)
    if main:
        (out / "config.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=2))
    if cfg.data == ["synthetic"]:
        done = step * cfg.batch_size * cfg.grad_accum  # a resumed run continues the curriculum where it was
        train_iter = synthetic_examples(model, cfg.seed + step + 7919 * rank, queries_per_scene=cfg.queries_per_scene,
                                        plain_first=max(0, cfg.plain_template_examples - done),
                                        kind_weights=cfg.kind_weights or None, click_share=cfg.click_share)
        val_iter = synthetic_examples(model, cfg.seed, val=True)
        val = [next(val_iter) for _ in range(cfg.eval_examples)]
    else:
        train_list = dataset_examples(model, cfg.data, "train", cfg.seed)
        val = dataset_examples(model, cfg.data, "val", cfg.seed)
        if not train_list:
            raise ValueError(f"no training samples in {cfg.data}")
        first = step * cfg.batch_size * cfg.grad_accum
        train_iter = (train_list[(i * world + rank) % len(train_list)] for i in range(first, 10**12))
    if not main:
        val = []  # rank 0 evaluates; the others wait for it at the next gradient average
    logfile = (out / "log.jsonl").open("a") if main else open(os.devnull, "w")  # noqa: SIM115 - closed below
    start = time.time()
    metrics: dict[str, Any] = {}
    if step == 0 and val:
        metrics = {"step": 0, **evaluate(model, tokenizer, val)}
        logfile.write(json.dumps({"eval": metrics}) + "\n")
        log.info("step 0: held-out gIoU %.3f cIoU %.3f", metrics["giou"], metrics["ciou"])
    net.train()
    bar = _progress(cfg.steps, step) if main else None
    clock["start"] = start
    out_of_time = False
    while step < cfg.steps:
        parts: dict[str, float] = {}
        for _ in range(cfg.grad_accum):
            batch = [next(train_iter) for _ in range(cfg.batch_size)]
            losses = forward_losses(model, tokenizer, batch, weights, train_vision=cfg.train_vision)
            (losses["loss"] / cfg.grad_accum).backward()
            for k, v in losses.items():
                parts[k] = parts.get(k, 0.0) + float(v.detach()) / cfg.grad_accum
        if world > 1:
            _average_gradients(params, world)
        torch.nn.utils.clip_grad_norm_(params, cfg.clip_grad)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        elapsed = time.time() - start
        logfile.write(json.dumps({"step": step, "lr": scheduler.get_last_lr()[0], "elapsed_s": elapsed, **parts})
                      + "\n")
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{parts['loss']:.3f}")
        out_of_time = cfg.time_limit_s is not None and elapsed > cfg.time_limit_s
        if world > 1 and cfg.time_limit_s is not None:  # every rank must stop at the same step
            import torch.distributed as dist

            flag = torch.tensor([float(out_of_time)])
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            out_of_time = bool(flag.item())
        if val and (step % cfg.eval_every == 0 or step == cfg.steps or out_of_time):
            metrics = {"step": step, "elapsed_s": elapsed, **evaluate(model, tokenizer, val)}
            logfile.write(json.dumps({"eval": metrics}) + "\n")
            log.info("step %d: held-out gIoU %.3f cIoU %.3f (%.0f s)", step, metrics["giou"], metrics["ciou"], elapsed)
        logfile.flush()
        if main and (step % cfg.save_every == 0 or step == cfg.steps or out_of_time):
            _checkpoint(out, net, optimizer, scheduler, step)
        if out_of_time:
            break
    if bar is not None:
        bar.close()
    logfile.close()
    if main and (step >= cfg.steps or out_of_time):  # a run ended by its time limit is finished too (lr at 0)
        _write_artifact(out, cfg, net, model, tokenizer, metrics, step)
    if world > 1:
        import torch.distributed as dist

        dist.barrier()
        dist.destroy_process_group()
    return {"step": step, "rank": rank, "world_size": world, **metrics}


def _write_artifact(out: Path, cfg: FinetuneConfig, net, model: LisaModel, tokenizer: LisaTokenizer,
                    metrics: dict[str, Any], step: int) -> None:
    """The run's product: a peft adapter (LoRA mode) or a whole release (full mode), plus metadata."""
    from model.adapters import adapter_version, data_fingerprint, write_metadata
    from model.checkpoint import resolve_model_dir
    from model.release import save_release

    base_dir = resolve_model_dir(cfg.base)
    if cfg.mode == "full":
        save_release(model, base_dir, out / "model")
        version = f"{out.name}@full"
    else:
        net.save_pretrained(str(out / "adapter"))
        version = adapter_version(out)
    write_metadata(out, base=cfg.base, mode=cfg.mode, version=version, data=cfg.data,
                   data_fingerprint=data_fingerprint(cfg.data), metrics=metrics, steps=step)


def _progress(total: int, initial: int):
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm(total=total, initial=initial, desc="finetune", unit="step")


def _checkpoint(out: Path, net, optimizer, scheduler, step: int) -> None:
    """Resumable state, written to a temporary folder then renamed, so a crash never leaves half a checkpoint."""
    tmp, final = out / "checkpoint.tmp", out / "checkpoint"
    tmp.mkdir(exist_ok=True)
    torch.save({"trainable": _trainable_state(net), "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(), "step": step, "rng": torch.get_rng_state()}, tmp / "state.pt")
    if final.exists():
        import shutil

        shutil.rmtree(final)
    tmp.rename(final)


def _resume(out: Path, net, optimizer, scheduler) -> int:
    state_file = out / "checkpoint" / "state.pt"
    if not state_file.is_file():
        return 0
    state = torch.load(state_file, map_location="cpu", weights_only=False)
    named = dict(net.named_parameters())
    with torch.no_grad():
        for name, value in state["trainable"].items():
            named[name].copy_(value)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["rng"])
    log.info("resumed %s at step %d", out, state["step"])
    return int(state["step"])


def count_steps_per_second(log_path: Path) -> float:
    """Optimizer steps per second in a run's log (for reports)."""
    rows = [json.loads(x) for x in log_path.read_text().splitlines() if '"step"' in x and '"eval"' not in x]
    return rows[-1]["step"] / rows[-1]["elapsed_s"] if rows and rows[-1]["elapsed_s"] else math.nan
