"""The model version a worker reports: it changes whenever the served weights change, contents included.

Label Studio stores the version with each prediction and re-predicts when ``/setup`` reports another, so a
fine-tune written over the same files (same names, same sizes) must change it. Hashing 15 GB of weights takes a
minute, so each file's SHA-256 is kept in a small JSON cache keyed by the file's path, size, modification and
status-change times and inode: a worker restarted on unchanged files reads only the cache, and any write to a file
(which always moves its ``st_ctime``, even when ``mtime`` is put back) makes it hash that file again.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from pathlib import Path

from model import demo_scope

log = logging.getLogger(__name__)

#: The files whose bytes make up a model's identity besides its weights.
CONFIG_FILES = ("config.json", "pytorch_model.bin.index.json", "model.safetensors.index.json", "adapter_config.json")
#: Weight files, hashed by content.
WEIGHT_PATTERNS = ("*.bin", "*.safetensors")
#: Where the digests are cached unless ``LISA_LS_DIGEST_CACHE`` names another file.
DIGEST_CACHE_ENV = "LISA_LS_DIGEST_CACHE"


def default_digest_cache() -> Path:
    """``$LISA_LS_DIGEST_CACHE``, else ``$XDG_CACHE_HOME/lisa-ls/weight-digests.json`` (``~/.cache`` by default);
    not next to the weights, whose folder is often read-only (a mounted volume, the Hugging Face cache)."""
    if os.environ.get(DIGEST_CACHE_ENV):
        return Path(os.environ[DIGEST_CACHE_ENV])
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "lisa-ls" / "weight-digests.json"


class FileDigests:
    """SHA-256 of files' contents, cached in ``cache_file`` by (path, size, mtime, ctime, inode)."""

    def __init__(self, cache_file: Path | None = None) -> None:
        self.cache_file = cache_file or default_digest_cache()
        try:
            self._entries: dict[str, dict] = json.loads(self.cache_file.read_text())
        except (OSError, ValueError):
            self._entries = {}
        self.hashed: list[Path] = []  # files read in full by this instance (the others came from the cache)

    @staticmethod
    def _stamp(path: Path) -> list[int]:
        st = path.stat()
        return [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino]

    def digest(self, path: Path) -> str:
        """The hex SHA-256 of ``path``'s bytes, from the cache when its stamp still matches."""
        key, stamp = str(path.resolve()), self._stamp(path)
        entry = self._entries.get(key)
        if entry and entry.get("stamp") == stamp:
            return entry["sha256"]
        with path.open("rb") as f:
            sha = hashlib.file_digest(f, "sha256").hexdigest()
        self.hashed.append(path)
        self._entries[key] = {"stamp": stamp, "sha256": sha}
        return sha

    def save(self) -> None:
        """Write the cache (atomically; a cache that cannot be written only costs a re-hash next start)."""
        try:
            self.cache_file.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=self.cache_file.parent, prefix=".digests-")
            with os.fdopen(fd, "w") as f:
                json.dump(self._entries, f, indent=1)
            os.replace(tmp, self.cache_file)
        except OSError as e:
            log.warning("cannot write the weight digest cache %s (%s); the next start hashes the weights again",
                        self.cache_file, e)


def model_version(model_dir: str | Path, override: str | None = None, name: str | None = None,
                  digests: FileDigests | None = None) -> str:
    """A version string that changes whenever the served weights change: ``<name>@<digest of config and weights>``.

    ``name`` is the Hub id when there is one, else the last two folders of the path. Weight files count by their
    contents (see the module docstring); ``digests`` is the cache to use (default: :func:`default_digest_cache`).
    """
    if override:
        return override
    path = Path(model_dir)
    digest = hashlib.sha256()
    for file in CONFIG_FILES:
        if (path / file).is_file():
            digest.update((path / file).read_bytes())
    digests = digests or FileDigests()
    weights = sorted({w for pattern in WEIGHT_PATTERNS for w in path.glob(pattern)})
    for file in weights:
        digest.update(f"{file.name}:{digests.digest(file)}".encode())
    if digests.hashed:
        digests.save()
    label = name or "/".join(path.resolve().parts[-2:])
    version = f"{label}@{digest.hexdigest()[:10]}"
    return demo_scope.demo_version(version) if demo_scope.is_demo_model(path) else version
