"""The child side of ``bench/bench_real_size.py``: ``lisa-ls`` with timers around LisaPredictor's stages.

    python bench/stage_timers.py force-seg|plain <lisa-ls arguments>

runs ``worker.cli.main`` with timers on load, encode, generate (prefill and per-token steps) and decode, and prints
the timings as one JSON line starting with :data:`MARK` at exit. ``force-seg`` stands a final-layer hidden state in
for one ``[SEG]`` per answer (random weights never generate it; see ``bench/gpu_probe.py``), so the decode stage runs
as for a real answer.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

MARK = "BENCH_JSON "


def proc_status(pid: int | str = "self") -> dict[str, int]:
    """VmRSS / VmHWM / RssAnon / RssFile of a process, in bytes (empty once it is gone)."""
    out = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                name, _, rest = line.partition(":")
                if name in ("VmRSS", "VmHWM", "RssAnon", "RssFile"):
                    out[name] = int(rest.split()[0]) * 1024
    except OSError:
        pass
    return out


def install_stage_timers(timings: dict, force_seg: bool) -> None:
    """Wrap the stages of ``LisaPredictor`` (as the CLI and the worker call them) with timers."""
    import torch
    from transformers.models.llama import modeling_llama

    import model.checkpoint
    import model.inference as inference

    def timed(label, fn):
        """Wall seconds under ``label`` and process CPU seconds (all threads) under ``label`` + ``_cpu``."""

        def wrapper(*args, **kwargs):
            t0, c0 = time.perf_counter(), time.process_time()
            try:
                return fn(*args, **kwargs)
            finally:
                timings[label] = timings.get(label, 0.0) + time.perf_counter() - t0
                timings[label + "_cpu"] = timings.get(label + "_cpu", 0.0) + time.process_time() - c0

        return wrapper

    load = model.checkpoint.load_lisa

    def load_and_record(*args, **kwargs):
        timings["before_load"] = proc_status()
        result = timed("load_s", load)(*args, **kwargs)
        timings["after_load"] = proc_status()
        return result

    model.checkpoint.load_lisa = load_and_record
    inference.LisaPredictor.encode_batch = timed("encode_s", inference.LisaPredictor.encode_batch)
    inference.LisaPredictor._segmentations = timed("decode_s", inference.LisaPredictor._segmentations)
    steps: list[tuple[float, float]] = []
    forward = modeling_llama.LlamaModel.forward

    def timed_forward(*args, **kwargs):
        t0, c0 = time.perf_counter(), time.process_time()
        try:
            return forward(*args, **kwargs)
        finally:
            steps.append((time.perf_counter() - t0, time.process_time() - c0))

    modeling_llama.LlamaModel.forward = timed_forward
    generate = inference.greedy_generate

    def generate_and_record(llm, embeds, *args, **kwargs):
        steps.clear()
        out = timed("generate_s", generate)(llm, embeds, *args, **kwargs)
        if steps:
            timings["prefill_s"], timings["prefill_s_cpu"] = steps[0]
        if len(steps) > 1:
            timings["step_s"] = sum(w for w, _ in steps[1:]) / (len(steps) - 1)
            timings["step_s_cpu"] = sum(c for _, c in steps[1:]) / (len(steps) - 1)
        timings["prompt_positions"] = int(embeds.shape[1])
        timings["new_tokens"] = [len(t) for t in out.tokens]
        return out

    inference.greedy_generate = generate_and_record
    if force_seg:  # random weights never say [SEG]: a final-layer state stands in for one per answer
        from bench.gpu_probe import install_seg_standin

        install_seg_standin()
    timings["threads"] = torch.get_num_threads()


def child(argv: list[str]) -> int:
    """``lisa-ls <argv>`` with stage timers; prints the timings as one JSON line at exit."""
    force = argv[0] == "force-seg"
    timings: dict = {}
    install_stage_timers(timings, force)
    from worker.cli import main

    t0, c0 = time.perf_counter(), time.process_time()
    try:
        rc = main(argv[1:])
    finally:
        timings["cli_s"], timings["cli_s_cpu"] = time.perf_counter() - t0, time.process_time() - c0
        timings["final"] = proc_status()
        print(MARK + json.dumps(timings), flush=True)
    return rc


if __name__ == "__main__":
    sys.exit(child(sys.argv[1:]))
