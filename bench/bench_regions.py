"""Instance splitting of a large, fragmented answer: peak memory and answer size, before and after issue 18.

The case of the issue: a 7.7 MP answer (3400 x 2266) whose mask has 343 connected components (discs of 3-60 px
radius) plus 2000 one-pixel specks, split into instances (``LISA_LS_SPLIT_INSTANCES=1``, ``min_area`` 16). Before,
:func:`backend.regions.split_instances` built a full-size boolean mask for every component at once and the answer
held one region per component; now components are labelled once, each region's RLE is encoded from the rows it
spans, and the answer keeps the ``MAX_REGIONS`` largest. "before" is that earlier code, kept below as it was.

Each side runs in a fresh interpreter, so that its peak resident set (``ru_maxrss``) is its own; the RSS left after
the answer was built shows what the process keeps (glibc rarely hands a fragmented heap back).
Run: ``.venv/bin/python bench/bench_regions.py`` (~30 s; the "before" side needs ~2.5 GB of memory).
"""

from __future__ import annotations

import gc
import json
import os
import resource
import subprocess
import sys
import time
import uuid
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
HEIGHT, WIDTH, COMPONENTS, SPECKS, MIN_AREA = 2266, 3400, 343, 2000, 16


def answer_mask() -> np.ndarray:
    """``HEIGHT x WIDTH`` bool: ``COMPONENTS`` separate discs on a jittered grid, and ``SPECKS`` lone pixels."""
    rng = np.random.default_rng(18)
    mask = np.zeros((HEIGHT, WIDTH), bool)
    cols = 22
    rows = -(-COMPONENTS // cols)
    cell_h, cell_w = HEIGHT // rows, WIDTH // cols
    yy, xx = np.ogrid[: 2 * 61, : 2 * 61]
    for i in range(COMPONENTS):
        r = int(rng.integers(3, min(60, cell_h // 2 - 4, cell_w // 2 - 4)))
        cy = (i // cols) * cell_h + cell_h // 2 + int(rng.integers(-3, 4))
        cx = (i % cols) * cell_w + cell_w // 2 + int(rng.integers(-3, 4))
        disc = (yy - 61) ** 2 + (xx - 61) ** 2 <= r * r
        mask[cy - 61 : cy + 61, cx - 61 : cx + 61] |= disc
    # Lone pixels on rows 0 and 2 (the discs start lower), two apart: each its own component.
    spots = rng.choice(WIDTH // 2 * 2, SPECKS, replace=False)
    mask[(spots % 2) * 2, spots // 2 * 2] = True
    return mask


# ---- before: backend/regions.py as it was (full-size mask per component, every component kept) ----

def _before_split_instances(mask: np.ndarray, min_pixels: int = 1) -> list[np.ndarray]:
    from scipy import ndimage

    labels, n = ndimage.label(mask, structure=np.ones((3, 3), dtype=bool))
    if n <= 1:
        return [mask] if mask.sum() >= min_pixels else []
    sizes = np.bincount(labels.ravel())[1:]
    order = [i + 1 for i in np.argsort(-sizes) if sizes[i] >= min_pixels]
    return [labels == i for i in order]


def _before_prediction(masks: np.ndarray, scores: list[float], setup, label: str, version: str, query: str,
                       min_area: int) -> dict:
    from backend.brush import mask_to_rle

    regions = []
    for mask, score in zip(masks, scores):
        for part in _before_split_instances(mask, max(1, min_area)):
            height, width = part.shape
            regions.append({"id": uuid.uuid4().hex[:10], "from_name": setup.brush_name, "to_name": setup.image_name,
                            "type": "brushlabels", "origin": "prediction", "original_width": int(width),
                            "original_height": int(height), "image_rotation": 0,
                            "value": {"format": "rle", "rle": mask_to_rle(part), "brushlabels": [label]},
                            "score": round(float(score), 4), "readonly": False,
                            "meta": {"prompt": query, "model_version": version}})
    return {"result": regions, "score": max((r["score"] for r in regions), default=0.0), "model_version": version}


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def run_side(side: str) -> dict:
    """Build the answer with one side's code in this process; returns its measurements."""
    from backend.labeling import RECOMMENDED_CONFIG, parse_labeling_config
    from backend.regions import prediction

    setup = parse_labeling_config(RECOMMENDED_CONFIG)
    masks = answer_mask()[None]
    gc.collect()
    start_rss = _rss_mb()
    t0 = time.perf_counter()
    if side == "before":
        pred = _before_prediction(masks, [0.9], setup, "Target", "v1", "the dots", MIN_AREA)
    else:
        pred = prediction(masks, [0.9], setup, "Target", "v1", "the dots", split=True, min_area=MIN_AREA,
                          message=True)
    seconds = time.perf_counter() - t0
    body = json.dumps({"results": [pred]}).encode()
    del pred
    gc.collect()
    return {"start_mb": start_rss, "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "after_mb": _rss_mb(), "seconds": seconds, "answer_mb": len(body) / 2**20,
            "regions": body.count(b'"brushlabels", "origin"')}


def main() -> int:
    if len(sys.argv) == 3 and sys.argv[1] == "--side":
        print(json.dumps(run_side(sys.argv[2])))
        return 0
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = {}
    for side in ("before", "after"):
        run = subprocess.run([sys.executable, __file__, "--side", side], env=env, capture_output=True, text=True,
                             check=True)
        out[side] = json.loads(run.stdout.strip().splitlines()[-1])
    print(f"{WIDTH}x{HEIGHT} answer ({WIDTH * HEIGHT / 1e6:.1f} MP), {COMPONENTS} components + {SPECKS} specks, "
          f"split into instances (min_area {MIN_AREA})")
    print(f"{'':24}{'before':>12}{'after':>12}{'ratio':>10}")
    rows = (("RSS at start (MB)", "start_mb"), ("peak RSS (MB)", "peak_mb"), ("RSS after (MB)", "after_mb"),
            ("peak - start (MB)", None), ("answer size (MB)", "answer_mb"), ("regions", "regions"),
            ("time (s)", "seconds"))
    for name, key in rows:
        b, a = ((out[s]["peak_mb"] - out[s]["start_mb"]) if key is None else out[s][key] for s in ("before", "after"))
        print(f"{name:24}{b:12.1f}{a:12.1f}{b / a if a else float('inf'):9.1f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
