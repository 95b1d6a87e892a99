"""Brush RLE: ``backend.brush`` vs label-studio-sdk's ``mask2rle`` / ``decode_rle`` on a fragmented 3000×2000 mask.

The mask is random blobs (a 100×150 random field, bilinearly upsampled and thresholded) with 1 % of the pixels
flipped: the hard case for a run-length encoder, since its cost follows the number of runs. Goal: encoding
>= 10x faster than the SDK, with byte-identical output.

The SDK lives in its own interpreter (``LISA_LS_SDK_PYTHON``, else ``.lsvenv/bin/python``), so it is timed there,
in a subprocess, with ``time.perf_counter`` around each call and the same mask loaded from an .npz; ours is timed
in this process the same way. Both report medians after one warm-up call.
Run: ``.venv/bin/python bench/bench_brush.py`` (~30 s, nearly all of it in the SDK).
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image

from backend.brush import mask_to_rle, rle_to_mask

ROOT = Path(__file__).resolve().parent.parent

ENCODE_REPEATS, DECODE_REPEATS = 7, 3

# Runs in the SDK's interpreter: argv = mask .npz, output .json, encode repeats, decode repeats.
_SDK_BENCH = """
import json, statistics, sys, time
import numpy as np
from label_studio_sdk.converter.brush import decode_rle, mask2rle
mask = np.load(sys.argv[1])["mask"]
def timed(fn, repeats):
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)
rle = mask2rle(mask)
result = {"encode_s": timed(lambda: mask2rle(mask), int(sys.argv[3])),
          "decode_s": timed(lambda: decode_rle(rle), int(sys.argv[4])), "rle": rle}
with open(sys.argv[2], "w") as f:
    json.dump(result, f)
"""


def sdk_python() -> str | None:
    env = os.environ.get("LISA_LS_SDK_PYTHON")
    if env:
        return env if os.access(env, os.X_OK) else None
    local = ROOT / ".lsvenv" / "bin" / "python"
    return str(local) if os.access(local, os.X_OK) else None


def fragmented_mask(height: int = 3000, width: int = 2000, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    field = Image.fromarray(rng.random((100, 150)).astype(np.float32))
    blobs = np.asarray(field.resize((width, height), Image.BILINEAR)) > 0.5
    return blobs ^ (rng.random((height, width)) < 0.01)


def timed(fn: Callable[[], object], repeats: int) -> float:
    """Median seconds of ``fn`` over ``repeats`` calls, after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> int:
    python = sdk_python()
    if python is None:
        print("bench_brush: no label-studio-sdk interpreter (set LISA_LS_SDK_PYTHON or build .lsvenv); skipped")
        return 0
    mask = fragmented_mask()
    height, width = mask.shape
    with tempfile.TemporaryDirectory() as tmp:
        np.savez(Path(tmp) / "mask.npz", mask=mask.astype(np.uint8) * 255)
        proc = subprocess.run(
            [python, "-c", _SDK_BENCH, f"{tmp}/mask.npz", f"{tmp}/out.json", str(ENCODE_REPEATS), str(DECODE_REPEATS)],
            capture_output=True,
            text=True,
        )
        if proc.returncode != 0:
            print(f"bench_brush: the SDK run failed:\n{proc.stderr[-4000:]}")
            return 1
        sdk = json.loads((Path(tmp) / "out.json").read_text())

    rle = mask_to_rle(mask)
    ours_encode = timed(lambda: mask_to_rle(mask), ENCODE_REPEATS)
    ours_decode = timed(lambda: rle_to_mask(rle, height, width), ENCODE_REPEATS)
    identical = rle == sdk["rle"]
    round_trip = np.array_equal(rle_to_mask(rle, height, width), mask)
    runs = int(np.count_nonzero(mask.ravel()[1:] != mask.ravel()[:-1])) + 1

    print(f"fragmented {height}x{width} mask: {runs:,} runs, {mask.mean():.0%} foreground, RLE {len(rle):,} bytes")
    print(f"encode: ours {ours_encode * 1e3:.1f} ms, SDK mask2rle {sdk['encode_s'] * 1e3:.1f} ms (medians)")
    print(f"encode speed-up (SDK / ours): {sdk['encode_s'] / ours_encode:.1f}x  (goal >= 10x)")
    print(f"decode: ours {ours_decode * 1e3:.1f} ms, SDK decode_rle {sdk['decode_s'] * 1e3:.1f} ms (medians)")
    print(f"decode speed-up (SDK / ours): {sdk['decode_s'] / ours_decode:.1f}x")
    print(f"byte-identical to the SDK: {identical}; round trip exact: {round_trip}")
    return 0 if identical and round_trip else 1


if __name__ == "__main__":
    sys.exit(main())
