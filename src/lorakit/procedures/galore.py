"""``optim.name=galore`` and ``optim.name=fira``: gradient low-rank projection (full-parameter training with a
low-rank optimiser state).

**GaLore** (Zhao et al. 2024, "GaLore: Memory-Efficient LLM Training by Gradient Low-Rank Projection",
arXiv:2403.03507; official code ``jiaweizzhao/GaLore``, package ``galore-torch``). For a projected matrix with
gradient ``G`` (m×n), every ``update_proj_gap`` = T steps (and at the first) the projector is refreshed from the SVD
``G = U S Vᵀ`` (fp32): ``proj_type=std`` takes the right projector ``P = Vᵀ[:r]`` (r×n) when m ≥ n and the low-rank
gradient is ``R = G Pᵀ`` (m×r); otherwise the left projector ``P = U[:, :r]`` (m×r) and ``R = Pᵀ G`` (r×n)
(``reverse_std`` swaps the sides, ``left``/``right`` force one). Adam runs on R::

    M ← β₁M + (1−β₁)R,   V ← β₂V + (1−β₂)R²,   N = M / (√V + ε)
    W ← W − lr·√(1−β₂ᵗ)/(1−β₁ᵗ) · scale·back(N),   then W ← W − lr·wd·W

with ``back(N) = N P`` (right) or ``P N`` (left). The moments are *not* reset when P changes (as in the official
code). Which parameters are projected: 2-D parameters of linear layers (``TrainParam.kind`` linear/conv1d, any
role: a full fine-tune's weights, or LoRA factors; not the output head ``lm_head``/``score``/``classifier``) whose
smaller side exceeds ``rank`` (a matrix with
``min(m, n) ≤ rank`` would keep a state at least as large as Adam's; the official code would still rotate it, we
train it with plain Adam: the one deviation), and whose name matches ``targets`` (a regex searched in the
parameter name; None: all). Embeddings, norms, biases and everything else: the same Adam without projection, as
the official scripts put only the attention/MLP matrices in the GaLore group.

Adam arithmetic follows the official ``galore_torch.AdamW`` exactly (Hugging Face's AdamW form: bias corrections
folded into the step size, ``ε`` added to √V, decoupled weight decay applied *after* the update with the group's
lr), for projected and plain parameters alike, so ``galore-torch`` with the same groups gives the same updates
(tests/test_fullft_galore.py). ``optim.eps`` is used as ε (the package's default is 1e-6; the recipes set it).
Weight decay follows adamw's groups (``optim.weight_decay`` on 2-D and larger, none on vectors). The state (step,
moments of shape m×r or r×n, the projector) lives in the optimiser's ``state_dict``, so ``--resume`` is exact.

**Fira** (Chen et al. 2024, "Fira: Can We Achieve Full-rank Training of LLMs Under Low-rank Constraint?",
arXiv:2410.01623; official ``xichen-fy/Fira``, ``optimizer_torch/fira_adamw.py``). GaLore plus the part of the
gradient the projection discards, scaled by Adam's effect on the low-rank part::

    G_res = G − scale·back(R)                       (the official code includes the scale; the paper writes G − back(R))
    φ_i = ‖N_{·,i}‖ / (‖R_{·,i}‖ + 1e-8)            norms over the rank dimension, one φ per row (right) / column (left)
    S = φ ⊙ G_res                                    (broadcast along the other side)
    limiter (γ = ``limiter``, 1.01): if ‖S‖ > γ‖S_prev‖: S ← S·γ‖S_prev‖/‖S‖; the state keeps the limited norm
    W ← W − lr·√(1−β₂ᵗ)/(1−β₁ᵗ) · (scale·back(N) + S)

The official code multiplies the residual by the bias-corrected step size too; we follow it. The first step has no
previous norm and is not limited. ``alpha`` in Fira's README is GaLore's ``scale`` here.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from ..errors import ConfigError
from .base import Procedure, TrainParam, register_procedure

__all__ = ["GaLore", "Fira", "ProjectedAdamW", "orthogonal_projector", "project", "project_back", "projected"]

_PROJ_TYPES = ("std", "reverse_std", "left", "right")


def _side(shape: torch.Size, proj_type: str) -> str:
    m, n = shape
    if proj_type == "std":
        return "right" if m >= n else "left"
    if proj_type == "reverse_std":
        return "left" if m >= n else "right"
    return proj_type


def orthogonal_projector(G: Tensor, rank: int, side: str) -> Tensor:
    """The top-``rank`` singular vectors of ``G`` (fp32 SVD): (r, n) rows of Vᵀ (right) or (m, r) columns of U
    (left), in G's dtype."""
    U, _, Vh = torch.linalg.svd(G.float(), full_matrices=False)
    P = Vh[:rank, :] if side == "right" else U[:, :rank]
    return P.to(G.dtype)


