"""SAM 3 on the CPU at the released geometry with random weights: seconds per image for encode, concept query, click.

    .venv/bin/python bench/bench_sam3.py                      # Sam3Config defaults: ViT 32 x 1024 at 1008 px
    .venv/bin/python bench/bench_sam3.py --geometry tiny      # the test geometry, seconds: a smoke run

Through :class:`model.sam3.modeling.Sam3Predictor`, the worker's path: ``encode`` (processor + ViT backbone, once
per image), ``find`` (detector neck + CLIP text encoder + DETR encoder/decoder + mask decoder + post-processing
to the image size) and ``click`` (tracker neck + prompt encoder + mask decoder). Prints each median and the
ratios query/encode and click/encode: what a cached encoding saves on every further query or click. Random
weights score about what chance gives, so ``--threshold 0`` (default) keeps every one of the 200 queries' masks:
the post-processing's worst case; ``--threshold 0.5`` shows SAM 3's default, where random weights keep few or none.
No timing is asserted anywhere; numbers depend on the machine and its load.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

PHRASES = ["yellow school bus", "cat", "person on the left", "red car"]
CLICKS = [([(320.0, 240.0, 1)], None), ([(100.0, 100.0, 1), (400.0, 300.0, 0)], None),
          ([], [50.0, 60.0, 300.0, 400.0])]


def timed(fn, *args):
    import torch

    cuda = torch.cuda.is_available() and torch.cuda.is_initialized()
    if cuda:
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    out = fn(*args)
    if cuda:
        torch.cuda.synchronize()
    return time.perf_counter() - t0, out


def run(geometry: str, device: str, dtype: str, images: int, queries: int, clicks: int, threshold: float,
        hw: tuple[int, int] = (480, 640)) -> dict[str, float]:
    """Median seconds of each stage (and their ratios); prints them as they come."""
    import torch

    from model.sam3.tiny import random_predictor

    torch.set_grad_enabled(False)
    build_s, predictor = timed(random_predictor, geometry, device, dtype)
    params = sum(p.numel() for p in predictor.detector.parameters()) / 1e6
    print(f"SAM 3 {geometry} geometry, random weights, {dtype} on {predictor.device}: detector {params:.0f} M "
          f"parameters, input {predictor.detector.config.vision_config.image_size} px; built in {build_s:.1f} s, "
          f"{torch.get_num_threads()} threads", flush=True)
    rng = np.random.default_rng(0)
    enc_t, find_t, click_t, kept = [], [], [], []
    for i in range(images):
        image = rng.integers(0, 256, size=(*hw, 3), dtype=np.uint8)
        t, encoded = timed(predictor.encode, image)
        enc_t.append(t)
        print(f"  image {i}: encode {t:.2f} s ({encoded.nbytes / 1e6:.1f} MB cached)", flush=True)
        for j in range(queries):
            t, found = timed(predictor.find, encoded, PHRASES[j % len(PHRASES)], threshold)
            find_t.append(t)
            kept.append(len(found.scores))
            print(f"    query {PHRASES[j % len(PHRASES)]!r}: {t:.2f} s, {len(found.scores)} instances", flush=True)
        for j in range(clicks):
            points, box = CLICKS[j % len(CLICKS)]
            t, _ = timed(predictor.click, encoded, points, box)
            click_t.append(t)
            print(f"    click {j}: {t:.3f} s", flush=True)
    res = {"encode_s": statistics.median(enc_t), "query_s": statistics.median(find_t) if find_t else float("nan"),
           "click_s": statistics.median(click_t) if click_t else float("nan")}
    res["query_per_encode"] = res["query_s"] / res["encode_s"]
    res["click_per_encode"] = res["click_s"] / res["encode_s"]
    print(f"\nmedian seconds per image ({hw[1]}x{hw[0]}): encode {res['encode_s']:.2f}, concept query "
          f"{res['query_s']:.2f} (threshold {threshold}, {statistics.median(kept) if kept else 0:.0f} instances kept), "
          f"click {res['click_s']:.3f}")
    print(f"ratios: query/encode {res['query_per_encode']:.3f}, click/encode {res['click_per_encode']:.4f}; "
          f"a cold query costs encode + query = {res['encode_s'] + res['query_s']:.2f} s")
    return res


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--geometry", choices=["release", "tiny"], default="release")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default="fp32")
    parser.add_argument("--images", type=int, default=1)
    parser.add_argument("--queries", type=int, default=2, help="concept queries per image")
    parser.add_argument("--clicks", type=int, default=3, help="clicks per image")
    parser.add_argument("--threshold", type=float, default=0.0)
    args = parser.parse_args(argv)
    run(args.geometry, args.device, args.dtype, args.images, args.queries, args.clicks, args.threshold)
    return 0


if __name__ == "__main__":
    sys.exit(main())
