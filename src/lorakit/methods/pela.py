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
The paper's intermediate pre-training (0.1·feature KD + the weight-perturbation regulariser) is a training recipe
(teacher = the original model) and is not part of the adapter.
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

        def validate(self) -> None:
            if not self.compress_ratio > 0:
                raise ConfigError(f"compress_ratio={self.compress_ratio} must be > 0")

    roles = {"pela_L.weight": "A", "pela_R.weight": "B"}
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

    def reset_parameters(self) -> None:  # the real init needs the weight (init_from)
        nn.init.kaiming_uniform_(self.pela_L.weight, a=math.sqrt(5))
        nn.init.zeros_(self.pela_R.weight)

    @torch.no_grad()
    def init_from(self, weight: Tensor, stats=None) -> Tensor:
        U, S, Vh = torch.linalg.svd(weight.float(), full_matrices=False)
        root = S[: self.k].sqrt()
        self.pela_L.weight.copy_(root[:, None] * Vh[: self.k])
        self.pela_R.weight.copy_(U[:, : self.k] * root)
        return torch.zeros_like(weight)

    def on_load(self, weight: Tensor, state: dict[str, Tensor]) -> Tensor:
        return torch.zeros_like(weight)

    def delta(self, x: Tensor) -> Tensor:
        return self.view.up(self.view.down(self.cast_in(x), self.pela_L.weight), self.pela_R.weight)

    def delta_weight(self) -> Tensor:
        return self.pela_R.weight @ self.pela_L.weight

    def lowrank(self) -> LowRank:
        return LowRank(self.pela_L.weight, self.pela_R.weight, 1.0)
