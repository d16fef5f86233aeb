"""SMoRA: Single-ranked Mixture of LoRA experts (Zhao et al. 2025, arXiv:2501.15103).

One LoRA of rank r in which every rank is an expert (rank-1 experts ``B_{:,i} A_{i,:}``). Router ``W_g`` (r/p, d_in)
(``p = rank_partition``) on the DROPPED input ``x̃ = dropout(x)`` (the same ``x̃`` feeds the experts):
``ℓ = sigmoid(W_g x̃)`` repeated p times (``repeat_interleave``: each router unit drives p consecutive ranks),
``ℓ̃ = ℓ + b`` with a NON-trainable bias ``b`` (r,). ``I = TopK(ℓ̃, k)`` (``k = activate_r``),
``g_i = k · ℓ̃_i / Σ_{j∈I} ℓ̃_j`` on I (0 elsewhere), ``h = W0 x + (α/k) · Σ_{i∈I} g_i · B_{:,i} A_{i,:} x̃``.
Trains A (r, d_in), B (d_out, r), W_g. Init: A kaiming-uniform(a=√5), B = 0, b = 0.

Checked against the authors' code (github.com/StyxXuan/smora, ``packages/peft/src/peft/tuners/srmole/layer.py``,
``SRMoLELinear.forward`` and ``SRMoLELayer.update_layer``): router on ``dropout(x)``, ``sigmoid`` then
``repeat_interleave(rank_partition)``, bias added before ``topk``, gates = the selected biased values over their
sum times ``activate_r`` (the bias is part of the gate value, not only of the selection), ``scaling = lora_alpha /
activate_r``; the gate normalisation is re-implemented in ``tests/methods/test_smora.py``. Recipe
(``scripts/traing_configs/.../llama2_7b_lora_srmole.yaml``): rank 64, activate_r 8, alpha 16, all linear layers,
lr 1e-4, bias update rate u = 1e-5 (``SRMoLELinear(bias_update_rate=1e-5)``).

Aux-loss-free load balancing (DeepSeek-V3 style): ``b_i += u · sign(mean_count − count_i)`` with ``count_i`` how
often rank i was selected. Deviation in timing: the official updates ``b`` inside every training forward (counts of
that micro-batch); here the counts of the training forwards are summed and the method's controller applies the
update once after each optimiser step. The two agree with one forward per optimiser step; with gradient
accumulation (the released recipe accumulates 16 micro-batches, and gradient checkpointing re-runs the forward) the
official moves ``b`` once per forward. ``b`` is a persistent buffer (saved: it changes routing). Dense compute
with a zero mask replaces the official gather kernels (same result, as its ``dense_compute`` path).
"""
from __future__ import annotations

from typing import ClassVar

from dataclasses import dataclass

import torch
from torch import Tensor

from ..controllers import Controller
from ..core import Factor, register
from ..errors import ConfigError
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
    roles = {"experts_A": "A", "experts_B": "B", "router.weight": "router"}
    example = {"r": 4, "activate_r": 2}
    summed_buffers = ("_count",)  # the step's expert loads: summed over data-parallel ranks before update_bias

    @dataclass
    class Config:
        r: int = 64  # total rank = number of rank-1 experts
        activate_r: int = 8  # k
        rank_partition: int = 1  # p
        alpha: float = 16.0
        dropout: float = 0.0  # recipe: LLaMA-Factory lora_dropout default 0 (not set in the srmole yaml)
        bias_lr: float = 1e-5  # u
        positive: ClassVar = ("r", "activate_r", "rank_partition")

        def validate(self) -> None:
            if self.r % self.rank_partition or self.activate_r > self.r:
                raise ConfigError(f"need r % rank_partition == 0 and activate_r <= r (r={self.r}, rank_partition="
                                  f"{self.rank_partition}, activate_r={self.activate_r})")

    def __init__(self, base, cfg: Config, view=None):
        if cfg.r % cfg.rank_partition or not 0 < cfg.activate_r <= cfg.r:
            raise ConfigError(f"SMoRA: need r % rank_partition == 0 and 0 < activate_r <= r (r={cfg.r}, "
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

    def delta(self, x: Tensor) -> Tensor:
        xd = self.dropout(self.cast_in(x))  # official: the router sees the dropped input too
        probs, w = self.route(self.router_logits(xd))
        self.record(probs, w)
        return self.mix(xd, w)

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
