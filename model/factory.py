"""Randomly initialised LISA models of any geometry: for benchmarks at real sizes without a download, and as the
starting point of the tiny models trained from scratch."""

from __future__ import annotations

import torch
from transformers import CLIPVisionConfig, CLIPVisionModel

from model.config import LisaConfig
from model.modeling import LisaModel

#: SAM ViT-B image-encoder geometry (segment-anything's ``build_sam_vit_b``).
SAM_VIT_B = {
    "sam_encoder_embed_dim": 768,
    "sam_encoder_depth": 12,
    "sam_encoder_num_heads": 12,
    "sam_encoder_global_attn_indexes": [2, 5, 8, 11],
}


def tiny_clip_config(hidden: int = 32, image_size: int = 224, patch_size: int = 14) -> CLIPVisionConfig:
    """A small CLIP vision tower; 224/14 gives LISA's 256 patch tokens."""
    return CLIPVisionConfig(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
                            num_attention_heads=2, image_size=image_size, patch_size=patch_size,
                            hidden_act="quick_gelu")


def random_lisa(config: LisaConfig, clip_config: CLIPVisionConfig | None = None, seed: int = 0) -> LisaModel:
    """A LISA with random weights (transformers' and segment-anything's default initialisation), in eval mode."""
    clip_config = clip_config or tiny_clip_config(config.mm_hidden_size)
    if clip_config.hidden_size != config.mm_hidden_size:
        raise ValueError(f"CLIP width {clip_config.hidden_size} != mm_hidden_size {config.mm_hidden_size}")
    torch.manual_seed(seed)
    model = LisaModel(config, CLIPVisionModel(clip_config))
    return model.eval().requires_grad_(False)
