"""The configuration of a fine-tune run, in one dataclass with help text (no torch import: the CLI reads it)."""

from __future__ import annotations

from dataclasses import dataclass, field

from model.data import FALLBACK_VAL_PERCENT


@dataclass
class FinetuneConfig:
    """Everything a fine-tune run needs; stored as ``config.json`` in the run folder."""

    base: str = field(metadata={"help": "LISA checkpoint folder or Hub id to start from"})
    out: str = field(metadata={"help": "run folder: checkpoints, logs, the final artifact"})
    data: list[str] = field(default_factory=lambda: ["synthetic"],
                            metadata={"help": "dataset folders, or 'synthetic' for generated scenes"})
    vision_tower: str | None = field(default=None, metadata={"help": "CLIP override (default: the base's)"})
    mode: str = field(default="lora", metadata={"help": "lora (LISA's recipe) or full (tiny models from scratch)"})
    steps: int = field(default=500, metadata={"help": "optimizer steps"})
    batch_size: int = field(default=2, metadata={"help": "examples per micro-batch"})
    grad_accum: int = field(default=10, metadata={"help": "micro-batches per optimizer step"})
    lr: float = field(default=3e-4, metadata={"help": "peak learning rate (AdamW, betas 0.9/0.95)"})
    warmup_steps: int = field(default=100, metadata={"help": "linear warm-up from 0, then linear decay to 0"})
    lr_scales: dict[str, float] = field(default_factory=dict, metadata={
        "help": "learning-rate multipliers by parameter-name substring, or glob if it holds * ? [, e.g. sam.=3 or "
                "llm.*.[qk]_proj.*=0.3; the first match wins"})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW's decoupled weight decay"})
    weight_decays: dict[str, float] = field(default_factory=dict, metadata={
        "help": "weight decay by parameter name (matched as --lr-scales), e.g. llm.*.[qk]_proj.*=1.0; the first "
                "match wins, the rest get --weight-decay"})
    clip_grad: float = field(default=1.0, metadata={"help": "gradient-norm clipping"})
    lora_r: int = 8
    lora_alpha: int = 16
    lora_dropout: float = 0.05
    train_vision: bool = field(default=False, metadata={"help": "also train CLIP and the SAM image encoder"})
    device: str = field(default="auto", metadata={"help": "cpu, cuda, cuda:N or auto"})
    dtype: str = field(default="auto", metadata={"help": "fp32 or bf16 (auto: bf16 on CUDA, fp32 on CPU)"})
    eval_every: int = field(default=100, metadata={"help": "steps between held-out evaluations"})
    val_fallback_percent: int = field(default=FALLBACK_VAL_PERCENT, metadata={
        "help": "dataset folders without a val split: hold out this share of the training images (at least one) to "
                "evaluate on; 0 trains on all and skips evaluation"})
    eval_examples: int = field(default=200, metadata={"help": "held-out masks per evaluation (synthetic data)"})
    save_every: int = field(default=100, metadata={"help": "steps between resumable checkpoints"})
    plain_template_examples: int = field(default=0, metadata={
        "help": "synthetic data: the first N examples use one fixed question/answer phrasing (a curriculum for "
                "models trained from scratch)"})
    kind_weights: dict[str, float] = field(default_factory=dict, metadata={
        "help": "synthetic data: draw queries by kind (position, size, shape, colour) with these weights, e.g. "
                "colour=4"})
    click_share: float = field(default=0.0, metadata={
        "help": "synthetic data: share of examples that add annotator clicks or a box to the query (refinement)"})
    queries_per_scene: int = field(default=2, metadata={"help": "synthetic data: queries asked of each training scene"})
    time_limit_s: float | None = field(default=None, metadata={"help": "stop (and save) after this many seconds; the "
                                                                      "learning rate then decays to 0 at this time "
                                                                      "or at `steps`, whichever comes first"})
    seed: int = 0
    weights: dict[str, float] = field(default_factory=lambda: {"ce": 1.0, "bce": 2.0, "dice": 0.5},
                                      metadata={"help": "loss weights (LISA: CE 1.0, BCE 2.0, DICE 0.5)"})
