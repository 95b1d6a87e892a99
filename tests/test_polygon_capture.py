"""Polygon corrections become dataset samples: ``/webhook`` on a real gunicorn backend with real Redis, images from
the loopback stand-in for Label Studio (``tests/fake_ls.py``); bad polygons are skipped with their reason and never
cost a sample already captured."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import requests
from fake_ls import FakeLabelStudio, Project, brush, textarea
from test_capture import drain, env_for, records

from backend.dataset import read_mask
from backend.labeling import parse_labeling_config
from backend.shapes import prediction

pytest_plugins = ["redis_fixtures", "backend_fixtures"]

POLYGON_CONFIG = """<View><Image name="image" value="$image"/><TextArea name="query" toName="image"/>
<BrushLabels name="mask" toName="image"><Label value="Target"/><Label value="Other"/></BrushLabels>
<PolygonLabels name="outline" toName="image"><Label value="Target"/><Label value="Other"/></PolygonLabels></View>"""
H, W = 24, 32


def polygon(points: list[list[float]], label: str = "Target", rid: str = "p1") -> dict:
    return {"id": rid, "type": "polygonlabels", "from_name": "outline", "to_name": "image", "origin": "manual",
            "original_width": W, "original_height": H, "image_rotation": 0,
            "value": {"points": points, "closed": True, "polygonlabels": [label]}}


def with_config(event: dict) -> dict:
    event["project"]["label_config"] = POLYGON_CONFIG
    return event


def post(url: str, event: dict) -> None:
    assert requests.post(url + "/webhook", json=event, timeout=5).status_code == 200


def test_polygon_annotations_become_samples_and_bad_ones_keep_the_last_good(queue_config, start_backend,
                                                                            tmp_path: Path) -> None:
    project = Project()
    for t in (1, 2):
        project.add_task(t, W, H)
    # The mask LISA proposed, as the polygon suggestions /predict makes of it (unsimplified), accepted as they are.
    mask = np.zeros((H, W), bool)
    mask[2:10, 3:12] = True
    mask[14:22, 18:30] = True
    mask[16:20, 22:26] = False  # a hole: polygons have none, so the sample's mask has it filled
    setup = parse_labeling_config(POLYGON_CONFIG)
    suggested = prediction(mask[None], [0.9], setup, "Target", "tiny-1", "the two boxes", tolerance=0.0)["result"]
    suggested = [r for r in suggested if r["type"] == "polygonlabels"]
    assert len(suggested) == 2
    filled = mask.copy()
    filled[16:20, 22:26] = True
    brush_only = np.zeros((H, W), bool)
    brush_only[0:2, 0:32] = True
    triangle = [[50.0, 50.0], [90.0, 50.0], [90.0, 95.0]]
    events = {
        "ls-1-1": project.annotate(1, 1, [textarea("the two boxes"), *suggested], 1),
        "ls-1-2": project.annotate(2, 1, [textarea("the boxes and a strip"), *suggested, brush(brush_only)], 1),
        "ls-1-3": project.annotate(3, 2, [textarea("a triangle"), polygon(triangle, "Other")], 1),
        "ls-1-4": project.annotate(4, 2, [textarea("two points"), polygon([[10, 10], [20, 20]])], 1),
        "ls-1-5": project.annotate(5, 2, [textarea("off the image"), polygon([[10, 10], [150, 10], [50, 50]])], 1),
    }
    ls = FakeLabelStudio(project)
    backend = start_backend(queue_config, env_for(ls, tmp_path))
    for event in events.values():
        post(backend.url, with_config(event))
    drain(queue_config)
    folder = tmp_path / "datasets" / "project-1"
    samples, skipped = records(folder / "samples"), records(folder / "skipped")
    assert set(samples) == {"ls-1-1", "ls-1-2", "ls-1-3"} and set(skipped) == {"ls-1-4", "ls-1-5"}

    first = samples["ls-1-1"]
    assert first["labels"] == ["Target"] and first["origins"] == ["prediction"]
    assert first["model_versions"] == ["tiny-1"] and first["queries"] == ["the two boxes"]
    assert np.array_equal(read_mask(folder / first["masks"][0]), filled)  # the same sample as the brush of it
    both = samples["ls-1-2"]
    assert both["origins"] == ["prediction-changed"]  # accepted polygons and a hand-drawn brush, merged
    assert np.array_equal(read_mask(folder / both["masks"][0]), filled | brush_only)
    tri = read_mask(folder / samples["ls-1-3"]["masks"][0])
    assert samples["ls-1-3"]["labels"] == ["Other"] and samples["ls-1-3"]["origins"] == ["manual"]
    assert tri[20, 27] and not tri[20, 20] and not tri[11, 20]  # inside; left of the hypotenuse; above the base
    assert skipped["ls-1-4"]["code"] == "bad_polygon" and "needs at least 3" in skipped["ls-1-4"]["reason"]
    assert "'p1' (Target)" in skipped["ls-1-4"]["reason"]
    assert "outside the 32x24 image" in skipped["ls-1-5"]["reason"]

    # The annotator drags a point of the triangle across an edge: the new version is refused with the reason, and
    # the sample of the last good version stays until it is fixed.
    bow_tie = [[50.0, 50.0], [90.0, 95.0], [90.0, 50.0], [50.0, 95.0]]
    post(backend.url, with_config(project.annotate(3, 2, [textarea("a triangle"), polygon(bow_tie, "Other")], 2)))
    drain(queue_config)
    kept = json.loads((folder / "samples" / "ls-1-3.json").read_text())
    assert kept["updated_at"] == samples["ls-1-3"]["updated_at"]
    assert np.array_equal(read_mask(folder / kept["masks"][0]), tri)
    refused = json.loads((folder / "skipped" / "ls-1-3.json").read_text())
    assert refused["code"] == "bad_polygon" and "crosses itself" in refused["reason"]
    # Fixed: the new version replaces the old sample and the skipped record goes.
    square = [[50.0, 50.0], [90.0, 50.0], [90.0, 95.0], [50.0, 95.0]]
    post(backend.url, with_config(project.annotate(3, 2, [textarea("a square"), polygon(square, "Other")], 3)))
    drain(queue_config)
    assert json.loads((folder / "samples" / "ls-1-3.json").read_text())["queries"] == ["a square"]
    assert not (folder / "skipped" / "ls-1-3.json").exists()
    assert "Traceback" not in backend.log()
    ls.close()
