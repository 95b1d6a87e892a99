"""Writing a model in LISA's release format (what ``lisa-ls merge`` and the demo-model recipe produce).

The folder is what :func:`model.checkpoint.load_lisa` (and LISA's own code) reads: ``config.json`` (LISA's fields
plus our ``sam_*`` geometry), the tokenizer files, and the weights under the release's key names in
``pytorch_model.bin`` (sharded with an index above ``max_shard_bytes``). The CLIP tower is not part of a release;
when it is not a Hub model it is written next to the weights as ``clip_tower/`` and named so in the config.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from model.checkpoint import ours_to_release
from model.modeling import LisaModel

TOKENIZER_FILES = ("tokenizer.model", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json")


def release_state_dict(model: LisaModel) -> dict[str, torch.Tensor]:
    """Every parameter (and SAM's persistent positional-encoding buffer) under its release key; no CLIP."""
    state = {}
    for name, tensor in model.state_dict().items():
        if name.startswith("vision_tower.") or name.endswith("rotary_emb.inv_freq") or "pixel_" in name:
            continue
        state[ours_to_release(name)] = tensor.detach().to("cpu").contiguous()
    return state


def save_release(model: LisaModel, tokenizer_dir: str | Path, out: str | Path, clip_name: str | None = None,
                 max_shard_bytes: int = 4 << 30) -> Path:
    """Write ``model`` as a LISA release folder at ``out``.

    Args:
        tokenizer_dir: folder holding the tokenizer files the model was trained with.
        clip_name: Hub id of the CLIP tower to name in the config; ``None`` writes the tower to ``clip_tower/``.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    for name in TOKENIZER_FILES:
        if (Path(tokenizer_dir) / name).is_file():
            shutil.copy(Path(tokenizer_dir) / name, out / name)
    config = model.lisa_config.to_dict()
    if clip_name is None:
        model.vision_tower.save_pretrained(out / "clip_tower", safe_serialization=False)
        clip_name = "clip_tower"
    config.update(vision_tower=clip_name, mm_vision_tower=clip_name)
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    state = release_state_dict(model)
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for key, tensor in state.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][key] = tensor
        size += nbytes
    for stale in list(out.glob("pytorch_model*.bin")) + list(out.glob("*.safetensors")):
        stale.unlink()
    if len(shards) == 1:
        torch.save(shards[0], out / "pytorch_model.bin")
    else:
        weight_map = {}
        for i, shard in enumerate(shards, 1):
            name = f"pytorch_model-{i:05d}-of-{len(shards):05d}.bin"
            torch.save(shard, out / name)
            weight_map.update(dict.fromkeys(shard, name))
        total = sum(t.numel() * t.element_size() for t in state.values())
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (out / "pytorch_model.bin.index.json").write_text(json.dumps(index, indent=2))
    return out
