"""End to end in Label Studio's labeling UI on a SAM 3 project: headless Chromium types a noun phrase and gets
every instance SAM 3 finds, each a suggestion with its score.

The stack is Redis, ``lisa-ls serve`` and one ``lisa-ls worker --model <tiny SAM 3>`` (random weights written at
test time, :mod:`sam3_fixtures`). The project's connection carries the Extra params ``{"model": "sam3",
"score_threshold": 0.2}``: the random weights score about 0.25, so a low threshold lets several instances through.
In the UI: open the task, Auto-Annotation on, type the phrase, Enter: the suggestions are exactly the instances
the SAM 3 predictor finds on the same weights, image and threshold (same count, same scores, same masks), the
``lisa`` message box is cleared, and after accepting and submitting, Label Studio keeps them all and the backend
captures the sample with the phrase and ``model_families == ["sam3"]``.

Same browser rules as ``tests/test_e2e_ui.py`` (Debian's chromium, loopback only); screenshots go to
``tests/artifacts/sam3_ui_*.png`` (git-ignored).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from ls_fixtures import E2E, LabelStudio, LisaStack, _serve, case_png
from PIL import Image
from redis_fixtures import wait_for
from sam3_fixtures import LOW_THRESHOLD
from test_e2e_ui import (  # noqa: F401  (browser_page: the fixture, reused)
    STEP_TIMEOUT_MS,
    accept_suggestions,
    ask,
    browser_page,
    open_task,
    screenshots,
    submit_annotation,
)

from backend.brush import rle_to_mask
from backend.dataset import Dataset
from backend.regions import MESSAGE_ID

pytest_plugins = ["ls_fixtures", "redis_fixtures", "sam3_fixtures"]

pytestmark = pytest.mark.slow

#: What an annotator types: a noun phrase, put to SAM 3 as typed.
PHRASE = "shape"
#: Where the click test clicks, in pixels of the fixture picture (640 x 480): inside the red disc.
CLICK_AT = (151, 155)


@pytest.fixture(scope="session")
def sam3_stack(_label_studio_process: LabelStudio, sam3_tiny: Path,
               tmp_path_factory: pytest.TempPathFactory) -> Iterator[LisaStack]:
    """Redis, ``lisa-ls serve`` and one CPU ``lisa-ls worker`` serving the tiny SAM 3, all UP."""
    ls = _label_studio_process
    yield from _serve(LisaStack(tmp_path_factory.mktemp("sam3-stack"), ls.url, ls.token, sam3_tiny), "lisa-ls sam3")


def test_a_noun_phrase_on_a_sam3_project_suggests_every_instance(sam3_stack: LisaStack, label_studio: LabelStudio,
                                                                 e2e_artifacts: Path, browser_page, sam3_predictor):  # noqa: F811
    page, _blocked = browser_page
    e2e = E2E(label_studio, sam3_stack, e2e_artifacts)
    with screenshots(page, e2e.artifacts, "sam3_ui") as shot:
        find_every_instance(e2e, page, shot, sam3_predictor)


def sam3_project(e2e: E2E, title: str) -> tuple[dict, dict, np.ndarray]:
    """A project with the fixture picture, connected to the SAM 3 stack with a low threshold: (project, task, RGB)."""
    client = e2e.client
    assert [w["family"] for w in e2e.stack.health()["workers"]] == ["sam3"]
    project = client.create_project(title)
    [task] = client.upload_images(project["id"], [case_png(1)])
    client.connect_ml_backend(project["id"], e2e.stack.url, title=f"SAM 3 ({title})",
                              extra_params={"model": "sam3", "score_threshold": LOW_THRESHOLD})
    with Image.open(case_png(1)) as im:
        return project, task, np.asarray(im.convert("RGB"))


def find_every_instance(e2e: E2E, page, shot, predictor) -> None:
    client = e2e.client
    project, task, rgb = sam3_project(e2e, "e2e sam3 ui")
    height, width = rgb.shape[:2]
    # What SAM 3 itself finds on the same weights, picture and threshold.
    expected = predictor.find(predictor.encode(rgb), PHRASE, LOW_THRESHOLD)
    assert len(expected.scores) >= 2, "the tiny SAM 3 must find several instances for this test to mean anything"
    open_task(page, e2e.ls.url, project["id"], task["id"])
    shot("01_task_opened")

    body = ask(page, PHRASE)
    assert "errors" not in body, body
    result = body["data"]["result"]
    brushes = [r for r in result if r["type"] == "brushlabels"]
    [cleared] = [r for r in result if r.get("id") == MESSAGE_ID]
    assert cleared["value"] == {"text": []}  # instances found: no message
    assert len(brushes) == len(expected.scores)
    # Each instance is one region carrying SAM 3's score (LISA's regions carry none), labelled as today.
    assert sorted(r["score"] for r in brushes) == pytest.approx(sorted(expected.scores.tolist()), abs=1e-4)
    got = sorted((rle_to_mask(r["value"]["rle"], height, width) for r in brushes), key=lambda m: int(m.sum()))
    want = sorted(expected.masks, key=lambda m: int(m.sum()))
    for mask, ref in zip(got, want):
        assert float(np.mean(mask != ref)) <= 0.001
    for region in brushes:
        assert region["origin"] == "prediction" and region["value"]["brushlabels"] == ["Target"]
        assert region["meta"]["family"] == "sam3"

    n = len(brushes)
    page.locator(".lsf-auto-accept__info").filter(has_text=f"{n} suggestions").wait_for()
    shot("02_suggestions_shown")
    accept_suggestions(page, n)
    shot("03_suggestions_accepted")
    saved = submit_annotation(page, client, task["id"])
    annotation_id = saved["id"]
    shot("04_submitted")
    kept = [r for r in saved["result"] if r["type"] == "brushlabels"]
    assert len(kept) == n and all(r["origin"] == "prediction" for r in kept)

    # Captured like LISA's answers, recording the family that proposed the masks (one mask per label).
    dataset = e2e.stack.workdir / "model_dir" / "dataset" / f"project-{project['id']}"
    sample = f"ls-{project['id']}-{annotation_id}"
    wait_for(lambda: (dataset / "samples" / f"{sample}.json").exists(), 30, "the captured sample")
    record = Dataset.open(dataset, create=False).read_sample(sample)
    assert record["queries"] == [PHRASE] and record["model_families"] == ["sam3"], record



def test_a_click_without_query_on_a_sam3_project_is_the_trackers_mask(sam3_stack: LisaStack,
                                                                      label_studio: LabelStudio, e2e_artifacts: Path,
                                                                      browser_page, sam3_predictor):  # noqa: F811
    """Plain interactive segmentation: the smart key point, no query typed, gives one region, SAM 3's tracker
    mask for that point on the cached embedding (the same mask and score the predictor's own click gives)."""
    page, _blocked = browser_page
    e2e = E2E(label_studio, sam3_stack, e2e_artifacts)
    project, task, rgb = sam3_project(e2e, "e2e sam3 click")
    height, width = rgb.shape[:2]
    with screenshots(page, e2e.artifacts, "sam3_ui_click") as shot:
        open_task(page, e2e.ls.url, project["id"], task["id"])
        page.locator("button.lsf-tool_smart").first.hover()
        page.locator(".lsf-tool__extra button[aria-label='key-point-tool']").click()
        page.locator(".lsf-label", has_text="Include").first.click()
        image = page.evaluate(  # the labeling image: the largest (the task list shows a thumbnail)
            "() => { const i = Array.from(document.querySelectorAll('img')).sort((a, b) =>"
            " b.width * b.height - a.width * a.height)[0]; i.scrollIntoView({block: 'center'});"
            " const r = i.getBoundingClientRect(); return {x: r.x, y: r.y, width: r.width, height: r.height}; }")
        x = image["x"] + CLICK_AT[0] / width * image["width"]
        y = image["y"] + CLICK_AT[1] / height * image["height"]
        with page.expect_request(lambda r: "interactive-annotating" in r.url) as sent, \
                page.expect_response(lambda r: "interactive-annotating" in r.url, timeout=STEP_TIMEOUT_MS) as got:
            page.mouse.click(x, y)
        [point] = json.loads(sent.value.post_data)["context"]["result"]
        assert point["type"] == "keypointlabels" and point["value"]["keypointlabels"] == ["Include"]
        # The click in pixels, as the backend reads Label Studio's percent.
        px, py = point["value"]["x"] * width / 100, point["value"]["y"] * height / 100
        assert abs(px - CLICK_AT[0]) < 3 and abs(py - CLICK_AT[1]) < 3, (px, py)
        body = got.value.json()
        assert "errors" not in body, body
        [region] = [r for r in body["data"]["result"] if r["type"] == "brushlabels"]
        clicked = sam3_predictor.click(sam3_predictor.encode(rgb), [(px, py, 1)], None)
        mask = rle_to_mask(region["value"]["rle"], height, width)
        assert clicked.mask.any() and float(np.mean(mask != clicked.mask)) <= 0.001
        assert region["score"] == pytest.approx(float(clicked.score), abs=1e-4)
        assert region["meta"]["family"] == "sam3" and region["origin"] == "prediction"
        page.locator(".lsf-auto-accept__info").filter(has_text="1 suggestion").wait_for()
        shot("suggested")
