"""SLTrain: sparse plus low-rank parameterisation (Han et al. 2024, "SLTrain: a sparse plus low-rank approach for
parameter and memory efficient pretraining", NeurIPS 2024, arXiv:2406.02214; official code andyjm3/SLTrain).

``W = s·B·A + S`` with ``A`` (r, d_in), ``B`` (d_out, r), ``s = α/r``, and ``S`` (d_out, d_in) sparse on a
**uniformly random, fixed support** of ``nnz = ⌊δ·d_out·d_in⌋`` entries (``sp_ratio`` δ). Only ``A``, ``B`` and the
nnz values of ``S`` train; the support is drawn once (``randperm`` of the flattened matrix) and never changes.
Trainable parameters per matrix: ``r·(d_in + d_out) + ⌊δ·d_out·d_in⌋``.

Two uses, chosen by ``init``:

* ``init="replace"`` (the paper: pre-training). The layer *is* ``s·BA + S``: the base weight is replaced by zeros
  (pushed on the host's snapshot stack, so ``detach`` gives the original back bit for bit), ``B = 0``,
  ``A ~ kaiming_uniform(a=√5)`` and ``S``'s values ``~ U(−1/√d_in, 1/√d_in)`` as the official ``SpLoRaLinear``
  (so the initial layer is the random sparse ``S``). With ``sp_ratio=0`` this is plain low-rank pre-training
  (``W = s·BA``), the paper's "low-rank" baseline at equal parameter count.
* ``init="default"`` (fine-tuning a pretrained base): ``h = W0 x + (s·BA + S) x``. Decision (the paper only
  pre-trains): ``S``'s values start at zero, like ``B``, so attaching leaves the model's function unchanged.

Decisions where the code is a CUDA kernel: the official op never materialises ``S``; here ``S x`` scatters the
values into a dense (d_out, d_in) temporary and uses one GEMM (exact; transient memory of one weight matrix per
layer during the forward, freed after backward). The optimiser state is only for the trainable ``A, B`` and nnz
values, which is SLTrain's saving over full-rank training; the frozen (zero) base tensor stays allocated (lorakit
adapts a base model, it does not rebuild it). The support indices are a persistent buffer, written to the adapter
file, so a file reloads the same support whatever the seed. Merge: ``W + s·BA + S`` (exact). The paper's optional
trainable ``tanh`` scale is not implemented. ``dropout`` (default 0) applies to the low-rank branch's input only, as
LoRA's does.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn

from ..core import Adapter, Factor, LowRankConfig, register, scale_of
from ..errors import ConfigError


@register("sltrain", family="sparse", paper="Han et al. 2024, SLTrain, arXiv:2406.02214")
class SLTrain(Adapter):
    __doc__ = __doc__

    @dataclass
    class Config(LowRankConfig):
        r: int = 128  # the official default rank (pre-training)
        alpha: float = 32.0  # the official lora_alpha
        sp_ratio: float = 0.01  # δ: the fraction of entries on the sparse support (official default)
        # "replace": pre-training, the layer is s·BA + S (base zeroed); "default": fine-tuning, W0 + s·BA + S
        init: Literal["default", "replace"] = "default"

        def validate(self) -> None:  # at config resolution, before a model loads
            if not 0.0 <= self.sp_ratio < 1.0:
                raise ConfigError(f"sltrain: sp_ratio={self.sp_ratio} must be in [0, 1) (the fraction of entries of S)")

    inits = {"default": ("noop", None), "replace": ("changes", None)}
    roles = {"lora_A.weight": "A", "lora_B.weight": "B", "sparse_values": "sparse"}
    layers = ("linear", "conv1d")
    example = {"r": 2, "sp_ratio": 0.1}

    def __init__(self, base: nn.Module, cfg: Config, view=None):
        super().__init__(base, cfg, view)
        v = self.view
        self.lora_A = Factor(cfg.r, v.d_in)
        self.lora_B = Factor(v.d_out, cfg.r)
        nnz = int(math.floor(cfg.sp_ratio * v.d_out * v.d_in))
        self.sparse_values = nn.Parameter(torch.zeros(nnz))
        # the fixed support: flat indices into the (d_out, d_in) matrix, sorted (the set is what matters)
        self.register_buffer("sparse_index", torch.zeros(nnz, dtype=torch.long), persistent=True)
        self.dropout = nn.Dropout(cfg.dropout) if cfg.dropout > 0 else nn.Identity()
        self.scale = scale_of(cfg.alpha, cfg.r, cfg.rslora)

    @property
    def nnz(self) -> int:
        return self.sparse_values.numel()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        v = self.view
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)
        idx = torch.randperm(v.d_out * v.d_in)[: self.nnz]
        self.sparse_index.copy_(idx.sort().values)
        if self.cfg.init == "replace":
            bound = 1.0 / math.sqrt(v.d_in)
            nn.init.uniform_(self.sparse_values, -bound, bound)
        else:
            nn.init.zeros_(self.sparse_values)

    @torch.no_grad()
    def init_from(self, weight: Tensor, stats=None) -> Tensor | None:
        return torch.zeros_like(weight) if self.cfg.init == "replace" else None

    def on_load(self, weight: Tensor, state: dict[str, Tensor]) -> Tensor | None:
        """A pre-trained (``replace``) file applies to the zero base it was trained on."""
        return torch.zeros_like(weight) if self.cfg.init == "replace" else None

    @classmethod
    def changes_base(cls, cfg) -> bool:
        return getattr(cfg, "init", "default") == "replace"

    def sparse_dense(self) -> Tensor:
        """``S`` as a dense (d_out, d_in) matrix (differentiable in the values)."""
        v = self.view
        flat = self.sparse_values.new_zeros(v.d_out * v.d_in)
        return flat.index_put((self.sparse_index,), self.sparse_values).view(v.d_out, v.d_in)

    def delta(self, x: Tensor) -> Tensor:
        x = self.cast_in(x)
        out = self.view.up(self.view.down(self.dropout(x), self.lora_A.weight) * self.scale, self.lora_B.weight)
        if self.nnz:
            out = out + self.view.dense(x, self.sparse_dense())
        return out

    def delta_weight(self) -> Tensor:
        return self.scale * (self.lora_B.weight @ self.lora_A.weight) + self.sparse_dense()

    def lowrank(self):
        return None  # s·BA + S has no low-rank form (S is full-rank in general)

    def stats(self) -> dict[str, float]:
        return {"sparse_nnz": float(self.nnz), "sparse_abs_mean": float(self.sparse_values.detach().abs().mean())
                if self.nnz else 0.0}
