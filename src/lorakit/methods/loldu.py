"""LoLDU: low-rank adaptation via lower-diag-upper decomposition (Shi et al. 2024, arXiv:2410.13618; reference code
SKDDJ/LoLDU ``minloldu``).

Init (fp32): pivoted LU ``W0 = P L U'`` (``torch.linalg.lu``), ``D = diag(U')``, ``U = D⁻¹U'`` (unit upper), so
``W0 = P L D U``. With ``L_r = L[:, :r]`` (d_out, r), ``U_r = U[:r]`` (r, d_in) and ``σ = α/r``:

``W' = W_res + σ · (P L_r) diag(z) U_r``,   ``W_res = W0 − σ (P L_r) diag(D_r) U_r``,   ``z`` init ``D[:r]``,

so the output is preserved at init ("residual"). **Only z (r,) trains** (the reference filter selects only
``vector_z``; its ``scaling_factor`` parameter is left frozen, so σ is a constant here). ``P L_r`` and ``U_r`` are
frozen non-persistent buffers: the LU of the original weight is deterministic, so loading recomputes them and the
residual (``on_load``), and the file holds only ``loldu_z``. Merge: ``W_res + σ (P L_r) diag(z) U_r``.

Decisions: r defaults to each layer's full rank (the reference's 768 is full rank on its 768-wide models; a
fixed 768 would refuse every smaller model). α = 1 (the reference ``from_linear``), i.e. σ = 1/r; z init mode "lu" (the reference default; its
other modes are not offered). A zero pivot (singular W) keeps the row of U' unscaled (D taken as 1 there).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..core import Adapter, LowRank, register
from ..errors import ConfigError


def ldu(W: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``W = P L diag(D) U`` with unit-lower L (d_out, k), unit-upper U (k, d_in), k = min(shape)."""
    P, L, U = torch.linalg.lu(W.float())
    D = torch.diagonal(U).clone()
    D = torch.where(D == 0, torch.ones_like(D), D)
    return P, L, D, U / D[:, None]


@register("loldu", family="decomposition", paper="Shi et al. 2024, LoLDU, arXiv:2410.13618")
class LoLDU(Adapter):
    __doc__ = __doc__
    init = "residual"

    @dataclass
    class Config:
        r: int | None = None  # None: the layer's full rank min(d_out, d_in) (the reference's 768 on 768-wide models)
        alpha: float = 1.0

    layers = ("linear", "conv1d", "embedding", "conv2d")
    roles = {"loldu_z": "scale"}

    def __init__(self, base: nn.Module, cfg: Config, view=None):
        super().__init__(base, cfg, view)
        v = self.view
        r = self.r = cfg.r if cfg.r is not None else min(v.d_in, v.d_out)
        if not 0 < r <= min(v.d_in, v.d_out):  # attach refuses it first (Adapter.check_layer), naming the layer
            raise ConfigError(f"LoLDU needs 0 < r <= min(d_out, d_in) = {min(v.d_in, v.d_out)}, got r={r}")
        self.loldu_z = nn.Parameter(torch.empty(r))
        self.register_buffer("PL", torch.zeros(v.d_out, r), persistent=False)
        self.register_buffer("U", torch.zeros(r, v.d_in), persistent=False)
        self.scale = cfg.alpha / r

    def reset_parameters(self) -> None:
        nn.init.zeros_(self.loldu_z)  # real init needs the weight: init_from

    @torch.no_grad()
    def init_from(self, weight: Tensor, stats=None) -> Tensor:
        r = self.r
        P, L, D, U = ldu(weight)
        PL, Ur = P @ L[:, :r], U[:r]
        self.PL.copy_(PL)
        self.U.copy_(Ur)
        self.loldu_z.copy_(D[:r])
        return weight - self.scale * (PL * D[:r]) @ Ur

    def delta(self, x: Tensor) -> Tensor:
        h = self.view.down(self.cast_in(x), self.U)
        return self.view.up(self.view.rank_scale(h, self.loldu_z * self.scale), self.PL)

    def delta_weight(self) -> Tensor:
        return (self.PL * (self.loldu_z * self.scale)) @ self.U

    def lowrank(self) -> LowRank:
        return LowRank(self.loldu_z[:, None] * self.U, self.PL, self.scale)
