"""Fine-tuning machinery on tiny models: release round trip, a few steps that learn, checkpoint and resume."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch
from conftest import CASES, CHECKPOINT, case_image

from model.checkpoint import load_lisa
from model.factory import save_random_tiny
from model.finetune import FinetuneConfig, finetune
from model.inference import LisaPredictor
from model.preprocess import load_image
from model.release import save_release


def test_release_round_trip(tmp_path, tiny_predictor):
    out = save_release(tiny_predictor.model, CHECKPOINT, tmp_path / "rel", max_shard_bytes=2 << 20)
    assert (out / "pytorch_model.bin.index.json").is_file()  # sharded at 2 MB, like a real release
    again = LisaPredictor(*load_lisa(out))
    image = load_image(case_image(1))
    a = tiny_predictor.segment_teacher_forced([(tiny_predictor.encode(image), *CASES[1])])[0]
    b = again.segment_teacher_forced([(again.encode(image), *CASES[1])])[0]
    np.testing.assert_array_equal(a.mask_logits, b.mask_logits)


def test_full_finetune_learns_and_resumes(tmp_path):
    base = save_random_tiny(str(tmp_path / "tiny"), str(CHECKPOINT))
    cfg = FinetuneConfig(base=base, out=str(tmp_path / "run"), mode="full", train_vision=True, steps=6,
                         batch_size=4, grad_accum=1, lr=1e-3, warmup_steps=1, eval_every=6, eval_examples=8,
                         save_every=3, device="cpu")
    torch.manual_seed(0)
    first = finetune(cfg)
    assert first["step"] == 6
    # The reported gIoU is the held-out evaluation of the weights the run wrote (not of something else).
    from model.finetune import evaluate, synthetic_examples

    trained, tok = load_lisa(tmp_path / "run" / "model")
    held_out = synthetic_examples(trained, cfg.seed, val=True)
    assert evaluate(trained, tok, [next(held_out) for _ in range(8)])["giou"] == pytest.approx(first["giou"], abs=1e-6)
    # It learns: on the same batches, a control run at lr 0 (the untrained model) keeps its losses, and both the
    # text (CE) and the mask (BCE) loss of the trained run are clearly below it by steps 5-6 (measured: 0.81-0.85x).
    control = dataclasses.replace(cfg, out=str(tmp_path / "control"), lr=0.0, save_every=100)
    torch.manual_seed(0)
    finetune(control)
    rows = [json.loads(x) for x in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    ctl = [json.loads(x) for x in (tmp_path / "control" / "log.jsonl").read_text().splitlines()]
    losses, still = [r for r in rows if "loss" in r], [r for r in ctl if "loss" in r]
    assert len(losses) == len(still) == 6 and losses[0]["loss"] == pytest.approx(still[0]["loss"])  # same batches
    for ours, theirs in zip(losses[4:], still[4:]):
        for part in ("ce_loss", "mask_bce_loss"):
            assert ours[part] < 0.9 * theirs[part], (part, ours, theirs)
    assert (tmp_path / "run" / "checkpoint" / "state.pt").is_file()
    # Resume: asking for more steps continues from step 6 instead of starting over.
    cfg.steps = 8
    again = finetune(cfg)
    rows = [json.loads(x) for x in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert again["step"] == 8 and [r["step"] for r in rows if "loss" in r][-2:] == [7, 8]


def test_lora_adapter_equals_merged_checkpoint(tmp_path):
    """LISA's recipe on the fixture model: adapter + base in a worker == the merged release folder."""
    import subprocess
    import sys

    from conftest import CLIP_TOWER
    from redis_fixtures import ROOT

    from model.adapters import apply_adapter, read_metadata

    run = tmp_path / "lora"
    cfg = FinetuneConfig(base=str(CHECKPOINT), vision_tower=str(CLIP_TOWER), out=str(run), mode="lora", steps=2,
                         batch_size=1, grad_accum=1, lr=1e-2, warmup_steps=0, eval_every=2, eval_examples=2,
                         device="cpu")
    finetune(cfg)
    assert (run / "adapter" / "adapter_config.json").is_file()
    meta = read_metadata(run)
    assert meta["mode"] == "lora" and meta["base"] == str(CHECKPOINT) and "giou" in meta["metrics"]
    proc = subprocess.run([sys.executable, "-m", "worker.cli", "merge", "--base", str(CHECKPOINT), "--vision-tower",
                           str(CLIP_TOWER), "--adapter", str(run), "--out", str(tmp_path / "merged")],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    base, tok = load_lisa(CHECKPOINT, str(CLIP_TOWER))
    adapted = LisaPredictor(apply_adapter(base, run), tok)
    merged = LisaPredictor(*load_lisa(tmp_path / "merged"))
    untouched = LisaPredictor(*load_lisa(CHECKPOINT, str(CLIP_TOWER)))
    image = load_image(case_image(2))
    a = adapted.segment_teacher_forced([(adapted.encode(image), *CASES[2])])[0]
    b = merged.segment_teacher_forced([(merged.encode(image), *CASES[2])])[0]
    c = untouched.segment_teacher_forced([(untouched.encode(image), *CASES[2])])[0]
    np.testing.assert_allclose(a.mask_logits, b.mask_logits, atol=1e-4)
    assert np.abs(a.mask_logits - c.mask_logits).max() > 1e-3  # the adapter changed the model


def test_two_process_data_parallel_run(tmp_path):
    """`torchrun --nproc_per_node 2` (gloo on CPU here, NCCL on GPUs): both ranks step together; rank 0 writes."""
    import shutil
    import subprocess

    from conftest import CLIP_TOWER
    from redis_fixtures import ROOT

    torchrun = shutil.which("torchrun", path=str(ROOT / ".venv" / "bin")) or shutil.which("torchrun")
    run = tmp_path / "ddp"
    proc = subprocess.run(
        [torchrun or "torchrun", "--standalone", "--nproc_per_node", "2", "-m", "worker.cli", "finetune",
         "--base", str(CHECKPOINT), "--vision-tower", str(CLIP_TOWER), "--data", "synthetic", "--out", str(run),
         "--mode", "lora", "--steps", "2", "--batch-size", "1", "--grad-accum", "1", "--warmup-steps", "0",
         "--eval-every", "2", "--eval-examples", "2", "--device", "cpu"],
        cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    results = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert sorted((r["rank"], r["world_size"], r["step"]) for r in results) == [(0, 2, 2), (1, 2, 2)]
    rows = [json.loads(x) for x in (run / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == [1, 2]  # one log, written by rank 0 only
    assert (run / "adapter" / "adapter_config.json").is_file()


def test_lr_scales_make_parameter_groups(tmp_path):
    from model.finetune import param_groups, trainable_model

    model, _ = load_lisa(save_random_tiny(str(tmp_path / "tiny"), str(CHECKPOINT)))
    cfg = FinetuneConfig(base="unused", out="unused", mode="full", train_vision=True, lr=1e-3,
                         lr_scales={"sam.mask_decoder": 5.0, "sam.": 3.0})
    groups = {g["lr"]: g["params"] for g in param_groups(trainable_model(model, cfg), cfg)}
    named = {id(p): n for n, p in model.named_parameters()}
    assert sorted(groups) == [1e-3, 3e-3, 5e-3]
    assert all(named[id(p)].startswith("sam.mask_decoder.") for p in groups[5e-3])  # first match wins
    assert all(named[id(p)].startswith("sam.image_encoder.") or named[id(p)].startswith("sam.prompt_encoder.")
               for p in groups[3e-3])
    assert not any(named[id(p)].startswith("sam.") for p in groups[1e-3])
    assert sum(len(v) for v in groups.values()) == sum(1 for p in model.parameters() if p.requires_grad)


@pytest.mark.parametrize("option", ["lr_scales", "weight_decays"])
def test_globs_pick_the_llm_query_key_projections(tmp_path, option):
    """A key with a wildcard is a glob over the whole name: the LLM's query/key projections, not CLIP's, get their
    own learning rate (--lr-scales) or weight decay (--weight-decays); the rest keep --lr and --weight-decay."""
    from model.finetune import param_groups, trainable_model

    model, _ = load_lisa(save_random_tiny(str(tmp_path / "tiny"), str(CHECKPOINT)))
    cfg = FinetuneConfig(base="unused", out="unused", mode="full", train_vision=True, lr=1e-3, weight_decay=0.01,
                         **{option: {"llm.*.self_attn.[qk]_proj.*": 0.25}})
    groups = param_groups(trainable_model(model, cfg), cfg)
    key = "lr" if option == "lr_scales" else "weight_decay"
    special = 2.5e-4 if option == "lr_scales" else 0.25
    by_value = {g[key]: g["params"] for g in groups}
    named = {id(p): n for n, p in model.named_parameters()}
    picked = sorted(named[id(p)] for p in by_value[special])
    layers = model.llm.config.num_hidden_layers
    assert len(picked) == 2 * layers and all(n.startswith("llm.model.layers.") for n in picked)
    assert {n.split(".")[-2] for n in picked} == {"q_proj", "k_proj"}
    rest = by_value[1e-3 if option == "lr_scales" else 0.01]
    assert any("vision_tower" in named[id(p)] and "q_proj" in named[id(p)] for p in rest)
    # AdamW applies each group's decay: one step with zero gradients shrinks only the decayed weights.
    for p in model.parameters():
        p.grad = torch.zeros_like(p) if p.requires_grad else None
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    torch.optim.AdamW(groups, lr=1e-3, weight_decay=cfg.weight_decay).step()
    for n, p in model.named_parameters():
        if p.requires_grad and p.abs().sum() > 0:
            g = next(g for g in groups if any(q is p for q in g["params"]))
            expected = before[n] * (1 - g["lr"] * g["weight_decay"])
            assert torch.allclose(p.detach(), expected, rtol=1e-6, atol=1e-9), n


def test_time_limited_run_writes_its_artifact(tmp_path):
    """A run ended by --time-limit-s is finished (its learning rate reached 0): it writes the model like any other."""
    from model.adapters import read_metadata

    base = save_random_tiny(str(tmp_path / "tiny"), str(CHECKPOINT))
    cfg = FinetuneConfig(base=base, out=str(tmp_path / "run"), mode="full", steps=1000, batch_size=2, grad_accum=1,
                         warmup_steps=0, eval_every=1000, eval_examples=4, device="cpu", time_limit_s=0.01)
    result = finetune(cfg)
    assert result["step"] < 1000
    meta = read_metadata(tmp_path / "run")
    assert meta["steps"] == result["step"] and meta["mode"] == "full"
    assert LisaPredictor(*load_lisa(tmp_path / "run" / "model")).model is not None


def test_shared_images_are_encoded_once_with_the_same_result(tiny_predictor):
    """Queries about one image reuse its encodings; the losses equal those of separately encoded copies."""
    import dataclasses

    from model.finetune import synthetic_examples
    from model.training import forward_losses

    model, tok = tiny_predictor.model, tiny_predictor.tokenizer
    stream = synthetic_examples(model, 0, queries_per_scene=3)
    batch = [next(stream) for _ in range(3)]
    assert len({id(ex.image) for ex in batch}) == 1
    copies = [dataclasses.replace(ex, image=dataclasses.replace(ex.image)) for ex in batch]
    calls = []
    hook = model.sam.image_encoder.register_forward_hook(lambda _m, args, _out: calls.append(args[0].shape[0]))
    try:
        shared = forward_losses(model, tok, batch)
        separate = forward_losses(model, tok, copies)
    finally:
        hook.remove()
    assert calls == [1, 3]
    for key in shared:
        torch.testing.assert_close(shared[key], separate[key], rtol=1e-5, atol=1e-6)


def test_kind_weights_draw_queries_by_kind(tiny_predictor):
    """Weights favour a kind; weight 0 never draws it (scenes with nothing else to ask are skipped)."""
    from collections import Counter

    from model.finetune import synthetic_examples
    from model.synthetic import query_kind

    model = tiny_predictor.model

    def kinds(n: int, **options) -> Counter:
        stream = synthetic_examples(model, 0, queries_per_scene=1, **options)
        return Counter(query_kind(next(stream).query) for _ in range(n))

    plain, favoured = kinds(100), kinds(100, kind_weights={"colour": 8})
    assert favoured["colour"] > 1.5 * plain["colour"]
    assert set(kinds(30, kind_weights={"shape": 0, "size": 0, "position": 0})) == {"colour"}


@pytest.mark.slow
def test_two_process_run_stops_together_at_its_time_limit(tmp_path):
    """The time-limit path under `torchrun --nproc_per_node 2` (gloo on CPU): the stop flag is all-reduced on the
    training device, both ranks stop at the same step, rank 0 writes the checkpoint, adapter and metadata."""
    import shutil
    import subprocess

    from conftest import CLIP_TOWER
    from redis_fixtures import ROOT

    from model.adapters import read_metadata

    torchrun = shutil.which("torchrun", path=str(ROOT / ".venv" / "bin")) or shutil.which("torchrun")
    run = tmp_path / "ddp"
    proc = subprocess.run(
        [torchrun or "torchrun", "--standalone", "--nproc_per_node", "2", "-m", "worker.cli", "finetune",
         "--base", str(CHECKPOINT), "--vision-tower", str(CLIP_TOWER), "--data", "synthetic", "--out", str(run),
         "--mode", "lora", "--steps", "1000", "--batch-size", "1", "--grad-accum", "1", "--warmup-steps", "0",
         "--eval-every", "1000", "--eval-examples", "2", "--device", "cpu", "--time-limit-s", "0.01"],
        cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    results = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert sorted(r["rank"] for r in results) == [0, 1]
    steps = {r["step"] for r in results}
    assert len(steps) == 1 and steps.pop() < 1000  # stopped by the clock, both at the same step
    step = results[0]["step"]
    assert [r["step"] for r in map(json.loads, (run / "log.jsonl").read_text().splitlines()) if "loss" in r] == \
        list(range(1, step + 1))
    assert torch.load(run / "checkpoint" / "state.pt", weights_only=False)["step"] == step
    assert (run / "adapter" / "adapter_config.json").is_file()
    meta = read_metadata(run)
    assert meta["steps"] == step and "giou" in meta["metrics"]  # evaluated when the clock stopped it
    # rank 0 says what it wrote; rank 1's result line may come after it (two processes share the pipe)
    wrote = [line for line in proc.stdout.splitlines() if line.startswith("lisa-ls finetune: wrote")]
    assert len(wrote) == 1 and wrote[0].startswith(f"lisa-ls finetune: wrote {run / 'adapter'} after {step} steps"), \
        proc.stdout


def _shots(root, images: int, queries: int = 3):
    """A ReasonSeg-style folder (split by file-name hash, like a small export) of ``images`` red squares."""
    from PIL import Image, ImageDraw

    root.mkdir()
    for i in range(images):
        im = Image.new("RGB", (64, 48), "white")
        box = [8 + 4 * i, 8, 30 + 4 * i, 30]
        ImageDraw.Draw(im).rectangle(box, fill="red")
        im.save(root / f"img{i}.png")
        points = [[box[0], box[1]], [box[2], box[1]], [box[2], box[3]], [box[0], box[3]]]
        (root / f"img{i}.json").write_text(json.dumps({"text": [f"the red square {k}" for k in range(queries)],
                                                       "shapes": [{"label": "target", "points": points}]}))
    return root


def test_data_without_a_val_split_holds_out_images(tmp_path):
    from model.data import load_samples
    from model.finetune import OWN_SPLIT, split_samples

    four = _shots(tmp_path / "shots", 4)
    assert {s.split for s in load_samples(four)} == {"train"}  # what a 4-image export often looks like
    held = split_samples([str(four)])
    assert len(held.val) == 1 and len(held.train) == 3 and "1 of 4 training images" in held.rule
    assert {s.image_path for s in held.val}.isdisjoint({s.image_path for s in held.train})
    assert split_samples([str(four)]).val[0].image_path == held.val[0].image_path  # the same image every time
    assert split_samples([str(four)], 50).val.__len__() == 2
    assert split_samples([str(four)], 0).val == [] and "not evaluated" in split_samples([str(four)], 0).rule
    assert split_samples([str(_shots(tmp_path / "one", 1))]).val == []
    (tmp_path / "val").mkdir()
    for f in ("img0.png", "img0.json"):
        (tmp_path / "val" / f).write_bytes((four / f).read_bytes())
    assert split_samples([str(four), str(tmp_path / "val")]).rule == OWN_SPLIT  # a real val split wins


@pytest.mark.slow
def test_finetune_without_val_split_evaluates_and_says_where_it_wrote(tmp_path, capsys):
    """Issue 22: 4 images, no val split -> one image held out, evaluated at the end, the last line names the
    adapter folder and the held-out gIoU; metadata records the rule."""
    import argparse

    from conftest import CLIP_TOWER

    from model.adapters import read_metadata
    from model.cli_train import add_training_parsers

    parser = argparse.ArgumentParser()
    add_training_parsers(parser.add_subparsers())
    run = tmp_path / "run"
    args = parser.parse_args(["finetune", "--base", str(CHECKPOINT), "--vision-tower", str(CLIP_TOWER), "--data",
                              str(_shots(tmp_path / "shots", 4, queries=2)), "--out", str(run), "--steps", "1",
                              "--batch-size", "1", "--grad-accum", "1", "--warmup-steps", "0", "--device", "cpu"])
    assert args.func(args) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    meta = read_metadata(run)
    assert last.startswith(f"lisa-ls finetune: wrote {run / 'adapter'} after 1 steps; held-out gIoU ")
    assert f"{meta['metrics']['giou']:.3f}" in last and "1 of 4 training images" in last
    assert meta["metrics"]["masks"] == 2 and "1 of 4" in meta["held_out"]


def test_ce_loss_is_the_answer_tokens_cross_entropy():
    """`ce_loss` 0.0 on the demo model is right: it counts the answer "[SEG]." and "</s>", which the demo model
    (trained on exactly that answer) predicts with fp32 probability 1; another answer costs it a positive loss."""
    from redis_fixtures import ROOT

    from model.phrasing import question as _question
    from model.preprocess import preprocess
    from model.tokenizer import IGNORE_INDEX
    from model.training import TrainExample, forward_losses, teacher_forced_forward

    model, tok = load_lisa(ROOT / "models" / "demo")
    pre = preprocess(load_image(case_image(1)), model.clip_size, model.lisa_config.sam_image_size)
    mask = torch.zeros(1, 480, 640, dtype=torch.uint8)
    for answer, zero in (("[SEG].", True), ("Sure, [SEG].", False)):
        example = TrainExample(pre, _question("the red object"), answer, mask)
        with torch.no_grad():
            ce = float(forward_losses(model, tok, [example])["ce_loss"])
            logits, labels, _ = teacher_forced_forward(model, tok, [example])
        targets = labels[0, 1:]
        picked = targets != IGNORE_INDEX
        assert tok.decode(targets[picked].tolist()).replace(" ", "") == answer.replace(" ", "") + "</s>"
        logp = torch.log_softmax(logits[0, :-1].float(), -1)[picked].gather(1, targets[picked, None])
        assert ce == pytest.approx(float(-logp.mean()), abs=1e-6)
        assert (ce == 0.0) is zero
