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


def plain_lowrank(model: nn.Module, name: str, who: str, *, linear_only: bool = False) -> tuple[dict, int, float]:
    """``({path: LowRank}, r, s)`` of adapter ``name`` when every matrix is a plain ``s·B·A`` on its unchanged base
    with one rank and one scale (what LoRAM's recovery and PEFT's intruder mitigation rewrite as a LoRA); a
    :class:`~lorakit.errors.LorakitError` naming ``who`` and the offending module otherwise."""
    from .errors import LorakitError
    from .inject import adapters

    src = dict(adapters(model, name))
    if not src:
        raise ConfigError(f"{who}: no adapter named {name!r}")
    facts = {}
    for path, a in src.items():
        lr = a.lowrank()
        if lr is None or getattr(lr, "magnitude", None) is not None or type(a).changes_base(a.cfg) \
                or (linear_only and a.view.kind != "linear"):
            raise LorakitError(f"{who}: the {type(a).name} adapter on '{path}' is not a plain low-rank update "
                               f"(B·A on the unchanged base{', on a linear layer' if linear_only else ''}); use a "
                               "LoRA-form method (lora, qlora, ...)")
        facts[path] = lr
    ranks = {lr.A.shape[0] for lr in facts.values()}
    scales = {round(float(lr.scale), 12) for lr in facts.values()}
    if len(ranks) != 1 or len(scales) != 1:
        raise LorakitError(f"{who}: the adapter's matrices differ in rank {sorted(ranks)} or scale {sorted(scales)}; "
                           "the result is one LoRA config")
    return facts, ranks.pop(), scales.pop()


def attach_plain_lora(model: nn.Module, paths, r: int, scale: float, name: str) -> dict:
    """Attach a plain LoRA ``name`` (rank ``r``, scale ``scale``) to ``paths``; returns ``{path: adapter}``."""
    from .inject import adapters, attach

    attach(model, {"method": "lora", "targets": sorted(paths), "r": r, "alpha": scale * r}, name=name)
    return dict(adapters(model, name))
