"""(b) 8 queries segmented as one batch vs one at a time (CPU).

A random LISA with a mid-size LLM (hidden 512, 8 layers), the fixture's tokenizer, a tiny SAM encoder and LISA's
full-size mask decoder; 8 different queries on 2 encoded images, 32 new tokens each (LISA's default). Goal: >= 1.5x.
Run: ``.venv/bin/python bench/bench_batch.py``
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from common import timeit_pair

from model.config import LisaConfig
from model.factory import random_lisa
from model.inference import LisaPredictor
from model.tokenizer import LisaTokenizer

ROOT = Path(__file__).resolve().parent.parent
TOKENIZER = ROOT / "tests" / "fixtures" / "lisa_tiny" / "checkpoint"
QUERIES = [
    "What is the red object in this image? Please output segmentation mask.",
    "Which shape has no corners? Please respond with segmentation mask.",
    "Can you segment the blue square in this image?",
    "Please segment the largest object in this image.",
    "What is the shape that is not a square in this image? Please output segmentation mask.",
    "Can you segment the small green triangle in this image?",
    "The object that looks like a ball. Please respond with segmentation mask.",
    "What is the purple circle in this image? Please output segmentation mask.",
]
NEW = 32  # LISA evaluate()'s default and ours


def build() -> LisaPredictor:
    cfg = LisaConfig(vocab_size=704, hidden_size=512, intermediate_size=1376, num_hidden_layers=8,
                     num_attention_heads=8, mm_hidden_size=32, sam_encoder_embed_dim=32, sam_encoder_depth=2,
                     sam_encoder_num_heads=2, sam_encoder_global_attn_indexes=[1])
    model = random_lisa(cfg)
    tok = LisaTokenizer(TOKENIZER)
    with torch.no_grad():  # make [SEG] likely, as in the fixture, so that masks get decoded too
        model.llm.lm_head.weight[tok.layout.seg_id] *= 2.5
    return LisaPredictor(model, tok)


def main() -> None:
    torch.set_num_threads(2)
    predictor = build()
    rng = np.random.default_rng(0)
    images = [predictor.encode(rng.integers(0, 255, (480, 640, 3), dtype=np.uint8)) for _ in range(2)]
    items = [(images[i % 2], q) for i, q in enumerate(QUERIES)]

    def batched():
        return predictor.segment(items, max_new_tokens=NEW)

    def one_by_one():
        return [predictor.segment([it], max_new_tokens=NEW)[0] for it in items]

    a, b = batched(), one_by_one()
    same = all(x.output_ids.tolist() == y.output_ids.tolist() for x, y in zip(a, b))
    masks = sum(len(x.masks) for x in a)
    t_batch, t_single, _, _ = timeit_pair(batched, one_by_one, repeats=5)
    print(f"8 queries, {NEW} new tokens: batch {t_batch * 1e3:.0f} ms, one at a time {t_single * 1e3:.0f} ms; "
          f"{masks} masks decoded; identical ids: {same}")
    print(f"speed-up (one at a time / batch): {t_single / t_batch:.2f}x  (goal >= 1.5x)")


if __name__ == "__main__":
    main()
