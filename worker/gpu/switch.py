"""How a worker switches to a promoted model: side by side when both fit, else the old one freed first.

Loading the new model while the old one still serves needs both in memory at once: about 30 GB for LISA-7B in bf16
on a GPU that may hold 24. When the new model (estimated by the size of the one loaded now: a promotion is a
fine-tune of the same base) does not fit in the device's free memory with :data:`HEADROOM` to spare, the worker
frees the old model first. It serves nothing meanwhile (its heartbeat says ``"state": "switching"``; queued jobs
wait for it or go to other workers), and if the new model fails to load it loads the old one again.
"""

from __future__ import annotations

import itertools
import os
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch is imported where it is used: the worker's command line parser reads STRATEGIES
    import torch

AUTO, FREE_FIRST, SIDE_BY_SIDE = "auto", "free-first", "side-by-side"
STRATEGIES = (AUTO, FREE_FIRST, SIDE_BY_SIDE)
"""``lisa-ls worker --switch``: decide by free memory (default), always free first, always load side by side."""

HEADROOM = 1.25
"""Free memory needed for a side-by-side switch, as a multiple of the model's size: the weights plus room for the
activations and KV cache of the batches that follow."""


def model_bytes(model: torch.nn.Module) -> int:
    """Bytes of a model's parameters and buffers."""
    return sum(t.numel() * t.element_size() for t in itertools.chain(model.parameters(), model.buffers()))


def available_bytes(device: torch.device) -> int:
    """Memory a new model could take on ``device``: free GPU memory plus what PyTorch's allocator holds unused,
    or the host's ``MemAvailable``."""
    if device.type == "cuda":
        import torch

        free, _ = torch.cuda.mem_get_info(device)
        return int(free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device))
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def free_first(strategy: str, model: torch.nn.Module, device: torch.device) -> bool:
    """Whether to free the loaded ``model`` before loading its successor (see the module docstring)."""
    if strategy not in STRATEGIES:
        raise ValueError(f"switch strategy must be one of {STRATEGIES}, not {strategy!r}")
    if strategy != AUTO:
        return strategy == FREE_FIRST
    return model_bytes(model) * HEADROOM > available_bytes(device)
