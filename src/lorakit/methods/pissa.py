"""PiSSA: principal singular values and vectors adaptation (Meng et al. 2024, arXiv:2404.02948).

LoRA on a residual base: ``h = W_res x + s·BAx``. Init (fp32, as PEFT's ``pissa_init``): ``W0 = U diag(σ) Vᵀ``,
``A = diag(√(σ_{1:r}/s)) V_{:,1:r}ᵀ`` (r, d_in), ``B = U_{:,1:r} diag(√(σ_{1:r}/s))`` (d_out, r), and the frozen base
becomes ``W_res = W0 − s·BA = Σ_{i>r} σ_i u_i v_iᵀ``. ``niter > 0`` uses the fast randomised SVD
(``torch.svd_lowrank(W, r, niter)``, PEFT's ``pissa_niter_K``), seeded so reloading rebuilds the same residual.

Trainable: A, B. The initial factors are kept (not saved) so ``save_adapter(as_lora=True)`` can write a plain
rank-2r LoRA for the original base: ``ΔW = [B | −B₀][A; A₀]``.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..core import LowRank, LowRankConfig, register
from .lora import LoRA, lora_spec


def _niter_of(v) -> int:
    if isinstance(v, str) and v.startswith("pissa_niter_"):
        return int(v.rsplit("_", 1)[1])
    return 0


def svd_top(weight: Tensor, r: int, niter: int = 0, seed: int = 0) -> tuple[Tensor, Tensor, Tensor]:
    """Top-r SVD of an fp32 matrix: U (d_out, r), σ (r,), V (d_in, r). ``niter`` > 0: randomised, seeded."""
    W = weight.float()
    if niter > 0:
        g = torch.random.fork_rng(devices=[] if W.device.type == "cpu" else [W.device])
        with g:
            torch.manual_seed(seed)
            U, S, V = torch.svd_lowrank(W, q=r, niter=niter)
        return U[:, :r], S[:r], V[:, :r]
    U, S, Vh = torch.linalg.svd(W, full_matrices=False)
    return U[:, :r], S[:r], Vh[:r].t()


@register("pissa", family="core low-rank", paper="Meng et al. 2024, PiSSA, arXiv:2404.02948",
          peft=lora_spec({"use_dora": False, "init_lora_weights": "pissa"},
                         {"init_lora_weights": lambda v: isinstance(v, str) and v.startswith("pissa")}))
class PiSSA(LoRA):
    __doc__ = __doc__
    init = "residual"

    @dataclass
    class Config(LowRankConfig):
        alpha: float = 8.0
        niter: int = 0  # 0: full SVD; K: torch.svd_lowrank with K subspace iterations
        seed: int = 0

    layers = ("linear", "conv1d")

    def __init__(self, base, cfg: Config, view=None):
        super().__init__(base, cfg, view)
        self.register_buffer("A0", torch.zeros_like(self.lora_A.weight), persistent=False)
        self.register_buffer("B0", torch.zeros_like(self.lora_B.weight), persistent=False)

    @torch.no_grad()
    def init_from(self, weight: Tensor, stats=None) -> Tensor:
        U, S, V = svd_top(weight, self.cfg.r, self.cfg.niter, self.cfg.seed)
        root = (S / self.scale).sqrt()
        self.lora_A.weight.copy_((root[:, None] * V.t()).to(self.lora_A.weight.dtype))
        self.lora_B.weight.copy_((U * root[None, :]).to(self.lora_B.weight.dtype))
        self.A0.copy_(self.lora_A.weight)
        self.B0.copy_(self.lora_B.weight)
        return weight - self.scale * (self.B.float() @ self.A.float())

    def initial_lowrank(self) -> LowRank:
        return LowRank(self.A0, self.B0, self.scale)
