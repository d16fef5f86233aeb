"""SORSA: Singular values and Orthonormal Regularized Singular vectors Adaptation (Cao 2024, arXiv:2409.00055).

Forward: ``h = W_r x + s · B diag(S) A x`` with A (r, d_in), S (r,), B (d_out, r); ``s = α/r``, or ``s = 1`` when
``alpha`` is null (the official default). Init (fp32): ``W0 = U diag(σ) Vᵀ``, ``A = V_{:,1:r}ᵀ``, ``S = σ_{1:r}``,
``B = U_{:,1:r}``, frozen residual ``W_r = W0 − s·B diag(S) A`` (so ``B diag(S) A`` equals PiSSA's ``BA``).
``niter > 0``: seeded randomised SVD (``torch.svd_lowrank``), as PiSSA.

Trainable: A, S and B (all three, as the official code). Regulariser ``L_o = mean over the adapter's matrices of
(‖AAᵀ − I‖_F, ‖BᵀB − I‖_F)`` (mean over 2·modules, the official ``calc_ortho``).

Decision (from the official trainer, Gunale0926/SORSA ``sorsalib/src/sorsa/trainer.py``): L_o is NOT added to the
loss. After gradient clipping and just before ``optimizer.step()`` the official code back-propagates
``(γ / learning_rate) · L_o`` with ``learning_rate`` the *configured* (peak) rate, not the scheduled one. Here the
method's :meth:`controller` does exactly that in ``before_step`` (lr = the param group's ``initial_lr`` set by LR
schedulers, else its ``lr``), so the trainer must call ``before_step`` after clipping. ``extra_loss`` returns None.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..controllers import Controller
from ..core import Adapter, LowRank, register
from ..errors import ConfigError
from ._svd import ortho_penalty, svd_top


class SORSAController(Controller):
    """Adds ``γ/η · ∂L_o/∂θ`` to the gradients after clipping (the official decoupled orthonormal step)."""

    def __init__(self, att, gamma: float):
        self.att, self.gamma = att, gamma

    def before_step(self, step: int, model: nn.Module, optimizer) -> None:
        mods = self.att.of_type(SORSA)
        if not mods or self.gamma == 0:
            return
        group = optimizer.param_groups[0]
        lr = group.get("initial_lr", group["lr"])
        loss = sum(a.ortho_loss() for a in mods) / len(mods)
        (loss * (self.gamma / lr)).backward()


@register("sorsa", family="SVD init", paper="Cao 2024, SORSA, arXiv:2409.00055")
class SORSA(Adapter):
    __doc__ = __doc__
    init = "residual"

    @dataclass
    class Config:
        r: int = 4
        alpha: float | None = None  # None: scale 1 (official default)
        dropout: float = 0.0
        gamma: float = 4e-4  # orthonormal regulariser step γ (decoupled, see docstring)
        niter: int = 0  # 0: full SVD; K: torch.svd_lowrank with K subspace iterations
        seed: int = 0

    roles = {"sorsa_A": "A", "sorsa_S": "singular_values", "sorsa_B": "B"}
    layers = ("linear", "conv1d")

    def __init__(self, base, cfg: Config, view=None):
        super().__init__(base, cfg, view)
        if cfg.r <= 0:
            raise ConfigError(f"r must be positive, got {cfg.r}")
        v = self.view
        self.sorsa_A = nn.Parameter(torch.empty(cfg.r, v.d_in))
        self.sorsa_S = nn.Parameter(torch.empty(cfg.r))
        self.sorsa_B = nn.Parameter(torch.empty(v.d_out, cfg.r))
        self.dropout = nn.Dropout(cfg.dropout) if cfg.dropout > 0 else nn.Identity()
        self.scale = 1.0 if cfg.alpha is None else cfg.alpha / cfg.r
        self.register_buffer("A0", torch.zeros(cfg.r, v.d_in), persistent=False)
        self.register_buffer("B0", torch.zeros(v.d_out, cfg.r), persistent=False)

    def reset_parameters(self) -> None:  # data-free placeholder; init_from sets the SVD factors
        nn.init.zeros_(self.sorsa_A)
        nn.init.zeros_(self.sorsa_S)
        nn.init.zeros_(self.sorsa_B)

    @torch.no_grad()
    def init_from(self, weight: Tensor, stats=None) -> Tensor:
        U, S, V = svd_top(weight, self.cfg.r, self.cfg.niter, self.cfg.seed)
        self.sorsa_A.copy_(V.t().to(self.sorsa_A.dtype))
        self.sorsa_S.copy_(S.to(self.sorsa_S.dtype))
        self.sorsa_B.copy_(U.to(self.sorsa_B.dtype))
        self.A0.copy_(self.sorsa_A)
        self.B0.copy_(self.sorsa_B * self.sorsa_S)
        return weight - self.scale * (self.B0.float() @ self.A0.float())

    def delta(self, x: Tensor) -> Tensor:
        h = self.view.down(self.dropout(self.cast_in(x)), self.sorsa_A)
        return self.view.up(h * (self.sorsa_S * self.scale), self.sorsa_B)

    def delta_weight(self) -> Tensor:
        return (self.sorsa_B * self.sorsa_S) @ self.sorsa_A * self.scale

    def lowrank(self) -> LowRank:
        """Serving view ``B' = B diag(S)`` (S folded into B)."""
        return LowRank(self.sorsa_A, self.sorsa_B * self.sorsa_S, self.scale)

    def initial_lowrank(self) -> LowRank:
        return LowRank(self.A0, self.B0, self.scale)

    def ortho_terms(self) -> Tensor:
        """``‖AAᵀ − I‖_F + ‖BᵀB − I‖_F`` for this module (two of the matrices L_o averages over)."""
        return ortho_penalty(self.sorsa_A, self.sorsa_B)

    def ortho_loss(self) -> Tensor:
        """This module's contribution to L_o, normalised per module (mean of its two matrices)."""
        return self.ortho_terms() / 2

    def stats(self) -> dict[str, float]:
        return {"sorsa_ortho": float(self.ortho_loss().detach())}

    @classmethod
    def controller(cls, att):
        return SORSAController(att, att.method_config().gamma)
