"""Refinement through the backend: smart key points / boxes in an interactive /predict, on a real stack.

The context of a click holds only the image's smart regions (not the query TextArea), in percent of the image the
annotator sees; the backend converts them at the EXIF-applied size, adds them to the task's last query and earlier
clicks, and answers with regions that keep the ids of the regions they refine.
"""

from __future__ import annotations

import io

import numpy as np
import pytest
import requests
import test_backend_predict as base
from conftest import case_image
from PIL import Image
from test_backend_predict import NO_MESSAGES, QUERY, UPLOADS, predict, task, textarea

from backend.brush import rle_to_mask
from backend.regions import MAX_REGIONS, Instances
from model.preprocess import load_image
from worker.client.protocol import MAX_POINTS

pytest_plugins = ["redis_fixtures", "backend_fixtures"]

stack = base.stack  # the same stack (Redis, a tiny-model worker, a fake Label Studio, the backend), its own copy


def click(x: float, y: float, rid: str, label: str = "Include", positive: bool = True) -> dict:
    return {"id": rid, "from_name": "clicks", "to_name": "image", "type": "keypointlabels", "origin": "manual",
            "original_width": 640, "original_height": 480, "image_rotation": 0, "is_positive": positive,
            "value": {"x": x, "y": y, "width": 0.25, "keypointlabels": [label]}}


def box(x: float, y: float, w: float, h: float, rid: str = "b1", rotation: float = 0) -> dict:
    return {"id": rid, "from_name": "box", "to_name": "image", "type": "rectanglelabels", "origin": "manual",
            "value": {"x": x, "y": y, "width": w, "height": h, "rotation": rotation, "rectanglelabels": ["Box"]}}


def regions(r: requests.Response) -> list[dict]:
    """An answer's result, less the empty message every interactive answer carries (it clears the ``lisa`` box)."""
    assert r.status_code == 200, r.text
    [pred] = r.json()["results"]
    return [x for x in pred["result"] if x["type"] != "textarea" or x["value"]["text"]]


def test_a_click_refines_the_last_query_and_keeps_the_region_id(stack):
    backend, _ = stack
    [answer] = regions(predict(backend, [task(1)], {"result": [textarea(QUERY)]}))
    [refined] = regions(predict(backend, [task(1)], {"result": [click(50, 50, "k1", "Exclude")]}))
    assert refined["type"] == "brushlabels", refined["value"]
    assert refined["id"] == answer["id"]  # accepting it replaces the answer instead of adding a copy
    assert refined["meta"]["prompt"] == QUERY and refined["meta"]["refined"]["points"] == [[320.0, 240.0, 0]]
    assert refined["origin"] == "prediction" and refined["value"]["brushlabels"] == ["Target"]
    first, second = (rle_to_mask(r["value"]["rle"], 480, 640) for r in (answer, refined))
    assert not np.array_equal(first, second)
    # A second click adds to the first (accepting a suggestion removes the clicks from the UI) ...
    [again] = regions(predict(backend, [task(1)], {"result": [click(10, 20, "k2")]}))
    assert again["meta"]["refined"]["points"] == [[320.0, 240.0, 0], [64.0, 96.0, 1]] and again["id"] == answer["id"]
    # ... a call that brings no new click means one was deleted: what it carries is what is kept ...
    [kept] = regions(predict(backend, [task(1)], {"result": [click(10, 20, "k2")]}))
    assert kept["meta"]["refined"]["points"] == [[64.0, 96.0, 1]]
    # ... and a new query starts afresh.
    regions(predict(backend, [task(1)], {"result": [textarea(QUERY)]}))
    [fresh] = regions(predict(backend, [task(1)], {"result": [box(10, 10, 50, 50)]}))
    assert fresh["meta"]["refined"] == {"points": [], "box": [64.0, 48.0, 384.0, 288.0]}


def rotated_png(tmp_name: str) -> tuple[str, bytes]:
    """case 3 (stored 300 x 200) with EXIF orientation 6: shown rotated, 200 wide and 300 high."""
    with Image.open(case_image(3)) as im:
        exif = Image.Exif()
        exif[0x0112] = 6
        buf = io.BytesIO()
        im.convert("RGB").save(buf, format="JPEG", quality=95, exif=exif.tobytes())
    (UPLOADS / tmp_name).write_bytes(buf.getvalue())
    return f"/data/upload/1/{tmp_name}", buf.getvalue()


