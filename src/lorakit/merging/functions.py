"""Merge functions on tensors: task arithmetic, TIES, DARE, magnitude pruning, concatenation and the SVD refactoring.

Every function takes ``T`` task tensors of one shape (task vectors ``τ_t``: a ΔW, or one LoRA factor) and their
weights ``w_t`` and returns one tensor; none of them knows about models or adapters (``lorakit.merging.combine``
applies them per module). Notation (docs/merging.md): ``τ̂_t`` is ``τ_t`` after sparsification.

* **Task arithmetic** (Ilharco et al. 2022, arXiv:2212.04089): ``τ = λ Σ_t w_t τ_t``.
* **Magnitude prune**: ``τ̂_t`` keeps the ``k = int(density·numel)`` entries of largest ``|τ_t|`` (per tensor), then
  task arithmetic.
* **TIES** (Yadav et al. 2023, arXiv:2306.01708): trim (magnitude prune, per tensor), elect
  ``γ = sign(Σ_t τ̂_t)`` (``majority_sign="total"``) or ``sign(Σ_t sign τ̂_t)`` (``"frequency"``), ties to ``+1``,
  disjoint merge ``τ = Σ_t [sign τ̂_t = γ] w_t τ̂_t / max(1, #{t : sign τ̂_t = γ})`` (entries that are zero have sign
  0 and never count), then ``λ τ``.
* **DARE** (Yu et al. 2023, arXiv:2311.03099): ``τ̂_t = m_t ⊙ τ_t / density`` with ``m_t ~ Bernoulli(density)``
  (drop rate ``p = 1 − density``; the rescale keeps ``E[τ̂_t] = τ_t``), then task arithmetic (``dare_linear``) or
  TIES' elect + disjoint merge (``dare_ties``).

Choices where the papers leave room, and the two reference implementations:

* ``flavor="peft"`` (default): PEFT's ``merge_utils`` exactly (per-tensor trim with ``k = int(density·numel)``,
  sign election on the *unweighted* ``τ̂``, disjoint mean divided by the agreeing *count*, DARE rescale
  ``1/density`` drawn with ``torch.bernoulli`` from the global generator, as the papers write it). TIES' own code
  trims the top-k over the whole flattened model; PEFT and mergekit trim per tensor, and so do we.
* ``flavor="mergekit"``: mergekit's ``GeneralizedTaskArithmeticMerge`` for full-model merges: weights are applied
  *before* the sign election, TIES divides by the sum of the agreeing *weights* (``normalize``, on by default for
  TIES only), the magnitude trim keeps at least one entry (``max(1, k)``), and DARE rescales each pruned tensor to
  its original L1 norm instead of by ``1/density`` (the same in expectation).

``density >= 1`` never prunes (both references). ``density`` must be in ``[0, 1]``.
"""
from __future__ import annotations

from typing import Literal, Sequence

import torch
from torch import Tensor

from ..errors import ConfigError

__all__ = ["task_arithmetic", "magnitude_prune", "ties", "dare_linear", "dare_ties", "merge_tensors",
           "prune_magnitude", "prune_random", "sign_consensus", "svd_factors", "TENSOR_METHODS"]

Flavor = Literal["peft", "mergekit"]
TENSOR_METHODS = ("linear", "ties", "dare_linear", "dare_ties", "magnitude_prune")


def _check(tensors: Sequence[Tensor], weights: Sequence[float], density: float | None = None) -> Tensor:
    if not tensors:
        raise ConfigError("nothing to merge: no task tensors")
    if len(tensors) != len(weights):
        raise ConfigError(f"{len(tensors)} task tensors but {len(weights)} weights")
    shape = tensors[0].shape
    for t in tensors:
        if t.shape != shape:
            raise ConfigError(f"task tensors of different shapes: {tuple(shape)} and {tuple(t.shape)}")
    if density is not None and not (0.0 <= float(density) <= 1.0):
        raise ConfigError(f"density must be in [0, 1], got {density}")
    w = torch.as_tensor([float(x) for x in weights], dtype=tensors[0].dtype, device=tensors[0].device)
    return w.view(-1, *([1] * len(shape)))


