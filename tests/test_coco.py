"""``lisa-ls export --format coco``: from a project (resynced through the loopback stand-in for Label Studio's API,
``tests/fake_ls.py``) and from an existing dataset folder; verified with ``pycocotools``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from fake_ls import TOKEN, FakeLabelStudio, Project, brush, textarea
from redis_fixtures import ROOT

from backend.coco import bbox, rle
from backend.dataset import read_mask

pycocotools = pytest.importorskip("pycocotools", reason="pycocotools (dev extra) verifies the export")
from pycocotools import mask as coco_mask  # noqa: E402
from pycocotools.coco import COCO  # noqa: E402
from pycocotools.cocoeval import COCOeval  # noqa: E402

H, W = 24, 32


def pieces(rng: np.random.Generator) -> np.ndarray:
    """A mask in several pieces, some with holes, some on the image's border (runs that start at pixel 0)."""
    mask = np.zeros((H, W), bool)
    for _ in range(int(rng.integers(1, 4))):
        y, x = rng.integers(0, H - 3), rng.integers(0, W - 3)
        mask[y:y + rng.integers(3, 12), x:x + rng.integers(3, 14)] = True
    mask[rng.integers(0, H), :] ^= rng.random(W) < 0.3
    return mask


@pytest.fixture
def project(tmp_path: Path):
    """Eight annotated tasks (two annotators on task 1; labels Target, Other and an ignore region), served."""
    proj, rng = Project(), np.random.default_rng(5)
    for t in range(1, 9):
        proj.add_task(t, W, H)
        proj.annotate(t, t, [textarea(f"object {t}"), brush(pieces(rng), origin="prediction"),
                             *([brush(pieces(rng), "Other")] if t % 3 == 0 else [])], t)
    proj.annotate(20, 1, [textarea("the same picture, another annotator"), brush(pieces(rng), "Other")], 30)
    proj.annotate(21, 2, [textarea("with an ignore region"), brush(pieces(rng), origin="prediction-changed"),
                          brush(pieces(rng), "Ignore")], 31)
    proj.annotate(22, 3, [textarea("no mask")], 32)  # skipped by the resync: not in the COCO files
    ls = FakeLabelStudio(proj)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "LABEL_STUDIO_URL": ls.url, "LABEL_STUDIO_API_KEY": TOKEN,
           "LISA_LS_DATASET_DIR": str(tmp_path / "datasets"), "LISA_LS_VAL_PERCENT": "50"}
    yield env
    ls.close()


def export(env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "backend.cli", "export", *args], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=120)


def verify(out: Path, dataset: Path) -> dict[str, int]:
    """Every annotation of both files against the dataset's masks; COCOeval of each file against itself. Returns
    the annotations per sample id and the instances per split (``"train instances"``, ``"val instances"``)."""
    samples = {p.stem: json.loads(p.read_text()) for p in (dataset / "samples").glob("*.json")}
    seen: dict[str, int] = {}
    counts: dict[str, int] = {}
    categories = None
    for split in ("train", "val"):
        coco = COCO(str(out / "annotations" / f"instances_{split}.json"))
        assert categories is None or coco.dataset["categories"] == categories  # the same ids in both files
        categories = coco.dataset["categories"]
        names = {c["id"]: c["name"] for c in categories}
        for image in coco.dataset["images"]:
            assert (out / "images" / image["file_name"]).is_file()
        for ann in coco.dataset["annotations"]:
            sample = samples[ann["lisa_sample"]]
            assert sample["split"] == split
            image = coco.imgs[ann["image_id"]]
            assert dataset / sample["image"] == dataset / "images" / image["file_name"]
            if ann.get("lisa_ignore"):
                expected = read_mask(dataset / sample["ignore"])
                assert ann["iscrowd"] == 1
            else:
                k = sample["labels"].index(names[ann["category_id"]])
                expected = read_mask(dataset / sample["masks"][k])
                assert ann["iscrowd"] == 0 and ann["origin"] == sample["origins"][k]
                assert ann["query"] == sample["queries"][0] and ann["queries"] == sample["queries"]
            assert np.array_equal(coco.annToMask(ann).astype(bool), expected)
            assert ann["area"] == int(expected.sum())
            rle_pc = coco_mask.frPyObjects(ann["segmentation"], *ann["segmentation"]["size"])
            assert ann["bbox"] == coco_mask.toBbox(rle_pc).tolist()
            seen[ann["lisa_sample"]] = seen.get(ann["lisa_sample"], 0) + 1
        found = [{"image_id": a["image_id"], "category_id": a["category_id"], "score": 1.0,
                  "segmentation": coco_mask.frPyObjects(a["segmentation"], *a["segmentation"]["size"])}
                 for a in coco.dataset["annotations"] if not a["iscrowd"]]
        counts[split] = len(found)
        if not found:
            continue
        evaluation = COCOeval(coco, coco.loadRes(found), "segm")
        evaluation.evaluate()
        evaluation.accumulate()
        evaluation.summarize()
        assert evaluation.stats[0] == 1.0 and evaluation.stats[1] == 1.0  # AP@[.5:.95] and AP@.5
    assert set(seen) == set(samples)  # every sample is in the export
    seen.update({f"{split} instances": n for split, n in counts.items()})
    return seen


