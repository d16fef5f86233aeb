"""LLaVA-MoLE: sparse top-1 mixture of LoRA experts (Chen et al. 2024, arXiv:2401.16160).

Per token the router ``p = softmax(W_g x)`` (``W_g`` (E, d_in)) picks ONE expert ``e = argmax p``;
``h = W0 x + g_e · s · B_e A_e x`` with the straight-through gate ``g = onehot(e) − p.detach() + p`` (value 1 for the
chosen expert, 0 elsewhere; gradient of ``p``), as in the released ``moe.py``. ``A_i`` (r, d_in), ``B_i``
(d_out, r), ``s = α/r``. Trains A, B, W_g. Aux loss: Switch load balance ``E·Σ f_i P_i`` with ``f`` the top-1
assignment fractions (the training code is not released; this is the paper's description [mem]).

Decision: the released model shares one router per MLP block (the same expert index for gate/up/down); here each
adapted module routes on its own input (per-module routers), which needs no cross-module state. Defaults from the
repo: r=16, α=32, dropout 0.05; the expert count is not in the released code (we use 4).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..core import register
from ._mixture import MixConfig, Mixture, switch_loss, topk_mask


@register("llava_mole", family="mixture of LoRA experts", paper="Chen et al. 2024, LLaVA-MoLE: Sparse Mixture of "
          "LoRA Experts for Mitigating Data Conflicts in Instruction Finetuning MLLMs, arXiv:2401.16160")
class LLaVAMoLE(Mixture):
    __doc__ = __doc__
    example = {"r": 2, "num_experts": 3, "aux_coef": 0.01}

    @dataclass
    class Config(MixConfig):
        r: int = 16
        alpha: float = 32.0
        num_experts: int = 4
        top_k: int = 1  # fixed: top-1 routing
        dropout: float = 0.05
        aux_coef: float = 0.01

    def route(self, logits: Tensor) -> tuple[Tensor, Tensor]:
        p = torch.softmax(logits.float(), dim=-1)
        hard = topk_mask(p, 1)
        return p, hard - p.detach() + p

    def balance_loss(self) -> Tensor | None:
        if self._probs is None:
            return None
        return switch_loss(self._probs, topk_mask(self._probs.detach(), 1))
