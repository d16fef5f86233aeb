"""AdaLink: non-intrusive adaptation on the input embeddings (Wang et al. 2023, "Non-Intrusive Adaptation: Input-
Centric Parameter-efficient Fine-Tuning for Versatile Multimodal Modeling", arXiv:2310.12100).

A low-rank residual adapter between the embedding table and the first block; the transformer is untouched:
``e' = e + W_up φ(W_down e)`` with ``e = E[ids]`` (…, d), ``W_down`` (r, d), ``W_up`` (d, r).
Trainable: W_down, W_up. Init ``W_down`` kaiming-uniform, ``W_up = 0`` (output equals the base at init).

Merge (linear φ only): the adapter folds into the table, ``E' = E (I + W_downᵀ W_upᵀ)``; in lorakit's matrix view
(W = Eᵀ, (d, vocab)) ``ΔW = W_up W_down W``.

Decisions: no public implementation exists; the paper does not say whether there is a nonlinearity, so φ is the
identity by default (mergeable) and ``activation: relu|gelu`` is offered (then merging raises MergeError). One
adapter per embedding module (per modality: attach it to each modality's embedding); no scale factor (the rank
and the zero-init up projection set the step size). Layer kind: ``nn.Embedding`` only (``targets`` = the embedding,
e.g. ``embed_tokens``).
"""
from __future__ import annotations

from typing import ClassVar, Literal

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..core import Adapter, Factor, LowRank, register
from ..errors import ConfigError, MergeError

_ACT = {"none": lambda h: h, "relu": F.relu, "gelu": F.gelu}


@register("adalink", family="input-centric", paper="Wang et al. 2023, AdaLink, arXiv:2310.12100")
class AdaLink(Adapter):
    __doc__ = __doc__

    @dataclass
    class Config:
        r: int = 4
        activation: Literal["none", "relu", "gelu"] = "none"

    roles = {"adalink_down.weight": "A", "adalink_up.weight": "B"}
    layers = ("embedding",)

    def __init__(self, base: nn.Module, cfg: Config, view=None):
        super().__init__(base, cfg, view)
        if cfg.activation not in _ACT:
            raise ConfigError(f"activation={cfg.activation!r}; valid: {', '.join(_ACT)}")
        if cfg.r <= 0:
            raise ConfigError(f"r must be positive, got {cfg.r}")
        d = self.view.d_out  # embedding dim
        self.adalink_down = Factor(cfg.r, d)
        self.adalink_up = Factor(d, cfg.r)
        self.act = _ACT[cfg.activation]

    def reset_parameters(self) -> None:
        nn.init.kaiming_uniform_(self.adalink_down.weight, a=math.sqrt(5))
        nn.init.zeros_(self.adalink_up.weight)

    def forward(self, x: Tensor, y: Tensor) -> Tensor:  # x: ids, y: embeddings (…, d)
        e = self.cast_in(y)
        return y + F.linear(self.act(F.linear(e, self.adalink_down.weight)), self.adalink_up.weight).to(y.dtype)

    def _check(self) -> None:
        if self.cfg.activation != "none":
            raise MergeError(f"AdaLink with activation={self.cfg.activation!r} is nonlinear and cannot be merged")

    def _delta_of(self, W: Tensor) -> Tensor:
        self._check()
        return self.adalink_up.weight @ (self.adalink_down.weight @ W.to(self.adalink_up.weight.dtype))

    def delta_weight(self) -> Tensor:
        return self._delta_of(self.base_matrix().float())

    def merge(self, weight: Tensor) -> Tensor:
        return weight + self._delta_of(weight).to(weight.dtype)

    def lowrank(self) -> LowRank | None:
        if self.cfg.activation != "none":
            return None
        return LowRank(self.adalink_down.weight @ self.base_matrix().to(self.adalink_down.weight.dtype),
                       self.adalink_up.weight, 1.0)
