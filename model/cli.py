"""``lisa-ls segment``: one image, one query, masks to an .npz (and optionally a PNG)."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

import numpy as np

from model.defaults import DEFAULT_MAX_NEW_TOKENS, MODEL_ENV
from model.errors import LisaError


def add_model_options(parser: argparse.ArgumentParser, default_device: str = "cpu", required: bool = True) -> None:
    """The options that pick and load a model (shared by ``segment``, ``worker`` and ``up``). ``--model``
    defaults to :data:`model.defaults.MODEL_ENV` (``LISA_LS_MODEL``) from the environment."""
    env_model = os.environ.get(MODEL_ENV) or None
    parser.add_argument("--model", required=required and env_model is None, default=env_model,
                        help=f"LISA release folder or Hub id, e.g. xinlai/LISA-7B-v1 (default: ${MODEL_ENV})")
    parser.add_argument("--vision-tower", default=None,
                        help="CLIP folder or Hub id (default: the one named in the checkpoint's config)")
    parser.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default="fp32")
    parser.add_argument("--device", default=default_device, help="cpu, cuda, cuda:N (or auto: CUDA when present)")
    parser.add_argument("--quantize", choices=["8bit", "4bit"], default=None,
                        help="quantize the LLM with bitsandbytes (CUDA only); SAM stays unquantized")


def add_segment_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("segment", help="segment one image with one query (verification and one-off runs)")
    add_model_options(p)
    p.add_argument("--image", required=True, help="image file (EXIF orientation is applied)")
    p.add_argument("--query", required=True, help="what to segment, e.g. 'the food rich in vitamin C', phrased "
                   "for LISA as the worker phrases an annotator's query (model/phrasing.py)")
    p.add_argument("--verbatim", action="store_true", help="put --query to LISA as typed, unphrased")
    p.add_argument("--answer", default=None, help="teacher-forced answer containing [SEG]: no generation")
    p.add_argument("--max-new-tokens", type=int, default=DEFAULT_MAX_NEW_TOKENS)
    p.add_argument("--output", required=True, help="OUT.npz: output_ids, text, mask_logits, masks, scores")
    p.add_argument("--png", default=None, help="also write the union of the masks as a black/white PNG")
    p.set_defaults(func=run_segment)


def run_segment(args: argparse.Namespace) -> int:
    from model.inference import LisaPredictor
    from model.phrasing import question as phrased
    from model.preprocess import load_image

    try:
        question = args.query if args.verbatim else phrased(args.query)
        predictor = LisaPredictor.from_pretrained(args.model, args.vision_tower, args.dtype, args.device,
                                                  args.quantize)
        encoded = predictor.encode(load_image(args.image))
        if args.answer is not None:
            [seg] = predictor.segment_teacher_forced([(encoded, question, args.answer)])
        else:
            [seg] = predictor.segment([(encoded, question)], max_new_tokens=args.max_new_tokens)
    except LisaError as e:
        print(f"lisa-ls segment: {e}", file=sys.stderr)
        return 2
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(out, output_ids=seg.output_ids, text=np.array(seg.text), mask_logits=seg.mask_logits,
                        masks=seg.masks, scores=seg.scores)
    if args.png:
        from PIL import Image

        union = seg.masks.any(axis=0) if len(seg.masks) else np.zeros(encoded.original_hw, dtype=bool)
        Image.fromarray(union.astype(np.uint8) * 255).save(args.png)
    logging.getLogger(__name__).info("answer: %s", seg.text)
    print(f"{len(seg.masks)} mask(s), scores {np.round(seg.scores, 3).tolist()}, answer {seg.text!r} -> {out}")
    return 0