def project(G: Tensor, P: Tensor, side: str) -> Tensor:
    return G @ P.t() if side == "right" else P.t() @ G


def project_back(R: Tensor, P: Tensor, side: str) -> Tensor:
    return R @ P if side == "right" else P @ R


def adam_direction(st: dict, R: Tensor, betas: tuple[float, float], eps: float,
                   keys: tuple[str, str] = ("exp_avg", "exp_avg_sq")) -> Tensor:
    """Adam's moment update in the space of ``R`` (created as zeros on first use, in ``st[keys]``) and its
    direction ``m / (sqrt(v) + eps)``; the bias correction is in :func:`adam_step_size`. The one Adam of every
    projected optimiser here (GaLore, Fira, FRUGAL, GradNormLoRP), so they cannot drift apart."""
    b1, b2 = betas
    if keys[0] not in st:
        st[keys[0]], st[keys[1]] = torch.zeros_like(R), torch.zeros_like(R)
    m, v = st[keys[0]], st[keys[1]]
    m.mul_(b1).add_(R, alpha=1.0 - b1)
    v.mul_(b2).addcmul_(R, R, value=1.0 - b2)
    return m / v.sqrt().add_(eps)


def adam_step_size(lr: float, betas: tuple[float, float], step: int) -> float:
    """``lr · sqrt(1 − β2^t) / (1 − β1^t)`` (Hugging Face / GaLore form: ε outside the correction)."""
    b1, b2 = betas
    return lr * math.sqrt(1.0 - b2 ** step) / (1.0 - b1 ** step)


class ProjectedAdamW(torch.optim.Optimizer):
    """Adam (Hugging Face/GaLore form, see the module docstring) with GaLore projection for the parameter groups
    that carry ``rank`` (keys ``rank, update_proj_gap, scale, proj_type``) and Fira's residual when they also carry
    ``fira_limiter``. ``state[p]``: ``step`` (int), ``exp_avg``/``exp_avg_sq`` (projected shape), ``projector``
    (projected groups), ``fira_norm`` (Fira)."""

    def __init__(self, params, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-6, weight_decay: float = 0.0):
        super().__init__(params, {"lr": lr, "betas": tuple(betas), "eps": eps, "weight_decay": weight_decay})

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure() if closure is not None else None
        for group in self.param_groups:
            rank = group.get("rank")
            for p in group["params"]:
                if p.grad is None:
                    continue
                g = p.grad
                st = self.state[p]
                if "step" not in st:
                    st["step"] = 0
                if rank is not None:
                    side = _side(p.shape, group["proj_type"])
                    if "projector" not in st or st["step"] % group["update_proj_gap"] == 0:
                        st["projector"] = orthogonal_projector(g, rank, side)
                    R = project(g, st["projector"], side)
                else:
                    R = g
                st["step"] += 1
                N = adam_direction(st, R, group["betas"], group["eps"])
                step_size = adam_step_size(group["lr"], group["betas"], st["step"])
                if rank is not None:
                    P, scale = st["projector"], group["scale"]
                    upd = project_back(N, P, side) * scale
                    if group.get("fira_limiter") is not None:
                        upd = upd + self._fira_residual(st, g, R, N, P, side, scale, group["fira_limiter"])
                    N = upd
                p.add_(N, alpha=-step_size)
                if group["weight_decay"] > 0.0:
                    p.add_(p, alpha=-group["lr"] * group["weight_decay"])
        return loss

    @staticmethod
    def _fira_residual(st: dict, g: Tensor, R: Tensor, N: Tensor, P: Tensor, side: str, scale: float,
                       gamma: float) -> Tensor:
        dim = 1 if side == "right" else 0  # the rank dimension of R and N
        phi = N.norm(dim=dim) / (R.norm(dim=dim) + 1e-8)
        phi = phi.unsqueeze(1) if side == "right" else phi.unsqueeze(0)
        S = (g - project_back(R, P, side) * scale) * phi
        norm = S.norm()
        if "fira_norm" in st:
            lim = torch.clamp(norm / (st["fira_norm"] + 1e-8), min=gamma) / gamma
            S = S / lim
            st["fira_norm"] = norm / lim
        else:
            st["fira_norm"] = norm
        return S


