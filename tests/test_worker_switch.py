"""Switching to a promoted model: freed first when both would not fit, "switching" meanwhile, never left empty."""

from __future__ import annotations

import shutil
import threading

import pytest
import torch
from conftest import CASES, CHECKPOINT, CLIP_TOWER, case_image

from model.inference import LisaPredictor
from worker.client import registry
from worker.client.protocol import Job, image_hash
from worker.gpu import switch
from worker.gpu.handler import LisaHandler

pytest_plugins = ["redis_fixtures"]

OPTIONS = {"vision_tower": str(CLIP_TOWER), "dtype": "fp32", "device": "cpu"}


def tiny_handler(strategy: str) -> LisaHandler:
    predictor = LisaPredictor.from_pretrained(str(CHECKPOINT), **OPTIONS)
    return LisaHandler(predictor, "base-v0", cache_bytes=10 << 20, load_options=OPTIONS, switch_strategy=strategy,
                       source={"version": "base-v0", "base": str(CHECKPOINT), "adapter": None})


def answer(handler: LisaHandler) -> str:
    data = case_image(1).read_bytes()
    job = Job(image=image_hash(data), query=CASES[1][0], answer=CASES[1][1])
    job.image_bytes = data
    [result] = handler([job])
    assert result.ok, result.error_message
    return result.model_version


@pytest.mark.slow
def test_free_first_switch_says_switching_and_serves_the_new_model(job_queue, tmp_path):
    handler = tiny_handler(switch.FREE_FIRST)
    answer(handler)
    old = handler.predictor
    promoted = shutil.copytree(CHECKPOINT, tmp_path / "promoted")
    registry.promote(job_queue, "promoted-v1", str(promoted), None, {})
    states: set[str | None] = set()
    switcher = threading.Thread(target=handler.maybe_switch, args=(job_queue,))
    switcher.start()
    while switcher.is_alive():  # what the heartbeat thread publishes while the loop switches
        states.add(handler.stats().get("state"))
        switcher.join(0.002)
    assert "switching" in states and handler.stats().get("state") is None
    assert handler.version == "promoted-v1" and handler.predictor is not old
    assert handler.source == {"version": "promoted-v1", "base": str(promoted), "adapter": None}
    assert answer(handler) == "promoted-v1"


@pytest.mark.slow
def test_a_failed_free_first_switch_reloads_the_old_model(job_queue, tmp_path):
    handler = tiny_handler(switch.FREE_FIRST)
    registry.promote(job_queue, "broken-v1", str(tmp_path / "missing"), None, {})
    assert handler.maybe_switch(job_queue) == "base-v0"
    assert handler.predictor is not None and answer(handler) == "base-v0" and not handler.switching


def test_side_by_side_keeps_serving_through_a_bad_promotion_then_frees_the_old_model(job_queue, tmp_path):
    import weakref

    handler = tiny_handler(switch.AUTO)  # the tiny model fits twice: loaded side by side
    old = handler.predictor
    registry.promote(job_queue, "broken-v1", str(tmp_path / "missing"), None, {})
    assert handler.maybe_switch(job_queue) == "base-v0" and handler.predictor is old
    old_model = weakref.ref(old.model)
    del old
    registry.promote(job_queue, "promoted-v2", str(CHECKPOINT), None, {})
    handler._next_check = 0.0  # the next check is due (the loop calls maybe_switch every batch)
    assert handler.maybe_switch(job_queue) == "promoted-v2" and old_model() is None


def test_auto_frees_first_only_when_both_would_not_fit(tiny_predictor):
    cpu = torch.device("cpu")
    assert not switch.free_first(switch.AUTO, tiny_predictor.model, cpu)
    huge = torch.nn.Linear(1 << 20, 1 << 20, bias=False, device="meta")  # 4 TiB of fp32, never allocated
    assert switch.model_bytes(huge) == 4 << 40
    assert switch.free_first(switch.AUTO, huge, cpu)
    assert switch.free_first(switch.FREE_FIRST, tiny_predictor.model, cpu)
    assert not switch.free_first(switch.SIDE_BY_SIDE, huge, cpu)
    with pytest.raises(ValueError, match="switch strategy"):
        switch.free_first("sometimes", huge, cpu)
