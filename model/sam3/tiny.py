"""Tiny random SAM 3 checkpoints in the released transformers layout, made locally (no download).

``write_tiny_sam3(folder, seed)`` writes what ``facebook/sam3`` holds, at toy sizes: ``config.json``
(``model_type: sam3_video``), ``model.safetensors`` with the release's weight names (``detector_model.*``,
``tracker_model.*``, ``tracker_neck.*``) and the processor files (``processor_config.json``, a CLIP tokenizer made
by :func:`model.sam3.processing.tiny_clip_tokenizer`). The same seed gives the same weights.

The weights are written from ``Sam3VideoModel.state_dict()`` directly: ``Sam3VideoModel.save_pretrained`` in
transformers 5.24 writes the tracker's weights as ``tracker_model.tracker_model.*`` (its weight-renaming rules run
in reverse on save), which neither the release nor ``Sam3TrackerModel.from_pretrained`` uses.

Command line: ``python -m model.sam3.tiny OUT_DIR [--seed N] [--grid G]``.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import torch

from model.sam3.configuration import tiny_config_dict
from model.sam3.processing import tiny_clip_tokenizer

#: Standard deviation of the noise added to every initialised weight.
NOISE = 0.05


def write_tiny_sam3(folder: str | os.PathLike, seed: int = 0, grid: int = 8, hidden: int = 32,
                    num_queries: int = 10) -> Path:
    """Write a tiny random SAM 3 (image side ``grid * 14`` px) into ``folder``; returns the folder."""
    from safetensors.torch import save_file
    from transformers import Sam3ImageProcessor, Sam3Processor, Sam3VideoConfig, Sam3VideoModel

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer = tiny_clip_tokenizer()
    special = {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
               "pad_token_id": tokenizer.pad_token_id}  # CLIP pools its text at the end token
    config = Sam3VideoConfig(**tiny_config_dict(len(tokenizer), hidden=hidden, grid=grid, num_queries=num_queries,
                                                special_tokens=special))
    config.architectures = ["Sam3VideoModel"]
    state = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)
        model = Sam3VideoModel(config)
        # post_init leaves some parameters at zero or one (biases, norms, the "no memory" embedding); give every
        # tensor random values so that tests notice any weight that is dropped or taken from the wrong place
        with torch.no_grad():
            for param in model.parameters():
                param.add_(torch.randn_like(param), alpha=NOISE)
    finally:
        torch.random.set_rng_state(state)
    config.save_pretrained(folder)
    weights = {name: tensor.detach().contiguous() for name, tensor in model.state_dict().items()}
    save_file(weights, str(folder / "model.safetensors"), metadata={"format": "pt"})
    side = grid * 14
    processor = Sam3Processor(image_processor=Sam3ImageProcessor(size={"height": side, "width": side}),
                              tokenizer=tokenizer)
    processor.save_pretrained(folder)
    return folder


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--grid", type=int, default=8)
    args = parser.parse_args(argv)
    print(write_tiny_sam3(args.out, args.seed, args.grid))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())


def random_predictor(geometry: str = "release", device: str = "cpu", dtype: str = "fp32", seed: int = 0):
    """A :class:`~model.sam3.modeling.Sam3Predictor` with random weights, built in memory (benches).

    ``geometry`` ``"release"``: ``Sam3Config``'s defaults, the released model's sizes (ViT 32 x 1024 at 1008 px,
    CLIP text 24 x 1024, DETR 6 + 6 layers, 200 queries); ``"tiny"``: :func:`tiny_config_dict`. The tracker is
    built with a one-layer ViT of its own, which is then replaced by the detector's backbone - as
    ``Sam3Predictor.from_pretrained`` shares it - so that no second 32-layer ViT is ever initialised.
    """
    from transformers import (
        Sam3Config,
        Sam3ImageProcessor,
        Sam3Model,
        Sam3Processor,
        Sam3TrackerConfig,
        Sam3TrackerModel,
        Sam3TrackerProcessor,
    )

    from model.defaults import resolve_device
    from model.sam3.modeling import DTYPES, Sam3Predictor

    tokenizer = tiny_clip_tokenizer()
    if geometry == "release":
        detector_config = Sam3Config()
        tracker_config = Sam3TrackerConfig()
    elif geometry == "tiny":
        special = {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
                   "pad_token_id": tokenizer.pad_token_id}
        parts = tiny_config_dict(len(tokenizer), special_tokens=special)
        detector_config = Sam3Config(**parts["detector_config"])
        tracker_config = Sam3TrackerConfig(**{k: v for k, v in parts["tracker_config"].items() if k != "image_size"})
        tracker_config.prompt_encoder_config.image_size = detector_config.vision_config.image_size
    else:
        raise ValueError(f"geometry must be 'release' or 'tiny', not {geometry!r}")
    tracker_config.vision_config.backbone_config.num_hidden_layers = 1
    tracker_config.vision_config.backbone_config.global_attn_indexes = [0]
    state = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)
        detector = Sam3Model(detector_config)
        tracker = Sam3TrackerModel(tracker_config)
    finally:
        torch.random.set_rng_state(state)
    tracker.vision_encoder.backbone = detector.vision_encoder.backbone
    torch_dtype = DTYPES[dtype]
    device = resolve_device(device)
    detector.to(device, torch_dtype)
    tracker.to(device, torch_dtype)
    side = detector_config.vision_config.image_size
    processor = Sam3Processor(image_processor=Sam3ImageProcessor(size={"height": side, "width": side}),
                              tokenizer=tokenizer)
    return Sam3Predictor(detector, tracker, processor, Sam3TrackerProcessor(image_processor=processor.image_processor),
                         device, torch_dtype)
