"""S2-LoRA: sparsely shared LoRA (Liu et al. 2023, "Sparsely Shared LoRA on Whisper for Child Speech Recognition",
arXiv:2309.11756).

``ΔW_ℓ = s · B · diag(λ_ℓ) · A`` with ONE trainable pair ``A`` (r, d_in), ``B`` (d_out, r) shared by every adapted
matrix of the same shape (a *shape group*: e.g. all d×d attention projections of a Llama share one pair, the
d→d_kv projections another), and a per-matrix rank-coefficient vector ``λ_ℓ`` (r,) made sparse by an L1 penalty
``l1 · Σ_ℓ ‖λ_ℓ‖₁`` added to the loss. Trainable parameters: ``r·(d_in + d_out)`` per shape group plus ``r`` per
matrix. ``s = α/r``.

Decisions (the paper gives the idea, not code): the groups are formed per attach by exact (d_out, d_in) shape
(sharing needs equal shapes); the first adapter of a group (model order) owns the pair (its parameters, its file
keys ``s2_A.weight`` / ``s2_B.weight``), the others reference it, so the pair is trained, stored and loaded once.
Init as AdaLoRA, which inspired the method: ``λ = 0`` (ΔW = 0: the base layer) and ``A, B ~ N(0, 0.02)`` (with B = 0
too no gradient would reach either). The L1 term is summed over the matrices (``l1`` = 0 turns it off).
Mergeable: ``W_ℓ + s·B·diag(λ_ℓ)·A`` (each matrix its own λ). The low-rank form ``(diag(λ_ℓ)A, B, s)`` lets the
server bank and the merge functions treat it as a LoRA.

The paper adapts Whisper (an encoder-decoder ASR model); no speech model ships offline here, so lorakit tests the
mechanism on the offline text models (SmolLM2's attention and MLP projections, tiny models in the tests) and says so
in docs/methods.md.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..core import Adapter, Factor, LowRank, LowRankConfig, register, scale_of
from ..errors import ConfigError


@register("s2lora", family="shared", paper="Liu et al. 2023, S2-LoRA, arXiv:2309.11756")
class S2LoRA(Adapter):
    __doc__ = __doc__

    @dataclass
    class Config(LowRankConfig):
        l1: float = 1e-3  # weight of the L1 penalty on the rank coefficients λ_ℓ

        def validate(self) -> None:  # at config resolution, before a model loads
            if self.l1 < 0:
                raise ConfigError(f"s2lora: l1={self.l1} must be >= 0 (the weight of the L1 penalty on λ)")

    roles = {"s2_A.weight": "A", "s2_B.weight": "B", "s2_lambda": "singular_values"}
    layers = ("linear", "conv1d")
    example = {"r": 3, "l1": 0.01}

    def __init__(self, base: nn.Module, cfg: Config, view=None):
        super().__init__(base, cfg, view)
        v = self.view
        # every adapter builds its pair; `share` keeps the group owner's and drops the others' (before init)
        self.s2_A = Factor(cfg.r, v.d_in)
        self.s2_B = Factor(v.d_out, cfg.r)
        self.s2_lambda = nn.Parameter(torch.zeros(cfg.r))
        self.dropout = nn.Dropout(cfg.dropout) if cfg.dropout > 0 else nn.Identity()
        self.scale = scale_of(cfg.alpha, cfg.r, cfg.rslora)

    @classmethod
    def share(cls, att) -> None:
        owners: dict[tuple, S2LoRA] = {}
        for a in att.adapters:
            if not isinstance(a, cls):
                continue
            key = (a.view.d_out, a.view.d_in, a.cfg.r)
            own = owners.setdefault(key, a)
            if own is not a:
                del a.s2_A, a.s2_B  # the group's pair lives in its owner (one parameter, one file entry)
                a.__dict__["_owner"] = own

    def _pair(self) -> tuple[Tensor, Tensor]:
        own = self.__dict__.get("_owner", self)
        return own.s2_A.weight, own.s2_B.weight

    @torch.no_grad()
    def reset_parameters(self) -> None:
        nn.init.zeros_(self.s2_lambda)
        if "s2_A" in self._modules:
            nn.init.normal_(self.s2_A.weight, std=0.02)
            nn.init.normal_(self.s2_B.weight, std=0.02)

    def delta(self, x: Tensor) -> Tensor:
        A, B = self._pair()
        h = self.view.down(self.dropout(self.cast_in(x)), A)
        return self.view.up(self.view.rank_scale(h, self.s2_lambda * self.scale), B)

    def delta_weight(self) -> Tensor:
        A, B = self._pair()
        return self.scale * (B * self.s2_lambda) @ A

    def lowrank(self) -> LowRank:
        A, B = self._pair()
        return LowRank(self.s2_lambda[:, None] * A, B, self.scale)

    def extra_loss(self) -> Tensor | None:
        return self.cfg.l1 * self.s2_lambda.abs().sum() if self.cfg.l1 > 0 else None

    def stats(self) -> dict[str, float]:
        lam = self.s2_lambda.detach()
        return {"lambda_nonzero": float((lam.abs() > 1e-6).sum()), "lambda_l1": float(lam.abs().sum())}
