"""A fine-tune's artifact: a peft LoRA adapter (with the fully trained modules) plus metadata.

``RUN_DIR/adapter/`` is what peft writes (``adapter_config.json`` + ``adapter_model.safetensors``, the mask
decoder, [SEG] projection, ``lm_head`` and embeddings included as ``modules_to_save``); ``RUN_DIR/metadata.json``
records the base model, a fingerprint of the data, the metrics and the version string the workers report.
A model trained in full mode is written as a whole release in ``RUN_DIR/model/`` instead.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Any

import torch

from model.modeling import LisaModel


def data_fingerprint(dirs: list[str]) -> str:
    """sha256 over the names and sizes of every sample file (synthetic data: its name)."""
    digest = hashlib.sha256()
    for d in sorted(dirs):
        path = Path(d)
        if not path.is_dir():
            digest.update(d.encode())
            continue
        for f in sorted(p for p in path.rglob("*") if p.is_file()):
            digest.update(f"{f.relative_to(path)}:{f.stat().st_size}".encode())
    return digest.hexdigest()[:16]


def write_metadata(run_dir: Path, **fields: Any) -> dict[str, Any]:
    meta = {"created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), **fields}
    (run_dir / "metadata.json").write_text(json.dumps(meta, indent=2) + "\n")
    return meta


def read_metadata(run_dir: str | Path) -> dict[str, Any]:
    path = Path(run_dir) / "metadata.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def adapter_version(run_dir: str | Path) -> str:
    """The version a worker serving this adapter reports: ``<run folder>@<adapter digest>``."""
    run_dir = Path(run_dir)
    adapter = run_dir / "adapter" if (run_dir / "adapter").is_dir() else run_dir
    digest = hashlib.sha256()
    for f in sorted(adapter.glob("*")):
        if f.is_file():
            digest.update(f.read_bytes())
    name = run_dir.name if adapter != run_dir else run_dir.parent.name
    return f"{name}@{digest.hexdigest()[:10]}"


def apply_adapter(model: LisaModel, adapter_dir: str | Path) -> LisaModel:
    """Load a LoRA adapter onto ``model`` and merge it into the weights (no per-token adapter cost at serving)."""
    from peft import PeftModel

    adapter_dir = Path(adapter_dir)
    if (adapter_dir / "adapter").is_dir():
        adapter_dir = adapter_dir / "adapter"
    with torch.no_grad():
        merged = PeftModel.from_pretrained(model, str(adapter_dir)).merge_and_unload()
    return merged.eval().requires_grad_(False)
