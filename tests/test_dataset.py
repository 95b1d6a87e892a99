"""The dataset format: built from annotations (``backend.samples``), written (``backend.dataset``), read back by the
model's torch-free reader (``model.data``), and LISA's ReasonSeg folders read beside it."""

from __future__ import annotations

import hashlib
import io
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from backend import dataset as ds
from backend.brush import mask_to_rle
from backend.images import FetchedImage, ImageFetchError, inspect_image
from backend.samples import RetryLater, SkipSample, build_sample, ls_id
from model.data import load_samples, rasterize

CONFIG = """<View><Image name="image" value="$image"/><TextArea name="query" toName="image"/>
<BrushLabels name="mask" toName="image"><Label value="Target"/><Label value="Other"/><Label value="Ignore"/>
</BrushLabels></View>"""
H, W = 24, 32


def png(width: int = W, height: int = H, seed: int = 0) -> bytes:
    rng = np.random.default_rng(seed)
    out = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (height, width, 3), dtype=np.uint8)).save(out, format="PNG")
    return out.getvalue()


def rotated_jpeg() -> bytes:
    """A 32 x 24 JPEG whose EXIF says "rotate 90°": Label Studio (and the masks) see it as 24 x 32."""
    exif = Image.Exif()
    exif[0x0112] = 6
    out = io.BytesIO()
    Image.new("RGB", (W, H), (200, 30, 30)).save(out, format="JPEG", exif=exif)
    return out.getvalue()


def fetcher(data: bytes):
    def fetch(value: str, task_id: int | None) -> FetchedImage:
        fmt, width, height = inspect_image(data)
        return FetchedImage(data, hashlib.sha256(data).hexdigest(), fmt, width, height, value)

    return fetch


def rect(y0: int, y1: int, x0: int, x1: int, h: int = H, w: int = W) -> np.ndarray:
    m = np.zeros((h, w), bool)
    m[y0:y1, x0:x1] = True
    return m


def region(mask: np.ndarray, label: str = "Target", origin: str = "manual", **extra) -> dict:
    h, w = mask.shape
    return {"type": "brushlabels", "from_name": "mask", "to_name": "image", "origin": origin, "original_width": w,
            "original_height": h, "value": {"format": "rle", "rle": mask_to_rle(mask), "brushlabels": [label]},
            **extra}


def annotation(*regions: dict, query: str | None = "the red thing", aid: int = 7, **extra) -> dict:
    result = [{"type": "textarea", "from_name": "query", "to_name": "image", "value": {"text": [query]}}] if query \
        else []
    return {"id": aid, "task": 3, "project": 1, "completed_by": 2, "result": result + list(regions),
            "created_at": "2026-01-02T10:00:00.000000Z", "updated_at": "2026-01-02T10:05:00.000000Z", **extra}


TASK = {"id": 3, "data": {"image": "/data/upload/1/a.png"}}


def test_backend_writes_what_the_model_reads(tmp_path: Path) -> None:
    a, b = rect(2, 10, 3, 12), rect(8, 20, 10, 25)
    ann = annotation(region(a, origin="prediction", meta={"model_version": "v3"}),
                     region(b, origin="manual"), region(rect(0, 4, 0, 4), "Other", origin="prediction"),
                     region(rect(9, 12, 0, 32), "Ignore"))
    draft = build_sample(ann, TASK, CONFIG, fetcher(png()))
    data = ds.Dataset.open(tmp_path / "d", project_id=1, val_percent=10)
    with data.lock():
        assert data.commit(draft, "webhook") == "written"
        assert data.commit(draft, "webhook") == "unchanged"
    record = data.read_sample("ls-1-7")
    assert record["labels"] == ["Target", "Other"] and record["masks"] == ["masks/ls-1-7_0.png", "masks/ls-1-7_1.png"]
    assert record["origins"] == ["prediction-changed", "prediction"] and record["model_versions"] == ["v3", None]
    assert record["ignore"] == "masks/ls-1-7_ignore.png" and (record["width"], record["height"]) == (W, H)
    assert record["split"] == ds.split_for(record["image"][7:71], 10) and record["annotator"] == 2
    assert list(record) == [k for k in ds.FIELDS if k in record]
    assert not list((tmp_path / "d").rglob("*.tmp"))

    [sample] = load_samples(tmp_path / "d")
    assert sample.id == "ls-1-7" and sample.queries == ["the red thing"] and sample.labels == ["Target", "Other"]
    assert sample.image.shape == (H, W, 3) and np.array_equal(sample.image, np.asarray(Image.open(io.BytesIO(png()))))
    target, other = sample.masks
    ignore = rect(9, 12, 0, 32)
    assert target.dtype == np.uint8 and set(np.unique(target)) <= {0, 1, 255}
    assert np.array_equal(target == 255, ignore) and np.array_equal(other == 255, ignore)
    assert np.array_equal(target == 1, (a | b) & ~ignore) and np.array_equal(other == 1, rect(0, 4, 0, 4) & ~ignore)
    assert load_samples([tmp_path / "d"], split="val" if sample.split == "train" else "train") == []