def test_a_project_and_its_dataset_folder_export_the_same_coco(project, tmp_path):
    out = tmp_path / "coco"
    run = export(project, "--project", "1", "--format", "coco", "--out", str(out), "--page-size", "3")
    assert run.returncode == 0, run.stderr
    assert "written 10, updated 0, unchanged 0, newer-kept 0, deleted 0, skipped 1" in run.stdout
    dataset = tmp_path / "datasets" / "project-1"
    seen = verify(out, dataset)
    assert seen["ls-1-21"] == 2 and seen["ls-1-3"] == 2  # an ignore region; two labels
    assert seen["train instances"] and seen["val instances"]  # both splits hold samples
    train = json.loads((out / "annotations" / "instances_train.json").read_text())
    assert [c["name"] for c in train["categories"]] == ["Target", "Other"]
    assert len(list((out / "images").iterdir())) == 8  # task 1's picture once for its two annotations
    again = tmp_path / "from-folder"
    run = export(project, "--dataset", str(dataset), "--format", "coco", "--out", str(again))
    assert run.returncode == 0, run.stderr
    for split in ("train", "val"):
        a, b = (json.loads((o / "annotations" / f"instances_{split}.json").read_text()) for o in (out, again))
        assert {k: v for k, v in a.items() if k != "info"} == {k: v for k, v in b.items() if k != "info"}


def test_bad_exports_are_refused_and_change_nothing(project, tmp_path):
    out = tmp_path / "busy"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    run = export(project, "--project", "1", "--format", "coco", "--out", str(out))
    assert run.returncode == 2 and "is not an empty folder" in run.stderr and "nothing was written" in run.stderr
    assert [p.name for p in out.iterdir()] == ["notes.txt"] and (out / "notes.txt").read_text() == "keep me"
    assert not (tmp_path / "datasets").exists()  # refused before the resync too
    run = export(project, "--project", "1", "--format", "coco")
    assert run.returncode == 2 and "needs --out DIR" in run.stderr
    run = export(project, "--dataset", str(tmp_path / "nowhere"), "--format", "coco", "--out", str(tmp_path / "x"))
    assert run.returncode == 2 and "is not a lisa-ls dataset" in run.stderr
    run = export(project, "--format", "coco", "--out", str(tmp_path / "y"))
    assert run.returncode == 2 and "give --project ID" in run.stderr
    assert export(project, "--dataset", str(tmp_path)).returncode == 2  # --dataset is for --format coco


def test_rle_and_bbox_match_pycocotools():
    rng = np.random.default_rng(9)
    for mask in [rng.random((7, 5)) < 0.5, np.ones((3, 4), bool), np.eye(6, dtype=bool)]:
        ours = coco_mask.frPyObjects(rle(mask), *mask.shape)
        theirs = coco_mask.encode(np.asfortranarray(mask.astype(np.uint8)))
        assert ours["counts"] == theirs["counts"]
        assert bbox(mask) == coco_mask.toBbox(theirs).tolist()
