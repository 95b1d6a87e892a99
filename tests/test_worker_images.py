"""Images the model cannot take fail their own job with ``bad_input``; the rest of the batch is answered."""

from __future__ import annotations

import io

import pytest
from conftest import CASES, case_image
from PIL import Image
from test_worker_model import job_for

from model import preprocess
from worker.client.limits import MAX_ASPECT_RATIO, image_shape_error
from worker.client.protocol import BAD_INPUT
from worker.gpu.handler import LisaHandler


def png(width: int, height: int, orientation: int | None = None) -> bytes:
    out = io.BytesIO()
    exif = Image.Exif()
    if orientation:
        exif[0x0112] = orientation
    Image.new("RGB", (width, height), (200, 30, 30)).save(out, "PNG", exif=exif)
    return out.getvalue()


@pytest.fixture(scope="module")
def handler(tiny_predictor):
    return LisaHandler(tiny_predictor, "tiny@test", cache_bytes=10 << 20)


def test_the_shared_rule_is_the_models():
    """The backend and the worker use worker.client.limits; the library checks the same bound itself."""
    assert MAX_ASPECT_RATIO == preprocess.MAX_ASPECT_RATIO
    assert image_shape_error(50 * 7, 7) is None and image_shape_error(640, 480) is None
    assert "more than 50 times" in image_shape_error(6000, 100)
    assert image_shape_error(1, 50000) == (
        "the image is 1x50000 pixels: one side is more than 50 times the other, which the model cannot take; "
        "crop it into tiles first")
    assert "empty" in image_shape_error(0, 10)


@pytest.mark.slow
def test_elongated_images_fail_their_own_jobs_only(handler):
    """Issue 18: 50000x1, 1x50000 and 6000x100 passed the backend and failed the whole batch inside the encoder
    (retried alone, delivered 3 times, dead-lettered). Now each is bad_input and its neighbours are answered."""
    good = case_image(1).read_bytes()
    jobs = [job_for(png(50000, 1), query="the line"), job_for(good, query=CASES[1][0], answer=CASES[1][1]),
            job_for(png(1, 50000), query="the line"), job_for(png(6000, 100), query="the strip"),
            job_for(good, query=CASES[2][0], options={"max_new_tokens": 4})]
    wide, forced, tall, strip, generated = handler(jobs)
    assert (wide.error_code, tall.error_code, strip.error_code) == (BAD_INPUT,) * 3
    assert wide.error_message == image_shape_error(50000, 1) and tall.error_message == image_shape_error(1, 50000)
    assert strip.error_message == image_shape_error(6000, 100)
    assert forced.ok and forced.mask_array().shape == (1, 480, 640) and generated.ok


def test_exif_rotation_is_applied_before_the_rule(handler):
    """The message names the size the annotator sees (a 90-degree EXIF rotation swaps the sides)."""
    [result] = handler([job_for(png(6000, 100, orientation=6), query="the strip")])
    assert result.error_message == image_shape_error(100, 6000)


def test_images_over_the_decode_limit_are_refused_from_their_header(tiny_predictor):
    small = LisaHandler(tiny_predictor, "tiny@test", cache_bytes=10 << 20, max_decoded_pixels=200 * 150)
    fits, over = png(200, 150), case_image(1).read_bytes()  # 640x480: above the limit
    ok, refused = small([job_for(fits, query=CASES[1][0], answer=CASES[1][1]),
                         job_for(over, query=CASES[1][0], answer=CASES[1][1])])
    assert ok.ok and refused.error_code == BAD_INPUT
    assert refused.error_message.startswith("the task's image: 640x480 is 0.3 MP, above the ")


def test_an_encoder_failure_of_one_image_fails_only_that_image(handler, tiny_predictor):
    """When the batched encoder call fails, each image is encoded alone: the one at fault is reported, the others
    are encoded (here the fault is model inputs of the wrong size, which the real encoder refuses)."""
    import dataclasses

    import torch

    good = tiny_predictor.preprocess(preprocess.load_image(case_image(1)))
    bad = dataclasses.replace(good, sam_pixels=torch.zeros(1, 3, 7, 7))
    failed: dict[str, str] = {}
    encoded = handler._encode_each({"good": good, "bad": bad}, failed)
    assert list(encoded) == ["good"] and list(failed) == ["bad"]
    assert failed["bad"].startswith("the model could not encode the task's image (")