def test_exif_rotated_images_keep_label_studios_orientation(tmp_path: Path) -> None:
    mask = rect(0, 5, 0, 24, h=W, w=H)  # Label Studio shows the image 24 wide, 32 high
    draft = build_sample(annotation(region(mask)), TASK, CONFIG, fetcher(rotated_jpeg()))
    data = ds.Dataset.open(tmp_path)
    with data.lock():
        data.commit(draft, "export")
    assert data.read_sample("ls-1-7")["image"].endswith(".jpg")
    [sample] = load_samples(tmp_path)
    assert sample.image.shape == (W, H, 3) and sample.masks[0].shape == (W, H)
    assert np.array_equal(sample.masks[0] == 1, mask)


def test_a_refined_suggestion_is_captured_as_its_query_and_final_mask(tmp_path: Path) -> None:
    """Clicks are metadata: the sample is (image, query, final mask), even with the query text deleted."""
    final = rect(2, 10, 3, 12)
    refined = {"prompt": "the red thing", "model_version": "v4",
               "refined": {"points": [[5.0, 6.0, 0], [7.5, 3.0, 1]], "box": None}}
    leftover = {"type": "keypointlabels", "from_name": "clicks", "to_name": "image", "is_positive": False,
                "value": {"x": 10.0, "y": 20.0, "width": 0.3, "keypointlabels": ["Exclude"]}}
    ann = annotation(region(final, origin="prediction-changed", id="r1", meta=refined), leftover, query=None)
    data = ds.Dataset.open(tmp_path)
    with data.lock():
        data.commit(build_sample(ann, TASK, CONFIG, fetcher(png())), "webhook")
    record = data.read_sample("ls-1-7")
    assert record["queries"] == ["the red thing"] and record["origins"] == ["prediction-changed"]
    assert record["refinements"] == [
        {"region": "r1", "points": [[5.0, 6.0, 0], [7.5, 3.0, 1]], "box": None},
        {"type": "keypointlabels", "value": leftover["value"], "is_positive": False}]
    [sample] = load_samples(tmp_path)
    assert sample.queries == ["the red thing"] and np.array_equal(sample.masks[0] == 1, final)
    with pytest.raises(SkipSample, match="no query"):  # nothing says which query: still not a sample
        build_sample(annotation(region(final), query=None), TASK, CONFIG, fetcher(png()))


def test_the_backends_messages_are_never_the_annotators_query() -> None:
    """The read-only ``lisa`` TextArea is saved with the annotation (what the backend last said): never a query,
    whether the config names it, has no query TextArea (queries in the task data), or is not in the payload."""
    said = {"id": "lisa-message", "type": "textarea", "from_name": "lisa", "to_name": "image",
            "value": {"text": ["the query is 1100 characters long; the limit is 1000. Shorten it."]}}
    lisa = '<TextArea name="lisa" toName="image" readonly="true" editable="false"/>'
    with_box = CONFIG.replace("</View>", lisa + "</View>")
    prompted = region(rect(2, 10, 3, 12), origin="prediction", meta={"prompt": "the red thing"})
    for config in (with_box, with_box.replace('<TextArea name="query"', '<Header name="query"'), None):
        # (with the box named in the config: the query text deleted, so the region's meta.prompt is the query)
        ann = annotation(prompted, said, query="the red thing" if config != with_box else None)
        assert build_sample(ann, TASK, config, fetcher(png())).record["queries"] == ["the red thing"], config


def test_split_is_by_image_and_fixed_by_the_dataset(tmp_path: Path) -> None:
    shas = [f"{i:08x}" + "0" * 56 for i in (0, 5, 99, 100, 109, 110)]  # int % 100: 0, 5, 99, 0, 9, 10
    assert [ds.split_for(s, 10) for s in shas] == ["val", "val", "train", "val", "val", "train"]
    ds.Dataset.open(tmp_path, val_percent=30)
    assert ds.Dataset.open(tmp_path, val_percent=10).val_percent == 30  # the samples written keep their split
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "dataset.json").write_text(json.dumps({"format": ds.FORMAT, "version": 2}))
    with pytest.raises(ds.DatasetError, match="version 2"):
        ds.Dataset.open(tmp_path / "other")