_HEADS = ("lm_head", "score", "classifier")


def is_output_head(t: TrainParam) -> bool:
    """A parameter of the output head (``lm_head``, a classifier ``score``/``classifier``; the names
    ``targets="all-linear"`` leaves out), which GaLore's and FRUGAL's scripts keep in plain Adam."""
    return (t.path or t.name).split(".")[-1] in _HEADS or any(f".{h}." in f".{t.name}." for h in _HEADS)


def projected(t: TrainParam, rank: int, targets: str | None) -> bool:
    """Whether GaLore projects this parameter (see the module docstring)."""
    p = t.param
    return (p.ndim == 2 and t.kind in ("linear", "conv1d") and min(p.shape) > rank and not is_output_head(t)
            and (targets is None or re.search(targets, t.name) is not None))


@register_procedure("galore")
class GaLore(Procedure):
    __doc__ = __doc__
    paper = "Zhao et al. 2024, GaLore, arXiv:2403.03507"
    family = "memory (gradient projection)"

    @dataclass
    class Config:
        rank: int = 128  # r (README pre-training: 128; GLUE fine-tuning: 4 or 8)
        update_proj_gap: int = 200  # T: steps between projector refreshes
        scale: float = 0.25  # α, the update's scale (README pre-training 0.25; GLUE 4)
        proj_type: Literal["std", "reverse_std", "left", "right"] = "std"
        targets: str | None = None  # regex searched in parameter names; None: every 2-D linear parameter

    def validate(self) -> None:
        c = self.cfg
        if c.rank < 1 or c.update_proj_gap < 1:
            raise ConfigError(f"{self.name}: rank={c.rank} and update_proj_gap={c.update_proj_gap} must be >= 1")
        if not c.scale > 0:
            raise ConfigError(f"{self.name}: scale={c.scale} must be > 0")
        if c.targets is not None:
            try:
                re.compile(c.targets)
            except re.error as e:
                raise ConfigError(f"{self.name}: targets={c.targets!r} is not a valid regex ({e})") from None

    def check(self, params: list[TrainParam]) -> None:
        if all(t.adapter_name == "probe" for t in params) and any(t.param.ndim == 2 for t in params):
            return  # a shape-only probe at config resolution (a 512x512 layer): the model's shapes decide later
        if not any(projected(t, self.cfg.rank, self.cfg.targets) for t in params):
            self.refuse(f"no trainable 2-D linear parameter with both sides larger than rank={self.cfg.rank}"
                        + (f" matching targets={self.cfg.targets!r}" if self.cfg.targets else "")
                        + ", so nothing would be projected (lower optim.rank, or train full weights: method full)",
                        params)

    def _extra(self) -> dict:
        return {}

    def param_groups(self, params: list[TrainParam]) -> list[dict]:
        c = self.cfg
        proj_ids = {id(t.param) for t in params if projected(t, c.rank, c.targets)}
        out = []
        for g in super().param_groups(params):
            mine = [p for p in g["params"] if id(p) in proj_ids]
            rest = [p for p in g["params"] if id(p) not in proj_ids]
            if rest:
                out.append({**g, "params": rest})
            if mine:
                out.append({**g, "name": f"{g.get('name', 'group')}:projected", "params": mine, "rank": c.rank,
                            "update_proj_gap": c.update_proj_gap, "scale": c.scale, "proj_type": c.proj_type,
                            **self._extra()})
        return out

    def build_optimizer(self, params: list[TrainParam]) -> torch.optim.Optimizer:
        hp = self.hp
        return ProjectedAdamW(self.param_groups(params), lr=hp.lr, betas=tuple(hp.betas), eps=hp.eps,
                              weight_decay=hp.weight_decay)


@register_procedure("fira")
class Fira(GaLore):
    """Fira: GaLore plus the norm-scaled full-rank residual with the norm-growth limiter (see ``galore``'s
    docstring, second part). Options as galore, plus ``limiter`` (γ, 1.01 hard-coded in the official code)."""

    paper = "Chen et al. 2024, Fira, arXiv:2410.01623"
    family = "memory (gradient projection)"

    @dataclass
    class Config(GaLore.Config):
        limiter: float = 1.01  # γ of the norm-growth limiter

    def validate(self) -> None:
        super().validate()
        if not self.cfg.limiter >= 1.0:
            raise ConfigError(f"fira: limiter={self.cfg.limiter} must be >= 1 (the official γ is 1.01)")

    def _extra(self) -> dict:
        return {"fira_limiter": self.cfg.limiter}
