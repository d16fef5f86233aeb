"""SVFit: singular-value fine-tuning (Sun et al. 2024, arXiv:2409.05926).

``W0 = U_r diag(σ_r) V_rᵀ + W_e`` (top-r SVD, fp32). Only the r singular values train:
``W' = U_r diag(σ̃) V_rᵀ + W_e``, i.e. ``ΔW = U_r diag(σ̃ − σ_r) V_rᵀ`` with U_r (d_out, r), V_r (d_in, r) frozen and
``σ̃`` (r,) trainable (file key ``svfit_sigma``), initialised to ``σ_r`` (output preserved: ``init = "noop"``).
Forward: ``y + U_r((σ̃ − σ_r) ⊙ V_rᵀ x)``. r parameters per module.

Decisions (no official code exists; from the abstract and the catalog):

* Additive form, base untouched: the module computes ``W0 x + U_r diag(σ̃ − σ_r) V_rᵀ x``, which equals the paper's
  ``W_e x + U_r diag(σ̃) V_rᵀ x`` exactly, needs no residual base write and merges as ``W0 + ΔW``. The trained
  parameter is σ̃ itself (so weight decay acts on the singular values as in the paper); σ_r is a frozen buffer.
* No scaling factor (s = 1). The paper's per-layer r ("top singular values capturing > 99% of the information")
  is not reproduced automatically: r is a fixed option (per-module values via ``overrides``).
* U_r, σ_r, V_r are rebuilt from W0 on load (non-persistent; a paired sign flip of (u_i, v_i) leaves ΔW unchanged,
  so any SVD backend rebuilds the same ΔW). ``save_bases=True`` stores them. ``niter > 0`` uses the fast seeded
  randomised SVD (``torch.svd_lowrank``); the default is the exact SVD.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..core import Adapter, LowRank, register
from ..errors import ConfigError
from ._threefactor import FrozenFactor
from .lora_xs import svd_bases


@register("svfit", family="svd three-factor",
          paper="Sun et al. 2024, SVFit: Parameter-Efficient Fine-Tuning of Large Pre-Trained Models Using "
                "Singular Values, arXiv:2409.05926")
class SVFit(Adapter):
    __doc__ = __doc__
    roles = {"svfit_sigma": "singular_values"}
    layers = ("linear", "conv1d", "embedding", "conv2d")

    @dataclass
    class Config:
        r: int = 8
        niter: int = 0  # 0: exact SVD; K > 0: randomised SVD with K subspace iterations
        seed: int = 0
        save_bases: bool = False

    def __init__(self, base, cfg: Config, view=None):
        super().__init__(base, cfg, view)
        if cfg.r <= 0:
            raise ConfigError(f"r must be positive, got {cfg.r}")
        v, r, keep = self.view, cfg.r, cfg.save_bases
        self.svfit_sigma = nn.Parameter(torch.empty(r))
        self.svfit_U = FrozenFactor(v.d_out, r, persistent=keep)
        self.svfit_Vt = FrozenFactor(r, v.d_in, persistent=keep)
        self.register_buffer("sigma0", torch.empty(r), persistent=keep)

    def reset_parameters(self) -> None:
        for t in (self.svfit_sigma.data, self.sigma0, self.svfit_U.weight, self.svfit_Vt.weight):
            t.zero_()

    @torch.no_grad()
    def init_from(self, weight: Tensor, stats=None) -> None:
        U, S, V = svd_bases(weight, self.cfg.r, self.cfg.niter, self.cfg.seed)
        self.svfit_U.weight.copy_(U.to(self.svfit_U.weight.dtype))
        self.svfit_Vt.weight.copy_(V.t().to(self.svfit_Vt.weight.dtype))
        self.sigma0.copy_(S.to(self.sigma0.dtype))
        self.svfit_sigma.copy_(S.to(self.svfit_sigma.dtype))
        return None

    def on_load(self, weight: Tensor, state: dict) -> None:
        if not self.cfg.save_bases:
            self.init_from(weight)  # rebuild the frozen bases; σ̃ comes from the file
        return None

    def delta(self, x: Tensor) -> Tensor:
        v = self.view
        h = v.rank_scale(v.down(self.cast_in(x), self.svfit_Vt.weight), self.svfit_sigma - self.sigma0)
        return v.up(h, self.svfit_U.weight)

    def delta_weight(self) -> Tensor:
        return (self.svfit_U.weight * (self.svfit_sigma - self.sigma0)) @ self.svfit_Vt.weight

    def lowrank(self) -> LowRank:
        """As a plain LoRA for serving/export: A = diag(σ̃ − σ_r) V_rᵀ, B = U_r."""
        return LowRank((self.svfit_sigma - self.sigma0)[:, None] * self.svfit_Vt.weight, self.svfit_U.weight, 1.0)

    def stats(self) -> dict[str, float]:
        return {"svfit_sigma_change": float((self.svfit_sigma - self.sigma0).abs().mean())}
