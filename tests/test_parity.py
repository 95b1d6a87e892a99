"""Stage-by-stage parity with LISA's original code, on the tiny checkpoint (fixture README, section 9)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import CASES, case_arrays, case_image

from model.preprocess import load_image, preprocess, sam_resize

F32 = {"atol": 1e-4, "rtol": 1e-4}
F16 = {"atol": 4e-3, "rtol": 0}


def close(actual, expected, tol) -> None:
    a = actual.detach().float().cpu().numpy() if isinstance(actual, torch.Tensor) else np.asarray(actual)
    np.testing.assert_allclose(a.astype(np.float64), np.asarray(expected, dtype=np.float64), **tol)


@pytest.fixture(scope="module", params=sorted(CASES))
def case(request, tiny_predictor):
    n = request.param
    ref = case_arrays(n)
    image = load_image(case_image(n))
    encoded = tiny_predictor.encode(image)
    return n, ref, image, encoded


def test_preprocessing_is_pixel_exact(case):
    _, ref, image, _ = case
    assert list(image.shape[:2]) == ref["image_hw"].tolist()
    np.testing.assert_array_equal(sam_resize(image), ref["sam_resized_image"])
    pre = preprocess(image)
    assert list(pre.resized_hw) == ref["resize_hw"].tolist()
    np.testing.assert_array_equal(pre.clip_pixels.numpy(), ref["clip_pixel_values"])
    np.testing.assert_array_equal(pre.sam_pixels.numpy(), ref["sam_pixel_values"])


def test_image_features_and_sam_embedding(case, tiny_predictor):
    _, ref, _, encoded = case
    with torch.inference_mode():
        clip = tiny_predictor.model.clip_features(torch.from_numpy(ref["clip_pixel_values"]))
    close(clip, ref["clip_patch_features"], F32)
    close(encoded.image_features[None], ref["image_features"], F32)
    emb = encoded.sam_embedding.double()
    close(emb[:, :8], ref["sam_image_embedding_c8"], F32)
    close(emb[:, :, ::8, ::8], ref["sam_image_embedding_s8"], F32)
    flat = emb[0].flatten(1)
    stats = torch.stack([flat.mean(1), flat.std(1, correction=0), flat.min(1).values, flat.max(1).values])
    close(stats, ref["sam_image_embedding_stats"], F32)


def test_prompt_ids(case, tiny_predictor):
    n, ref, _, _ = case
    query, answer = CASES[n]
    from model.prompts import chat_prompt, teacher_forced_prompt

    tok = tiny_predictor.tokenizer
    assert chat_prompt(query) == str(ref["prompt"])
    assert tok.encode_with_image(chat_prompt(query)) == ref["input_ids"][0].tolist()
    assert tok.encode_with_image(teacher_forced_prompt(query, answer)) == ref["tf_input_ids"][0].tolist()


def test_teacher_forced_path(case, tiny_predictor):
    n, ref, _, encoded = case
    query, answer = CASES[n]
    ids = torch.from_numpy(ref["tf_input_ids"][0])
    with torch.inference_mode():
        hidden, _ = tiny_predictor.teacher_forced_hidden([ids], [encoded.image_features])
        logits_tail = tiny_predictor.model.llm.lm_head(hidden[0, -16:])
    close(hidden, ref["tf_last_hidden_state"], F32)
    close(logits_tail, ref["tf_logits_tail"], F32)
    assert tiny_predictor.seg_positions(ids, 256) == ref["tf_seg_positions"].tolist()
    [seg] = tiny_predictor.segment_teacher_forced([(encoded, query, answer)])
    close(seg.seg_hidden, ref["tf_seg_hidden"], F32)
    close(seg.prompt_embeddings, ref["tf_pred_embeddings"], F32)
    close(seg.low_res_masks, ref["tf_low_res_masks"], F32 if ref["tf_low_res_masks"].dtype == np.float32 else F16)
    close(seg.scores, ref["tf_iou_predictions"][:, 0], F32)
    close(seg.mask_logits, ref["tf_pred_masks"], F16)
    assert seg.mask_logits.shape == ref["tf_pred_masks"].shape
    assert seg.masks.dtype == bool and seg.output_ids.size == 0


def test_greedy_generation(case, tiny_predictor):
    n, ref, _, encoded = case
    [seg] = tiny_predictor.segment([(encoded, CASES[n][0])], max_new_tokens=32)
    prompt_len = ref["input_ids"].shape[1]
    assert seg.output_ids.tolist() == ref["gen_output_ids"][0, prompt_len:].tolist()
    assert seg.mask_logits.shape == ref["gen_pred_masks"].shape
    close(seg.seg_hidden, ref["gen_seg_hidden"], F32)
    close(seg.prompt_embeddings, ref["gen_pred_embeddings"], F32)
    close(seg.mask_logits, ref["gen_pred_masks"], F16)
    close(seg.scores, ref["gen_iou_predictions"][:, 0], F32)
    # chat.py's text is the decode of prompt + answer; ours is the answer alone, decoded the same way.
    full = [i for i in ref["gen_output_ids"][0].tolist() if i != -200]
    text = tiny_predictor.tokenizer.decode(full).replace("\n", "").replace("  ", " ")
    assert text == str(ref["gen_text"])
