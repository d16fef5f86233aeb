"""Bone / MiSS "bat": block-affine adaptation (Kang & Yin 2024, Bone: Block-Affine Adaptation of Large Language
Models, arXiv:2409.15371; in PEFT it is ``MissConfig(init_weights="bat")``).

Split ``W`` (d_out, d_in) into r×r blocks ``W_ij`` (i < d_out/r, j < d_in/r). One trainable r×r matrix ``M_i`` per
block ROW (``miss_block``: (d_out/r, r, r), init 0 so ΔW = 0) is shared by all blocks of that row:

``ΔW_ij = W_ij M_i + M_i``,  ``h = (W + ΔW) x``.

The update is weight-guided (it multiplies the frozen blocks), so the forward forms ``W + ΔW`` (d_out×d_in) as PEFT
does; merging is exact (``merge(W) = W + ΔW(W)``). Requires ``d_in % r == 0`` and ``d_out % r == 0``.

Decisions (checked against PEFT's ``miss/layer.py``): PEFT applies no dropout in the "bat" path, so there is no
dropout option; stacked Bone adapters each use the original base ``W`` (PEFT chains them on the running weight);
Linear only (PEFT's block reshape assumes the nn.Linear layout). File key: ``miss_block``.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..core import Adapter, PeftSpec, register
from ..errors import ConfigError


def block_affine(W: Tensor, M: Tensor) -> Tensor:
    """ΔW for base ``W`` (d_out, d_in) and row-block matrices ``M`` (d_out/r, r, r)."""
    o, r = M.shape[0], M.shape[-1]
    W4 = W.reshape(o, r, W.shape[1] // r, r).permute(0, 2, 1, 3)  # (o, c, r, r): W4[i, j] = W_ij
    D = W4 @ M[:, None] + M[:, None]
    return D.permute(0, 2, 1, 3).reshape(W.shape)


@register("bone", family="weight-guided", paper="Kang & Yin 2024, Bone (MiSS), arXiv:2409.15371",
          peft=PeftSpec("MISS", {"r": "r"}, fixed={"init_weights": "bat", "miss_dropout": 0.0, "mini_r": 1},
                        load_match={"init_weights": "bat"}, defaults={"r": 64}))
class Bone(Adapter):
    __doc__ = __doc__

    @dataclass
    class Config:
        r: int = 64

    layers = ("linear",)

    def __init__(self, base: nn.Module, cfg: Config, view=None):
        super().__init__(base, cfg, view)
        v, r = self.view, cfg.r
        if r <= 0 or v.d_in % r or v.d_out % r:
            raise ConfigError(f"Bone needs r > 0 dividing d_in={v.d_in} and d_out={v.d_out}; got r={r}")
        self.miss_block = nn.Parameter(torch.empty(v.d_out // r, r, r))

    def reset_parameters(self) -> None:
        nn.init.zeros_(self.miss_block)

    def _delta_of(self, W: Tensor) -> Tensor:
        return block_affine(W.to(self.miss_block.dtype), self.miss_block)

    def delta(self, x: Tensor) -> Tensor:
        return self.view.dense(self.cast_in(x), self._delta_of(self.base_matrix()))

    def delta_weight(self) -> Tensor:
        return self._delta_of(self.base_matrix().float())

    def merge(self, weight: Tensor) -> Tensor:
        return weight + self._delta_of(weight).to(weight.dtype)
