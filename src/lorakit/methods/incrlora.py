"""IncreLoRA: incremental parameter allocation (Zhang et al. 2023, arXiv:2308.12043; code FeiyuZhang98/IncreLoRA).

SVD-form update whose rank GROWS during training::

    h = W0 x + s · Σ_i b_i e_i a_iᵀ x      a_i = lora_A[i] (d_in), e_i = lora_E[i], b_i = lora_B[:, i] (d_out)
    s = α / (ranknum + 1e-5)              ranknum = number of ACTIVE components (grows with the rank)

Components live in ``R = max_r + incre_rank_num`` preallocated slots (shapes fixed at construction, so the
optimiser keeps the same tensors); ``slots = [n_active, n_reserve]`` (a persistent buffer, so files and
checkpoints record the state) says which are used: slots ``< n_active`` are active (``e_i = lora_E[i]``,
trainable), the next ``n_reserve`` are "advance learning" reserves (``e_i = 1e-5`` fixed, ``a_i, b_i`` train),
the rest are unused (``e_i = 0``: no output, no gradient). Init (official): ``r`` active slots, E = 0,
A, B ~ N(0, 0.02²) ⇒ ΔW = 0; no reserves until training starts.

Schedule (:class:`~lorakit.methods._adaptive.IncreLoRAController`, run by the trainer via ``lorakit.training_controllers``;
the official RankAllocator.update_and_increase is called at the same place, after backward and before
``optimizer.step`` with the 0-based step): at step 0 every module gets ``incre_rank_num`` reserves. While the
total rank is below the budget ``target_rank × #modules``: each module's score ``S = Σ|ΔW ⊙ ∂L/∂ΔW| / √numel``
(from a gradient hook on the materialised ΔW, as the official backward hook) is folded into EMAs
``Ī ← β1 Ī + (1−β1) S``, ``Ū ← β2 Ū + (1−β2)|S − Ī|``; importance ``Ī·Ū``. When ``step > init_warmup`` and
``step % incre_interval == 0`` the ``top_h`` most important modules each activate ``incre_rank_num`` reserves
(``e`` starts at 1e-5, now trainable; ``ranknum`` grows) and receive fresh reserves (a, b ~ N(0, 0.02²)). When the
budget is reached the reserves are dropped (e = 0, as the official code zeroes them) and scoring stops. Loss extra
(``extra_loss``): ``orth_reg_weight · Σ_modules (‖AAᵀ−I‖_F + ‖BᵀB−I‖_F) / (2·#modules)`` over the used slots.

Optimiser (official ``Multi_LambdaLR``): every growth's new tensors (the activated ``e_i`` and the fresh reserves'
``a_i, b_i``) are a NEW parameter group: zero AdamW moments, its own step count, its own warmup from lr 0 over the
run's warmup steps. Here the slots stay inside their tensors and ``grows_slots`` lets
:mod:`lorakit.procedures.slots` give exactly those entries that state (``grow_warmup`` steps; None = the run's
warmup). Without it a new slot inherits the tensor's step count and takes ≈3× the nominal step for ~100 steps.

Defaults: the official README/scripts use r=1, target_rank=2, α=32, top_h=2..12, init_warmup=incre_interval=
100..1000 steps, β1=β2=0.85, regulariser 0.1, incre_rank_num {2:1, 4:2, 6:3, 8:4}[target_rank]. Here
init_warmup=20 and incre_interval=10 so a short run exercises growth (set the paper's values for long runs).

Decisions (official code unclear or not transferable): the budget is a hard cap — a module grows by at most the
remaining budget, and exactly ``top_h`` modules grow (the official ``>= k-th score`` threshold may pick more on
ties and overshoot). A module's rank is capped at ``max_r`` (default ``max(r, 4·target_rank)``; the official
lists are unbounded); capped modules are skipped. The regulariser uses each module's whole used-slot matrices,
as the official trainer's ``compute_svd_orth_regu`` does (it concatenates every stored chunk of A and of B, reserves
included, and divides by 2·#modules; loralib's per-chunk regulariser is never called). Under gradient accumulation the per-micro-batch scores are summed. Without a controller (inference) the
efficient ``B·diag(s·e)·A x`` path is used; while scoring, ΔW is materialised (as the official forward does).
"""
from __future__ import annotations

