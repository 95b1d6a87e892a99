"""Labeling-config parsing, label choice, query phrasing and region building (no server needed)."""

from __future__ import annotations

import numpy as np
import pytest

from backend.brush import rle_to_mask
from backend.labeling import RECOMMENDED_CONFIG, ConfigError, parse_labeling_config
from backend.query import MAX_QUERY_CHARS, QueryError, checked_query, clean_query, phrasing
from backend.regions import MESSAGE_ID, message_region, prediction, split_instances
from model.phrasing import question as phrase

MULTI = """<View><Image name="img" value="$photo"/><TextArea name="q" toName="img"/>
<BrushLabels name="brush" toName="img"><Label value="Car"/><Label value="Red car"/><Label value="Person"/></BrushLabels>
</View>"""


def test_recommended_config():
    setup = parse_labeling_config(RECOMMENDED_CONFIG)
    assert (setup.image_name, setup.image_field, setup.query_name, setup.brush_name) == (
        "image", "image", "query", "mask")
    assert setup.labels == ("Target",)


def test_label_choice():
    setup = parse_labeling_config(MULTI)
    assert setup.image_field == "photo"
    assert setup.choose_label("the red car on the left") == "Red car"  # the longest label named wins
    assert setup.choose_label("the person holding an umbrella") == "Person"
    assert setup.choose_label("the carpet") == "Car"  # whole words only: no label named, first label
    assert setup.choose_label("the carpet", default="Person") == "Person"
    assert setup.choose_label("the carpet", default="Unknown") == "Car"


@pytest.mark.parametrize(("xml", "message"), [
    ("", "empty"),
    ("<View><Image name='i' value='$i'/>", "not valid XML"),
    ("<View><Text name='t' value='$t'/></View>", "no <Image"),
    ("<View><Image name='i' value='$i'/><TextArea name='q' toName='i'/></View>", "no <BrushLabels>"),
    ("<View><Image name='i' value='$i'/><BrushLabels name='b' toName='i'/></View>", "no <Label"),
    ("<View><Image name='i' value='$i'/><BrushLabels name='b' toName='i'><Label value='A'/></BrushLabels></View>",
     "no <TextArea> for the query"),
    ("<View><Image name='i' value='http://x'/><TextArea name='q' toName='i'/>"
     "<BrushLabels name='b' toName='i'><Label value='A'/></BrushLabels></View>", "from task data"),
    ('<!DOCTYPE x [<!ENTITY a "b">]><View/>', "DOCTYPE"),
])
def test_configs_that_cannot_be_served(xml, message):
    with pytest.raises(ConfigError, match=message):
        parse_labeling_config(xml)


@pytest.mark.parametrize(("typed", "question"), [
    ("the orange", "What is the orange in this image? Please output segmentation mask."),
    ("the food rich in vitamin C",
     "What is the food rich in vitamin C in this image? Please output segmentation mask."),
    ("  the   red\ncar ", "What is the red car in this image? Please output segmentation mask."),
    ("Which object would you use to cut bread?",
     "Which object would you use to cut bread? Please output segmentation mask."),
    ("which object is edible", "which object is edible? Please output segmentation mask."),
    ("The animal that guards the house.", "The animal that guards the house. Please output segmentation mask."),
    ("Please segment the dog.", "Please segment the dog."),
    ("Can you segment the blue square in this image?", "Can you segment the blue square in this image?"),
])
def test_phrasing(typed, question):
    assert phrase(typed) == question


def test_phrasing_templates_and_refusals():
    custom = phrasing("Where is {}? Please respond with segmentation mask.",
                      "{} Please respond with segmentation mask.")
    assert phrase("the cat", custom["phrase"], custom["sentence"]) == (
        "Where is the cat? Please respond with segmentation mask.")
    with pytest.raises(ValueError, match="exactly one"):
        phrasing("no placeholder", "")
    with pytest.raises(QueryError, match="empty"):
        checked_query(" \n ")
    with pytest.raises(QueryError, match=f"the limit is {MAX_QUERY_CHARS}"):
        clean_query("a" * 10_000)
    with pytest.raises(QueryError, match="U\\+0000"):
        clean_query("nul\x00byte")
    with pytest.raises(QueryError, match="must be text"):
        clean_query(42)


