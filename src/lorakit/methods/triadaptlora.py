"""TriAdaptLoRA: triangular adaptive low-rank adaptation (Liang et al. 2025, arXiv:2501.08008; author code in
YaoLiang2023/DiverValue-Bench, ``peft/src/peft/tuners/triadaptlora.py`` and ``..._bak_*`` variants).

A LoRA whose rank GROWS during training, with a trainable core built from a triangular split::

    h = W0 x + s · B (L + U) A x        A (R, d_in), B (d_out, R), L, U (R, R), C = L + U
    s = α / (ranknum + 1e-5)            ranknum = number of used slots (grows)

The rank is grown in pieces: piece i adds k_i slots, one ROW piece of L (its k_i rows, columns 0..end_i: L is
block lower-triangular) and one COLUMN piece of U (its k_i columns, rows 0..end_i: U is block upper-triangular);
the diagonal blocks are in both. All of A, B, L, U train. Shapes are fixed: ``R = max_r`` slots are preallocated and
the persistent buffer ``pieces`` (R,) holds, per slot, the exclusive end of its piece (0 = unused), so
``ranknum = max(pieces)``, the masks are ``M_L[p, q] = q < pieces[p]``, ``M_U[p, q] = p < pieces[q]`` and
``C = L ⊙ M_L + U ⊙ M_U`` (entries outside the masks are exactly 0 and get no gradient); files and checkpoints
record the grown ranks. Mergeable (ΔW = s·B C A).

Schedule (:class:`~lorakit.methods._adaptive.TriAdaptController`, run by the trainer after ``optimizer.step`` with
the 0-based step): while the total rank is below the budget ``target_total_rank`` (default ``reference_rank ×
#modules``) and ``step > init_warmup`` and ``step % incre_interval == 0``: each module's importance is the increase
of ``‖C‖_F / #pieces`` since the last allocation (the previous value starts at the value when the controller is
built); ``m = (step − init_warmup)/(total_step − init_warmup)``, linear: ``n = int((target − total) · m)``
("non-linear": ``int(exp(m · log(target − total)))``), clamped to [1, #modules]; every module whose score is ≥ the
n-th largest grows by ``incre_rank_num`` (default ``reference_rank // 2``). ``extra_loss``:
``orth_reg_weight · Σ_modules (‖AAᵀ−I‖_F + ‖BᵀB−I‖_F) / (2·#modules)`` over the used slots.

Defaults (author code): r (init_rank) 1, reference_rank 8, init_warmup 0, incre_interval 1 (growth starts at once,
so short runs grow too), incre_rank_num reference_rank/2, orth_reg_weight 0.5, linear growth. α is not known from
the paper; 32 as in AdaLoRA/IncreLoRA scripts. ``total_step`` None = the trainer's planned step count.

Decisions (lead, after comparing the author's versions, which disagree; see docs/notes/triadaptlora.md):
* Scale α/(ranknum + 1e-5) (as AdaLoRA/IncreLoRA; the author's two stored ``triadaptlora.py`` versions use a
  constant factor 2 instead, with α unused).
* Init (the newest author version): A ~ N(0, 0.02²), B = 0, L = U = I on the initial block (C = 2I, ΔW = 0, B
  gets gradient at once).
* Growth by k at rank n: new rows of A ~ N(0, 0.02²), new columns of B = 0, new row piece of L / column piece of U
  zero except I on the new diagonal block — so the new slots add nothing to ΔW. The author's ``eye_`` on a
  non-square piece couples new A rows to OLD B columns (ΔW jumps); and since s = α/ranknum drops at growth, the
  old columns of B are multiplied by (n+k+1e-5)/(n+1e-5): ΔW is continuous across a growth step (the author lets
  it jump). The rescaling leaves C alone; the new 2I block and the extra piece enter ‖C‖_F/#pieces at the next
  allocation (as the author's identity pieces do).
* Hard budget cap: modules grow in score order by at most the remaining budget and at most ``max_r`` (default
  ``max(r, 4·reference_rank)``); the author's threshold can overshoot on ties.
* Optimiser: the author adds each growth's parameters as a new group (fresh AdamW state, weight decay 0, its own
  warmup). The slots stay inside their tensors here and ``grows_slots`` lets :mod:`lorakit.procedures.slots` give
  the new row/column pieces exactly that state (``grow_warmup`` steps; None = the run's warmup); otherwise they
  would inherit the tensor's step count with zero moments and take ≈3× the nominal step for ~100 steps.
"""
from __future__ import annotations

