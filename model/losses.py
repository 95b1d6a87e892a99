"""LISA's training losses: ``loss = 1.0 * CE + 2.0 * BCE + 0.5 * DICE`` (weights are LISA's ``train_ds.py`` defaults).

* CE: next-token cross-entropy over the labelled tokens (the answer and ``</s>``), averaged over all of them in the
  batch.
* BCE and DICE: per mask at the original image size, then averaged over every mask of the batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from model.tokenizer import IGNORE_INDEX


@dataclass(frozen=True)
class LossWeights:
    ce: float = 1.0
    bce: float = 2.0
    dice: float = 0.5


DEFAULT_WEIGHTS = LossWeights()


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Shifted cross-entropy. ``logits``: ``B x T x V``; ``labels``: ``B x T``, ``IGNORE_INDEX`` where unlabelled."""
    shifted = logits[:, :-1].reshape(-1, logits.shape[-1]).float()
    targets = labels[:, 1:].reshape(-1)
    if not (targets != IGNORE_INDEX).any():
        return logits.sum() * 0.0  # keeps the graph: a batch with no answer tokens contributes nothing
    return F.cross_entropy(shifted, targets, ignore_index=IGNORE_INDEX)


def mask_bce_sum(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Sum over masks of the per-pixel mean BCE. ``logits``, ``target``: ``n x H x W`` (target 0/1)."""
    loss = F.binary_cross_entropy_with_logits(logits.float(), target.float(), reduction="none")
    return loss.flatten(1).mean(1).sum()


def mask_dice_sum(logits: torch.Tensor, target: torch.Tensor, scale: float = 1000.0, eps: float = 1e-6) -> torch.Tensor:
    """Sum over masks of ``1 - dice`` on the sigmoid; sums are divided by ``scale`` as LISA does (no overflow)."""
    probs = logits.float().sigmoid().flatten(1)
    target = target.float().flatten(1)
    numerator = 2 * (probs / scale * target).sum(-1)
    denominator = (probs / scale).sum(-1) + (target / scale).sum(-1)
    return (1 - (numerator + eps) / (denominator + eps)).sum()


def lisa_loss(logits: torch.Tensor, labels: torch.Tensor, mask_logits: list[torch.Tensor],
              gt_masks: list[torch.Tensor], weights: LossWeights = DEFAULT_WEIGHTS) -> dict[str, torch.Tensor]:
    """LISA's total loss and its weighted parts (as ``model_forward`` reports them).

    Args:
        logits, labels: the LLM's ``B x T x V`` logits and ``B x T`` labels over the image-expanded sequence.
        mask_logits, gt_masks: per sample, ``n_i x H_i x W_i`` predicted logits and 0/1 targets (n_i may be 0).
    """
    ce = causal_lm_loss(logits, labels) * weights.ce
    n_masks = sum(int(m.shape[0]) for m in gt_masks)
    zero = logits.sum() * 0.0
    bce = sum((mask_bce_sum(p, t) for p, t in zip(mask_logits, gt_masks) if t.shape[0]), zero)
    dice = sum((mask_dice_sum(p, t) for p, t in zip(mask_logits, gt_masks) if t.shape[0]), zero)
    bce = weights.bce * bce / (n_masks + 1e-8)
    dice = weights.dice * dice / (n_masks + 1e-8)
    return {"loss": ce + bce + dice, "ce_loss": ce, "mask_bce_loss": bce, "mask_dice_loss": dice}
