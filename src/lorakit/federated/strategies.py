"""Server-side aggregation of federated LoRA rounds (pure torch; Flower is not needed here).

Notation (``shared/reference/methods-training.md`` D): K clients with weights ``p_k = n_k / Σn`` (their training
rows), each returning the tensors it trained this round. Every strategy is a function of those tensors:

* **fedit** -- FedIT (Zhang et al. 2024, "Towards Building the Federated GPT: Federated Instruction Tuning",
  arXiv:2305.05644): average every trained tensor, ``Ā = Σp_kA_k``, ``B̄ = Σp_kB_k``. Inexact:
  ``B̄Ā ≠ Σp_kB_kA_k`` in general.
* **ffa** -- FFA-LoRA (Sun, Li, Li, Ding, ICLR 2024, arXiv:2403.12313): A is initialised once from the shared
  adapter seed (the server's attach) and frozen on every client; only B trains and is sent; ``B ← Σp_kB_k``.
  Exact, because ``(Σp_kB_k)A = Σp_kB_kA``. Half the bytes of FedIT when ``d_in = d_out``.
* **fedsb** -- Fed-SB (Singhal, Ponkshe, Vartak, Varshney, Vepakomma 2025, arXiv:2502.15436): LoRA-SB's
  ``ΔW = s·B R A`` with B and A computed once by the server's LoRA-SB init and frozen; only the r×r core R trains
  and is sent; ``R ← Σp_kR_k``. Exact (``B(Σp_kR_k)A = Σp_kBR_kA``), r² numbers per module whatever K is.
  The init's gradient estimate is taken on the server from the training data before the split, as the official
  Fed-SB code does (``fed_sb/fed/CR/train_cr_fed.py`` estimates ``named_grads`` once on the whole training set
  and gives every client the same init): in a privacy-sensitive deployment that sample must be public data.
* **fair** -- LoRA-FAIR (Bian, Wang, Zhang, Xu, ICCV 2025, arXiv:2411.14961): ``Ā``, ``B̄`` as FedIT, the ideal
  ``ΔW = Σp_kB_kA_k``, then a residual correction of B̄ solved on the server::

      ΔB* = argmin_ΔB  S(ΔW, (B̄+ΔB)Ā) + λ‖ΔB‖_F²

  and ``(B̄+ΔB*, Ā)`` is every client's initialisation for the next round (the paper's "Avg-Initial").
  ``fair_solver="cosine"`` (the paper's): S = 1 − cos(vec ΔW, vec (B̄+ΔB)Ā), minimised by ``fair_steps`` Adam
  steps of rate ``fair_lr·‖B̄‖_F/√numel`` from ΔB = 0 (the paper does not publish its server optimiser; we keep the
  best iterate, so the objective never exceeds its value at ΔB = 0, FedIT's). ``fair_solver="frobenius"``: S =
  ‖ΔW − (B̄+ΔB)Ā‖_F², whose minimiser is the ridge solution ``ΔB = (ΔW − B̄Ā)Āᵀ(ĀĀᵀ + λI)⁻¹`` (the catalog's
  proposal, not the paper's; deterministic, tested). We square the regulariser (the catalog writes λ‖ΔB‖):
  it makes the closed form exist and the gradient at ΔB = 0 defined; with agreeing clients both give ΔB* = 0.
* **exact** -- the reference: ``ΔW = Σp_kB_kA_k`` exactly, re-factorised by SVD to the adapter's rank r,
  ``B = U_r√S_r``, ``A = √S_r V_rᵀ`` (the best rank-r approximation, Eckart-Young; exact whenever rank ΔW ≤ r,
  e.g. when the clients' A agree). The truncation error is returned per round.

Every tensor that is not part of an (A, B) pair (a trained classification head, LoRA-SB's R, DoRA's magnitude,
...) is averaged with the same weights (FedAvg), in every strategy.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
import torch
from torch import Tensor

from ..errors import ConfigError

__all__ = ["STRATEGIES", "Pair", "weighted_average", "aggregate", "fair_correction", "exact_refactor",
           "fair_objective", "Strategy"]


@dataclass(frozen=True)
class Pair:
    """The keys of one module's low-rank factors: ``A`` (r, d_in) and ``B`` (d_out, r), ΔW ∝ B·A."""

    A: str
    B: str


