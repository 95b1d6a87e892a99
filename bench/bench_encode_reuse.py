"""(c) A second query on an already-encoded image vs the first query on that image.

Real SAM ViT-B image-encoder geometry (random weights: timings do not depend on the values), a small LLM and a
tiny CLIP. The first query pays for CLIP + the SAM encoder + generation + mask decoding; a second query reuses
the cached ``EncodedImage`` and pays only for generation and decoding. Goal: ratio <= 0.10.
Run: ``.venv/bin/python bench/bench_encode_reuse.py``
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import torch

from model.config import LisaConfig
from model.factory import SAM_VIT_B, random_lisa
from model.inference import LisaPredictor
from model.preprocess import load_image, preprocess
from model.tokenizer import LisaTokenizer

ROOT = Path(__file__).resolve().parent.parent
FIXTURE = ROOT / "tests" / "fixtures" / "lisa_tiny"
QUERIES = ["What is the red object in this image? Please output segmentation mask.",
           "Which shape has no corners? Please respond with segmentation mask."]
NEW = 16


def main() -> None:
    torch.set_num_threads(2)
    cfg = LisaConfig(vocab_size=704, hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                     num_attention_heads=4, mm_hidden_size=32, **SAM_VIT_B)
    predictor = LisaPredictor(random_lisa(cfg), LisaTokenizer(FIXTURE / "checkpoint"))
    sam_params = sum(p.numel() for p in predictor.model.sam.image_encoder.parameters())
    image = load_image(FIXTURE / "cases" / "case1.png")
    pre = preprocess(image)  # CPU preprocessing is the same for both; time the model work
    first, second = [], []
    for _ in range(3):
        t0 = time.perf_counter()
        encoded = predictor.encode(pre)
        predictor.segment([(encoded, QUERIES[0])], max_new_tokens=NEW)
        first.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        predictor.segment([(encoded, QUERIES[1])], max_new_tokens=NEW)
        second.append(time.perf_counter() - t0)
    f, s = statistics.median(first), statistics.median(second)
    print(f"SAM ViT-B encoder ({sam_params / 1e6:.1f} M params), embedding cached: {encoded.nbytes / 2**20:.1f} MiB")
    print(f"first query (encode + segment): {f:.2f} s, second query (cached encoding): {s:.3f} s")
    print(f"ratio second / first: {s / f:.3f}  (goal <= 0.10)")


if __name__ == "__main__":
    main()