from typing import ClassVar, Literal

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..core import Adapter, LowRank, register
from ..errors import ConfigError
from ._adaptive import TriAdaptController, masked_orth_penalty

EPS = 1e-5


@register("triadaptlora", family="adaptive rank",
          paper="Liang et al. 2025, TriAdaptLoRA: Brain-Inspired Triangular Adaptive Low-Rank Adaptation for "
                "Parameter-Efficient Fine-Tuning, arXiv:2501.08008")
class TriAdaptLoRA(Adapter):
    __doc__ = __doc__

    @dataclass
    class Config:
        r: int = 1  # initial rank of every module (author init_rank)
        reference_rank: int = 8  # average final rank: budget = reference_rank × #modules
        target_total_rank: int | None = None  # overrides the budget
        alpha: float = 32.0
        dropout: float = 0.0
        init_warmup: int = 0
        incre_interval: int = 1
        incre_rank_num: int | None = None  # None: max(1, reference_rank // 2)
        max_r: int | None = None  # per-module rank cap (slots); None: max(r, 4 · reference_rank)
        rank_growth_model: Literal["linear", "non-linear"] = "linear"  # or "non-linear"
        orth_reg_weight: float = 0.5
        total_step: int | None = None  # None: the trainer's planned step count (on_train_begin)
        grow_warmup: int | None = None  # lr warmup of each growth's new slots; None: the run's LR warmup
        positive: ClassVar = ("r", "reference_rank", "incre_interval", "incre_rank_num", "max_r", "target_total_rank", "total_step")

        def validate(self) -> None:
            if self.max_r is not None and self.max_r < self.r:
                raise ConfigError(f"max_r={self.max_r} must be >= r={self.r}")

    grows_slots = True  # new slots get fresh AdamW state, no weight decay, a warmup (lorakit.procedures.slots)
    roles = {"lora_A": "A", "lora_B": "B", "lora_L": "core", "lora_U": "core"}
    layers = ("linear", "conv1d", "conv2d")
    loss_reduction = "mean"  # the orthogonality penalty is averaged over the modules
    example = {"r": 1, "reference_rank": 2, "incre_rank_num": 1}

    def __init__(self, base, cfg: Config, view=None):
        super().__init__(base, cfg, view)
        self.add_r = cfg.incre_rank_num or max(1, cfg.reference_rank // 2)
        self.max_r = cfg.max_r if cfg.max_r is not None else max(cfg.r, 4 * cfg.reference_rank)
        if cfg.r < 1 or self.max_r < cfg.r or self.add_r < 1 or cfg.incre_interval < 1 \
                or cfg.rank_growth_model not in ("linear", "non-linear"):
            raise ConfigError(f"need 1 <= r <= max_r, incre_rank_num, incre_interval >= 1, rank_growth_model "
                             f"'linear' or 'non-linear'; got {cfg}")
        R, v = self.max_r, self.view
        self.lora_A = nn.Parameter(torch.empty(R, v.d_in))
        self.lora_B = nn.Parameter(torch.empty(v.d_out, R))
        self.lora_L = nn.Parameter(torch.empty(R, R))
        self.lora_U = nn.Parameter(torch.empty(R, R))
        self.register_buffer("pieces", torch.zeros(R, dtype=torch.long))  # per slot: end of its piece; 0 unused
        self.dropout = nn.Dropout(cfg.dropout) if cfg.dropout > 0 else nn.Identity()

    def reset_parameters(self) -> None:
        r = self.cfg.r
        nn.init.normal_(self.lora_A, std=0.02)
        nn.init.zeros_(self.lora_B)
        with torch.no_grad():
            for p in (self.lora_L, self.lora_U):
                p.zero_()
                p[:r, :r] = torch.eye(r, dtype=p.dtype, device=p.device)
            self.pieces.zero_()
            self.pieces[:r] = r

    # --- structure ------------------------------------------------------------------------------------------------
    @property
    def rank(self) -> int:
        return int(self.pieces.max())

    @property
    def n_pieces(self) -> int:
        return int(torch.unique(self.pieces[self.pieces > 0]).numel())

    def masks(self) -> tuple[Tensor, Tensor]:
        pe = self.pieces
        q = torch.arange(pe.shape[0], device=pe.device)
        return q.unsqueeze(0) < pe.unsqueeze(1), q.unsqueeze(1) < pe.unsqueeze(0)

    def core(self) -> Tensor:
        mL, mU = self.masks()
        return self.lora_L * mL.to(self.lora_L.dtype) + self.lora_U * mU.to(self.lora_U.dtype)

    def scale(self) -> Tensor:
        return self.cfg.alpha / (self.pieces.max().to(self.lora_A.dtype) + EPS)

    def norm_score(self) -> float:
        """``‖C‖_F / #pieces`` (the importance is its increase between allocations)."""
        return float(torch.linalg.matrix_norm(self.core().detach().float())) / self.n_pieces

    # --- compute --------------------------------------------------------------------------------------------------
    def delta(self, x: Tensor) -> Tensor:
        h = self.view.rank_mix(self.view.down(self.dropout(self.cast_in(x)), self.lora_A), self.core())
        return self.view.up(h, self.lora_B * self.scale())

    def delta_weight(self) -> Tensor:
        return (self.lora_B * self.scale()) @ self.core() @ self.lora_A

    def lowrank(self) -> LowRank:
        return LowRank(self.core() @ self.lora_A, self.lora_B * self.scale(), 1.0)

    # --- growth (called by the controller) ------------------------------------------------------------------------
    @torch.no_grad()
    def grow(self, k: int, gen: torch.Generator | None = None) -> None:
        """Add ``k`` slots as one new piece; ΔW is unchanged (see the class docstring)."""
        n = self.rank
        m = n + k
        if k < 1 or m > self.max_r:
            raise ConfigError(f"cannot grow rank {n} by {k} (max_r {self.max_r})")
        self.lora_B[:, :n] *= (m + EPS) / (n + EPS)  # keeps s·B_old fixed as s = α/(ranknum+ε) drops
        self.lora_B[:, n:m] = 0
        self.lora_A[n:m] = (torch.randn((k, self.lora_A.shape[1]), generator=gen) * 0.02).to(self.lora_A)
        eye = torch.eye(k, dtype=self.lora_L.dtype, device=self.lora_L.device)
        self.lora_L[n:m, :] = 0
        self.lora_L[n:m, n:m] = eye
        self.lora_U[:, n:m] = 0
        self.lora_U[n:m, n:m] = eye
        self.pieces[n:m] = m
        for name, dim in (("lora_A", 0), ("lora_B", 1), ("lora_L", 0), ("lora_U", 1)):  # the author: a new group
            self.note_grown(name, dim, n, m, warmup=self.cfg.grow_warmup, weight_decay=0.0)

    def extra_loss(self) -> Tensor | None:
        w = self.cfg.orth_reg_weight
        if w <= 0:
            return None
        return w * masked_orth_penalty(self.lora_A, self.lora_B, self.pieces > 0) / 2  # mean over modules

    def stats(self) -> dict[str, float]:
        return {"rank": float(self.rank), "pieces": float(self.n_pieces)}

    @classmethod
    def controller(cls, att):
        return TriAdaptController(att, cls)
