"""Rank surgery after training for the adaptive-rank methods.

* :func:`truncate`: cut a DyLoRA adapter to rank ``b`` for good (``ΔW = (α/b)·B[:, :b] A[:b]``); any ``b ≤ r``
  works without retraining because DyLoRA trains every prefix rank.
* :func:`to_lora` / :func:`prune_gates`: replace an adapter whose rank is a mask (SoRA gates, AdaLoRA /
  IncreLoRA singular values) by a plain PEFT-compatible LoRA holding only the surviving ranks. Zero gates drop
  out exactly, so the output is unchanged (up to rounding). Modules left with rank 0 lose their adapter.
"""
from __future__ import annotations

import re

import torch
from torch import nn

from .errors import ConfigError
from .attachments import Attachment, Member, get_attachment
from .inject import adapters

__all__ = ["truncate", "to_lora", "prune_gates"]


def _info(model: nn.Module, name: str) -> Attachment:
    return get_attachment(model, name)


def truncate(model: nn.Module, rank: int, name: str = "default") -> nn.Module:
    """Keep the first ``rank`` components of every DyLoRA module of adapter ``name`` (in place).

    The adapter's config is updated (``r = rank``), so saving and reloading give the truncated adapter."""
    info = _info(model, name)
    mods = list(adapters(model, name))
    if not mods or not all(a.nested_ranks for _, a in mods):
        raise ConfigError(f"adapter {name!r} ({info.config.method}) has no nested ranks to truncate; "
                          "truncate() works on DyLoRA adapters")
    if not isinstance(rank, int) or rank < 1:
        raise ConfigError(f"rank must be a positive integer, got {rank!r}")
    for _, a in mods:
        a.truncate(rank)
    cfg = info.config
    cfg.options["r"] = min(rank, cfg.options.get("r", rank))
    cfg.options.pop("eval_rank", None)
    for ov in cfg.overrides.values():
        if "r" in ov:
            ov["r"] = min(ov["r"], rank)
        ov.pop("eval_rank", None)
    return model


@torch.no_grad()
def to_lora(model: nn.Module, name: str = "default") -> nn.Module:
    """Replace adapter ``name`` by a plain LoRA of the ranks it actually uses (``adapter.kept_lowrank()``).

    Each module gets LoRA rank ``k`` = its number of surviving components and ``alpha = k`` (scale 1; the
    method's scale and gates/singular values are folded into ``B``), so the file is an ordinary PEFT LoRA with
    a ``rank_pattern``. Trainable flags are kept.
    """
    from .core import Adapted, get_method

    info = _info(model, name)
    mods = list(adapters(model, name))
    if not mods or not all(a.masked_rank for _, a in mods):
        raise ConfigError(f"adapter {name!r} ({info.config.method}) has no rank mask to prune")
    lora_cls = get_method("lora")
    cfg = info.config
    keep_paths, overrides, members = [], {}, []
    for path, a in mods:
        host: Adapted = model.get_submodule(path)
        lr = a.kept_lowrank()
        train = any(p.requires_grad for p in a.parameters())
        del host.adapters[name]
        if lr is None or lr.A.shape[0] == 0:
            host.active = tuple(n for n in host.active if n != name)
            continue
        k = lr.A.shape[0]
        new = lora_cls(host.base_layer, lora_cls.Config(r=k, alpha=float(k)), a.view)
        dt = lr.A.dtype
        new.to(device=lr.A.device, dtype=dt)
        new.lora_A.weight.copy_(lr.A.reshape(new.lora_A.weight.shape))
        new.lora_B.weight.copy_((lr.B.float() * lr.scale).to(dt).reshape(new.lora_B.weight.shape))
        new.ctx = a.ctx
        new.requires_grad_(train)
        new.train(a.training)
        host.adapters[name] = new
        members.append(Member(path, host, new))
        keep_paths.append(path)
        overrides["^" + re.escape(path) + "$"] = {"r": k, "alpha": float(k)}
    cfg.method, cfg.options = "lora", {"r": 8, "alpha": 8.0}
    cfg.overrides = overrides
    cfg.targets, cfg.exclude, cfg.layers, cfg.layers_pattern = list(keep_paths), None, None, None
    info.method, info.members = lora_cls, members
    info._controller, info._controller_built = None, False  # a plain LoRA needs no schedule
    return model


def prune_gates(model: nn.Module, name: str = "default") -> nn.Module:
    """SoRA after training: drop the zero gates and fold the rest into a plain LoRA (see :func:`to_lora`)."""
    return to_lora(model, name)
