"""``optim.name=allora``: ALLoRA (Huang & Balestriero 2024, "ALLoRA: Adaptive Learning Rate Mitigates LoRA Fatal
Flaws", arXiv:2410.09692).

LoRA without dropout and without the scaling factor (``ΔW = B·A``, s = 1), trained with a per-row adaptive
learning rate inversely proportional to the row's norm. For each row ``θ_i`` of a factor (a row of ``A`` (r, d_in):
one rank component's input direction; a row of ``B`` (d_out, r): one output unit's rank-space vector) the step of
the base optimiser (AdamW over the default groups) is multiplied by::

    c_i = 1 / sqrt(‖θ_i‖² + 1/η²)        (η = ``eta``)

so ``c_i = η`` at ``θ_i = 0`` (B leaves its zero init at the full rate) and ``c_i → 1/‖θ_i‖`` for large rows.

Choices where the paper (abstract: "scaling the per sample and per parameter gradients with a coefficient inversely
proportional to parameters' ℓ2 norm") and our reference (methods-training.md A1, tagged unverified; no official code
was found) leave room:

* **The form and η.** ``1/sqrt(‖θ‖² + 1/η²)`` as the reference recalls it (bounded at 0, ∝ 1/‖θ‖ far from 0). η's
  default (1.0) is ours: the paper's value is not in the material we could read.
* **Granularity: rows** (the first dimension of the parameter as stored, i.e. of the matrix layout of A and B), as
  the brief says. Only roles ``A`` and ``B`` are rescaled; other trainable parameters (heads, biases) take the plain
  AdamW step.
* **Where the coefficient acts: the update, not the gradient** (``scale=update``, default). AdamW normalises each
  coordinate by its own second moment, so a slowly varying factor on the gradient cancels almost exactly and would
  leave plain LoRA; an *adaptive learning rate* is a factor on the step. We snapshot A and B before
  ``optimizer.step()`` and rescale the step per row afterwards (``θ ← θ₀ + c(θ₀)·(θ_AdamW − θ₀)``), so the effective
  per-row step is exactly ``c_i`` times AdamW's (weight decay included, as a per-row learning rate would do).
  ``scale=gradient`` multiplies the gradient instead (what the abstract says literally; equivalent for SGD).
* **"Dropout-free, scaling-free" is a check, not an override.** The procedure refuses, at config resolution, a
  method whose config has ``dropout > 0`` or whose low-rank scale is not 1 (set ``adapter.alpha`` equal to
  ``adapter.r``, ``adapter.rslora=false``, ``adapter.dropout=0``; the recipe ``sentiment-smollm2-allora`` does).
  We did not make it a method variant: it would copy LoRA to change two defaults, and the same rule applies to any
  low-rank method with A/B factors (DoRA, PiSSA, ...). We did not override the config from the procedure: the
  adapter file would then say something else than what was configured, and a procedure must not rewrite what a
  method is (``require_plain: false`` skips the check).

**Verification (2026-12), what could and could not be checked.** Checked against the abstract (arXiv:2410.09692v1
HTML page and OpenReview 7X65yoKl3Y): dropout-free and scaling-free LoRA, "scaling the per sample and per parameter
gradients with a coefficient inversely proportional to parameters' ℓ2 norm", which removes α and the dropout rate:
the check of ``dropout = 0`` and ``s = 1`` and the inverse-norm coefficient follow it. Not checkable: the paper's
body (§4: the exact coefficient, where η enters, its value, rows vs columns) is not in the stored pages (only the
abstracts), and no code exists to read (the code index and the issue threads have no ALLoRA implementation; the
paper links none). So ``1/sqrt(‖θ_i‖² + 1/η²)``, η = 1 and row granularity remain the reference's unverified
reading, and ``scale=update`` is our interpretation of "adaptive learning rate".

Stateless (the coefficients come from the current weights), so exact resume needs nothing beyond the optimiser.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from ..errors import ConfigError
from .base import Procedure, TrainParam, register_procedure

__all__ = ["ALLoRA", "allora_coefficient"]


def allora_coefficient(theta: torch.Tensor, eta: float) -> torch.Tensor:
    """Per-row coefficient ``1/sqrt(‖θ_i‖² + 1/η²)`` of a parameter (rows along its first dimension): shape (rows, 1)."""
    sq = theta.detach().float().reshape(theta.shape[0], -1).pow(2).sum(1, keepdim=True)
    return torch.rsqrt(sq + 1.0 / eta ** 2)


@register_procedure("allora")
class ALLoRA(Procedure):
    paper = "Huang & Balestriero 2024, arXiv:2410.09692"
    family = "optimiser"

    @dataclass
    class Config:
        eta: float = 1.0  # c(0) = eta: the largest multiplier (a zero row's)
        scale: Literal["update", "gradient"] = "update"  # what c multiplies (see the docstring)
        require_plain: bool = True  # refuse dropout > 0 or a scale != 1 (ALLoRA is dropout- and scaling-free)

    def __init__(self, cfg=None, hp=None):
        super().__init__(cfg, hp)
        self._rows: list[torch.nn.Parameter] = []
        self._before: list[torch.Tensor] = []

    def validate(self) -> None:
        if not self.cfg.eta > 0:
            raise ConfigError(f"allora: eta={self.cfg.eta} must be > 0 (the step multiplier of a zero row)")

    def check(self, params: list[TrainParam]) -> None:
        roles = {t.role for t in params}
        if not {"A", "B"} <= roles:
            missing = " or ".join(r for r in ("A", "B") if r not in roles)
            self.refuse(f"ALLoRA rescales the rows of the factors A and B, but no trainable parameter has role "
                        f"{missing}", params)
        if not self.cfg.require_plain:
            return
        for t in params:
            if t.adapter is None or t.role != "A":
                continue
            cfg = getattr(t.adapter, "cfg", None)
            drop = getattr(cfg, "dropout", 0.0) or 0.0
            try:
                lr = t.adapter.lowrank()
            except Exception:  # noqa: BLE001 - no single (A, B) view: judged by the dropout alone
                lr = None
            s = None if lr is None else float(lr.scale)
            if drop > 0 or (s is not None and abs(s - 1.0) > 1e-12):
                r = getattr(cfg, "r", "r")
                raise ConfigError(
                    f"optim.name=allora: ALLoRA is dropout-free and scaling-free, but method '{t.method}' has "
                    f"dropout={drop:g} and scale={s if s is not None else '?'}; set adapter.dropout=0, "
                    f"adapter.alpha={r} (= r), adapter.rslora=false (recipe sentiment-smollm2-allora), or "
                    "optim.require_plain=false")

    def build_optimizer(self, params: list[TrainParam]) -> torch.optim.Optimizer:
        self._rows = [t.param for t in params if t.role in ("A", "B")]
        return super().build_optimizer(params)

    def before_step(self, step, model, optimizer) -> None:
        eta = self.cfg.eta
        if self.cfg.scale == "gradient":
            for p in self._rows:
                if p.grad is not None:
                    c = allora_coefficient(p, eta).to(p.grad.dtype)
                    p.grad.view(p.shape[0], -1).mul_(c)
            return
        self._before = [p.detach().clone() for p in self._rows]

    @torch.no_grad()
    def after_step(self, step, model, optimizer) -> None:
        if self.cfg.scale != "update":
            return
        for p, p0 in zip(self._rows, self._before):
            c = allora_coefficient(p0, self.cfg.eta).to(p.dtype)
            step_ = (p - p0).view(p.shape[0], -1)
            p.copy_((p0.view(p.shape[0], -1) + c * step_).view_as(p))
        self._before = []