def prune_magnitude(t: Tensor, density: float, flavor: Flavor = "peft") -> Tensor:
    """Keep the ``int(density·numel)`` entries of largest magnitude (mergekit: at least one), zero the rest."""
    if density >= 1:
        return t
    k = int(density * t.numel())
    if flavor == "mergekit":
        if density <= 0 or t.numel() == 0:
            return torch.zeros_like(t)
        k = max(1, k)
    mask = torch.zeros(t.numel(), dtype=t.dtype, device=t.device)
    mask[torch.topk(t.abs().reshape(-1), k=k, largest=True).indices] = 1
    return t * mask.view_as(t)


def prune_random(t: Tensor, density: float, flavor: Flavor = "peft") -> Tensor:
    """DARE's drop-and-rescale: each entry kept with probability ``density`` (``torch.bernoulli`` on the global
    generator: seed it for a reproducible merge). ``peft``: survivors ``/ density``; ``mergekit``: rescaled to the
    original L1 norm."""
    if density >= 1:
        return t
    work = t.float() if t.dtype in (torch.float16,) else t
    mask = torch.bernoulli(torch.full_like(work, float(density)))
    out = work * mask
    if flavor == "mergekit":
        before, after = work.abs().sum(), out.abs().sum()
        if before >= 1e-7 and after >= 1e-7:
            out = out * (before / after)
    elif density > 0:
        out = out / density
    return out.to(t.dtype)


def sign_consensus(stacked: Tensor, method: Literal["total", "frequency"] = "total") -> Tensor:
    """The mask ``[sign τ_t = γ]`` of TIES' elected sign ``γ`` (ties to +1) over dim 0."""
    sign = stacked.sign()
    if method == "total":
        mag = stacked.sum(0)
    elif method == "frequency":
        mag = sign.sum(0)
    else:
        raise ConfigError(f"majority_sign={method!r}; valid: 'total', 'frequency'")
    return sign == torch.where(mag >= 0, 1, -1).to(sign.dtype)


def _sparsify(tensors, density, how, flavor):
    if how == "magnitude":
        return [prune_magnitude(t, density, flavor) for t in tensors]
    if how == "random":
        return [prune_random(t, density, flavor) for t in tensors]
    return list(tensors)


def _combine(tensors, weights, density, sparsify, consensus, flavor, majority_sign, normalize, lam):
    w = _check(tensors, weights, density)
    if sparsify is not None and density is None:
        raise ConfigError("this merge method needs a density in [0, 1] (the share of entries each task keeps)")
    ts = _sparsify(tensors, density, sparsify, flavor)
    stacked = torch.stack(ts, 0)
    weighted = stacked * w
    if consensus:
        mask = sign_consensus(weighted if flavor == "mergekit" else stacked, majority_sign)
        out = (weighted * mask).sum(0)
        if flavor == "mergekit":
            if normalize:
                div = (w * mask).sum(0)
                div[div == 0] = 1
                out = out / div
        else:
            out = out / mask.sum(0).clamp(min=1.0)
    else:
        out = weighted.sum(0)
        if flavor == "mergekit" and normalize:
            div = w.sum(0)
            div[div.abs() < 1e-8] = 1
            out = out / div
    return out * lam if lam != 1 else out


def task_arithmetic(tensors: Sequence[Tensor], weights: Sequence[float], *, lam: float = 1.0,
                    flavor: Flavor = "peft", normalize: bool = False) -> Tensor:
    """``λ Σ_t w_t τ_t`` (mergekit ``normalize``: divided by ``Σ_t w_t``)."""
    return _combine(tensors, weights, None, None, False, flavor, "total", normalize, lam)


