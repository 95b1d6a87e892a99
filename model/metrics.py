"""gIoU and cIoU exactly as LISA computes them (``validate`` in ``train_ds.py``).

Per mask, prediction pixels where the ground truth is 255 ("ignore") are excluded; intersection and union are
counted for the foreground. A mask's IoU is ``I / (U + 1e-5)``, and **1.0 when both masks are empty** (U = 0).
gIoU is the mean of the per-mask IoUs; cIoU is ``sum(I) / (sum(U) + 1e-10)`` over the split.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

IGNORE = 255


def intersection_union(pred: np.ndarray, target: np.ndarray) -> tuple[int, int]:
    """Foreground intersection and union of one mask. ``pred``: bool ``H x W``; ``target``: 0/1 with 255 ignored."""
    valid = target != IGNORE
    p = np.asarray(pred, dtype=bool) & valid
    t = (target == 1) & valid
    return int((p & t).sum()), int((p | t).sum())


@dataclass
class IoUMeter:
    """Accumulates masks of a split; ``giou`` and ``ciou`` read the running figures."""

    ious: list[float] = field(default_factory=list)
    intersection: int = 0
    union: int = 0

    def add(self, pred: np.ndarray, target: np.ndarray) -> float:
        inter, union = intersection_union(pred, target)
        iou = 1.0 if union == 0 else inter / (union + 1e-5)
        self.ious.append(iou)
        self.intersection += inter
        self.union += union
        return iou

    @property
    def giou(self) -> float:
        return float(np.mean(self.ious)) if self.ious else 0.0

    @property
    def ciou(self) -> float:
        return self.intersection / (self.union + 1e-10)

    def report(self) -> dict[str, float]:
        return {"giou": self.giou, "ciou": self.ciou, "masks": len(self.ious)}
