"""Shared pieces of the three-factor family ``ΔW = s · B N A`` (LoRA-XS, LoRA-SB, SLoRA/NLoRA/IntTune, LaMDA).

Shapes: ``A`` (r, d_in) file key ``lora_A.weight``, ``N`` (r, r) ``lora_N.weight`` (the "core"/"latent" matrix),
``B`` (d_out, r) ``lora_B.weight``. Each factor is either a trainable :class:`Factor` or a :class:`FrozenFactor`
(a buffer, so it can never train and never reaches an optimiser); the file keys are the same either way.
Forward: ``y + s · B(N(A x))`` written with the LayerView primitives, so every layer kind works.
"""
from __future__ import annotations

from typing import ClassVar

import torch
from torch import Tensor, nn

from ..core import Adapter, Factor, LowRank
from ..errors import ConfigError

__all__ = ["FrozenFactor", "ThreeFactor", "canonical_signs"]


class FrozenFactor(nn.Module):
    """A frozen factor: buffer ``weight`` (file key ``<name>.weight``); ``persistent=False`` keeps it out of files
    (then the method must rebuild it in ``on_load``)."""

    def __init__(self, *shape: int, persistent: bool = True):
        super().__init__()
        self.register_buffer("weight", torch.empty(*shape), persistent=persistent)

    def extra_repr(self) -> str:
        return "x".join(str(s) for s in self.weight.shape) + " (frozen)"


def canonical_signs(U: Tensor, V: Tensor) -> tuple[Tensor, Tensor]:
    """Fix the sign ambiguity of singular-vector pairs: flip (u_i, v_i) together so that the largest-|·| entry of
    each u_i is positive. Makes bases rebuilt from the same weight identical across SVD backends."""
    idx = U.abs().argmax(0)
    s = torch.sign(U[idx, torch.arange(U.shape[1], device=U.device)])
    s = torch.where(s == 0, torch.ones_like(s), s)
    return U * s, V * s


class ThreeFactor(Adapter):
    """Base class: subclasses set which factors train and implement ``reset_parameters``/``init_from``."""

    train_A: ClassVar[bool] = True
    train_N: ClassVar[bool] = True
    train_B: ClassVar[bool] = True
    roles = {"lora_A.weight": "A", "lora_N.weight": "core", "lora_B.weight": "B"}
    layers = ("linear", "conv1d", "embedding", "conv2d")

    def __init__(self, base: nn.Module, cfg, view=None, *, scale: float = 1.0, persistent: bool = True):
        super().__init__(base, cfg, view)
        r = cfg.r
        if r <= 0:
            raise ConfigError(f"r must be positive, got {r}")
        v = self.view

        def make(train: bool, *shape: int) -> nn.Module:
            return Factor(*shape) if train else FrozenFactor(*shape, persistent=persistent)

        self.lora_A = make(self.train_A, r, v.d_in)
        self.lora_N = make(self.train_N, r, r)
        self.lora_B = make(self.train_B, v.d_out, r)
        p = getattr(cfg, "dropout", 0.0)
        self.dropout = nn.Dropout(p) if p > 0 else nn.Identity()
        self.scale = scale

    @property
    def A(self) -> Tensor:
        return self.lora_A.weight

    @property
    def N(self) -> Tensor:
        return self.lora_N.weight

    @property
    def B(self) -> Tensor:
        return self.lora_B.weight

    @torch.no_grad()
    def set_factors(self, A: Tensor | None = None, N: Tensor | None = None, B: Tensor | None = None) -> None:
        for t, m in ((A, self.lora_A), (N, self.lora_N), (B, self.lora_B)):
            if t is not None:
                m.weight.copy_(t.to(m.weight.dtype))

    def delta(self, x: Tensor) -> Tensor:
        v = self.view
        h = v.rank_mix(v.down(self.dropout(self.cast_in(x)), self.A), self.N)
        return v.up(h * self.scale, self.B)

    def delta_weight(self) -> Tensor:
        return (self.B @ (self.N @ self.A)) * self.scale

    def lowrank(self) -> LowRank:
        """As a plain LoRA (for serving/export): ``A' = N A``, ``B' = B`` (computed, not the trained leaves)."""
        return LowRank(self.N @ self.A, self.B, self.scale)
