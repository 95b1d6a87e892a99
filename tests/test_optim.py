"""Fine-tuning's optimizer and data-parallel helpers: fp32 master weights, collectives on the training device."""

from __future__ import annotations

import pytest
import torch
from conftest import CHECKPOINT, CLIP_TOWER

from model.checkpoint import load_lisa
from model.finetune import FinetuneConfig, trainable_model
from model.optim import MasterWeights, param_groups


def _adamw_steps(param: torch.nn.Parameter, steps: int, masters: MasterWeights | None = None) -> None:
    """``steps`` AdamW steps at lr 1e-5 with a constant gradient of 1 (each update is then about -1e-5)."""
    groups = [{"params": [param]}]
    optimizer = torch.optim.AdamW(masters.groups(groups) if masters else groups, lr=1e-5, weight_decay=0.0)
    for _ in range(steps):
        param.grad = torch.ones_like(param)
        if masters:
            masters.grads_to_masters()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if masters:
            masters.masters_to_model()


def test_master_weights_keep_updates_that_bf16_rounds_away():
    """lr 1e-5 on weights near 1.0: bf16's spacing there is 2**-8, so a bf16-only parameter never moves; ours
    accumulates the updates in fp32 and the bf16 weights follow once they add up past half a step."""
    plain = torch.nn.Parameter(torch.ones(16, dtype=torch.bfloat16))
    _adamw_steps(plain, 300)
    assert torch.equal(plain.detach(), torch.ones(16, dtype=torch.bfloat16))  # 300 updates, all lost

    ours = torch.nn.Parameter(torch.ones(16, dtype=torch.bfloat16))
    masters = MasterWeights([ours])
    _adamw_steps(ours, 1, masters)
    assert ours.dtype == torch.bfloat16 and masters.master(ours).dtype == torch.float32
    assert torch.allclose(masters.master(ours).detach(), torch.full((16,), 1 - 1e-5), atol=1e-7)  # kept
    _adamw_steps(ours, 299, masters)
    assert torch.allclose(masters.master(ours).detach(), torch.full((16,), 1 - 3e-3), atol=1e-5)
    assert (ours.detach() < 1).all()  # the bf16 weights moved too, a step of 2**-8 down


def test_fully_trained_bf16_modules_get_fp32_masters():
    """LISA's recipe in bf16: lm_head, embeddings and the [SEG] projection (and, on a GPU, the mask decoder; SAM stays
    fp32 on a CPU) are bf16 in the model and fp32 in the optimizer; peft's LoRA weights are fp32 already and are
    their own masters."""
    model, _ = load_lisa(CHECKPOINT, str(CLIP_TOWER), dtype="bf16")
    net = trainable_model(model, FinetuneConfig(base="unused", out="unused", mode="lora"))
    named = {n: p for n, p in net.named_parameters() if p.requires_grad}
    masters = MasterWeights(named.values())
    low = {n for n, p in named.items() if p.dtype == torch.bfloat16}
    for module in ("lm_head", "embed_tokens", "text_hidden_fcs"):
        assert any(module in n for n in low), module
    assert masters.copies == len(low) > 0
    assert all(masters.master(p).dtype == torch.float32 for p in named.values())
    assert all(masters.master(named[n]) is named[n] for n in named if "lora_" in n)
    groups = masters.groups(param_groups(net, FinetuneConfig(base="unused", out="unused")))
    assert all(p.dtype == torch.float32 for g in groups for p in g["params"])


def test_collective_tensors_follow_the_training_device(tmp_path):
    """The stop-together flag is built on the device it is given (``meta`` stands in for a GPU here) and reduces on
    a real gloo group; a CPU tensor on NCCL is what crashed multi-GPU runs."""
    import torch.distributed as dist

    from model.parallel import any_rank, collective_tensor

    assert collective_tensor([1.0], "meta").device.type == "meta"
    assert collective_tensor([1.0], torch.device("meta")).shape == (1,)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        assert any_rank(True, "cpu") is True and any_rank(False, "cpu") is False
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU (NCCL)")
def test_stop_flag_reduces_on_nccl(tmp_path):
    """On a GPU: NCCL accepts the flag because it lives on ``cuda:N`` (a CPU tensor raises there)."""
    import torch.distributed as dist

    from model.parallel import any_rank

    dist.init_process_group("nccl", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        torch.cuda.set_device(0)
        assert any_rank(True, "cuda:0") is True
        with pytest.raises(RuntimeError):
            flag = torch.tensor([1.0])  # the old code's CPU flag
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    finally:
        dist.destroy_process_group()
