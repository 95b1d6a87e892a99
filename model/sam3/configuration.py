"""SAM 3 configurations: facts about the released layout, and tiny random geometries for tests.

The released checkpoint (``facebook/sam3``, transformers layout) is one ``Sam3VideoModel``: ``config.json`` has
``model_type: sam3_video`` with a ``detector_config`` (``Sam3Config``: ViT backbone + detector FPN neck, CLIP text
encoder, DETR encoder/decoder, mask decoder) and a ``tracker_config`` (SAM 2-style prompt encoder and mask decoder,
plus video memory modules this project does not use). Its weights are named ``detector_model.*``,
``tracker_neck.*`` (the tracker's own FPN neck on the *same* ViT output) and ``tracker_model.*`` (no vision encoder
of its own). ``Sam3TrackerModel.from_pretrained`` maps ``detector_model.vision_encoder.backbone.*`` to its
``vision_encoder.backbone.*`` and ``tracker_neck.*`` to ``vision_encoder.neck.*``: the tracker shares the
detector's backbone, and only the neck differs.
"""

from __future__ import annotations

from typing import Any

#: ``model_type`` of a full release (detector + tracker) and of a detector-only folder.
FULL_MODEL_TYPE = "sam3_video"
DETECTOR_MODEL_TYPE = "sam3"


def tiny_config_dict(vocab_size: int, *, hidden: int = 32, grid: int = 8, patch: int = 14,
                     num_queries: int = 10, special_tokens: dict[str, int] | None = None) -> dict[str, Any]:
    """A ``Sam3VideoConfig`` keyword dict with SAM 3's structure and toy sizes (a few million parameters).

    ``grid`` is the ViT's patch grid (image side = ``grid * patch`` pixels); the FPN levels are ``4g, 2g, g, g/2``
    as in the release (288, 144, 72, 36 for g = 72), so ``grid`` must be even. ``vocab_size`` must cover the
    tokenizer's ids, and ``special_tokens`` gives its ``bos/eos/pad_token_id`` (CLIP pools at the end token).
    """
    if grid % 2:
        raise ValueError(f"grid must be even (the coarsest FPN level is grid/2), got {grid}")
    image = grid * patch
    small = {"hidden_size": hidden, "num_attention_heads": 2, "intermediate_size": 2 * hidden}
    vit = {"model_type": "sam3_vit_model", **small, "num_hidden_layers": 2, "image_size": image,
           "patch_size": patch, "window_size": grid // 2, "global_attn_indexes": [1], "pretrain_image_size": image}
    vision = {"model_type": "sam3_vision_model", "backbone_config": vit, "fpn_hidden_size": hidden,
              "backbone_feature_sizes": [[4 * grid] * 2, [2 * grid] * 2, [grid] * 2]}
    text = {"model_type": "clip_text_model", "vocab_size": vocab_size, **small, "projection_dim": hidden,
            "num_hidden_layers": 2, "max_position_embeddings": 32, "hidden_act": "gelu", **(special_tokens or {})}
    detector = {
        "vision_config": vision, "text_config": text,
        "geometry_encoder_config": {**small, "num_layers": 1},
        "detr_encoder_config": {**small, "num_layers": 1},
        "detr_decoder_config": {**small, "num_layers": 1, "num_queries": num_queries},
        "mask_decoder_config": {"hidden_size": hidden, "num_attention_heads": 2},
    }
    tracker = {  # its image_size sets the prompt encoder's size and the vision feature sizes (else 1008 px)
        "image_size": image, "vision_config": vision,
        "prompt_encoder_config": {"hidden_size": hidden, "image_size": image, "patch_size": patch},
        "mask_decoder_config": {"hidden_size": hidden, "mlp_dim": 2 * hidden, "num_attention_heads": 2,
                                "iou_head_hidden_dim": hidden},
    }
    return {"detector_config": detector, "tracker_config": tracker}
