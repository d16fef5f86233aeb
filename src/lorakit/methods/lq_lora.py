"""LQ-LoRA: low-rank plus quantised matrix decomposition (Guo et al. 2023, arXiv:2311.12023).

``W ≈ Q + L1 L2``: ``h = Q x + s·B A x`` with ``Q`` the frozen quantised base and ``s·BA = L1 L2`` at init
(``A = L2/√s`` (r, d_in), ``B = L1/√s`` (d_out, r); A and B train). Init (``_quant.lq_decompose``): from ``Q = 0``
alternate ``L1L2 = SVD_r(W − Q)`` (``L1 = U√S``, ``L2 = √S Vᵀ``) and ``Q = quant(W − L1L2)`` for at most ``iters``
steps, stopping when ``‖W − (Q + L1L2)‖_F`` increases. ``init="changes"``: the output at init is
``(Q + L1L2) x ≈ W x`` (closer than ``quant(W) x``), not equal.

Decisions:

* ``iters`` defaults to 20 (the paper's 100 rarely runs past the early stop); ``niter > 0`` uses the seeded
  randomised SVD (the paper: oversampling 10) instead of the full SVD.
* Fisher-weighted variant (data-aware LQ-LoRA): when the init stats hold ``grad_sq`` (an empirical Fisher diagonal:
  ``attach(..., stats=lorakit.calibrate(model, paths, batches, "gradients"))``), the SVD uses the paper's two-sided
  row/column-mean heuristic. ``calibration`` stays None so the data-free variant needs no data.
* Bit budget: LQ-LoRA picks (bits, block, constant format) per matrix with an ILP. ``_quant.budget_overrides``
  picks (bits ∈ {2,3,4,8}, block ∈ {16,32,64}; constants 8-bit in blocks of 256) by a greedy on each matrix's
  convex (cost, error) hull and returns per-module ``overrides`` for the attach config (one config per module).
* ``Q`` is the dequantised fp32 values on a float base (simulated, exact values); on a ``quantize_model``-ed base
  the base's own format wins, ``W`` is its dequantised value and ``Q`` is written back requantised (the
  double-quantised constants may move by one 8-bit step).
* Reloading needs no data: the initial factors ``A0, B0`` are saved (persistent buffers) and ``on_load`` rebuilds
  ``Q = dequant(quant(W − s·B0A0))`` exactly as ``init_from`` computed it (files are twice a LoRA's size).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..errors import ConfigError
from ..core import LowRankConfig, register
from ._quant import base_qcfg, fake_quant, lq_decompose, qcfg_of
from .lora import LoRA


@register("lq_lora", family="quantised base", paper="Guo et al. 2023, LQ-LoRA, arXiv:2311.12023")
class LQLoRA(LoRA):
    __doc__ = __doc__
    init = "changes"
    layers = ("linear", "conv1d")

    @dataclass
    class Config(LowRankConfig):
        r: int = 64
        bits: int = 4  # the paper's NF3/NF4 presets: 3 or 4 bits, block 64, 8-bit constants in blocks of 256
        block: int = 64
        double_quant: bool = True
        dq_block: int = 256
        iters: int = 20
        niter: int = 0  # 0: full SVD; K: seeded randomised SVD with K subspace iterations
        seed: int = 0

        def validate(self) -> None:
            if self.bits not in (2, 3, 4, 8):
                raise ConfigError(f"bits={self.bits}; valid: 2, 3, 4, 8")

    def __init__(self, base, cfg: Config, view=None):
        super().__init__(base, cfg, view)
        self.qcfg = qcfg_of(cfg)
        self.register_buffer("A0", torch.zeros_like(self.lora_A.weight))
        self.register_buffer("B0", torch.zeros_like(self.lora_B.weight))
        self.errors: list[float] = []

    def _residual(self, weight: Tensor) -> Tensor:
        L = self.scale * (self.B0.float() @ self.A0.float())
        return fake_quant(weight.float() - L, base_qcfg(self, self.qcfg))

    @torch.no_grad()
    def init_from(self, weight: Tensor, stats=None) -> Tensor:
        fisher = (stats or {}).get("grad_sq")
        c = self.cfg
        _, L1, L2, self.errors = lq_decompose(weight, c.r, base_qcfg(self, self.qcfg), c.iters, fisher, c.niter, c.seed)
        root = self.scale ** 0.5
        self.lora_A.weight.copy_((L2 / root).to(self.lora_A.weight.dtype))
        self.lora_B.weight.copy_((L1 / root).to(self.lora_B.weight.dtype))
        self.A0.copy_(self.lora_A.weight)
        self.B0.copy_(self.lora_B.weight)
        return self._residual(weight)

    @torch.no_grad()
    def on_load(self, weight: Tensor, state: dict[str, Tensor]) -> Tensor:
        self.A0.copy_(state["A0"].to(self.A0.dtype))
        self.B0.copy_(state["B0"].to(self.B0.dtype))
        return self._residual(weight)

    def stats(self) -> dict[str, float]:
        return {"lq_init_error": self.errors[-1]} if self.errors else {}
