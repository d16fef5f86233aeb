"""DynMoLE: hybrid routing by Tsallis entropy (Li et al. 2025, arXiv:2504.00661).

``p = softmax(W_g x)`` (``W_g`` (E, d_in)). Top-p mask (official ``_dynamic_routing``): experts sorted by p, kept
while the cumulative probability ``≤ top_p``, and always the first ``keep_top_k``. If the normalised Tsallis entropy
``Ĥ_q(p) = [(1 − Σ p_i^q)/(q−1)] / [(1 − E^{1−q})/(q−1)]`` exceeds ``entropy_threshold`` the token activates ALL
experts. Weights ``w = p ⊙ mask``, NOT renormalised. ``h = W0 x + Σ_i w_i · s · B_i A_i x``, ``A_i`` (r, d_in),
``B_i`` (d_out, r), ``s = α/r``. Trains A, B, W_g; router init ``kaiming_uniform(a=√5)``.

Aux loss (official ``moe_peft/adapters/dynmole/model.py`` ``_dynamic_load_balancing_loss_func``), ONE loss per
attach over the routers of ALL adapted modules (``attach_loss``): the official concatenates the router logits of
every router of every layer along the token axis (``moe_utils.collect_plugin_router_logtis`` then
``unpack_router_logits``: ``torch.cat(..., dim=0)``) and computes, over those rows,
``dyn_coef · mean Ĥ_q + aux_coef · E · Σ_i f_i P_i`` with ``f_i`` = mean masked weight and ``P_i`` = mean
probability. This is not the sum (nor the mean) of per-module losses: ``f`` and ``P`` are pooled before their
product. ``extra_loss()`` of one module is the same formula on its own rows. Defaults: q=1.1, threshold 0.9,
top_p 0.75, keep_top_k 2, coefficients 0.01 / 0.001, eps 1e-5 (``DynMoleConfig.from_config``). Entropy as the
official ``moe_utils.tsallis_entropy``: ``(1 − Σ (p+eps)^q)/(q−1)`` over its uniform maximum. Decisions: routing is
per adapted module (MoE-PEFT's "plugin" routers, one per adapted projection); padding tokens are not masked out of
the loss (no attention mask reaches the adapters).
"""
from __future__ import annotations

from typing import ClassVar

from dataclasses import dataclass

import torch
from torch import Tensor

from ..errors import ConfigError
from ..core import register
from ._mixture import MixConfig, Mixture, switch_loss


def tsallis_normalised(p: Tensor, q: float, eps: float = 1e-5) -> Tensor:
    """Tsallis entropy of each distribution along the last dim, divided by its maximum (uniform) value."""
    E = p.shape[-1]
    h = (1.0 - (p + eps).pow(q).sum(-1)) / (q - 1.0)
    return h / ((1.0 - E ** (1.0 - q)) / (q - 1.0))


@register("dynmole", family="mixture of LoRA experts", paper="Li et al. 2025, DynMoLE: Boosting Mixture of LoRA "
          "Experts Fine-Tuning with a Hybrid Routing Mechanism, arXiv:2504.00661")
class DynMoLE(Mixture):
    __doc__ = __doc__
    example = {"r": 2, "num_experts": 4}

    @dataclass
    class Config(MixConfig):
        r: int = 8
        alpha: float = 16.0
        num_experts: int = 8
        top_k: int = 0  # unused: DynMoLE selects by top-p / entropy
        dropout: float = 0.05
        top_p: float = 0.75
        keep_top_k: int = 2
        entropy_index: float = 1.1  # q
        entropy_threshold: float = 0.9
        entropy_eps: float = 1e-5
        dyn_coef: float = 0.01
        aux_coef: float = 0.001
        positive: ClassVar = ("r", "num_experts")

        def validate(self) -> None:
            if not 0 < self.top_p <= 1:
                raise ConfigError(f"top_p={self.top_p} must lie in (0, 1]")

    def route(self, logits: Tensor) -> tuple[Tensor, Tensor]:
        c = self.cfg
        p = torch.softmax(logits.float(), dim=-1)
        sp, idx = torch.sort(p, dim=-1, descending=True)
        keep = (sp.cumsum(-1) <= c.top_p) | (torch.arange(self.E, device=p.device) < c.keep_top_k)
        mask = torch.zeros_like(p).scatter(-1, idx, keep.to(p.dtype))
        self._entropy = tsallis_normalised(p, c.entropy_index, c.entropy_eps)
        mask = torch.where((self._entropy > c.entropy_threshold).unsqueeze(-1), torch.ones_like(mask), mask)
        return p, p * mask

    def extra_loss(self) -> Tensor | None:
        return None if self._probs is None else self.attach_loss([self])

    @classmethod
    def attach_loss(cls, att) -> Tensor | None:
        """One loss over the rows of every router that ran (concatenated, as the official); routers with a
        different number of experts cannot be pooled, so each expert count forms its own pool and the pools add."""
        adapters = att.active_adapters
        pools: dict[int, list] = {}
        for a in adapters:
            if a._probs is not None:
                pools.setdefault(a.E, []).append(a)
        total = None
        for E, ads in pools.items():
            c = ads[0].cfg
            probs = torch.cat([a._probs.reshape(-1, E).float() for a in ads])
            weights = torch.cat([a._weights.reshape(-1, E).float() for a in ads])
            ent = torch.cat([a._entropy.reshape(-1).float() for a in ads])
            loss = c.dyn_coef * ent.mean() + c.aux_coef * switch_loss(probs, weights)
            total = loss if total is None else total + loss
        return total
