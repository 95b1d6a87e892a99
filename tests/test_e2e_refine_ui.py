"""Refinement in Label Studio's labeling UI, end to end: type a query, accept LISA's mask, click an *Exclude* key
point on the part that is wrong, see the mask shrink, accept, Submit - and what Label Studio kept.

Runs against a stack serving the offline demo model (models/demo: its SAM learnt clicks) and the real Label Studio
1.23.2 in headless Chromium (see tests/test_e2e_ui.py for the browser). What the UI sends for a smart key point is
checked here too: its context holds the key point only, not the query TextArea, in percent of the image; the
backend adds the task's last query. Screenshots go to ``tests/artifacts/refine_*.png``.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import test_e2e_ui as ui
from ls_fixtures import LSClient
from redis_fixtures import ROOT

from backend.brush import rle_to_mask
from model.demo_scope import ANSWER_NOTE

pytest_plugins = ["ls_fixtures", "redis_fixtures"]
pytestmark = pytest.mark.slow

browser_page = ui.browser_page
SCENE = ROOT / "models" / "demo" / "examples" / "scene_1.png"
QUERY = "the two squares"  # scene_1 (256 x 256): the demo model's answer covers the orange and the green square...
WRONG_PART = (161, 50)  # ... the annotator wants only the orange one and clicks Exclude on the green one's centre


def brushes(body: dict) -> list[dict]:
    """The brush regions of an answer."""
    return [r for r in body["data"]["result"] if r["type"] == "brushlabels"]


def notes(body: dict) -> list[str]:
    """What an answer writes in the lisa box (the demo model's note with each answer)."""
    return [t for r in body["data"]["result"] if r.get("from_name") == "lisa" for t in r["value"]["text"]]


def brush_regions(page) -> list[list]:
    return page.evaluate("() => Htx.annotationStore.selected.regions.map(r => [r.type, r.cleanId, r.origin])")


def test_a_negative_click_shrinks_the_accepted_mask_and_is_submitted(e2e_ls_and_demo, browser_page):
    ls, stack, artifacts = e2e_ls_and_demo
    page, _blocked = browser_page
    client: LSClient = ls.client

    project = client.create_project("e2e refine")
    [task] = client.upload_images(project["id"], [SCENE])
    client.connect_ml_backend(project["id"], stack.url, title="LISA demo")
    with ui.screenshots(page, artifacts, "refine") as shot:
        ui.open_task(page, ls.url, project["id"], task["id"])
        body = ui.ask(page, QUERY)
        [answer] = brushes(body)
        assert notes(body) == [ANSWER_NOTE]  # the demo model says what it is with each answer
        before = rle_to_mask(answer["value"]["rle"], 256, 256)
        ui.accept_suggestions(page, 1)
        shot("01_query_accepted")

        # The smart key-point tool (Auto-Detect group), label "Exclude", a click on the wrong part.
        page.locator("button.lsf-tool_smart").first.hover()
        page.locator(".lsf-tool__extra button[aria-label='key-point-tool']").click()
        page.locator(".lsf-label", has_text="Exclude").first.click()
        image = page.evaluate(  # the labeling image: the largest (the task list shows a thumbnail; its src differs)
            "() => { const i = Array.from(document.querySelectorAll('img')).sort((a, b) =>"
            " b.width * b.height - a.width * a.height)[0]; i.scrollIntoView({block: 'center'});"
            " const r = i.getBoundingClientRect(); return {x: r.x, y: r.y, width: r.width, height: r.height}; }")
        x = image["x"] + WRONG_PART[0] / 256 * image["width"]
        y = image["y"] + WRONG_PART[1] / 256 * image["height"]
        with page.expect_request(lambda r: "interactive-annotating" in r.url) as sent, \
                page.expect_response(lambda r: "interactive-annotating" in r.url, timeout=ui.STEP_TIMEOUT_MS) as got:
            # Over an accepted region, Ctrl-click (Label Studio's way to draw on top of a region; a plain click
            # selects the region). Over a suggestion not yet accepted a plain click does.
            page.keyboard.down("Control")
            page.mouse.click(x, y)
            page.keyboard.up("Control")
        context = json.loads(sent.value.post_data)["context"]
        # What Label Studio 1.23.2 sends for a smart key point: the key point alone, in percent, no query.
        assert [r["type"] for r in context["result"]] == ["keypointlabels"], context
        point = context["result"][0]
        assert point["value"]["keypointlabels"] == ["Exclude"]
        assert abs(point["value"]["x"] - 100 * WRONG_PART[0] / 256) < 2, point
        [refined] = brushes(got.value.json())
        after = rle_to_mask(refined["value"]["rle"], 256, 256)
        assert refined["id"] == answer["id"] and refined["meta"]["prompt"] == QUERY
        assert after.sum() < 0.8 * before.sum(), (int(after.sum()), int(before.sum()))  # the mask shrank
        assert not after[WRONG_PART[1], WRONG_PART[0]] and before[WRONG_PART[1], WRONG_PART[0]]
        page.locator(".lsf-auto-accept__info").filter(has_text="1 suggestion").wait_for()
        shot("02_refined_suggestion")

        # Accepting replaces the accepted mask (same region id) and removes the key point.
        ui.accept_suggestions(page, 1)
        regions = brush_regions(page)
        assert [r for r in regions if r[0] == "brushregion"] == [["brushregion", answer["id"], "prediction"]], regions
        assert not [r for r in regions if r[0] == "keypointregion"], regions
        shot("03_refined_accepted")

        saved = ui.submit_annotation(page, client, task["id"])
        shot("04_submitted")
        by_type = {r["type"]: r for r in saved["result"] if r.get("from_name") != "lisa"}
        assert by_type["textarea"]["value"]["text"] == [QUERY] and "keypointlabels" not in by_type
        mask = rle_to_mask(by_type["brushlabels"]["value"]["rle"], 256, 256)
        assert np.array_equal(mask, after) and by_type["brushlabels"]["meta"]["refined"]["points"][0][2] == 0


def test_nothing_found_is_said_in_the_labeling_ui(e2e_ls_and_demo, browser_page):
    ls, stack, artifacts = e2e_ls_and_demo
    page, _blocked = browser_page
    client: LSClient = ls.client
    project = client.create_project("e2e nothing found")
    [task] = client.upload_images(project["id"], [SCENE])
    client.connect_ml_backend(project["id"], stack.url, title="LISA demo", extra_params='{"min_area": 1000000}')
    ui.open_task(page, ls.url, project["id"], task["id"])
    body = ui.ask(page, QUERY)
    assert [r["type"] for r in body["data"]["result"]] == ["textarea"]
    page.get_by_text(f"LISA found nothing matching '{QUERY}'").first.wait_for()
    page.screenshot(path=str(artifacts / "refine_05_nothing_found.png"))
    assert page.evaluate("() => Htx.annotationStore.selected.regions.filter(r => r.type === 'brushregion').length") == 0


@pytest.fixture(scope="module")
def e2e_ls_and_demo(label_studio, demo_stack, e2e_artifacts):
    return label_studio, demo_stack, e2e_artifacts