def test_clicks_are_converted_at_the_exif_applied_size(stack, tiny_predictor):
    backend, _ = stack
    path, data = rotated_png("rotated.jpg")
    shown = load_image(data)
    assert shown.shape[:2] == (300, 200)  # H x W after the EXIF rotation
    t = {"id": 31, "data": {"image": path}}
    [region] = regions(predict(backend, [t], {"result": [click(25, 75, "k1")]}))  # no query yet: plain SAM
    assert region["meta"]["refined"]["points"] == [[50.0, 225.0, 1]]
    assert (region["original_width"], region["original_height"]) == (200, 300)
    direct = tiny_predictor.refine(tiny_predictor.encode(shown), None, [[50.0, 225.0]], [1])
    assert np.array_equal(rle_to_mask(region["value"]["rle"], 300, 200), direct.masks[0])
    [boxed] = regions(predict(backend, [{"id": 32, "data": {"image": path}}],
                              {"result": [box(10, 20, 50, 30, rotation=90)]}))
    # 100 x 90 px, rotated 90 degrees about its top-left corner (20, 60): x from -70 (clipped to 0) to 20.
    assert boxed["meta"]["refined"]["box"] == [0.0, 60.0, 20.0, 160.0]


@pytest.mark.parametrize(("context", "message"), [
    ({"result": [click(120, 50, "k1")]}, "outside the image"),
    ({"result": [box(10, 10, 0, 30)]}, "no area"),
    ({"result": [box(150, 10, 20, 30)]}, "outside the image"),
    ({"result": [click(i % 100, 50, f"k{i}") for i in range(MAX_POINTS + 1)]}, f"the {MAX_POINTS} a refinement"),
])
def test_bad_clicks_are_a_readable_message(stack, context, message):
    backend, _ = stack
    [shown] = regions(predict(backend, [task(3)], context))
    assert shown["type"] == "textarea" and message in shown["value"]["text"][0]
    r = predict(backend, [task(3)], context, config=NO_MESSAGES)
    assert r.status_code == 422 and message in r.json()["message"]
    assert requests.get(backend.url + "/health", timeout=1).status_code == 200


def test_an_empty_context_is_a_no_op_and_nothing_found_is_said(stack):
    backend, _ = stack
    assert predict(backend, [task(1)], {"result": []}).json() == {"results": [{"result": [], "score": 0}]}
    setup = {"project": "8.1", "schema": NO_MESSAGES, "extra_params": {"min_area": 10**9}}
    assert requests.post(backend.url + "/setup", json=setup, timeout=5).status_code == 200
    [said] = regions(predict(backend, [task(1)], {"result": [textarea(QUERY)]}, project="8.1"))
    assert said["value"]["text"] == [f"LISA found nothing matching '{QUERY}'"] and said["from_name"] == "lisa"
    [said] = regions(predict(backend, [task(1)], {"result": [click(50, 50, "k9")]}, project="8.1"))
    assert said["value"]["text"] == [f"LISA found nothing matching '{QUERY}'"]
    # The batch path (pre-labelling) stores no message, just no prediction.
    r = predict(backend, [task(1, query=QUERY)], project="8.1")
    assert r.json()["results"][0]["result"] == []


def test_split_instances_is_a_project_setting(stack):
    backend, _ = stack
    for project, split in (("9.1", 0), ("10.1", 1)):
        setup = {"project": project, "schema": NO_MESSAGES, "extra_params": {"split_instances": split}}
        assert requests.post(backend.url + "/setup", json=setup, timeout=5).status_code == 200
    whole = regions(predict(backend, [task(1)], {"result": [textarea(QUERY)]}, project="9.1"))
    answer = regions(predict(backend, [task(1)], {"result": [textarea(QUERY)]}, project="10.1"))
    parts = [r for r in answer if r["type"] == "brushlabels"]
    masks = [rle_to_mask(r["value"]["rle"], 480, 640) for r in parts]
    union, one = np.logical_or.reduce(masks), rle_to_mask(whole[0]["value"]["rle"], 480, 640)
    assert len(whole) == 1 and len(parts) > 1
    # The instances are the whole mask's, largest first, but for specks under LISA_LS_MIN_AREA (16 px) dropped as
    # noise and for those past the MAX_REGIONS largest, which the lisa TextArea then mentions.
    found = Instances.find(one, 16)
    sizes = np.bincount(found.labels.ravel())[found.order].tolist()
    assert [int(m.sum()) for m in masks] == sizes[:MAX_REGIONS] and not (union & ~one).any()
    said = [r["value"]["text"][0] for r in answer if r["type"] == "textarea"]
    if len(sizes) > MAX_REGIONS:
        assert len(said) == 1 and said[0].startswith(f"LISA found {len(sizes)} separate regions for '{QUERY}'")
    else:
        assert said == []
    assert all("sam_score" in r["meta"] for r in parts) and len({r["id"] for r in parts}) == len(parts)
