"""Real-size GPU check, unattended: LISA-7B-v1 geometry with random weights on one CUDA GPU.

    .venv/bin/python bench/bench_gpu.py                      # makes /tmp/lisa7b (~15 GB) unless it is there
    .venv/bin/python bench/bench_gpu.py --out /data/lisa7b --cleanup
    .venv/bin/python bench/bench_gpu.py --geometry tiny --device cpu --allow-cpu   # smoke run of the code paths

Measures, through ``model.inference.LisaPredictor`` (the worker's path):

(a) a typed query on an already-encoded image (the worker's warm image cache): ``segment`` p50 / p95;
(b) a cold query: ``encode`` + ``segment`` of an image not seen before (and the process's very first query);
(c) batch pre-labelling throughput in images per GPU-hour at batch 1/4/8/16: a different image per item,
    ``encode_batch`` (preprocessing included) + one batched ``segment``;
(d) peak GPU memory (``torch.cuda.max_memory_allocated``: load + one query) for bf16, fp16, 8-bit and 4-bit
    (bitsandbytes, the loader's ``quantize``; a mode is skipped with a message when bitsandbytes is missing), each
    checked to produce masks of the image's shape.

Goals (GB = 1e9 bytes): p50 <= 1.0 s, >= 10,000 images/GPU-hour, bf16 <= 17 GB, 4-bit <= 7 GB.

Random weights never answer with ``[SEG]`` nor stop: every query generates exactly ``--max-new-tokens`` (16)
tokens, more than a real answer ("Sure, [SEG]." and EOS, 6-7 tokens) takes, and the state of the last prompt
position stands in for one ``[SEG]`` so that every query decodes one mask, as a real answer does. Timed repeats
are few (``--repeats``, default 20 for (a), 3 per batch size for (c)). Without CUDA it prints a skip line, exit 0.
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import shutil
import statistics
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

FIXTURE = ROOT / "tests" / "fixtures" / "lisa_tiny"
QUERIES = [
    "What is the food rich in vitamin C in this image? Please output segmentation mask.",
    "What is the red object in this image? Please output segmentation mask.",
    "Which object would you use to cut bread? Please output segmentation mask.",
    "Can you segment the person on the left in this image?",
]
GOALS = {"p50_s": 1.0, "images_per_gpu_hour": 10_000, "bf16_gb": 17.0, "4bit_gb": 7.0}
MODES = {"bf16": ("bf16", None), "fp16": ("fp16", None), "8bit": ("fp16", "8bit"), "4bit": ("fp16", "4bit")}


def force_one_seg() -> None:
    """Random weights never generate [SEG]: give every answer one stand-in [SEG] state (the last prompt position's
    embedding), so that each query decodes one mask as a real answer does. Generation itself is unchanged."""
    import model.inference as inference

    generate = inference.greedy_generate
    if getattr(generate, "forced_seg", False):
        return

    def generate_with_seg(llm, embeds, *args, **kwargs):
        out = generate(llm, embeds, *args, **kwargs)
        for b, states in enumerate(out.seg_states):
            if states.shape[0] == 0:
                out.seg_states[b] = embeds[b, -1:].detach().clone()
        return out

    generate_with_seg.forced_seg = True
    inference.greedy_generate = generate_with_seg


def test_images(n: int, seed: int = 0, hw: tuple[int, int] = (480, 640)) -> list[np.ndarray]:
    """``n`` different RGB images (smooth random colour fields, so that PNG-like content is not pure noise)."""
    rng = np.random.default_rng(seed)
    images = []
    for _ in range(n):
        small = rng.integers(0, 256, size=(hw[0] // 32, hw[1] // 32, 3), dtype=np.uint8)
        images.append(np.kron(small, np.ones((32, 32, 1), dtype=np.uint8)))
    return images


class Timer:
    def __init__(self, device: str) -> None:
        import torch

        self.cuda = device.startswith("cuda")
        self.torch = torch

    def __call__(self, fn, *args, **kwargs):
        """(seconds, result) of ``fn``, GPU work included."""
        if self.cuda:
            self.torch.cuda.synchronize()
        t0 = time.perf_counter()
        result = fn(*args, **kwargs)
        if self.cuda:
            self.torch.cuda.synchronize()
        return time.perf_counter() - t0, result


def pct(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q))


def verdict(value: float | None, goal: float, higher_is_better: bool = False) -> str:
    if value is None:
        return "NOT MEASURED"
    ok = value >= goal if higher_is_better else value <= goal
    return "MET" if ok else "MISSED"


def check_masks(segs, images) -> str:
    shapes = [tuple(s.masks.shape) for s in segs]
    for seg, image in zip(segs, images):
        expected = (max(1, seg.masks.shape[0]), *image.shape[:2])
        if seg.masks.shape != expected or seg.mask_logits.dtype != np.float32:
            raise AssertionError(f"mask shape {seg.masks.shape}, expected {expected}")
    return str(shapes[0]) if len(set(shapes)) == 1 else str(shapes)


def prelabel(predictor, images: list[np.ndarray], max_new_tokens: int):
    """What a worker does with a batch of pre-label jobs on new images: one encode call, one segment call."""
    encoded = predictor.encode_batch(images)
    items = [(e, QUERIES[i % len(QUERIES)]) for i, e in enumerate(encoded)]
    return predictor.segment(items, max_new_tokens=max_new_tokens)


def load(model_dir: str, clip_dir: str, mode: str, device: str):
    from model.inference import LisaPredictor

    dtype, quantize = MODES[mode]
    return LisaPredictor.from_pretrained(model_dir, clip_dir, dtype=dtype, device=device, quantize=quantize)


def measure_mode(model_dir: str, clip_dir: str, mode: str, args, timer: Timer, full: bool) -> dict:
    """Load in ``mode``, run one query (memory peak), then (if ``full``) the latency and throughput runs."""
    import torch

    cuda = args.device.startswith("cuda")
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    load_s, predictor = timer(load, model_dir, clip_dir, mode, args.device)
    res: dict = {"load_s": load_s}
    if cuda:
        res["weights_gb"] = torch.cuda.memory_allocated() / 1e9
    images = test_images(1 + 3 + sum(args.batches) * (args.batch_repeats + 1), seed=1)
    img = images.pop()
    first_s, enc = timer(predictor.encode, img)
    seg_s, [seg] = timer(predictor.segment, [(enc, QUERIES[0])], max_new_tokens=args.max_new_tokens)
    res["first_query_s"] = first_s + seg_s
    [tf] = predictor.segment_teacher_forced([(enc, QUERIES[0], "Sure, [SEG].")])
    res["masks"] = check_masks([seg, tf], [img, img])
    res["new_tokens"] = len(seg.output_ids)
    if cuda:
        res["peak_gb"] = torch.cuda.max_memory_allocated() / 1e9
    if full:
        # (a) warm image cache: the image is encoded once, each query only generates and decodes
        warm = []
        for i in range(args.repeats + 1):
            t, _ = timer(predictor.segment, [(enc, QUERIES[i % len(QUERIES)])], max_new_tokens=args.max_new_tokens)
            warm.append(t)
        warm = warm[1:]
        res["warm_p50_s"], res["warm_p95_s"] = pct(warm, 50), pct(warm, 95)
        # (b) cold: a new image each time
        cold = []
        for i in range(3):
            t_enc, e = timer(predictor.encode, images.pop())
            t_seg, _ = timer(predictor.segment, [(e, QUERIES[i % len(QUERIES)])], max_new_tokens=args.max_new_tokens)
            cold.append((t_enc + t_seg, t_enc))
        res["cold_s"] = statistics.median(c[0] for c in cold)
        res["encode_s"] = statistics.median(c[1] for c in cold)
        # (c) batch pre-labelling throughput, a different image per item
        res["throughput"] = {}
        for b in args.batches:
            if cuda:
                torch.cuda.reset_peak_memory_stats()
            times = []
            for r in range(args.batch_repeats + 1):
                batch = [images.pop() for _ in range(b)]

                t, segs = timer(prelabel, predictor, batch, args.max_new_tokens)
                check_masks(segs, batch)
                if r:  # the first run of each size warms kernels for that shape
                    times.append(t)
            t = statistics.median(times)
            res["throughput"][b] = {
                "batch_s": t,
                "images_per_hour": 3600 * b / t,
                "peak_gb": torch.cuda.max_memory_allocated() / 1e9 if cuda else None,
            }
    del predictor, enc
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
    return res


def release(args) -> tuple[str, str, str]:
    if args.geometry == "tiny":
        return str(FIXTURE / "checkpoint"), str(FIXTURE / "clip_tower"), "tests/fixtures/lisa_tiny"
    from bench.make_random_release import make_release

    gen_device = "cuda" if args.device.startswith("cuda") else "cpu"
    t0 = time.perf_counter()
    s = make_release(args.out, args.geometry, device=gen_device)
    print(
        f"release {s['model_dir']}: {s['file_bytes'] / 1e9:.2f} GB on disk, ready in {time.perf_counter() - t0:.0f} s",
        flush=True,
    )
    return s["model_dir"], s["clip_dir"], f"{args.geometry} random weights"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="/tmp/lisa7b", help="scratch folder of the random release (reused)")
    parser.add_argument(
        "--geometry",
        choices=["7b", "13b", "tiny"],
        default="7b",
        help="tiny: the test fixture (tests/fixtures/lisa_tiny), for smoke runs",
    )
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--allow-cpu", action="store_true", help="run on the CPU (smoke run; goals are not judged)")
    parser.add_argument("--modes", default="bf16,fp16,8bit,4bit")
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=20, help="timed warm queries for (a)")
    parser.add_argument("--batches", default="1,4,8,16")
    parser.add_argument("--batch-repeats", type=int, default=3, help="timed runs per batch size for (c)")
    parser.add_argument("--cleanup", action="store_true", help="delete --out at the end")
    args = parser.parse_args(argv)
    args.batches = [int(b) for b in args.batches.split(",")]
    modes = [m for m in args.modes.split(",") if m]

    import torch

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print(
            "SKIP bench_gpu: no CUDA device (torch.cuda.is_available() is False); nothing measured. "
            "Use --device cpu --allow-cpu --geometry tiny for a smoke run."
        )
        return 0
    if not args.device.startswith("cuda") and not args.allow_cpu:
        print(f"SKIP bench_gpu: --device {args.device} is not CUDA; pass --allow-cpu for a smoke run.")
        return 0
    cuda = args.device.startswith("cuda")
    name = torch.cuda.get_device_name(args.device) if cuda else "CPU"
    force_one_seg()
    timer = Timer(args.device)
    model_dir, clip_dir, what = release(args)
    print(
        f"{what} on {name}; max_new_tokens {args.max_new_tokens} (every query generates all of them), "
        f"one [SEG] per answer; {args.repeats} warm queries, {args.batch_repeats} runs per batch size",
        flush=True,
    )

    results: dict[str, dict] = {}
    have_bnb = importlib.util.find_spec("bitsandbytes") is not None
    try:
        for mode in modes:
            if MODES[mode][1] and not cuda:
                print(f"  {mode}: skipped (bitsandbytes quantization needs CUDA)")
                continue
            if MODES[mode][1] and not have_bnb:
                print(f"  {mode}: skipped (bitsandbytes is not installed: pip install 'lisa-ls[quant]')")
                continue
            t0 = time.perf_counter()
            try:
                results[mode] = measure_mode(model_dir, clip_dir, mode, args, timer, full=mode == modes[0])
            except Exception as e:  # report and go on: one broken mode must not hide the others' figures
                print(f"  {mode}: FAILED ({type(e).__name__}: {e})")
                results[mode] = {"error": f"{type(e).__name__}: {e}"}
                continue
            r = results[mode]
            mem = f", weights {r['weights_gb']:.2f} GB, peak {r['peak_gb']:.2f} GB" if cuda else ""
            print(
                f"  {mode}: load {r['load_s']:.1f} s{mem}, first query {r['first_query_s']:.2f} s, "
                f"masks {r['masks']} ({time.perf_counter() - t0:.0f} s)",
                flush=True,
            )
    finally:
        if args.cleanup and args.geometry != "tiny":
            shutil.rmtree(args.out, ignore_errors=True)
    return report(results, modes, cuda)


def report(results: dict, modes: list[str], cuda: bool) -> int:
    first = results.get(modes[0], {}) if modes else {}
    rows = []
    if "warm_p50_s" in first:
        rows.append(
            (
                f"(a) warm-cache query p50 / p95 ({modes[0]})",
                f"{first['warm_p50_s']:.3f} / {first['warm_p95_s']:.3f} s",
                f"p50 <= {GOALS['p50_s']} s",
                verdict(first["warm_p50_s"], GOALS["p50_s"]),
            )
        )
        rows.append(
            (
                "(b) cold query: encode + segment (median of 3)",
                f"{first['cold_s']:.3f} s (encode {first['encode_s']:.3f} s); first of the process "
                f"{first['first_query_s']:.2f} s",
                "",
                "",
            )
        )
        best = max(first["throughput"].values(), key=lambda t: t["images_per_hour"])["images_per_hour"]
        for b, t in first["throughput"].items():
            peak = f", peak {t['peak_gb']:.1f} GB" if t["peak_gb"] else ""
            rows.append(
                (
                    f"(c) pre-label batch {b}",
                    f"{t['images_per_hour']:,.0f} images/GPU-hour ({t['batch_s']:.3f} s per batch{peak})",
                    "",
                    "",
                )
            )
        rows.append(
            (
                "(c) best throughput",
                f"{best:,.0f} images/GPU-hour",
                f">= {GOALS['images_per_gpu_hour']:,}",
                verdict(best, GOALS["images_per_gpu_hour"], True),
            )
        )
    for mode in modes:
        r = results.get(mode)
        goal_key = f"{mode}_gb"
        goal = f"<= {GOALS[goal_key]} GB" if goal_key in GOALS else ""
        if r is None:
            rows.append((f"(d) peak memory {mode}", "skipped", goal, "NOT MEASURED" if goal else ""))
        elif "error" in r:
            rows.append((f"(d) peak memory {mode}", f"FAILED: {r['error'][:80]}", goal, "MISSED" if goal else ""))
        elif cuda:
            rows.append(
                (
                    f"(d) peak memory {mode}",
                    f"{r['peak_gb']:.2f} GB (weights {r['weights_gb']:.2f} GB), masks {r['masks']}",
                    goal,
                    verdict(r["peak_gb"], GOALS[goal_key]) if goal else "",
                )
            )
        else:
            rows.append((f"(d) {mode} (CPU: no GPU memory)", f"masks {r['masks']}", goal, ""))
    width = max(len(r[0]) for r in rows) if rows else 0
    print("\nresults" + ("" if cuda else " (CPU smoke run: the goals are GPU goals and are not judged)"))
    for name, value, goal, v in rows:
        tail = f"   goal {goal}: {v}" if goal and cuda else ""
        print(f"  {name.ljust(width)}  {value}{tail}")
    failed = any("error" in r for r in results.values())
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
