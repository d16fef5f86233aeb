"""bitsandbytes bases (``bnb.nn.Linear4bit`` / ``Linear8bitLt``, as ``from_pretrained(quantization_config=
BitsAndBytesConfig(...))`` builds them) through :mod:`lorakit.quant`'s weight-I/O registry.

Imported lazily by :func:`lorakit.quant.get_weight` & co. the first time a layer whose class lives in the
``bitsandbytes`` package is met, so ``import lorakit`` never imports bitsandbytes. Both classes subclass
``nn.Linear`` (``in_features``/``out_features``), so targeting and :class:`~lorakit.core.LayerView` see them as
linear layers; their weight Parameter holds packed codes, and what the host reads or writes goes through here:

* read: the dense weight (``dequantize_4bit`` / ``int8_vectorwise_dequant``), in the dtype bitsandbytes returns;
* write (merging, residual inits): the dense weight requantised into a *new* parameter exactly as PEFT's bnb LoRA
  layers merge (4-bit: ``Params4bit(w, **old.__dict__)``; 8-bit: ``Int8Params(w, has_fp16_weights=...)``, then the
  matmul state reset), so a merged lorakit model and a merged PEFT model hold the same codes. Requantising is lossy
  (bitsandbytes' own rounding), as in PEFT;
* snapshot/restore: the parameter object itself (and for 8-bit the row scales of the matmul state), since a write
  always replaces the parameter and never changes it in place: unmerge and detach put the original storage back
  bit-exactly.

Before registering, each kind is probed once per device type with a tiny tensor (quantise, dequantise); a
bitsandbytes without a backend for that device raises :class:`~lorakit.errors.TargetError` naming the version,
the device and what failed, instead of an obscure error deep inside a forward pass.
"""
from __future__ import annotations

import logging

import torch
from torch import Tensor, nn

from ..errors import TargetError
from ..quant import register_weight_io

log = logging.getLogger(__name__)

try:
    import bitsandbytes as bnb
except Exception as e:  # noqa: BLE001 - any import failure is "bitsandbytes is not usable here"
    raise TargetError(f"this model has bitsandbytes layers but bitsandbytes cannot be imported ({e}); install it "
                      "with `pip install bitsandbytes`") from None

__all__ = ["dense_weight", "check_backend"]

_PROBED: dict[tuple[str, str], str | None] = {}  # (kind, device type) -> None (works) or the failure


def check_backend(kind: str, device: torch.device) -> None:
    """Raise :class:`TargetError` if this bitsandbytes cannot quantise and dequantise ``kind`` ("4bit" | "8bit")
    weights on ``device`` (probed once per device type with a (2, 64) tensor)."""
    key = (kind, device.type)
    if key not in _PROBED:
        try:
            w = torch.linspace(-1, 1, 128, device=device).view(2, 64)
            if kind == "4bit":
                q, st = bnb.functional.quantize_4bit(w, blocksize=64, quant_type="nf4")
                bnb.functional.dequantize_4bit(q, st)
            else:
                cb, scb, _ = bnb.functional.int8_vectorwise_quant(w.half())
                bnb.functional.int8_vectorwise_dequant(cb, scb)
            _PROBED[key] = None
        except Exception as e:  # noqa: BLE001 - reported with what is missing
            _PROBED[key] = f"{type(e).__name__}: {e}"
    err = _PROBED[key]
    if err is not None:
        raise TargetError(f"bitsandbytes {getattr(bnb, '__version__', '?')} cannot (de)quantise {kind} weights on "
                          f"{device.type} ({err}): lorakit needs bitsandbytes' {device.type} backend to read and "
                          f"merge these layers (bitsandbytes>=0.45 has CPU and CUDA backends; move the model to a "
                          "device it supports)")


# --- 4-bit ------------------------------------------------------------------------------------------------------
def _get4(m: nn.Module) -> Tensor:
    w = m.weight
    check_backend("4bit", w.device)
    qs = w.quant_state
    if qs is None:  # not quantised yet (still on the meta/cpu device before .to()): a float weight
        return w.data
    if getattr(qs, "packing_format_for_cpu", False):
        return _dequant_cpu_packed(w.data, qs)
    return bnb.functional.dequantize_4bit(w.data, qs)


