"""LaMDA++ rank allocation from the normalized energy of the pretrained weight spectra (used with ``lamda``)."""
from __future__ import annotations

import re

import torch
from torch import nn

from ..core import Adapted, LayerView
from ..errors import ConfigError

__all__ = ["lamda_plus_ranks"]


@torch.no_grad()
def lamda_plus_ranks(model: nn.Module, targets, budget: int, r_min: int = 1, r_max: int | None = None,
                     exclude=None) -> dict[str, dict[str, int]]:
    """LaMDA++ rank allocation: ``{escaped path: {"r": k}}`` for ``AttachConfig.overrides``.

    Each target's spectrum σ gives the normalized energy ``p_i = σ_i² / Σσ²`` and its effective rank
    ``exp(H(p))`` (entropy of the energy distribution). The total ``budget`` (sum of ranks over modules) is split
    in proportion to the effective ranks (largest remainders), clamped to ``[r_min, min(r_max, d_out, d_in)]``.
    Decision: the paper's exact allocation rule is not public; this is the "normalized spectrum energy" idea made
    concrete. Usage: ``attach(model, {"method": "lamda", "targets": t, "overrides": lamda_plus_ranks(model, t, B)})``.
    """
    from ..targets import match

    paths = match(model, targets, exclude)
    if budget < r_min * len(paths):
        raise ConfigError(f"budget={budget} is below r_min × {len(paths)} modules")
    eff, caps = [], []
    for p in paths:
        m = model.get_submodule(p)
        base = m.base_layer if isinstance(m, Adapted) else m
        W = LayerView(base).matrix(base.weight).float()
        e = torch.linalg.svdvals(W).pow(2)
        e = e / e.sum().clamp_min(1e-30)
        eff.append(float(torch.exp(-(e * e.clamp_min(1e-30).log()).sum())))
        caps.append(min(min(W.shape), r_max or min(W.shape)))
    share = [budget * x / sum(eff) for x in eff]
    ranks = [min(c, max(r_min, int(s))) for s, c in zip(share, caps)]
    for i in sorted(range(len(paths)), key=lambda i: int(share[i]) - share[i]):  # largest remainder first
        if sum(ranks) >= budget:
            break
        if ranks[i] < caps[i]:
            ranks[i] += 1
    return {re.escape(p): {"r": k} for p, k in zip(paths, ranks)}
