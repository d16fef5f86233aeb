"""LoRA-LEGO: merging LoRAs by rank-wise clustering (Zhao et al., "Merging LoRAs like Playing LEGO: Pushing the
Modularity of LoRA to Extremes Through Rank-Wise Clustering", ICLR 2025, arXiv:2409.16167). No official code is
public; this follows the paper's description.

Per module, LoRA ``t`` with update ``ΔW_t = s_t B_t A_t = Σ_i s_t b_{t,i} a_{t,i}ᵀ`` is disassembled into its rank
components, the *minimal semantic units* (MSUs) ``(b_{t,i}, a_{t,i})``. They are permutation invariant (reordering
ranks leaves ΔW unchanged) and concatenating the MSUs of several LoRAs sums their updates (``cat``).

1. *Pool*: every MSU of every input, the merge weight and scale folded into ``b``: ``b ← w_t s_t b``.
2. *Canonicalise* (our choice; the paper does not say how it handles the ambiguity ``(b, a) ≡ (cb, a/c) ≡ (−b, −a)``,
   which raw k-means would see as different points): balance ``‖b‖ = ‖a‖`` and flip both so the largest-magnitude
   entry of ``a`` is positive. ``b aᵀ`` is unchanged.
3. *Cluster* the features ``[a; b]`` into ``k`` clusters with k-means (k-means++ seeding from ``seed``, Lloyd
   iterations until the assignment is stable or ``iters``). ``k`` is the merged rank.
4. *Reassemble*: each cluster's centroid ``(b̄_c, ā_c)`` (the mean of its members) is one rank of the merged LoRA:
   ``ΔW = Σ_c b̄_c ā_cᵀ``.
5. *Parameter reweighting* (``reweight=True``): averaging shrinks a centroid ("norm decay"), so ``ā_c`` and ``b̄_c``
   are each rescaled to the mean norm of their members' ``a`` and ``b``.
   *Output reweighting* (the paper's second scale, against the "variance expansion" of the merged output): its exact
   factor is not given in the abstract and we could not verify it, so it is an explicit option ``output_scale``
   (a factor on the merged update, default 1: none) rather than a guess.

With ``k`` = the total rank every cluster is one MSU, reweighting changes nothing, and the result is ``cat``
exactly (tested).
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from ..errors import ConfigError

__all__ = ["lego_merge", "kmeans"]


def kmeans(x: Tensor, k: int, *, iters: int = 100, seed: int = 0) -> Tensor:
    """Cluster the rows of ``x`` (n, d) into ``k``; returns the assignment (n,). k-means++ seeding from a private
    generator (``seed``), then Lloyd's iterations until stable. With ``k == n`` every row is its own cluster."""
    n = x.shape[0]
    if not 1 <= k <= n:
        raise ConfigError(f"LoRA-LEGO: k={k} clusters for {n} rank units (k must be in [1, {n}])")
    if k == n:
        return torch.arange(n)
    g = torch.Generator().manual_seed(int(seed))
    x = x.double()
    cent = [x[int(torch.randint(n, (1,), generator=g))]]
    for _ in range(1, k):
        d2 = torch.cdist(x, torch.stack(cent)).min(1).values ** 2
        p = d2 / d2.sum() if float(d2.sum()) > 0 else torch.full((n,), 1.0 / n, dtype=x.dtype)
        cent.append(x[int(torch.multinomial(p, 1, generator=g))])
    c = torch.stack(cent)
    assign = torch.full((n,), -1, dtype=torch.long)
    for _ in range(iters):
        new = torch.cdist(x, c).argmin(1)
        if torch.equal(new, assign):
            break
        assign = new
        for j in range(k):
            members = x[assign == j]
            if len(members):
                c[j] = members.mean(0)
            else:  # an empty cluster takes the point farthest from its centroid
                far = int(torch.cdist(x, c).min(1).values.argmax())
                c[j] = x[far]
    return assign


def _canonical(a: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
    na, nb = a.norm(dim=1, keepdim=True), b.norm(dim=0, keepdim=True).t()
    c = torch.where((na > 0) & (nb > 0), (nb / na.clamp_min(1e-30)).sqrt(), torch.ones_like(na))
    a, b = a * c, b / c.t()
    idx = a.abs().argmax(1)
    sgn = torch.sign(a.gather(1, idx[:, None]))
    sgn[sgn == 0] = 1
    return a * sgn, b * sgn.t()


def lego_merge(factors: Sequence[tuple[Tensor, Tensor]], weights: Sequence[float], k: int, *,
               reweight: bool = True, output_scale: float = 1.0, iters: int = 100, seed: int = 0,
               canonicalize: bool = True) -> tuple[Tensor, Tensor]:
    """LoRA-LEGO on one module: ``factors`` are ``(A_t (r_t, d_in), s_t B_t (d_out, r_t))``; returns ``(A, B)`` of
    rank ``k`` with ``B A`` the merged update (see the module docstring)."""
    if len(factors) != len(weights):
        raise ConfigError(f"{len(factors)} LoRAs but {len(weights)} weights")
    A = torch.cat([a.float() for a, _ in factors], 0)
    B = torch.cat([b.float() * float(w) for (_, b), w in zip(factors, weights)], 1)
    if canonicalize:
        A, B = _canonical(A, B)
    assign = kmeans(torch.cat([A, B.t()], 1), int(k), iters=iters, seed=seed)
    outA, outB = [], []
    for j in range(int(k)):
        m = assign == j
        a, b = A[m], B[:, m]
        ca, cb = a.mean(0), b.mean(1)
        if reweight and int(m.sum()) > 1:
            na, nb = ca.norm(), cb.norm()
            if na > 0:
                ca = ca * (a.norm(dim=1).mean() / na)
            if nb > 0:
                cb = cb * (b.norm(dim=0).mean() / nb)
        outA.append(ca)
        outB.append(cb)
    return torch.stack(outA, 0), torch.stack(outB, 1) * float(output_scale)