def _dequant_cpu_packed(data: Tensor, qs) -> Tensor:
    """bitsandbytes' CPU fast path (AVX512-BF16, eval, no grad) repacks a 4-bit weight in place on its first
    forward: codes reordered for its kernel, the block constants un-nested and rounded to bf16 ([K/block, N]).
    ``dequantize_4bit`` does not read that layout; decode it without touching the layer: the codes through
    bitsandbytes' own inverse (applied to a copy of the state), the constants as the kernel uses them."""
    import copy

    inverse = getattr(bnb.functional, "_convert_weight_packed_for_cpu_inverse", None)
    if inverse is None:
        raise TargetError(f"bitsandbytes {getattr(bnb, '__version__', '?')} stores this 4-bit weight in its CPU "
                          "packed format but has no inverse to read it")
    st = copy.copy(qs)
    st.original_nested = False  # keep the kernel's constants; do not re-quantise them
    codes, st = inverse(data, st)
    st = copy.copy(st)
    st.absmax = qs.absmax.T.reshape(-1).float()
    st.nested = False
    return bnb.functional.dequantize_4bit(codes, st)


def _set4(m: nn.Module, dense: Tensor) -> None:
    old = m.weight
    check_backend("4bit", old.device)
    kwargs = {k: v for k, v in old.__dict__.items() if not k.startswith("_")}  # PEFT's merge does the same
    kwargs.pop("data", None)
    kwargs["bnb_quantized"] = False
    kwargs["requires_grad"] = False
    kwargs.pop("quant_state", None)
    m.weight = bnb.nn.Params4bit(dense.to("cpu"), **kwargs).to(old.device)


def _snap4(m: nn.Module):
    return m.weight  # writes replace the parameter, never change it: the object is an exact snapshot


def _restore4(m: nn.Module, snap) -> None:
    m.weight = snap


# --- 8-bit ------------------------------------------------------------------------------------------------------
_STATE_KEYS = ("CB", "SB", "SCB", "SBt", "CBt")


def _scb(m: nn.Module) -> Tensor | None:
    st = getattr(m, "state", None)
    scb = getattr(st, "SCB", None)
    return scb if scb is not None else getattr(m.weight, "SCB", None)


def _get8(m: nn.Module) -> Tensor:
    w = m.weight
    if w.dtype != torch.int8:  # has_fp16_weights (trainable 8-bit) or not quantised yet: a float weight
        return w.data
    check_backend("8bit", w.device)
    scb = _scb(m)
    if scb is None:
        raise TargetError(f"{type(m).__name__} holds int8 codes but no row scales (SCB): a bitsandbytes layer in an "
                          "unexpected state")
    return bnb.functional.int8_vectorwise_dequant(w.data, scb.to(w.device))


def _set8(m: nn.Module, dense: Tensor) -> None:
    old = m.weight
    if old.dtype != torch.int8:
        old.data.copy_(dense.to(old.dtype))
        return
    check_backend("8bit", old.device)
    m.weight = bnb.nn.Int8Params(dense.to("cpu"), requires_grad=False,
                                 has_fp16_weights=old.has_fp16_weights).to(old.device)
    m.state.reset_grads()  # the next forward takes the new codes and scales (as PEFT's merge)


def _snap8(m: nn.Module):
    w = m.weight
    if w.dtype != torch.int8:  # a float weight is written in place: copy it
        return w.detach().clone()
    return (w, getattr(w, "CB", None), getattr(w, "SCB", None),
            {k: getattr(m.state, k, None) for k in _STATE_KEYS})


def _restore8(m: nn.Module, snap) -> None:
    if isinstance(snap, Tensor):
        m.weight.data.copy_(snap)
        return
    w, cb, scb, state = snap
    m.weight = w
    if w.dtype == torch.int8:
        w.CB, w.SCB = cb, scb
        for k, v in state.items():
            setattr(m.state, k, v)


def dense_weight(m: nn.Module) -> Tensor:
    """The dequantised weight of a bitsandbytes linear layer, (out_features, in_features)."""
    return _get4(m) if isinstance(m, bnb.nn.Linear4bit) else _get8(m)


register_weight_io(bnb.nn.Linear4bit, _set4, _snap4, _restore4, _get4)
register_weight_io(bnb.nn.Linear8bitLt, _set8, _snap8, _restore8, _get8)
log.debug("registered the weight I/O of bitsandbytes %s", getattr(bnb, "__version__", "?"))
