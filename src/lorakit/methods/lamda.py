"""LaMDA: spectrally decomposed low-dimensional adaptation (Azizi et al. 2024, arXiv:2406.12832).

``h = W0 x + s · B S A x`` (``s = α/r``): A (r, d_in) is the frozen first projection (PMA), S (r, r) the trainable
low-dimensional adapter (file key ``lora_N.weight``), B (d_out, r) the second projection (PMB), trainable at first
and **gradually frozen** column by column by a Controller, after which only r² parameters per module train.

Init (``init``): ``"svd"`` (default; the paper's "singular vectors of W0", exact recipe unknown): ``A = V_rᵀ``,
``B = U_r`` (orthonormal, fp32 SVD, ``niter > 0``: fast seeded randomised SVD), ``S = 0``; ``"lora"`` (the released
code, ArminAzizi98/LaMDA ``lamda.py``): A Kaiming (frozen), B = 0, S Kaiming-uniform. Both are no-ops at init.

Schedule (:class:`LaMDAFreezer`, run by the trainer through ``lorakit.training_controllers``). With ``T_f = freeze_steps``
(or ``freeze_frac`` × the planned steps), after ``t`` optimiser steps the first ``c = ⌊t·r/T_f⌋`` columns of B are
frozen (with SVD init, the columns of the largest singular values first): their gradient is zeroed before each
step and their values are restored after it (so momentum/weight decay cannot move them either); once c = r, B is
frozen outright (``requires_grad=False``, it leaves the optimiser's work). Decision: the code zeroes the gradients
of ``⌊t/(η·T)⌋`` columns with η = 0.3; we spread the r columns evenly over the first η·T steps so that PMB is fully
frozen at η·T (the paper: "fully frozen after t_i iterations").

LaMDA++ (per-module ranks from the normalized energy of each weight spectrum) is :func:`lamda_plus_ranks`: it
returns ``overrides`` (``{path: {"r": k}}``) for ``attach``. It must run on real weights, before attaching.
"""
from __future__ import annotations

from typing import ClassVar, Literal

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..controllers import Controller
from ..core import register
from ..errors import ConfigError
from ._spectrum import lamda_plus_ranks  # noqa: F401  (LaMDA++; re-exported)
from ._threefactor import ThreeFactor
from .pissa import svd_top


@register("lamda", family="svd three-factor",
          paper="Azizi et al. 2024, LaMDA: Large Model Fine-Tuning via Spectrally Decomposed Low-Dimensional "
                "Adaptation, arXiv:2406.12832")
class LaMDA(ThreeFactor):
    __doc__ = __doc__
    train_A, train_N, train_B = False, True, True
    example = {"r": 2, "freeze_steps": 4}

    @dataclass
    class Config:
        r: int = 8
        alpha: float = 16.0
        dropout: float = 0.0
        init: Literal["svd", "lora"] = "svd"  # "svd": A = V_rᵀ, B = U_r, S = 0 | "lora": released code (A Kaiming, B = 0, S Kaiming)
        niter: int = 0  # SVD: 0 exact, K > 0 randomised with K iterations
        seed: int = 0
        freeze_frac: float = 0.3  # B is fully frozen after this fraction of the planned steps
        freeze_steps: int = 0  # > 0: fully frozen after this many steps (overrides freeze_frac)

    def __init__(self, base, cfg: Config, view=None):
        if cfg.init not in ("svd", "lora"):
            raise ConfigError(f"lamda: init={cfg.init!r}; valid: 'svd', 'lora'")
        super().__init__(base, cfg, view, scale=cfg.alpha / cfg.r)
        self.frozen_cols = 0

    def reset_parameters(self) -> None:
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)
        nn.init.kaiming_uniform_(self.lora_N.weight, a=math.sqrt(5))

    @torch.no_grad()
    def init_from(self, weight: Tensor, stats=None) -> None:
        if self.cfg.init == "svd":
            if self.cfg.r > min(weight.shape):
                raise ConfigError(f"r={self.cfg.r} exceeds min(d_out, d_in) of a {tuple(weight.shape)} weight")
            U, _, V = svd_top(weight, self.cfg.r, self.cfg.niter, self.cfg.seed)
            self.set_factors(A=V.t(), N=torch.zeros(self.cfg.r, self.cfg.r), B=U)
        return None

    def cols_to_freeze(self, done: int, total: int | None) -> int:
        T = self.cfg.freeze_steps or (math.ceil(self.cfg.freeze_frac * total) if total else 0)
        if T <= 0:
            raise ConfigError("lamda needs the planned number of steps (on_train_begin) or freeze_steps > 0")
        return min(self.cfg.r, done * self.cfg.r // T)

    def stats(self) -> dict[str, float]:
        return {"lamda_frozen_frac": self.frozen_cols / self.cfg.r}

    @classmethod
    def controller(cls, att) -> Controller:
        return LaMDAFreezer(att)


class LaMDAFreezer(Controller):
    """Gradual freezing of LaMDA's second projection B (see :class:`LaMDA`)."""

    def __init__(self, att):
        self.att, self.total, self.done = att, None, 0
        self._snap: dict[int, Tensor] = {}

    def _adapters(self) -> list[LaMDA]:
        return self.att.of_type(LaMDA)

    def on_train_begin(self, model, optimizer, total_steps: int) -> None:
        self.total = total_steps
        self._apply(self.done)

    def before_step(self, step: int, model, optimizer) -> None:
        for a in self._adapters():
            g = a.lora_B.weight.grad
            if g is not None and a.frozen_cols:
                g[:, : a.frozen_cols] = 0

    def step(self, step: int, model, optimizer) -> None:
        self.done = step + 1
        self._apply(self.done)

    @torch.no_grad()
    def _apply(self, done: int) -> None:
        for a in self._adapters():
            B = a.lora_B.weight
            c_old, c = a.frozen_cols, a.cols_to_freeze(done, self.total)
            snap = self._snap.get(id(a))
            if snap is None or snap.shape[1] < c_old:  # after a resume: the current values are the frozen ones
                snap = B[:, :c_old].detach().clone()
            if c_old:
                B[:, :c_old] = snap[:, :c_old]  # undo any drift from momentum / weight decay
            if c > c_old:
                snap = torch.cat([snap[:, :c_old], B[:, c_old:c].detach().clone()], 1)
            self._snap[id(a)] = snap
            a.frozen_cols = c
            if c >= a.cfg.r and B.requires_grad:
                B.requires_grad_(False)
                B.grad = None

    def state_dict(self) -> dict:
        return {"done": self.done}

    def load_state_dict(self, state: dict) -> None:
        self.done = int(state.get("done", 0))
        self._snap.clear()  # the current values of already-frozen columns are the frozen ones
        if self.total is not None or all(a.cfg.freeze_steps for a in self._adapters()):
            self._apply(self.done)  # otherwise on_train_begin applies it
