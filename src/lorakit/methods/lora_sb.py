"""LoRA-SB: LoRA Silver Bullet (Ponkshe, Singhal et al. 2024, arXiv:2411.19557).

``h = W0 x + s · B R A x`` as LoRA-XS (A (r, d_in) and B (d_out, r) frozen, the r×r core ``R`` trainable, file key
``lora_N.weight``), but the bases come from an approximation of the *first full fine-tuning update*::

    G   = mean over calibration batches of ∂L/∂W0                       (d_out, d_in), fp32
    ΔW̃ = −η · sign(G)        (update="sign": Adam's first step, the official code)
         −η · G              (update="grad": an SGD step)
    ΔW̃ ≈ U_r S_r V_rᵀ  (top-r SVD, fp32)   →   B = U_r,  A = V_rᵀ,  R = S_r / s

so at init ``s·BRA`` is the best rank-r approximation of ΔW̃ and the model starts one simulated full-FT step away
from W0. This is **not** output-preserving by design (``init = "changes"``); W0 is never modified.

Decisions (official code RaghavSinghal10/lora-sb ``utils/gradient_utils.py``):

* Gradient accumulation is lorakit's shared ``calibrate(kind="gradients")``, in train mode as the official
  ``estimate_and_process_grads_torch`` (``model.train()``): the mean gradient over the calibration batches (the
  trainer's ``train.calibration_batches`` sets how many). sign(Σ G) = sign(mean G).
* ``eta`` is the step size of the simulated update. The code uses the learning rate of the first optimiser step
  (``lr / warmup_steps`` under linear warmup); set ``eta`` to that to reproduce it. Default 1e-4.
* ``R = S_r / s`` (paper's form) so any α works; with the code's α = r (``alpha=None``, s = 1) this is ``R = S_r``.
* SVD: ``niter=10`` (default) is the code's ``torch.svd_lowrank(…, niter=10)``, seeded; ``niter=0`` is exact.
* A and B depend on data, so they are **persistent buffers**: they are saved in the adapter file (frozen, never
  trainable) and restored on load with the trained R.
"""
from __future__ import annotations

from typing import ClassVar, Literal

from dataclasses import dataclass

import torch
from torch import Tensor

from ..core import register
from ..errors import ConfigError
from ._threefactor import ThreeFactor
from .pissa import svd_top


@register("lora_sb", family="svd three-factor",
          paper="Ponkshe, Singhal et al. 2024, Initialization using update approximation is a silver bullet for "
                "extreme efficient low-rank fine-tuning (LoRA-SB), arXiv:2411.19557")
class LoRASB(ThreeFactor):
    __doc__ = __doc__
    init = "changes"
    calibration = "gradients"
    train_A, train_N, train_B = False, True, False

    @dataclass
    class Config:
        r: int = 8
        alpha: float | None = None  # None: α = r (s = 1), as the official code
        dropout: float = 0.0
        eta: float = 1e-4  # step size of the simulated first update
        update: Literal["sign", "grad"] = "sign"  # "sign": −η·sign(G) (Adam's first step) | "grad": −η·G (SGD)
        niter: int = 10  # randomised SVD iterations (0: exact SVD)
        seed: int = 0

    def __init__(self, base, cfg: Config, view=None):
        if cfg.update not in ("sign", "grad"):
            raise ConfigError(f"lora_sb: update={cfg.update!r}; valid: 'sign', 'grad'")
        scale = 1.0 if cfg.alpha is None else cfg.alpha / cfg.r
        super().__init__(base, cfg, view, scale=scale, persistent=True)

    def reset_parameters(self) -> None:
        for m in (self.lora_A, self.lora_N, self.lora_B):
            torch.nn.init.zeros_(m.weight)

    def simulated_update(self, grad: Tensor) -> Tensor:
        """ΔW̃ from the mean calibration gradient (fp32)."""
        g = grad.float()
        return -self.cfg.eta * (torch.sign(g) if self.cfg.update == "sign" else g)

    @torch.no_grad()
    def init_from(self, weight: Tensor, stats=None) -> None:
        if not stats or "grad" not in stats:
            raise ConfigError("lora_sb initialises from calibration gradients: attach() needs calibration batches "
                              "(and labels or a loss_fn)")
        r = self.cfg.r
        if r > min(weight.shape):
            raise ConfigError(f"r={r} exceeds min(d_out, d_in)={min(weight.shape)} of a {tuple(weight.shape)} weight")
        dw = self.simulated_update(stats["grad"].to(weight.device))
        U, S, V = svd_top(dw, r, self.cfg.niter, self.cfg.seed)
        self.set_factors(A=V.t(), N=torch.diag(S / self.scale), B=U)
        return None
