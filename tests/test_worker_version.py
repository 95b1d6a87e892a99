"""The model version follows the weights' contents, and a restart on unchanged weights does not re-read them."""

from __future__ import annotations

import json
import os
import shutil

import pytest
from conftest import CHECKPOINT

from worker.gpu.version import FileDigests, model_version


@pytest.fixture
def release(tmp_path, monkeypatch):
    """A copy of the fixture release, with the digest cache in the test's folder."""
    monkeypatch.setenv("LISA_LS_DIGEST_CACHE", str(tmp_path / "cache" / "digests.json"))
    return shutil.copytree(CHECKPOINT, tmp_path / "runs" / "tiny")


def test_a_same_shape_rewrite_of_the_weights_changes_the_version(release):
    """A fine-tune written over the same file: same name, same size, even the old mtime put back."""
    before = model_version(release)
    shard = release / "pytorch_model-00002-of-00004.bin"
    stat = shard.stat()
    original = shard.read_bytes()
    data = bytearray(original)
    data[len(data) // 2] ^= 0xFF  # one byte of a weight tensor
    shard.write_bytes(bytes(data))
    os.utime(shard, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert shard.stat().st_size == stat.st_size and shard.stat().st_mtime_ns == stat.st_mtime_ns
    after = model_version(release)
    assert after != before and after.startswith("runs/tiny@")
    shard.write_bytes(original)
    assert model_version(release) == before  # the same bytes again: the same version


def test_unchanged_weights_come_from_the_cache(release, tmp_path):
    first = FileDigests()
    version = model_version(release, digests=first)
    assert len(first.hashed) == 4  # every shard read once
    again = FileDigests()
    assert model_version(release, digests=again) == version and again.hashed == []  # a restart reads none
    # The cache is what answers: an entry whose stamp matches is trusted without reading the file.
    cache = tmp_path / "cache" / "digests.json"
    entries = json.loads(cache.read_text())
    shard = str((release / "pytorch_model-00001-of-00004.bin").resolve())
    entries[shard]["sha256"] = "0" * 64
    cache.write_text(json.dumps(entries))
    trusted = FileDigests()
    assert model_version(release, digests=trusted) != version and trusted.hashed == []
    (release / "pytorch_model-00001-of-00004.bin").touch()  # a new stamp: hashed again, the true version is back
    assert model_version(release) == version


def test_an_unwritable_cache_only_costs_a_rehash(release, tmp_path, monkeypatch):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    monkeypatch.setenv("LISA_LS_DIGEST_CACHE", str(blocker / "digests.json"))
    digests = FileDigests()
    assert model_version(release, digests=digests).startswith("runs/tiny@") and len(digests.hashed) == 4
    assert model_version(release, "v7") == "v7"
