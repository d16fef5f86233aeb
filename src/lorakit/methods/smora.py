"""SMoRA: Single-ranked Mixture of LoRA experts (Zhao et al. 2025, arXiv:2501.15103).

One LoRA of rank r in which every rank is an expert (rank-1 experts ``B_{:,i} A_{i,:}``). Router ``W_g`` (r/p, d_in)
(``p = rank_partition``): ``ℓ = sigmoid(W_g x)`` repeated p times (``repeat_interleave``: each router unit drives p
consecutive ranks), ``ℓ̃ = ℓ + b`` with a NON-trainable bias ``b`` (r,). ``I = TopK(ℓ̃, k)`` (``k = activate_r``),
``g_i = k · ℓ̃_i / Σ_{j∈I} ℓ̃_j`` on I (0 elsewhere), ``h = W0 x + (α/k) · Σ_{i∈I} g_i · B_{:,i} A_{i,:} x``.
Trains A (r, d_in), B (d_out, r), W_g. Init: A kaiming, B = 0, b = 0.

Aux-loss-free load balancing (DeepSeek-V3 style): training forwards count how often each rank is selected; after
each optimiser step the method's controller moves ``b_i += u · sign(mean_count − count_i)`` (u = ``bias_lr``, 1e-5)
and resets the counts. ``b`` is a persistent buffer (saved: it changes routing). Dense compute with a zero mask
replaces the official gather kernels (same result). Decision: the weights use ℓ̃ (bias included), as in the
official ``srmole/layer.py`` read for the catalog; the repeat order is not verified.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..controllers import Controller
from ..core import Factor, register
from ._mixture import Mixture, topk_mask


class _BiasUpdate(Controller):
    def __init__(self, att):
        self.att = att

    def step(self, step, model, optimizer) -> None:
        for a in self.att.adapters:
            a.update_bias()


@register("smora", family="mixture of LoRA experts", paper="Zhao et al. 2025, Each Rank Could be an Expert: "
          "Single-Ranked Mixture of Experts LoRA for Multi-Task Learning (SMoRA), arXiv:2501.15103")
class SMoRA(Mixture):
    __doc__ = __doc__
    roles = {"experts_A": "A", "experts_B": "B", "router.weight": "gate"}
    example = {"r": 4, "activate_r": 2}

    @dataclass
    class Config:
        r: int = 64  # total rank = number of rank-1 experts
        activate_r: int = 8  # k
        rank_partition: int = 1  # p
        alpha: float = 16.0
        dropout: float = 0.05
        bias_lr: float = 1e-5  # u

    def __init__(self, base, cfg: Config, view=None):
        if cfg.r % cfg.rank_partition or not 0 < cfg.activate_r <= cfg.r:
            raise ValueError(f"SMoRA: need r % rank_partition == 0 and 0 < activate_r <= r (r={cfg.r}, "
                             f"rank_partition={cfg.rank_partition}, activate_r={cfg.activate_r})")
        super().__init__(base, cfg, view, num_experts=cfg.r, rank=1, router=False)
        self.router = Factor(cfg.r // cfg.rank_partition, self.view.d_in)
        self.register_buffer("route_bias", torch.zeros(cfg.r))
        self.register_buffer("_count", torch.zeros(cfg.r), persistent=False)

    def expert_scale(self) -> float:
        return self.cfg.alpha / self.cfg.activate_r

    def route(self, logits: Tensor) -> tuple[Tensor, Tensor]:
        k = self.cfg.activate_r
        lt = torch.sigmoid(logits.float()).repeat_interleave(self.cfg.rank_partition, dim=-1) + self.route_bias
        mask = topk_mask(lt, k)
        w = k * lt * mask / (lt * mask).sum(-1, keepdim=True)
        if self.training:
            self._count += mask.detach().reshape(-1, self.E).sum(0)
        return lt / lt.sum(-1, keepdim=True), w

    def extra_loss(self) -> None:
        return None  # aux-loss-free balancing (see update_bias)

    @torch.no_grad()
    def update_bias(self) -> None:
        """``b += u · sign(mean(count) − count)``; resets the counts."""
        self.route_bias += self.cfg.bias_lr * torch.sign(self._count.mean() - self._count)
        self._count.zero_()

    @classmethod
    def controller(cls, att) -> Controller:
        return _BiasUpdate(att)
