"""``lisa-ls export --format coco``: a lisa-ls dataset as COCO instances, for training pipelines that read COCO.

Two ways in::

    lisa-ls export --project 3 --format coco --out DIR        # resync the project first, as a plain export does
    lisa-ls export --dataset data/dataset/project-3 --format coco --out DIR   # an existing dataset folder

``DIR`` must be new or empty (nothing is written otherwise). It gets::

    DIR/annotations/instances_train.json   the dataset's train split, in COCO's instances format
    DIR/annotations/instances_val.json     its val split (the split of backend.dataset: by image, so no image is
                                           in both)
    DIR/images/<sha256>.<ext>              every image once (the dataset's own file names: file_name)

Each file holds ``images`` (``id``, ``file_name``, ``width``/``height`` as the masks have them, i.e. EXIF applied,
``lisa_sha256``), ``categories`` (one per label, ``id`` from 1 in the order labels first appear in the dataset's
samples - the labeling config's order - the same in both files) and ``annotations``: one per mask of each sample,
i.e. per label of each annotation (Label Studio regions of one label are merged into one mask by capture), with

* ``segmentation``: uncompressed RLE, ``{"size": [height, width], "counts": [...]}`` (column-major run lengths,
  background first), read by ``pycocotools`` and the pipelines built on it; ``area`` (pixels), ``bbox``
  (``[x, y, width, height]`` of the mask's pixels), ``iscrowd`` 0;
* extra fields: ``query`` (the annotator's query, its first when there are several), ``queries``, ``origin``
  (``prediction``, ``prediction-changed``, ``manual``), ``model_version``, ``lisa_sample`` (the sample id).

A sample's ignore mask (labels containing "ignore") becomes an ``iscrowd`` 1 annotation of its first label's
category with ``lisa_ignore`` true: COCO's way of saying "leave these pixels out of the evaluation". An empty mask
has no instance to describe and is left out (counted in the report).

``tests/test_coco.py`` loads the files with ``pycocotools.coco.COCO``, checks ``annToMask`` of every annotation
against the dataset's mask, and scores the export against itself with ``COCOeval`` (1.0).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import shutil
import sys
from collections import Counter
from pathlib import Path
from typing import Any, TextIO

import numpy as np

from backend.dataset import Dataset, DatasetError, read_mask

SPLITS = ("train", "val")


class CocoExportError(Exception):
    """The export cannot start (the output folder is not empty, no dataset); nothing was written."""


def rle(mask: np.ndarray) -> dict[str, Any]:
    """COCO's uncompressed RLE of an ``H x W`` bool mask: run lengths over the column-major pixels, zeros first."""
    height, width = mask.shape
    flat = np.asarray(mask, dtype=bool).ravel(order="F")
    if flat.size == 0:
        return {"size": [int(height), int(width)], "counts": []}
    bounds = np.concatenate([[0], np.flatnonzero(flat[1:] != flat[:-1]) + 1, [flat.size]])
    counts = np.diff(bounds)
    if flat[0]:
        counts = np.concatenate([[0], counts])
    return {"size": [int(height), int(width)], "counts": counts.tolist()}


def bbox(mask: np.ndarray) -> list[float]:
    """``[x, y, width, height]`` of the set pixels (as ``pycocotools.mask.toBbox`` computes it)."""
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    return [float(cols[0]), float(rows[0]), float(cols[-1] - cols[0] + 1), float(rows[-1] - rows[0] + 1)]


def check_empty(out: Path) -> None:
    """Refuse an output folder that holds anything (an earlier export, a dataset): nothing is overwritten."""
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise CocoExportError(f"{out} is not an empty folder: export into a new or empty folder (nothing was "
                              "written, nothing in it was changed)")


