"""Data parallelism by hand for ``model.finetune`` under ``torchrun`` / ``accelerate launch``.

One process per GPU, each on ``cuda:LOCAL_RANK`` with NCCL (gloo on CPU). The rule every collective here follows:
its tensors live on the training device. NCCL only reduces CUDA tensors (a CPU tensor fails with "No backend type
associated with device type cpu"), and gloo reduces the CPU tensors of a CPU run; so no tensor handed to a
collective is ever built without ``device=``.
"""

from __future__ import annotations

import os

import torch


def setup(device: str) -> tuple[int, int, str]:
    """``(rank, world size, device)``; joins the process group when started by ``torchrun`` / ``accelerate launch``
    (one process per GPU, each on ``cuda:LOCAL_RANK``; gloo on CPU)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1, device
    import torch.distributed as dist

    if device.startswith("cuda"):
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    return dist.get_rank(), world, device


def collective_tensor(values: list[float], device: str | torch.device) -> torch.Tensor:
    """A float32 tensor of ``values`` for a collective: on ``device``, the training device (see the module
    docstring). ``len(values)`` elements."""
    return torch.tensor(values, dtype=torch.float32, device=device)


def any_rank(flag: bool, device: str | torch.device) -> bool:
    """Whether ``flag`` is set on any rank (an all-reduce MAX); every rank must call it at the same point."""
    import torch.distributed as dist

    tensor = collective_tensor([float(flag)], device)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return bool(tensor.item())


def average_gradients(params: list[torch.nn.Parameter], world: int) -> None:
    """Sum every rank's gradients and divide (a rank whose batch had no mask for some module contributes zeros, so
    every rank makes the same all-reduce calls in the same order). Gradients live where their parameters do."""
    import torch.distributed as dist

    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        dist.all_reduce(p.grad)
        p.grad /= world


def finish(world: int) -> None:
    """Wait for every rank (rank 0 writes the artifact meanwhile), then leave the process group."""
    if world > 1:
        import torch.distributed as dist

        dist.barrier()
        dist.destroy_process_group()
