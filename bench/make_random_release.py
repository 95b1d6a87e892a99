"""Write a LISA release with real geometry and random weights, for real-size checks without a download.

    .venv/bin/python bench/make_random_release.py /tmp/lisa7b                 # LISA-7B-v1 geometry, ~15 GB
    .venv/bin/python bench/make_random_release.py /tmp/lisa13b --geometry 13b # LISA-13B-llama2-v1, ~27 GB

Layout of ``OUT`` (a scratch folder: never commit it):

* ``OUT/LISA-7B-v1/`` (or ``LISA-13B-llama2-v1/``): the release exactly as ``model.checkpoint.load_lisa`` and LISA's
  own code read it: ``config.json`` with the release's fields (no ``sam_*`` fields: the loader reads SAM ViT-H's
  geometry off the weights), ``generation_config.json``, the tokenizer files, and the weights under the release's
  key names (``model.layers.*``, ``model.visual_model.*``, ``model.text_hidden_fcs.0.*``, ``lm_head.weight``, the
  per-layer ``rotary_emb.inv_freq`` that transformers 4.31 saved) in safetensors shards with a
  ``model.safetensors.index.json``.
* ``OUT/openai/clip-vit-large-patch14/``: a random CLIP ViT-L/14 vision tower (``CLIPVisionModel``: 24 layers,
  width 1024, 224 px, patch 14). The config names the tower ``openai/clip-vit-large-patch14`` as the release does;
  pass this folder as ``--vision-tower`` (the loader also finds it next to the release by that name).

Weights are bf16 (``--dtypes release`` instead stores SAM and the [SEG] projection in fp32, as the files of
``xinlai/LISA-7B-v1`` do). Each tensor is drawn, written and freed in turn: the script holds one tensor in memory,
never a shard or the model. The tokenizer is the test fixture's SentencePiece model padded with placeholder pieces
to LLaMA's 32000, so any generated id decodes; prompts tokenize as with the fixture.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import struct
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

FIXTURE = ROOT / "tests" / "fixtures" / "lisa_tiny"
CLIP_NAME = "openai/clip-vit-large-patch14"
#: Written last, so that a folder holding it is complete and can be reused.
DONE_FILE = ".random_release.json"
ST_DTYPES = {torch.bfloat16: "BF16", torch.float16: "F16", torch.float32: "F32"}


@dataclass(frozen=True)
class Geometry:
    name: str
    base: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    max_position_embeddings: int
    rms_norm_eps: float
    added_tokens: dict[str, int]


GEOMETRIES = {
    "7b": Geometry(
        "LISA-7B-v1",
        "LLaVA-Lightning-7B-v1-1",
        32004,
        4096,
        11008,
        32,
        32,
        2048,
        1e-6,
        {"<im_patch>": 32000, "<im_start>": 32001, "<im_end>": 32002, "[SEG]": 32003},
    ),
    "13b": Geometry(
        "LISA-13B-llama2-v1",
        "llava-llama-2-13b-chat-lightning-preview",
        32003,
        5120,
        13824,
        40,
        40,
        4096,
        1e-5,
        {"[SEG]": 32000, "<im_start>": 32001, "<im_end>": 32002},
    ),
}
#: CLIP ViT-L/14 (openai/clip-vit-large-patch14's vision_config).
CLIP_L14 = {
    "hidden_size": 1024,
    "intermediate_size": 4096,
    "num_hidden_layers": 24,
    "num_attention_heads": 16,
    "image_size": 224,
    "patch_size": 14,
    "projection_dim": 768,
    "hidden_act": "quick_gelu",
    "layer_norm_eps": 1e-5,
}


# ------------------------------------------------------------------------------------------------ config
def release_config(geo: Geometry, num_layers: int | None = None) -> dict:
    """The release's config.json: the fixture's 38 fields (those of a LISA-7B-v1 config) at this geometry."""
    config = json.loads((FIXTURE / "checkpoint" / "config.json").read_text())
    config.update(
        _name_or_path=geo.base,
        vocab_size=geo.vocab_size,
        hidden_size=geo.hidden_size,
        intermediate_size=geo.intermediate_size,
        num_hidden_layers=num_layers or geo.num_hidden_layers,
        num_attention_heads=geo.num_attention_heads,
        num_key_value_heads=geo.num_attention_heads,
        max_position_embeddings=geo.max_position_embeddings,
        max_sequence_length=geo.max_position_embeddings,
        rms_norm_eps=geo.rms_norm_eps,
        mm_hidden_size=CLIP_L14["hidden_size"],
        out_dim=256,
        vision_tower=CLIP_NAME,
        mm_vision_tower=CLIP_NAME,
        torch_dtype="bfloat16",
    )
    return config


def tensor_specs(config: dict) -> list[tuple[str, tuple[int, ...]]]:
    """(release key, shape) of every tensor of the release, in LISA's save order, from a model on ``meta``."""
    from model.checkpoint import ours_to_release
    from model.config import LisaConfig
    from model.modeling import LisaModel

    with torch.device("meta"):
        model = LisaModel(LisaConfig.from_dict(config), vision_tower=None)
    specs = []
    for name, t in model.state_dict().items():
        if name.endswith("rotary_emb.inv_freq") or "pixel_" in name:
            continue
        specs.append((ours_to_release(name), tuple(t.shape)))
    head_dim = config["hidden_size"] // config["num_attention_heads"]
    llm = [
        s
        for s in specs
        if s[0].startswith("model.")
        and not s[0].startswith(("model.visual_model.", "model.mm_projector.", "model.text_hidden_fcs."))
    ]
    rest = [s for s in specs if s not in llm and s[0] != "lm_head.weight"]
    rotary = [
        (f"model.layers.{i}.self_attn.rotary_emb.inv_freq", (head_dim // 2,))
        for i in range(config["num_hidden_layers"])
    ]
    return llm + rotary + rest + [("lm_head.weight", (config["vocab_size"], config["hidden_size"]))]


def clip_specs() -> tuple[dict, list[tuple[str, tuple[int, ...]]]]:
    """config.json and (key, shape) of a CLIP ViT-L/14 ``CLIPVisionModel``."""
    from transformers import CLIPVisionConfig, CLIPVisionModel

    config = CLIPVisionConfig(**CLIP_L14)
    with torch.device("meta"):
        model = CLIPVisionModel(config)
    specs = [(k, tuple(t.shape)) for k, t in model.state_dict().items() if not k.endswith("position_ids")]
    data = config.to_dict()
    data.update(architectures=["CLIPVisionModel"], torch_dtype="bfloat16")
    return data, specs


# ------------------------------------------------------------------------------------------------ weights
def storage_dtype(key: str, mode: str) -> torch.dtype:
    if key.endswith("rotary_emb.inv_freq"):
        return torch.float32
    if mode == "release" and key.startswith(("model.visual_model.", "model.text_hidden_fcs.")):
        return torch.float32
    return torch.bfloat16


def random_tensor(
    key: str, shape: tuple[int, ...], dtype: torch.dtype, seed: int, rope_theta: float = 1e4, device: str = "cpu"
) -> torch.Tensor:
    """A plausible random value on the CPU: norms 1, biases 0, inv_freq exact, other weights N(0, 0.02) (drawn on
    ``device``: ``cuda`` draws 7B's weights in seconds)."""
    if key.endswith("rotary_emb.inv_freq"):
        dim = 2 * shape[0]
        return 1.0 / (rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    last = key.rsplit(".", 1)[-1]
    if last == "bias":
        return torch.zeros(shape, dtype=dtype)
    if len(shape) == 1 and last == "weight":
        return torch.ones(shape, dtype=dtype)
    gen = torch.Generator(device).manual_seed(seed)
    std = 1.0 if "gaussian_matrix" in key else 0.02
    return torch.empty(shape, dtype=dtype, device=device).normal_(0.0, std, generator=gen).cpu()


def nbytes(shape: tuple[int, ...], dtype: torch.dtype) -> int:
    return math.prod(shape) * dtype.itemsize


def write_safetensors(
    path: Path, items: list[tuple[str, tuple[int, ...], torch.dtype]], make: Callable[[str], torch.Tensor]
) -> int:
    """Stream a safetensors file: the header from the shapes, then each tensor as ``make(key)`` returns it."""
    header, offset = {}, 0
    for key, shape, dtype in items:
        size = nbytes(shape, dtype)
        header[key] = {"dtype": ST_DTYPES[dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    header["__metadata__"] = {"format": "pt"}
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    tmp = path.with_suffix(".partial")
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for key, shape, dtype in items:
            t = make(key).to(dtype).contiguous()
            assert tuple(t.shape) == shape, (key, t.shape, shape)
            f.write(t.reshape(-1).view(torch.uint8).numpy().data)
            del t
    tmp.rename(path)
    return 8 + len(blob) + offset


def shard_plan(items: list[tuple[str, tuple[int, ...], torch.dtype]], max_bytes: int) -> list[list]:
    shards, size = [[]], 0
    for item in items:
        n = nbytes(item[1], item[2])
        if shards[-1] and size + n > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(item)
        size += n
    return shards


# ------------------------------------------------------------------------------------------------ tokenizer
def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def padded_tokenizer_model(src: Path, size: int) -> bytes:
    """The SentencePiece model ``src`` with NORMAL placeholder pieces (``▁r00700``...) appended up to ``size``.

    A ModelProto's pieces are its repeated field 1, so appended records extend the vocabulary in order. The
    placeholders have the lowest scores and no sub-pieces, so BPE never produces them: text encodes as before.
    """
    import sentencepiece as spm

    data = src.read_bytes()
    sp = spm.SentencePieceProcessor()
    sp.LoadFromSerializedProto(data)
    extra = bytearray()
    for i in range(sp.GetPieceSize(), size):
        piece = f"\u2581r{i:05d}".encode()
        entry = b"\x0a" + _varint(len(piece)) + piece + b"\x15" + struct.pack("<f", -1e6 - i) + b"\x18\x01"
        extra += b"\x0a" + _varint(len(entry)) + entry
    out = data + bytes(extra)
    check = spm.SentencePieceProcessor()
    check.LoadFromSerializedProto(out)
    assert check.GetPieceSize() == size, check.GetPieceSize()
    probe = "What is the food rich in vitamin C in this image? Please output segmentation mask."
    assert check.EncodeAsIds(probe) == sp.EncodeAsIds(probe)
    return out


# ------------------------------------------------------------------------------------------------ main
def make_release(
    out: str | Path,
    geometry: str = "7b",
    dtypes: str = "bf16",
    shard_gb: float = 4.0,
    num_layers: int | None = None,
    seed: int = 0,
    verbose: bool = True,
    device: str = "cpu",
) -> dict:
    """Write (or reuse, when complete with the same settings) the random release under ``out``.

    Returns a summary: ``model_dir``, ``clip_dir``, ``weight_bytes`` (tensor bytes of the release and the tower
    as stored), ``bf16_bytes`` (the same tensors at 2 bytes each, inv_freq excluded: what ``--dtype bf16`` holds),
    ``file_bytes`` and ``seconds``.
    """
    geo = GEOMETRIES[geometry]
    out = Path(out)
    model_dir, clip_dir = out / geo.name, out / CLIP_NAME
    settings = {"geometry": geometry, "dtypes": dtypes, "num_layers": num_layers, "seed": seed, "shard_gb": shard_gb}
    done = out / DONE_FILE
    if done.is_file():
        summary = json.loads(done.read_text())
        if summary.get("settings") == settings:
            if verbose:
                print(f"reusing the random release in {out} ({summary['file_bytes'] / 1e9:.2f} GB)")
            return summary

    def say(msg: str) -> None:
        if verbose:
            print(msg, flush=True)

    t_start = time.perf_counter()
    for d in (model_dir, clip_dir):
        if d.exists():
            shutil.rmtree(d)
        d.mkdir(parents=True)
    done.unlink(missing_ok=True)

    # --- config, tokenizer
    config = release_config(geo, num_layers)
    (model_dir / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    for name in ("generation_config.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(FIXTURE / "checkpoint" / name, model_dir / name)
    base_vocab = min(geo.added_tokens.values())
    (model_dir / "tokenizer.model").write_bytes(
        padded_tokenizer_model(FIXTURE / "checkpoint" / "tokenizer.model", base_vocab)
    )
    (model_dir / "added_tokens.json").write_text(json.dumps(dict(sorted(geo.added_tokens.items())), indent=2) + "\n")

    # --- LISA weights, shard by shard, tensor by tensor
    specs = tensor_specs(config)
    items = [(k, shape, storage_dtype(k, dtypes)) for k, shape in specs]
    seeds = {k: seed * 1_000_003 + i for i, (k, _) in enumerate(specs)}

    shapes = dict(specs)

    def make(key: str) -> torch.Tensor:
        return random_tensor(key, shapes[key], storage_dtype(key, dtypes), seeds[key], device=device)

    shards = shard_plan(items, int(shard_gb * 1e9))
    weight_map, file_bytes = {}, 0
    for i, shard in enumerate(shards, 1):
        name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        t0 = time.perf_counter()
        written = write_safetensors(model_dir / name, shard, make)
        file_bytes += written
        weight_map.update(dict.fromkeys((k for k, _, _ in shard), name))
        say(f"  {name}: {len(shard)} tensors, {written / 1e9:.2f} GB in {time.perf_counter() - t0:.1f} s")
    tensor_bytes = sum(nbytes(s, d) for _, s, d in items)
    index = {"metadata": {"total_size": tensor_bytes}, "weight_map": weight_map}
    (model_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")

    # --- CLIP ViT-L/14 tower
    clip_config, clip = clip_specs()
    (clip_dir / "config.json").write_text(json.dumps(clip_config, indent=2, sort_keys=True) + "\n")
    shutil.copy(FIXTURE / "clip_tower" / "preprocessor_config.json", clip_dir / "preprocessor_config.json")
    clip_items = [(k, s, torch.bfloat16) for k, s in clip]
    clip_shapes = dict(clip)
    clip_seeds = {k: seed * 1_000_003 + len(specs) + i for i, (k, _) in enumerate(clip)}
    t0 = time.perf_counter()

    def make_clip(key: str) -> torch.Tensor:
        return random_tensor(key, clip_shapes[key], torch.bfloat16, clip_seeds[key], device=device)

    written = write_safetensors(clip_dir / "model.safetensors", clip_items, make_clip)
    file_bytes += written
    say(f"  CLIP tower: {len(clip_items)} tensors, {written / 1e9:.2f} GB in {time.perf_counter() - t0:.1f} s")

    loaded = [(k, s) for k, s, _ in items if not k.endswith("inv_freq")] + list(clip)
    summary = {
        "settings": settings,
        "model_dir": str(model_dir),
        "clip_dir": str(clip_dir),
        "weight_bytes": tensor_bytes + sum(nbytes(s, d) for _, s, d in clip_items),
        "bf16_bytes": sum(nbytes(s, torch.bfloat16) for _, s in loaded),
        "params": sum(math.prod(s) for _, s in loaded),
        "file_bytes": file_bytes,
        "shards": len(shards),
        "seconds": round(time.perf_counter() - t_start, 1),
    }
    done.write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", help="scratch folder (created; a complete earlier run with the same settings is reused)")
    parser.add_argument("--geometry", choices=sorted(GEOMETRIES), default="7b")
    parser.add_argument(
        "--dtypes",
        choices=["bf16", "release"],
        default="bf16",
        help="bf16: every weight bf16; release: SAM and text_hidden_fcs fp32, as LISA's files",
    )
    parser.add_argument("--shard-gb", type=float, default=4.0, help="shard size bound in GB (default 4)")
    parser.add_argument("--num-layers", type=int, default=None, help="fewer LLM layers (quick smoke runs only)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu", help="where to draw the random values (cuda: much faster)")
    args = parser.parse_args(argv)
    s = make_release(
        args.out, args.geometry, args.dtypes, args.shard_gb, args.num_layers, args.seed, device=args.device
    )
    print(f"release  {s['model_dir']}  ({s['shards']} shards)\nCLIP     {s['clip_dir']}")
    print(
        f"params {s['params'] / 1e9:.3f} B; tensor bytes {s['weight_bytes'] / 1e9:.2f} GB "
        f"(bf16 as loaded: {s['bf16_bytes'] / 1e9:.2f} GB); written {s['file_bytes'] / 1e9:.2f} GB "
        f"in {s['seconds']:.1f} s"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
