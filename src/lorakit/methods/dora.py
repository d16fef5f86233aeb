"""DoRA: weight-decomposed low-rank adaptation (Liu et al. 2024, arXiv:2402.09353).

``W' = m ⊙ (W0 + s·BA) / ‖W0 + s·BA‖_row`` with ``m ∈ R^{d_out}`` (PEFT key ``lora_magnitude_vector``), A (r, d_in),
B (d_out, r). Trainable: m, A, B. Init: LoRA's, and ``m = ‖W0‖_row``, so W' = W0.

Forward (bias ``b`` added unscaled, as PEFT and the paper's code do), with ``g = m / ‖W0 + s·BA‖_row``::

    y' = y + (g − 1) ⊙ (y − b) + g ⊙ s·B(A x)

The norm is treated as a constant in backward (paper §4.3): it is computed under ``no_grad``. Unlike PEFT, which
materialises ``W0 + s·BA`` (a d_out×d_in temporary) every step, lorakit expands the squared row norm::

    ‖W0 + s·BA‖²_row = ‖W0‖²_row + 2s·rowsum(B ⊙ (W0 Aᵀ)) + s²·rowsum((B AAᵀ) ⊙ B)

which costs one (d_out×d_in×r) product and no large temporary (‖W0‖²_row is cached: W0 is frozen). In eval mode
``g`` itself is cached and reused until the parameters change (``train()``, loading or merging clear it).
Merge: ``W' = g ⊙ (W0 + s·BA)``.
"""
from __future__ import annotations

from typing import Literal

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..core import LowRank, LowRankConfig, register
from .lora import LoRA, lora_spec


@register("dora", family="core low-rank", paper="Liu et al. 2024, DoRA, arXiv:2402.09353",
          peft=lora_spec({"use_dora": True, "init_lora_weights": True}, {"use_dora": True}),
          fast_serve="lowrank+magnitude")
class DoRA(LoRA):
    __doc__ = __doc__

    @dataclass
    class Config(LowRankConfig):
        init: Literal["default", "gaussian"] = "default"

    roles = {"lora_A.weight": "A", "lora_B.weight": "B", "lora_magnitude_vector": "magnitude"}
    layers = ("linear", "conv1d", "conv2d")

    def __init__(self, base: nn.Module, cfg: Config, view=None):
        super().__init__(base, cfg, view)
        self.lora_magnitude_vector = nn.Parameter(torch.ones(self.view.d_out))
        self._w_sq: Tensor | None = None  # ‖W0‖²_row (W0 frozen)
        self._w_key: tuple = ()
        self._g: Tensor | None = None  # eval-mode cache of m / ‖W0 + s·BA‖
        self._g_key: tuple = ()

    @torch.no_grad()
    def init_from(self, weight: Tensor, stats=None) -> None:
        self.clear_cache()
        norm = (weight + self.delta_weight().to(weight.dtype)).norm(dim=1)
        self.lora_magnitude_vector.copy_(norm.to(self.lora_magnitude_vector.dtype))
        return None

    def clear_cache(self) -> None:
        self._w_sq = None
        self._g = None

    def _key(self, *tensors: Tensor) -> tuple:
        """What a cache depends on: each tensor's storage and its version counter (bumped by every in-place
        write, ``load_state_dict`` and ``copy_`` under no_grad included), so edits made behind the adapter's back
        invalidate the cache without a ``clear_cache()`` call."""
        return tuple((t.data_ptr(), t._version, t.device) for t in tensors)

    def train(self, mode: bool = True):
        self._g = None
        return super().train(mode)

    @torch.no_grad()
    def weight_norm(self) -> Tensor:
        """‖W0 + s·BA‖_row, without forming the d_out×d_in sum."""
        W = self.base_matrix()
        A, B = self.A, self.B
        wkey = self._key(self.base.weight)
        if self._w_sq is None or self._w_key != wkey:
            self._w_sq, self._w_key = W.float().pow(2).sum(1), wkey
        Af, Bf = A.float(), B.float()
        WAt = W.to(Af.dtype) @ Af.t()  # (d_out, r)
        s = self.scale
        sq = self._w_sq + 2 * s * (Bf * WAt).sum(1) + (s * s) * ((Bf @ (Af @ Af.t())) * Bf).sum(1)
        return sq.clamp_min(0).sqrt()

    def _gain(self) -> Tensor:
        key = self._key(self.A, self.B, self.lora_magnitude_vector, self.base.weight) if not self.training else ()
        if not self.training and self._g is not None and self._g_key == key:
            return self._g
        g = self.lora_magnitude_vector / self.weight_norm().to(self.lora_magnitude_vector.dtype)
        if not self.training and not torch.is_grad_enabled():
            self._g, self._g_key = g.detach(), key
        return g

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        g = self._gain()
        b = self.base_bias()
        if self.view.kind in ("linear", "conv1d") and y.dtype == self.A.dtype:
            # out = g·(y0 + s·BA·drop(x)) + b = g·t + (1-g)·b with t = y + s·BA·drop(x): one fused GEMM into y
            # (addmm) and one fused scale pass, instead of four elementwise passes over the (…, d_out) output
            h = nn.functional.linear(self.dropout(self.cast_in(x)), self.A).reshape(-1, self.A.shape[0])
            y2 = y.reshape(-1, y.shape[-1])
            g = g.to(y.dtype)
            if not torch.is_grad_enabled() and y.is_contiguous():  # inference: everything in place in y
                t = y2.addmm_(h, self.B.t(), alpha=self.scale).mul_(g)
                return (t if b is None else t.add_(b * (1 - g))).view_as(y)
            t = torch.addmm(y2, h, self.B.t(), alpha=self.scale)
            return (t * g if b is None else torch.addcmul(b * (1 - g), t, g)).view_as(y)
        y0 = y if b is None else y - (b.view(1, -1, 1, 1) if self.view.kind == "conv2d" else b)
        lora = self.view.up(self.view.down(self.dropout(self.cast_in(x)), self.A) * self.scale, self.B)
        return y + (self.view.out_scale(y0, (g - 1).to(y.dtype)) + self.view.out_scale(lora, g).to(y.dtype))

    def to_file(self, state):  # PEFT stores the conv magnitude as (1, d_out, 1, 1)
        state = super().to_file(state)
        if self.view.kind == "conv2d":
            state["lora_magnitude_vector"] = state["lora_magnitude_vector"].reshape(1, -1, 1, 1)
        return state

    def from_file(self, state):
        state = super().from_file(state)
        state["lora_magnitude_vector"] = state["lora_magnitude_vector"].reshape(-1)
        return state

    def merge(self, weight: Tensor) -> Tensor:
        V = weight + self.delta_weight().to(weight.dtype)
        return V * (self.lora_magnitude_vector.to(V.dtype) / V.norm(dim=1)).unsqueeze(1)

    def lowrank(self) -> LowRank:
        return LowRank(self.A, self.B, self.scale, magnitude=self.lora_magnitude_vector)
