"""SMT: Sparse Matrix Tuning (He et al. 2024, SMT: Fine-Tuning Large Language Models with Sparse Matrices,
arXiv:2405.15525, ICLR 2025; official code HectorHHZ/Sparse_Matrix_Tuning, ``peft/tuner/smt.py``, ``train_smt.py``,
``deepspeed/fine_tune.py``).

Each targeted matrix is cut into ``block × block`` sub-matrices. A warm-up of ``warmup_steps`` optimiser steps
(official ``full_ft_steps`` = 100; or ``warmup_frac`` of the planned steps, for short runs) accumulates, per block
``b``, the gradient mass of the target weight

``s_b = Σ_t mean_{(i,j) ∈ b} |G_t[i, j]|``   (official ``calculation_strategy = "mean_abs"``),

then the ``blocks`` sub-matrices with the largest ``s_b`` over ALL targets of the attach are selected (global top-n,
official ``selection_strategy = "no_restriction"``) and only they train from then on. ``score = "abs_mean"`` uses
``|mean_{b} G|`` instead (the paper's other option). The schedule is :class:`SMTSelector`, the method's controller
(the trainer, the HF callback and the arena run it); the selection itself is the select-then-train code shared with
LT-SFT (:class:`~lorakit.methods._sparse.SupportController`).

Memory: after the selection only the selected blocks exist, as a compact :class:`~lorakit.methods._sparse.SparseDelta`
(``sparse_values`` ``(n, b, b)`` + block ids ``(n,)``), trained through a custom autograd product that saves only the
layer input and computes the gradient of the selected blocks only (as the official ``linearZ``); the optimiser state
is that of the ``n·b²`` entries. The file holds indices + values + shape; ``merge(W) = W + ΔW`` is exact.

The warm-up (``warmup``):

* ``"train"`` (default, the official schedule): the warm-up fine-tunes the targets fully (a dense delta, its gradient
  and its optimiser state, i.e. full fine-tuning memory for the targets, as the official warm-up, which is full FT);
  the scores come from that delta's gradients; at the selection the dense delta and its optimiser state are freed.
* ``"score"`` (lean): nothing dense is held at any time. The targets do not move during the warm-up; a probe on each
  target computes ``G = gᵀx`` for its layer in the backward (a transient of one layer), adds its block scores and
  drops it. Peak memory is then that of the sparse phase plus one layer's gradient. The scores are those of the
  base weights rather than of the moving warm-up weights, and with ``grad_accum > 1`` (or data-parallel ranks, whose
  step scores are summed) the per-micro-batch block scores are summed: exact for one micro-batch per step on one
  process (the block statistic of the summed gradient would need a dense accumulator).

Choices where we depart from the official code, and why:

* The official warm-up is full fine-tuning of the *whole* model, and its result is kept everywhere (SMT then starts
  from the warmed-up model). An adapter holds only a delta of its targets, so our warm-up trains the targeted
  matrices only, and at selection the unselected blocks are rewound to zero (bit-identical to the base); the selected
  blocks keep their warm-up change (``"train"``; with ``"score"`` there is none).
* After the selection the optimiser state starts fresh (the official code deletes the warm-up optimiser and builds a
  new one); lorakit keeps the run's one LR schedule (the official code builds a new scheduler with its own warm-up)
  and the parameter's optimiser group (the blocks are a 2-D matrix during the warm-up and 3-D after: weight decay
  ``optim.weight_decay`` either way under lorakit's default AdamW groups; the recipe sets 0 as the official run).
* One global block count for all targets; the official code takes separate counts for the MLP and attention
  matrices (``num_submatrix_mlp`` / ``num_submatrix_attn``): attach the two groups separately for that.
* ``block`` must divide every target's ``d_out`` and ``d_in`` (the official deepspeed code takes the GCD of the weight
  shapes; 256 for LLaMA, 64 or 192 for SmolLM2).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar, Literal

import torch
from torch import Tensor

from ..core import register
from ..errors import ConfigError
from ._sparse import SparseDelta, SupportController, _GradientProbe


def block_scores(g: Tensor, block: int, score: str = "mean_abs") -> Tensor:
    """(d_out/block, d_in/block) scores of one gradient matrix."""
    o, i = g.shape
    g4 = g.float().reshape(o // block, block, i // block, block)
    return g4.abs().mean((1, 3)) if score == "mean_abs" else g4.mean((1, 3)).abs()


@register("smt", family="sparse",
          paper="He et al. 2024, SMT: Fine-Tuning Large Language Models with Sparse Matrices, arXiv:2405.15525")
class SMT(SparseDelta):
    __doc__ = __doc__
    example = {"block": 2, "blocks": 3, "warmup_steps": 1}
    budget_exempt = "its count is of block sub-matrices chosen by gradient during training"

    @dataclass
    class Config:
        positive: ClassVar[tuple[str, ...]] = ("block", "blocks")
        block: int = 256  # sub-matrix side
        blocks: int = 8  # sub-matrices selected over all targets
        warmup_steps: int = 100  # warm-up steps that collect the gradient scores (0: use warmup_frac)
        warmup_frac: float = 0.0  # with warmup_steps = 0: the warm-up as a share of the planned steps

        def validate(self) -> None:
            if not 0 <= self.warmup_frac < 1:
                raise ConfigError(f"smt: warmup_frac must be in [0, 1), got {self.warmup_frac}")
            if not self.warmup_steps and not self.warmup_frac:
                raise ConfigError("smt: set warmup_steps > 0 or warmup_frac > 0 (the warm-up selects the blocks)")
        score: Literal["mean_abs", "abs_mean"] = "mean_abs"
        warmup: Literal["train", "score"] = "train"  # train: full FT of the targets; score: gradient scores only

    summed_buffers = ("step_scores",)  # a score-only warm-up's block scores of the step: summed over data-parallel ranks

    def __init__(self, base, cfg, view=None):
        super().__init__(base, cfg, view)
        b = cfg.block
        # block scores of the current step from the warm-up probe (non-persistent: the controller takes them each step)
        self.register_buffer("step_scores", torch.zeros(self.view.d_out // b, self.view.d_in // b), persistent=False)
        self.probing = False

    @property
    def dense_first(self) -> bool:  # type: ignore[override]
        return self.cfg.warmup == "train"

    def _take_scores(self, g: Tensor) -> None:
        self.step_scores.add_(block_scores(g, self.cfg.block, self.cfg.score).to(self.step_scores.device))

    def unit(self) -> int:
        return self.cfg.block

    @classmethod
    def check_layer(cls, cfg, view) -> str | None:
        if view.d_out % cfg.block or view.d_in % cfg.block:
            return f"block={cfg.block} must divide d_out={view.d_out} and d_in={view.d_in}"
        return None

    def delta(self, x: Tensor) -> Tensor:
        if self.probing and torch.is_grad_enabled() and self.sparse_values.requires_grad:
            x2 = self.cast_in(x).reshape(-1, self.view.d_in)
            return _GradientProbe.apply(x2, self.sparse_values, self.view.d_out, self._take_scores).reshape(
                *x.shape[:-1], self.view.d_out)
        return super().delta(x)

    @classmethod
    def controller(cls, att) -> "SMTSelector":
        return SMTSelector(att)


class SMTSelector(SupportController):
    """SMT's schedule: accumulate block scores during the warm-up, then select the global top-n blocks (the
    warm-up change of the selected blocks is kept)."""

    rewind = False

    def __init__(self, att):
        super().__init__(att, SMT)
        self.acc: list[Tensor] | None = None

    def select_at(self, total: int | None) -> int:
        ads = self.adapters()
        if not ads:
            return 0
        cfg = ads[0].cfg
        if cfg.warmup_steps:
            return cfg.warmup_steps
        if not total:
            raise ConfigError("smt needs the planned number of steps (on_train_begin) or warmup_steps > 0")
        return max(1, math.ceil(cfg.warmup_frac * total))

    def _grid(self) -> list[Tensor]:
        return [torch.zeros(a.view.d_out // a.cfg.block, a.view.d_in // a.cfg.block) for a in self.adapters()]

    def _probe(self, on: bool) -> None:
        for a in self.adapters():
            a.probing = on and not a.dense_first
            a.step_scores.zero_()

    def on_train_begin(self, model, optimizer, total_steps: int) -> None:
        super().on_train_begin(model, optimizer, total_steps)
        if self.acc is None:
            self.acc = self._grid()
        self._probe(not self.selected())

    def before_step(self, step: int, model, optimizer) -> None:
        if self.done >= self.select_at(self.total):
            return
        if self.acc is None:
            self.acc = self._grid()
        for s, a in zip(self.acc, self.adapters()):
            if a.probing:  # score-only warm-up: what the probe gathered in this step's backward
                s += a.step_scores.cpu()
                a.step_scores.zero_()
            g = a.sparse_values.grad if a.dense_phase() else None
            if g is not None:
                s += block_scores(g.detach(), a.cfg.block, a.cfg.score).cpu()

    def scores(self) -> list[Tensor]:
        return self.acc if self.acc is not None else self._grid()

    def count(self) -> int:
        ads = self.adapters()
        n = ads[0].cfg.blocks
        total = sum(a.view.d_out * a.view.d_in // a.cfg.block ** 2 for a in ads)
        if n > total:
            raise ConfigError(f"smt: blocks={n} exceeds the {total} blocks of the targets")
        return n

    def select(self, optimizer) -> None:
        super().select(optimizer)
        self._probe(False)
        self.acc = None

    def state_dict(self) -> dict:
        return {"done": self.done, "scores": self.acc}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.acc = state.get("scores")
        if self.acc is None and not self.selected():
            self.acc = self._grid()
        self._probe(not self.selected())
