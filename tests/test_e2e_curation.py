"""Curation features end to end through a real Label Studio 1.23.2 (REST API), the real backend, Redis and a
tiny-LISA CPU worker (``tests/ls_fixtures.py``): polygon suggestions and their refinement, polygon annotations
captured from Label Studio's webhook, multi-class pre-labelling from the connection's Extra params, and the COCO
export of the result."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from ls_client import labeling_config
from ls_fixtures import E2E, LSError, case_png, reference_mask, textarea_context
from PIL import Image
from redis_fixtures import ROOT, wait_for
from scipy import ndimage
from test_coco import verify

from backend.brush import rle_to_mask
from backend.config import BackendConfig
from backend.polygons import MAX_POLYGONS, rasterize, region_points, trace
from backend.shapes import MASK_TYPES

pytest_plugins = ["ls_fixtures", "redis_fixtures"]
pytestmark = pytest.mark.slow

QUERY = {1: "What is the red object in this image? Please output segmentation mask.",
         2: "Which shape has no corners? Please respond with segmentation mask."}
#: The recommended config with polygons instead of a brush.
POLYGONS = labeling_config().replace("BrushLabels", "PolygonLabels").replace('name="mask"', 'name="outline"')
#: Brush and polygons, two labels each (multi-class pre-labelling).
TWO_LABELS = labeling_config().replace(
    '<Label value="Target" background="#ff3b30"/>\n  </BrushLabels>',
    '<Label value="Target" background="#ff3b30"/><Label value="Other" background="#007aff"/>\n  </BrushLabels>\n'
    '  <PolygonLabels name="outline" toName="image"><Label value="Target"/><Label value="Other"/></PolygonLabels>')


def size(case: int) -> tuple[int, int]:
    with Image.open(case_png(case)) as im:
        return im.size


def outline_mask(regions: list[dict], width: int, height: int) -> np.ndarray:
    return rasterize([region_points(r, width, height) for r in regions if r["type"] == "polygonlabels"], width,
                     height)


def expected_outline(case: int) -> np.ndarray:
    """What the polygons of LISA's recorded mask for ``case`` cover, with the backend's default settings."""
    config = BackendConfig()
    mask = reference_mask(case)
    height, width = mask.shape
    return rasterize(trace(mask, config.polygon_tolerance, config.min_area), width, height)


def iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / max(1, (a | b).sum()))


def click(x: float, y: float, width: int, height: int) -> dict:
    return {"result": [{"id": "k1", "from_name": "clicks", "to_name": "image", "type": "keypointlabels",
                        "origin": "manual", "original_width": width, "original_height": height, "image_rotation": 0,
                        "is_positive": True, "value": {"x": x, "y": y, "width": 0.5, "keypointlabels": ["Include"]}}]}


@pytest.fixture(scope="module")
def polygon_project(e2e: E2E) -> dict:
    client = e2e.client
    assert "PolygonLabels" in TWO_LABELS and "PolygonLabels" in POLYGONS
    proj = client.create_project("e2e polygons", POLYGONS)
    ml = client.connect_ml_backend(proj["id"], e2e.stack.url, title="LISA (polygons)")
    tasks = client.upload_images(proj["id"], [case_png(c) for c in (1, 2)])
    return {"id": proj["id"], "ml": ml, "tasks": {c: t["id"] for c, t in zip((1, 2), tasks)}}


def test_a_polygon_project_gets_polygon_suggestions_that_clicks_refine(e2e: E2E, polygon_project: dict):
    client, project = e2e.client, polygon_project
    width, height = size(1)
    body = client.interactive_annotating(project["ml"]["id"], project["tasks"][1], textarea_context(QUERY[1]))
    assert "errors" not in body, body
    regions = [r for r in body["data"]["result"] if r["type"] != "textarea"]
    assert len(regions) == MAX_POLYGONS and {r["type"] for r in regions} == {"polygonlabels"}
    [said] = [r for r in body["data"]["result"] if r["type"] == "textarea"]  # the untrained model's specks
    assert said["value"]["text"][0].startswith("LISA found ") and said["from_name"] == "lisa"
    for r in regions:
        assert (r["from_name"], r["to_name"], r["origin"]) == ("outline", "image", "prediction")
        assert (r["original_width"], r["original_height"]) == (width, height)
        assert r["value"]["polygonlabels"] == ["Target"] and r["meta"]["prompt"] == QUERY[1]
        assert all(0 <= v <= 100 for point in r["value"]["points"] for v in point)
    # LISA's recorded mask for this case (the untrained model's: hundreds of specks), as polygons and back.
    assert iou(outline_mask(regions, width, height), expected_outline(1)) > 0.98
    # A click refines the answer: the refined polygons keep the ids of those they refine (accepting replaces).
    refined = client.interactive_annotating(project["ml"]["id"], project["tasks"][1], click(30, 40, width, height))
    assert "errors" not in refined, refined
    again = [r for r in refined["data"]["result"] if r["type"] in MASK_TYPES]
    assert again and {r["type"] for r in again} == {"polygonlabels"}
    assert again[0]["id"] == regions[0]["id"] and "refined" in again[0]["meta"]


def test_retrieved_predictions_are_stored_with_polygon_regions(e2e: E2E, polygon_project: dict):
    client, task = e2e.client, polygon_project["tasks"][2]
    client.set_task_data(task, {**client.task(task)["data"], "query": QUERY[2]})
    client.retrieve_predictions(polygon_project["id"], [task])
    [pred] = wait_for(lambda: client.predictions(task), 60, "a stored prediction")
    width, height = size(2)
    assert pred["result"] and {r["type"] for r in pred["result"]} == {"polygonlabels"}
    # The worker's mask differs from the recorded one in a few pixels; among hundreds of specks that changes which
    # pieces are the 100 largest of at least 16 px, so the polygons are checked to lie in the recorded mask.
    outline, expected = outline_mask(pred["result"], width, height), expected_outline(2)
    assert iou(outline, expected) > 0.95
    recorded = ndimage.binary_dilation(ndimage.binary_fill_holes(reference_mask(2)))
    assert (outline & recorded).sum() > 0.99 * outline.sum()


def dataset_folder(e2e: E2E, project: int) -> Path:
    return e2e.stack.workdir / "model_dir" / "dataset" / f"project-{project}"


def test_submitted_polygon_annotations_are_captured_from_the_webhook(e2e: E2E, polygon_project: dict):
    client, project, task = e2e.client, polygon_project, polygon_project["tasks"][1]
    width, height = size(1)
    context = textarea_context(QUERY[1])
    suggested = client.interactive_annotating(project["ml"]["id"], task, context)["data"]["result"]
    annotation = client.create_annotation(task, [*context["result"], *suggested])
    [saved] = [a for a in client.annotations(task) if a["id"] == annotation["id"]]
    polygons = [r for r in saved["result"] if r["type"] == "polygonlabels"]
    assert polygons and {r["origin"] for r in polygons} == {"prediction"}
    folder = dataset_folder(e2e, project["id"])
    path = folder / "samples" / f"ls-{project['id']}-{annotation['id']}.json"
    wait_for(path.exists, 30, "the polygon annotation's sample")
    sample = json.loads(path.read_text())
    assert sample["origins"] == ["prediction"] and sample["queries"] == [QUERY[1]]
    with Image.open(folder / sample["masks"][0]) as im:
        mask = np.asarray(im) > 127
    assert np.array_equal(mask, outline_mask(polygons, width, height))
    # A polygon that crosses itself is refused with its reason (the sample above is untouched).
    bow_tie = {"id": "bad1", "from_name": "outline", "to_name": "image", "type": "polygonlabels", "origin": "manual",
               "original_width": width, "original_height": height, "image_rotation": 0,
               "value": {"points": [[10, 10], [60, 60], [60, 10], [10, 60]], "polygonlabels": ["Target"]}}
    bad = client.create_annotation(task, [*context["result"], bow_tie])
    skipped = folder / "skipped" / f"ls-{project['id']}-{bad['id']}.json"
    wait_for(skipped.exists, 30, "the bad polygon's skipped record")
    record = json.loads(skipped.read_text())
    assert record["code"] == "bad_polygon" and "crosses itself" in record["reason"]
    assert json.loads(path.read_text()) == sample


def test_multi_class_prelabel_from_the_extra_params_then_coco(e2e: E2E, tmp_path: Path):
    client = e2e.client
    queries = {"Target": QUERY[1], "Other": QUERY[2]}
    # A queries map naming a label the config lacks: /setup refuses it, so Label Studio refuses the connection
    # (1.23.2 shows only "422 ... Check the ML backend server console logs"; the backend's log says why).
    project = client.create_project("e2e multi-class", TWO_LABELS)["id"]
    with pytest.raises(LSError, match="422 Client Error"):
        client.connect_ml_backend(project, e2e.stack.url, title="LISA (bad)",
                                  extra_params={"queries": {"Target": QUERY[1], "Knife": "what one cuts it with"}})
    wait_for(lambda: "names the label 'Knife', which the labeling config's" in e2e.stack.backend_log(), 10,
             "the backend to log why /setup was refused")
    client.connect_ml_backend(project, e2e.stack.url, title="LISA (labels)", extra_params={"queries": queries})
    tasks = client.upload_images(project, [case_png(c) for c in (1, 2, 3)])
    env = {**e2e.stack.env(), "PYTHONPATH": str(ROOT), "MODEL_DIR": str(tmp_path / "md")}
    proc = subprocess.run([sys.executable, "-m", "backend.cli", "prelabel", "--project", str(project)], env=env,
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, (proc.stdout, proc.stderr)
    assert ": 3 done, 0 skipped, 0 failed" in proc.stdout.strip().splitlines()[-1]
    # The tiny model answers case 3's picture without [SEG] whatever is asked: nothing found there, for either label.
    per_label = proc.stdout.strip().splitlines()[-2]
    assert per_label.startswith("per label: Target: 2 task(s) with ") and "nothing found in 1; Other: 2" in per_label
    [nothing] = client.predictions(tasks[2]["id"])
    assert nothing["result"] == []
    for case, task in zip((1, 2), tasks):
        [pred] = client.predictions(task["id"])  # Label Studio's own Prediction rows
        width, height = size(case)
        kinds = {(r["type"], (r["value"].get("brushlabels") or r["value"].get("polygonlabels"))[0])
                 for r in pred["result"]}
        assert kinds == {(t, lab) for t in MASK_TYPES for lab in queries}
        for r in pred["result"]:
            lab = (r["value"].get("brushlabels") or r["value"].get("polygonlabels"))[0]
            assert r["meta"]["prompt"] == queries[lab]
            if r["type"] == "brushlabels":
                assert rle_to_mask(r["value"]["rle"], height, width).any()
        # The annotator accepts the suggestions: the annotation goes to the dataset, then to COCO.
        result = [{k: v for k, v in r.items() if k not in ("score", "readonly")} for r in pred["result"]]
        client.create_annotation(task["id"], [*textarea_context("the object")["result"], *result])
    out = tmp_path / "coco"
    export = subprocess.run([sys.executable, "-m", "backend.cli", "export", "--project", str(project), "--format",
                             "coco", "--out", str(out)], env={**env, "LISA_LS_DATASET_DIR": str(tmp_path / "ds")},
                            cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert export.returncode == 0, (export.stdout, export.stderr)
    seen = verify(out, tmp_path / "ds" / f"project-{project}")
    assert sum(v for k, v in seen.items() if k.endswith(" instances")) == 4  # 2 tasks x 2 labels
