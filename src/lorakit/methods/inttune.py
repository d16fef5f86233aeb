"""IntTune: tune only the intermediate matrix of NLoRA (Guo et al. 2025, arXiv:2502.14482).

``h = W0' x + s · B N A x`` with NLoRA's Nyström init (``B = W0[:, :r]``, ``A = W0[:r, :]``, ``N = W0[:r, :r]`` or
its pseudo-inverse, see :mod:`lorakit.methods.nlora`), A and B **frozen**: only N (r, r) trains, r² parameters per
module (the official ``inttune.py`` sets ``requires_grad=False`` on lora_A/lora_B).

Decisions. The official script freezes A and B under whatever init it is given; only the Nyström init makes
sense (with SLoRA's B = 0 nothing could ever change), so IntTune always uses NLoRA's init and options. The frozen
landmarks are slices of W0, so by default they are not stored (the file holds only N) and are rebuilt from the
base weight on load; ``save_bases=True`` stores them instead.
"""
from __future__ import annotations

from typing import ClassVar, Literal

from dataclasses import dataclass

from torch import Tensor

from ..core import register
from .nlora import NLoRA


@register("inttune", family="svd three-factor",
          paper="Guo et al. 2025, NLoRA: Nyström-Initiated Low-Rank Adaptation for Large Language Models "
                "(IntTune), arXiv:2502.14482")
class IntTune(NLoRA):
    __doc__ = __doc__
    train_A, train_N, train_B = False, True, False

    @dataclass
    class Config:
        r: int = 8
        alpha: float = 8.0
        dropout: float = 0.0
        middle: Literal["raw", "pinv"] = "raw"
        residual: bool = False
        save_bases: bool = False  # store the frozen landmarks in the file instead of rebuilding them on load

    def __init__(self, base, cfg: Config, view=None):
        super().__init__(base, cfg, view, persistent=cfg.save_bases)

    def on_load(self, weight: Tensor, state: dict) -> Tensor | None:
        if self.cfg.residual or not self.cfg.save_bases:
            return super().init_from(weight)  # rebuild the landmarks (and the residual base); N comes from the file
        return None
