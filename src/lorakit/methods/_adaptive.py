"""Shared pieces of the adaptive-rank family (AdaLoRA, IncreLoRA, SoRA, DyLoRA).

* :class:`Sensitivity`: AdaLoRA's smoothed importance ``Ī·Ū`` per parameter entry, where ``I = |p ⊙ ∇p|``,
  ``Ī ← β1·Ī + (1−β1)·I`` (sensitivity) and ``Ū ← β2·Ū + (1−β2)·|I − Ī|`` (uncertainty).
* :func:`triplet_scores`: AdaLoRA's score of each rank-1 triplet ``(a_i, e_i, b_i)``:
  ``S_i = s(e_i) + mean_j s(A_ij) + mean_j s(B_ji)``.
* :func:`orth_penalty`: ``‖AAᵀ − I‖_F + ‖BᵀB − I‖_F`` (AdaLoRA/IncreLoRA's orthogonality regulariser).
* :func:`adapters_of`: the ``(path, adapter)`` pairs of one adapter name and class.

Rank changes are masks over preallocated slots: parameter shapes never change during training, so optimisers,
schedulers, checkpoints and ``torch.compile`` graphs stay valid. Physically smaller adapters are produced only
after training (:mod:`lorakit.rank`).
"""
from __future__ import annotations

import torch
from torch import Tensor, nn


def adapters_of(model: nn.Module, name: str, cls: type) -> list[tuple[str, nn.Module]]:
    from ..inject import adapters

    return [(p, a) for p, a in adapters(model, name) if isinstance(a, cls)]


class Sensitivity:
    """EMA sensitivity × uncertainty of ``|p ⊙ ∇p|`` for a set of named tensors (AdaLoRA eq. 8–10)."""

    def __init__(self, beta1: float = 0.85, beta2: float = 0.85):
        if not (0 < beta1 < 1 and 0 < beta2 < 1):
            raise ValueError(f"beta1/beta2 must lie in (0, 1), got {beta1}, {beta2}")
        self.beta1, self.beta2 = beta1, beta2
        self.ipt: dict[str, Tensor] = {}
        self.unc: dict[str, Tensor] = {}

    @torch.no_grad()
    def update(self, key: str, p: Tensor, grad: Tensor | None) -> None:
        if grad is None:
            return
        i = (p.float() * grad.float()).abs()
        if key not in self.ipt:
            self.ipt[key], self.unc[key] = torch.zeros_like(i), torch.zeros_like(i)
        self.ipt[key].mul_(self.beta1).add_(i, alpha=1 - self.beta1)
        self.unc[key].mul_(self.beta2).add_((i - self.ipt[key]).abs(), alpha=1 - self.beta2)

    def score(self, key: str) -> Tensor | None:
        if key not in self.ipt:
            return None
        return self.ipt[key] * self.unc[key]

    def reset(self) -> None:
        self.ipt.clear()
        self.unc.clear()

    def state_dict(self) -> dict:
        return {"ipt": dict(self.ipt), "unc": dict(self.unc)}

    def load_state_dict(self, state: dict) -> None:
        self.ipt, self.unc = dict(state.get("ipt", {})), dict(state.get("unc", {}))


def triplet_scores(sens: Sensitivity, key: str, r: int, device=None) -> Tensor:
    """Score of each of the ``r`` triplets of the module ``key`` (zeros before the first update)."""
    sA, sE, sB = (sens.score(f"{key}.{n}") for n in ("A", "E", "B"))
    if sA is None:
        return torch.zeros(r, device=device)
    return sE.reshape(-1) + sA.mean(1) + sB.mean(0)


def orth_penalty(A: Tensor, B: Tensor) -> Tensor:
    """``‖AAᵀ − I‖_F + ‖BᵀB − I‖_F`` for A (r, d_in), B (d_out, r)."""
    eye = torch.eye(A.shape[0], dtype=A.dtype, device=A.device)
    return torch.linalg.matrix_norm(A @ A.t() - eye) + torch.linalg.matrix_norm(B.t() @ B - eye)
