"""MHR: Multi-Head adapter Routing (Caccia et al. 2023, arXiv:2211.03831) — Polytropon with ``n_splits > 1``.

Each module holds an inventory of ``n_skills`` LoRAs, split along d_in (A) and d_out (B) into ``n_splits`` heads:
``poly_lora_A`` (n_splits, n_skills, d_in/h, r), ``poly_lora_B`` (n_splits, n_skills, r, d_out/h) and routing
logits ``poly_router.module_logits`` (n_tasks, h·n_skills) — PEFT ``PolyConfig`` layout and names, so the tensors
are PEFT's. Per sample task t (``task_ids`` from the batch context, task 0 when absent): training
``w = RelaxedBernoulli(T=1, logits_t).rsample()`` (written as ``sigmoid(logits + log u − log(1−u))``), eval
``w = sigmoid(logits_t)``; ``w ← w / (Σ_skills w + 1e-12)`` per split. ``A_t = Σ_k w_{q,k} A_{q,k}``
(``einsum bqs,qsdr->bqdr``), likewise B; ``h = W0 x + x A_t B_t / r``. Init as PEFT: A kaiming (per (r, d) slice),
B = 0, logits U(−1e-3, 1e-3).

Training (the authors' code): the routing logits are a separate optimiser group with lr 0.1 and no weight decay
(the adapters 1e-3 in the paper's runs), declared as ``role_optim`` for role ``router``; override with
``optim.role_optim: {router: {lr: ..., weight_decay: ...}}``. At the adapters' rate the logits barely move from
their U(−1e-3, 1e-3) init, the routing stays near uniform and MHR degenerates toward MHR-μ.

Modes (recipes): ``mode="z"`` (MHR-z) trains only the routing logits; ``mode="mu"`` (MHR-μ) discards routing and
uses the uniform average of the skills (``w = 1/n_skills``) with the router frozen. Parity with PEFT Poly is tested
in tests/methods/test_mhr.py. No PeftSpec: PEFT's Poly refuses a forward without ``task_ids`` and 2-D inputs,
which the registry-wide round-trip test needs (see the report); files are lorakit-format.
"""
from __future__ import annotations

from typing import ClassVar, Literal

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..core import Adapter, register
from ..errors import ConfigError


class _Router(nn.Module):
    @classmethod
    def check_context(cls, cfg, values: dict) -> None:
        cls._check_ids(values, "task_ids", cfg.n_tasks, "one task per row, n_tasks=" + str(cfg.n_tasks))

    def __init__(self, n_tasks: int, width: int):
        super().__init__()
        self.module_logits = nn.Parameter(torch.empty(n_tasks, width))


@register("mhr", family="mixture of LoRA experts", paper="Caccia et al. 2023, Multi-Head Adapter Routing for "
          "Cross-Task Generalization (MHR), arXiv:2211.03831")
class MHR(Adapter):
    __doc__ = __doc__
    mergeable = False
    layers = ("linear",)
    roles = {"poly_lora_A": "A", "poly_lora_B": "B", "poly_router.module_logits": "router"}
    # the authors' optimiser (mttl, Caccia et al.): routing logits in their own group, lr 0.1, no weight decay
    role_optim = {"router": {"lr": 0.1, "weight_decay": 0.0}}
    example = {"r": 2, "n_tasks": 2, "n_skills": 3, "n_splits": 2}

    @classmethod
    def context_keys(cls, cfg) -> tuple[str, ...]:
        return ("task_ids",)

    @dataclass
    class Config:
        r: int = 8
        n_tasks: int = 1
        n_skills: int = 4
        n_splits: int = 4  # 1 = Polytropon
        mode: Literal["mhr", "z", "mu"] = "mhr"  # "mhr" | "z" (train routing only) | "mu" (uniform skill average, no routing)
        positive: ClassVar = ("r", "n_tasks", "n_skills", "n_splits")

    @classmethod
    def check_layer(cls, cfg, view) -> str | None:
        if view.d_in % cfg.n_splits or view.d_out % cfg.n_splits:
            return f"n_splits={cfg.n_splits} must divide d_in={view.d_in} and d_out={view.d_out}"
        return super().check_layer(cfg, view)

    def __init__(self, base, cfg: Config, view=None):
        super().__init__(base, cfg, view)
        v, h = self.view, cfg.n_splits
        if v.d_in % h or v.d_out % h or cfg.mode not in ("mhr", "z", "mu"):
            raise ConfigError(f"MHR: n_splits={h} must divide d_in={v.d_in} and d_out={v.d_out}; mode in mhr|z|mu")
        self.poly_lora_A = nn.Parameter(torch.empty(h, cfg.n_skills, v.d_in // h, cfg.r))
        self.poly_lora_B = nn.Parameter(torch.empty(h, cfg.n_skills, cfg.r, v.d_out // h))
        self.poly_router = _Router(cfg.n_tasks, h * cfg.n_skills)
        self.frozen = {"z": ("poly_lora_A", "poly_lora_B"), "mu": ("poly_router.module_logits",)}.get(cfg.mode, ())

    def reset_parameters(self) -> None:
        h, S, d, r = self.poly_lora_A.shape
        for q in range(h):
            for s in range(S):
                nn.init.kaiming_uniform_(self.poly_lora_A.data[q, s].T, a=math.sqrt(5))
        nn.init.zeros_(self.poly_lora_B)
        nn.init.uniform_(self.poly_router.module_logits, -1e-3, 1e-3)

    def weights(self, x: Tensor) -> Tensor:
        c = self.cfg
        t = None if self.ctx is None else self.ctx.get("task_ids")
        t = torch.zeros(x.shape[0], dtype=torch.long, device=x.device) if t is None else t.to(x.device)
        logits = self.poly_router.module_logits[t].view(-1, c.n_splits, c.n_skills)
        if c.mode == "mu":
            return torch.full_like(logits, 1.0 / c.n_skills)
        if self.training:
            u = torch.rand_like(logits).clamp(1e-6, 1 - 1e-6)
            w = torch.sigmoid(logits + torch.log(u) - torch.log1p(-u))
        else:
            w = torch.sigmoid(logits)
        return w / (w.sum(-1, keepdim=True) + 1e-12)

    def delta(self, x: Tensor) -> Tensor:
        x = self.cast_in(x)
        w = self.weights(x).to(x.dtype)
        bs, r = w.shape[0], self.cfg.r
        A = torch.einsum("bqs,qsdr->bqdr", w, self.poly_lora_A).reshape(bs, self.view.d_in, r)
        B = torch.einsum("bqs,qsrd->bqrd", w, self.poly_lora_B).transpose(1, 2).reshape(bs, r, self.view.d_out)
        xb = x.reshape(bs, -1, x.shape[-1])
        return (xb.bmm(A).bmm(B) / r).reshape(*x.shape[:-1], -1)
