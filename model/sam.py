"""Segment Anything, as LISA uses it: built from the config's geometry, prompted with [SEG] embeddings.

LISA modified SAM's prompt encoder to accept ``text_embeds``; upstream ``segment_anything`` needs no change:
the prompt encoder with no points/boxes/masks gives the dense "no mask" embedding, and the projected [SEG]
embeddings are passed directly as the sparse prompt (one token per mask). The SAM keys of a LISA release load
into upstream ``Sam`` strictly once the ``model.visual_model.`` prefix is removed.
"""

from __future__ import annotations

from functools import partial

import torch
from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, Sam, TwoWayTransformer

from model.config import LisaConfig
from model.preprocess import SAM_MEAN, SAM_STD


def build_sam(config: LisaConfig) -> Sam:
    """An (untrained) upstream ``Sam`` with the geometry recorded in ``config``."""
    grid = config.sam_embedding_size
    encoder = ImageEncoderViT(
        depth=config.sam_encoder_depth,
        embed_dim=config.sam_encoder_embed_dim,
        img_size=config.sam_image_size,
        mlp_ratio=config.sam_mlp_ratio,
        norm_layer=partial(torch.nn.LayerNorm, eps=1e-6),
        num_heads=config.sam_encoder_num_heads,
        patch_size=config.sam_patch_size,
        qkv_bias=True,
        use_rel_pos=True,
        global_attn_indexes=tuple(config.sam_encoder_global_attn_indexes),
        window_size=config.sam_window_size,
        out_chans=config.out_dim,
    )
    prompt_encoder = PromptEncoder(
        embed_dim=config.out_dim,
        image_embedding_size=(grid, grid),
        input_image_size=(config.sam_image_size, config.sam_image_size),
        mask_in_chans=config.sam_mask_in_chans,
    )
    decoder = MaskDecoder(
        num_multimask_outputs=config.sam_num_multimask_outputs,
        transformer=TwoWayTransformer(
            depth=config.sam_decoder_depth,
            embedding_dim=config.out_dim,
            mlp_dim=config.sam_decoder_mlp_dim,
            num_heads=config.sam_decoder_num_heads,
        ),
        transformer_dim=config.out_dim,
        iou_head_depth=config.sam_iou_head_depth,
        iou_head_hidden_dim=config.sam_iou_head_hidden_dim,
    )
    return Sam(
        image_encoder=encoder,
        prompt_encoder=prompt_encoder,
        mask_decoder=decoder,
        pixel_mean=list(SAM_MEAN),
        pixel_std=list(SAM_STD),
    )


def decode_masks(
    sam: Sam,
    image_embedding: torch.Tensor,
    prompts: torch.Tensor,
    resized_hw: tuple[int, int],
    original_hw: tuple[int, int],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Run SAM's mask decoder for the [SEG] prompts of one image.

    Args:
        image_embedding: ``1 x C x g x g`` SAM image embedding (C = out_dim, g = 64 for a 1024 input).
        prompts: ``n x C`` projected [SEG] embeddings (n may be 0).
        resized_hw: (h', w') of the un-padded SAM input.
        original_hw: (H, W) the masks are returned at.
    Returns:
        ``(mask_logits n x H x W float32, iou n float32, low_res n x 1 x 256 x 256 float32)``.
    """
    dtype = image_embedding.dtype
    n = prompts.shape[0]
    if n == 0:
        empty = torch.zeros((0, *original_hw), dtype=torch.float32, device=image_embedding.device)
        return empty, torch.zeros(0, device=image_embedding.device), empty.new_zeros((0, 1, 256, 256))
    _, dense = sam.prompt_encoder(points=None, boxes=None, masks=None)
    low_res, iou = sam.mask_decoder(
        image_embeddings=image_embedding,
        image_pe=sam.prompt_encoder.get_dense_pe().to(dtype),
        sparse_prompt_embeddings=prompts[:, None, :].to(dtype),
        dense_prompt_embeddings=dense.to(dtype),
        multimask_output=False,
    )
    low_res = low_res.float()
    logits = sam.postprocess_masks(low_res, input_size=resized_hw, original_size=original_hw)[:, 0]
    return logits, iou[:, 0].float(), low_res
