"""SAM 3's part of ``bench/bench_gpu.py --family sam3``: the released geometry with random weights on one GPU.

Through :class:`model.sam3.modeling.Sam3Predictor` (the worker's path), each part on its own budget
(:class:`bench.gpu_probe.Parts`):

(d) build + load in the first dtype of ``--modes`` that SAM 3 takes (bf16 by default): seconds, weights and peak
    GPU memory;
(a) warm: a concept query (``find``, SAM 3's threshold 0.5) and a click on an already-encoded image, p50 / p95;
(b) cold: a new image, ``encode`` + ``find``: the latency per image;
(c) pre-labelling throughput in images per GPU-hour: a new image per item, encode + one concept query each.

The 8-bit/4-bit modes are LISA's (bitsandbytes on its LLM) and are skipped for SAM 3.
"""

from __future__ import annotations

import statistics
import time

#: Seconds per part (within bench_gpu's --total-s).
BUDGETS = {"load": 150, "warm": 60, "cold": 60, "batch": 90}
#: dtypes SAM 3 runs in, among bench_gpu's modes.
DTYPES = ("bf16", "fp16", "fp32")
PHRASES = ["yellow school bus", "cat", "person on the left", "red car"]


def run(args, parts, bench_images, timer) -> dict:
    """Run every part; returns the figures (also printed as each part ends)."""
    import torch

    from model.sam3.tiny import random_predictor

    cuda = args.device.startswith("cuda")
    dtype = next((m for m in args.mode_list if m in DTYPES), None)
    skipped = [m for m in args.mode_list if m not in DTYPES]
    if skipped:
        print(f"  SAM 3: modes {skipped} skipped (bitsandbytes quantization is LISA's)", flush=True)
    res: dict = {"dtype": dtype}
    if dtype is None:
        print("  SAM 3: no bf16/fp16/fp32 among --modes; nothing to run", flush=True)
        return res
    geometry = "tiny" if args.geometry == "tiny" else "release"
    gb = (lambda f: f() / 1e9) if cuda else (lambda f: None)
    seeds = iter(range(1, 10_000))

    def load(_deadline):
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        t, predictor = timer(random_predictor, geometry, args.device, dtype)
        res["d"] = {"load_s": t, "weights_gb": gb(torch.cuda.memory_allocated)}
        print(f"  SAM 3 {geometry} {dtype}: built in {t:.1f} s" +
              (f", weights {res['d']['weights_gb']:.2f} GB" if cuda else ""), flush=True)
        return predictor

    predictor = parts.run(f"sam3 {dtype} (d)", BUDGETS["load"], load)
    if predictor is None:
        return res

    def warm(deadline):
        [img] = bench_images(1, seed=next(seeds))
        encoded = predictor.encode(img)
        finds, clicks = [], []
        for i in range(args.repeats + 1):
            t, found = timer(predictor.find, encoded, PHRASES[i % len(PHRASES)])
            t_click, clicked = timer(predictor.click, encoded, [(320.0, 240.0, 1)])
            assert clicked.mask.shape == img.shape[:2] and found.masks.shape[1:] == img.shape[:2]
            finds.append(t)
            clicks.append(t_click)
            if time.perf_counter() > deadline and len(finds) >= 3:
                break
        finds, clicks = finds[1:], clicks[1:]  # the first warms kernels
        r = res["a"] = {"find_p50_s": statistics.median(finds), "find_p95_s": _pct(finds, 95),
                        "click_p50_s": statistics.median(clicks), "n": len(finds),
                        "peak_gb": gb(torch.cuda.max_memory_allocated)}
        print(f"  (a) SAM 3 warm ({dtype}): concept query p50 {r['find_p50_s']:.3f} s, p95 {r['find_p95_s']:.3f} s; "
              f"click p50 {r['click_p50_s']:.4f} s over {r['n']}", flush=True)

    def cold(deadline):
        runs = []
        for i, img in enumerate(bench_images(args.cold, seed=next(seeds))):
            t_enc, encoded = timer(predictor.encode, img)
            t_find, _ = timer(predictor.find, encoded, PHRASES[i % len(PHRASES)])
            runs.append((t_enc + t_find, t_enc))
            if time.perf_counter() > deadline:
                break
        r = res["b"] = {"cold_s": statistics.median(c[0] for c in runs),
                        "encode_s": statistics.median(c[1] for c in runs), "n": len(runs)}
        print(f"  (b) SAM 3 cold ({dtype}): {r['cold_s']:.3f} s per image (encode {r['encode_s']:.3f} s) over "
              f"{r['n']} new images", flush=True)

    def batch(deadline):
        images = bench_images(max(args.batches), seed=next(seeds))
        t0, done = time.perf_counter(), 0
        for i, img in enumerate(images):
            predictor.find(predictor.encode(img), PHRASES[i % len(PHRASES)])
            done += 1
            if time.perf_counter() > deadline:
                break
        if cuda:
            torch.cuda.synchronize()
        t = time.perf_counter() - t0
        r = res["c"] = {"images_per_hour": 3600 * done / t, "s_per_image": t / done, "n": done,
                        "peak_gb": gb(torch.cuda.max_memory_allocated)}
        print(f"  (c) SAM 3 pre-label ({dtype}): {r['s_per_image']:.3f} s per image = {r['images_per_hour']:,.0f} "
              f"images/GPU-hour over {done} images" +
              (f", peak {r['peak_gb']:.2f} GB" if cuda else ""), flush=True)

    parts.run(f"(a) sam3 warm ({dtype})", BUDGETS["warm"], warm)
    parts.run(f"(b) sam3 cold ({dtype})", BUDGETS["cold"], cold)
    parts.run(f"(c) sam3 pre-label ({dtype})", BUDGETS["batch"], batch)
    return res


def report(res: dict, parts) -> int:
    """The summary lines; exit code 1 when a part failed."""
    a, b, c, d = res.get("a"), res.get("b"), res.get("c"), res.get("d")
    missing = "FAILED or NOT RUN (see above)"
    rows = [
        ("SAM 3 (a) warm concept query p50 / p95",
         f"{a['find_p50_s']:.3f} / {a['find_p95_s']:.3f} s" if a else missing),
        ("SAM 3 (a) warm click p50", f"{a['click_p50_s']:.4f} s" if a else missing),
        ("SAM 3 (b) latency per new image",
         f"{b['cold_s']:.3f} s (encode {b['encode_s']:.3f} s)" if b else missing),
        ("SAM 3 (c) pre-labelling", f"{c['images_per_hour']:,.0f} images/GPU-hour" if c else missing),
        ("SAM 3 (d) weights / peak GB", f"{d['weights_gb']:.2f} / {(c or a or {}).get('peak_gb') or 0:.2f} GB"
         if d and d.get("weights_gb") is not None else ("CPU: no GPU memory" if d else missing)),
    ]
    width = max(len(r[0]) for r in rows)
    print(f"\nSAM 3 results ({res.get('dtype')}) after {parts.elapsed():.0f} s")
    for name, value in rows:
        print(f"  {name.ljust(width)}  {value}")
    if parts.errors:
        print("first error of each failed part:")
        for name, error in parts.errors.items():
            print(f"  {name}: {error}")
    return 1 if parts.errors else 0


def _pct(values: list[float], q: float) -> float:
    import numpy as np

    return float(np.percentile(np.asarray(values), q))