@dataclass(frozen=True)
class Strategy:
    """What a strategy needs from the method and the clients.

    ``frozen_roles``: roles the clients never train (their tensors are sent once, with the initial state);
    ``pairs``: it works on (A, B) pairs (FAIR, exact), so the trained roles must include both;
    ``only_roles``: the method may train nothing but these roles (Fed-SB: the core R and a head);
    ``exact``: the aggregated ΔW equals the average of the clients' ΔW;
    ``dp``: differential privacy is supported (the trained factor enters ΔW linearly)."""

    name: str
    paper: str
    frozen_roles: tuple[str, ...] = ()
    pairs: bool = False
    only_roles: tuple[str, ...] | None = None
    exact: bool = False
    dp: bool = False
    extra: dict = field(default_factory=dict)


STRATEGIES: dict[str, Strategy] = {
    "fedit": Strategy("fedit", "Zhang et al. 2024, FedIT, arXiv:2305.05644"),
    "ffa": Strategy("ffa", "Sun et al. 2024, FFA-LoRA, ICLR 2024, arXiv:2403.12313", frozen_roles=("A",),
                    exact=True, dp=True),
    "fedsb": Strategy("fedsb", "Singhal et al. 2025, Fed-SB, arXiv:2502.15436", only_roles=("core", "head"),
                      exact=True, dp=True),
    "fair": Strategy("fair", "Bian et al. 2025, LoRA-FAIR, ICCV 2025, arXiv:2411.14961", pairs=True),
    "exact": Strategy("exact", "exact ΔW averaging, re-factorised by truncated SVD (reference)", pairs=True,
                      exact=True),
}


def weighted_average(states: list[dict[str, Tensor]], weights: list[float]) -> dict[str, Tensor]:
    """``Σ_k p_k · state_k[key]`` for every key (fp32 accumulation, cast back), ``p_k = w_k / Σw``."""
    if not states:
        raise ConfigError("no client results to aggregate")
    tot = float(sum(weights))
    if not tot > 0:
        raise ConfigError(f"client weights {weights} must sum to > 0")
    keys = set(states[0])
    for s in states[1:]:
        if set(s) != keys:
            raise ConfigError(f"clients sent different tensors: {sorted(keys ^ set(s))[:3]}")
    out = {}
    for k in states[0]:
        acc = torch.zeros_like(states[0][k], dtype=torch.float32)
        for s, w in zip(states, weights):
            acc += (w / tot) * s[k].float()
        out[k] = acc.to(states[0][k].dtype)
    return out


def _ideal(states, weights, pair: Pair) -> Tensor:
    tot = float(sum(weights))
    return sum((w / tot) * (s[pair.B].double() @ s[pair.A].double()) for s, w in zip(states, weights))


def fair_objective(dW: Tensor, B: Tensor, A: Tensor, lam: float, solver: str = "cosine") -> float:
    """The LoRA-FAIR server objective at ``B`` (= B̄+ΔB) with ``ΔB = B − B̄`` penalised by the caller."""
    P = (B.double() @ A.double())
    if solver == "frobenius":
        return float((dW.double() - P).pow(2).sum())
    nd, npd = dW.double().norm(), P.norm()
    if nd == 0 or npd == 0:
        return 0.0 if nd == 0 and npd == 0 else 1.0
    return float(1.0 - (dW.double() * P).sum() / (nd * npd))


