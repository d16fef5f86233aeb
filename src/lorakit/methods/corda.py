"""CorDA: Context-oriented Decomposition Adaptation (Yang et al. 2024, arXiv:2406.05223).

LoRA on a residual base, ``h = W_res x + s·BAx`` (as PiSSA), with factors from a covariance-weighted SVD. From the
calibration covariance ``C = XᵀX/n`` (d_in, d_in) of the layer inputs: damp ``Ĉ = C + λ·mean(diag C)·I`` with
λ = 0.01 doubled until ``‖Ĉ Ĉ⁻¹ − I‖_F < 0.05``; SVD ``W0 Ĉ = U S V̂ᵀ``; ``V = (V̂ᵀ Ĉ⁻¹)ᵀ`` so ``W0 = U S Vᵀ`` exactly.
``mode="ipm"`` (instruction-previewed, calibrate on task data) keeps the **largest** r components; ``"kpm"``
(knowledge-preserved, calibrate on QA/world-knowledge data) the **smallest** r.
``A = diag(√(S_r/s)) V_rᵀ`` (r, d_in), ``B = U_r diag(√(S_r/s))`` (d_out, r), ``W_res = W0 − s·BA``. All fp32.

Trainable: A, B. ``niter > 0`` (IPM only): seeded randomised SVD of ``W0 Ĉ``; KPM needs the bottom of the spectrum,
so it always uses the full SVD.

Decisions: the covariance is lorakit's shared activation statistic (the plain mean of ``xxᵀ``); CorDA/PEFT divide
each batch by its max |x| before accumulating, which only re-weights batches (the damping is scale-free).
Loading: the covariance is not available at load time, so the initial factors ``A0``/``B0`` are saved with the
adapter (persistent buffers) and ``on_load`` rebuilds ``W_res``. No PeftSpec: PEFT's ``init_lora_weights="corda"``
cannot load without running ``preprocess_corda`` on data; the PEFT shipping form is
``save_adapter(as_lora=True)`` — a plain rank-2r LoRA on the original base (``initial_lowrank``), as for PiSSA.
"""
from __future__ import annotations

from typing import ClassVar, Literal

from dataclasses import dataclass

import torch
from torch import Tensor

from ..core import LowRankConfig, register
from ..errors import ConfigError
from ._svd import SavedResidualLoRA, svd_full, svd_top


def damped_inverse(C: Tensor, lam: float = 0.01, tol: float = 0.05) -> tuple[Tensor, Tensor]:
    """``(Ĉ, Ĉ⁻¹)`` with the smallest doubling of λ that makes the inverse accurate to ``tol`` (Frobenius)."""
    C = C.float()
    eye = torch.eye(C.shape[0], device=C.device, dtype=C.dtype)
    base = C.diagonal().mean().clamp_min(1e-12)
    for _ in range(60):
        Ch = C + eye * (base * lam)
        inv = torch.linalg.inv(Ch)
        if torch.linalg.matrix_norm(Ch @ inv - eye) < tol:
            return Ch, inv
        lam *= 2
    raise ConfigError("CorDA: the calibration covariance could not be inverted (degenerate activations?)")


@register("corda", family="SVD init (data-aware)", paper="Yang et al. 2024, CorDA, arXiv:2406.05223")
class CorDA(SavedResidualLoRA):
    __doc__ = __doc__
    calibration = "activations"

    @dataclass
    class Config(LowRankConfig):
        r: int = 128
        alpha: float = 128.0
        mode: Literal["ipm", "kpm"] = "ipm"  # "ipm": largest r components | "kpm": smallest r
        damping: float = 0.01  # initial λ (doubled until Ĉ is safely invertible)
        niter: int = 0  # IPM only: K > 0 -> randomised SVD with K subspace iterations
        seed: int = 0

    def __init__(self, base, cfg: Config, view=None):
        if cfg.mode not in ("ipm", "kpm"):
            raise ConfigError(f"CorDA mode must be 'ipm' or 'kpm', got {cfg.mode!r}")
        if cfg.mode == "kpm" and cfg.niter > 0:
            raise ConfigError("CorDA kpm takes the smallest components: the randomised SVD (niter > 0) is IPM-only")
        super().__init__(base, cfg, view)

    def factors(self, weight: Tensor, stats: dict) -> tuple[Tensor, Tensor]:
        C, C_inv = damped_inverse(stats["cov"].to(weight.device), self.cfg.damping)
        WC = weight @ C
        r = self.cfg.r
        if self.cfg.mode == "ipm":
            U, S, Vh = svd_top(WC, r, self.cfg.niter, self.cfg.seed) if self.cfg.niter > 0 else svd_full(WC)
            U, S, Vh = U[:, :r], S[:r], Vh[:, :r]
        else:
            U, S, Vh = svd_full(WC)
            U, S, Vh = U[:, -r:], S[-r:], Vh[:, -r:]
        Vt = Vh.t() @ C_inv  # (r, d_in): rows of Vᵀ = V̂ᵀ Ĉ⁻¹
        root = (S / self.scale).clamp_min(0).sqrt()
        return root[:, None] * Vt, U * root[None, :]
