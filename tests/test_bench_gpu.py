"""bench/bench_gpu.py on the CPU with the tiny fixture: every part runs and reports on its own, the stand-in
[SEG] state is a final-layer hidden state, and without CUDA the GPU run is a clean skip."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from conftest import CHECKPOINT, CLIP_TOWER
from redis_fixtures import ROOT

from bench import bench_gpu
from bench.gpu_probe import SEG_STEP, Parts, install_seg_standin
from model.inference import LisaPredictor
from model.prompts import chat_prompt

#: Small enough for 2 shared cores: every part once or twice.
SMOKE = ["--geometry", "tiny", "--device", "cpu", "--allow-cpu", "--repeats", "2", "--cold", "1", "--batches", "2",
         "--batch-repeats", "1", "--max-new-tokens", "4"]


def test_standin_seg_state_is_the_llms_final_layer_state():
    """LISA's [SEG] state is the final-layer, post-norm output that predicted [SEG]; the stand-in is that output at
    the step where "Sure, [SEG]." emits it - not an input embedding."""
    import model.inference as inference

    predictor = LisaPredictor.from_pretrained(str(CHECKPOINT), vision_tower=str(CLIP_TOWER))
    enc = predictor.encode(bench_gpu.bench_images(1)[0])
    ids = predictor.prompt_ids([chat_prompt(bench_gpu.QUERIES[0])], [enc], 4)
    embeds, mask, positions, _ = predictor.model.embed_sequences(ids, [enc.image_features])
    standin = install_seg_standin()
    try:  # seg id -1 never comes: an answer without [SEG], as random weights give
        out = inference.greedy_generate(predictor.model.llm, embeds, mask, positions, 4,
                                        predictor.tokenizer.layout.eos_id, -1)
    finally:
        standin.remove()
    assert inference.greedy_generate is standin._generate
    assert len(standin.recorded()) == 4 and out.seg_states[0].shape == (1, embeds.shape[-1])
    answered = torch.cat([ids[0], torch.as_tensor(out.tokens[0][:SEG_STEP], dtype=torch.long)])
    hidden, _ = predictor.teacher_forced_hidden([answered], [enc.image_features])
    assert torch.allclose(out.seg_states[0][0], hidden[0, -1], atol=1e-4)
    assert not torch.allclose(out.seg_states[0][0], embeds[0, -1], atol=1e-2)  # what stood in before


@pytest.mark.slow
def test_a_failed_first_mode_does_not_stop_the_other_parts(monkeypatch, capsys):
    """The first mode cannot load (a dtype the loader refuses): its error is reported with where it was raised,
    and (a), (b), (c) and the next mode's (d) still run and report, each with its stages."""
    monkeypatch.setitem(bench_gpu.MODES, "fp64", ("fp64", None))
    code = bench_gpu.main([*SMOKE, "--modes", "fp64,fp32,8bit"])
    out = capsys.readouterr().out
    assert code == 1, out  # a part failed
    assert "fp64 (d): FAILED after" in out and "CheckpointError: unknown dtype 'fp64'" in out, out
    assert "model/checkpoint.py:" in out and "in load_lisa" in out, out
    for line in ("(a) warm-cache query (fp32): p50", "(b) cold query (fp32): median", "(c) batch 2 (fp32):",
                 "fp32: first query", "8bit: skipped: bitsandbytes quantization needs CUDA"):
        assert line in out, (line, out)
    assert out.count("stages per query: ") == 2 and "stages per batch: " in out, out
    for stage in ("preprocess", "clip", "sam", "prefill", "step", "decode"):
        assert f"{stage} " in out.split("stages: ", 1)[1], (stage, out)
    assert "per part (s): release 120, fp64 load + query 45" in out
    assert "first error of each failed part:\n  fp64 (d): CheckpointError" in out


def test_parts_run_on_their_own_within_their_budgets(capsys):
    parts = Parts(total_s=100)
    try:
        assert parts.run("one", 10, lambda _d: 1 / 0) is None
        assert parts.run("two", 10, lambda deadline: deadline) is not None
        assert parts.run("three", 300, lambda _d: "never") is None  # less than half its budget is left
    finally:
        parts.stop()
    out = capsys.readouterr().out
    assert parts.outcomes["two"] == "ok" and parts.outcomes["three"].startswith("NOT RUN: ")
    assert parts.errors["one"].startswith("ZeroDivisionError: division by zero (at tests/test_bench_gpu.py:")
    assert "one: FAILED after" in out and "[two: " in out


def test_an_overrunning_part_is_stopped_with_what_was_measured():
    code = (f"import sys, time; sys.path.insert(0, {str(ROOT)!r})\n"
            "from bench.gpu_probe import Parts\n"
            "parts = Parts(total_s=0.5, grace_s=0.5, on_overrun=lambda: print('REPORT SO FAR'))\n"
            "parts.run('fast', 0.5, lambda d: None)\n"
            "parts.run('hung', 0.5, lambda d: time.sleep(60))\n")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30)
    assert run.returncode == 3, run.stdout + run.stderr
    assert "OVER BUDGET: still in part 'hung'" in run.stdout and "REPORT SO FAR" in run.stdout


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA: the bench would really run")
def test_without_cuda_the_gpu_run_is_a_clean_skip():
    run = subprocess.run([sys.executable, str(ROOT / "bench" / "bench_gpu.py")], capture_output=True, text=True,
                         timeout=120)
    assert run.returncode == 0, run.stderr
    assert run.stdout.startswith("SKIP bench_gpu: no CUDA device"), run.stdout
