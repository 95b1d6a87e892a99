"""The lisa-ls dataset format (version 1): corrected LISA outputs as files, written by capture and export.

Torch-free; :mod:`model.data` has its own reader of the same format (``model/`` must not import ``backend/``),
and a test checks that the two agree.

Layout of one dataset (one Label Studio project; capture writes ``$LISA_LS_DATASET_DIR/project-<id>/``)::

    DIR/dataset.json            {"format": "lisa-ls-dataset", "version": 1, "project_id", "label_studio_url",
                                 "val_percent", "created_at"}; written once, never rewritten
    DIR/images/<sha256>.<ext>   the task image's original bytes, named by their SHA-256 (shared by samples)
    DIR/masks/<id>_<k>.png      mask k of sample <id>: PNG mode "L", 0 background, 255 target (lossless)
    DIR/masks/<id>_ignore.png   optional: pixels to leave out of losses and metrics (255), same encoding
    DIR/samples/<id>.json       one sample per annotation; the commit point (see below)
    DIR/skipped/<id>.json       an annotation that could not become a sample, with the reason

A sample file (``samples/<id>.json``, ``id`` = ``ls-<project>-<annotation>``) holds, in this order:

- ``id``; ``image``: relative path ``images/<sha256>.<ext>``;
- ``width``, ``height``: the image size with its EXIF orientation applied (as Label Studio shows it; the masks
  have this size);
- ``queries``: the annotator's query texts (list of str, usually one), all describing the same target;
- ``labels``: one brush label per mask, in the labeling config's order; ``masks``: the relative mask paths, one
  per label (regions with the same label are merged, union), i.e. one per ``[SEG]``;
- ``origins``: per mask, ``prediction`` (a LISA mask accepted as is), ``prediction-changed`` (a LISA mask edited
  or extended) or ``manual`` (drawn by hand);
- ``model_versions``: per mask, the model version that proposed it, or null (manual, or not recorded);
- ``model_families``: per mask, the model family that proposed it (``lisa``, ``sam3``), or null (manual);
- ``ignore`` (only when present): relative path of the ignore mask, from brush labels containing "ignore";
- ``refinements``: metadata of the clicks behind the masks (``{"region", "points": [[x, y, label]...] in pixels,
  "box"}`` per refined region, and ``{"type", "value", "is_positive"}`` per key point or box left in the
  annotation); empty for a mask made from the text alone. Training reads the query and the masks, never these;
- ``split``: ``val`` when ``int(sha256[:8], 16) % 100 < val_percent``, else ``train``: every sample of one image
  lands in the same split, so no image leaks from train into val;
- ``annotator`` (Label Studio user id of ``completed_by``, or null), ``created_at``, ``updated_at`` (the
  annotation's own timestamps, as Label Studio sends them), ``task_id``, ``annotation_id``, ``project_id``;
- ``source``: ``webhook`` (capture) or ``export``; ``written_at``: when the file was written (UTC ISO 8601).
  Only these two differ between capture and export of the same annotation.

A skipped record (``skipped/<id>.json``) holds ``id``, ``code`` (``no_query``, ``no_mask``, ``bad_rle``,
``size_mismatch``, ``image_gone``, ``cancelled``...), ``reason`` (for people), the annotation's ids,
``updated_at``, ``source`` and ``written_at``. Capture writes events that name no project or annotation to
``$LISA_LS_DATASET_DIR/skipped/event-<stream id>.json``.

Readers load ``mask > 127`` as target (1); where the ignore mask is 255, every mask reads 255 (ignored).

Crash safety: every file is written to a hidden temporary name, flushed and renamed into place, so a reader never
sees a partial file. Images and masks are renamed before the sample JSON, which is the commit point: until it is
renamed, the previous version (or nothing) is what the dataset holds, and a sample never names a missing file.
(A reader racing a live update may pair the old JSON with an already replaced mask; training reads a snapshot.)
Deleting removes the sample JSON first. Writers of one dataset serialise their commits with an exclusive
``flock`` on ``DIR/.lock`` (commits are short: the slow work happens before). Files are only ever replaced, so an
update or deletion applied twice ends in the same state. A writer killed mid-write leaves a hidden
``.<name>.<pid>.<thread>.tmp`` that readers ignore and :meth:`Dataset.sweep` removes once it is an hour old.
Images no sample uses any more stay (disk only).
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import fcntl
import io
import json
import os
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

FORMAT = "lisa-ls-dataset"
VERSION = 1
VAL_PERCENT = 10
ORIGINS = ("prediction", "prediction-changed", "manual")
#: File extension of each image format the backend accepts (``backend.images.IMAGE_FORMATS``).
EXTENSIONS = {"JPEG": "jpg", "MPO": "jpg", "PNG": "png", "WEBP": "webp", "GIF": "gif", "BMP": "bmp",
              "TIFF": "tif", "AVIF": "avif"}
#: The fields of a sample file, in the order they are written.
FIELDS = ("id", "image", "width", "height", "queries", "labels", "masks", "origins", "model_versions",
          "model_families", "ignore",
          "refinements", "split", "annotator", "created_at", "updated_at", "task_id", "annotation_id", "project_id",
          "source", "written_at")
#: Fields of a sample that say when and how it was written, not what it holds.
WRITE_FIELDS = ("source", "written_at")


class DatasetError(Exception):
    """A dataset directory that cannot be used (another format, a newer version, not writable)."""


def sample_id(project_id: object, annotation_id: object) -> str:
    """The id of the sample of one Label Studio annotation (annotation ids are unique per Label Studio)."""
    return f"ls-{project_id}-{annotation_id}"


def split_for(sha256: str, val_percent: int = VAL_PERCENT) -> str:
    """``val`` or ``train`` for an image, from its content hash: stable, and the same for all its samples."""
    return "val" if int(sha256[:8], 16) % 100 < val_percent else "train"


def now_iso() -> str:
    """The current UTC time, ISO 8601 with microseconds."""
    return dt.datetime.now(dt.timezone.utc).isoformat()


def parse_time(value: object) -> dt.datetime | None:
    """A Label Studio timestamp (ISO 8601, ``Z`` or offset; naive means UTC) as an aware datetime, else None."""
    if not isinstance(value, str) or not value.strip():
        return None
    try:
        parsed = dt.datetime.fromisoformat(value.strip().replace("Z", "+00:00"))
    except ValueError:
        return None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=dt.timezone.utc)


def encode_mask(mask: np.ndarray) -> bytes:
    """A 2-D mask (> 0 is set) as PNG bytes, mode L, 0/255. Deterministic for equal masks."""
    out = io.BytesIO()
    Image.fromarray(np.where(np.asarray(mask) > 0, 255, 0).astype(np.uint8), "L").save(out, format="PNG")
    return out.getvalue()


def read_mask(path: Path) -> np.ndarray:
    """A mask file as an ``H x W`` bool array (> 127 is set)."""
    with Image.open(path) as im:
        return np.asarray(im.convert("L")) > 127


def atomic_write(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that readers see the old file or the whole new one, even across a crash."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())  # the bytes must be on disk before the rename makes them visible
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


def _dump(record: dict[str, Any]) -> bytes:
    return (json.dumps(record, indent=1, ensure_ascii=False) + "\n").encode()


@dataclasses.dataclass
class SampleDraft:
    """A sample ready to be written: what :func:`backend.samples.build_sample` makes of one annotation.

    ``masks`` and ``ignore`` are ``height x width`` bool arrays; ``record`` holds every JSON field except the
    paths, the split and the write fields, which :meth:`Dataset.commit` adds.
    """

    id: str
    image: bytes
    image_sha256: str
    image_ext: str
    masks: list[np.ndarray]
    ignore: np.ndarray | None
    record: dict[str, Any]


class Dataset:
    """One dataset directory: atomic writes, commits under a lock, and reading back. Use :meth:`open`."""

    def __init__(self, root: Path, meta: dict[str, Any]) -> None:
        self.root, self.meta = root, meta

    @classmethod
    def open(cls, root: str | Path, *, create: bool = True, project_id: object = None,
             label_studio_url: str = "", val_percent: int = VAL_PERCENT) -> Dataset:
        """Open (or create) a dataset. An existing ``dataset.json`` wins over the arguments: its ``val_percent``
        fixed the splits of the samples already written. Raises :class:`DatasetError`."""
        root = Path(root)
        meta_path = root / "dataset.json"
        try:
            if not meta_path.exists():
                if not create:
                    raise DatasetError(f"{root} is not a lisa-ls dataset (no dataset.json)")
                for sub in ("images", "masks", "samples", "skipped"):
                    (root / sub).mkdir(parents=True, exist_ok=True)
                meta = {"format": FORMAT, "version": VERSION, "project_id": project_id,
                        "label_studio_url": label_studio_url, "val_percent": int(val_percent),
                        "created_at": now_iso()}
                with cls._locked(root):
                    if not meta_path.exists():  # another process may have created it meanwhile
                        atomic_write(meta_path, _dump(meta))
            meta = json.loads(meta_path.read_text())
        except OSError as e:
            raise DatasetError(f"cannot use {root} as a dataset: {e}") from e
        except json.JSONDecodeError as e:
            raise DatasetError(f"{meta_path} is not valid JSON ({e})") from e
        if not isinstance(meta, dict) or meta.get("format") != FORMAT:
            raise DatasetError(f"{meta_path} is not a {FORMAT} description")
        if meta.get("version") != VERSION:
            raise DatasetError(f"{root} has dataset format version {meta.get('version')}; this lisa-ls writes "
                               f"version {VERSION}: use a new directory or a matching lisa-ls")
        return cls(root, meta)

    @property
    def val_percent(self) -> int:
        return int(self.meta.get("val_percent", VAL_PERCENT))

    # ---- locking and writing ----

    @staticmethod
    @contextlib.contextmanager
    def _locked(root: Path) -> Iterator[None]:
        root.mkdir(parents=True, exist_ok=True)
        with open(root / ".lock", "a+b") as f:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX)  # released when the file closes, or when the process dies
            yield

    def lock(self) -> contextlib.AbstractContextManager[None]:
        """Exclusive across processes and threads: hold it from the version check to the last rename."""
        return self._locked(self.root)

    def sample_path(self, sid: str) -> Path:
        return self.root / "samples" / f"{sid}.json"

    def skipped_path(self, sid: str) -> Path:
        return self.root / "skipped" / f"{sid}.json"

    def commit(self, draft: SampleDraft, source: str, *, keep_newer: bool = False) -> str:
        """Write a sample (call under :meth:`lock`). Returns ``written`` (new), ``updated``, ``unchanged`` or,
        with ``keep_newer``, ``newer-kept`` when the stored sample's ``updated_at`` is later than the draft's."""
        old = self.read_sample(draft.id)
        if keep_newer and old is not None:
            mine, theirs = parse_time(draft.record.get("updated_at")), parse_time(old.get("updated_at"))
            if mine and theirs and theirs > mine:
                return "newer-kept"
        image = f"images/{draft.image_sha256}.{draft.image_ext}"
        targets = [f"masks/{draft.id}_{k}.png" for k in range(len(draft.masks))]
        masks = {rel: encode_mask(m) for rel, m in zip(targets, draft.masks)}
        fields = {**draft.record, "id": draft.id, "image": image, "masks": targets,
                  "split": split_for(draft.image_sha256, self.val_percent), "source": source, "written_at": now_iso()}
        if draft.ignore is not None:
            fields["ignore"] = f"masks/{draft.id}_ignore.png"
            masks[fields["ignore"]] = encode_mask(draft.ignore)
        record = {k: fields[k] for k in FIELDS if k in fields}
        if old is not None and self._same(old, record, masks):
            self._unlink(self.skipped_path(draft.id))
            return "unchanged"
        if not (self.root / image).exists():
            atomic_write(self.root / image, draft.image)
        for rel, data in masks.items():
            atomic_write(self.root / rel, data)
        atomic_write(self.sample_path(draft.id), _dump(record))
        self._remove_stale_masks(draft.id, set(masks))
        self._unlink(self.skipped_path(draft.id))
        return "written" if old is None else "updated"

    def _same(self, old: dict[str, Any], new: dict[str, Any], masks: dict[str, bytes]) -> bool:
        strip = {k: v for k, v in new.items() if k not in WRITE_FIELDS}
        if {k: v for k, v in old.items() if k not in WRITE_FIELDS} != strip:
            return False
        try:
            return all((self.root / rel).read_bytes() == data for rel, data in masks.items())
        except OSError:
            return False

    def _remove_stale_masks(self, sid: str, keep: set[str]) -> None:
        for path in (self.root / "masks").glob(f"{sid}_*.png"):
            if f"masks/{path.name}" not in keep:
                self._unlink(path)

    @staticmethod
    def _unlink(path: Path) -> bool:
        try:
            path.unlink()
            return True
        except FileNotFoundError:
            return False

    def remove(self, sid: str) -> bool:
        """Delete a sample, its masks and any skipped record (call under :meth:`lock`); True if a sample went."""
        existed = self._unlink(self.sample_path(sid))  # the commit point first: no sample without its masks
        self._remove_stale_masks(sid, set())
        self._unlink(self.skipped_path(sid))
        return existed

    def remove_many(self, sids: list[str]) -> int:
        """:meth:`remove` for many samples (call under :meth:`lock`); returns how many samples went.

        Each folder is listed once and only files that exist are unlinked: most ids of a large deletion have no
        sample, and a failed unlink costs as much as a real one.
        """
        wanted = set(sids)
        found: dict[str, dict[str, list[Path]]] = {}
        for sub in ("samples", "masks", "skipped"):
            found[sub] = {}
            with contextlib.suppress(FileNotFoundError), os.scandir(self.root / sub) as listing:
                for entry in listing:
                    # samples/<id>.json, skipped/<id>.json, masks/<id>_<k>.png, masks/<id>_ignore.png; ids hold no
                    # "_" or "."; hidden temporary files start with "."
                    sid = entry.name.rpartition("_")[0] if sub == "masks" else entry.name.partition(".")[0]
                    if sid in wanted and entry.name.endswith(".png" if sub == "masks" else ".json"):
                        found[sub].setdefault(sid, []).append(Path(entry.path))
        removed = 0
        for sid in sids:  # the commit point first: no sample without its masks
            removed += sum(self._unlink(path) for path in found["samples"].get(sid, ()))
            for path in (*found["masks"].get(sid, ()), *found["skipped"].get(sid, ())):
                self._unlink(path)
        return removed

    def record_skip(self, sid: str, code: str, reason: str, info: dict[str, Any], keep_sample: bool = False) -> bool:
        """Record why an annotation is not a sample, replacing any sample of an older version of it (call under
        :meth:`lock`) unless ``keep_sample`` (the new version has a mistake to fix, such as a polygon crossing
        itself: the older sample stays until a usable version replaces it). Returns True if a sample was removed."""
        removed = False if keep_sample else self.remove(sid)
        self.root.joinpath("skipped").mkdir(parents=True, exist_ok=True)
        atomic_write(self.skipped_path(sid), _dump({"id": sid, "code": code, "reason": reason, **info,
                                                    "written_at": now_iso()}))
        return removed

    def sweep(self, older_than_s: float = 3600.0) -> int:
        """Delete temporary files left by writers that died mid-write (older than ``older_than_s``, so a live
        writer's file is never touched). Returns how many went."""
        removed, cutoff = 0, time.time() - older_than_s
        for sub in (".", "images", "masks", "samples", "skipped"):
            for path in (self.root / sub).glob(".*.tmp"):
                with contextlib.suppress(OSError):
                    if path.stat().st_mtime < cutoff:
                        path.unlink()
                        removed += 1
        return removed

    # ---- reading ----

    def read_sample(self, sid: str) -> dict[str, Any] | None:
        try:
            return json.loads(self.sample_path(sid).read_text())
        except FileNotFoundError:
            return None

    def _records(self, folder: str) -> Iterator[dict[str, Any]]:
        for path in sorted((self.root / folder).glob("*.json")):
            if not path.name.startswith("."):
                with contextlib.suppress(FileNotFoundError):  # removed since the listing
                    yield json.loads(path.read_text())

    def samples(self) -> Iterator[dict[str, Any]]:
        """Every sample record, by id."""
        return self._records("samples")

    def skipped(self) -> Iterator[dict[str, Any]]:
        """Every skipped record, by id."""
        return self._records("skipped")

    def summary(self) -> dict[str, Any]:
        """Counts for reports: samples per split, skipped per reason code."""
        splits = Counter(s.get("split") for s in self.samples())
        codes = Counter(s.get("code") for s in self.skipped())
        return {"samples": sum(splits.values()), "train": splits.get("train", 0), "val": splits.get("val", 0),
                "skipped": sum(codes.values()), "skipped_by_reason": dict(sorted(codes.items()))}
