"""Training and evaluation data for LISA, torch-free: our dataset folders and LISA's ReasonSeg folders.

Two kinds of folder, told apart by their contents, can be mixed in one :func:`load_samples` call:

* a lisa-ls dataset (format ``lisa-ls-dataset`` version 1, written by the backend's capture and export; the
  format is documented in ``backend/dataset.py``, which ``model/`` does not import, hence this second reader);
* a ReasonSeg folder (LISA's ``x.jpg`` + ``x.json``, LabelMe-style: ``text`` list, ``is_sentence``, ``shapes``
  polygons), read as LISA's ``get_mask_from_json`` does (``shared/ref/lisa.md`` §6): ``flag`` shapes dropped,
  polygons drawn largest first with fill and a 1-pixel outline, labels containing "ignore" -> 255, others -> 1,
  cp1252 when the JSON is not UTF-8. Its split is the folder's name (``train``/``val``/``test``); any other
  folder is split by file name hash, 10 % val.

Every :class:`Sample` loads lazily: ``sample.image`` is ``H x W x 3`` uint8 RGB with the EXIF orientation applied
(as Label Studio shows it and as the masks were drawn), ``sample.masks`` a list of ``H x W`` uint8 masks, one per
``[SEG]``: 0 background, 1 target, 255 ignore (excluded from losses and metrics).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageOps

FORMAT, VERSION = "lisa-ls-dataset", 1
IGNORE = 255
SPLITS = ("train", "val", "test")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
FALLBACK_VAL_PERCENT = 10


@dataclasses.dataclass(eq=False)
class Sample:
    """One image with its queries and target masks. ``image`` and ``masks`` are read on first use, then kept."""

    id: str
    image_path: Path
    queries: list[str]
    labels: list[str]
    split: str | None
    is_sentence: bool | None = None
    """ReasonSeg's flag (long sentence vs. short phrase); None for our samples."""
    meta: dict[str, Any] = dataclasses.field(default_factory=dict)
    """The rest: our sample record (origins, model versions, annotator...) or the ReasonSeg JSON's path."""
    mask_paths: list[Path] = dataclasses.field(default_factory=list)
    ignore_path: Path | None = None
    shapes: list[dict[str, Any]] | None = None
    """ReasonSeg polygons (rasterised when ``masks`` is first read)."""

    @functools.cached_property
    def image(self) -> np.ndarray:
        return load_image(self.image_path)

    @functools.cached_property
    def masks(self) -> list[np.ndarray]:
        if self.shapes is not None:
            height, width = image_size(self.image_path)
            return [rasterize(self.shapes, height, width)]
        masks = [(_read_l(p) > 127).astype(np.uint8) for p in self.mask_paths]
        if self.ignore_path is not None:
            ignore = _read_l(self.ignore_path) > 127
            for m in masks:
                m[ignore] = IGNORE
        return masks


def load_image(path: Path) -> np.ndarray:
    """An image file as ``H x W x 3`` uint8 RGB, EXIF orientation applied."""
    with Image.open(path) as im:
        return np.asarray(ImageOps.exif_transpose(im).convert("RGB"))


def image_size(path: Path) -> tuple[int, int]:
    """``(height, width)`` of an image with its EXIF orientation applied, from the header only."""
    with Image.open(path) as im:
        width, height = im.size
        if im.getexif().get(0x0112) in (5, 6, 7, 8):  # rotated by 90 or 270 degrees
            width, height = height, width
    return height, width


def _read_l(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("L"))


# ---------------------------------------------------------------------------------------------- our format


def load_dataset(root: str | Path) -> list[Sample]:
    """Every sample of one lisa-ls dataset folder, by id."""
    root = Path(root)
    meta = json.loads((root / "dataset.json").read_text())
    if meta.get("format") != FORMAT:
        raise ValueError(f"{root}/dataset.json is not a {FORMAT} description")
    if meta.get("version") != VERSION:
        raise ValueError(f"{root} is dataset format version {meta.get('version')}; this lisa-ls reads {VERSION}")
    samples = []
    for path in sorted((root / "samples").glob("*.json")):
        if path.name.startswith("."):  # a writer's temporary file
            continue
        try:
            record = json.loads(path.read_text())
        except FileNotFoundError:  # deleted since the listing (capture is live)
            continue
        samples.append(Sample(
            id=record["id"], image_path=root / record["image"], queries=list(record["queries"]),
            labels=list(record["labels"]), split=record.get("split"), meta=record,
            mask_paths=[root / m for m in record["masks"]],
            ignore_path=root / record["ignore"] if record.get("ignore") else None,
        ))
    return samples


