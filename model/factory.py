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


def tiny_config(vocab_size: int = 704) -> tuple[LisaConfig, CLIPVisionConfig]:
    """The tiny LISA trained from scratch on synthetic scenes (learning proof, offline demo model).

    Same structure as LISA at toy scale: 128 px SAM input (16x16 embedding), a 112 px CLIP with 49 patch tokens,
    a 2-layer LLM of width 128.
    """
    config = LisaConfig(
        vocab_size=vocab_size, hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=512, max_sequence_length=512, mm_hidden_size=64, out_dim=64,
        vision_tower="clip_tower", mm_vision_tower="clip_tower", torch_dtype="float32",
        sam_image_size=128, sam_patch_size=8, sam_encoder_embed_dim=64, sam_encoder_depth=2,
        sam_encoder_num_heads=2, sam_encoder_global_attn_indexes=[1], sam_window_size=8,
        sam_decoder_mlp_dim=256, sam_decoder_num_heads=4, sam_iou_head_hidden_dim=64,
    )
    return config, tiny_clip_config(hidden=64, image_size=112, patch_size=16)


def save_random_tiny(out: str, tokenizer_dir: str, seed: int = 0) -> str:
    """Write an untrained tiny LISA (:func:`tiny_config`) in release format, with ``tokenizer_dir``'s tokenizer."""
    from model.release import save_release
    from model.tokenizer import LisaTokenizer

    config, clip = tiny_config(len(LisaTokenizer(tokenizer_dir)))
    return str(save_release(random_lisa(config, clip, seed), tokenizer_dir, out))
