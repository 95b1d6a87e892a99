"""The LISA network: LLaMA + CLIP vision tower + linear projector + SAM + the [SEG] projection.

Module names follow LISA's release so that checkpoints map one-to-one (see ``model/checkpoint.py``):

==========================  ==========================================
ours                        LISA release key prefix
==========================  ==========================================
``llm.model.*``             ``model.embed_tokens/layers/norm``
``llm.lm_head``             ``lm_head``
``mm_projector``            ``model.mm_projector``
``sam``                     ``model.visual_model``
``text_hidden_fcs``         ``model.text_hidden_fcs.0``
``vision_tower``            (not in the release: CLIP is loaded from its own id or folder)
==========================  ==========================================

How an image and a prompt become one sequence (LLaVA): the prompt's ids hold the sentinel ``-200`` once, right
after ``<im_start>``; it is replaced by the ``P`` projected CLIP patch features (P = 256 for CLIP ViT-L/14 at
224 px), so the sequence the LLM sees is ``P - 1`` positions longer than the ids.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import CLIPVisionModel, LlamaForCausalLM

from model.config import LisaConfig
from model.sam import build_sam
from model.tokenizer import IMAGE_TOKEN_INDEX


class LisaModel(nn.Module):
    """LISA's modules and the few operations that combine them.

    Args:
        config: the LISA configuration.
        vision_tower: a loaded CLIP vision model whose width is ``config.mm_hidden_size``.
        llm: an already loaded (e.g. quantized) language model; built from the config when omitted.
    """

    def __init__(
        self, config: LisaConfig, vision_tower: CLIPVisionModel | None, llm: LlamaForCausalLM | None = None
    ) -> None:
        super().__init__()
        # Not "config": peft treats a module with a .config.model_type as a transformers model and remaps keys.
        self.lisa_config = config
        self.llm = llm if llm is not None else LlamaForCausalLM(config.llama_config())
        self.vision_tower = vision_tower
        self.mm_projector = nn.Linear(config.mm_hidden_size, config.hidden_size)
        self.sam = build_sam(config)
        self.text_hidden_fcs = nn.Sequential(
            nn.Linear(config.hidden_size, config.hidden_size),
            nn.ReLU(),
            nn.Linear(config.hidden_size, config.out_dim),
            nn.Dropout(0.0),
        )

    # ----------------------------------------------------------------------------------------- image side
    @property
    def llm_dtype(self) -> torch.dtype:
        return self.llm.model.embed_tokens.weight.dtype

    @property
    def sam_dtype(self) -> torch.dtype:
        return self.sam.image_encoder.patch_embed.proj.weight.dtype

    @property
    def clip_size(self) -> int:
        """Input side of the CLIP tower (224 for LISA's ViT-L/14)."""
        return int(self.vision_tower.config.image_size)

    def clip_features(self, clip_pixels: torch.Tensor) -> torch.Tensor:
        """CLIP patch features as LLaVA selects them (layer ``mm_vision_select_layer``, CLS dropped, no post-LN).

        Args:
            clip_pixels: ``B x 3 x 224 x 224``.
        Returns:
            ``B x P x mm_hidden_size``.
        """
        tower = self.vision_tower
        dtype = next(tower.parameters()).dtype
        out = tower(clip_pixels.to(dtype), output_hidden_states=True)
        feats = out.hidden_states[self.lisa_config.mm_vision_select_layer]
        return feats[:, 1:] if self.lisa_config.mm_vision_select_feature == "patch" else feats

    def image_features(self, clip_pixels: torch.Tensor) -> torch.Tensor:
        """Projected CLIP features, ``B x P x H``: the rows that replace the image sentinel."""
        feats = self.clip_features(clip_pixels)
        return self.mm_projector(feats.to(self.mm_projector.weight.dtype))

    def sam_embedding(self, sam_pixels: torch.Tensor) -> torch.Tensor:
        """SAM image embedding. ``B x 3 x 1024 x 1024`` -> ``B x C x 64 x 64`` (C = out_dim)."""
        return self.sam.image_encoder(sam_pixels.to(self.sam_dtype))

    # ------------------------------------------------------------------------------------------ text side
    def embed_sequences(
        self, ids_list: list[torch.Tensor], image_feats: list[torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[int]]:
        """Build a left-padded batch of embedded sequences, each with its image features spliced in.

        Left padding keeps every sequence's last position at the end, so generation appends in step; padded
        positions are masked out and position ids restart at 0 after the padding, so a padded row computes
        the same values as the row alone (up to float noise).

        Args:
            ids_list: per sequence, a 1-D long tensor holding the sentinel -200 exactly once.
            image_feats: per sequence, ``P x H`` projected image features.
        Returns:
            ``(embeds B x T x H, attention_mask B x T long, position_ids B x T long, pad_lengths)``.
        """
        embed = self.llm.model.embed_tokens
        rows = []
        for ids, feats in zip(ids_list, image_feats):
            at = int((ids == IMAGE_TOKEN_INDEX).nonzero()[0, 0])
            ids = ids.to(embed.weight.device)
            rows.append(torch.cat([embed(ids[:at]), feats.to(embed.weight.dtype), embed(ids[at + 1 :])], dim=0))
        longest = max(r.shape[0] for r in rows)
        hidden = rows[0].shape[1]
        device = rows[0].device
        embeds = rows[0].new_zeros((len(rows), longest, hidden))
        mask = torch.zeros((len(rows), longest), dtype=torch.long, device=device)
        pads = []
        for b, r in enumerate(rows):
            pad = longest - r.shape[0]
            embeds[b, pad:] = r
            mask[b, pad:] = 1
            pads.append(pad)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        return embeds, mask, positions, pads

    def project_seg(self, hidden: torch.Tensor) -> torch.Tensor:
        """[SEG] hidden states (``n x H``) -> SAM prompt embeddings (``n x out_dim``)."""
        return self.text_hidden_fcs(hidden.to(self.mm_projector.weight.dtype))
