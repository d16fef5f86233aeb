"""LoRA and rsLoRA.

LoRA (Hu et al. 2021, arXiv:2106.09685): ``h = W0 x + s · B A dropout(x)``, ``s = α/r``.
rsLoRA (Kalajdzievski 2023, arXiv:2312.03732): the same with ``s = α/√r``.

Shapes: ``A`` (r, d_in), ``B`` (d_out, r). Trainable: A, B (and ``lora_B.bias`` with ``lora_bias``). Init as
loralib/PEFT: ``A ~ kaiming_uniform(a=√5)``, ``B = 0`` (so ΔW = 0); embeddings swap the roles (A = 0, B ~ N(0,1))
as PEFT does; ``init="gaussian"`` draws A ~ N(0, 1/r). Merge: ``W + s·BA``.
"""
from __future__ import annotations

from typing import ClassVar, Literal

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..core import Adapter, Factor, LowRank, LowRankConfig, PeftSpec, register, scale_of
from ..errors import ConfigError


_LORA_FIELDS = {"r": "r", "alpha": "lora_alpha", "dropout": "lora_dropout", "rslora": "use_rslora"}
_LORA_DEFAULTS = {"r": 8, "lora_alpha": 8, "lora_dropout": 0.0, "use_rslora": False}


def lora_spec(fixed: dict, load_match: dict, **extra_fields: str) -> PeftSpec:
    """PEFT's LoraConfig mapping shared by every method stored as peft_type LORA (LoRA, DoRA, PiSSA, ...)."""
    fields = {**_LORA_FIELDS, **extra_fields}
    defaults = {**_LORA_DEFAULTS, **({"lora_bias": False} if "lora_bias" in extra_fields else {})}
    return PeftSpec("LORA", fields, fixed=fixed, load_match=load_match, defaults=defaults)


@register("lora", family="core low-rank", paper="Hu et al. 2021, LoRA, arXiv:2106.09685",
          peft=lora_spec({"use_dora": False, "init_lora_weights": True},
                         {"use_dora": lambda v: not v,
                          "init_lora_weights": lambda v: v in (None, True, False, "gaussian")},
                         lora_bias="lora_bias"),
          fast_serve="lowrank")
class LoRA(Adapter):
    __doc__ = __doc__

    @dataclass
    class Config(LowRankConfig):
        lora_bias: bool = False
        init: Literal["default", "gaussian"] = "default"  # "default" (kaiming A, zero B) | "gaussian"

    roles = {"lora_A.weight": "A", "lora_B.weight": "B"}
    layers = ("linear", "conv1d", "embedding", "conv2d")
    peft_keys = {"embedding": {"lora_A.weight": "lora_embedding_A", "lora_B.weight": "lora_embedding_B"}}

    def __init__(self, base: nn.Module, cfg: Config, view=None):
        super().__init__(base, cfg, view)
        if cfg.r <= 0:
            raise ConfigError(f"r must be positive, got {cfg.r}")
        v = self.view
        conv = v.kind == "conv2d"
        self.lora_A = Factor(cfg.r, *v.in_shape) if conv else Factor(cfg.r, v.d_in)
        self.lora_B = Factor(v.d_out, cfg.r, 1, 1) if conv else Factor(v.d_out, cfg.r)
        if cfg.lora_bias:
            self.lora_B.bias = nn.Parameter(torch.zeros(v.d_out))
        self.dropout = nn.Dropout(cfg.dropout) if cfg.dropout > 0 else nn.Identity()
        self.scale = scale_of(cfg.alpha, cfg.r, cfg.rslora)

    @property
    def A(self) -> Tensor:  # (r, d_in)
        return self.lora_A.weight.flatten(1)

    @property
    def B(self) -> Tensor:  # (d_out, r)
        return self.lora_B.weight.flatten(1)

    def reset_parameters(self) -> None:
        if self.view.kind == "embedding":
            nn.init.zeros_(self.lora_A.weight)
            nn.init.normal_(self.lora_B.weight)
        else:
            if self.cfg.init == "gaussian":
                nn.init.normal_(self.lora_A.weight, std=1 / self.cfg.r)
            else:
                nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
            nn.init.zeros_(self.lora_B.weight)
        if self.cfg.lora_bias:
            nn.init.zeros_(self.lora_B.bias)

    def delta(self, x: Tensor) -> Tensor:
        h = self.view.down(self.dropout(self.cast_in(x)), self.A)
        out = self.view.up(h * self.scale, self.B)
        if self.cfg.lora_bias:
            b = self.lora_B.bias
            out = out + (b.view(1, -1, 1, 1) if self.view.kind == "conv2d" else b)
        return out

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        if self.view.kind in ("linear", "conv1d") and not self.cfg.lora_bias and y.dtype == self.lora_A.weight.dtype:
            # fused: one GEMM with accumulate into y (no extra pass over the (…, d_out) output)
            h = nn.functional.linear(self.dropout(x), self.lora_A.weight)
            y2 = y.reshape(-1, y.shape[-1])
            if not torch.is_grad_enabled() and y2.data_ptr() == y.data_ptr() and y.is_contiguous():
                # inference: accumulate into the base output in place (no new (…, d_out) tensor)
                return y2.addmm_(h.reshape(-1, h.shape[-1]), self.lora_B.weight.t(), alpha=self.scale).view_as(y)
            return torch.addmm(y2, h.reshape(-1, h.shape[-1]), self.lora_B.weight.t(), alpha=self.scale).view_as(y)
        return y + self.delta(x).to(y.dtype)

    def delta_weight(self) -> Tensor:
        if self.cfg.lora_bias:
            from ..errors import MergeError

            raise MergeError("a LoRA with lora_bias=True adds a bias and cannot be merged into the weight alone")
        return (self.B @ self.A) * self.scale

    def lowrank(self) -> LowRank:
        return LowRank(self.A, self.B, self.scale)
