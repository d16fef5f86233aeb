"""LoRA-GA: Low-Rank Adaptation with Gradient Approximation (Wang et al. 2024, arXiv:2407.05000).

LoRA on a residual base ``h = W_res x + s·BAx``, ``W_res = W0 − s·B₀A₀``. Init from the mean full-weight gradient
``G = mean ∂L/∂W`` (d_out, d_in) over calibration batches (lorakit's ``calibration="gradients"``):
``G ≈ U diag(σ) Vᵀ`` (``torch.svd_lowrank(G, q=min(4r, k), niter)``, seeded; ``niter=0``: exact SVD), then with
direction ``ArB2r`` (default) ``A₀ = c·V_{:,1:r}ᵀ`` (r, d_in), ``B₀ = c·U_{:,r+1:2r}`` (d_out, r) and the "stable"
scale ``c = d_out^{1/4}/√γ`` (γ = ``stable_gamma`` = 16). Other directions: ``ArBr`` (A: odd, B: even components),
``A2rBr`` (A: r+1..2r, B: 1..r); scales ``unit`` (c = 1) and ``gd`` (c = 1/s).

Why: the first SGD step of the product changes W by ``−η s² c² (G A₀ᵀA₀/c² + B₀B₀ᵀG/c²) = −η s² c² G_{2r}``, the
best rank-2r approximation of the full-fine-tuning step (the paper's objective; tested).

Calibration runs the model in TRAIN mode (dropout active), as the official ``estimate_gradient``
(``peft/src/peft/utils/lora_ga_utils/lora_ga_utils.py``, ``model.train()``) and PEFT's ``estimate_gradients``;
``lorakit.calibrate(kind="gradients")`` does so by default and restores the model's modes afterwards (tested with
a dropout model).

Trainable: A, B. Decisions: we follow the **official code and the paper** (Outsider565/LoRA-GA, ``lora_ga_init``):
both A₀ and B₀ are multiplied by ``d_out^{1/4}/√γ`` and no singular values enter. PEFT's port instead multiplies B₀
by ``diag(σ_{r+1:2r})`` and scales only B₀ — this breaks the rank-2r-projection property above (the A-side and
B-side halves get different weights), so we do not follow it. The official ``norm_clip`` option is not provided.
Loading: A₀/B₀ are saved with the adapter (the gradient is gone at load time) and ``on_load`` rebuilds ``W_res``.
No PeftSpec: PEFT's ``init_lora_weights="lora_ga"`` falls back to a random init on load and never rebuilds the
residual; the PEFT shipping form is ``save_adapter(as_lora=True)`` (a rank-2r LoRA on the original base).
"""
from __future__ import annotations

from typing import ClassVar, Literal

from dataclasses import dataclass

import torch
from torch import Tensor

from ..core import LowRankConfig, register
from ..errors import ConfigError
from ._svd import SavedResidualLoRA, svd_full


@register("lora_ga", family="gradient init", paper="Wang et al. 2024, LoRA-GA, arXiv:2407.05000")
class LoRAGA(SavedResidualLoRA):
    __doc__ = __doc__
    calibration = "gradients"

    @dataclass
    class Config(LowRankConfig):
        direction: Literal["ArB2r", "ArBr", "A2rBr"] = "ArB2r"  # "ArB2r" | "ArBr" | "A2rBr"
        scale_mode: Literal["stable", "unit", "gd"] = "stable"  # "stable" | "unit" | "gd"
        stable_gamma: float = 16.0
        niter: int = 4  # official: svd_lowrank(niter=4); 0: exact SVD
        seed: int = 0

    def __init__(self, base, cfg: Config, view=None):
        if cfg.direction not in ("ArB2r", "ArBr", "A2rBr"):
            raise ConfigError(f"LoRA-GA direction must be ArB2r, ArBr or A2rBr, got {cfg.direction!r}")
        if cfg.scale_mode not in ("stable", "unit", "gd"):
            raise ConfigError(f"LoRA-GA scale_mode must be stable, unit or gd, got {cfg.scale_mode!r}")
        super().__init__(base, cfg, view)
        if 2 * cfg.r > min(self.view.d_in, self.view.d_out):
            raise ConfigError(f"LoRA-GA needs 2r <= min(d_in, d_out) = {min(self.view.d_in, self.view.d_out)}")

    def factors(self, weight: Tensor, stats: dict) -> tuple[Tensor, Tensor]:
        G = stats["grad"].to(weight.device).float()
        r = self.cfg.r
        if self.cfg.niter > 0:
            g = torch.random.fork_rng(devices=[] if G.device.type == "cpu" else [G.device])
            with g:
                torch.manual_seed(self.cfg.seed)
                U, _, V = torch.svd_lowrank(G, q=min(4 * r, min(G.shape)), niter=self.cfg.niter)
        else:
            U, _, V = svd_full(G)
        if self.cfg.direction == "ArB2r":
            A, B = V[:, :r].t(), U[:, r:2 * r]
        elif self.cfg.direction == "A2rBr":
            A, B = V[:, r:2 * r].t(), U[:, :r]
        else:
            A, B = V[:, 1:2 * r:2].t(), U[:, 0:2 * r:2]
        if self.cfg.scale_mode == "stable":
            c = G.shape[0] ** 0.25 / self.cfg.stable_gamma ** 0.5
        else:
            c = 1.0 if self.cfg.scale_mode == "unit" else 1.0 / self.scale
        return A * c, B * c
