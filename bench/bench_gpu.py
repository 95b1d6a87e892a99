"""Real-size GPU check, unattended: LISA-7B-v1 geometry with random weights on one CUDA GPU, in at most 8 minutes.

    .venv/bin/python bench/bench_gpu.py                      # makes /tmp/lisa7b (~15 GB) unless it is there
    .venv/bin/python bench/bench_gpu.py --out /data/lisa7b --cleanup
    .venv/bin/python bench/bench_gpu.py --geometry tiny --device cpu --allow-cpu   # smoke run of every part

Measures, through ``model.inference.LisaPredictor`` (the worker's path):

(a) a typed query on an already-encoded image (the worker's warm image cache): ``segment`` p50 / p95;
(b) a cold query: ``encode`` + ``segment`` of an image not seen before (and the process's very first query);
(c) batch pre-labelling throughput in images per GPU-hour at batch 1/4/8/16: a different image per item,
    ``encode_batch`` (preprocessing included) + one batched ``segment``;
(d) peak GPU memory (``torch.cuda.max_memory_allocated``: load + one query) for bf16, fp16, 8-bit and 4-bit
    (bitsandbytes, the loader's ``quantize``; a mode is skipped with a message when bitsandbytes is missing), each
    checked to produce masks of the image's shape.

A lent GPU comes for a few minutes, so every part and mode runs and reports on its own (a failure prints its first
error and where it was raised, and the next part runs; (a)-(c) use the first mode that loads), each has a budget of
seconds printed at the start (:data:`BUDGETS`, within ``--total-s``, 450 by default; a watchdog prints what was
measured and exits 15 s past it), and each prints its stages' seconds and peak GPU memory
(:class:`bench.gpu_probe.StageProbe`) as soon as it is done.

Goals (GB = 1e9 bytes): p50 <= 1.0 s, >= 10,000 images/GPU-hour, bf16 <= 17 GB, 4-bit <= 7 GB.

``--family sam3`` measures SAM 3 instead (:mod:`bench.gpu_sam3`: latency per image, images per GPU-hour, memory).

Random weights never answer with ``[SEG]`` nor stop: every query generates exactly ``--max-new-tokens`` (16)
tokens, more than a real answer ("Sure, [SEG]." and EOS, 6-7 tokens) takes, and a final-layer hidden state - the one
at which "Sure, [SEG]." emits ``[SEG]`` - stands in for one ``[SEG]`` (:func:`bench.gpu_probe.install_seg_standin`),
so that every query decodes one mask, as a real answer does. Without CUDA it prints a skip line, exit 0.
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

from bench.gpu_probe import Parts, StageProbe, install_seg_standin  # noqa: E402 - after the path fix above

FIXTURE = ROOT / "tests" / "fixtures" / "lisa_tiny"
QUERIES = [
    "What is the food rich in vitamin C in this image? Please output segmentation mask.",
    "What is the red object in this image? Please output segmentation mask.",
    "Which object would you use to cut bread? Please output segmentation mask.",
    "Can you segment the person on the left in this image?",
]
GOALS = {"p50_s": 1.0, "images_per_gpu_hour": 10_000, "bf16_gb": 17.0, "4bit_gb": 7.0}
MODES = {"bf16": ("bf16", None), "fp16": ("fp16", None), "8bit": ("fp16", "8bit"), "4bit": ("fp16", "4bit"),
         "fp32": ("fp32", None)}  # fp32: for CPU smoke runs (not among the default modes)
#: Seconds per part (450 in all): the random release, each mode's load + first query, (a), (b), (c) per batch size.
BUDGETS = {"release": 120, "bf16": 55, "fp16": 45, "8bit": 60, "4bit": 60, "warm": 30, "cold": 20,
           "batch": {1: 10, 4: 12, 8: 15, 16: 23}}
DEFAULT_BATCH_BUDGET_S = 15
DEFAULT_MODE_BUDGET_S = 45


def bench_images(n: int, seed: int = 0, hw: tuple[int, int] = (480, 640)) -> list[np.ndarray]:
    """``n`` different RGB images (blocks of random colour, so that PNG-like content is not pure noise)."""
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


class Bench:
    """The parts of one run; results are kept in ``results`` as they come, for the final report."""

    def __init__(self, args, parts: Parts) -> None:
        import torch

        self.args, self.parts, self.torch = args, parts, torch
        self.cuda = args.device.startswith("cuda")
        self.timer = Timer(args.device)
        self.results: dict[str, dict] = {}  # mode -> (d) figures; "a", "b", "c" -> figures of the primary mode
        self.primary: str | None = None
        self._seed = 0

    def images(self, n: int) -> list[np.ndarray]:
        self._seed += 1
        return bench_images(n, seed=self._seed)

    def gb(self, fn) -> float | None:
        return fn() / 1e9 if self.cuda else None

    # ----------------------------------------------------------------------------------------------- (d)
    def load_and_query(self, model_dir: str, clip_dir: str, mode: str, deadline: float):
        """Load in ``mode`` and run one query: (d)'s figures; returns the predictor and its probe."""
        from model.inference import LisaPredictor

        torch, args = self.torch, self.args
        if self.cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        dtype, quantize = MODES[mode]
        load_s, predictor = self.timer(LisaPredictor.from_pretrained, model_dir, clip_dir, dtype=dtype,
                                       device=args.device, quantize=quantize)
        res: dict = {"load_s": load_s, "weights_gb": self.gb(torch.cuda.memory_allocated),
                     "load_peak_gb": self.gb(torch.cuda.max_memory_allocated)}
        self.results[mode] = res
        print(f"  {mode}: loaded in {load_s:.1f} s" + (f", weights {res['weights_gb']:.2f} GB, load peak "
                                                         f"{res['load_peak_gb']:.2f} GB" if self.cuda else ""),
              flush=True)
        probe = StageProbe(predictor)
        [img] = self.images(1)
        enc_s, enc = self.timer(predictor.encode, img)
        seg_s, [seg] = self.timer(predictor.segment, [(enc, QUERIES[0])], max_new_tokens=args.max_new_tokens)
        [tf] = predictor.segment_teacher_forced([(enc, QUERIES[0], "Sure, [SEG].")])
        res.update(first_query_s=enc_s + seg_s, masks=check_masks([seg, tf], [img, img]),
                   new_tokens=len(seg.output_ids))
        if self.cuda:
            res["peak_gb"] = max(res["load_peak_gb"], probe.peak_gb())
        mem = f"; peak {res['peak_gb']:.2f} GB (load + query)" if self.cuda else ""
        print(f"  {mode}: first query {res['first_query_s']:.2f} s (encode {enc_s:.2f} s + segment {seg_s:.2f} s, "
              f"{res['new_tokens']} new tokens){mem}; masks {res['masks']}\n    stages: {probe.summary()}", flush=True)
        return predictor, probe

    # ------------------------------------------------------------------------------------------ (a)-(c)
    def warm(self, predictor, probe: StageProbe, deadline: float) -> None:
        """(a) the image encoded once, each query only generates and decodes."""
        [img] = self.images(1)
        enc = predictor.encode(img)
        times = []
        probe.reset()
        for i in range(self.args.repeats + 1):
            t, _ = self.timer(predictor.segment, [(enc, QUERIES[i % len(QUERIES)])],
                              max_new_tokens=self.args.max_new_tokens)
            times.append(t)
            if i == 0:
                probe.reset()  # the first one warms kernels for this shape
            if time.perf_counter() > deadline and len(times) >= 3:
                break
        timed = times[1:]
        r = self.results["a"] = {"p50_s": pct(timed, 50), "p95_s": pct(timed, 95), "n": len(timed)}
        print(f"  (a) warm-cache query ({self.primary}): p50 {r['p50_s']:.3f} s, p95 {r['p95_s']:.3f} s over "
              f"{r['n']} queries\n    stages per query: {probe.summary(len(timed))}", flush=True)

    def cold(self, predictor, probe: StageProbe, deadline: float) -> None:
        """(b) a new image each time: encode + segment."""
        runs = []
        probe.reset()
        for i, img in enumerate(self.images(self.args.cold)):
            t_enc, e = self.timer(predictor.encode, img)
            t_seg, _ = self.timer(predictor.segment, [(e, QUERIES[i % len(QUERIES)])],
                                  max_new_tokens=self.args.max_new_tokens)
            runs.append((t_enc + t_seg, t_enc))
            if time.perf_counter() > deadline:
                break
        r = self.results["b"] = {"cold_s": statistics.median(c[0] for c in runs),
                                 "encode_s": statistics.median(c[1] for c in runs), "n": len(runs)}
        print(f"  (b) cold query ({self.primary}): median {r['cold_s']:.3f} s (encode {r['encode_s']:.3f} s) over "
              f"{r['n']} new images\n    stages per query: {probe.summary(len(runs))}", flush=True)

    def batch(self, predictor, probe: StageProbe, b: int, deadline: float) -> None:
        """(c) pre-labelling ``b`` new images in one encode + one segment call."""
        times = []
        for r in range(self.args.batch_repeats + 1):
            batch = self.images(b)
            if r <= 1:
                probe.reset()  # the first run of each size warms kernels for that shape: not in the stages
            t, segs = self.timer(prelabel, predictor, batch, self.args.max_new_tokens)
            check_masks(segs, batch)
            times.append(t)
            if time.perf_counter() > deadline:
                break
        timed = times[1:] or times
        t = statistics.median(timed)
        res = {"batch_s": t, "images_per_hour": 3600 * b / t, "peak_gb": probe.peak_gb(), "n": len(timed),
               "warm_only": len(times) == 1}
        self.results.setdefault("c", {})[b] = res
        peak = f", peak {res['peak_gb']:.2f} GB" if self.cuda else ""
        note = " (only the warm-up run fitted the budget)" if res["warm_only"] else ""
        print(f"  (c) batch {b} ({self.primary}): {t:.3f} s per batch = {res['images_per_hour']:,.0f} images/GPU-hour "
              f"over {len(timed)} runs{note}{peak}\n    stages per batch: {probe.summary(len(timed))}", flush=True)

    def primary_parts(self, predictor, probe: StageProbe) -> None:
        """(a), (b) and (c) with the first mode that loaded, each part on its own."""
        self.parts.run(f"(a) warm ({self.primary})", BUDGETS["warm"], lambda d: self.warm(predictor, probe, d))
        self.parts.run(f"(b) cold ({self.primary})", BUDGETS["cold"], lambda d: self.cold(predictor, probe, d))
        for b in self.args.batches:
            self.parts.run(f"(c) batch {b} ({self.primary})", BUDGETS["batch"].get(b, DEFAULT_BATCH_BUDGET_S),
                           lambda d, b=b: self.batch(predictor, probe, b, d))

    def modes(self, model_dir: str, clip_dir: str, modes: list[str]) -> None:
        have_bnb = importlib.util.find_spec("bitsandbytes") is not None
        for mode in modes:
            if MODES[mode][1] and not self.cuda:
                self.parts.outcomes[mode] = "skipped: bitsandbytes quantization needs CUDA"
            elif MODES[mode][1] and not have_bnb:
                self.parts.outcomes[mode] = "skipped: bitsandbytes is not installed (pip install 'lisa-ls[quant]')"
            if mode in self.parts.outcomes:
                print(f"  {mode}: {self.parts.outcomes[mode]}", flush=True)
                continue
            loaded = self.parts.run(f"{mode} (d)", BUDGETS.get(mode, DEFAULT_MODE_BUDGET_S),
                                    lambda d, m=mode: self.load_and_query(model_dir, clip_dir, m, d))
            if loaded is None:  # not loaded, or no answer to its first query: (a)-(c) wait for the next mode
                continue
            if self.primary is None:
                self.primary = mode
                self.primary_parts(*loaded)
            del loaded
            gc.collect()
            if self.cuda:
                self.torch.cuda.empty_cache()


