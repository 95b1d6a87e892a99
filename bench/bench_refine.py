"""(i) A refinement click on a cached image vs the text query that produced the mask, through the worker's handler.

Real SAM ViT-B geometry (random weights: timings do not depend on the values), the small LLM and tiny CLIP of
bench_encode_reuse. Three kinds of job, each as the queue hands it to ``worker.gpu.handler.LisaHandler``:

- the text query that produced the mask: the first query on a new image (CLIP + SAM ViT-B encoder + generation
  of 16 tokens + mask decoding);
- the same query kind on the now cached image (generation + decoding), for reference;
- a refine job (2 clicks + the answer's [SEG] prompt): SAM's prompt encoder + mask decoder only.

Goal: the text query that produced the mask costs >= 20x the click. Run: ``.venv/bin/python bench/bench_refine.py``
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import torch

from model.config import LisaConfig
from model.factory import SAM_VIT_B, random_lisa
from model.inference import LisaPredictor
from model.tokenizer import LisaTokenizer
from worker.client.protocol import REFINE, Job, image_hash
from worker.gpu.handler import LisaHandler

ROOT = Path(__file__).resolve().parent.parent
FIXTURE = ROOT / "tests" / "fixtures" / "lisa_tiny"
QUERY = "What is the red object in this image? Please output segmentation mask."
OTHER = "Which shape has no corners? Please respond with segmentation mask."
CLICKS = {"points": [[320.0, 240.0, 0], [100.0, 80.0, 1]], "box": None, "max_new_tokens": 16}
REPEATS = 5


def job(data: bytes, **kw) -> Job:
    j = Job(image=image_hash(data), options={"max_new_tokens": 16, **kw.pop("options", {})}, **kw)
    j.image_bytes = data
    return j


def main() -> None:
    torch.set_num_threads(2)
    cfg = LisaConfig(vocab_size=704, hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                     num_attention_heads=4, mm_hidden_size=32, **SAM_VIT_B)
    predictor = LisaPredictor(random_lisa(cfg), LisaTokenizer(FIXTURE / "checkpoint"))
    data = (FIXTURE / "cases" / "case1.png").read_bytes()
    cold, warm, click = [], [], []
    for i in range(REPEATS + 1):  # the first round warms up allocators and kernels
        handler = LisaHandler(predictor, "bench", cache_bytes=1 << 30)  # an empty cache: a new image
        t0 = time.perf_counter()
        [first] = handler([job(data, query=QUERY)])
        t1 = time.perf_counter()
        [other] = handler([job(data, query=OTHER)])
        t2 = time.perf_counter()
        [refined] = handler([job(data, query=QUERY, kind=REFINE, options=CLICKS)])
        t3 = time.perf_counter()
        assert first.ok and other.ok and refined.ok, (first.error_message, refined.error_message)
        assert handler.cache.misses == 1 and handler.cache.hits == 2  # encoded once; the click reused it
        if i:
            cold.append(t1 - t0)
            warm.append(t2 - t1)
            click.append(t3 - t2)
    c, w, r = (statistics.median(x) for x in (cold, warm, click))
    sam = sum(p.numel() for p in predictor.model.sam.image_encoder.parameters()) / 1e6
    print(f"SAM ViT-B image encoder ({sam:.1f} M params), 1024 px; LLM {cfg.num_hidden_layers} layers x "
          f"{cfg.hidden_size}; medians of {REPEATS} rounds on {torch.get_num_threads()} threads")
    print(f"text query that produced the mask (encode + generate + decode): {c * 1e3:8.1f} ms")
    print(f"another text query on the cached image (generate + decode):    {w * 1e3:8.1f} ms")
    print(f"refinement click on the cached image (SAM prompt enc + decoder): {r * 1e3:8.1f} ms")
    verdict = "MET" if c / r >= 20 else "MISSED"
    print(f"ratio text query / click: {c / r:.1f}x  (goal >= 20x: {verdict}); cached-image query / click: {w / r:.1f}x")


if __name__ == "__main__":
    main()
