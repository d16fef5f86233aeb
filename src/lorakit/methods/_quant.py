"""Shared helpers of the quantised-base family (QLoRA, LQ-LoRA): simulated quantisation, the LQ decomposition
``W ≈ Q + L1·L2`` and the budgeted per-matrix choice of quantisation configs."""
from __future__ import annotations

import logging
import re
from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor, nn

from .. import quant
from ..errors import ConfigError
from ..quant import QuantConfig, bits_per_weight
from .pissa import svd_top

log = logging.getLogger(__name__)

# LQ-LoRA's search space, reduced: NF-{2,3,4,8} × first-level block {16, 32, 64}, constants 8-bit in blocks of 256.
DEFAULT_CONFIGS = tuple(QuantConfig(bits=b, block=k) for b in (2, 3, 4, 8) for k in (16, 32, 64))


def qcfg_of(cfg: Any) -> QuantConfig:
    return QuantConfig(cfg.bits, cfg.block, cfg.double_quant, cfg.dq_block)


def base_qcfg(adapter: nn.Module, own: QuantConfig) -> QuantConfig:
    """The quantisation in force: a quantised base's own format wins over the method's options."""
    if quant.is_quantized(adapter.base):
        if adapter.base.qcfg != own:
            log.info("base is already quantised as %s; the method's %s is ignored", adapter.base.qcfg, own)
        return adapter.base.qcfg
    return own


def fake_quant(W: Tensor, cfg: QuantConfig) -> Tensor:
    """``dequant(quant(W))`` in fp32: the exact values a quantised base would hold."""
    return quant.dequantize(quant.quantize(W, cfg), cfg, tuple(W.shape), torch.float32)


@torch.no_grad()
def lq_decompose(W: Tensor, r: int, cfg: QuantConfig, iters: int = 20, fisher: Tensor | None = None,
                 niter: int = 0, seed: int = 0) -> tuple[Tensor, Tensor, Tensor, list[float]]:
    """LQ-LoRA's alternating init: from ``Q = 0`` repeat ``L1L2 = SVD_r(W − Q)``, ``Q = quant(W − L1L2)`` and stop
    when the error ``‖W − (Q + L1L2)‖`` (Fisher-weighted when ``fisher`` is given) increases; returns the best
    iterate ``(Q (dequantised), L1 = U√S (d_out, r), L2 = √S Vᵀ (r, d_in), errors)``.

    Fisher variant (the paper's two-sided heuristic): the SVD factorises ``D_r (W − Q) D_c`` with
    ``D_r = diag(√mean_row F)``, ``D_c = diag(√mean_col F)``, and the factors are unscaled afterwards.
    """
    W = W.float()
    Q = torch.zeros_like(W)
    if fisher is not None:
        F = fisher.float().clamp_min(0)
        rw = F.mean(1).clamp_min(1e-12).sqrt()
        cw = F.mean(0).clamp_min(1e-12).sqrt()
    best, errs = None, []
    for _ in range(max(iters, 1)):
        R = W - Q
        if fisher is not None:
            U, S, V = svd_top(rw[:, None] * R * cw[None, :], r, niter, seed)
            L1, L2 = U * S.sqrt() / rw[:, None], S.sqrt()[:, None] * V.t() / cw[None, :]
        else:
            U, S, V = svd_top(R, r, niter, seed)
            L1, L2 = U * S.sqrt(), S.sqrt()[:, None] * V.t()
        Qn = fake_quant(W - L1 @ L2, cfg)
        E = W - Qn - L1 @ L2
        err = float((F * E * E).sum().sqrt() if fisher is not None else E.norm())
        if errs and err > errs[-1]:
            break
        errs.append(err)
        best, Q = (Qn, L1, L2), Qn
    return (*best, errs)


def allocate(mats: dict[str, Tensor], r: int, budget: float, configs: Iterable[QuantConfig] = DEFAULT_CONFIGS,
             fisher: dict[str, Tensor] | None = None, iters: int = 5) -> dict[str, QuantConfig]:
    """Choose one quantisation config per matrix so that the average storage (bits per weight, constants
    included) stays within ``budget`` and the summed squared LQ error is small.

    LQ-LoRA solves this multiple-choice knapsack as an ILP; we run the greedy on each matrix's lower convex hull of
    (cost, error) points, taking the upgrade with the best error drop per extra bit while it fits (optimal for the
    LP relaxation, so within one upgrade of the ILP optimum). Errors come from :func:`lq_decompose` (``iters``).
    """
    configs = list(configs)
    total = sum(W.numel() for W in mats.values())
    hulls: dict[str, list[tuple[float, float, QuantConfig]]] = {}
    for p, W in mats.items():
        pts = []
        for c in configs:
            err = lq_decompose(W, r, c, iters, (fisher or {}).get(p))[3][-1]
            pts.append((bits_per_weight(c) * W.numel(), err * err, c))
        pts.sort(key=lambda t: (t[0], t[1]))
        hull: list[tuple[float, float, QuantConfig]] = []
        for pt in pts:
            if hull and pt[1] >= hull[-1][1]:
                continue  # dominated: costs more, no better
            while len(hull) >= 2 and (hull[-1][1] - hull[-2][1]) * (pt[0] - hull[-2][0]) >= \
                    (pt[1] - hull[-2][1]) * (hull[-1][0] - hull[-2][0]):
                hull.pop()  # not convex
            hull.append(pt)
        hulls[p] = hull
    pos = {p: 0 for p in mats}
    spent = sum(h[0][0] for h in hulls.values())
    cap = budget * total
    if spent > cap + 1e-6:
        raise ConfigError(f"bit budget {budget} is below the cheapest config ({spent / total:.3f} bits per weight)")
    while True:
        best = None
        for p, h in hulls.items():
            i = pos[p]
            if i + 1 < len(h) and spent + h[i + 1][0] - h[i][0] <= cap + 1e-6:
                ratio = (h[i][1] - h[i + 1][1]) / (h[i + 1][0] - h[i][0])
                if best is None or ratio > best[0]:
                    best = (ratio, p)
        if best is None:
            break
        p = best[1]
        spent += hulls[p][pos[p] + 1][0] - hulls[p][pos[p]][0]
        pos[p] += 1
    return {p: hulls[p][pos[p]][2] for p in mats}


def budget_overrides(model: nn.Module, targets: Any, budget: float, r: int = 64, stats: dict | None = None,
                     **kw: Any) -> dict[str, dict]:
    """``AttachConfig.overrides`` that give each targeted matrix of ``model`` its budgeted config, e.g.
    ``attach(model, {"method": "lq_lora", "targets": t, "overrides": budget_overrides(model, t, 2.75)})``.
    ``stats``: :func:`lorakit.calibrate` gradient stats (their ``grad_sq`` weights the errors)."""
    from ..core import LayerView
    from ..targets import match

    mats = {}
    for p in match(model, targets, None, None, None):
        m = model.get_submodule(p)
        mats[p] = LayerView(m).matrix(m.weight).detach().float()
    fisher = {p: s["grad_sq"] for p, s in (stats or {}).items() if "grad_sq" in s}
    plan = allocate(mats, r, budget, fisher=fisher, **kw)
    return {re.escape(p): {"bits": c.bits, "block": c.block, "double_quant": c.double, "dq_block": c.dq_block}
            for p, c in plan.items()}
