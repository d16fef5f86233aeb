"""Quantised frozen bases in pure torch (runs on CPU): NormalFloat-k blockwise quantisation as QLoRA/bitsandbytes.

Format (``bits=4, block=64, double=True, dq_block=256`` is bitsandbytes' NF4 with ``compress_statistics``):

* the weight is flattened (row-major, zero-padded to a multiple of ``block``) and cut into blocks of ``block``;
  each block keeps ``absmax = max|w|`` and every element the index of the nearest NF-k level to ``w/absmax``;
* codes are packed MSB-first into a uint8 stream (4 bits: first element in the high nibble, as bitsandbytes);
* double quantisation (QLoRA §3): ``offset = mean(absmax)``; ``absmax − offset`` is quantised blockwise
  (``dq_block`` constants per block) to 8 bits with bitsandbytes' signed *dynamic* map, one fp32 absmax per
  ``dq_block`` constants, so the constants cost ``8/64 + 32/(64·256) ≈ 0.127`` bits per weight instead of 0.5;
* ``dequantize``: ``w = code[idx] · absmax_block``.

:class:`QuantLinear` is an ``nn.Linear`` subclass that allocates no float weight: it stores the packed codes and
constants as buffers and exposes ``weight`` as a read-only *property* that dequantises on access, so
:func:`lorakit.core.adaptable`, ``LayerView``, ``init_from`` and "all-linear" targeting work unchanged. Writes go
through :func:`set_weight` / :func:`snapshot` / :func:`restore` (a tiny registry keyed by module type; plain
modules copy into ``.weight``), which the host uses for merging, residual inits and detach. Writing a float matrix
into a ``QuantLinear`` requantises it (lossy: logged once); :func:`restore` puts the stored buffers back bit-exactly.

This module is tensor-level only and imports nothing of lorakit but its errors (``core`` builds on it); replacing a
model's layers is :mod:`lorakit.quant_model` (``quantize_model`` / ``dequantize_model``).
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .errors import ConfigError

log = logging.getLogger(__name__)

__all__ = ["NF4", "QuantConfig", "nf_code", "dynamic_code", "quantize", "dequantize", "pack", "unpack",
           "QuantLinear", "quantize_model", "dequantize_model", "is_quantized", "get_weight", "set_weight",
           "snapshot", "restore", "register_weight_io", "register_lazy_weight_io", "has_weight_io", "model_bytes",
           "bits_per_weight"]

# The 16 NF4 levels of QLoRA / bitsandbytes (fp32 values as bitsandbytes stores them).
NF4 = torch.tensor([-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
                    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
                    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
                    0.7229568362236023, 1.0])
_NF_OFFSET = 0.9677083  # QLoRA: the outermost quantile, (1 − 1/(2·15) + 1 − 1/(2·16)) / 2


@dataclass(frozen=True)
class QuantConfig:
    bits: int = 4  # NF-k levels: 2, 3, 4 (NF4) or 8
    block: int = 64
    double: bool = True  # 8-bit dynamic quantisation of the absmax constants
    dq_block: int = 256

    def __post_init__(self):
        if self.bits not in (2, 3, 4, 8) or self.block <= 0 or self.dq_block <= 0:
            raise ConfigError(f"unsupported quantisation {self}: bits in 2, 3, 4, 8 and positive block sizes")


def bits_per_weight(cfg: QuantConfig) -> float:
    """Storage cost per weight, constants included (QLoRA: 4 + 8/64 + 32/(64·256) ≈ 4.127 for NF4+DQ)."""
    if cfg.double:
        return cfg.bits + 8 / cfg.block + 32 / (cfg.block * cfg.dq_block)
    return cfg.bits + 32 / cfg.block


def nf_code(bits: int) -> Tensor:
    """NormalFloat-k levels: normal quantiles, asymmetric so that 0 is exact, normalised to [−1, 1]."""
    if bits == 4:
        return NF4.clone()
    half = 2 ** (bits - 1)
    nd = lambda p: torch.special.ndtri(p.double())  # noqa: E731
    pos = nd(torch.linspace(_NF_OFFSET, 0.5, half + 1, dtype=torch.float64)[:-1])
    neg = -nd(torch.linspace(_NF_OFFSET, 0.5, half, dtype=torch.float64)[:-1])
    v = torch.cat([pos, torch.zeros(1, dtype=torch.float64), neg]).sort().values
    return (v / v.abs().max()).float()


def dynamic_code() -> Tensor:
    """bitsandbytes' signed 8-bit dynamic map (7 exponent bits): ±10^(e−6)·(bucket means of linspace(0.1, 1))
    with 2^e buckets for exponent e = 0..6, plus 0 and 1 (256 sorted values)."""
    vals = [0.0, 1.0]
    for e in range(7):
        edges = torch.linspace(0.1, 1, 2 ** e + 1)
        means = ((edges[:-1] + edges[1:]) / 2 * 10.0 ** (e - 6)).tolist()
        vals += means + [-m for m in means]
    return torch.tensor(sorted(vals), dtype=torch.float32)


_CODES: dict[Any, Tensor] = {}


def _code(key) -> Tensor:
    if key not in _CODES:
        _CODES[key] = dynamic_code() if key == "dynamic" else nf_code(key)
    return _CODES[key]


def _nearest(x: Tensor, code: Tensor) -> Tensor:
    """Index of the nearest level (ties to the lower one), without an (n, levels) temporary."""
    code = code.to(x.device)
    return torch.bucketize(x, (code[1:] + code[:-1]) / 2).to(torch.uint8)


def _blockwise(x: Tensor, block: int, code: Tensor) -> tuple[Tensor, Tensor]:
    flat = x.reshape(-1).float()
    pad = (-flat.numel()) % block
    blocks = F.pad(flat, (0, pad)).view(-1, block)
    absmax = blocks.abs().amax(1)
    scaled = blocks / torch.where(absmax > 0, absmax, torch.ones_like(absmax))[:, None]
    return _nearest(scaled.clamp(-1, 1).reshape(-1), code), absmax


def pack(idx: Tensor, bits: int) -> Tensor:
    """k-bit codes -> uint8 stream, MSB first (4 bits: ``byte = c0 << 4 | c1`` as bitsandbytes)."""
    if bits == 8:
        return idx.to(torch.uint8)
    if bits == 4:
        idx = F.pad(idx, (0, idx.numel() % 2))
        return (idx[0::2] << 4) | idx[1::2]
    shifts = torch.arange(bits - 1, -1, -1, device=idx.device, dtype=torch.uint8)
    bitstream = ((idx[:, None] >> shifts) & 1).reshape(-1)
    bitstream = F.pad(bitstream, (0, (-bitstream.numel()) % 8)).view(-1, 8)
    weights = (2 ** torch.arange(7, -1, -1, device=idx.device)).to(torch.uint8)
    return (bitstream * weights).sum(1, dtype=torch.uint8)


def unpack(data: Tensor, bits: int, n: int) -> Tensor:
    if bits == 8:
        return data[:n].long()
    if bits == 4:
        return torch.stack([data >> 4, data & 15], 1).reshape(-1)[:n].long()
    bitstream = ((data[:, None] >> torch.arange(7, -1, -1, device=data.device, dtype=torch.uint8)) & 1).reshape(-1)
    bitstream = bitstream[: n * bits].view(n, bits).long()
    return (bitstream << torch.arange(bits - 1, -1, -1, device=data.device)).sum(1)


def quantize(w: Tensor, cfg: QuantConfig = QuantConfig()) -> dict[str, Tensor]:
    """A tensor -> ``{"codes": uint8, "absmax": fp32 | uint8, ["absmax2": fp32, "offset": fp32 scalar]}``."""
    idx, absmax = _blockwise(w.detach(), cfg.block, _code(cfg.bits))
    out = {"codes": pack(idx[: w.numel()], cfg.bits)}  # ceil(n·bits/8) bytes
    if cfg.double:
        offset = absmax.mean()
        qa, absmax2 = _blockwise(absmax - offset, cfg.dq_block, _code("dynamic"))
        out.update(absmax=qa[: absmax.numel()], absmax2=absmax2, offset=offset.reshape(()))
    else:
        out["absmax"] = absmax
    return out


def _pair_table(bits: int, device) -> Tensor:
    """(256, 2) fp32: a packed 4-bit byte -> its two levels (high nibble first), so dequantising is one gather."""
    key = ("pairs", bits, str(device))
    if key not in _CODES:
        code = _code(bits)
        b = torch.arange(256)
        _CODES[key] = torch.stack([code[b >> 4], code[b & 15]], 1).contiguous().to(device)
    return _CODES[key]


def _absmax(q: dict[str, Tensor], cfg: QuantConfig, n_blocks: int) -> Tensor:
    absmax = q["absmax"]
    if not cfg.double:
        return absmax
    code8 = _code("dynamic").to(absmax.device)
    scaled = code8[absmax.long()].view(-1)
    scaled = F.pad(scaled, (0, (-n_blocks) % cfg.dq_block)).view(-1, cfg.dq_block) * q["absmax2"][:, None]
    return scaled.reshape(-1)[:n_blocks] + q["offset"]


def dequantize(q: dict[str, Tensor], cfg: QuantConfig, shape: tuple[int, ...], dtype=torch.float32) -> Tensor:
    n = math.prod(shape)
    n_blocks = -(-n // cfg.block)
    absmax = _absmax(q, cfg, n_blocks)
    if cfg.bits == 4 and cfg.block % 2 == 0:
        # fast path (every QLoRA layer): one gather of level pairs by byte, then one in-place scale per block;
        # the same values as the general path below (tested), without its int64 index and padded copies
        codes = q["codes"]
        levels = torch.empty((codes.numel(), 2), dtype=torch.float32, device=codes.device)
        torch.index_select(_pair_table(4, codes.device), 0, codes.int(), out=levels)
        levels = levels.view(-1)
        if levels.numel() != n_blocks * cfg.block:
            levels = F.pad(levels[:n], (0, n_blocks * cfg.block - n))
        w = levels.view(n_blocks, cfg.block).mul_(absmax[:, None]).view(-1)
        return (w if w.numel() == n else w[:n]).view(shape).to(dtype)
    levels = F.pad(_code(cfg.bits).to(absmax.device)[unpack(q["codes"], cfg.bits, n)], (0, n_blocks * cfg.block - n))
    return (levels.view(n_blocks, cfg.block) * absmax[:, None]).reshape(-1)[:n].view(shape).to(dtype)


# ----------------------------------------------------------------------------------------------------------------
class QuantLinear(nn.Linear):
    """A frozen ``nn.Linear`` stored quantised (see the module docstring). ``weight`` dequantises on access into
    ``compute_dtype``; forward = dequantise-then-matmul. The bias (if any) stays a float parameter."""

    _KEYS = ("codes", "absmax", "absmax2", "offset")

    def __init__(self, in_features: int, out_features: int, bias: bool = True, cfg: QuantConfig = QuantConfig(),
                 compute_dtype: torch.dtype = torch.float32, device=None):
        nn.Module.__init__(self)  # no float weight is allocated
        self.in_features, self.out_features, self.qcfg, self.compute_dtype = in_features, out_features, cfg, \
            compute_dtype
        for k in self._KEYS:
            self.register_buffer(k, None)
        self.bias = nn.Parameter(torch.zeros(out_features, device=device, dtype=compute_dtype),
                                 requires_grad=False) if bias else None

    @classmethod
    def from_linear(cls, lin: nn.Linear, cfg: QuantConfig = QuantConfig()) -> "QuantLinear":
        q = cls(lin.in_features, lin.out_features, lin.bias is not None, cfg, lin.weight.dtype, lin.weight.device)
        q.set_weight(lin.weight.detach(), warn=False)
        if lin.bias is not None:
            q.bias = nn.Parameter(lin.bias.detach().clone(), requires_grad=lin.bias.requires_grad)
        return q

    @property
    def weight(self) -> Tensor:  # type: ignore[override]
        q = {k: getattr(self, k) for k in self._KEYS if getattr(self, k) is not None}
        return dequantize(q, self.qcfg, (self.out_features, self.in_features), self.compute_dtype)

    @torch.no_grad()
    def set_weight(self, w: Tensor, warn: bool = True) -> None:
        if tuple(w.shape) != (self.out_features, self.in_features):
            raise ConfigError(f"QuantLinear.set_weight: shape {tuple(w.shape)} != {(self.out_features, self.in_features)}")
        if warn:
            _warn_once("writing into a quantised base requantises it (lossy); merged 4-bit weights differ from the "
                       "trained adapter. For an exact merge use lorakit.quant.dequantize_model(model) first.")
        for k, v in quantize(w, self.qcfg).items():
            setattr(self, k, v)

    def forward(self, x: Tensor) -> Tensor:
        bias = None if self.bias is None else self.bias.to(x.dtype)
        if torch.is_grad_enabled() and x.requires_grad:
            return _DequantLinear.apply(x, self, bias)
        return F.linear(x, self.weight.to(x.dtype), bias)

    def extra_repr(self) -> str:
        c = self.qcfg
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, " \
               f"NF{c.bits} block={c.block}" + (f" double_quant(8bit, {c.dq_block})" if c.double else "")


class _DequantLinear(torch.autograd.Function):
    """``x·dequant(W)ᵀ + b`` that keeps no float weight for the backward: plain ``F.linear`` would save the
    dequantised weight of every layer until the backward (the whole float model again, which is what QLoRA saves);
    as bitsandbytes' 4-bit matmul, the weight is dequantised a second time in the backward instead. The base weight
    is frozen (a ``QuantLinear`` has no weight parameter), so only ``x`` and the bias get gradients."""

    @staticmethod
    def forward(ctx, x: Tensor, mod: "QuantLinear", bias: Tensor | None) -> Tensor:
        ctx.mod = mod
        return F.linear(x, mod.weight.to(x.dtype), bias)

    @staticmethod
    def backward(ctx, g: Tensor):
        gx = g @ ctx.mod.weight.to(g.dtype) if ctx.needs_input_grad[0] else None
        gb = g.reshape(-1, g.shape[-1]).sum(0) if ctx.needs_input_grad[2] else None
        return gx, None, gb


_WARNED: set[str] = set()


def _warn_once(msg: str) -> None:
    if msg not in _WARNED:
        _WARNED.add(msg)
        log.warning(msg)


# --- weight I/O registry: how the host reads, writes, stashes and restores a base layer's weight --------------------
_IO: list[tuple[type, Callable, Callable, Callable, Callable | None]] = []  # (type, set, snapshot, restore, get)
# storage types from other libraries, registered on first sight of one of their layers (so importing lorakit never
# imports them): top-level package of the layer's class -> the lorakit module whose import registers them
_LAZY: dict[str, str] = {"bitsandbytes": "lorakit.integrations.bnb"}
_LAZY_DONE: set[str] = set()


def register_weight_io(tp: type, set_fn: Callable, snap_fn: Callable, restore_fn: Callable,
                       get_fn: Callable | None = None) -> None:
    """Teach lorakit to read and write another storage type (bnb / torchao layers, ...). Later registrations win.

    ``get_fn(m) -> Tensor``: the dense weight in the layer's native layout (default ``m.weight``);
    ``set_fn(m, w)``: store a dense weight (requantising); ``snap_fn(m) -> snapshot`` / ``restore_fn(m, snapshot)``:
    an exact copy of the storage and putting it back bit-exactly."""
    _IO.insert(0, (tp, set_fn, snap_fn, restore_fn, get_fn))


def register_lazy_weight_io(package: str, module: str) -> None:
    """Register the weight I/O of ``package``'s layers by importing ``module`` the first time a layer whose class
    lives in ``package`` is met (the import must call :func:`register_weight_io`)."""
    _LAZY[package] = module
    _LAZY_DONE.discard(package)


def _io(m: nn.Module):
    e = next((e for e in _IO if isinstance(m, e[0])), None)
    if e is None:
        pkg = type(m).__module__.partition(".")[0]
        if pkg in _LAZY and pkg not in _LAZY_DONE:
            import importlib

            importlib.import_module(_LAZY[pkg])  # registers (or raises an error naming what is missing)
            _LAZY_DONE.add(pkg)
            e = next((e for e in _IO if isinstance(m, e[0])), None)
    return e


def has_weight_io(m: nn.Module) -> bool:
    """Whether ``m``'s weight storage has registered readers/writers (loading a lazy integration if needed)."""
    return _io(m) is not None


