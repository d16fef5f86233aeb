"""``optim.name=gradnormlorp``: GradNormLoRP, gradient weight-normalised low-rank projection (Huang et al. 2024,
"Gradient Weight-normalized Low-rank Projection for Efficient LLM Training", arXiv:2412.19616; official code
``Jhhuangkay/Gradient-Weight-normalized-Low-rank-Projection-for-Efficient-LLM-Training``, ``GradNormLoRP/``).

Each projected matrix (GaLore's selection: 2-D linear weights other than the output head whose smaller side exceeds
``rank``) is weight-normalised row-wise, ``W = m ⊙ V`` with ``m_i = ‖W_i‖`` and unit rows ``V_i = W_i / m_i``; the
magnitude m and the direction V train, the direction's gradient through a GaLore projection::

    g_m,i = ⟨V_i, G_i⟩                     (Σ_j V_ij G_ij)
    g_V   = G − V ⊙ g_m                    (the radial part removed: ⟨g_V,i, V_i⟩ = 0)
    R = project(g_V) (GaLore, rank r, refreshed every T steps),  Adam on R  ->  N_V;   Adam on g_m  ->  N_m
    V' = V − lr·c_t·scale·back(N_V),   m' = m − lr·c_t·N_m,   W ← m' ⊙ V'

(``c_t = √(1−β₂ᵗ)/(1−β₁ᵗ)``, Adam in the Hugging Face/GaLore form, decoupled weight decay on W after the update.)
Both formulas for g_m and g_V are the official ``compute_gradients`` (it does not multiply g_V by m as the chain
rule of ``m ⊙ V`` would; we follow it). The official optimiser keeps full-size Adam moments, applies Adam to the
projected-and-back-projected direction gradient and never writes the weight back (``reconstruct_weight`` is commented
out), so it does not train the model; we implement the paper's method: moments in the projected space (as GaLore,
state m×r or r×n plus the magnitude's 2·d_out), and the weight rebuilt every step. m and V are not stored: they are
re-read from W at every step (V' is not renormalised; the next step's ``‖W_i‖`` absorbs its norm), so W stays the
model's parameter, files and checkpoints are those of any full fine-tune. Other parameters: Adam, as in galore.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .base import register_procedure
from .galore import (GaLore, ProjectedAdamW, _side, adam_direction, adam_step_size, orthogonal_projector, project,
                     project_back)

__all__ = ["GradNormLoRP", "WeightNormProjectedAdamW", "weight_norm_gradients"]


def weight_norm_gradients(W: torch.Tensor, G: torch.Tensor, eps: float = 1e-12):
    """``(m, V, g_m, g_V)`` of the row-wise weight normalisation ``W = m ⊙ V`` for the gradient ``G`` of W."""
    m = W.norm(dim=1) + eps
    V = W / m[:, None]
    g_m = (V * G).sum(dim=1)
    return m, V, g_m, G - V * g_m[:, None]


class WeightNormProjectedAdamW(ProjectedAdamW):
    """ProjectedAdamW whose projected groups (``rank`` and ``weight_norm: True``) train W = m ⊙ V as above."""

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure() if closure is not None else None
        plain = [g for g in self.param_groups if not g.get("weight_norm")]
        saved = self.param_groups
        self.param_groups = plain
        try:
            super().step()
        finally:
            self.param_groups = saved
        for group in (g for g in saved if g.get("weight_norm")):
            for p in group["params"]:
                if p.grad is None:
                    continue
                st = self.state[p]
                if "step" not in st:
                    st["step"] = 0
                m, V, g_m, g_V = weight_norm_gradients(p.detach(), p.grad)
                side = _side(p.shape, group["proj_type"])
                if "projector" not in st or st["step"] % group["update_proj_gap"] == 0:
                    st["projector"] = orthogonal_projector(g_V, group["rank"], side)
                R = project(g_V, st["projector"], side)
                st["step"] += 1
                c = adam_step_size(group["lr"], group["betas"], st["step"])
                N_V = adam_direction(st, R, group["betas"], group["eps"])
                N_m = adam_direction(st, g_m, group["betas"], group["eps"], ("mag_avg", "mag_avg_sq"))
                V = V - c * group["scale"] * project_back(N_V, st["projector"], side)
                m = m - c * N_m
                p.copy_(m[:, None] * V)
                if group["weight_decay"] > 0.0:
                    p.add_(p, alpha=-group["lr"] * group["weight_decay"])
        return loss


@register_procedure("gradnormlorp")
class GradNormLoRP(GaLore):
    __doc__ = __doc__
    paper = "Huang et al. 2024, GradNormLoRP, arXiv:2412.19616"
    family = "memory (gradient projection)"

    @dataclass
    class Config(GaLore.Config):  # the pre-training README: rank 128, galore_scale 0.25, update_proj_gap 250
        update_proj_gap: int = 250

    def _extra(self) -> dict:
        return {"weight_norm": True}

    def build_optimizer(self, params):
        hp = self.hp
        return WeightNormProjectedAdamW(self.param_groups(params), lr=hp.lr, betas=tuple(hp.betas), eps=hp.eps,
                                        weight_decay=hp.weight_decay)
