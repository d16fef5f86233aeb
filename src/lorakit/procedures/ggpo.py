"""``optim.name=ggpo``: LoRA-GGPO (Chang, Guo, Chang, Wu 2025, "LoRA-GGPO: Mitigating Double Descent in LoRA
Fine-Tuning via Gradient-Guided Perturbation Optimization", arXiv:2502.14538 v1; code: github.com/llm172/LoRA-GGPO).

A sharpness-aware step without SAM's second forward/backward: before each step the trainable factors are moved
to a nearby random point whose per-row distance is set by the row's gradient and weight norms; the loss and
gradient are computed there; the perturbation is taken off again and the optimiser (AdamW over the default groups)
steps from the *unperturbed* weights with that gradient::

    ε_i = ρ · (γ·‖g_i‖ + (1 − γ)·‖θ_i‖) · z_i / ‖z_i‖,     z_i ~ N(0, I)
    g   = ∇L(θ + ε),   θ ← AdamW(θ, g)

for each row ``θ_i`` of each trainable A/B factor (rows = the first dimension as stored), ``g_i`` the row's gradient
of the previous step (the perturbed one; 0 before the first step), ρ = ``rho``, γ = ``grad_weight``.

Choices, and why (the paper body and the official code were not available to us; the form above is the reference's
recollection of v1, methods-training.md A4, tagged unverified, and its constants are ours):

* **What is perturbed: the trainable factors A and B** (roles A, B), not the merged weight ``W0 + s·BA``. A merged
  perturbation needs a (d_out, d_in) noise tensor per layer and a copy of the frozen base to take it off exactly;
  the factors are small, every method with A/B works without touching its base, and the perturbation is removed
  bit-exactly (their values are restored from a copy, not by subtracting ε).
* **Hooks**: ``before_forward`` saves the factors and adds ε, ``before_step`` (after backward and gradient
  clipping) restores them, so checkpoints, evaluations, the saved adapter and the optimiser never see ε. The
  gradient norms are cached in ``before_step`` (after clipping).
* **Randomness** comes from the procedure's own generator seeded with (``seed``, step): the run's global RNG is not
  consumed (the data order and dropout stay those of adamw) and a resumed run draws the same ε.
* **ρ = 0.05, γ = 0.5** (our defaults). With ρ = 0 the procedure is adamw bit for bit (tested).
* **v2 (LoRA-MGPO, the renamed arXiv v2)** is ``optim.name=mgpo`` (below): the momentum as direction, an EMA of the
  gradient norm as scale.

State (checkpointed): the cached per-row gradient norms.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import ConfigError
from .base import Procedure, TrainParam, register_procedure

__all__ = ["GGPO", "MGPO", "ggpo_perturbation"]


def ggpo_perturbation(theta: torch.Tensor, grad_norm: torch.Tensor | None, rho: float, gamma: float,
                      gen: torch.Generator) -> torch.Tensor:
    """ε for one parameter: rows of norm ``rho·(gamma·grad_norm + (1−gamma)·‖θ_i‖)`` in a Gaussian direction."""
    rows = theta.detach().float().reshape(theta.shape[0], -1)
    z = torch.randn(rows.shape, generator=gen, dtype=torch.float32).to(theta.device)
    z = z / z.norm(dim=1, keepdim=True).clamp_min(1e-12)
    mag = (1 - gamma) * rows.norm(dim=1, keepdim=True)
    if grad_norm is not None:
        mag = mag + gamma * grad_norm.reshape(-1, 1).to(mag.device)
    return (rho * mag * z).reshape(theta.shape).to(theta.dtype)


@register_procedure("ggpo")
class GGPO(Procedure):
    paper = "Chang et al. 2025, arXiv:2502.14538 (v1)"
    family = "optimiser"

    @dataclass
    class Config:
        rho: float = 0.05  # perturbation radius, relative to the row norms
        grad_weight: float = 0.5  # γ: share of the gradient norm (vs the weight norm) in a row's radius
        seed: int = 0  # the perturbations' own generator

    def __init__(self, cfg=None, hp=None):
        super().__init__(cfg, hp)
        self._params: list[tuple[str, torch.nn.Parameter]] = []
        self._saved: list[torch.Tensor] = []
        self.grad_norms: dict[str, torch.Tensor] = {}
        self.last_eps: dict[str, torch.Tensor] = {}  # the last perturbation (for inspection and tests)

    def validate(self) -> None:
        c = self.cfg
        if c.rho < 0:
            raise ConfigError(f"ggpo: rho={c.rho} must be >= 0 (0: plain adamw)")
        if not 0 <= c.grad_weight <= 1:
            raise ConfigError(f"ggpo: grad_weight={c.grad_weight} must be in [0, 1]")

    def check(self, params: list[TrainParam]) -> None:
        if not any(t.role in ("A", "B") for t in params):
            self.refuse("LoRA-GGPO perturbs the rows of the factors A and B, but no trainable parameter has role "
                        "A or B", params)

    def build_optimizer(self, params: list[TrainParam]) -> torch.optim.Optimizer:
        self._params = [(t.name, t.param) for t in params if t.role in ("A", "B")]
        return super().build_optimizer(params)

    @torch.no_grad()
    def before_forward(self, step, model, optimizer) -> None:
        self._saved, self.last_eps = [], {}
        if self.cfg.rho == 0:
            return
        gen = torch.Generator().manual_seed(self.cfg.seed * 1_000_003 + step)
        for name, p in self._params:
            eps = ggpo_perturbation(p, self.grad_norms.get(name), self.cfg.rho, self.cfg.grad_weight, gen)
            self._saved.append(p.detach().clone())
            self.last_eps[name] = eps
            p.add_(eps)

    @torch.no_grad()
    def before_step(self, step, model, optimizer) -> None:
        for (name, p), p0 in zip(self._params, self._saved):
            p.copy_(p0)  # exact: the unperturbed values, not θ + ε − ε
        self._saved = []
        for name, p in self._params:
            if p.grad is not None:
                self.grad_norms[name] = p.grad.detach().float().reshape(p.shape[0], -1).norm(dim=1).cpu()

    def state_dict(self) -> dict:
        if self._saved:  # asked mid-step (an interrupt between forward and step): never save a perturbed model
            with torch.no_grad():
                for (name, p), p0 in zip(self._params, self._saved):
                    p.copy_(p0)
            self._saved = []
        return {"grad_norms": dict(self.grad_norms)}

    def load_state_dict(self, state: dict) -> None:
        self.grad_norms = dict(state.get("grad_norms", {}))


@register_procedure("mgpo")
class MGPO(GGPO):
    """``optim.name=mgpo``: LoRA-MGPO (arXiv:2502.14538 v2, the renamed LoRA-GGPO: "Mitigating Double Descent in
    Low-Rank Adaptation via Momentum-Guided Perturbation Optimization"). The perturbation reuses the optimiser's
    momentum instead of random noise, and its size is normalised by an EMA of the gradient norm::

        ε = ρ · m / (ḡ + δ),   ḡ ← β·ḡ + (1 − β)·‖g‖      (per parameter tensor; m = AdamW's exp_avg)

    then, as GGPO: gradient at θ + ε, ε removed exactly, AdamW step from θ. Before the first step (no momentum yet)
    nothing is perturbed. The abstract gives the two ingredients; the exact normalisation (per tensor, ḡ of the
    previous steps' gradient norms, δ = 1e-12) and β = ``ema`` = 0.9 are ours (the paper body and code were not
    available). Needs an optimiser with ``exp_avg`` state (the default AdamW). State: the EMA of each norm."""

    paper = "Chang et al. 2025, arXiv:2502.14538 (v2)"

    @dataclass
    class Config:
        rho: float = 0.05  # perturbation size relative to the normalised momentum
        ema: float = 0.9  # β of the gradient-norm EMA

    def validate(self) -> None:
        if self.cfg.rho < 0:
            raise ConfigError(f"mgpo: rho={self.cfg.rho} must be >= 0 (0: plain adamw)")
        if not 0 <= self.cfg.ema < 1:
            raise ConfigError(f"mgpo: ema={self.cfg.ema} must be in [0, 1)")

    @torch.no_grad()
    def before_forward(self, step, model, optimizer) -> None:
        self._saved, self.last_eps = [], {}
        if self.cfg.rho == 0:
            return
        for name, p in self._params:
            m = optimizer.state.get(p, {}).get("exp_avg")
            gbar = self.grad_norms.get(name)
            eps = None if m is None or gbar is None else self.cfg.rho * m / (float(gbar) + 1e-12)
            self._saved.append(p.detach().clone())
            if eps is not None:
                self.last_eps[name] = eps
                p.add_(eps.to(p.dtype))

    @torch.no_grad()
    def before_step(self, step, model, optimizer) -> None:
        for (name, p), p0 in zip(self._params, self._saved):
            p.copy_(p0)
        self._saved = []
        b = self.cfg.ema
        for name, p in self._params:
            if p.grad is not None:
                n = p.grad.detach().float().norm().cpu()
                old = self.grad_norms.get(name)
                self.grad_norms[name] = n if old is None else b * old + (1 - b) * n
