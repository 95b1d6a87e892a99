"""Worker memory for a burst of large images: decode-all-then-encode (before issue 18) vs one image at a time.

A small PNG can hold 62 MP (a flat picture compresses to a few hundred kB, under every byte limit); decoded, each
costs the worker about 0.9 GB on the way to its fixed-size model inputs. Before, ``LisaHandler._encode`` decoded
every image of a batch and only then preprocessed them all, so the peak grew with the burst (7 at once: 791 ->
4457 MB in issue 18). Now each image is decoded, reduced to its CLIP/SAM inputs and dropped before the next.

Each strategy runs in a fresh process on the fixture LISA (CPU), and the peak resident memory above the loaded
worker (``VmHWM`` reset through ``/proc/self/clear_refs``) is printed side by side with the ratio.
Run: ``.venv/bin/python bench/bench_decode_memory.py [--images 7] [--width 9000 --height 6900]``
"""

from __future__ import annotations

import argparse
import io
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from common import status_kb

ROOT = Path(__file__).resolve().parent.parent
FIXTURE = ROOT / "tests" / "fixtures" / "lisa_tiny"



def make_png(width: int, height: int) -> bytes:
    """A flat image with a few shapes: many megapixels, few bytes."""
    from PIL import Image, ImageDraw

    im = Image.new("RGB", (width, height), (240, 240, 235))
    draw = ImageDraw.Draw(im)
    for i in range(5):
        x, y = width * (i + 1) // 7, height * (i % 3 + 1) // 5
        draw.ellipse([x - width // 20, y - height // 20, x + width // 20, y + height // 20], fill=(200, 40 * i, 30))
    out = io.BytesIO()
    im.save(out, "PNG", compress_level=9)
    return out.getvalue()


def child(strategy: str, path: str, images: int) -> None:
    """Load the worker's model, then run one strategy on ``images`` distinct copies of the PNG; print the peak MB
    above the loaded worker of its two stages: decoding (to the model inputs) and the encoder call."""
    from model.inference import LisaPredictor
    from model.preprocess import load_image
    from worker.gpu.handler import LisaHandler

    predictor = LisaPredictor.from_pretrained(str(FIXTURE / "checkpoint"), str(FIXTURE / "clip_tower"))
    base = Path(path).read_bytes()
    blobs = [base + bytes([i]) * (i + 1) for i in range(images)]  # bytes after IEND: same picture, distinct hash
    handler = LisaHandler(predictor, "bench", cache_bytes=1 << 30)
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS: the peak from here on
    start = status_kb("VmRSS")
    if strategy == "decode-all":
        # What _encode did before: every image decoded and kept until the encoder call returned.
        arrays = [load_image(blob) for blob in blobs]
        inputs = [predictor.preprocess(a) for a in arrays]
    else:
        inputs = [handler._preprocess(blob) for blob in blobs]  # what _encode does now, image by image
    decode = status_kb("VmHWM") - start
    Path("/proc/self/clear_refs").write_text("5")
    predictor.encode_batch(inputs)
    encode = status_kb("VmHWM") - start
    print(json.dumps({"decode_mb": decode / 1024, "encode_mb": encode / 1024}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=7)
    parser.add_argument("--width", type=int, default=9000)
    parser.add_argument("--height", type=int, default=6900)
    parser.add_argument("--child", nargs=2, metavar=("STRATEGY", "PNG"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child[0], args.child[1], args.images)
        return
    data = make_png(args.width, args.height)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "big.png"
        path.write_bytes(data)
        peaks = {}
        for strategy in ("decode-all", "one-at-a-time"):
            out = subprocess.run([sys.executable, __file__, "--images", str(args.images), "--child", strategy,
                                  str(path)], capture_output=True, text=True, check=True, cwd=ROOT)
            peaks[strategy] = json.loads(out.stdout.strip().splitlines()[-1])
    mp = args.width * args.height / 1e6
    before, now = peaks["decode-all"], peaks["one-at-a-time"]
    print(f"{args.images} images of {args.width}x{args.height} ({mp:.1f} MP, PNG {len(data) / 1e3:.0f} kB each), "
          "peak RSS above the loaded worker, MB:")
    print(f"  {'':36s} {'decoding':>9s} {'+ encoder call':>15s}")
    print(f"  {'decode all, then encode (before)':36s} {before['decode_mb']:9.0f} {before['encode_mb']:15.0f}")
    print(f"  {'one image at a time (now)':36s} {now['decode_mb']:9.0f} {now['encode_mb']:15.0f}")
    print(f"  {'ratio now/before':36s} {now['decode_mb'] / before['decode_mb']:9.2f} "
          f"{now['encode_mb'] / before['encode_mb']:15.2f}")
    print("  (the encoder's own activations grow with the batch: on a GPU worker they are GPU memory, not RSS)")


if __name__ == "__main__":
    main()
