"""Conversions between adapter forms.

``residual_to_lora``: an adapter trained on a residual base (PiSSA, and any method exposing
``initial_lowrank()``) becomes a plain LoRA of rank 2r on the *original* base, as PEFT's
``path_initial_model_for_weight_conversion``: ``W_res + s·BA = W0 + s·[B | −B₀][A; A₀]``.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from .errors import ConfigError
from .attachments import get_attachment
from .formats.peft import PREFIX
from .formats.peft_lora import PeftLoraConfig


@torch.no_grad()
def residual_to_lora(model: nn.Module, name: str) -> tuple[dict[str, Tensor], dict]:
    att = get_attachment(model, name)
    cfg = att.config
    state: dict[str, Tensor] = {}
    ranks: dict[str, int] = {}
    alphas: dict[str, float] = {}
    rslora = bool(cfg.options.get("rslora", False))
    for m in att.members:
        path, a = m.path, m.adapter
        lr, lr0 = a.lowrank(), a.initial_lowrank()
        if lr0 is None or lr is None or lr.magnitude is not None:
            raise ConfigError(f"method '{a.name}' has no conversion to a plain LoRA on the original base")
        A = torch.cat([lr.A, lr0.A], 0)
        B = torch.cat([lr.B, -lr0.B], 1)
        r = A.shape[0]
        ranks[path] = r
        alphas[path] = lr.scale * (math.sqrt(r) if rslora else r)
        state[f"{PREFIX}{path}.lora_A.weight"] = A.contiguous().cpu()
        state[f"{PREFIX}{path}.lora_B.weight"] = B.contiguous().cpu()
    lcfg = PeftLoraConfig.for_modules(ranks, alphas, use_rslora=rslora)
    r0, alpha0 = lcfg.r, lcfg.lora_alpha
    conf = lcfg.to_dict()
    conf["lorakit"] = {"converted_from": cfg.method,
                       "config": {"method": "lora", "targets": sorted(ranks), "r": r0, "alpha": alpha0,
                                  "rslora": rslora, "overrides": {p: {"r": ranks[p], "alpha": alphas[p]}
                                                                  for p in ranks}},
                       "paths": sorted(ranks)}
    return state, conf
