"""The optimizer side of ``model.finetune``: AdamW parameter groups, the learning-rate schedule, fp32 master weights.

Master weights: in bf16 a parameter near 1.0 moves in steps of 2**-8 (0.0039), so an AdamW update of about the
learning rate (1e-5 to 3e-4 here) rounds away and the modules trained in full (``lm_head``, ``embed_tokens``, the
mask decoder, the [SEG] projection) never learn. As LISA's DeepSpeed bf16 recipe does, the optimizer steps fp32
copies of every low-precision trainable parameter; the model keeps computing in bf16 and receives the rounded
masters after each step, so the small updates accumulate in the masters until they show.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Iterable
from typing import Any

import torch

from model.finetune_config import FinetuneConfig


def param_groups(net: torch.nn.Module, cfg: FinetuneConfig) -> list[dict[str, Any]]:
    """AdamW parameter groups: one per (learning-rate multiplier of ``cfg.lr_scales``, weight decay of
    ``cfg.weight_decays``) pair, the rest at ``cfg.lr`` and ``cfg.weight_decay``. In both, the first matching key
    wins; a key matches a parameter name as a substring (``sam.mask_decoder``) or, if it holds a wildcard, as a
    whole-name glob (``llm.*.self_attn.[qk]_proj.*``)."""
    groups: dict[tuple[float, float], list[torch.nn.Parameter]] = {}
    for name, p in net.named_parameters():
        if p.requires_grad:
            scale = next((v for k, v in cfg.lr_scales.items() if _name_matches(name, k)), 1.0)
            decay = next((v for k, v in cfg.weight_decays.items() if _name_matches(name, k)), cfg.weight_decay)
            groups.setdefault((scale, decay), []).append(p)
    return [{"params": ps, "lr": cfg.lr * scale, "weight_decay": decay} for (scale, decay), ps in groups.items()]


def _name_matches(name: str, key: str) -> bool:
    """``key`` as a substring of ``name``, or as a glob over the whole name when it holds ``*``, ``?`` or ``[``."""
    return fnmatch.fnmatchcase(name, key) if any(c in key for c in "*?[") else key in name


def lr_lambda(cfg: FinetuneConfig, elapsed_s: Callable[[], float] = lambda: 0.0):
    """Linear warm-up over ``warmup_steps``, then linear decay to 0 at ``steps`` - or, with ``time_limit_s``, at
    whichever of the two comes first (``elapsed_s`` is the clock of this invocation), so that a run cut by its
    time limit still ends with its learning rate decayed instead of stopping at the peak."""

    def f(step: int) -> float:
        if step < cfg.warmup_steps:
            return step / max(1, cfg.warmup_steps)
        by_step = (cfg.steps - step) / max(1, cfg.steps - cfg.warmup_steps)
        by_time = 1.0 - elapsed_s() / cfg.time_limit_s if cfg.time_limit_s else 1.0
        return max(0.0, min(by_step, by_time))

    return f


class MasterWeights:
    """fp32 master copies of the low-precision parameters among ``params`` (fp32 ones are their own master).

    Use: build the optimizer over :meth:`groups`; after the backward pass (and any gradient all-reduce) call
    :meth:`grads_to_masters`, clip and step the optimizer on :attr:`masters`, then :meth:`masters_to_model`.
    """

    def __init__(self, params: Iterable[torch.nn.Parameter]) -> None:
        self.params = list(params)
        self.masters = [p if p.dtype == torch.float32 else torch.nn.Parameter(p.detach().float().clone())
                        for p in self.params]
        self._master_of = {id(p): m for p, m in zip(self.params, self.masters)}

    @property
    def copies(self) -> int:
        """How many parameters have a separate fp32 master."""
        return sum(m is not p for p, m in zip(self.params, self.masters))

    def groups(self, groups: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """``groups`` (of model parameters, as :func:`param_groups` makes them) over the masters instead."""
        return [{**g, "params": [self._master_of[id(p)] for p in g["params"]]} for g in groups]

    def master(self, param: torch.nn.Parameter) -> torch.nn.Parameter:
        return self._master_of[id(param)]

    def grads_to_masters(self) -> None:
        """Hand each low-precision gradient to its master in fp32 (freeing the model's copy)."""
        for p, m in zip(self.params, self.masters):
            if m is not p:
                m.grad = None if p.grad is None else p.grad.float()
                p.grad = None

    @torch.no_grad()
    def masters_to_model(self) -> None:
        """Write the stepped masters back into the model (rounded to its dtype)."""
        for p, m in zip(self.params, self.masters):
            if m is not p:
                p.copy_(m)

    @torch.no_grad()
    def load(self, param: torch.nn.Parameter, value: torch.Tensor) -> None:
        """Set one parameter and its master (resuming a checkpoint)."""
        param.copy_(value)
        master = self._master_of[id(param)]
        if master is not param:
            master.copy_(value)