def export_coco(dataset: Dataset, out: Path) -> dict[str, Any]:
    """Write ``dataset`` as COCO under ``out`` (new or empty); returns counts for the report."""
    check_empty(out)
    samples = sorted(dataset.samples(), key=lambda s: str(s.get("id")))
    categories: dict[str, int] = {}
    for sample in samples:
        for label in sample.get("labels") or []:
            categories.setdefault(label, len(categories) + 1)
    (out / "annotations").mkdir(parents=True, exist_ok=True)
    (out / "images").mkdir(exist_ok=True)
    counts: Counter[str] = Counter()
    image_ids: dict[str, int] = {}
    next_annotation = 1
    for split in SPLITS:
        images: list[dict[str, Any]] = []
        annotations: list[dict[str, Any]] = []
        listed: set[int] = set()
        for sample in (s for s in samples if s.get("split") == split):
            name = Path(str(sample["image"])).name
            if name not in image_ids:
                image_ids[name] = len(image_ids) + 1
                shutil.copyfile(dataset.root / sample["image"], out / "images" / name)
                counts["images"] += 1
            image_id = image_ids[name]
            if image_id not in listed:  # the samples of one image (several annotators) share its entry
                listed.add(image_id)
                images.append({"id": image_id, "file_name": name, "width": sample["width"],
                               "height": sample["height"], "lisa_sha256": name.split(".")[0]})
            queries = sample.get("queries") or []
            for k, (label, path) in enumerate(zip(sample["labels"], sample["masks"])):
                mask = read_mask(dataset.root / path)
                if not mask.any():
                    counts["empty masks"] += 1
                    continue
                annotations.append({
                    "id": next_annotation, "image_id": image_id, "category_id": categories[label],
                    "segmentation": rle(mask), "area": int(mask.sum()), "bbox": bbox(mask), "iscrowd": 0,
                    "query": queries[0] if queries else "", "queries": queries,
                    "origin": (sample.get("origins") or [None] * (k + 1))[k],
                    "model_version": (sample.get("model_versions") or [None] * (k + 1))[k],
                    "model_family": (sample.get("model_families") or [None] * (k + 1))[k],
                    "lisa_sample": sample["id"],
                })
                next_annotation += 1
                counts[f"{split} annotations"] += 1
            if sample.get("ignore"):
                ignore = read_mask(dataset.root / sample["ignore"])
                if ignore.any():
                    annotations.append({
                        "id": next_annotation, "image_id": image_id, "category_id": categories[sample["labels"][0]],
                        "segmentation": rle(ignore), "area": int(ignore.sum()), "bbox": bbox(ignore),
                        "iscrowd": 1, "lisa_ignore": True, "lisa_sample": sample["id"],
                    })
                    next_annotation += 1
                    counts["ignore regions"] += 1
            counts[f"{split} samples"] += 1
        body = {
            "info": {"description": f"lisa-ls dataset {dataset.root} ({split} split)", "version": "1",
                     "date_created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
                     "lisa_project_id": dataset.meta.get("project_id")},
            "licenses": [], "images": images, "annotations": annotations,
            "categories": [{"id": i, "name": label, "supercategory": "lisa"} for label, i in categories.items()],
        }
        (out / "annotations" / f"instances_{split}.json").write_text(json.dumps(body, ensure_ascii=False) + "\n")
    counts["categories"] = len(categories)
    return dict(counts)


def run_coco_export(args: argparse.Namespace, out: TextIO | None = None, err: TextIO | None = None) -> int:
    """``lisa-ls export --format coco``: exit 0 done, 1 the resync had annotations to retry (the COCO files hold
    what the dataset holds), 2 usage, configuration or Label Studio error (nothing written under ``--out``)."""
    from backend.config import BackendConfig
    from backend.export import dataset_folder, run_export

    out, err = out or sys.stdout, err or sys.stderr
    code = 0
    try:
        if not args.out:
            raise CocoExportError("--format coco needs --out DIR, the folder to write the COCO files into")
        target = Path(args.out)
        check_empty(target)
        if args.project is None and not args.dataset:
            raise CocoExportError("give --project ID (resync it from Label Studio first) or --dataset DIR")
        if args.project is not None:
            config = BackendConfig.from_env()
            folder = dataset_folder(config, args.project, args.dataset)
            if folder.resolve() == target.resolve():
                raise CocoExportError("--out must be another folder than the dataset")
            code = run_export(argparse.Namespace(project=args.project, out=str(folder), page_size=args.page_size),
                              out, err)
            if code == 2:
                return 2
        else:
            folder = Path(args.dataset)
        dataset = Dataset.open(folder, create=False)
        counts = export_coco(dataset, target)
    except (CocoExportError, DatasetError, ValueError, OSError) as e:
        print(f"lisa-ls export: {e}", file=err)
        return 2
    print(f"lisa-ls export: {folder} -> COCO {target}: " + ", ".join(f"{v} {k}" for k, v in counts.items()),
          file=out)
    return code
