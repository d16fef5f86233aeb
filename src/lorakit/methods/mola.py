"""MoLA: "Higher Layers Need More LoRA Experts" (Gao et al. 2024, arXiv:2402.08562).

Layer ℓ holds ``E_ℓ`` LoRA experts on each target linear, top-k softmax routing renormalised over the k selected:
``h = W0 x + Σ_{i∈TopK(p)} w_i · s · B_i A_i x``, ``p = softmax(W_g x)``, ``W_g`` (E_ℓ, d_in),
``A_i`` (r, d_in), ``B_i`` (d_out, r), ``s = α/r``. Trains A, B, W_g. Optional Switch balance loss (``aux_coef``).

Layer-wise expert counts. An adapter only sees its base layer, so the count comes from per-module ``overrides``:
:func:`mola_overrides` maps each targeted module path to ``{"num_experts": E_ℓ}`` from a schedule over the layer
index (``lorakit.targets._layer_index``), e.g. MoLA-▽ ``[2, 4, 6, 8]`` = 4 equal contiguous depth groups (LLaMA-2-7B:
layers 1–8 get 2 experts, ... 25–32 get 8). The overrides are stored in the adapter file, so reloading is exact.
``mola_config(model, targets, schedule, **options)`` returns a complete attach config.
Decisions: the default ``num_experts`` (4) applies to modules outside any layer list; schedules whose length does
not divide the depth give the remainder layers to the last groups (``group = ℓ·len(schedule) // n_layers``).
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from torch import nn

from ..core import register
from ..errors import ConfigError
from ..targets import _layer_index, match
from ._mixture import MixConfig, Mixture


def mola_overrides(model: nn.Module, targets, schedule: list[int], layers_pattern=None) -> dict[str, dict]:
    """``{exact module path (regex-escaped): {"num_experts": E_ℓ}}`` for every module ``targets`` selects."""
    if not schedule or any(int(e) <= 0 for e in schedule):
        raise ConfigError(f"MoLA schedule must be a non-empty list of positive expert counts, got {schedule!r}")
    paths = match(model, targets, layers_pattern=layers_pattern)
    idx = {p: _layer_index(p, layers_pattern) for p in paths}
    known = [i for i in idx.values() if i is not None]
    if not known:
        raise ConfigError("MoLA: none of the targeted modules sits in a numbered layer list (layers.N / h.N / ...)")
    n_layers = max(known) + 1
    return {re.escape(p): {"num_experts": int(schedule[i * len(schedule) // n_layers])}
            for p, i in idx.items() if i is not None}


def mola_config(model: nn.Module, targets, schedule: list[int] = (2, 4, 6, 8), **options) -> dict:
    """An attach config dict for MoLA with the per-layer expert counts of ``schedule``."""
    return {"method": "mola", "targets": targets, **options,
            "overrides": mola_overrides(model, targets, list(schedule), options.get("layers_pattern"))}


@register("mola", family="mixture of LoRA experts", paper="Gao et al. 2024, Higher Layers Need More LoRA Experts "
          "(MoLA), arXiv:2402.08562")
class MoLA(Mixture):
    __doc__ = __doc__

    @dataclass
    class Config(MixConfig):
        r: int = 8
        alpha: float = 16.0
        num_experts: int = 4
        top_k: int = 2
        dropout: float = 0.05
        aux_coef: float = 0.0
