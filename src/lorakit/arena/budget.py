"""Fair budgets: match a method's trainable-parameter count to the LoRA baseline through its rank-like knob.

The count is taken by attaching to the model built on the meta device (shapes only, no weights, no data), so
matching costs milliseconds and works for every registered method with no per-method code.
"""
from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable

import torch
from torch import nn

from ..core import get_method
from ..inject import attach

log = logging.getLogger(__name__)

RANK_KNOBS = ("r", "rank", "init_r", "target_rank", "num_bases", "r_max")


def trainable_count(make_meta: Callable[[], nn.Module], adapter_cfg: dict) -> int:
    """Trainable parameters of ``adapter_cfg`` on a fresh meta-device model."""
    with torch.device("meta"):
        model = make_meta()
    attach(model, adapter_cfg, defer_init=True)
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def rank_knob(method: str) -> str | None:
    fields = {f.name for f in dataclasses.fields(get_method(method).Config)}
    return next((k for k in RANK_KNOBS if k in fields), None)


def match_budget(make_meta: Callable[[], nn.Module], adapter_cfg: dict, target: int,
                 candidates=(1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128)) -> tuple[dict, dict]:
    """Pick the rank-like value whose trainable count is closest to ``target`` (in log ratio).

    Returns (adapter config, info) where info says which knob was used, the count, and whether matching was
    possible (a method whose count does not move with its knob, or has no knob, is reported as unmatched).
    """
    knob = rank_knob(adapter_cfg["method"])
    if knob is None:
        n = trainable_count(make_meta, adapter_cfg)
        return adapter_cfg, {"matched": False, "reason": "no rank-like knob", "trainable": n, "target": target}
    best = None
    counts = {}
    for v in candidates:
        cfg = {**adapter_cfg, knob: v}
        try:
            n = trainable_count(make_meta, cfg)
        except Exception as e:  # some values are invalid for a method (e.g. r > min(d_in, d_out))
            log.debug("budget probe %s=%s failed: %s", knob, v, e)
            continue
        counts[v] = n
        score = abs(torch.log(torch.tensor(max(n, 1) / target)).item())
        if best is None or score < best[0]:
            best = (score, v, n)
    if best is None or len(set(counts.values())) <= 1:
        n = trainable_count(make_meta, adapter_cfg)
        return adapter_cfg, {"matched": False, "reason": f"trainable count does not depend on '{knob}'",
                             "trainable": n, "target": target}
    _, v, n = best
    ok = 0.5 <= n / target <= 2.0
    return {**adapter_cfg, knob: v}, {"matched": ok, "knob": knob, "value": v, "trainable": n, "target": target,
                                     **({} if ok else {"reason": "closest value is more than 2x off"})}
