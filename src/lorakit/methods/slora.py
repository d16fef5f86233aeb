"""SLoRA: the three-factor baseline of the NLoRA paper (Guo et al. 2025, arXiv:2502.14482).

``h = W0 x + s · B N A x`` with A (r, d_in), N (r, r) (file key ``lora_N.weight``), B (d_out, r), ``s = α/r``.
All three train. Init as the official code (TracyGuo2001/NLoRA, ``slora_init``): A and N Kaiming-uniform
(a = √5, nn.Linear's default), B = 0, so ΔW = 0 at init (``init = "noop"``); N and A still get gradients through B.
Merge: ``W0 + s·BNA``. Defaults: r = 8, α = 8 (the official training script).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from torch import nn

from ..core import register
from ._threefactor import ThreeFactor


@register("slora", family="svd three-factor",
          paper="Guo et al. 2025, NLoRA: Nyström-Initiated Low-Rank Adaptation for Large Language Models "
                "(SLoRA baseline), arXiv:2502.14482")
class SLoRA(ThreeFactor):
    __doc__ = __doc__

    @dataclass
    class Config:
        r: int = 8
        alpha: float = 8.0
        dropout: float = 0.0

    def __init__(self, base, cfg: Config, view=None):
        super().__init__(base, cfg, view, scale=cfg.alpha / cfg.r)

    def reset_parameters(self) -> None:
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.kaiming_uniform_(self.lora_N.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)
