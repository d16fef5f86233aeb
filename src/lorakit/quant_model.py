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

__all__ = ["quantize_model", "dequantize_model", "load_quantized"]


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


# --- loading a quantised model one tensor at a time ------------------------------------------------------------------
_ST_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
              "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
              "BOOL": torch.bool}


def _safetensors_files(path) -> list:
    from pathlib import Path

    d = Path(path)
    index = d / "model.safetensors.index.json"
    if index.is_file():
        import json

        return sorted({d / f for f in json.loads(index.read_text())["weight_map"].values()})
    one = d / "model.safetensors"
    if one.is_file():
        return [one]
    raise ConfigError(f"{d} has no model.safetensors (or index): quantise-on-load reads safetensors only; load the "
                      "model normally and call lorakit.quant_model.quantize_model")


def _stream_tensors(file):
    """``(name, tensor)`` for each tensor of a safetensors file, read with ``pread`` one tensor at a time (no
    memory map, so the file's pages never count in this process's resident memory)."""
    import json
    import os
    import struct

    fd = os.open(file, os.O_RDONLY)
    try:
        (n,) = struct.unpack("<Q", os.pread(fd, 8, 0))
        header = json.loads(os.pread(fd, n, 8))
        header.pop("__metadata__", None)
        for name, e in sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][0]):
            dt = _ST_DTYPES.get(e["dtype"])
            if dt is None:
                raise ConfigError(f"{file}: tensor {name} has dtype {e['dtype']}, which quantise-on-load cannot read")
            a, b = e["data_offsets"]
            buf = bytearray(b - a)
            if b > a:
                with memoryview(buf) as mv:
                    got = os.preadv(fd, [mv], 8 + n + a)
                if got != b - a:
                    raise ConfigError(f"{file}: tensor {name} is truncated")
                t = torch.frombuffer(buf, dtype=dt)
            else:
                t = torch.empty(0, dtype=dt)
            yield name, t.reshape(e["shape"])
    finally:
        os.close(fd)


def _malloc_trim():
    """glibc's ``malloc_trim(0)`` (a no-op elsewhere): quantising leaves freed float temporaries in the allocator's
    heap, which would otherwise keep the process's resident memory near the float model's size."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        fn = libc.malloc_trim
    except (OSError, AttributeError):
        return lambda: None
    return lambda: fn(0)


@torch.no_grad()
def load_quantized(path, auto_class: str = "AutoModelForCausalLM", dtype: torch.dtype = torch.float32,
                   cfg: QuantConfig | dict | None = None, targets: Any = "all-linear", exclude: Any = None) -> nn.Module:
    """A Hugging Face model from a local directory with its matched linear layers quantised AS THEY ARE READ:
    the model is built with its parameters on the meta device, each tensor of the safetensors file(s) is read on its
    own (``pread``, no memory map) and either quantised into its :class:`QuantLinear` or kept as a parameter, so the
    float model never exists whole (peak memory ≈ the quantised model + one float tensor). The layers, codes and
    constants are those :func:`quantize_model` gives after a float load (same targets, same ``quantize``)."""
    import transformers
    from accelerate import init_empty_weights

    qcfg = QuantConfig(**cfg) if isinstance(cfg, dict) else (cfg or QuantConfig())
    files = _safetensors_files(path)  # before anything is built
    conf = transformers.AutoConfig.from_pretrained(path)
    with init_empty_weights(include_buffers=False):  # parameters on meta; buffers (rotary tables) real
        model = getattr(transformers, auto_class).from_config(conf, dtype=dtype)
    quantized = {}
    for p in match(model, targets, exclude, None, None):
        m = model.get_submodule(p)
        if type(m) is nn.Linear:
            q = QuantLinear(m.in_features, m.out_features, m.bias is not None, qcfg, dtype, "cpu")
            _set_module(model, p, q)
            quantized[p] = q
    owners = {}
    for mp, mod in model.named_modules():
        for leaf, _ in list(mod.named_parameters(recurse=False)) + list(mod.named_buffers(recurse=False)):
            owners[f"{mp}.{leaf}" if mp else leaf] = (mod, leaf)
    for mp, q in quantized.items():
        owners[f"{mp}.weight"] = (q, "weight")
    seen = set()
    trim = _malloc_trim()
    for file in files:
        for key, t in _stream_tensors(file):
            if key not in owners:
                raise ConfigError(f"{path}: tensor {key} matches no parameter of {type(model).__name__} (renamed "
                                  "checkpoint keys are not supported by quantise-on-load; load the model normally and "
                                  "call lorakit.quant_model.quantize_model)")
            mod, leaf = owners[key]
            seen.add(key)
            if isinstance(mod, QuantLinear) and leaf == "weight":
                mod.set_weight(t.to(dtype), warn=False)
            elif leaf in mod._parameters:
                old = mod._parameters[leaf]
                val = t.to(dtype) if t.is_floating_point() else t
                # the read buffer becomes the parameter's storage (no second copy)
                mod._parameters[leaf] = nn.Parameter(val, requires_grad=old.requires_grad)
            else:
                mod._buffers[leaf] = t.to(mod._buffers[leaf].dtype)
            del t
            trim()
    if getattr(model.config, "tie_word_embeddings", False) and hasattr(model, "tie_weights"):
        model.tie_weights()
    missing = [n for n, p in model.named_parameters() if p.is_meta]
    if missing:
        raise ConfigError(f"{path}: no tensor in the checkpoint for {missing[:5]} ({len(missing)} parameters)")
    return model.eval()
