"""SoRA: sparse low-rank adaptation (Ding et al. 2023, arXiv:2311.11696; official code TsinghuaC3I/SoRA).

A LoRA of maximum rank ``r`` with a trainable gate ``g ∈ R^r`` between the factors::

    h = W0 x + s · B (g ⊙ A x)       A (r, d_in), B (d_out, r), g (r,), s = α/r

Trainable: A, B, g. Init (official): A Kaiming-uniform, B = 0, ``g ~ N(0, 1)``. Sparsity: after every optimiser
step the :class:`SoRAController` applies the proximal (soft-thresholding) step of the L1 norm to the gates,
``g ← sign(g)·max(|g| − ξ, 0)`` with ``ξ = sparse_lambda_2`` applied directly (as the official SparseAdamW, not
``η·ξ`` as the paper writes). ``l1`` adds the L1 penalty to the loss as the official ``SparseTrainerMixin
.compute_loss`` (``src/trainer.py``): ``l1 · Σ_{all gates of the attach} |g| / (total number of gates)``, ONE mean
over the gates of every module (``attach_loss``), not a sum of per-module means. The official runs both the L1 term
(``--sparse_lambda``, default 1e-3 in ``run_glue.py``'s ``SparseArguments``, always added under ``--train_sparse``)
and the proximal step, so ``l1`` defaults to 1e-3 here too (0 disables it).
``lambda_schedule`` ("linear" | "log_linear" | "exp_linear") raises ξ to ``max_lambda`` in ``lambda_num`` stages
over training (official sparsifying scheduler; one stage every ``total_steps/lambda_num`` steps).
After training :func:`lorakit.rank.prune_gates` gives the plain LoRA ``B' = s·B[:, g≠0] diag(g_{≠0})``,
``A' = A[g≠0]``; zero gates drop out exactly. Put gates in a parameter group without weight decay (role "gate").
"""
from __future__ import annotations

from typing import ClassVar, Literal

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from ..controllers import Controller
from ..core import LowRank, LowRankConfig, register
from ..errors import ConfigError
from .lora import LoRA


@register("sora", family="adaptive rank", paper="Ding et al. 2023, Sparse Low-rank Adaptation, arXiv:2311.11696")
class SoRA(LoRA):
    __doc__ = __doc__

    @dataclass
    class Config(LowRankConfig):
        rslora: bool = field(default=False, init=False)  # the paper's scale is α/r
        sparse_lambda_2: float = 3e-4  # ξ: proximal threshold applied after each optimiser step
        l1: float = 1e-3  # weight of l1·Σ|g|/#gates in the loss (official --sparse_lambda, default 1e-3)
        lambda_schedule: Literal["linear", "log_linear", "exp_linear"] | None = None  # None | "linear" | "log_linear" | "exp_linear"
        max_lambda: float = 1e-3
        lambda_num: int = 1

    roles = {"lora_A.weight": "A", "lora_B.weight": "B", "lora_gate": "gate"}
    masked_rank = True
    layers = ("linear", "conv1d", "embedding", "conv2d")

    def __init__(self, base, cfg: Config, view=None):
        super().__init__(base, cfg, view)
        if cfg.lambda_schedule not in (None, "linear", "log_linear", "exp_linear"):
            raise ConfigError(f"lambda_schedule={cfg.lambda_schedule!r}; valid: linear, log_linear, exp_linear")
        self.lora_gate = nn.Parameter(torch.empty(cfg.r))

    def reset_parameters(self) -> None:
        super().reset_parameters()
        nn.init.normal_(self.lora_gate)

    def delta(self, x: Tensor) -> Tensor:
        h = self.view.down(self.dropout(self.cast_in(x)), self.A)
        return self.view.up(self.view.rank_scale(h, self.lora_gate * self.scale), self.B)

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        return y + self.delta(x).to(y.dtype)

    def delta_weight(self) -> Tensor:
        return (self.B * self.lora_gate) @ self.A * self.scale

    def lowrank(self) -> LowRank:
        return LowRank(self.A, self.B * self.lora_gate, self.scale)

    def kept_lowrank(self) -> LowRank:
        keep = self.lora_gate != 0
        return LowRank(self.A[keep], self.B[:, keep] * self.lora_gate[keep], self.scale)

    def extra_loss(self) -> Tensor | None:
        """This module's share ``l1·Σ|g|`` of the numerator; :meth:`attach_loss` divides by the total gate count."""
        return self.cfg.l1 * self.lora_gate.abs().sum() if self.cfg.l1 > 0 else None

    @classmethod
    def attach_loss(cls, att) -> Tensor | None:
        """``Σ_m l1·Σ|g_m| / Σ_m #g_m`` over the modules with an L1 term (official: ``sparse_lambda * Σ|g| /
        p_total``, ``p_total`` the number of gate entries in the model)."""
        adapters = att.active_adapters
        pairs = [(a.extra_loss(), a.lora_gate.numel()) for a in adapters]
        pairs = [(loss, n) for loss, n in pairs if loss is not None]
        if not pairs:
            return None
        total = pairs[0][0]
        for loss, _ in pairs[1:]:
            total = total + loss
        return total / sum(n for _, n in pairs)

    def stats(self) -> dict[str, float]:
        return {"rank": float((self.lora_gate != 0).sum())}

    @torch.no_grad()
    def proximal(self, xi: float) -> None:
        g = self.lora_gate
        g.copy_(g.sign() * (g.abs() - xi).clamp_min(0))

    @classmethod
    def controller(cls, att):
        return SoRAController(att)


class SoRAController(Controller):
    """Soft-thresholds every SoRA gate of adapter ``name`` after each optimiser step (ξ per the schedule)."""

    def __init__(self, att):
        self.att = att
        mods = [(m.path, m.adapter) for m in att.members if isinstance(m.adapter, SoRA)]
        c = mods[0][1].cfg if mods else SoRA.Config()
        self.lambdas = _lambdas(c.sparse_lambda_2, c.max_lambda, c.lambda_num, c.lambda_schedule)
        self.every, self.idx = None, 0

    @property
    def xi(self) -> float:
        return self.lambdas[self.idx]

    def on_train_begin(self, model, optimizer, total_steps: int) -> None:
        self.every = max(1, total_steps // len(self.lambdas)) if len(self.lambdas) > 1 else None

    def step(self, step: int, model, optimizer) -> None:
        for _, a in ((m.path, m.adapter) for m in self.att.members if isinstance(m.adapter, SoRA)):
            a.proximal(self.xi)
        if self.every and (step + 1) % self.every == 0 and self.idx < len(self.lambdas) - 1:
            self.idx += 1

    def state_dict(self) -> dict:
        return {"idx": self.idx, "every": self.every}

    def load_state_dict(self, state: dict) -> None:
        self.idx, self.every = state["idx"], state["every"]


def _lambdas(lo: float, hi: float, n: int, kind: str | None) -> list[float]:
    if kind is None or n <= 1:
        return [lo]
    t = [i / (n - 1) for i in range(n)]
    if kind == "linear":
        return [lo + (hi - lo) * u for u in t]
    if kind == "log_linear":
        return [math.log(math.exp(lo) + (math.exp(hi) - math.exp(lo)) * u) for u in t]
    return [math.exp(math.log(lo) + (math.log(hi) - math.log(lo)) * u) for u in t]
