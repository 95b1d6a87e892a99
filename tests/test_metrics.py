"""gIoU / cIoU against hand-computed cases."""

from __future__ import annotations

import numpy as np
import pytest

from model.metrics import IoUMeter, intersection_union


def test_hand_computed_cases():
    target = np.zeros((4, 4), dtype=np.uint8)
    target[:2, :2] = 1  # 4 target pixels
    pred = np.zeros((4, 4), dtype=bool)
    pred[:2, :3] = True  # 6 predicted, 4 of them right
    assert intersection_union(pred, target) == (4, 6)
    meter = IoUMeter()
    assert meter.add(pred, target) == pytest.approx(4 / 6, abs=1e-5)
    # Both empty: counts as a perfect mask in gIoU and adds nothing to cIoU.
    assert meter.add(np.zeros((4, 4), bool), np.zeros((4, 4), np.uint8)) == 1.0
    # A miss: IoU 0.
    miss_t = np.zeros((4, 4), np.uint8)
    miss_t[3, 3] = 1
    assert meter.add(np.zeros((4, 4), bool), miss_t) == 0.0
    assert meter.giou == pytest.approx((4 / 6 + 1 + 0) / 3, abs=1e-5)
    assert meter.ciou == pytest.approx(4 / (6 + 0 + 1))
    assert meter.report()["masks"] == 3


def test_ignore_pixels_are_excluded():
    target = np.array([[1, 1, 255, 0]], dtype=np.uint8)
    pred = np.array([[True, False, True, True]])
    # The ignored pixel counts neither way: I = 1, U = {0, 1, 3} = 3.
    assert intersection_union(pred, target) == (1, 3)