def test_regions_and_instance_split():
    setup = parse_labeling_config(RECOMMENDED_CONFIG)
    masks = np.zeros((2, 30, 40), dtype=bool)
    masks[0, 2:8, 2:8] = True
    masks[0, 20:25, 30:38] = True  # a second instance in the same mask
    pred = prediction(masks, [0.9, 0.1], setup, "Target", "v1", "the squares")
    assert len(pred["result"]) == 1 and pred["model_version"] == "v1"
    region = pred["result"][0]
    np.testing.assert_array_equal(rle_to_mask(region["value"]["rle"], 30, 40), masks[0])
    split = prediction(masks, [0.9, 0.1], setup, "Target", "v1", "the squares", split=True)
    assert len(split["result"]) == 2 and {r["id"] for r in split["result"]} == {r["id"] for r in split["result"]}
    parts = split_instances(masks[0])
    assert [p.sum() for p in parts] == [40, 36]  # largest first
    assert prediction(np.zeros((1, 5, 5), bool), [0.5], setup, "Target", "v1", "x")["result"] == []


def test_no_uncalibrated_score_is_shown():
    """SAM's IoU head is never trained by LISA: its number (negative for the demo model) is kept in meta only, so
    Label Studio's Regions panel and Data Manager show no score rather than one that looks broken."""
    setup = parse_labeling_config(RECOMMENDED_CONFIG)
    masks = np.zeros((2, 30, 40), dtype=bool)
    masks[:, 2:8, 2:8] = True
    pred = prediction(masks, [-0.16, -0.3217], setup, "Target", "v1", "the squares", split=True)
    assert pred["score"] is None
    assert [r["meta"]["sam_score"] for r in pred["result"]] == [-0.16, -0.3217]
    assert not [r for r in pred["result"] if "score" in r]
    assert prediction(masks, [-0.16, -0.32], setup, "Target", "v1", "x", min_score=-0.2)["result"][0]["meta"][
        "sam_score"] == -0.16  # LISA_LS_MIN_SCORE still filters on it


def test_every_interactive_answer_carries_the_message_area():
    """So that it replaces the last message: "found nothing" when nothing is kept, else an empty text (``[]``: Label
    Studio hides the box), always with the same id (Label Studio then replaces the area's text)."""
    setup = parse_labeling_config(RECOMMENDED_CONFIG)
    masks = np.zeros((1, 30, 40), dtype=bool)
    masks[0, 2:8, 2:8] = True
    found = prediction(masks, [0.5], setup, "Target", "v1", "the square", message=True)["result"]
    assert [r["type"] for r in found] == ["brushlabels", "textarea"]
    assert (found[1]["from_name"], found[1]["id"], found[1]["value"]) == ("lisa", MESSAGE_ID, {"text": []})
    nothing = prediction(masks, [0.5], setup, "Target", "v1", "the square", message=True, min_area=1000)["result"]
    assert [(r["id"], r["value"]) for r in nothing] == [(MESSAGE_ID, {"text": ["LISA found nothing matching "
                                                                               "'the square'"]})]
    assert message_region(setup, "busy")["value"] == {"text": ["busy"]}
    assert [r["type"] for r in prediction(masks, [0.5], setup, "Target", "v1", "x")["result"]] == ["brushlabels"]
    no_box = parse_labeling_config(RECOMMENDED_CONFIG.replace('<TextArea name="lisa"', '<Header name="lisa"'))
    assert [r["type"] for r in prediction(masks, [0.5], no_box, "Target", "v1", "x", message=True)["result"]] == [
        "brushlabels"]
