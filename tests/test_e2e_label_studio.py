"""End to end through a real Label Studio 1.23.2 (REST API), the real backend, Redis and a tiny-LISA CPU worker.

What Label Studio itself does is exercised here, not mocked: it validates the connection (``/health``,
``/setup``), forwards ``interactive-annotating`` to ``/predict``, runs the Data Manager's "Retrieve Predictions"
and stores Prediction rows, and sends the ``ANNOTATION_CREATED`` webhook to ``/webhook``. The worker runs the
untrained fixture LISA (``tests/fixtures/lisa_tiny``), whose masks for the fixture queries are recorded from
LISA's own code, so the masks that come back through Label Studio are checked against those references.
"""

from __future__ import annotations

import numpy as np
import pytest
from ls_fixtures import E2E, MAX_MASK_MISMATCH, case_png, reference_mask, textarea_context
from PIL import Image
from redis_fixtures import wait_for

from backend.brush import rle_to_mask

pytest_plugins = ["ls_fixtures", "redis_fixtures"]

pytestmark = pytest.mark.slow

CASES = {  # case -> query that the tiny LISA answers with [SEG] (LISA's own code recorded the mask)
    1: "What is the red object in this image? Please output segmentation mask.",
    2: "Which shape has no corners? Please respond with segmentation mask.",
}


def png_size(case: int) -> tuple[int, int]:
    with Image.open(case_png(case)) as im:
        return im.size


def worker_version(e2e: E2E) -> str:
    [worker] = e2e.stack.health()["workers"]
    return worker["model_version"]


def check_region(region: dict, case: int) -> np.ndarray:
    """A brush region the backend made for ``case``: its fields, and its mask decoded at the image size."""
    width, height = png_size(case)
    assert region["type"] == "brushlabels" and region["from_name"] == "mask" and region["to_name"] == "image"
    assert region["origin"] == "prediction"
    assert (region["original_width"], region["original_height"]) == (width, height)
    assert region["value"]["format"] == "rle" and region["value"]["brushlabels"] == ["Target"]
    assert "score" not in region and isinstance(region["meta"]["sam_score"], float)  # uncalibrated: not shown
    mask = rle_to_mask(region["value"]["rle"], height, width)
    assert mask.shape == (height, width) and mask.dtype == bool
    mismatch = float(np.mean(mask != reference_mask(case)))
    assert mismatch <= MAX_MASK_MISMATCH, f"case {case}: {mismatch:.2%} of pixels differ from LISA's recorded mask"
    return mask


@pytest.fixture(scope="module")
def project(e2e: E2E) -> dict:
    """A project with the recommended config, the backend connected (interactive), and the 3 fixture images."""
    client = e2e.client
    proj = client.create_project("e2e api")
    ml = client.connect_ml_backend(proj["id"], e2e.stack.url, title="LISA (e2e)")
    tasks = client.upload_images(proj["id"], [case_png(c) for c in (1, 2, 3)])
    return {"id": proj["id"], "ml": ml, "tasks": {c: t["id"] for c, t in zip((1, 2, 3), tasks)}}


def test_label_studio_connects_the_backend_with_the_worker_model_version(e2e: E2E, project: dict):
    ml = e2e.client.ml_backend(project["ml"]["id"])
    assert ml["state"] == "CO", ml  # Connected: /health and /setup answered
    assert ml["is_interactive"] is True
    assert ml["model_version"] == worker_version(e2e)
    assert ml["model_version"].startswith("lisa_tiny/checkpoint@")
    hooks = e2e.client.get("/api/webhooks", params={"project": project["id"]})
    assert any(h["url"] == f"{e2e.stack.url}/webhook" for h in hooks), hooks  # LS adds it with the backend


def test_interactive_annotating_returns_the_mask_at_the_image_size(e2e: E2E, project: dict):
    """The call the labeling UI makes after a query is typed: LS -> /predict -> queue -> worker -> brush."""
    for case, query in CASES.items():
        body = e2e.client.interactive_annotating(project["ml"]["id"], project["tasks"][case], textarea_context(query))
        assert "errors" not in body, body
        data = body["data"]
        assert data["model_version"] == worker_version(e2e)
        [region, said] = data["result"]  # the fixture answers carry one [SEG]; the message box is cleared
        assert (said["from_name"], said["value"]) == ("lisa", {"text": []})
        mask = check_region(region, case)
        assert mask.any() and region["meta"]["prompt"] == query
        assert data["score"] is None


def test_interactive_annotating_without_a_query_answers_an_empty_result(e2e: E2E, project: dict):
    """Label Studio calls this way just after Submit (the prompt area is destroyed): a no-op, never an error."""
    body = e2e.client.interactive_annotating(project["ml"]["id"], project["tasks"][1], {"result": []})
    assert body["data"]["result"] == [], body


def test_batch_predictions_are_stored_with_the_model_version(e2e: E2E):
    """Data Manager → Retrieve Predictions on tasks whose data carries the query (one task without a query)."""
    client = e2e.client
    proj = client.create_project("e2e batch")
    client.connect_ml_backend(proj["id"], e2e.stack.url, title="LISA (e2e batch)")
    tasks = dict(zip((1, 2, 3), client.upload_images(proj["id"], [case_png(c) for c in (1, 2, 3)])))
    queries = {1: "the red object", 2: CASES[2]}  # a short phrase: the backend phrases it as case 1's question
    for case, query in queries.items():
        client.set_task_data(tasks[case]["id"], {**tasks[case]["data"], "query": query})
    assert not any(client.predictions(t["id"]) for t in tasks.values())

    client.retrieve_predictions(proj["id"])
    version = worker_version(e2e)
    for case in queries:
        preds = wait_for(lambda c=case: client.predictions(tasks[c]["id"]), 30, f"a prediction for case {case}")
        [pred] = preds
        assert pred["model_version"] == version
        [region] = pred["result"]
        assert check_region(region, case).any()
    assert client.predictions(tasks[3]["id"]) == []  # no query: nothing stored


def test_submitted_annotation_reaches_the_backend_webhook(e2e: E2E, project: dict):
    client, task = e2e.client, project["tasks"][1]
    context = textarea_context(CASES[1])
    [region, _said] = client.interactive_annotating(project["ml"]["id"], task, context)["data"]["result"]
    annotation = client.create_annotation(task, [*context["result"], region])
    [saved] = [r for r in client.annotations(task) if r["id"] == annotation["id"]]
    brush = [r for r in saved["result"] if r["type"] == "brushlabels"]
    assert [r["origin"] for r in brush] == ["prediction"]

    def webhook_logged() -> bool:
        return any("webhook ANNOTATION_CREATED" in line and f"annotation={annotation['id']}" in line
                   for line in e2e.stack.backend_log().splitlines())

    wait_for(webhook_logged, 10, f"the backend to log webhook ANNOTATION_CREATED for annotation {annotation['id']}")

