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
    sam: Sam, image_embeddings: torch.Tensor, prompts: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """SAM's mask decoder (single-mask output) for a batch of prompts, each against its own image embedding.

    Upstream ``MaskDecoder.predict_masks`` takes one image and repeats its embedding per prompt; here the
    embeddings come already gathered per prompt, so the masks of every query of a batch - on any mix of images -
    are decoded in one call. Only mask token 0 is computed (LISA uses ``multimask_output=False``).

    Args:
        image_embeddings: ``N x C x g x g``, the SAM embedding of each prompt's image (C = out_dim).
        prompts: ``N x C`` projected [SEG] embeddings.
    Returns:
        ``(low_res_logits N x 1 x 4g x 4g, iou N)``, in the decoder's dtype.
    """
    dec = sam.mask_decoder
    n, c, h, w = image_embeddings.shape
    dtype = image_embeddings.dtype
    _, dense = sam.prompt_encoder(points=None, boxes=None, masks=None)  # 1 x C x g x g, "no mask" embedding
    pos = sam.prompt_encoder.get_dense_pe().to(dtype).expand(n, -1, -1, -1)
    output_tokens = torch.cat([dec.iou_token.weight, dec.mask_tokens.weight], dim=0).to(dtype)
    tokens = torch.cat([output_tokens.expand(n, -1, -1), prompts[:, None, :].to(dtype)], dim=1)
    hs, src = dec.transformer(image_embeddings + dense.to(dtype), pos, tokens)
    upscaled = dec.output_upscaling(src.transpose(1, 2).reshape(n, c, h, w))  # N x C/8 x 4g x 4g
    hyper = dec.output_hypernetworks_mlps[0](hs[:, 1])  # N x C/8
    low_res = (hyper[:, None, :] @ upscaled.flatten(2)).view(n, 1, *upscaled.shape[-2:])
    iou = dec.iou_prediction_head(hs[:, 0])[:, 0]
    return low_res, iou


def upscale_masks(
    sam: Sam, low_res: torch.Tensor, resized_hw: tuple[int, int], original_hw: tuple[int, int]
) -> torch.Tensor:
    """LISA's ``postprocess_masks`` in float32: ``n x 1 x 256 x 256`` -> ``n x H x W`` logits at the original size."""
    if low_res.shape[0] == 0:
        return low_res.new_zeros((0, *original_hw), dtype=torch.float32)
    return sam.postprocess_masks(low_res.float(), input_size=resized_hw, original_size=original_hw)[:, 0]


def sparse_prompts(
    sam: Sam,
    seg_prompts: torch.Tensor | None,
    points: tuple[torch.Tensor, torch.Tensor] | None = None,
    box: torch.Tensor | None = None,
) -> torch.Tensor:
    """The sparse prompt tokens of one or more masks, concatenated as LISA's prompt encoder does.

    LISA's ``PromptEncoder.forward(points, boxes, masks, text_embeds)`` builds ``[points (+ a not-a-point pad when
    there is no box), box corners, text_embeds]``; upstream SAM builds the first two, so the projected [SEG]
    embeddings are appended to upstream's output.

    Args:
        seg_prompts: ``n x C`` projected [SEG] embeddings (``None`` or ``0 x C``: points/box alone, plain SAM).
        points: ``(coords 1 x P x 2, labels 1 x P)`` in SAM input pixels (x, y); label 1 keeps, 0 removes.
        box: ``1 x 4`` (x0, y0, x1, y1) in SAM input pixels.
    Returns:
        ``n x T x C`` (``n = 1`` without [SEG] prompts): T = P (+1 pad without a box) + 2 (box) + 1 ([SEG]).
    """
    enc = sam.prompt_encoder
    n = 1 if seg_prompts is None or seg_prompts.shape[0] == 0 else seg_prompts.shape[0]
    if points is None and box is None:
        sparse = torch.empty((1, 0, enc.embed_dim), device=enc.point_embeddings[0].weight.device)
    else:
        sparse, _ = enc(points=points, boxes=box, masks=None)  # 1 x T' x C
    sparse = sparse.expand(n, -1, -1)
    if seg_prompts is not None and seg_prompts.shape[0]:
        sparse = torch.cat([sparse, seg_prompts[:, None, :].to(sparse.dtype)], dim=1)
    return sparse


def decode_prompted(
    sam: Sam, image_embedding: torch.Tensor, sparse: torch.Tensor, multimask: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """SAM's mask decoder on one image for ``n`` prompts of any tokens (upstream ``MaskDecoder`` as-is).

    Args:
        image_embedding: ``1 x C x g x g`` (a cached :class:`~model.inference.EncodedImage` embedding).
        sparse: ``n x T x C`` from :func:`sparse_prompts`.
        multimask: SAM's three-mask output (for an ambiguous single click) instead of the single mask LISA uses.
    Returns:
        ``(low_res_logits n x k x 4g x 4g, iou n x k)`` with k = 3 or 1.
    """
    dtype = image_embedding.dtype
    _, dense = sam.prompt_encoder(points=None, boxes=None, masks=None)
    return sam.mask_decoder(
        image_embeddings=image_embedding,
        image_pe=sam.prompt_encoder.get_dense_pe().to(dtype),
        sparse_prompt_embeddings=sparse.to(dtype),
        dense_prompt_embeddings=dense.to(dtype),
        multimask_output=multimask,
    )
