"""Defaults of the model library that the command line needs without importing torch."""

#: LISA's ``evaluate`` default; released v1 answers ("Sure, [SEG].") need fewer than 10 tokens.
DEFAULT_MAX_NEW_TOKENS = 32

#: Where a model runs when ``--device auto`` (the CLI's default for workers): CUDA when present, else CPU.
AUTO_DEVICE = "auto"

#: SAM 3's own score threshold (``Sam3Model``'s model card): a concept query returns every instance whose score
#: (query logit x presence, both sigmoids) is above it. A job may ask for another in ``options["threshold"]``.
SAM3_SCORE_THRESHOLD = 0.5
#: Probability above which a pixel of a SAM 3 instance mask is inside (``post_process_instance_segmentation``).
SAM3_MASK_THRESHOLD = 0.5


def resolve_device(device: str) -> str:
    """``"auto"`` -> ``"cuda"`` when a CUDA device is present, else ``"cpu"``; anything else as given.

    torch is imported here, not at the top, so that this module stays importable without it."""
    if device != AUTO_DEVICE:
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"
