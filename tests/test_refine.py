"""Refinement on a cached image: SAM's prompt encoder + decoder alone, with clicks/box added to [SEG] prompts.

Checked against segment-anything's own ``SamPredictor`` (points/box alone) and against LISA's prompt encoder,
which concatenates ``[points (+pad), box corners, text_embeds]`` before the decoder.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import CASES, case_image
from segment_anything import SamPredictor

from model.errors import InputError
from model.preprocess import load_image


@pytest.fixture(scope="module")
def image():
    return load_image(case_image(1))


@pytest.fixture(scope="module")
def encoded(tiny_predictor, image):
    return tiny_predictor.encode(image)


@pytest.fixture(scope="module")
def sam_predictor(tiny_predictor, image):
    sam_predictor = SamPredictor(tiny_predictor.model.sam)
    sam_predictor.set_image(image)
    return sam_predictor


@pytest.mark.parametrize("case", ["one click", "clicks", "box", "box and clicks"])
def test_points_and_box_alone_match_segment_anythings_sam_predictor(tiny_predictor, encoded, sam_predictor, case):
    points = {"one click": [[320, 240]], "clicks": [[300, 200], [420, 260], [100, 400]],
              "box": None, "box and clicks": [[330, 250], [500, 100]]}[case]
    labels = None if points is None else [1] + [0] * (len(points) - 1)
    box = [180.5, 120.0, 470.0, 390.25] if "box" in case else None
    multimask = case == "one click"  # the default: SAM's three masks only for a single click
    ours = tiny_predictor.refine(encoded, None, points, labels, box)
    masks, scores, low_res = sam_predictor.predict(
        point_coords=None if points is None else np.array(points, dtype=np.float32),
        point_labels=None if labels is None else np.array(labels),
        box=None if box is None else np.array(box, dtype=np.float32),
        multimask_output=multimask, return_logits=True,
    )
    best = int(np.argmax(scores)) if multimask else 0
    assert ours.mask_logits.shape == (1, 480, 640)
    np.testing.assert_allclose(ours.low_res_masks[0, 0].numpy(), low_res[best], atol=1e-4, rtol=0)
    np.testing.assert_allclose(ours.mask_logits[0], masks[best], atol=1e-4, rtol=0)
    assert abs(float(ours.scores[0]) - float(scores[best])) <= 1e-4


def test_image_embedding_is_the_one_sam_predictor_computes(encoded, sam_predictor):
    torch.testing.assert_close(encoded.sam_embedding, sam_predictor.features, atol=1e-5, rtol=0)


def lisa_sparse(sam, coords, labels, box, text_embeds):
    """LISA's ``PromptEncoder.forward`` concatenation, spelled out from its parts (points are padded with a
    not-a-point only when there is no box; the [SEG] embeddings come last)."""
    enc = sam.prompt_encoder
    parts = []
    if coords is not None:
        parts.append(enc._embed_points(coords, labels, pad=box is None))
    if box is not None:
        parts.append(enc._embed_boxes(box))
    parts = [p.expand(text_embeds.shape[0], -1, -1) for p in parts]
    return torch.cat([*parts, text_embeds[:, None, :]], dim=1)


@pytest.mark.parametrize("with_box", [False, True])
def test_clicks_reach_the_decoder_as_lisas_prompt_encoder_concatenates_them(tiny_predictor, encoded, with_box):
    model = tiny_predictor.model
    [answer] = tiny_predictor.segment_teacher_forced([(encoded, "Segment both shapes.", "Sure, [SEG] and [SEG].")])
    seg = answer.prompt_embeddings  # 2 x C
    seen = {}
    hook = model.sam.mask_decoder.register_forward_hook(
        lambda mod, args, kwargs, out: seen.update(kwargs), with_kwargs=True)
    points, labels = [[320.0, 240.0], [40.0, 30.0]], [1, 0]
    box = [100.0, 80.0, 500.0, 400.0] if with_box else None
    try:
        refined = tiny_predictor.refine(encoded, seg, points, labels, box)
    finally:
        hook.remove()
    scale = torch.tensor([encoded.resized_hw[1] / 640, encoded.resized_hw[0] / 480])
    coords = torch.tensor([points]) * scale
    box_t = None if box is None else (torch.tensor(box).reshape(1, 2, 2) * scale).reshape(1, 4)
    with torch.no_grad():
        expected = lisa_sparse(model.sam, coords, torch.tensor([labels]), box_t, seg)
    got = seen["sparse_prompt_embeddings"]
    assert got.shape == (2, 2 + (2 if with_box else 1) + 1, seg.shape[1])
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=0)
    assert refined.masks.shape == (2, 480, 640) and refined.scores.shape == (2,)


def test_seg_prompts_alone_give_the_answers_own_masks(tiny_predictor, encoded):
    question, answer = CASES[1]
    [seg] = tiny_predictor.segment_teacher_forced([(encoded, question, answer)])
    again = tiny_predictor.refine(encoded, seg.prompt_embeddings)
    np.testing.assert_allclose(again.mask_logits, seg.mask_logits, atol=1e-4, rtol=0)
    np.testing.assert_allclose(again.scores, seg.scores, atol=1e-5)


def test_a_negative_click_changes_the_mask_and_a_refinement_needs_a_prompt(tiny_predictor, encoded):
    question, answer = CASES[1]
    [seg] = tiny_predictor.segment_teacher_forced([(encoded, question, answer)])
    refined = tiny_predictor.refine(encoded, seg.prompt_embeddings, [[320, 240]], [0])
    assert not np.allclose(refined.mask_logits, seg.mask_logits, atol=1e-3)
    with pytest.raises(InputError, match="needs"):
        tiny_predictor.refine(encoded, None)