def test_a_failed_write_leaves_the_previous_sample(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    data = ds.Dataset.open(tmp_path)
    first = build_sample(annotation(region(rect(0, 5, 0, 5))), TASK, CONFIG, fetcher(png()))
    with data.lock():
        data.commit(first, "webhook")
    second = build_sample(annotation(region(rect(5, 20, 5, 20)), query="changed"), TASK, CONFIG, fetcher(png()))
    real = ds.atomic_write

    def crash_on_the_sample(path: Path, payload: bytes) -> None:
        if path.parent.name == "samples":
            raise OSError("disk full")
        real(path, payload)

    monkeypatch.setattr(ds, "atomic_write", crash_on_the_sample)
    with pytest.raises(OSError), data.lock():
        data.commit(second, "webhook")
    assert data.read_sample("ls-1-7")["queries"] == ["the red thing"]  # the old version, whole
    assert not list(tmp_path.rglob("*.tmp"))
    left = tmp_path / "masks" / ".ls-1-7_0.png.123.456.tmp"  # what a writer killed mid-write leaves
    left.write_bytes(b"partial")
    assert [s.id for s in load_samples(tmp_path)] == ["ls-1-7"] and data.sweep() == 0  # too young to be dead
    os.utime(left, (time.time() - 7200, time.time() - 7200))
    assert data.sweep() == 1 and not left.exists()


@pytest.mark.parametrize(
    ("ann", "task", "code"),
    [
        (annotation(region(rect(0, 5, 0, 5)), query=None), TASK, "no_query"),
        (annotation(), TASK, "no_mask"),
        (annotation(region(rect(0, 5, 0, 5)), was_cancelled=True), TASK, "cancelled"),
        (annotation(region(rect(0, 5, 0, 5)) | {"value": {"format": "rle", "rle": [1, 2, 3],
                                                         "brushlabels": ["Target"]}}), TASK, "bad_rle"),
        (annotation(region(rect(0, 5, 0, 5)) | {"value": {"format": "rle", "rle": ["x"],
                                                         "brushlabels": ["Target"]}}), TASK, "bad_rle"),
        (annotation(region(rect(0, 5, 0, 5, h=10, w=10))), TASK, "size_mismatch"),
        (annotation(region(rect(0, 5, 0, 5, h=10, w=10)) | {"original_width": None}), TASK, "size_mismatch"),
        (annotation(region(rect(0, 5, 0, 5)) | {"value": {"format": "rle", "rle": mask_to_rle(rect(0, 5, 0, 5))}}),
         TASK, "bad_region"),
        (annotation(region(rect(0, 5, 0, 5))) | {"id": None}, TASK, "missing_field"),
        (annotation(region(rect(0, 5, 0, 5))), {"id": 3}, "missing_field"),
        (annotation(region(rect(0, 5, 0, 5))), {"id": 3, "data": {"img": "x"}}, "missing_field"),
    ],
)
def test_bad_annotations_are_skipped_with_a_reason(ann: dict, task: dict, code: str) -> None:
    with pytest.raises(SkipSample) as info:
        build_sample(ann, task, CONFIG, fetcher(png()))
    assert info.value.code == code and info.value.reason


def test_image_failures_skip_or_retry() -> None:
    def failing(code: str):
        def fetch(value: str, task_id: int | None) -> FetchedImage:
            raise ImageFetchError(f"image failed ({code})", code)
        return fetch

    ann = annotation(region(rect(0, 5, 0, 5)))
    with pytest.raises(SkipSample, match="image_gone"):
        build_sample(ann, TASK, CONFIG, failing("not_found"))
    with pytest.raises(RetryLater):
        build_sample(ann, TASK, CONFIG, failing("unreachable"))


def test_remove_many_removes_what_remove_does_and_nothing_else(tmp_path: Path) -> None:
    """Samples 1-4 with masks (one with an ignore mask), a skipped record for 5, a writer's temporary file: removing
    1, 3, 5 and ids with no files leaves exactly 2 and 4 as they were."""
    data = ds.Dataset.open(tmp_path / "d", project_id=1)
    with data.lock():
        for aid in (1, 2, 3, 4):
            extra = [region(rect(9, 12, 0, 32), "Ignore")] if aid == 3 else []
            data.commit(build_sample(annotation(region(rect(0, aid + 2, 0, 5)), *extra, aid=aid), TASK, CONFIG,
                                     fetcher(png())), "webhook")
        data.record_skip("ls-1-5", "no_query", "no query", {})
        (data.root / "masks" / ".ls-1-1_0.png.99.1.tmp").write_bytes(b"half")
        before = {p.relative_to(data.root) for p in data.root.rglob("*") if p.is_file()}
        assert data.remove_many(["ls-1-1", "ls-1-3", "ls-1-5", "ls-1-77", "ls-1-1"]) == 2
    left = {p.relative_to(data.root) for p in data.root.rglob("*") if p.is_file()}
    gone = {Path(p) for p in ("samples/ls-1-1.json", "masks/ls-1-1_0.png", "samples/ls-1-3.json",
                              "masks/ls-1-3_0.png", "masks/ls-1-3_ignore.png", "skipped/ls-1-5.json")}
    assert before - left == gone
    assert [s.id for s in load_samples(data.root)] == ["ls-1-2", "ls-1-4"]


def test_ids_are_ascii_digits_in_range() -> None:
    assert [ls_id(v) for v in (7, "7", " 12 ", {"id": "3"}, 0, 2**63 - 1)] == [7, 7, 12, 3, 0, 2**63 - 1]
    # "²" and "١" pass str.isdigit; int() refuses the first and reads the second as 1: both are no id here.
    for bad in ("²", "١", "1\nERROR x", -4, 2**63, "9" * 5000, 10**30, True, 1.0, None, [1], "", "0x10"):
        assert ls_id(bad) is None, bad


def _polygon_json(path: Path, shapes: list[dict], text: object, encoding: str = "utf-8", **extra) -> None:
    path.write_bytes(json.dumps({"text": text, "is_sentence": True, "shapes": shapes, **extra},
                                ensure_ascii=False).encode(encoding))


def test_reasonseg_folders_read_like_lisa_and_mix_with_ours(tmp_path: Path) -> None:
    val = tmp_path / "val"
    val.mkdir()
    Image.new("RGB", (40, 30), "white").save(val / "a.jpg")
    Image.new("RGB", (40, 30), "white").save(val / "b.jpg")
    Image.new("RGB", (40, 30), "white").save(val / "c.png")  # no JSON: not a sample
    hole = {"label": "ignore", "points": [[10, 10], [20, 10], [20, 20], [10, 20]]}
    big = {"label": "target", "points": [[5.9, 5], [30, 5], [30, 25], [5.9, 25]]}
    flag = {"label": "flag", "points": [[0, 0], [39, 0], [39, 29], [0, 29]]}
    _polygon_json(val / "a.json", [hole, big, flag], ["the café table", "where one eats"])  # hole listed first
    _polygon_json(val / "b.json", [big], "a single phrase", encoding="cp1252", is_sentence=False)

    a, b = load_samples(val)
    assert (a.id, a.split, a.is_sentence, a.labels) == ("reasonseg-a", "val", True, ["target"])
    assert a.queries == ["the café table", "where one eats"] and b.queries == ["a single phrase"]
    assert b.is_sentence is False
    [mask] = a.masks
    assert mask.shape == (30, 40) and set(np.unique(mask)) == {0, 1, 255}
    assert (mask[10:21, 10:21] == 255).all()  # drawn after the larger target: the hole stays ignored
    assert mask[5, 5] == 1 and mask[5, 4] == 0 and mask[0, 0] == 0  # points truncated like int32; flag dropped
    assert mask[25, 30] == 1 and mask[26, 30] == 0  # the outline is part of the polygon
    assert np.array_equal(rasterize([big, hole], 30, 40), mask)  # order in the file does not matter

    ours = tmp_path / "ours"
    data = ds.Dataset.open(ours, val_percent=100)  # every image in val
    with data.lock():
        data.commit(build_sample(annotation(region(rect(0, 5, 0, 5))), TASK, CONFIG, fetcher(png())), "export")
    mixed = load_samples([ours, val], split="val")
    assert [s.id for s in mixed] == ["ls-1-7", "reasonseg-a", "reasonseg-b"]
    with pytest.raises(ValueError, match="neither"):
        load_samples(tmp_path / "nothing")


def test_the_model_reader_needs_no_torch() -> None:
    code = "import sys, model.data; assert 'torch' not in sys.modules and 'backend' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).resolve().parents[1], check=True, timeout=60)


def test_samples_record_the_family_that_proposed_each_mask() -> None:
    """``model_families``: ``meta.family`` of a proposed region (SAM 3's, or LISA's when a region names none, as
    before SAM 3), none for a hand-drawn mask."""
    ann = annotation(region(rect(2, 10, 3, 12), origin="prediction", meta={"model_version": "s1", "family": "sam3"}),
                     region(rect(0, 4, 0, 4), "Other", origin="prediction-changed"),
                     region(rect(9, 12, 0, 32), "Ignore"))
    assert build_sample(ann, TASK, CONFIG, fetcher(png())).record["model_families"] == ["sam3", "lisa"]
    manual = annotation(region(rect(2, 10, 3, 12)))
    assert build_sample(manual, TASK, CONFIG, fetcher(png())).record["model_families"] == [None]
