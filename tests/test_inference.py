"""Two-stage inference: batching equals one-at-a-time, encodings are reusable, stopping and refusals."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import CASES, case_image

from model.errors import InputError
from model.preprocess import load_image

QUERIES = [CASES[1][0], CASES[2][0], CASES[3][0], "Please segment the green triangle in this image."]


@pytest.fixture(scope="module")
def encoded(tiny_predictor):
    return [tiny_predictor.encode(load_image(case_image(n))) for n in (1, 2, 3)]


def assert_same(a, b):
    assert a.output_ids.tolist() == b.output_ids.tolist()
    assert a.text == b.text
    assert a.mask_logits.shape == b.mask_logits.shape
    np.testing.assert_allclose(a.mask_logits, b.mask_logits, atol=1e-4, rtol=1e-4)
    np.testing.assert_allclose(a.scores, b.scores, atol=1e-5)


def test_batch_of_images_equals_one_at_a_time(tiny_predictor, encoded):
    items = [(encoded[i], CASES[i + 1][0]) for i in range(3)]
    batched = tiny_predictor.segment(items, max_new_tokens=12)
    for item, got in zip(items, batched):
        assert_same(got, tiny_predictor.segment([item], max_new_tokens=12)[0])


def test_several_queries_on_one_image(tiny_predictor, encoded):
    items = [(encoded[0], q) for q in QUERIES]  # prompts of different lengths: left padding differs per row
    batched = tiny_predictor.segment(items, max_new_tokens=8)
    assert len({len(tiny_predictor.tokenizer.encode(q)) for q in QUERIES}) > 1
    for item, got in zip(items, batched):
        assert_same(got, tiny_predictor.segment([item], max_new_tokens=8)[0])
        assert got.mask_logits.shape[1:] == (480, 640)


def test_teacher_forced_batch_equals_single(tiny_predictor, encoded):
    items = [(encoded[i], *CASES[i + 1]) for i in range(3)]
    items.append((encoded[0], "Segment both shapes.", "Sure, [SEG] and [SEG]."))
    batched = tiny_predictor.segment_teacher_forced(items)
    assert [len(s.masks) for s in batched] == [1, 1, 1, 2]
    for item, got in zip(items, batched):
        assert_same(got, tiny_predictor.segment_teacher_forced([item])[0])


def test_encoding_is_reusable_and_sized(tiny_predictor, encoded):
    enc = encoded[0]
    assert enc.nbytes == 256 * 64 * 4 + 256 * 64 * 64 * 4
    first = tiny_predictor.segment([(enc, QUERIES[0])], max_new_tokens=4)[0]
    again = tiny_predictor.segment([(enc, QUERIES[0])], max_new_tokens=4)[0]
    np.testing.assert_array_equal(first.mask_logits, again.mask_logits)


def test_max_new_tokens_and_eos_stop_each_row(tiny_predictor, encoded):
    eos = tiny_predictor.tokenizer.layout.eos_id
    [short] = tiny_predictor.segment([(encoded[2], QUERIES[2])], max_new_tokens=5)
    assert len(short.output_ids) == 5

    def force_eos_in_row_0(_module, _inputs, logits):
        logits = logits.clone()
        logits[0, ..., eos] += 1e4
        return logits

    handle = tiny_predictor.model.llm.lm_head.register_forward_hook(force_eos_in_row_0)
    try:
        stopped, running = tiny_predictor.segment([(encoded[0], QUERIES[0]), (encoded[1], QUERIES[1])],
                                                  max_new_tokens=6)
    finally:
        handle.remove()
    assert stopped.output_ids.tolist() == [eos] and stopped.masks.shape == (0, 480, 640)
    assert_same(running, tiny_predictor.segment([(encoded[1], QUERIES[1])], max_new_tokens=6)[0])


@pytest.mark.parametrize(("query", "message"), [
    ("", "the query is empty"),
    ("   \n", "the query is empty"),
    ("segment [SEG] please", r"contains \[SEG\]"),
    ("two images <image>", "contains <image>"),
    ("word " * 2000, "the query is too long"),
])
def test_bad_queries_are_refused(tiny_predictor, encoded, query, message):
    with pytest.raises(InputError, match=message):
        tiny_predictor.segment([(encoded[0], query)])


def test_zero_seg_answer_gives_no_mask(tiny_predictor, encoded):
    [seg] = tiny_predictor.segment_teacher_forced([(encoded[2], QUERIES[2], "There is nothing to segment.")])
    assert seg.masks.shape == (0, 200, 300) and seg.scores.shape == (0,)


def test_batch_encode_equals_single(tiny_predictor):
    images = [load_image(case_image(n)) for n in (1, 3)]
    both = tiny_predictor.encode_batch(images)
    for img, enc in zip(images, both):
        one = tiny_predictor.encode(img)
        torch.testing.assert_close(enc.sam_embedding, one.sam_embedding, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(enc.image_features, one.image_features, atol=1e-5, rtol=1e-5)
