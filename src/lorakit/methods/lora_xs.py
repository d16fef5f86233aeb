"""LoRA-XS: low-rank adaptation with extremely small number of parameters (Bałazy et al. 2024, arXiv:2405.17604).

``h = W0 x + s · B R A x`` with frozen SVD bases of the pretrained weight ``W0 = U Σ Vᵀ``:
``B = U_r`` (d_out, r), ``A = Σ_r V_rᵀ`` (r, d_in), and a trainable core ``R`` (r, r) (file key ``lora_N.weight``).
Only R trains: r² parameters per module, whatever the layer width. ``s = α/r``; ``alpha=None`` (default) means
α = r, i.e. s = 1, as in the official scripts. W0 is not modified. ΔW = s·U_r R Σ_r V_rᵀ always lies in
span(U_r) × span(V_r).

Decisions (official code, MohammadrezaBanaei/LoRA-XS ``utils/initialization_utils.py``):

* ``R ~ N(0, init_std²)`` with ``init_std = 1e-5`` (the code's ``sigma=0.00001``), so the init is *almost* but not
  exactly output-preserving: ``init = "changes"``. ``init_std=0`` gives an exact no-op (R still gets gradients,
  because A and B are non-zero).
* The SVD runs in fp32 on the fp32 base matrix whatever the model dtype (``niter=0``: exact ``torch.linalg.svd``,
  the code's choice; ``niter=K``: fast seeded ``torch.svd_lowrank`` with K subspace iterations).
* The frozen bases are non-persistent by default, so an adapter file holds only R (the method's point); on load
  they are rebuilt from the base weight (``on_load``). Singular-vector signs are canonicalised (largest entry of
  each u_i positive) so the rebuilt bases match the trained ones on any SVD backend. ``save_bases=True`` stores
  them in the file instead (use it when the base weights at load time may differ, e.g. re-quantised).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..core import register
from ..errors import ConfigError
from ._threefactor import ThreeFactor, canonical_signs
from .pissa import svd_top


def svd_bases(weight: Tensor, r: int, niter: int, seed: int) -> tuple[Tensor, Tensor, Tensor]:
    """Top-r fp32 SVD with canonical signs: U (d_out, r), σ (r,), V (d_in, r)."""
    if r > min(weight.shape):
        raise ConfigError(f"r={r} exceeds min(d_out, d_in)={min(weight.shape)} of a {tuple(weight.shape)} weight")
    U, S, V = svd_top(weight.float(), r, niter, seed)
    U, V = canonical_signs(U, V)
    return U, S, V


@register("lora_xs", family="svd three-factor",
          paper="Bałazy et al. 2024, LoRA-XS: Low-Rank Adaptation with Extremely Small Number of Parameters, "
                "arXiv:2405.17604")
class LoRAXS(ThreeFactor):
    __doc__ = __doc__
    init = "changes"
    train_A, train_N, train_B = False, True, False

    @dataclass
    class Config:
        r: int = 8
        alpha: float | None = None  # None: α = r (s = 1), as the official scripts
        dropout: float = 0.0
        init_std: float = 1e-5  # R ~ N(0, init_std²); 0 gives an exact no-op init
        niter: int = 0  # 0: exact SVD; K > 0: randomised SVD with K subspace iterations
        seed: int = 0
        save_bases: bool = False  # store U_r, Σ_r V_rᵀ in the file instead of rebuilding them on load

    def __init__(self, base, cfg: Config, view=None):
        scale = 1.0 if cfg.alpha is None else cfg.alpha / cfg.r
        super().__init__(base, cfg, view, scale=scale, persistent=cfg.save_bases)

    def reset_parameters(self) -> None:
        torch.nn.init.zeros_(self.lora_A.weight)
        torch.nn.init.zeros_(self.lora_B.weight)
        if self.cfg.init_std > 0:
            torch.nn.init.normal_(self.lora_N.weight, std=self.cfg.init_std)
        else:
            torch.nn.init.zeros_(self.lora_N.weight)

    @torch.no_grad()
    def init_from(self, weight: Tensor, stats=None) -> None:
        U, S, V = svd_bases(weight, self.cfg.r, self.cfg.niter, self.cfg.seed)
        self.set_factors(A=S[:, None] * V.t(), B=U)
        return None

    def on_load(self, weight: Tensor, state: dict) -> None:
        if not self.cfg.save_bases:
            self.init_from(weight)  # rebuild the frozen bases; R comes from the file
        return None
