"""PELA: learning parameter-efficient models with low-rank approximation (Guo et al. 2024, CVPR,
arXiv:2310.10700; reference code guoyang9/PELA).

Each adapted layer's weight is REPLACED by a trainable low-rank product: ``h = R L x + b`` with ``L`` (k, d_in),
``R`` (d_out, k), ``k = ⌊d_in·d_out / (c·(d_in + d_out))⌋`` (compress ratio ``c = 3``; ``r`` overrides k), so the
layer keeps ≤ 1/c of its weights. Init (fp32 SVD, Eckart–Young optimum): ``L = √Σ_k V_kᵀ``, ``R = U_k √Σ_k``; the
base bias stays (frozen; train it with ``bias: lora_only``). Trainable: L and R.

Decisions: this is compression, not an output-preserving adapter (``init = "changes"``: at init the layer computes
the rank-k approximation, error ``‖W − RL‖_F = ‖σ_{k+1:}‖``). In lorakit the frozen base weight is set to 0 (the
original is stashed, so ``detach`` restores it bit-exactly) and the adapter adds ``R L x``; reloading zeroes the
base again (``on_load``). The factored form is the saving and is what the file holds (``pela_L/pela_R.weight``).
Merging is supported for export: it materialises ``R L`` as a dense weight (``merge(W) = W + RL`` with W = 0).

Training as the authors do (``ALBEF/Pretrain.py``, ``models/model_pretrain.py``): loss = task losses
+ 0.1·feature KD + ``L_norm``, with the weight-perturbation regulariser ``L_norm = mean over layers of
(‖R L − W‖_∞ − ε)²`` (``inf_norm``: the largest absolute entry of the residual against the original weight W, MSE
to the scalar ε = 1e-3). It is ``extra_loss`` here, weighted by ``norm_reg`` (official 1.0; 0 switches it off and
frees the copy of W it keeps, a non-persistent buffer rebuilt from the original weight at init and on load) and
averaged over the modules (``loss_reduction = "mean"``). The biases stay trainable in the official code (the bias
moves onto R, and every student parameter trains): here the base bias is kept and trains with the attach option
``bias: lora_only`` (the recipe sets it). The feature distillation needs a teacher model run beside the student
and is left to the user's training loop (not part of the adapter).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..core import Adapter, Factor, LowRank, register
from ..errors import ConfigError


def pela_rank(d_in: int, d_out: int, ratio: float = 3.0) -> int:
    return max(1, math.floor(d_in * d_out / (ratio * (d_in + d_out))))


@register("pela", family="decomposition", paper="Guo et al. 2024, PELA, arXiv:2310.10700")
class PELA(Adapter):
    __doc__ = __doc__
    init = "changes"

    @dataclass
    class Config:
        r: int | None = None  # None: k from compress_ratio
        compress_ratio: float = 3.0
        norm_reg: float = 1.0  # weight of the weight-perturbation regulariser (official 1.0; 0: off)
        norm_eps: float = 1e-3  # its target ε for ‖RL − W‖_∞ (official 1e-3)

        def validate(self) -> None:
            if not self.compress_ratio > 0:
                raise ConfigError(f"compress_ratio={self.compress_ratio} must be > 0")
            if min(self.norm_reg, self.norm_eps) < 0:
                raise ConfigError(f"norm_reg={self.norm_reg} and norm_eps={self.norm_eps} must be >= 0")

    roles = {"pela_L.weight": "A", "pela_R.weight": "B"}
    loss_reduction = "mean"  # L_norm is the mean over the compressed layers
    layers = ("linear", "conv1d")
    budget_exempt = ("compression: the rank is the compressed model's capacity (every adapted weight is replaced by "
                     "R·L), so matching LoRA's budget would leave rank 2-3 weights; the paper's ratio c=3 is kept")

    def __init__(self, base: nn.Module, cfg: Config, view=None):
        super().__init__(base, cfg, view)
        v = self.view
        self.k = min(cfg.r or pela_rank(v.d_in, v.d_out, cfg.compress_ratio), v.d_in, v.d_out)
        if self.k <= 0:
            raise ConfigError(f"rank must be positive, got {cfg.r}")
        self.pela_L = Factor(self.k, v.d_in)
        self.pela_R = Factor(v.d_out, self.k)
        if cfg.norm_reg < 0 or cfg.norm_eps < 0:
            raise ConfigError(f"PELA: norm_reg and norm_eps must be >= 0, got {cfg.norm_reg}, {cfg.norm_eps}")
        self.register_buffer("teacher", None, persistent=False)  # the original W, for the regulariser

    def _keep_teacher(self, weight: Tensor) -> None:
        if self.cfg.norm_reg > 0:
            self.teacher = weight.detach().to(self.pela_L.weight.dtype).clone()

    def reset_parameters(self) -> None:  # the real init needs the weight (init_from)
        nn.init.kaiming_uniform_(self.pela_L.weight, a=math.sqrt(5))
        nn.init.zeros_(self.pela_R.weight)

    @torch.no_grad()
    def init_from(self, weight: Tensor, stats=None) -> Tensor:
        U, S, Vh = torch.linalg.svd(weight.float(), full_matrices=False)
        root = S[: self.k].sqrt()
        self.pela_L.weight.copy_(root[:, None] * Vh[: self.k])
        self.pela_R.weight.copy_(U[:, : self.k] * root)
        self._keep_teacher(weight)
        return torch.zeros_like(weight)

    def on_load(self, weight: Tensor, state: dict[str, Tensor]) -> Tensor:
        self._keep_teacher(weight)
        return torch.zeros_like(weight)

    def extra_loss(self) -> Tensor | None:
        """``norm_reg · (‖R L − W‖_∞ − ε)²`` (the official ``inf_norm`` term of this layer)."""
        if not self.cfg.norm_reg or self.teacher is None or not self.training:
            return None
        residual = (self.delta_weight().float() - self.teacher.float()).abs().max()
        return self.cfg.norm_reg * (residual - self.cfg.norm_eps) ** 2

    def delta(self, x: Tensor) -> Tensor:
        return self.view.up(self.view.down(self.cast_in(x), self.pela_L.weight), self.pela_R.weight)

    def delta_weight(self) -> Tensor:
        return self.pela_R.weight @ self.pela_L.weight

    def lowrank(self) -> LowRank:
        return LowRank(self.pela_L.weight, self.pela_R.weight, 1.0)
