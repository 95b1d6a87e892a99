"""Refine jobs in the worker: [SEG] prompts of the last answer + clicks/box, SAM's decoder only, mixed batches."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import CASES, case_image

from model.preprocess import load_image
from worker.client.protocol import BAD_INPUT, MAX_POINTS, REFINE, Job, image_hash
from worker.gpu.handler import LisaHandler

QUERY = CASES[1][0]


def job_for(data: bytes, **kw) -> Job:
    job = Job(image=image_hash(data), **kw)
    job.image_bytes = data
    return job


class CountingPredictor:
    """The real predictor, counting the calls that run the LLM or the image encoders."""

    def __init__(self, predictor) -> None:
        self.predictor, self.calls = predictor, {"segment": 0, "encode_batch": 0}

    def __getattr__(self, name):
        attr = getattr(self.predictor, name)
        if name in self.calls:
            def counted(*args, **kwargs):
                self.calls[name] += 1
                return attr(*args, **kwargs)
            return counted
        return attr


@pytest.fixture
def handler(tiny_predictor):
    return LisaHandler(CountingPredictor(tiny_predictor), "tiny@test", cache_bytes=10 << 20)


def refine_job(data: bytes, points=None, box=None, query=QUERY) -> Job:
    return job_for(data, kind=REFINE, query=query, options={"points": points or [], "box": box,
                                                            "max_new_tokens": 8})


def test_a_click_reuses_the_cached_answer_and_image(handler, tiny_predictor):
    data = case_image(1).read_bytes()
    [first] = handler([job_for(data, query=QUERY, options={"max_new_tokens": 8})])
    assert handler.predictor.calls == {"segment": 1, "encode_batch": 1}
    [refined] = handler([refine_job(data, points=[[320, 240, 0], [100, 100, 1]])])
    assert refined.ok, refined.error_message
    assert handler.predictor.calls == {"segment": 1, "encode_batch": 1}  # neither the LLM nor the encoders again
    assert refined.text == first.text and refined.model_version == "tiny@test"
    encoded = tiny_predictor.encode(load_image(case_image(1)))
    [seg] = tiny_predictor.segment([(encoded, QUERY)], max_new_tokens=8)
    direct = tiny_predictor.refine(encoded, seg.prompt_embeddings, [[320, 240], [100, 100]], [0, 1])
    assert (refined.mask_array() != direct.masks).mean() < 1e-4
    assert refined.mask_array().shape == (len(seg.prompt_embeddings), 480, 640)
    assert refined.timings["refine_s"] >= 0 and refined.timings["batch_jobs"] == 1


def test_a_refine_after_eviction_re_encodes_and_regenerates(handler, tiny_predictor):
    data = case_image(1).read_bytes()
    warm = LisaHandler(tiny_predictor, "tiny@test", cache_bytes=10 << 20)
    warm([job_for(data, query=QUERY, options={"max_new_tokens": 8})])
    [expected] = warm([refine_job(data, box=[100, 50, 500, 400])])
    [got] = handler([refine_job(data, box=[100, 50, 500, 400])])  # a fresh worker: nothing cached
    assert got.ok and handler.predictor.calls == {"segment": 1, "encode_batch": 1}
    assert np.array_equal(got.mask_array(), expected.mask_array()) and got.text == expected.text


def test_clicks_without_a_query_are_plain_sam(handler, tiny_predictor):
    data = case_image(2).read_bytes()
    [got] = handler([refine_job(data, points=[[150, 100, 1]], query="")])
    assert got.ok and handler.predictor.calls["segment"] == 0 and got.text == ""
    direct = tiny_predictor.refine(tiny_predictor.encode(load_image(case_image(2))), None, [[150, 100]], [1])
    assert np.array_equal(got.mask_array(), direct.masks)


def test_bad_refinements_are_answered_alone_in_a_mixed_batch(handler):
    data = case_image(1).read_bytes()  # 640 x 480
    outside, box_out, good, query = handler([
        refine_job(data, points=[[700, 10, 1]]),
        refine_job(data, box=[600, 400, 700, 500]),
        refine_job(data, points=[[10, 10, 1]]),
        job_for(data, query=CASES[2][0], options={"max_new_tokens": 4}),
    ])
    assert (outside.error_code, box_out.error_code) == (BAD_INPUT, BAD_INPUT)
    assert "outside the 640x480 image" in outside.error_message
    assert "not inside the 640x480 image" in box_out.error_message
    assert good.ok and query.ok


@pytest.mark.parametrize(("options", "message"), [
    ({"points": [[1, 1, 1]] * (MAX_POINTS + 1)}, f"at most {MAX_POINTS} points"),
    ({"box": [10, 10, 10, 50]}, "no area"),
    ({"points": [[1, 1, 2]]}, "label 0 or 1"),
    ({"points": []}, "at least one point or a box"),
])
def test_malformed_refinements_are_refused_before_the_queue(options, message):
    with pytest.raises(ValueError, match=message):
        Job(image="0" * 64, kind=REFINE, options=options)
