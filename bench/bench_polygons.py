"""Polygon suggestions (issue 20): masks -> polygons -> masks, on the demo model's answers and on a fragmented mask.

Two sets of masks:

* the demo model's answers (``models/demo``, the mask it proposes for each query of held-out synthetic scenes that
  training never drew, 128 px, asked as the backend phrases a typed query);
* the fragmented 3000x2000 mask of ``bench/bench_brush.py`` (random blobs with 1 % of the pixels flipped: hundreds
  of pieces, ragged outlines, holes).

For each tolerance it converts every mask (``backend.polygons.trace``: the outer outline of each piece), rasterises
the polygons back as Label Studio fills them (``backend.polygons.rasterize``) and prints the IoU with the mask (and
with the mask with its holes filled, which is what polygons without holes can reach), vertices per polygon and the
conversion time per mask, side by side with the brush RLE encoding of the same mask: first converting every
piece, then as the backend answers (pieces of at least ``LISA_LS_MIN_AREA`` pixels, the ``MAX_POLYGONS`` largest).
Goal: IoU >= 0.98 with the holes-filled mask at the default tolerance, converting every piece.
Run: ``.venv/bin/python bench/bench_polygons.py [--scenes N]`` (~2 min on 2 cores).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from bench_brush import fragmented_mask  # noqa: E402
from common import timeit_pair  # noqa: E402
from scipy import ndimage  # noqa: E402

from backend.brush import mask_to_rle  # noqa: E402
from backend.config import BackendConfig  # noqa: E402
from backend.polygons import MAX_POLYGONS, rasterize, trace  # noqa: E402

IOU_GOAL = 0.98
TOLERANCES = (0.0, 0.25, 0.5, 1.0, 2.0)


def demo_masks(scenes: int) -> list[np.ndarray]:
    """The demo model's masks for every query of ``scenes`` held-out scenes (non-empty ones)."""
    from model.finetune import SYNTHETIC_VAL_SEED
    from model.inference import LisaPredictor
    from model.synthetic import make_scene

    predictor = LisaPredictor.from_pretrained(str(ROOT / "models" / "demo"))
    size = predictor.model.lisa_config.sam_image_size
    out = []
    for i in range(scenes):
        scene = make_scene(SYNTHETIC_VAL_SEED + 7919 * i, size=size)
        encoded = predictor.encode(scene.image)
        asked = [(encoded, f"What is {q.phrase} in this image? Please output segmentation mask.")
                 for q in scene.queries]
        for answer in predictor.segment(asked):
            out += [m for m in np.asarray(answer.masks, dtype=bool) if m.any()]
    return out


def iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / max(1, (a | b).sum()))


def measure(masks: list[np.ndarray], tolerance: float, min_area: int, limit: int | None) -> dict[str, float]:
    ious, filled, vertices, pieces, seconds = [], [], [], [], []
    for mask in masks:
        height, width = mask.shape
        t0 = time.perf_counter()
        polygons = trace(mask, tolerance, min_area, limit)
        seconds.append(time.perf_counter() - t0)
        back = rasterize(polygons, width, height)
        ious.append(iou(back, mask))
        filled.append(iou(back, ndimage.binary_fill_holes(mask)))
        vertices += [len(p) for p in polygons]
        pieces.append(len(polygons))
    return {"iou": statistics.mean(ious), "iou_filled": statistics.mean(filled), "filled_min": min(filled),
            "vertices": statistics.mean(vertices), "vertices_max": max(vertices),
            "polygons": statistics.mean(pieces), "ms": 1e3 * statistics.median(seconds)}


def report(name: str, masks: list[np.ndarray], min_area: int, limit: int | None, default: float) -> bool:
    """One table: every tolerance; returns whether the default tolerance meets the IoU goal."""
    kept = "every piece" if limit is None else f"pieces of >= {min_area} px, the {limit} largest (as answered)"
    print(f"\n{name}, {kept}: {len(masks)} mask(s), {masks[0].shape[1]}x{masks[0].shape[0]}")
    print(f"{'tolerance px':>12} {'IoU':>7} {'IoU filled':>10} {'min filled':>10} {'polygons':>9} "
          f"{'vertices/polygon':>17} {'max':>6} {'ms/mask':>8}")
    met = True
    for tolerance in sorted({*TOLERANCES, default}):
        m = measure(masks, tolerance, min_area, limit)
        mark = "  <- default" if tolerance == default else ""
        print(f"{tolerance:>12g} {m['iou']:>7.4f} {m['iou_filled']:>10.4f} {m['filled_min']:>10.4f} "
              f"{m['polygons']:>9.1f} {m['vertices']:>17.1f} {m['vertices_max']:>6d} {m['ms']:>8.1f}{mark}")
        if tolerance == default:
            met = m["iou_filled"] >= IOU_GOAL
    big = max(masks, key=lambda m: m.size)
    polygon_s, brush_s, _, _ = timeit_pair(lambda: trace(big, default, min_area, limit), lambda: mask_to_rle(big),
                                           repeats=3)
    print(f"conversion of the largest mask at the default tolerance: polygons {polygon_s * 1e3:.1f} ms vs brush RLE "
          f"{brush_s * 1e3:.1f} ms ({polygon_s / brush_s:.2f}x)")
    return met


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scenes", type=int, default=100, help="held-out scenes of the demo model")
    args = ap.parse_args()
    config = BackendConfig()
    default, min_area = config.polygon_tolerance, config.min_area
    print(f"default tolerance {default} px (LISA_LS_POLYGON_TOLERANCE), pieces of >= {min_area} px "
          f"(LISA_LS_MIN_AREA), at most {MAX_POLYGONS} polygons per mask")
    demo, fragmented = demo_masks(args.scenes), [fragmented_mask()]
    converted = [report("demo model, held-out scenes", demo, 1, None, default),
                 report("fragmented mask (bench_brush)", fragmented, 1, None, default)]
    report("demo model, held-out scenes", demo, min_area, MAX_POLYGONS, default)
    report("fragmented mask (bench_brush)", fragmented, min_area, MAX_POLYGONS, default)
    print(f"\nconversion (every piece): IoU with the holes-filled mask >= {IOU_GOAL} at the default tolerance: "
          f"{'MET' if all(converted) else 'NOT MET'} (demo, fragmented: {converted})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
