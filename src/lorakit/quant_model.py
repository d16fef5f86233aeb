"""Quantised bases at the model level: replace a model's ``nn.Linear`` layers by :class:`~lorakit.quant.QuantLinear`
(QLoRA's 4-bit base) and back. Kept apart from :mod:`lorakit.quant` (tensor-level, imported by ``core``) because
changing a model's modules needs the targeting rules and the hosts, which build on ``quant``: no import cycle.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .core import Adapted
from .errors import ConfigError
from .quant import QuantConfig, QuantLinear, dequantize
from .targets import match

__all__ = ["quantize_model", "dequantize_model"]


def _set_module(model: nn.Module, path: str, new: nn.Module) -> None:
    parent, _, leaf = path.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, new)


@torch.no_grad()
def quantize_model(model: nn.Module, targets: Any = "all-linear", cfg: QuantConfig | dict | None = None,
                   exclude: Any = None) -> nn.Module:
    """Replace the matched ``nn.Linear`` modules (PEFT targeting rules; default every linear but the output head)
    by :class:`QuantLinear` in place, before :func:`lorakit.attach`. Returns the same model."""
    cfg = QuantConfig(**cfg) if isinstance(cfg, dict) else (cfg or QuantConfig())
    if any(True for m in model.modules() if isinstance(m, Adapted)):
        raise ConfigError("quantize_model must run before adapters are attached")
    for path in match(model, targets, exclude, None, None):
        m = model.get_submodule(path)
        if type(m) is nn.Linear:
            _set_module(model, path, QuantLinear.from_linear(m, cfg))
    return model


@torch.no_grad()
def dequantize_model(model: nn.Module, dtype: torch.dtype | None = None) -> nn.Module:
    """Replace every :class:`QuantLinear` (hosted or not) by a float ``nn.Linear`` (for exact 16-bit merges)."""
    for path, m in list(model.named_modules()):
        parent = m.base_layer if isinstance(m, Adapted) else m
        if isinstance(parent, QuantLinear):
            if isinstance(m, Adapted) and m.merged_names:
                raise ConfigError(f"'{path}' is merged: unmerge before dequantize_model")
            w = parent.weight.to(dtype or parent.compute_dtype)
            lin = nn.Linear(parent.in_features, parent.out_features, parent.bias is not None, device=w.device,
                            dtype=w.dtype)
            lin.weight.copy_(w)
            if parent.bias is not None:
                lin.bias = parent.bias
            if isinstance(m, Adapted):
                m.base_layer = lin
                for a in m.adapters.values():
                    a._base = (lin,)
                for i, (owner, snap) in enumerate(m._snapshots):  # stashed quantised bases become float too
                    if isinstance(snap, dict):
                        m._snapshots[i] = (owner, dequantize(snap, parent.qcfg, tuple(w.shape), w.dtype))
            else:
                _set_module(model, path, lin)
    return model
