"""LT-SFT: Lottery-Ticket Sparse Fine-Tuning (Ansell, Ponti, Korhonen & Vulić 2022, Composable Sparse Fine-Tuning
for Cross-Lingual Transfer, ACL 2022, arXiv:2110.07560; official code cambridgeltl/composable-sft ``lt_sft.py``).

Phase 1 fine-tunes the targeted matrices fully from ``θ0`` for ``full_steps`` optimiser steps (``full_frac`` × the
planned steps when 0). Then the mask keeps the ``K`` entries with the largest ``|θ1 − θ0|`` over ALL targets of the
attach (``K = density`` × their entry count; official ``ft_params_proportion`` = 0.01), every target is rewound to
``θ0``, and phase 2 fine-tunes only the masked entries for the remaining steps. The sparse fine-tuning is
``φ = θ2 − θ0`` (nonzero only on the mask). Deltas of several tasks compose by addition, ``θ = θ0 + φ1 + φ2``:
load each file as its own adapter and ``merge_and_unload`` (or keep both active). The schedule is
:class:`LTSFTSchedule`, the method's controller; the selection is the select-then-train code shared with SMT
(:class:`~lorakit.methods._sparse.SupportController`).

Memory: phase 1 is full fine-tuning of the targets and holds a dense delta, its gradient and its optimiser state
(inherent: the mask is the top-K of the phase-1 change). At the selection the dense delta and its optimiser state are
freed and phase 2 holds only the K entries, as a compact :class:`~lorakit.methods._sparse.SparseDelta` (values ``(k,)``
+ flat indices), trained through a custom autograd product that saves only the layer input; the optimiser state is
that of the K entries. The file holds indices + values + shape.

Choices: phase 2 starts with a fresh optimiser state for the K entries (the official code builds a new trainer for
it), but continues the run's LR schedule (one run in lorakit; the official phases each have their own schedule and
length). One iteration (official default ``n_ft_iterations=1``); the L1 terms (official default 0) are not
implemented. The classification head (which the official code trains fully) is lorakit's ``trainable``. The phase-2
values stay in the optimiser group of the phase-1 matrix (one Parameter, resized), so lorakit's default AdamW decays
them as it decayed the matrix (``optim.weight_decay``).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from ..core import register
from ..errors import ConfigError
from ._sparse import SparseDelta, SupportController


@register("lt_sft", family="sparse",
          paper="Ansell et al. 2022, Composable Sparse Fine-Tuning for Cross-Lingual Transfer, ACL 2022, "
                "arXiv:2110.07560")
class LTSFT(SparseDelta):
    __doc__ = __doc__
    example = {"density": 0.1, "full_steps": 1}
    budget_exempt = "its density is a share of the targets' entries chosen during training"
    dense_first = True

    @dataclass
    class Config:
        density: float = 0.01  # K as a share of the targeted entries (official ft_params_proportion)
        full_frac: float = 0.5  # phase 1 length as a share of the planned steps (when full_steps = 0)
        full_steps: int = 0  # > 0: phase 1 length in optimiser steps

        def validate(self) -> None:
            if not 0 < self.density <= 1:
                raise ConfigError(f"lt_sft: density must be in (0, 1], got {self.density}")
            if not 0 < self.full_frac < 1:
                raise ConfigError(f"lt_sft: full_frac must be in (0, 1), got {self.full_frac}")

    @classmethod
    def controller(cls, att) -> "LTSFTSchedule":
        return LTSFTSchedule(att)


class LTSFTSchedule(SupportController):
    """LT-SFT's schedule: full fine-tuning, then the top-K |change| mask, rewind to θ0 and sparse fine-tuning."""

    def __init__(self, att):
        super().__init__(att, LTSFT)

    def select_at(self, total: int | None) -> int:
        ads = self.adapters()
        if not ads:
            return 0
        cfg = ads[0].cfg
        if cfg.full_steps:
            return cfg.full_steps
        if not total:
            raise ConfigError("lt_sft needs the planned number of steps (on_train_begin) or full_steps > 0")
        return max(1, math.ceil(cfg.full_frac * total))

    def scores(self) -> list:
        return [a.sparse_values.detach().abs().cpu() for a in self.adapters()]  # |θ1 − θ0|

    def count(self) -> int:
        ads = self.adapters()
        return max(1, round(ads[0].cfg.density * sum(a.view.d_out * a.view.d_in for a in ads)))
