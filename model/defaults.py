"""Defaults of the model library, and the "auto" device/dtype rule, importable without torch (the command line
and the queue client read them; torch is imported only when "auto" has to be decided)."""

from __future__ import annotations

#: LISA's ``evaluate`` default; released v1 answers ("Sure, [SEG].") need fewer than 10 tokens.
DEFAULT_MAX_NEW_TOKENS = 32

AUTO = "auto"
"""The ``--device``/``--dtype`` value that lets :func:`resolve_device`/:func:`resolve_dtype` choose."""


def resolve_device(device: str) -> str:
    """``device`` as given, or for ``"auto"`` CUDA when present, else the CPU."""
    if device != AUTO:
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def resolve_dtype(dtype: str, device: str) -> str:
    """``dtype`` as given, or for ``"auto"`` bf16 on CUDA (half the memory, LISA's training dtype), fp32 on a CPU."""
    if dtype != AUTO:
        return dtype
    return "bf16" if device.startswith("cuda") else "fp32"
