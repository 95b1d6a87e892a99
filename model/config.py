"""LISA's configuration: every field of a released ``config.json`` plus the SAM geometry.

A released LISA ``config.json`` is a LLaVA/LLaMA config (``model_type: "llava"``) with LISA's additions
(``train_mask_decoder``, ``out_dim``...). LISA's code hard-codes SAM ViT-H; we record the SAM geometry in the
config (``sam_*`` fields) so that tiny SAMs work too. When a release has no ``sam_*`` fields, the geometry is
read off the SAM weights (:func:`sam_geometry_from_weights`): nothing is guessed.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from model.errors import CheckpointError

SAM_PREFIX = "model.visual_model."


@dataclass
class LisaConfig:
    """Configuration of a LISA model. Defaults are LISA-7B-v1's."""

    # --- LLaMA geometry (read by transformers' LlamaConfig)
    vocab_size: int = field(default=32004, metadata={"help": "rows of embed_tokens / lm_head"})
    hidden_size: int = field(default=4096, metadata={"help": "LLM width H"})
    intermediate_size: int = field(default=11008, metadata={"help": "LLM MLP width"})
    num_hidden_layers: int = field(default=32, metadata={"help": "LLM decoder layers"})
    num_attention_heads: int = field(default=32, metadata={"help": "LLM attention heads"})
    num_key_value_heads: int | None = field(default=None, metadata={"help": "GQA heads (None: as attention heads)"})
    hidden_act: str = "silu"
    max_position_embeddings: int = field(default=2048, metadata={"help": "context window, image tokens included"})
    max_sequence_length: int = 2048
    rms_norm_eps: float = 1e-6
    rope_scaling: dict[str, Any] | None = None
    rope_theta: float = 10000.0
    initializer_range: float = 0.02
    pretraining_tp: int = 1
    tie_word_embeddings: bool = False
    bos_token_id: int = 1
    eos_token_id: int = 2
    pad_token_id: int = 0
    use_cache: bool = False
    torch_dtype: str = "bfloat16"
    # --- LLaVA multimodal fields
    vision_tower: str = field(default="openai/clip-vit-large-patch14", metadata={"help": "CLIP id or folder"})
    mm_vision_tower: str = "openai/clip-vit-large-patch14"
    mm_hidden_size: int = field(default=1024, metadata={"help": "CLIP width, input of mm_projector"})
    mm_vision_select_layer: int = field(default=-2, metadata={"help": "CLIP hidden_states index used"})
    mm_vision_select_feature: str = "patch"
    mm_use_im_start_end: bool = True
    mm_use_im_patch_token: bool = False
    use_mm_proj: bool = True
    image_aspect_ratio: str = "square"
    image_grid_pinpoints: Any = None
    tune_mm_mlp_adapter: bool = False
    freeze_mm_mlp_adapter: bool = True
    pretrain_mm_mlp_adapter: str | None = None
    # --- LISA additions
    train_mask_decoder: bool = True
    out_dim: int = field(default=256, metadata={"help": "[SEG] projection width = SAM prompt width"})
    # --- bookkeeping written by transformers
    architectures: list[str] = field(default_factory=lambda: ["LISAForCausalLM"])
    model_type: str = "llava"
    transformers_version: str = "4.31.0"
    _name_or_path: str = ""
    # --- SAM geometry (not in LISA's files; ViT-H defaults, or read from the weights)
    sam_image_size: int = field(default=1024, metadata={"help": "SAM input side"})
    sam_patch_size: int = 16
    sam_encoder_embed_dim: int = field(default=1280, metadata={"help": "ViT width (H: 1280, L: 1024, B: 768)"})
    sam_encoder_depth: int = 32
    sam_encoder_num_heads: int = 16
    sam_encoder_global_attn_indexes: list[int] = field(default_factory=lambda: [7, 15, 23, 31])
    sam_window_size: int = 14
    sam_mlp_ratio: float = 4.0
    sam_mask_in_chans: int = 16
    sam_decoder_depth: int = 2
    sam_decoder_mlp_dim: int = 2048
    sam_decoder_num_heads: int = 8
    sam_num_multimask_outputs: int = 3
    sam_iou_head_depth: int = 3
    sam_iou_head_hidden_dim: int = 256
    #: Fields of the file this class does not know, kept so that a merged checkpoint writes them back.
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LisaConfig:
        names = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        known = {k: v for k, v in data.items() if k in names}
        extra = {k: v for k, v in data.items() if k not in names}
        extra.update(data.get("extra", {}))
        return cls(**known, extra=extra)

    @classmethod
    def from_json(cls, path: str | Path) -> LisaConfig:
        try:
            return cls.from_dict(json.loads(Path(path).read_text()))
        except (OSError, json.JSONDecodeError) as e:
            raise CheckpointError(f"{path}: cannot read the model config ({e}).") from e

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data.update(data.pop("extra"))
        return data

    @property
    def sam_embedding_size(self) -> int:
        """Side of the SAM image embedding grid (64 for 1024 / 16)."""
        return self.sam_image_size // self.sam_patch_size

    def llama_config(self):  # -> transformers.LlamaConfig (import kept local: config stays cheap to import)
        """The transformers ``LlamaConfig`` of the language model."""
        from transformers import LlamaConfig

        return LlamaConfig(
            vocab_size=self.vocab_size,
            hidden_size=self.hidden_size,
            intermediate_size=self.intermediate_size,
            num_hidden_layers=self.num_hidden_layers,
            num_attention_heads=self.num_attention_heads,
            num_key_value_heads=self.num_key_value_heads or self.num_attention_heads,
            hidden_act=self.hidden_act,
            max_position_embeddings=self.max_position_embeddings,
            rms_norm_eps=self.rms_norm_eps,
            rope_scaling=self.rope_scaling,
            rope_theta=self.rope_theta,
            initializer_range=self.initializer_range,
            pretraining_tp=self.pretraining_tp,
            tie_word_embeddings=self.tie_word_embeddings,
            bos_token_id=self.bos_token_id,
            eos_token_id=self.eos_token_id,
            pad_token_id=self.pad_token_id,
            attention_bias=False,
            mlp_bias=False,
        )