def release(args) -> tuple[str, str, str]:
    if args.geometry == "tiny":
        return str(FIXTURE / "checkpoint"), str(FIXTURE / "clip_tower"), "tests/fixtures/lisa_tiny"
    from bench.make_random_release import make_release

    gen_device = "cuda" if args.device.startswith("cuda") else "cpu"
    t0 = time.perf_counter()
    s = make_release(args.out, args.geometry, device=gen_device)
    print(f"  release {s['model_dir']}: {s['file_bytes'] / 1e9:.2f} GB on disk, ready in "
          f"{time.perf_counter() - t0:.0f} s", flush=True)
    return s["model_dir"], s["clip_dir"], f"{args.geometry} random weights"


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="/tmp/lisa7b", help="scratch folder of the random release (reused)")
    parser.add_argument("--geometry", choices=["7b", "13b", "tiny"], default="7b",
                        help="tiny: the test fixture (tests/fixtures/lisa_tiny), for smoke runs")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--allow-cpu", action="store_true", help="run on the CPU (smoke run; goals are not judged)")
    parser.add_argument("--modes", default="bf16,fp16,8bit,4bit")
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=20, help="timed warm queries for (a), budget permitting")
    parser.add_argument("--cold", type=int, default=3, help="new images for (b), budget permitting")
    parser.add_argument("--batches", default="1,4,8,16")
    parser.add_argument("--batch-repeats", type=int, default=3, help="timed runs per batch size for (c)")
    parser.add_argument("--total-s", type=float, default=450.0, help="the whole run's budget of seconds")
    parser.add_argument("--cleanup", action="store_true", help="delete --out at the end")
    parser.add_argument("--family", choices=["lisa", "sam3"], default="lisa",
                        help="sam3: SAM 3's released geometry, random weights, built in memory (bench/gpu_sam3.py)")
    args = parser.parse_args(argv)
    args.batches = [int(b) for b in args.batches.split(",") if b]
    args.mode_list = [m for m in args.modes.split(",") if m]
    unknown = [m for m in args.mode_list if m not in MODES]
    if unknown:
        parser.error(f"unknown mode(s) {unknown}; choose from {list(MODES)}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    holder: dict = {}
    parts = Parts(args.total_s, on_overrun=lambda: report(holder["bench"]) if "bench" in holder else None)
    import torch

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parts.stop()
        print("SKIP bench_gpu: no CUDA device (torch.cuda.is_available() is False); nothing measured. "
              "Use --device cpu --allow-cpu --geometry tiny for a smoke run.")
        return 0
    if not args.device.startswith("cuda") and not args.allow_cpu:
        parts.stop()
        print(f"SKIP bench_gpu: --device {args.device} is not CUDA; pass --allow-cpu for a smoke run.")
        return 0
    if args.family == "sam3":
        from bench import gpu_sam3

        name = torch.cuda.get_device_name(args.device) if args.device.startswith("cuda") else "CPU"
        print(f"bench_gpu SAM 3 on {name}: budget {args.total_s:.0f} s; per part (s): {gpu_sam3.BUDGETS}", flush=True)
        try:
            res = gpu_sam3.run(args, parts, bench_images, Timer(args.device))
        finally:
            parts.stop()
        return gpu_sam3.report(res, parts)
    bench = holder["bench"] = Bench(args, parts)
    name = torch.cuda.get_device_name(args.device) if bench.cuda else "CPU"
    standin = install_seg_standin()
    mode_budgets = [f"{m} load + query {BUDGETS.get(m, DEFAULT_MODE_BUDGET_S)}" for m in args.mode_list]
    batch_budgets = [f"(c) batch {b} {BUDGETS['batch'].get(b, DEFAULT_BATCH_BUDGET_S)}" for b in args.batches]
    budgets = ", ".join([f"release {BUDGETS['release']}", *mode_budgets, f"(a) {BUDGETS['warm']}",
                         f"(b) {BUDGETS['cold']}", *batch_budgets])
    print(f"bench_gpu on {name}: budget {args.total_s:.0f} s for the run; per part (s): {budgets}", flush=True)
    try:
        made = parts.run("release", BUDGETS["release"], lambda _d: release(args))
        if made is not None:
            model_dir, clip_dir, what = made
            print(f"  {what}: max_new_tokens {args.max_new_tokens} (every query generates all of them), one [SEG] "
                  f"per answer; up to {args.repeats} warm queries, {args.batch_repeats} runs per batch size",
                  flush=True)
            bench.modes(model_dir, clip_dir, args.mode_list)
    finally:
        parts.stop()
        standin.remove()
        if args.cleanup and args.geometry != "tiny":
            shutil.rmtree(args.out, ignore_errors=True)
    return report(bench)


def report(bench: Bench) -> int:
    """The summary: every part's figure or its outcome, and each goal's verdict (GPU runs)."""
    res, cuda, parts = bench.results, bench.cuda, bench.parts
    primary = bench.primary or "-"
    rows = []
    a, b, c = res.get("a"), res.get("b"), res.get("c") or {}
    not_run = "FAILED or NOT RUN (see above)" if bench.primary else "NOT RUN: no mode loaded and answered a query"
    rows.append((f"(a) warm-cache query p50 / p95 ({primary})",
                 f"{a['p50_s']:.3f} / {a['p95_s']:.3f} s" if a else not_run,
                 f"p50 <= {GOALS['p50_s']} s", verdict(a and a["p50_s"], GOALS["p50_s"])))
    rows.append((f"(b) cold query: encode + segment ({primary})",
                 f"{b['cold_s']:.3f} s (encode {b['encode_s']:.3f} s)" if b else not_run, "", ""))
    for size in bench.args.batches:
        t = c.get(size)
        peak = f", peak {t['peak_gb']:.1f} GB" if t and t["peak_gb"] else ""
        rows.append((f"(c) pre-label batch {size}", f"{t['images_per_hour']:,.0f} images/GPU-hour "
                     f"({t['batch_s']:.3f} s per batch{peak})" if t else not_run, "", ""))
    best = max((t["images_per_hour"] for t in c.values()), default=None)
    rows.append(("(c) best throughput", f"{best:,.0f} images/GPU-hour" if best else not_run,
                 f">= {GOALS['images_per_gpu_hour']:,}", verdict(best, GOALS["images_per_gpu_hour"], True)))
    for mode in bench.args.mode_list:
        r = res.get(mode, {})
        goal_key = f"{mode}_gb"
        goal = f"<= {GOALS[goal_key]} GB" if goal_key in GOALS else ""
        outcome = parts.outcomes.get(mode) or parts.outcomes.get(f"{mode} (d)", "NOT RUN")
        if "masks" in r:
            value = (f"{r['peak_gb']:.2f} GB (weights {r['weights_gb']:.2f} GB), masks {r['masks']}" if cuda
                     else f"masks {r['masks']} (CPU: no GPU memory)")
            rows.append((f"(d) peak memory {mode}", value, goal, verdict(r.get("peak_gb"), GOALS[goal_key])
                         if goal else ""))
        else:
            rows.append((f"(d) peak memory {mode}", outcome[:160], goal, "NOT MEASURED" if goal else ""))
    width = max(len(r[0]) for r in rows)
    print(f"\nresults after {parts.elapsed():.0f} s" +
          ("" if cuda else " (CPU smoke run: the goals are GPU goals and are not judged)"))
    for name, value, goal, v in rows:
        tail = f"   goal {goal}: {v}" if goal and cuda else ""
        print(f"  {name.ljust(width)}  {value}{tail}")
    if parts.errors:
        print("first error of each failed part:")
        for name, error in parts.errors.items():
            print(f"  {name}: {error}")
    sys.stdout.flush()
    return 1 if parts.errors else 0


if __name__ == "__main__":
    sys.exit(main())
