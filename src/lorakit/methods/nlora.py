"""NLoRA: Nyström-initiated low-rank adaptation (Guo et al. 2025, arXiv:2502.14482).

``h = W0' x + s · B N A x`` with A (r, d_in), N (r, r) (file key ``lora_N.weight``), B (d_out, r), ``s = α/r``;
A, N and B all train. Init from Nyström landmarks of the pretrained weight (the first r rows and columns)::

    B = W0[:, :r]    A = W0[:r, :]    N = W0[:r, :r]      (middle="raw", the released code)
                                      N = W0[:r, :r]⁺     (middle="pinv", classical Nyström  W0 ≈ C U⁺ R)

With ``middle="pinv"`` BNA reproduces W0 exactly whenever rank(W0) = r and W0[:r, :r] is invertible.

Decisions. The released code (TracyGuo2001/NLoRA, ``nlora_init`` in its PEFT fork) copies ``W0[:r, :r]`` itself as
N (the pseudo-inverse line is commented out) and does **not** residualise W0, so its init adds
``s·W0[:, :r] W0[:r, :r] W0[:r, :]`` to the model: cubic in the weights, small for 7B-scale weights (entries
~1e-2) but not in general: on SmolLM2-135M (entries up to ~5) it is 0.5-2x ‖W0‖_F in layer 0's q/k and ~0.6x in
layer 15's MLP (r=8, s=2); the arena's NLoRA and IntTune runs there end near chance (docs/arena.md). That is the
default here (``middle="raw"``, ``residual=False``, hence ``init = "changes"``); on a small model prefer
``residual=True``. ``middle="pinv"`` gives the classical Nyström approximation; with ``residual=True`` the base
becomes ``W0' = W0 − s·B₀N₀A₀`` (PiSSA-style, output preserved; rebuilt from W0 on load, the landmarks are
deterministic). The pseudo-inverse is taken in fp32.
"""
from __future__ import annotations

from typing import ClassVar, Literal

from dataclasses import dataclass

import torch
from torch import Tensor

from ..core import register
from ..errors import ConfigError
from ._threefactor import ThreeFactor


def nystrom_factors(weight: Tensor, r: int, middle: Literal["raw", "pinv"] = "raw") -> tuple[Tensor, Tensor, Tensor]:
    """Index-landmark Nyström factors of an fp32 (d_out, d_in) matrix: A (r, d_in), N (r, r), B (d_out, r)."""
    if r > min(weight.shape):
        raise ConfigError(f"r={r} exceeds min(d_out, d_in)={min(weight.shape)} of a {tuple(weight.shape)} weight")
    W = weight.float()
    core = W[:r, :r]
    N = torch.linalg.pinv(core) if middle == "pinv" else core.clone()
    return W[:r, :].clone(), N, W[:, :r].clone()


@register("nlora", family="svd three-factor",
          paper="Guo et al. 2025, NLoRA: Nyström-Initiated Low-Rank Adaptation for Large Language Models, "
                "arXiv:2502.14482")
class NLoRA(ThreeFactor):
    __doc__ = __doc__
    init = "changes"

    @dataclass
    class Config:
        r: int = 8
        alpha: float = 8.0
        dropout: float = 0.0
        middle: str = "raw"  # "raw": N = W0[:r,:r] (released code) | "pinv": N = W0[:r,:r]⁺ (classical Nyström)
        residual: bool = False  # True: base := W0 − s·B₀N₀A₀ (output preserved at init)

    def __init__(self, base, cfg: Config, view=None, persistent: bool = True):
        if cfg.middle not in ("raw", "pinv"):
            raise ConfigError(f"{self.name}: middle={cfg.middle!r}; valid: 'raw', 'pinv'")
        super().__init__(base, cfg, view, scale=cfg.alpha / cfg.r, persistent=persistent)

    def reset_parameters(self) -> None:  # data-free placeholder; init_from sets the landmarks
        for m in (self.lora_A, self.lora_N, self.lora_B):
            torch.nn.init.zeros_(m.weight)

    @torch.no_grad()
    def init_from(self, weight: Tensor, stats=None) -> Tensor | None:
        A, N, B = nystrom_factors(weight, self.cfg.r, self.cfg.middle)
        self.set_factors(A=A, N=N, B=B)
        if self.cfg.residual:
            return weight - self.scale * (B @ N @ A)
        return None

    def on_load(self, weight: Tensor, state: dict) -> Tensor | None:
        return self.init_from(weight) if self.cfg.residual else None
