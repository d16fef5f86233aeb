"""LoRAMoE (Dou et al. 2023, arXiv:2312.09979): dense mixture of LoRA experts with a localised balancing constraint.

``h = W0 x + Σ_{i=1..E} p_i(x) · s · B_i A_i x``, ``p = softmax(W_r x)`` (dense: every expert runs),
``W_r`` (E, d_in), ``A_i`` (r, d_in), ``B_i`` (d_out, r), ``s = α/r``. Trains A, B, W_r.

Localised balancing constraint (official ``peft/tuners/lora.py``): experts are split in two groups, the first
``E//2`` for world-knowledge samples (type 1) and the rest for downstream-task samples (type 0). Per sample the
importance ``Q_{b,i} = Σ_tokens p_i``; the coefficient ``I_{b,i} = 1+δ`` if expert i's group matches the sample's
type, else ``1−δ``; ``L_lbc = β · CV²(Q ⊙ I)`` (``Var/mean²`` over all batch×expert entries, unbiased variance).
The sample types come from the batch context (``lorakit.batch_context(model, task_types=LongTensor(batch))``,
key ``type_key``); without them the loss is 0, as in the official code.
Defaults: E=8 (demo: 6), r=4, α=32, dropout 0.05 from the repo demo. δ = β = 0.1 are from the paper [mem]
(the demo script sets both to 0).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..core import register
from ._mixture import MixConfig, Mixture, cv_squared


@register("loramoe", family="mixture of LoRA experts", paper="Dou et al. 2023, LoRAMoE: Alleviate World Knowledge "
          "Forgetting in Large Language Models via MoE-Style Plugin, arXiv:2312.09979")
class LoRAMoE(Mixture):
    __doc__ = __doc__
    example = {"r": 2, "num_experts": 4}

    @dataclass
    class Config(MixConfig):
        r: int = 4
        alpha: float = 32.0
        num_experts: int = 8
        top_k: int = 0  # dense routing
        dropout: float = 0.05
        blc_alpha: float = 0.1  # δ
        blc_weight: float = 0.1  # β
        type_key: str = "task_types"

    @classmethod
    def context_keys(cls, cfg) -> tuple[str, ...]:
        return (cfg.type_key,) if cfg.blc_weight else ()

    def delta(self, x: Tensor) -> Tensor:
        out = super().delta(x)
        if self.training:
            self._types = None if self.ctx is None else self.ctx.get(self.cfg.type_key)
        return out

    def balance_loss(self) -> Tensor | None:
        types = getattr(self, "_types", None)
        if self._probs is None or types is None:
            return None
        return lbc_loss(self._weights, types, self.cfg.blc_alpha)

    def extra_loss(self) -> Tensor | None:
        loss = self.balance_loss() if self.cfg.blc_weight else None
        return None if loss is None else self.cfg.blc_weight * loss


def lbc_loss(weights: Tensor, types: Tensor, delta: float) -> Tensor:
    """``CV²(Q ⊙ I)`` for routing weights (batch, ..., E) and sample types (batch,) in {0, 1}."""
    B, E = weights.shape[0], weights.shape[-1]
    Q = weights.reshape(B, -1, E).float().sum(1)
    first = torch.arange(E, device=Q.device) < E // 2  # world-knowledge group
    t1 = (types.to(Q.device).view(B, 1) == 1)
    match = torch.where(first.view(1, E), t1, ~t1)
    return cv_squared(Q * torch.where(match, 1.0 + delta, 1.0 - delta))
