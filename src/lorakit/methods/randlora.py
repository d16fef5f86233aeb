"""RandLoRA: full-rank parameter-efficient fine-tuning of large models (Albert et al. 2025, arXiv:2502.00987).

A full-rank update built from ``n = ⌈min(d_out, d_in)/r⌉`` frozen random rank-r bases with trainable diagonal
scalings. With ``m = min(d_out, d_in)``, ``M = max(d_out, d_in)`` and shared frozen bases ``A`` (r, 1, m_max)
(one "unique" base, broadcast over the n bases) and ``B`` (M_max, n_max, r):

``Â = (λ[:, :, None] · A[:, :, :m] · γ[None]).flatten(0, 1)`` (r·n, m), ``B̂ = B[:M, :n].flatten(1)`` (M, n·r),
``ΔW = s · B̂ Â`` (M, m), transposed to (d_out, d_in) when d_out < d_in; ``s = α/r``.

Trainable per layer: ``λ`` (r, n) (init 0, so ΔW = 0) and ``γ`` (n, m) (init ``1/max(n, m)``). Everything else is
frozen and shared by all layers (one storage, :mod:`lorakit.methods._shared`).

PEFT parity (``RandLoraModel``, peft ≥ 0.16, read and re-implemented): ``torch.Generator("cpu")`` seeded with
``projection_prng_key``; dense bases are bf16 kaiming-uniform(a=√5) draws, ``A`` first then n_max slices of ``B``
of shape (M_max, 1, r), each tensor divided by its own std (in bf16); ``sparse``/``very_sparse`` draw uniforms and
keep ±1 entries with probability 1/s at each sign (s = 3, or √m_max), then divide by the std. Note PEFT pairs
``Â``'s (r, n)-ordered rows with ``B̂``'s (n, r)-ordered columns; we keep that pairing so files are exchangeable.
Files: ``randlora_lambda``/``randlora_gamma`` per layer; with ``save_projection`` also ``base_model.randlora_A/B``.
PEFT additionally writes copies of the bases under every layer; they are accepted (and ignored) on load.

Decisions: PEFT uses fp16 bases on machines without bf16; we always use bf16 (the values are then exact in the
fp32 adapter buffers). The option is ``projection_seed`` (the attach-level ``seed`` is the global RNG).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..core import Adapter, PeftSpec, register
from ..errors import ConfigError
from ._shared import attach_shared, kaiming_uniform_gen

KEYS = {"A": "base_model.randlora_A", "B": "base_model.randlora_B"}


def n_bases(m: int, r: int) -> int:
    return math.ceil(m / r)


def randlora_bases(seed: int, r: int, d_in: int, d_out: int, sparsity: float | None) -> dict[str, Tensor]:
    M, m = max(d_in, d_out), min(d_in, d_out)
    n = n_bases(m, r)
    g = torch.Generator(device="cpu").manual_seed(seed)
    if sparsity is None:
        A = kaiming_uniform_gen((r, 1, m), g, torch.bfloat16, a=math.sqrt(5))
        B = torch.cat([kaiming_uniform_gen((M, 1, r), g, torch.bfloat16, a=math.sqrt(5)) for _ in range(n)], 1)
    else:
        def sparse(u: Tensor) -> Tensor:
            p = 1 / (2 * sparsity)
            return (u > 1 - p).float() - (u < p).float()
        A = sparse(torch.rand((r, 1, m), generator=g))
        B = sparse(torch.rand((M, n, r), generator=g))
    return {"A": A / A.std(), "B": B / B.std()}


@register("randlora", family="random-basis", paper="Albert et al. 2025, RandLoRA, arXiv:2502.00987",
          peft=PeftSpec("RANDLORA", {"r": "r", "alpha": "randlora_alpha", "dropout": "randlora_dropout",
                                     "projection_seed": "projection_prng_key", "save_projection": "save_projection",
                                     "sparse": "sparse", "very_sparse": "very_sparse"},
                        fixed={"init_weights": True, "fan_in_fan_out": False},
                        defaults={"r": 32, "randlora_alpha": 640, "randlora_dropout": 0.0, "projection_prng_key": 0,
                                  "save_projection": True, "sparse": False, "very_sparse": False}))
class RandLoRA(Adapter):
    __doc__ = __doc__
    roles = {"randlora_lambda": "scale", "randlora_gamma": "scale"}

    @dataclass
    class Config:
        r: int = 32
        alpha: float = 640.0
        dropout: float = 0.0
        projection_seed: int = 0
        save_projection: bool = True
        sparse: bool = False
        very_sparse: bool = False

    layers = ("linear", "conv1d")
    example = {"r": 4, "alpha": 8.0}

    def __init__(self, base: nn.Module, cfg: Config, view=None):
        super().__init__(base, cfg, view)
        if cfg.r <= 0:
            raise ConfigError(f"r must be positive, got {cfg.r}")
        v = self.view
        self.m, self.M = min(v.d_in, v.d_out), max(v.d_in, v.d_out)
        self.n = n_bases(self.m, cfg.r)
        self.randlora_lambda = nn.Parameter(torch.empty(cfg.r, self.n))
        self.randlora_gamma = nn.Parameter(torch.empty(self.n, self.m))
        self.dropout = nn.Dropout(cfg.dropout) if cfg.dropout > 0 else nn.Identity()
        self.scale = cfg.alpha / cfg.r

    @classmethod
    def share(cls, att) -> None:
        adapters = att.adapters
        c = adapters[0].cfg
        if len({(a.cfg.r, a.cfg.projection_seed, a.cfg.sparse, a.cfg.very_sparse) for a in adapters}) > 1:
            raise ConfigError("RandLoRA shares one set of bases: r, projection_seed and sparsity cannot vary per module")
        d_in, d_out = max(a.view.d_in for a in adapters), max(a.view.d_out for a in adapters)
        M, m = max(d_in, d_out), min(d_in, d_out)
        sp = math.sqrt(m) if c.very_sparse else (3 if c.sparse else None)
        attach_shared(adapters, {"A": (c.r, 1, m), "B": (M, n_bases(m, c.r), c.r)},
                      lambda: randlora_bases(c.projection_seed, c.r, d_in, d_out, sp))

    @classmethod
    def shared_to_file(cls, att) -> dict[str, Tensor]:
        adapters = att.adapters
        if not adapters[0].cfg.save_projection:
            return {}
        return {KEYS["A"]: adapters[0].bases.A, KEYS["B"]: adapters[0].bases.B}

    @classmethod
    def shared_from_file(cls, att, tensors: dict[str, Tensor]) -> set[str]:
        adapters = att.adapters
        found = {k: tensors[f] for k, f in KEYS.items() if f in tensors}
        if found:
            adapters[0].bases.load(found)
        copies = {k for k in tensors if k.endswith((".randlora_A", ".randlora_B"))}  # PEFT's per-layer copies
        return {KEYS[k] for k in found} | copies

    def reset_parameters(self) -> None:
        with torch.no_grad():
            self.randlora_lambda.zero_()
            self.randlora_gamma.fill_(1.0 / max(self.n, self.m))
        if "bases" in self._modules:
            self.bases.fill()

    def factors(self) -> tuple[Tensor, Tensor]:
        """(Â (r·n, m), B̂ (M, n·r)) in the adapter dtype."""
        dt = self.randlora_lambda.dtype
        A = self.bases.A[:, :, : self.m].to(dt)
        Ah = (self.randlora_lambda[:, :, None] * A * self.randlora_gamma[None]).flatten(0, 1)
        return Ah, self.bases.B[: self.M, : self.n].to(dt).flatten(1)

    def delta(self, x: Tensor) -> Tensor:
        Ah, Bh = self.factors()
        x = self.dropout(self.cast_in(x))
        if self.m == self.view.d_in:
            return self.view.up(self.view.down(x, Ah), Bh) * self.scale
        return self.view.up(self.view.down(x, Bh.t()), Ah.t()) * self.scale

    def delta_weight(self) -> Tensor:
        Ah, Bh = self.factors()
        dw = Bh @ Ah  # (M, m)
        return (dw if self.m == self.view.d_in else dw.t()) * self.scale
