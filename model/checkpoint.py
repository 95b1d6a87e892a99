"""Loading a LISA release (Hub id or folder; sharded ``.bin`` or safetensors) and its CLIP tower.

Every tensor in the checkpoint must land in a parameter or buffer of :class:`~model.modeling.LisaModel` and
every parameter must be filled: anything else is a :class:`CheckpointError` naming the keys. The only keys
consumed without being loaded are LLaMA's ``rotary_emb.inv_freq`` buffers (persistent in transformers 4.31, which
wrote the releases; recomputed by current transformers, and checked against the file).

The model is first built with its parameters on the ``meta`` device, then each tensor is cast and moved straight to
its target device as it is read, so host memory never holds a second copy of a 16 GB release: a tensor that keeps
its file dtype on the CPU stays a view of the memory-mapped file, and the file pages of a tensor that was cast or
moved are given back at once (:class:`_SourcePages`).
"""

from __future__ import annotations

import ctypes
import json
import logging
import mmap
import os
import sys
from collections.abc import Iterator
from pathlib import Path

import torch

from model.config import SAM_PREFIX, LisaConfig, sam_geometry_from_weights
from model.errors import CheckpointError
from model.modeling import LisaModel
from model.tokenizer import LisaTokenizer

log = logging.getLogger(__name__)

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
#: What a checkpoint folder must hold besides its weights.
REQUIRED_FILES = ("config.json", "tokenizer.model", "added_tokens.json")
#: Release key prefix -> our module path (see the table in model/modeling.py).
KEY_MAP = (
    ("model.visual_model.", "sam."),
    ("model.mm_projector.", "mm_projector."),
    ("model.text_hidden_fcs.0.", "text_hidden_fcs."),
    ("model.", "llm.model."),
    ("lm_head.", "llm.lm_head."),
)


def release_to_ours(key: str) -> str | None:
    """Our parameter name for a release key, or ``None`` for keys consumed but not loaded (``inv_freq``)."""
    if key.endswith("rotary_emb.inv_freq"):
        return None
    for theirs, ours in KEY_MAP:
        if key.startswith(theirs):
            return ours + key[len(theirs) :]
    return key  # unknown: reported as unexpected


def ours_to_release(name: str) -> str:
    """The release key of one of our parameter names (inverse of :func:`release_to_ours`)."""
    for theirs, ours in KEY_MAP:
        if name.startswith(ours):
            return theirs + name[len(ours) :]
    raise KeyError(name)


# ------------------------------------------------------------------------------------------ locating files
def resolve_model_dir(model: str | os.PathLike) -> Path:
    """A local folder as is; anything else is a Hugging Face Hub id, downloaded (or found in the HF cache)."""
    path = Path(model).expanduser()
    if path.is_dir():
        missing = [f for f in REQUIRED_FILES if not (path / f).is_file()]
        if missing:
            raise CheckpointError(
                f"{path}: missing {', '.join(missing)}. A LISA checkpoint folder holds config.json, the tokenizer "
                "files and the weight shards; copy the whole release folder."
            )
        return path
    if path.exists() or str(model).startswith((".", "/")) or str(model).count("/") != 1:
        raise CheckpointError(f"{model}: no such checkpoint folder (and not a Hub id like 'xinlai/LISA-7B-v1').")
    try:
        from huggingface_hub import snapshot_download

        patterns = ["*.json", "*.model", "*.safetensors", "*.bin"]
        return resolve_model_dir(snapshot_download(str(model), allow_patterns=patterns))
    except CheckpointError:
        raise
    except Exception as e:  # network, auth, missing repo: all end the same way for the user
        raise CheckpointError(
            f"cannot download {model} from the Hugging Face Hub ({type(e).__name__}: {e}). Check the id and the "
            "network, or download the folder elsewhere and pass its path."
        ) from e


def resolve_vision_tower(name: str, model_dir: Path) -> str:
    """Where the CLIP tower named in a config is: LISA resolves relative names against the working directory;
    we also look next to and inside the checkpoint folder. Anything else is a Hub id."""
    for base in (Path.cwd(), model_dir, model_dir.parent):
        candidate = (base / name).expanduser()
        if candidate.is_dir():
            return str(candidate)
    return name