def get_weight(m: nn.Module) -> Tensor:
    """The dense weight of module ``m`` in its native layout (dequantised for quantised storage)."""
    e = _io(m)
    return e[4](m) if e is not None and e[4] is not None else m.weight


@torch.no_grad()
def set_weight(m: nn.Module, w: Tensor) -> None:
    """Write a native-layout weight into module ``m`` (requantising quantised storage)."""
    e = _io(m)
    if e is not None:
        e[1](m, w)
    else:
        m.weight.copy_(w.to(m.weight.dtype))


def snapshot(m: nn.Module) -> Any:
    """An exact copy of ``m``'s weight storage (for bit-exact unmerge/detach)."""
    e = _io(m)
    return e[2](m) if e is not None else m.weight.detach().clone()


@torch.no_grad()
def restore(m: nn.Module, snap: Any) -> None:
    e = _io(m)
    if e is not None:
        e[3](m, snap)
    else:
        m.weight.copy_(snap)


register_weight_io(QuantLinear, lambda m, w: m.set_weight(w),
                   lambda m: {k: getattr(m, k).clone() for k in QuantLinear._KEYS if getattr(m, k) is not None},
                   lambda m, s: [setattr(m, k, s.get(k)) for k in QuantLinear._KEYS])


def is_quantized(m: nn.Module) -> bool:
    return isinstance(m, QuantLinear)


def model_bytes(model: nn.Module) -> int:
    """Bytes held by the model's parameters and buffers (quantised storage counted as stored)."""
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        if id(t) not in seen:
            seen.add(id(t))
            total += t.numel() * t.element_size()
    return total


def __getattr__(name: str):
    """``lorakit.quant.quantize_model`` / ``dequantize_model`` live in :mod:`lorakit.quant_model` (they change the
    model's modules, which needs the targeting and host code that itself builds on this module); re-exported here
    lazily, so importing ``lorakit.quant`` imports neither ``core`` nor ``inject``."""
    if name in ("quantize_model", "dequantize_model"):
        from . import quant_model

        return getattr(quant_model, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