def magnitude_prune(tensors: Sequence[Tensor], weights: Sequence[float], density: float, *, lam: float = 1.0,
                    flavor: Flavor = "peft") -> Tensor:
    """Per-tensor magnitude trim to ``density``, then task arithmetic."""
    return _combine(tensors, weights, density, "magnitude", False, flavor, "total", False, lam)


def ties(tensors: Sequence[Tensor], weights: Sequence[float], density: float, *,
         majority_sign: Literal["total", "frequency"] = "total", lam: float = 1.0, flavor: Flavor = "peft",
         normalize: bool = True) -> Tensor:
    """TIES-Merging: trim, elect sign, disjoint merge (see the module docstring for the two flavors)."""
    return _combine(tensors, weights, density, "magnitude", True, flavor, majority_sign, normalize, lam)


def dare_linear(tensors: Sequence[Tensor], weights: Sequence[float], density: float, *, lam: float = 1.0,
                flavor: Flavor = "peft") -> Tensor:
    """DARE drop-and-rescale, then task arithmetic."""
    return _combine(tensors, weights, density, "random", False, flavor, "total", False, lam)


def dare_ties(tensors: Sequence[Tensor], weights: Sequence[float], density: float, *,
              majority_sign: Literal["total", "frequency"] = "total", lam: float = 1.0, flavor: Flavor = "peft",
              normalize: bool = False) -> Tensor:
    """DARE drop-and-rescale, then TIES' sign election and disjoint merge (mergekit: not normalised by default)."""
    return _combine(tensors, weights, density, "random", True, flavor, majority_sign, normalize, lam)


def merge_tensors(method: str, tensors: Sequence[Tensor], weights: Sequence[float], *, density: float | None = None,
                  majority_sign: str = "total", lam: float = 1.0, flavor: Flavor = "peft",
                  normalize: bool | None = None) -> Tensor:
    """Dispatch by name: ``linear`` (task arithmetic), ``ties``, ``dare_linear``, ``dare_ties``, ``magnitude_prune``.
    ``normalize`` (mergekit flavor only) defaults to mergekit's per-method default (True for TIES only)."""
    if method == "linear":
        return task_arithmetic(tensors, weights, lam=lam, flavor=flavor, normalize=bool(normalize))
    if method == "magnitude_prune":
        return magnitude_prune(tensors, weights, density, lam=lam, flavor=flavor)
    if method == "ties":
        return ties(tensors, weights, density, majority_sign=majority_sign, lam=lam, flavor=flavor,
                    normalize=True if normalize is None else normalize)
    if method == "dare_linear":
        return dare_linear(tensors, weights, density, lam=lam, flavor=flavor)
    if method == "dare_ties":
        return dare_ties(tensors, weights, density, majority_sign=majority_sign, lam=lam, flavor=flavor,
                         normalize=bool(normalize))
    raise ConfigError(f"unknown tensor merge method {method!r}; valid: {', '.join(TENSOR_METHODS)}")


def svd_factors(delta: Tensor, rank: int | None) -> tuple[Tensor, Tensor]:
    """``ΔW ≈ B A`` by the truncated SVD (Eckart–Young: the best rank-``rank`` approximation), balanced
    ``B = U_k √S_k``, ``A = √S_k V_kᵀ`` (computed in float32 at least). ``rank=None``: the numerical rank (singular
    values above ``max(S)·max(d)·eps``), which reproduces ``ΔW`` to rounding."""
    d = delta.float() if delta.dtype in (torch.float16, torch.bfloat16) else delta
    U, S, Vh = torch.linalg.svd(d, full_matrices=False)
    if rank is None:
        tol = (S[0] if S.numel() else 0.0) * max(d.shape) * torch.finfo(d.dtype).eps
        rank = max(1, int((S > tol).sum()))
    k = min(int(rank), S.numel())
    root = S[:k].sqrt()
    return root[:, None] * Vh[:k], U[:, :k] * root