def weight_files(model_dir: Path) -> list[Path]:
    """The weight files of a checkpoint, sharded or not, safetensors preferred."""
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        index = model_dir / index_name
        if index.is_file():
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            missing = [s for s in shards if not (model_dir / s).is_file()]
            if missing:
                raise CheckpointError(f"{model_dir}: {index_name} lists {', '.join(missing)}, which are missing.")
            return [model_dir / s for s in shards]
    for single in ("model.safetensors", "pytorch_model.bin"):
        if (model_dir / single).is_file():
            return [model_dir / single]
    raise CheckpointError(f"{model_dir}: no weights (model.safetensors, pytorch_model.bin or a sharded index).")


def iter_tensors(files: list[Path]) -> Iterator[tuple[str, torch.Tensor]]:
    """(key, tensor) of every weight file, read lazily (memory-mapped)."""
    for f in files:
        if f.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(f), framework="pt") as sf:
                for k in sf.keys():  # noqa: SIM118 - safe_open is not a dict
                    yield k, sf.get_tensor(k)
        else:
            try:
                state = torch.load(f, map_location="cpu", weights_only=True, mmap=True)
            except Exception as e:
                raise CheckpointError(f"{f}: cannot be read as a PyTorch weight file ({e}).") from e
            yield from state.items()
            del state


# -------------------------------------------------------------------------------------------------- loading
def load_clip(vision_tower: str, dtype: torch.dtype, device: torch.device | str, expected_width: int):
    """The CLIP vision tower from an id or folder, checked against the projector's input width."""
    from transformers import CLIPVisionModel
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # one tiny bar per load is noise in worker logs
    try:
        tower, info = CLIPVisionModel.from_pretrained(vision_tower, dtype=dtype, output_loading_info=True)
    except Exception as e:
        raise CheckpointError(
            f"cannot load the CLIP vision tower {vision_tower!r} ({type(e).__name__}: {e}). Pass "
            "--vision-tower with a local copy of openai/clip-vit-large-patch14 or the tower the model was trained with."
        ) from e
    if info.get("missing_keys"):
        raise CheckpointError(f"CLIP tower {vision_tower}: missing weights {sorted(info['missing_keys'])[:10]}")
    width = tower.config.hidden_size
    if width != expected_width:
        raise CheckpointError(
            f"CLIP tower {vision_tower} is {width} wide, but this LISA's mm_projector takes {expected_width} "
            "(mm_hidden_size): this is the wrong vision tower for the checkpoint (LISA v1 uses "
            "openai/clip-vit-large-patch14, 1024 wide)."
        )
    return tower.to(device).eval().requires_grad_(False)