def fair_correction(dW: Tensor, B_bar: Tensor, A_bar: Tensor, lam: float = 0.01, solver: str = "cosine",
                    steps: int = 100, lr: float = 0.05) -> Tensor:
    """LoRA-FAIR's ΔB for one module (see the module docstring). Returns ΔB in B̄'s dtype."""
    dW, Bb, Ab = dW.double(), B_bar.double(), A_bar.double()
    if solver == "frobenius":
        r = Ab.shape[0]
        R = dW - Bb @ Ab
        return (R @ Ab.t() @ torch.linalg.inv(Ab @ Ab.t() + lam * torch.eye(r, dtype=Ab.dtype))).to(B_bar.dtype)
    if solver != "cosine":
        raise ConfigError(f"federated.fair_solver={solver!r}; valid: cosine, frobenius")
    if float(dW.norm()) == 0.0:
        return torch.zeros_like(B_bar)

    def obj(dB: Tensor) -> Tensor:
        P = (Bb + dB) @ Ab
        cos = (dW * P).sum() / (dW.norm() * P.norm()).clamp_min(1e-300)
        return 1.0 - cos + lam * dB.pow(2).sum()

    dB = torch.zeros_like(Bb, requires_grad=True)
    step = lr * max(float(Bb.norm()) / math.sqrt(Bb.numel()), 1e-8)
    opt = torch.optim.Adam([dB], lr=step)
    best, best_val = torch.zeros_like(Bb), float(obj(torch.zeros_like(Bb)))
    with torch.enable_grad():
        for _ in range(steps):
            opt.zero_grad()
            val = obj(dB)
            if float(val.detach()) < best_val:
                best, best_val = dB.detach().clone(), float(val.detach())
            val.backward()
            opt.step()
        val = float(obj(dB.detach()))
        if val < best_val:
            best = dB.detach().clone()
    return best.to(B_bar.dtype)


def exact_refactor(dW: Tensor, r: int) -> tuple[Tensor, Tensor, float]:
    """``B = U_r√S_r``, ``A = √S_r V_rᵀ`` of ΔW (float64 SVD) and the relative truncation error."""
    U, S, Vh = torch.linalg.svd(dW.double(), full_matrices=False)
    s = S[:r].sqrt()
    B, A = U[:, :r] * s, s[:, None] * Vh[:r]
    err = float(S[r:].pow(2).sum().sqrt() / S.pow(2).sum().sqrt().clamp_min(1e-300)) if S.numel() > r else 0.0
    return B, A, err


def aggregate(name: str, states: list[dict[str, Tensor]], weights: list[float], pairs: list[Pair],
              options: dict | None = None) -> tuple[dict[str, Tensor], dict[str, float]]:
    """One server aggregation: the new global values of the sent tensors, and per-round diagnostics
    (``agg_error``: ‖ΔW_ideal − ΔW_aggregated‖_F / ‖ΔW_ideal‖_F summed over modules, where pairs exist)."""
    if name not in STRATEGIES:
        raise ConfigError(f"federated.strategy={name!r}; valid: {', '.join(STRATEGIES)}")
    o = dict(options or {})
    avg = weighted_average(states, weights)
    num, den, extra = 0.0, 0.0, {}
    usable = [p for p in pairs if p.A in avg and p.B in avg]
    if name in ("fair", "exact") and not usable:
        raise ConfigError(f"federated.strategy={name} needs trained (A, B) factor pairs; this adapter sends none")
    fair_before = fair_after = 0.0
    for p in usable:
        dW = _ideal(states, weights, p)
        if name == "fair":
            lam, solver = float(o.get("fair_lambda", 0.01)), o.get("fair_solver", "cosine")
            fair_before += fair_objective(dW, avg[p.B], avg[p.A], lam, solver)
            dB = fair_correction(dW, avg[p.B], avg[p.A], lam, solver, int(o.get("fair_steps", 100)),
                                 float(o.get("fair_lr", 0.05)))
            avg[p.B] = (avg[p.B].double() + dB.double()).to(avg[p.B].dtype)
            fair_after += fair_objective(dW, avg[p.B], avg[p.A], lam, solver) + lam * float(dB.double().pow(2).sum())
        elif name == "exact":
            r = avg[p.A].shape[0]
            B, A, err = exact_refactor(dW, r)
            avg[p.B], avg[p.A] = B.to(avg[p.B].dtype), A.to(avg[p.A].dtype)
            extra["svd_truncation"] = extra.get("svd_truncation", 0.0) + err / len(usable)
        got = avg[p.B].double() @ avg[p.A].double()
        num += float((dW - got).norm())
        den += float(dW.norm())
    diag = {"agg_error": num / den if den > 0 else 0.0, **extra}
    if name == "fair":
        diag.update(fair_objective_before=fair_before, fair_objective_after=fair_after)
    return avg, diag

