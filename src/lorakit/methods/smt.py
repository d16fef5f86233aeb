"""SMT: Sparse Matrix Tuning (He et al. 2024, SMT: Fine-Tuning Large Language Models with Sparse Matrices,
arXiv:2405.15525, ICLR 2025; official code HectorHHZ/Sparse_Matrix_Tuning, ``peft/tuner/smt.py``, ``train_smt.py``).

Each targeted matrix is cut into ``block × block`` sub-matrices. A warm-up of ``warmup_steps`` optimiser steps
(official ``full_ft_steps`` = 100; or ``warmup_frac`` of the planned steps, for short runs) fine-tunes the targets fully while accumulating, per block ``b``,

``s_b = Σ_t mean_{(i,j) ∈ b} |G_t[i, j]|``   (official ``calculation_strategy = "mean_abs"``),

then the ``blocks`` sub-matrices with the largest ``s_b`` over ALL targets of the attach are selected (global top-n,
official ``selection_strategy = "no_restriction"``) and only they train from then on: ``ΔW`` is block-sparse, stored
as a :class:`~lorakit.methods._sparse.MaskedDelta` (dense delta ⊙ support in memory; indices + values + shape in the
file; ``merge(W) = W + ΔW`` exact). The schedule is :class:`SMTSelector`, the method's controller (the trainer, the HF
callback and the arena run it). ``score = "abs_mean"`` uses ``|mean_{b} G|`` instead (the paper's other option).

Choices where we depart from the official code, and why:

* The official warm-up is full fine-tuning of the *whole* model, and its result is kept everywhere (SMT then starts
  from the warmed-up model). An adapter holds only a delta of its targets, so our warm-up trains the targeted
  matrices only, and at selection the unselected blocks are rewound to zero (their warm-up change is dropped, so
  they are bit-identical to the base); the selected blocks keep their warm-up change. The optimiser state outside
  the selection is zeroed.
* One global block count for all targets; the official code takes separate counts for the MLP and attention
  matrices (``num_submatrix_mlp`` / ``num_submatrix_attn``): attach the two groups separately for that.
* ``block`` must divide every target's ``d_out`` and ``d_in`` (the official deepspeed code takes the GCD of the weight
  shapes; 256 for LLaMA, 64 or 192 for SmolLM2).
* Memory: the official custom autograd computes gradients of the selected blocks only; ours forms the masked dense
  delta (full-FT memory for the targets).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar, Literal

import torch
from torch import Tensor

from ..core import register
from ..errors import ConfigError
from ._sparse import MaskedDelta, SupportController, top_k_mask


def block_scores(g: Tensor, block: int, score: str = "mean_abs") -> Tensor:
    """(d_out/block, d_in/block) scores of one gradient matrix."""
    o, i = g.shape
    g4 = g.float().reshape(o // block, block, i // block, block)
    return g4.abs().mean((1, 3)) if score == "mean_abs" else g4.mean((1, 3)).abs()


@register("smt", family="sparse",
          paper="He et al. 2024, SMT: Fine-Tuning Large Language Models with Sparse Matrices, arXiv:2405.15525")
class SMT(MaskedDelta):
    __doc__ = __doc__
    example = {"block": 2, "blocks": 3, "warmup_steps": 1}
    budget_exempt = "its count is of block sub-matrices chosen by gradient during training (dense delta in memory)"

    @dataclass
    class Config:
        positive: ClassVar[tuple[str, ...]] = ("block", "blocks")
        block: int = 256  # sub-matrix side
        blocks: int = 8  # sub-matrices selected over all targets
        warmup_steps: int = 100  # full fine-tuning steps that collect the gradient scores (0: use warmup_frac)
        warmup_frac: float = 0.0  # with warmup_steps = 0: the warm-up as a share of the planned steps

        def validate(self) -> None:
            if not 0 <= self.warmup_frac < 1:
                raise ConfigError(f"smt: warmup_frac must be in [0, 1), got {self.warmup_frac}")
            if not self.warmup_steps and not self.warmup_frac:
                raise ConfigError("smt: set warmup_steps > 0 or warmup_frac > 0 (the warm-up selects the blocks)")
        score: Literal["mean_abs", "abs_mean"] = "mean_abs"

    @classmethod
    def check_layer(cls, cfg, view) -> str | None:
        if view.d_out % cfg.block or view.d_in % cfg.block:
            return f"block={cfg.block} must divide d_out={view.d_out} and d_in={view.d_in}"
        return None

    def block_mask(self, blocks: Tensor) -> Tensor:
        """(d_out, d_in) boolean mask of the selected (d_out/block, d_in/block) blocks."""
        b = self.cfg.block
        return blocks.repeat_interleave(b, 0).repeat_interleave(b, 1)

    @classmethod
    def controller(cls, att) -> "SMTSelector":
        return SMTSelector(att)


class SMTSelector(SupportController):
    """SMT's schedule: accumulate block scores during the warm-up, then select the global top-n blocks."""

    def __init__(self, att):
        super().__init__(att, SMT)
        self.scores: list[Tensor] | None = None

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

    def before_step(self, step: int, model, optimizer) -> None:
        if self.done >= self.select_at(self.total):
            return
        ads = self.adapters()
        if self.scores is None:
            self.scores = [torch.zeros(a.view.d_out // a.cfg.block, a.view.d_in // a.cfg.block) for a in ads]
        for s, a in zip(self.scores, ads):
            g = a.dense_delta.grad
            if g is not None:
                s += block_scores(g.detach().cpu(), a.cfg.block, a.cfg.score)

    @torch.no_grad()
    def select(self, optimizer) -> None:
        ads = self.adapters()
        if not ads:
            return
        n = ads[0].cfg.blocks
        total = sum(a.view.d_out * a.view.d_in // a.cfg.block ** 2 for a in ads)
        if n > total:
            raise ConfigError(f"smt: blocks={n} exceeds the {total} blocks of the targets")
        scores = self.scores or [torch.zeros(a.view.d_out // a.cfg.block, a.view.d_in // a.cfg.block) for a in ads]
        for a, keep in zip(ads, top_k_mask(scores, n)):
            mask = a.block_mask(keep)
            a.set_support(mask)
            self.reset_state(optimizer, a, mask.to(a.dense_delta.device))
        self.scores = None

    def state_dict(self) -> dict:
        return {"done": self.done, "scores": self.scores}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.scores = state.get("scores")