def sam_geometry_from_weights(shapes: dict[str, torch.Size]) -> dict[str, Any]:
    """Read SAM's geometry off the shapes of its checkpoint tensors.

    Args:
        shapes: tensor shapes keyed by checkpoint name (``model.visual_model.*``).
    Returns:
        the ``sam_*`` fields of :class:`LisaConfig`.
    """
    enc = SAM_PREFIX + "image_encoder."
    try:
        pos = shapes[enc + "pos_embed"]  # [1, S, S, C]
        patch = shapes[enc + "patch_embed.proj.weight"][-1]
        depth = len({k.split(".")[4] for k in shapes if k.startswith(enc + "blocks.")})
        embed_dim = pos[-1]
        grid = pos[1]
        head_dim = shapes[enc + "blocks.0.attn.rel_pos_h"][1]
        global_blocks, window = [], 14
        for i in range(depth):
            span = shapes[f"{enc}blocks.{i}.attn.rel_pos_h"][0]
            if span == 2 * grid - 1:
                global_blocks.append(i)
            else:
                window = (span + 1) // 2
        dec = SAM_PREFIX + "mask_decoder."
        iou_layers = {k.split(".")[5] for k in shapes if k.startswith(dec + "iou_prediction_head.layers.")}
        return {
            "sam_image_size": int(grid * patch),
            "sam_patch_size": int(patch),
            "sam_encoder_embed_dim": int(embed_dim),
            "sam_encoder_depth": depth,
            "sam_encoder_num_heads": int(embed_dim // head_dim),
            "sam_encoder_global_attn_indexes": global_blocks,
            "sam_window_size": int(window),
            "sam_mlp_ratio": shapes[enc + "blocks.0.mlp.lin1.weight"][0] / embed_dim,
            "sam_mask_in_chans": int(shapes[SAM_PREFIX + "prompt_encoder.mask_downscaling.3.weight"][0]),
            "sam_decoder_depth": len({k.split(".")[5] for k in shapes if k.startswith(dec + "transformer.layers.")}),
            "sam_decoder_mlp_dim": int(shapes[dec + "transformer.layers.0.mlp.lin1.weight"][0]),
            "sam_num_multimask_outputs": int(shapes[dec + "mask_tokens.weight"][0]) - 1,
            "sam_iou_head_depth": len(iou_layers),
            "sam_iou_head_hidden_dim": int(shapes[dec + "iou_prediction_head.layers.0.weight"][0]),
        }
    except KeyError as e:
        raise CheckpointError(f"the checkpoint has no SAM weight {e.args[0]!r}: it is not a LISA v1 release") from e