from typing import ClassVar

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..core import Adapter, LowRank, register
from ..errors import ConfigError
from ._adaptive import IncreLoRAController, masked_orth_penalty

RESERVE_E = 1e-5
_STEP = {2: 1, 4: 2, 6: 3, 8: 4}  # official default incre_rank_num per average target rank


@register("incrlora", family="adaptive rank",
          paper="Zhang et al. 2023, IncreLoRA: Incremental Parameter Allocation Method for Parameter-Efficient "
                "Fine-tuning, arXiv:2308.12043")
class IncreLoRA(Adapter):
    __doc__ = __doc__

    @dataclass
    class Config:
        r: int = 1  # initial rank of every module (official lora_r)
        target_rank: int = 2  # average final rank: total budget = target_rank × #modules
        alpha: float = 32.0
        dropout: float = 0.0
        init_warmup: int = 20  # paper 100..1000
        incre_interval: int = 10  # paper 100..1000
        top_h: int = 2
        incre_rank_num: int | None = None  # None: {2:1, 4:2, 6:3, 8:4}[target_rank] (else target_rank // 2)
        max_r: int | None = None  # per-module rank cap; None: max(r, 4 · target_rank)
        advance_learn: bool = True  # reserves train (e = 1e-5) before activation
        beta1: float = 0.85
        beta2: float = 0.85
        orth_reg_weight: float = 0.1
        grow_warmup: int | None = None  # lr warmup of each growth's new slots; None: the run's LR warmup (official)
        positive: ClassVar = ("r", "target_rank", "top_h", "incre_interval", "incre_rank_num", "max_r")

        def validate(self) -> None:
            if self.target_rank < self.r or (self.max_r is not None and self.max_r < self.r):
                raise ConfigError(f"need r <= target_rank and r <= max_r; got r={self.r}, target_rank="
                                  f"{self.target_rank}, max_r={self.max_r}")
            if not (0 < self.beta1 < 1 and 0 < self.beta2 < 1):
                raise ConfigError(f"beta1={self.beta1}, beta2={self.beta2} must lie in (0, 1)")

    grows_slots = True  # new components get fresh AdamW state + a warmup (lorakit.procedures.slots)
    roles = {"lora_A": "A", "lora_B": "B", "lora_E": "singular_values"}
    masked_rank = True
    layers = ("linear", "conv1d", "conv2d")
    loss_reduction = "mean"  # the orthogonality penalty is averaged over the modules
    example = {"r": 1, "target_rank": 2, "init_warmup": 1, "incre_interval": 1, "top_h": 1}

    def __init__(self, base, cfg: Config, view=None):
        super().__init__(base, cfg, view)
        self.add_r = cfg.incre_rank_num or _STEP.get(cfg.target_rank, max(1, cfg.target_rank // 2))
        self.max_r = cfg.max_r if cfg.max_r is not None else max(cfg.r, 4 * cfg.target_rank)
        if cfg.r < 1 or cfg.target_rank < cfg.r or self.max_r < cfg.r or self.add_r < 1 or cfg.top_h < 1 \
                or cfg.incre_interval < 1:
            raise ConfigError(f"need 1 <= r <= target_rank, r <= max_r, incre_rank_num, top_h, incre_interval >= 1;"
                             f" got {cfg}")
        R = self.max_r + (self.add_r if cfg.advance_learn else 0)
        v = self.view
        self.lora_A = nn.Parameter(torch.empty(R, v.d_in))
        self.lora_E = nn.Parameter(torch.empty(R, 1))
        self.lora_B = nn.Parameter(torch.empty(v.d_out, R))
        self.register_buffer("slots", torch.zeros(2, dtype=torch.long))  # [n_active, n_reserve], saved
        self.dropout = nn.Dropout(cfg.dropout) if cfg.dropout > 0 else nn.Identity()
        self.scoring = False  # set by the controller while the budget is not reached
        self._score: Tensor | None = None

    def reset_parameters(self) -> None:
        nn.init.zeros_(self.lora_E)
        nn.init.normal_(self.lora_A, std=0.02)
        nn.init.normal_(self.lora_B, std=0.02)
        self.slots.copy_(torch.tensor([self.cfg.r, 0]))

    # --- the component gates -------------------------------------------------------------------------------------
    def _used(self) -> tuple[Tensor, Tensor]:
        idx = torch.arange(self.lora_E.shape[0], device=self.lora_E.device)
        act = idx < self.slots[0]
        return act, idx < self.slots[0] + self.slots[1]

    def gates(self) -> Tensor:
        """Effective ``s·e_i`` per slot: ``s·E_i`` active, ``s·1e-5`` reserve, 0 unused."""
        act, used = self._used()
        e = self.lora_E.view(-1)
        e = torch.where(act, e, torch.where(used, torch.full_like(e, RESERVE_E), torch.zeros_like(e)))
        return e * (self.cfg.alpha / (self.slots[0].to(e.dtype) + 1e-5))

    def _hook(self, dw: Tensor):
        def fn(g: Tensor) -> None:
            s = (dw.detach().float() * g.float()).abs().sum() / math.sqrt(dw.numel())
            self._score = s if self._score is None else self._score + s
        return fn

    def delta(self, x: Tensor) -> Tensor:
        x, w = self.dropout(self.cast_in(x)), self.gates()
        if self.scoring and self.training and torch.is_grad_enabled():
            dw = self.lora_B @ (self.lora_A * w.unsqueeze(1))
            if dw.requires_grad:
                dw.register_hook(self._hook(dw))
            return self.view.dense(x, dw)
        return self.view.up(self.view.rank_scale(self.view.down(x, self.lora_A), w), self.lora_B)

    def take_score(self) -> Tensor | None:
        s, self._score = self._score, None
        return s

    def delta_weight(self) -> Tensor:
        return self.lora_B @ (self.lora_A * self.gates().unsqueeze(1))

    def lowrank(self) -> LowRank:
        return LowRank(self.lora_A * self.gates().unsqueeze(1), self.lora_B, 1.0)

    def kept_lowrank(self) -> LowRank:
        g = self.gates()
        keep = g != 0
        return LowRank(self.lora_A[keep], self.lora_B[:, keep] * g[keep], 1.0)

    # --- growth (called by the controller) ------------------------------------------------------------------------
    @torch.no_grad()
    def _redraw(self, lo: int, hi: int, gen: torch.Generator | None) -> None:
        for p, sl in ((self.lora_A, (slice(lo, hi),)), (self.lora_B, (slice(None), slice(lo, hi)))):
            p[sl] = (torch.randn(p[sl].shape, generator=gen) * 0.02).to(p)
        self.note_grown("lora_A", 0, lo, hi, warmup=self.cfg.grow_warmup)
        self.note_grown("lora_B", 1, lo, hi, warmup=self.cfg.grow_warmup)

    @torch.no_grad()
    def activate(self, n: int, gen: torch.Generator | None = None) -> None:
        """Turn the first ``n`` reserves into active components with ``e`` = 1e-5, so each one adds exactly
        ``1e-5·α/ranknum · b aᵀ`` at activation (without advance learning: fresh unused slots with e = 0)."""
        k = int(self.slots[0])
        if not self.cfg.advance_learn:
            self._redraw(k, k + n, gen)
        self.lora_E[k:k + n] = RESERVE_E if self.cfg.advance_learn else 0.0
        self.note_grown("lora_E", 0, k, k + n, warmup=self.cfg.grow_warmup)  # official: a new param group
        self.slots.copy_(torch.tensor([k + n, max(int(self.slots[1]) - n, 0)]))

    @torch.no_grad()
    def refill(self, gen: torch.Generator | None) -> None:
        """Top the reserves up to ``incre_rank_num``; new reserve slots get fresh a, b ~ N(0, 0.02²)."""
        k, n = int(self.slots[0]), int(self.slots[1])
        want = min(self.add_r, self.lora_E.shape[0] - k) if self.cfg.advance_learn else 0
        if want > n:
            self._redraw(k + n, k + want, gen)
            self.slots[1] = want

    def drop_reserves(self) -> None:
        self.slots[1] = 0

    def extra_loss(self) -> Tensor | None:
        w = self.cfg.orth_reg_weight
        if w <= 0:
            return None
        return w * masked_orth_penalty(self.lora_A, self.lora_B, self._used()[1]) / 2  # mean over modules

    def stats(self) -> dict[str, float]:
        return {"rank": float(self.slots[0])}

    @classmethod
    def controller(cls, att):
        return IncreLoRAController(att, cls)
