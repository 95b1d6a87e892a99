"""Defaults of the model library, and the "auto" device/dtype rule, importable without torch (the command line
and the queue client read them; torch is imported only when "auto" has to be decided)."""

from __future__ import annotations

#: LISA's ``evaluate`` default; released v1 answers ("Sure, [SEG].") need fewer than 10 tokens.
DEFAULT_MAX_NEW_TOKENS = 32

#: SAM 3's own score threshold (``Sam3Model``'s model card): a concept query returns every instance whose score
#: (query logit x presence, both sigmoids) is above it. A job may ask for another in ``options["threshold"]``.
SAM3_SCORE_THRESHOLD = 0.5
#: Probability above which a pixel of a SAM 3 instance mask is inside (``post_process_instance_segmentation``).
SAM3_MASK_THRESHOLD = 0.5

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


#: The environment variable naming the model (LISA release folder or Hub id) that ``lisa-ls worker``, ``up`` and
#: ``segment`` load when ``--model`` is not given. Deliberately not ``MODEL_DIR``: Label Studio's ML backends use
#: that for the backend's own data folder, and so does ours (``backend/config.py``); ``lisa-ls up`` hands its
#: backend and its workers one environment, so one name cannot mean both.
MODEL_ENV = "LISA_LS_MODEL"
#: The environment variable naming a SAM 3 model (folder or Hub id) that ``lisa-ls up`` serves beside ``--model``
#: (its ``--sam3-model`` default).
SAM3_MODEL_ENV = "LISA_LS_SAM3_MODEL"