class _SourcePages:
    """Gives back the file pages of a memory-mapped checkpoint tensor once it has been cast or moved.

    A weight kept in its file dtype on the CPU is a view of the file mapping (one copy in RAM), and it keeps the
    whole mapping alive, so without this every page read for a cast or moved weight (LISA's fp32 SAM loaded as
    bf16: 2.6 GB; any weight moved to CUDA) would stay resident beside its copy. Only whole pages inside the
    tensor and inside a private mapping of one of the weight files are dropped (``MADV_DONTNEED``): a later read
    of them reads the file again, so nothing can change. Linux only; elsewhere a no-op.
    """

    MADV_DONTNEED = 4

    def __init__(self, files: list[Path]) -> None:
        self.paths = {os.path.realpath(f) for f in files}
        self.ranges: list[tuple[int, int]] = []
        self.madvise = None
        if sys.platform.startswith("linux"):
            try:
                self.madvise = ctypes.CDLL(None, use_errno=True).madvise
                self.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
                self.madvise.restype = ctypes.c_int
            except (OSError, AttributeError):
                self.madvise = None

    def _file_ranges(self) -> list[tuple[int, int]]:
        ranges = []
        try:
            with open("/proc/self/maps") as maps:
                for line in maps:
                    fields = line.split(maxsplit=5)
                    if len(fields) == 6 and fields[1].endswith("p") and fields[5].strip() in self.paths:
                        lo, hi = (int(x, 16) for x in fields[0].split("-"))
                        ranges.append((lo, hi))
        except OSError:
            pass
        return ranges

    def release(self, source: torch.Tensor, copy: torch.Tensor) -> None:
        if self.madvise is None or source.device.type != "cpu" or copy.data_ptr() == source.data_ptr():
            return
        page = mmap.PAGESIZE
        start = source.data_ptr()
        lo, hi = -(-start // page) * page, (start + source.numel() * source.element_size()) // page * page
        if hi <= lo:
            return
        inside = any(a <= lo and hi <= b for a, b in self.ranges)
        if not inside:
            self.ranges = self._file_ranges()
            if not any(a <= lo and hi <= b for a, b in self.ranges):
                return  # not in a mapping of a weight file: never touch it
        self.madvise(lo, hi - lo, self.MADV_DONTNEED)


def _set_tensor(module: torch.nn.Module, name: str, value: torch.Tensor) -> None:
    owner_name, _, attr = name.rpartition(".")
    owner = module.get_submodule(owner_name) if owner_name else module
    if attr in owner._parameters:
        owner._parameters[attr] = torch.nn.Parameter(value, requires_grad=False)
    else:
        owner._buffers[attr] = value


def sam_dtype_for(dtype: str, device: str, quantize: str | None = None) -> torch.dtype:
    """The dtype SAM is loaded in for ``--dtype``/``--device``/``--quantize``.

    SAM stays fp32 where LISA keeps it (fp16, quantized) and on the CPU: CPUs without native bf16 arithmetic (AVX2
    and most AVX-512 parts) emulate bf16 convolutions and matmuls, and SAM ViT-H's image encoder then took 2738 s
    instead of minutes on this project's 2-core machine; fp32 costs 1.3 GB more for ViT-H's 0.64 B parameters.
    """
    if dtype == "fp16" or quantize or torch.device(device).type == "cpu":
        return torch.float32
    return DTYPES[dtype]


def load_lisa(
    model: str | os.PathLike,
    vision_tower: str | None = None,
    dtype: str = "fp32",
    device: str = "cpu",
    quantize: str | None = None,
) -> tuple[LisaModel, LisaTokenizer]:
    """Load a LISA release and its CLIP tower, ready for inference (eval mode, no gradients).

    Args:
        model: folder or Hub id of a LISA release (``xinlai/LISA-7B-v1``...).
        vision_tower: CLIP folder or id; default: the one named in the checkpoint's config.
        dtype: ``fp32``, ``bf16`` or ``fp16`` for the LLM, CLIP, projector and [SEG] projection. SAM runs in fp32
            when the rest is fp16 or quantized (as LISA does) and on the CPU, else in ``dtype``.
        device: ``cpu``, ``cuda`` or ``cuda:N``.
        quantize: ``None``, ``"8bit"`` or ``"4bit"`` (bitsandbytes, CUDA only) for the LLM alone.
    """
    if dtype not in DTYPES:
        raise CheckpointError(f"unknown dtype {dtype!r}; use one of {', '.join(DTYPES)}")
    torch_dtype = DTYPES[dtype]
    if quantize not in (None, "8bit", "4bit"):
        raise CheckpointError(f"unknown quantization {quantize!r}; use 8bit or 4bit")
    if quantize and not str(device).startswith("cuda"):
        raise CheckpointError("8-bit/4-bit loading needs a CUDA device (bitsandbytes); use --dtype bf16 on CPU.")
    sam_dtype = sam_dtype_for(dtype, device, quantize)
    model_dir = resolve_model_dir(model)
    raw = json.loads((model_dir / "config.json").read_text())
    config = LisaConfig.from_dict(raw)
    tokenizer = LisaTokenizer(model_dir)
    if len(tokenizer) != config.vocab_size:
        raise CheckpointError(
            f"{model_dir}: the tokenizer has {len(tokenizer)} tokens but config.json says vocab_size "
            f"{config.vocab_size}; the tokenizer files do not belong to these weights."
        )
    files = weight_files(model_dir)
    if "sam_encoder_embed_dim" not in raw:
        shapes = {}
        for k, t in iter_tensors(files):
            if k.startswith(SAM_PREFIX):
                shapes[k] = t.shape
        for k, v in sam_geometry_from_weights(shapes).items():
            setattr(config, k, v)
    tower_name = vision_tower or resolve_vision_tower(config.vision_tower, model_dir)
    clip = load_clip(tower_name, torch_dtype, device, config.mm_hidden_size)
    config.vision_tower = config.mm_vision_tower = str(vision_tower or config.vision_tower)

    from accelerate import init_empty_weights

    llm = _load_quantized_llm(model_dir, config, quantize, device) if quantize else None
    with init_empty_weights(include_buffers=False):
        lisa = LisaModel(config, vision_tower=None, llm=llm)
    lisa.vision_tower = clip
    _fill_weights(lisa, files, torch_dtype, sam_dtype, device, skip_llm=llm is not None)
    lisa.to(device)
    lisa.eval().requires_grad_(False)
    # The layout names the release whose special-token ids the tokenizer has, not this model (the 1 M-parameter
    # demo model has LISA-7B-v1's), so the line says the size too.
    tokens = {"7b-v1": "LISA-7B-v1", "13b-llama2-v1": "LISA-13B-llama2-v1"}.get(tokenizer.layout.name)
    log.info("loaded %s (%s parameters, %s%s; special tokens %s) with CLIP %s", model_dir,
             _count(sum(p.numel() for p in lisa.parameters())), dtype, f", LLM {quantize}" if quantize else "",
             f"as in {tokens}" if tokens else "in a custom layout", tower_name)
    return lisa, tokenizer


def _count(n: int) -> str:
    """``1.0 M``, ``7.70 B``: a parameter count as people say it."""
    return f"{n / 1e9:.2f} B" if n >= 1e9 else f"{n / 1e6:.1f} M" if n >= 1e5 else str(n)


def _fill_weights(
    lisa: LisaModel, files: list[Path], dtype: torch.dtype, sam_dtype: torch.dtype, device: str, skip_llm: bool
) -> None:
    expected = {n: t for n, t in lisa.named_parameters() if not n.startswith("vision_tower.")}
    expected.update({n: b for n, b in lisa.named_buffers() if n.startswith("sam.prompt_encoder.pe_layer")})
    if skip_llm:
        expected = {n: t for n, t in expected.items() if not n.startswith("llm.")}
    unexpected, mismatched, loaded = [], [], set()
    pages = _SourcePages(files)
    rotary = lisa.llm.model.rotary_emb.inv_freq
    for key, tensor in iter_tensors(files):
        name = release_to_ours(key)
        if name is None:
            # inv_freq: releases store it bf16-rounded; 4.31 computed its cos/sin cache from the exact values at
            # construction, as current transformers does, so only check that the file agrees to bf16 precision.
            if tensor.shape != rotary.shape or not torch.allclose(tensor.float(), rotary.float().cpu(), rtol=1e-2):
                raise CheckpointError(f"{key} differs from the rotary frequencies of this config (rope_theta?)")
            continue
        if skip_llm and name.startswith("llm."):
            loaded.add(name)
            continue
        if name not in expected:
            unexpected.append(key)
            continue
        if tuple(tensor.shape) != tuple(expected[name].shape):
            mismatched.append(f"{key}: file {tuple(tensor.shape)} vs model {tuple(expected[name].shape)}")
            continue
        target = sam_dtype if name.startswith("sam.") else dtype
        if name.startswith("sam.prompt_encoder."):
            # Upstream SAM computes positional encodings in float32; its outputs are cast when decoding.
            target = torch.float32
        value = tensor.to(device=device, dtype=target)
        pages.release(tensor, value)
        _set_tensor(lisa, name, value)
        loaded.add(name)
    missing = sorted(ours_to_release(n) for n in expected if n not in loaded)
    problems = []
    if missing:
        more = " ..." if len(missing) > 12 else ""
        problems.append(f"missing keys ({len(missing)}): {', '.join(missing[:12])}{more}")
    if unexpected:
        problems.append(f"unexpected keys ({len(unexpected)}): {', '.join(sorted(unexpected)[:12])}")
    if mismatched:
        problems.append(f"shape mismatches: {'; '.join(mismatched[:12])}")
    if problems:
        raise CheckpointError(
            "the checkpoint does not match a LISA model: " + " | ".join(problems)
            + ". Use a complete LISA v1 release (xinlai/LISA-7B-v1, xinlai/LISA-13B-llama2-v1) or a folder written "
            "by `lisa-ls merge`."
        )


def _load_quantized_llm(model_dir: Path, config: LisaConfig, quantize: str, device: str):
    """The LLM alone through transformers + bitsandbytes; SAM, projector and fcs stay unquantized."""
    try:
        import bitsandbytes  # noqa: F401
        from transformers import BitsAndBytesConfig, LlamaForCausalLM
    except ImportError as e:
        raise CheckpointError("8-bit/4-bit loading needs bitsandbytes: pip install 'lisa-ls[quant]'") from e
    if quantize == "4bit":
        qconf = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                   bnb_4bit_compute_dtype=torch.float16)
    else:
        qconf = BitsAndBytesConfig(load_in_8bit=True)
    llm, info = LlamaForCausalLM.from_pretrained(
        model_dir, config=config.llama_config(), quantization_config=qconf, dtype=torch.float16,
        device_map={"": device}, output_loading_info=True,
    )
    if info.get("missing_keys"):
        raise CheckpointError(f"{model_dir}: LLM weights missing: {sorted(info['missing_keys'])[:12]}")
    return llm
