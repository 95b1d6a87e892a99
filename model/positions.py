"""Where tokens sit in the image-expanded sequence (the prompt's one image sentinel replaced by the image's
``num_patches`` CLIP features), shared by inference (reading the [SEG] states) and training (labels, losses).

``ids``: 1-D token ids of one prompt (shape ``[T]``) holding exactly one ``IMAGE_TOKEN_INDEX``.
"""

from __future__ import annotations

import torch

from model.tokenizer import IGNORE_INDEX, IMAGE_TOKEN_INDEX


def seg_positions(ids: torch.Tensor, seg_id: int, num_patches: int) -> list[int]:
    """Positions, in the image-expanded sequence, of the state *before* each ``[SEG]`` of ``ids``.

    That state is the one whose logits predict ``[SEG]`` (LISA's one-token shift, see ``../shared/ref/lisa.md``).
    """
    at = int((ids == IMAGE_TOKEN_INDEX).nonzero()[0, 0])
    return [j - 1 + (num_patches - 1 if j - 1 > at else 0) for j in (ids == seg_id).nonzero()[:, 0].tolist()]


def expand_labels(labels: torch.Tensor, ids: torch.Tensor, num_patches: int) -> torch.Tensor:
    """Labels over the image-expanded sequence: the image sentinel becomes ``num_patches`` ignored positions."""
    at = int((ids == IMAGE_TOKEN_INDEX).nonzero()[0, 0])
    ignore = labels.new_full((num_patches,), IGNORE_INDEX)
    return torch.cat([labels[:at], ignore, labels[at + 1 :]])
