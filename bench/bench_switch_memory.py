"""Peak memory of switching a worker to a promoted model: side by side (before issue 16) vs freeing the old first.

Side by side, the new model loads while the old one still serves, so the peak holds both (about 30 GB for LISA-7B
in bf16 on a GPU); freeing first holds one. ``lisa-ls worker --switch auto`` picks side by side only when both fit
(``worker/gpu/switch.py``). Each strategy runs in a fresh process on the CPU: load a worker's handler, then switch to
a copy of the release in another folder (other files, so no page of the old model's weights is shared); printed is
the peak resident memory above the loaded worker (``VmHWM`` reset through ``/proc/self/clear_refs``) and the ratio.
Run: ``.venv/bin/python bench/bench_switch_memory.py [--model DIR --vision-tower DIR]`` (default: the fixture LISA).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from common import status_kb

ROOT = Path(__file__).resolve().parent.parent
FIXTURE = ROOT / "tests" / "fixtures" / "lisa_tiny"



def child(strategy: str, model: str, promoted: str, vision_tower: str) -> None:
    from worker.gpu.handler import load_handler
    from worker.gpu.switch import model_bytes

    handler = load_handler(model, vision_tower, "fp32", "cpu", None, version="old", switch_strategy=strategy)
    size = model_bytes(handler.predictor.model)
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS: the peak from here on
    start = status_kb("VmRSS")
    entry = {"version": "new", "base": promoted, "adapter": None}
    if strategy == "free-first":
        handler._switch_free_first(entry)
    else:
        handler._serve_model(handler._load(entry), entry)
    assert handler.version == "new"
    print(json.dumps({"peak_mb": (status_kb("VmHWM") - start) / 1024, "after_mb": (status_kb("VmRSS") - start) / 1024,
                      "model_mb": size / 2**20}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(FIXTURE / "checkpoint"))
    parser.add_argument("--vision-tower", default=str(FIXTURE / "clip_tower"))
    parser.add_argument("--child", nargs=2, metavar=("STRATEGY", "PROMOTED"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child[0], args.model, args.child[1], args.vision_tower)
        return
    with tempfile.TemporaryDirectory() as tmp:
        promoted = shutil.copytree(args.model, Path(tmp) / "promoted")
        peaks = {}
        for strategy in ("side-by-side", "free-first"):
            out = subprocess.run([sys.executable, __file__, "--model", args.model, "--vision-tower", args.vision_tower,
                                  "--child", strategy, str(promoted)], capture_output=True, text=True, cwd=ROOT)
            if out.returncode:
                raise SystemExit(out.stderr[-3000:])
            peaks[strategy] = json.loads(out.stdout.strip().splitlines()[-1])
    side, free = peaks["side-by-side"], peaks["free-first"]
    print(f"switch to a promoted copy of {args.model} (model {side['model_mb']:.1f} MB in memory, CPU, fp32); "
          "RSS above the loaded worker, MB:")
    print(f"  {'':30s} {'peak':>8s} {'after':>8s}")
    for name, row in (("side by side (before)", side), ("free the old first (now)", free)):
        print(f"  {name:30s} {row['peak_mb']:8.1f} {row['after_mb']:8.1f}")
    print(f"  ratio free-first/side-by-side (peak): {free['peak_mb'] / side['peak_mb']:.2f}")


if __name__ == "__main__":
    main()