# ---------------------------------------------------------------------------------------------- ReasonSeg


def _read_json(path: Path) -> Any:
    """LISA's reader: UTF-8, else cp1252 (some ReasonSeg files were saved on Windows)."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        return json.loads(path.read_text(encoding="cp1252"))


def _draw(mask: Image.Image, points: list[Any], value: int) -> None:
    # LISA casts the points to int32 (truncation) and draws cv2.polylines (thickness 1) then fillPoly.
    xy = [(int(x), int(y)) for x, y in points]
    draw = ImageDraw.Draw(mask)
    if len(xy) >= 2:
        draw.polygon(xy, fill=value, outline=value)
    elif xy:
        draw.point(xy, fill=value)


def rasterize(shapes: list[dict[str, Any]], height: int, width: int) -> np.ndarray:
    """ReasonSeg polygons as one ``H x W`` uint8 mask: 1 target, 255 ignore, 0 elsewhere.

    ``flag`` shapes are dropped; the others are drawn largest area first, so a smaller polygon inside a larger
    one (an ignored hole in a target, say) wins where they overlap.
    """
    valid = [s for s in shapes if str(s.get("label", "")).lower() != "flag" and s.get("points")]
    areas = []
    for shape in valid:
        alone = Image.new("L", (width, height), 0)
        _draw(alone, shape["points"], 1)
        areas.append(int(np.asarray(alone).sum()))
    mask = Image.new("L", (width, height), 0)
    for i in sorted(range(len(valid)), key=lambda k: -areas[k]):
        value = IGNORE if "ignore" in str(valid[i].get("label", "")).lower() else 1
        _draw(mask, valid[i]["points"], value)
    return np.asarray(mask).copy()


def _fallback_split(name: str) -> str:
    return "val" if int(hashlib.sha256(name.encode()).hexdigest()[:8], 16) % 100 < FALLBACK_VAL_PERCENT else "train"


def load_reasonseg(root: str | Path) -> list[Sample]:
    """Every image of a ReasonSeg folder that has a JSON next to it, by name."""
    root = Path(root)
    split = root.name.lower() if root.name.lower() in SPLITS else None
    samples = []
    for json_path in sorted(root.glob("*.json")):
        image_path = next((p for p in (json_path.with_suffix(s) for s in IMAGE_SUFFIXES) if p.exists()), None)
        if image_path is None:
            continue
        anno = _read_json(json_path)
        text = anno.get("text") or []
        queries = [text] if isinstance(text, str) else [t for t in text if isinstance(t, str)]
        samples.append(Sample(
            id=f"reasonseg-{json_path.stem}", image_path=image_path, queries=queries, labels=["target"],
            split=split or _fallback_split(json_path.stem), is_sentence=bool(anno.get("is_sentence", False)),
            meta={"json": str(json_path)}, shapes=list(anno.get("shapes") or []),
        ))
    return samples


# ---------------------------------------------------------------------------------------------- both


def load_samples(dirs: str | Path | Iterable[str | Path], split: str | None = None) -> list[Sample]:
    """The samples of every folder in ``dirs`` (lisa-ls datasets and ReasonSeg folders), optionally one split.

    Raises ``ValueError`` for a folder that is neither (or a dataset of another format version).
    """
    if isinstance(dirs, (str, Path)):
        dirs = [dirs]
    samples: list[Sample] = []
    for d in map(Path, dirs):
        if (d / "dataset.json").is_file():
            samples += load_dataset(d)
        elif d.is_dir() and any(d.glob("*.json")):
            samples += load_reasonseg(d)
        else:
            raise ValueError(f"{d} is neither a lisa-ls dataset (dataset.json) nor a ReasonSeg folder (x.jpg + x.json)")
    return [s for s in samples if split is None or s.split == split]
