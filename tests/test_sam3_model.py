"""model/sam3 and model/family.py on a tiny random SAM 3 in the released layout: ``find`` and ``click`` equal
transformers' own calls on the same weights, the image is encoded once, wrong families are refused."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import CHECKPOINT, CLIP_TOWER
from PIL import Image
from safetensors import safe_open
from sam3_fixtures import LOW_THRESHOLD, rgb_image

from model.errors import CheckpointError, InputError
from model.family import LISA, SAM3, family_of, is_sam3
from model.sam3.modeling import Sam3Predictor
from model.sam3.tiny import write_tiny_sam3

pytest_plugins = ["sam3_fixtures"]

#: Clicks/boxes (x, y, label in image pixels) tried against the tracker's own output.
PROMPTS = [
    ([(10.0, 20.0, 1)], None),
    ([(10.0, 20.0, 1), (60.0, 30.0, 0), (33.5, 41.0, 1)], None),
    ([], [5.0, 5.0, 40.0, 30.0]),
    ([(20.0, 15.0, 1)], [5.0, 5.0, 40.0, 30.0]),
]


@pytest.fixture(scope="module")
def reference(sam3_tiny):
    """transformers' own models and processors on the same folder, loaded the documented way."""
    from transformers import Sam3Model, Sam3Processor, Sam3TrackerModel, Sam3TrackerProcessor

    return (Sam3Model.from_pretrained(sam3_tiny).eval(), Sam3Processor.from_pretrained(sam3_tiny),
            Sam3TrackerModel.from_pretrained(sam3_tiny).eval(), Sam3TrackerProcessor.from_pretrained(sam3_tiny))


def test_the_folder_is_in_the_released_layout(sam3_tiny):
    config = json.loads((sam3_tiny / "config.json").read_text())
    assert config["model_type"] == "sam3_video" and config["architectures"] == ["Sam3VideoModel"]
    assert {"detector_config", "tracker_config"} <= set(config)
    assert (sam3_tiny / "processor_config.json").is_file() and (sam3_tiny / "tokenizer.json").is_file()
    with safe_open(str(sam3_tiny / "model.safetensors"), "pt") as f:
        prefixes = {key.split(".")[0] for key in f.keys()}  # noqa: SIM118 - safe_open has no __iter__
        nested = [key for key in f.keys() if key.startswith("tracker_model.tracker_model.")]  # noqa: SIM118
    assert prefixes == {"detector_model", "tracker_model", "tracker_neck"} and not nested


def test_tiny_checkpoints_are_deterministic_by_seed(tmp_path, sam3_tiny):
    again, other = write_tiny_sam3(tmp_path / "again", seed=0), write_tiny_sam3(tmp_path / "other", seed=1)
    with safe_open(str(sam3_tiny / "model.safetensors"), "pt") as a, \
            safe_open(str(again / "model.safetensors"), "pt") as b, \
            safe_open(str(other / "model.safetensors"), "pt") as c:
        keys = list(a.keys())
        assert all(torch.equal(a.get_tensor(k), b.get_tensor(k)) for k in keys)
        assert not all(torch.equal(a.get_tensor(k), c.get_tensor(k)) for k in keys)


@pytest.mark.parametrize("phrase", ["cat", "the red car"])
@pytest.mark.parametrize("threshold", [LOW_THRESHOLD, 0.5])
def test_find_equals_processor_model_and_post_processing(sam3_predictor, reference, phrase, threshold):
    detector, processor, _, _ = reference
    image = rgb_image()
    found = sam3_predictor.find(sam3_predictor.encode(image), phrase, threshold)
    inputs = processor(images=Image.fromarray(image), text=phrase, return_tensors="pt")
    with torch.no_grad():
        outputs = detector(**inputs)
    [direct] = processor.post_process_instance_segmentation(outputs, threshold=threshold, mask_threshold=0.5,
                                                            target_sizes=inputs["original_sizes"].tolist())
    n = len(direct["scores"])
    assert found.masks.shape == (n, 60, 80) and found.masks.dtype == bool
    if n:
        assert np.array_equal(found.masks, direct["masks"].numpy().astype(bool))
    np.testing.assert_allclose(found.scores, direct["scores"].numpy(), rtol=0, atol=1e-6)
    np.testing.assert_allclose(found.boxes, direct["boxes"].numpy().reshape(-1, 4), rtol=0, atol=1e-4)
    assert (n > 1) == (threshold == LOW_THRESHOLD)  # the random weights score about 0.25: several, or none


