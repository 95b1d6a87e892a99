"""LISA's training losses on the teacher-forced fixture cases: CE, BCE and DICE as LISA's own code computed them."""

from __future__ import annotations

import pytest
import torch
from conftest import CASES, case_arrays, case_image

from model.losses import LossWeights, mask_dice_sum
from model.preprocess import load_image, preprocess
from model.training import TrainExample, forward_losses


def example(case: int) -> TrainExample:
    ref = case_arrays(case)
    return TrainExample(preprocess(load_image(case_image(case))), *CASES[case], torch.from_numpy(ref["gt_masks"]))


@pytest.mark.parametrize("case", sorted(CASES))
def test_losses_match_lisa(tiny_predictor, case):
    ref = case_arrays(case)
    with torch.no_grad():
        out = forward_losses(tiny_predictor.model, tiny_predictor.tokenizer, [example(case)])
    for key in ("loss", "ce_loss", "mask_bce_loss", "mask_dice_loss"):
        assert float(out[key]) == pytest.approx(float(ref[f"train_{key}"]), abs=1e-4, rel=1e-4), key


def test_batch_loss_averages_like_lisa(tiny_predictor):
    examples = [example(c) for c in sorted(CASES)]
    with torch.no_grad():
        batch = forward_losses(tiny_predictor.model, tiny_predictor.tokenizer, examples)
        singles = [forward_losses(tiny_predictor.model, tiny_predictor.tokenizer, [ex]) for ex in examples]
    # Mask losses average over every mask of the batch (one per case here).
    mean_bce = sum(float(s["mask_bce_loss"]) for s in singles) / 3
    assert float(batch["mask_bce_loss"]) == pytest.approx(mean_bce, rel=1e-5)
    assert float(batch["ce_loss"]) > 0


def test_gradients_reach_the_trained_modules(tiny_predictor):
    model = tiny_predictor.model
    trainable = [model.text_hidden_fcs[0].weight, model.sam.mask_decoder.iou_token.weight, model.llm.lm_head.weight]
    for p in trainable:
        p.requires_grad_(True)
    try:
        out = forward_losses(model, tiny_predictor.tokenizer, [example(1)], LossWeights())
        out["loss"].backward()
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in trainable[:1] + trainable[2:])
        assert model.sam.image_encoder.patch_embed.proj.weight.grad is None  # frozen, as in LISA's recipe
    finally:
        for p in trainable:
            p.requires_grad_(False)
            p.grad = None


def test_seg_count_must_match_masks(tiny_predictor):
    ex = example(1)
    ex.answer = "Sure, [SEG] and [SEG]."
    with pytest.raises(ValueError, match="has 2 \\[SEG\\] but the example has 1 masks"):
        forward_losses(tiny_predictor.model, tiny_predictor.tokenizer, [ex])


def test_dice_of_a_perfect_mask_is_near_zero():
    target = torch.zeros(1, 20, 20)
    target[0, 5:15, 5:15] = 1
    assert float(mask_dice_sum((target * 2 - 1) * 50, target)) < 1e-3


def test_training_with_clicks_decodes_as_refinement_does(tiny_predictor):
    """An example with clicks/box trains exactly the masks LisaPredictor.refine serves (same prompts, same order)."""
    from model.training import teacher_forced_forward

    image = load_image(case_image(1))
    pre = preprocess(image, tiny_predictor.model.clip_size, tiny_predictor.model.lisa_config.sam_image_size)
    query, answer = CASES[1]
    points = torch.tensor([[320.5, 240.5, 0.0], [100.5, 80.5, 1.0]])
    examples = [TrainExample(pre, query, answer, torch.zeros(1, 480, 640), points=points),
                TrainExample(pre, query, answer, torch.zeros(1, 480, 640), box=torch.tensor([50.0, 40, 400, 300])),
                TrainExample(pre, query, answer, torch.zeros(1, 480, 640), points=points[1:], use_seg=False)]
    tiny_predictor.model.eval()
    with torch.no_grad():
        _, _, preds = teacher_forced_forward(tiny_predictor.model, tiny_predictor.tokenizer, examples)
    encoded = tiny_predictor.encode(image)
    [seg] = tiny_predictor.segment_teacher_forced([(encoded, query, answer)])
    expected = [
        tiny_predictor.refine(encoded, seg.prompt_embeddings, points[:, :2].numpy(), points[:, 2].long().numpy()),
        tiny_predictor.refine(encoded, seg.prompt_embeddings, box=[50.0, 40, 400, 300]),
        tiny_predictor.refine(encoded, None, points[1:, :2].numpy(), [1], multimask=False),
    ]
    for pred, want in zip(preds, expected):
        torch.testing.assert_close(pred.float(), torch.from_numpy(want.mask_logits), atol=1e-3, rtol=0)
