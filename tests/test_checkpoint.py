"""Checkpoint loading: formats, dtypes, and one clear error for each way a checkpoint can be wrong."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import CASES, CHECKPOINT, CLIP_TOWER, case_image

from model.checkpoint import iter_tensors, load_lisa, ours_to_release, release_to_ours, weight_files
from model.errors import CheckpointError
from model.inference import LisaPredictor
from model.preprocess import load_image

SIDE_FILES = ["config.json", "generation_config.json", "tokenizer.model", "tokenizer_config.json",
              "special_tokens_map.json", "added_tokens.json"]


def full_state() -> dict[str, torch.Tensor]:
    return dict(iter_tensors(weight_files(CHECKPOINT)))


def write_checkpoint(folder: Path, state: dict[str, torch.Tensor], fmt: str = "bin") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name in SIDE_FILES:
        shutil.copy(CHECKPOINT / name, folder)
    if fmt == "bin":
        torch.save(state, folder / "pytorch_model.bin")
    else:
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in state.items()}, str(folder / "model.safetensors"))
    return folder


def test_key_mapping_round_trips():
    for key in full_state():
        ours = release_to_ours(key)
        if ours is not None:
            assert ours_to_release(ours) == key
    assert release_to_ours("model.layers.0.self_attn.rotary_emb.inv_freq") is None


def test_safetensors_single_file_gives_the_same_model(tmp_path, tiny_predictor):
    folder = write_checkpoint(tmp_path / "st", full_state(), fmt="safetensors")
    other = LisaPredictor.from_pretrained(str(folder), vision_tower=str(CLIP_TOWER))
    image = load_image(case_image(1))
    a = tiny_predictor.segment_teacher_forced([(tiny_predictor.encode(image), *CASES[1])])[0]
    b = other.segment_teacher_forced([(other.encode(image), *CASES[1])])[0]
    np.testing.assert_array_equal(a.mask_logits, b.mask_logits)


def test_missing_key_is_named(tmp_path):
    state = full_state()
    del state["model.mm_projector.bias"]
    folder = write_checkpoint(tmp_path / "m", state)
    with pytest.raises(CheckpointError, match=r"missing keys \(1\): model\.mm_projector\.bias"):
        load_lisa(folder, vision_tower=str(CLIP_TOWER))


def test_unexpected_key_is_named(tmp_path):
    state = full_state()
    state["model.extra_head.weight"] = torch.zeros(2, 2)
    folder = write_checkpoint(tmp_path / "u", state)
    with pytest.raises(CheckpointError, match=r"unexpected keys \(1\): model\.extra_head\.weight"):
        load_lisa(folder, vision_tower=str(CLIP_TOWER))


def test_shape_mismatch_is_named(tmp_path):
    state = full_state()
    state["model.text_hidden_fcs.0.2.bias"] = torch.zeros(7)
    folder = write_checkpoint(tmp_path / "s", state)
    with pytest.raises(CheckpointError, match=r"text_hidden_fcs\.0\.2\.bias: file \(7,\)"):
        load_lisa(folder, vision_tower=str(CLIP_TOWER))


def test_missing_files(tmp_path):
    folder = write_checkpoint(tmp_path / "f", full_state())
    (folder / "tokenizer.model").unlink()
    with pytest.raises(CheckpointError, match=r"missing tokenizer\.model"):
        load_lisa(folder)
    sharded = tmp_path / "sharded"
    shutil.copytree(CHECKPOINT, sharded)
    (sharded / "pytorch_model-00003-of-00004.bin").unlink()
    with pytest.raises(CheckpointError, match=r"pytorch_model-00003-of-00004\.bin, which are missing"):
        load_lisa(sharded, vision_tower=str(CLIP_TOWER))
    with pytest.raises(CheckpointError, match="no such checkpoint folder"):
        load_lisa(tmp_path / "nothing-here")


def test_hub_id_offline_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(CheckpointError, match="cannot download xinlai/LISA-7B-v1"):
        load_lisa("xinlai/LISA-7B-v1")


def test_clip_tower_of_the_wrong_width(tmp_path):
    from transformers import CLIPVisionConfig, CLIPVisionModel

    cfg = json.loads((CLIP_TOWER / "config.json").read_text())
    cfg.update(hidden_size=16, intermediate_size=32)
    CLIPVisionModel(CLIPVisionConfig(**{k: v for k, v in cfg.items() if k != "architectures"})).save_pretrained(
        tmp_path / "clip16")
    with pytest.raises(CheckpointError, match="16 wide, but this LISA's mm_projector takes 32"):
        load_lisa(CHECKPOINT, vision_tower=str(tmp_path / "clip16"))


def test_tokenizer_not_matching_weights(tmp_path):
    folder = write_checkpoint(tmp_path / "v", full_state())
    cfg = json.loads((folder / "config.json").read_text())
    cfg["vocab_size"] = 800
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"tokenizer has 704 tokens but config\.json says vocab_size 800"):
        load_lisa(folder, vision_tower=str(CLIP_TOWER))


def test_default_vision_tower_comes_from_the_config():
    # config.json names the relative folder "clip_tower", which sits next to the checkpoint folder.
    model, _ = load_lisa(CHECKPOINT)
    assert model.vision_tower.config.hidden_size == 32


def test_dtype_options(tiny_predictor):
    with pytest.raises(CheckpointError, match="unknown dtype"):
        load_lisa(CHECKPOINT, dtype="int3")
    with pytest.raises(CheckpointError, match="needs a CUDA device"):
        load_lisa(CHECKPOINT, quantize="4bit")
    bf16 = LisaPredictor.from_pretrained(str(CHECKPOINT), vision_tower=str(CLIP_TOWER), dtype="bf16")
    # On the CPU SAM stays fp32 (bf16 arithmetic is emulated there and SAM ViT-H would take most of an hour).
    assert bf16.model.llm_dtype == torch.bfloat16 and bf16.model.sam_dtype == torch.float32
    image = load_image(case_image(1))
    a = tiny_predictor.segment_teacher_forced([(tiny_predictor.encode(image), *CASES[1])])[0]
    b = bf16.segment_teacher_forced([(bf16.encode(image), *CASES[1])])[0]
    assert b.mask_logits.dtype == np.float32
    # bf16 keeps 8 bits of mantissa: the masks agree on nearly every pixel.
    assert (a.masks == b.masks).mean() > 0.97
    fp16 = load_lisa(CHECKPOINT, dtype="fp16")[0]
    assert fp16.llm_dtype == torch.float16 and fp16.sam_dtype == torch.float32


def test_the_load_line_gives_the_size_not_a_release_name(caplog):
    """Issue 22.6: the line said "(7b-v1, fp32)" for the 1 M-parameter demo model; "7b-v1" is only the layout of
    its special tokens. It now says how big the model is and where the layout comes from."""
    with caplog.at_level("INFO", logger="model.checkpoint"):
        lisa, _ = load_lisa(Path(__file__).parent.parent / "models" / "demo", dtype="fp32", device="cpu")
    [line] = [r.getMessage() for r in caplog.records if r.getMessage().startswith("loaded ")]
    millions = sum(p.numel() for p in lisa.parameters()) / 1e6
    assert f"({millions:.1f} M parameters, fp32; special tokens as in LISA-7B-v1)" in line, line