@pytest.mark.parametrize(("points", "box"), PROMPTS)
def test_click_equals_the_trackers_own_output(sam3_predictor, reference, points, box):
    _, _, tracker, tracker_processor = reference
    image = rgb_image()
    clicked = sam3_predictor.click(sam3_predictor.encode(image), points, box)
    kwargs = {}
    if points:
        kwargs = {"input_points": [[[[x, y] for x, y, _ in points]]], "input_labels": [[[lab for *_, lab in points]]]}
    if box:
        kwargs["input_boxes"] = [[box]]
    inputs = tracker_processor(images=Image.fromarray(image), return_tensors="pt", **kwargs)
    with torch.no_grad():
        outputs = tracker(pixel_values=inputs["pixel_values"], multimask_output=False,
                          **{k: v for k, v in inputs.items() if k.startswith("input_")})
    [masks] = tracker_processor.post_process_masks(outputs.pred_masks, inputs["original_sizes"])
    assert clicked.mask.shape == (60, 80) and clicked.mask.dtype == bool
    assert np.array_equal(clicked.mask, masks[0, 0].numpy())
    assert clicked.score == pytest.approx(float(outputs.iou_scores[0, 0, 0]), abs=1e-6)


def test_the_tracker_shares_the_detectors_backbone(sam3_predictor, reference):
    assert sam3_predictor.tracker.vision_encoder.backbone is sam3_predictor.detector.vision_encoder.backbone
    _, _, tracker, _ = reference  # loaded alone, transformers gives it the same weights under another name
    ours = sam3_predictor.detector.vision_encoder.backbone.state_dict()
    assert all(torch.equal(v, ours[k]) for k, v in tracker.vision_encoder.backbone.state_dict().items())


def test_the_image_is_encoded_once_for_many_prompts(sam3_predictor):
    calls = []
    hook = sam3_predictor.detector.vision_encoder.backbone.register_forward_hook(lambda *a: calls.append(1))
    try:
        encoded = sam3_predictor.encode(rgb_image(seed=5))
        for phrase in ("cat", "dog", "person"):
            sam3_predictor.find(encoded, phrase, LOW_THRESHOLD)
        for points, box in PROMPTS:
            sam3_predictor.click(encoded, points, box)
    finally:
        hook.remove()
    assert len(calls) == 1
    assert encoded.nbytes == encoded.hidden.numel() * 4 and encoded.original_hw == (60, 80)


def test_phrases_the_text_encoder_cannot_take_are_refused(sam3_predictor):
    encoded = sam3_predictor.encode(rgb_image())
    assert sam3_predictor.phrase_token_limit == 32
    with pytest.raises(InputError, match="query is empty"):
        sam3_predictor.find(encoded, "  \n ")
    with pytest.raises(InputError, match=r"SAM 3 reads at most 30"):
        sam3_predictor.find(encoded, "big " * 12)  # a token per letter in the tiny vocabulary: 38
    with pytest.raises(InputError, match="at least one point or a box"):
        sam3_predictor.click(encoded, [], None)


def test_families_from_files(sam3_tiny):
    assert family_of(sam3_tiny) == SAM3 and is_sam3(sam3_tiny)
    assert family_of(CHECKPOINT) == LISA and not is_sam3(CHECKPOINT)
    with pytest.raises(CheckpointError, match=r"model_type 'clip_vision_model' \(CLIPVisionModel\)"):
        family_of(CLIP_TOWER)
    assert not is_sam3(CLIP_TOWER)


@pytest.mark.parametrize("which", ["lisa", "demo"])
def test_a_lisa_checkpoint_is_refused_by_name(which):
    from redis_fixtures import ROOT

    folder = CHECKPOINT if which == "lisa" else ROOT / "models" / "demo"
    with pytest.raises(CheckpointError, match=r"this is a LISA checkpoint \(model_type 'llava'\), not SAM 3"):
        Sam3Predictor.from_pretrained(folder, device="cpu")


def test_a_detector_only_folder_finds_but_cannot_click(tmp_path, sam3_tiny, sam3_predictor):
    """A ``model_type: sam3`` folder (the detector alone) loads; clicks say what is missing."""
    from transformers import Sam3Model, Sam3Processor

    Sam3Model.from_pretrained(sam3_tiny).save_pretrained(tmp_path)
    Sam3Processor.from_pretrained(sam3_tiny).save_pretrained(tmp_path)
    assert family_of(tmp_path) == SAM3
    alone = Sam3Predictor.from_pretrained(tmp_path, device="cpu")
    assert alone.tracker is None
    image = rgb_image()
    encoded = alone.encode(image)
    found = alone.find(encoded, "cat", LOW_THRESHOLD)
    assert np.array_equal(found.masks, sam3_predictor.find(sam3_predictor.encode(image), "cat", LOW_THRESHOLD).masks)
    with pytest.raises(InputError, match="detector only"):
        alone.click(encoded, [(1.0, 1.0, 1)])
