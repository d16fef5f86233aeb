"""Adapter bank: many adapters resident at once on ONE shared base model, one adapter id per batch row.

``y_b = W x_b + bias + s_i B_i A_i x_b`` with ``i = ids[b]`` (``-1`` = base only), computed for the whole batch
with gathered batched matmuls (punica BGMV/SGMV semantics, pure torch; the reference for any fused kernel):
``H = bmm(x[rows], A[slots]ᵀ)``, ``y[rows] += bmm(H, (sB)[slots]ᵀ)``.

Layout (mixed ranks, no padding to the largest): each targeted layer keeps one *rank bucket* per distinct rank,
``A_r`` (cap, r, d_in) and ``(sB)_r`` (cap, r, d_out) with the scale folded into B. An adapter gets one global slot
and, per rank it uses, one bucket slot that is the same in every layer, so the per-batch gather plan (which rows go
to which bucket, at which slot) depends only on the layer's rank layout and is computed once per ``set_ids`` for
each distinct layout (usually one), not per layer. Rows of one rank bucket share one gather + two ``bmm``.

DoRA (``LowRank.magnitude`` set) is served with its gain cached at load time (W is frozen):
``g = m / ‖W + sBA‖_row`` and ``y = g ⊙ (W x + s·B A x) + bias`` (bias unscaled).

Residual-init methods (PiSSA: base replaced by ``W − s·B₀A₀``) are served on the ORIGINAL base as the exact rank-2r
LoRA ``s·[B | −B₀][A; A₀]``. A method whose ``lowrank()`` is None is refused with an error naming it.

The bank is a host-level mechanism: :func:`install` replaces each targeted ``nn.Linear`` of the base model by a
:class:`BankLinear` that reads the bank's current plan; :func:`set_ids` sets the per-row ids (tensor data: no
recompiles of the model code; the plan itself is data-dependent eager work).
"""
from __future__ import annotations

import importlib
import logging
import math
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

from ..config import AttachConfig
from ..core import Adapted, LayerView, LowRankConfig, get_method, scale_of
from ..errors import AdapterFileError, ConfigError, LorakitError
from ..formats.peft import PREFIX, WEIGHTS_NAME, confined, read_adapter_config, read_tensors
from ..targets import match

log = logging.getLogger(__name__)

__all__ = ["ServedAdapter", "AdapterBank", "BankLinear", "install", "set_ids", "read_served", "served_from_model"]


@dataclass
class ServedAdapter:
    """An adapter prepared for the bank: per layer path ``(A (r,d_in), sB (d_out,r), gain (d_out,) | None)``."""

    name: str
    method: str
    layers: dict[str, tuple[Tensor, Tensor, Tensor | None]] = field(default_factory=dict)
    source: str | None = None

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for v in self.layers.values() for t in v if t is not None)

    @property
    def ranks(self) -> set[int]:
        return {a.shape[0] for a, _, _ in self.layers.values()}


# ----------------------------------------------------------------------------------------------------------------
class BankLinear(nn.Module):
    """Replaces one ``nn.Linear``: ``y = base(x)`` plus the gathered low-rank terms of the bank's plan."""

    def __init__(self, base: nn.Linear, bank: "AdapterBank", path: str):
        super().__init__()
        self.base_layer = base
        self.path = path
        self.__dict__["bank"] = bank  # not a submodule
        self.A: dict[int, Tensor] = {}
        self.Bt: dict[int, Tensor] = {}
        self.gain: Tensor | None = None  # (cap, d_out) DoRA gains (1 where unused)
        self.rank_of = torch.zeros(0, dtype=torch.long)  # global slot -> rank at this layer (0 = absent)
        self.layout = 0
        self._w_sq: Tensor | None = None
        self._gcache: tuple | None = None  # (plan, {rank: gathered (A, sBᵀ)}) of the last reused plan

    @property
    def weight(self) -> Tensor:
        return self.base_layer.weight

    @property
    def bias(self) -> Tensor | None:
        return self.base_layer.bias

    def __getattr__(self, item):
        try:
            return super().__getattr__(item)
        except AttributeError:
            if item == "base_layer":
                raise
            return getattr(self.base_layer, item)

    def forward(self, x: Tensor) -> Tensor:
        y = self.base_layer(x)
        plan = self.bank.plan
        if plan is None:
            return y
        groups, drows, dslots = plan.layers[self.layout]
        if not groups:
            return y
        if x.shape[0] != self.bank.ids.shape[0]:
            raise ConfigError(f"the bank has adapter ids for {self.bank.ids.shape[0]} rows but '{self.path}' got a "
                              f"batch of {x.shape[0]}: call set_ids() with one id per batch row")
        xs = x.reshape(x.shape[0], -1, x.shape[-1]) if x.dim() != 3 else x
        ys = y.reshape(y.shape[0], -1, y.shape[-1]) if y.dim() != 3 else y
        if xs.dtype != self.base_layer.weight.dtype:
            xs = xs.to(self.base_layer.weight.dtype)
        for r, rows, bslots in groups:
            Ag, Bg = self._gathered(plan, r, bslots)
            if rows is None:
                h = torch.bmm(xs, Ag.transpose(1, 2))
                ys.baddbmm_(h, Bg) if ys.is_contiguous() else ys.add_(torch.bmm(h, Bg))
            else:
                h = torch.bmm(xs[rows], Ag.transpose(1, 2))
                ys.index_add_(0, rows, torch.bmm(h, Bg).to(ys.dtype))
        if drows is not None and self.gain is not None:
            b = self.base_layer.bias
            g = self.gain[dslots].unsqueeze(1)
            yd = ys[drows]
            yd = (yd - b) * g + b if b is not None else yd * g
            ys[drows] = yd
        return y

    def _gathered(self, plan: "_Plan", r: int, bslots: Tensor) -> tuple[Tensor, Tensor]:
        """Each row's (A, sBᵀ) at rank ``r``. Gathering copies them; a plan that is used again (the decode steps of
        an unchanged batch) keeps its gathered copies, so the copy is paid once per batch membership, not per step."""
        if self._gcache is not None:
            if self._gcache[0] is plan:
                hit = self._gcache[1].get(r)
                if hit is not None:
                    return hit
            else:
                self._gcache = None  # a new batch: free the old copies first
        got = self.A[r][bslots], self.Bt[r][bslots]
        if plan.cache:
            if self._gcache is None:  # (a cache of another plan was dropped above)
                self._gcache = (plan, {})
            self._gcache[1][r] = got
        return got

    # --- storage (engine thread only) ------------------------------------------------------------------------
    def _ensure(self, r: int, cap_bucket: int, cap_global: int) -> None:
        w = self.base_layer.weight
        d_out, d_in = w.shape
        if r and (r not in self.A or self.A[r].shape[0] < cap_bucket):
            old_a, old_b = self.A.get(r), self.Bt.get(r)
            a = torch.zeros(cap_bucket, r, d_in, dtype=w.dtype, device=w.device)
            b = torch.zeros(cap_bucket, r, d_out, dtype=w.dtype, device=w.device)
            if old_a is not None:
                a[:old_a.shape[0]] = old_a
                b[:old_b.shape[0]] = old_b
            self.A[r], self.Bt[r] = a, b
        if self.rank_of.shape[0] < cap_global:
            ro = torch.zeros(cap_global, dtype=torch.long)
            ro[:self.rank_of.shape[0]] = self.rank_of
            self.rank_of = ro
        if self.gain is not None and self.gain.shape[0] < cap_global:
            g = torch.ones(cap_global, d_out, dtype=w.dtype, device=w.device)
            g[:self.gain.shape[0]] = self.gain
            self.gain = g

    def w_sq(self) -> Tensor:
        if self._w_sq is None:
            self._w_sq = self.base_layer.weight.detach().float().pow(2).sum(1)
        return self._w_sq

    def extra_repr(self) -> str:
        return f"ranks={sorted(self.A)}"


# ----------------------------------------------------------------------------------------------------------------
class _Plan:
    """The gather plan of one id vector: per layer layout, ``(groups, dora_rows, dora_slots)``."""

    __slots__ = ("ids", "layers", "fits", "cache")

    def __init__(self, ids: Tensor, layers: list, fits: bool):
        self.ids, self.layers, self.fits = ids, layers, fits
        self.cache = False  # set once the plan is reused (and its gathered weights fit the budget)


class AdapterBank:
    """Adapters resident on one base model. ``add``/``remove``/``set_ids`` must not run concurrently with a forward
    (the engine calls them between steps); :func:`read_served` (file reading, DoRA norms) is thread-safe."""

    def __init__(self, model: nn.Module, layers: dict[str, BankLinear], gather_cache_mb: float = 2048):
        self.model = model
        self.layers = layers
        self.slots: dict[str, int] = {}  # adapter name -> global slot
        self.info: dict[str, ServedAdapter] = {}
        self.free: list[int] = []
        self.cap = 0
        self.bucket_slot: dict[tuple[int, int], int] = {}  # (global slot, rank) -> bucket slot
        self.bucket_free: dict[int, list[int]] = {}
        self.bucket_n: dict[int, int] = {}
        self.bslot_of: dict[int, Tensor] = {}  # rank -> (cap,) bucket slot per global slot
        self.is_dora = torch.zeros(0, dtype=torch.bool)
        self.layouts: list[Tensor] = []
        self.plan: _Plan | None = None
        self._plans: list[_Plan] = []  # the last few plans, newest first
        self.gather_cache_mb = gather_cache_mb
        self.ids: Tensor | None = None
        self.lock = threading.RLock()

    # --- membership ------------------------------------------------------------------------------------------
    def __contains__(self, name: str) -> bool:
        return name in self.slots

    def __len__(self) -> int:
        return len(self.slots)

    def slot(self, name: str | None) -> int:
        if name is None:
            return -1
        if name not in self.slots:
            raise ConfigError(f"adapter {name!r} is not loaded in the bank; loaded: {sorted(self.slots)[:20]}")
        return self.slots[name]

    @torch.no_grad()
    def add(self, sa: ServedAdapter) -> int:
        """Install a prepared adapter; returns its global slot."""
        with self.lock:
            if sa.name in self.slots:
                raise ConfigError(f"adapter {sa.name!r} is already loaded")
            unknown = [p for p in sa.layers if p not in self.layers]
            if unknown:
                raise AdapterFileError(f"adapter {sa.name!r} targets '{unknown[0]}', which the bank does not host")
            if not self.free:
                new = max(8, self.cap * 2)
                self.free.extend(range(new - 1, self.cap - 1, -1))  # pop() gives the lowest slot
                self.cap = new
                self._grow_global()
            gs = self.free.pop()
            dora = any(g is not None for _, _, g in sa.layers.values())
            for r in sa.ranks:
                fl = self.bucket_free.setdefault(r, [])
                if fl:
                    bs = fl.pop()
                else:
                    bs = self.bucket_n.get(r, 0)
                    self.bucket_n[r] = bs + 1
                self.bucket_slot[(gs, r)] = bs
                if r not in self.bslot_of:
                    self.bslot_of[r] = torch.zeros(self.cap, dtype=torch.long)
                self.bslot_of[r][gs] = bs
            for path, (A, sB, g) in sa.layers.items():
                lay = self.layers[path]
                r = A.shape[0]
                bs = self.bucket_slot[(gs, r)]
                lay._ensure(r, _cap_for(self.bucket_n[r]), self.cap)
                lay.A[r][bs] = A.to(lay.A[r].dtype)
                lay.Bt[r][bs] = sB.t().to(lay.Bt[r].dtype)
                lay.rank_of[gs] = r
                if g is not None or (dora and lay.gain is not None):
                    if lay.gain is None:
                        w = lay.base_layer.weight
                        lay.gain = torch.ones(self.cap, w.shape[0], dtype=w.dtype, device=w.device)
                    lay.gain[gs] = 1 if g is None else g.to(lay.gain.dtype)
            self.is_dora[gs] = dora
            self.slots[sa.name] = gs
            self.info[sa.name] = sa
            self._relayout()
            return gs

    @torch.no_grad()
    def remove(self, name: str) -> None:
        with self.lock:
            gs = self.slots.pop(name)
            sa = self.info.pop(name)
            for lay in self.layers.values():
                if gs < lay.rank_of.shape[0]:
                    lay.rank_of[gs] = 0
                if lay.gain is not None:
                    lay.gain[gs] = 1
            for r in sa.ranks:
                self.bucket_free[r].append(self.bucket_slot.pop((gs, r)))
            self.is_dora[gs] = False
            self.free.append(gs)
            self._relayout()

    def _grow_global(self) -> None:
        d = torch.zeros(self.cap, dtype=torch.bool)
        d[:self.is_dora.shape[0]] = self.is_dora
        self.is_dora = d
        for r, t in list(self.bslot_of.items()):
            n = torch.zeros(self.cap, dtype=torch.long)
            n[:t.shape[0]] = t
            self.bslot_of[r] = n
        for lay in self.layers.values():
            lay._ensure(0, 0, self.cap)

    def _relayout(self) -> None:
        keys: dict[bytes, int] = {}
        self.layouts = []
        for lay in self.layers.values():
            if lay.rank_of.shape[0] < self.cap:
                ro = torch.zeros(self.cap, dtype=torch.long)
                ro[:lay.rank_of.shape[0]] = lay.rank_of
                lay.rank_of = ro
            k = lay.rank_of.numpy().tobytes()
            if k not in keys:
                keys[k] = len(self.layouts)
                self.layouts.append(lay.rank_of.clone())
            lay.layout = keys[k]
        self._plans = []  # the storage moved: every plan and gathered copy is stale
        for lay in self.layers.values():
            lay._gcache = None
        if self.ids is not None:
            self.set_ids(self.ids)

    # --- per batch ---------------------------------------------------------------------------------------------
    def set_ids(self, ids: Tensor | list[int] | None) -> None:
        """Per-row global slots (``-1`` = base only). ``None`` turns the bank off (base model).

        The plan (which rows use which rank bucket and slot, per layer layout) is kept for the last few id vectors:
        the decode steps of an unchanged batch reuse it, and with it the gathered per-row weights (see
        ``gather_cache_mb``)."""
        if ids is None:
            self.ids, self.plan = None, None
            return
        ids = torch.as_tensor(ids, dtype=torch.long).reshape(-1)
        self.ids = ids
        for pl in self._plans:
            if pl.ids.shape == ids.shape and torch.equal(pl.ids, ids):
                pl.cache = pl.fits  # used again: worth keeping its gathered weights
                self.plan = pl
                return
        valid = ids >= 0
        g = ids.clamp_min(0)
        if bool((g >= self.cap).any()) if self.cap else bool(valid.any()):
            raise ConfigError(f"adapter id out of range (bank capacity {self.cap})")
        if not self.layouts:
            self.plan = None
            return
        plans = []
        n = ids.shape[0]
        for ro in self.layouts:
            ranks = torch.where(valid, ro[g], 0)
            groups = []
            for r in torch.unique(ranks).tolist():
                if r == 0:
                    continue
                rows = (ranks == r).nonzero().squeeze(1)
                bsl = self.bslot_of[r][g[rows]]
                groups.append((r, None if rows.numel() == n else rows, bsl))
            plans.append(groups)
        dmask = valid & self.is_dora[g] if self.cap else torch.zeros(n, dtype=torch.bool)
        drows = dmask.nonzero().squeeze(1) if bool(dmask.any()) else None
        dslots = g[drows] if drows is not None else None
        layers = [(grp, drows, dslots) for grp in plans]
        fits = False
        if self.gather_cache_mb > 0:  # bytes the gathered copies of this plan would take
            nbytes = sum(bsl.numel() * r * sum(lay.base_layer.weight.shape) * lay.A[r].element_size()
                         for lay in self.layers.values() for r, _, bsl in layers[lay.layout][0])
            fits = nbytes <= self.gather_cache_mb * 2**20
        self.plan = _Plan(ids.clone(), layers, fits=fits)
        self._plans = [self.plan] + self._plans[:3]

    def set_adapters(self, names: list[str | None]) -> None:
        """Per-row adapter names (None = base only)."""
        self.set_ids([self.slot(n) for n in names])

    # --- preparing adapters (thread-safe: reads only the frozen base weights) ---------------------------------
    def load(self, directory: str | os.PathLike, name: str) -> ServedAdapter:
        return read_served(self, directory, name)


def _cap_for(n: int) -> int:
    c = 4
    while c < n:
        c *= 2
    return c


# ----------------------------------------------------------------------------------------------------------------
def install(model: nn.Module, targets="all-linear", exclude=None, gather_cache_mb: float = 2048) -> AdapterBank:
    """Put a bank on ``model`` (in place): every targeted ``nn.Linear`` becomes a :class:`BankLinear`.

    ``gather_cache_mb``: memory the decode loop may spend keeping the current batch's gathered per-row adapter
    weights between steps (0 = gather every step)."""
    if getattr(model, "_lorakit_bank", None) is not None:
        return model._lorakit_bank
    if any(isinstance(m, Adapted) for m in model.modules()):
        raise ConfigError("the model has lorakit adapters attached: serve a plain base model (adapters go in the bank)")
    paths = match(model, targets, exclude)
    layers: dict[str, BankLinear] = {}
    bank = AdapterBank(model, layers, gather_cache_mb)
    for p in paths:
        m = model.get_submodule(p)
        if type(m) is not nn.Linear:
            log.info("bank: skipping %s (%s): only nn.Linear layers are served", p, type(m).__name__)
            continue
        bl = BankLinear(m, bank, p)
        parent, _, leaf = p.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, leaf, bl)
        layers[p] = bl
    if not layers:
        raise ConfigError(f"targets {targets!r} matched no nn.Linear layer to serve")
    model.__dict__["_lorakit_bank"] = bank
    return bank


def set_ids(model: nn.Module, ids) -> None:
    """Set the per-row adapter slots of the bank installed on ``model``."""
    bank = getattr(model, "_lorakit_bank", None)
    if bank is None:
        raise ConfigError("no adapter bank on this model: call lorakit.serve.bank.install(model) first")
    bank.set_ids(ids)


# ----------------------------------------------------------------------------------------------------------------
@torch.no_grad()
def _gain(lay: BankLinear, A: Tensor, sB: Tensor, m: Tensor) -> Tensor:
    """DoRA gain ``m/‖W + sBA‖_row`` by the expanded square (no d_out×d_in temporary)."""
    W = lay.base_layer.weight.detach()
    Af, Bf = A.float(), sB.float()
    sq = lay.w_sq() + 2 * (Bf * (W.float() @ Af.t())).sum(1) + ((Bf @ (Af @ Af.t())) * Bf).sum(1)
    return (m.float() / sq.clamp_min(0).sqrt()).to(W.dtype)


def _config_of(bank: AdapterBank, conf: dict, where: Path) -> AttachConfig:
    from ..io import config_of_file

    return config_of_file(bank.model, conf, where)


def read_served(bank: AdapterBank, directory: str | os.PathLike, name: str,
                root: str | os.PathLike | None = None) -> ServedAdapter:
    """Read an adapter directory (lorakit or PEFT format) into a :class:`ServedAdapter` for ``bank``.

    ``root``: every file read must resolve (symlinks followed) inside it. Any failure raises
    :class:`AdapterFileError` with a message naming the problem: a crafted file that trips an unexpected exception
    deep inside a method (a division by zero, a missing key, a too-deep structure) is reported as an invalid adapter,
    never as the raw exception (the details go to the log)."""
    try:
        return _read_served(bank, directory, name, root)
    except LorakitError:
        raise
    except RecursionError:
        raise AdapterFileError(f"adapter {name!r}: its config is nested too deeply") from None
    except MemoryError:
        raise AdapterFileError(f"adapter {name!r} is too large to load") from None
    except Exception as e:
        log.warning("adapter %r at %s: unexpected %s while reading it", name, directory, type(e).__name__,
                    exc_info=True)
        raise AdapterFileError(f"adapter {name!r} is invalid: its adapter_config.json holds values the method "
                               "cannot be built from (a zero, negative or wrongly typed rank/alpha/option?) or its "
                               "weights do not fit them") from None


@torch.no_grad()
def _read_served(bank: AdapterBank, directory: str | os.PathLike, name: str,
                 root: str | os.PathLike | None) -> ServedAdapter:
    d = Path(directory)
    conf = read_adapter_config(d, root)
    if root is not None:  # the directory and the weights file must resolve inside root, checked before reading
        d = confined(d, root)
        confined(d / WEIGHTS_NAME, root)
    tensors = read_tensors(d)
    cfg = _config_of(bank, conf, d)
    if cfg.trainable:
        raise AdapterFileError(f"adapter {name!r} trains whole modules ({cfg.trainable}); such an adapter changes "
                               "the shared base and cannot be served from a bank (merge it into its own model)")
    if cfg.bias != "none":
        raise AdapterFileError(f"adapter {name!r} trains biases (bias={cfg.bias!r}); it cannot be served from a bank")
    importlib.import_module("lorakit.methods")
    method = get_method(cfg.method)
    by_path: dict[str, dict[str, Tensor]] = {}
    for k, v in tensors.items():
        if not k.startswith(PREFIX):
            raise AdapterFileError(f"{d}: unexpected tensor key '{k}'")
        rest = k[len(PREFIX):]
        parts = rest.split(".")
        p = next((c for c in (".".join(parts[:i]) for i in range(len(parts) - 1, 0, -1)) if c in bank.layers), None)
        if p is None:
            raise AdapterFileError(_unserved(bank, name, rest))
        by_path.setdefault(p, {})[rest[len(p) + 1:]] = v
    out = ServedAdapter(name, method.name, source=str(d))
    default_cfg = None if cfg.overrides else cfg.method_config(None, method)  # per-path configs only when needed
    for p, own_file in by_path.items():
        lay = bank.layers[p]
        mcfg = default_cfg if default_cfg is not None else cfg.method_config(p, method)
        if isinstance(mcfg, LowRankConfig) and mcfg.lora_bias:
            raise AdapterFileError(f"adapter {name!r} adds a trained bias to the low-rank output (lora_bias); the "
                                   "bank serves factors only (merge it into its own model instead)")
        if method.fast_serve is not None and not method.changes_base(mcfg):
            # declared: the file's factors and the LowRankConfig scale are the adapter (on the original base)
            try:
                A, B = own_file["lora_A.weight"], own_file["lora_B.weight"]
            except KeyError as e:
                raise AdapterFileError(f"adapter {name!r}: '{p}' lacks {e}") from None
            r, alpha = mcfg.r, mcfg.alpha
            if isinstance(r, bool) or not isinstance(r, int) or r <= 0:
                raise AdapterFileError(f"adapter {name!r}: r must be a positive integer, got {r!r} at '{p}'")
            if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha):
                raise AdapterFileError(f"adapter {name!r}: alpha must be a finite number, got {alpha!r} at '{p}'")
            if A.dim() == 2 and A.shape[0] != r:
                raise AdapterFileError(f"adapter {name!r}: the config gives '{p}' rank r={r} but its weights have "
                                       f"rank {A.shape[0]}")
            s = scale_of(alpha, r, mcfg.rslora)
            mag = None
            if method.fast_serve == "lowrank+magnitude":
                mag = own_file.get("lora_magnitude_vector")
                if mag is None:
                    raise AdapterFileError(f"adapter {name!r} ({method.name}): '{p}' lacks lora_magnitude_vector")
        else:
            A, B, s, mag = _generic_lowrank(lay, method, mcfg, own_file, name, p)
        W = lay.base_layer.weight
        if not (A.is_floating_point() and B.is_floating_point()) or mag is not None and not mag.is_floating_point():
            raise AdapterFileError(f"adapter {name!r}: '{p}' holds non-floating-point factors ({A.dtype}, {B.dtype})")
        if A.dim() != 2 or B.dim() != 2 or A.shape[1] != W.shape[1] or B.shape[0] != W.shape[0] or \
                A.shape[0] != B.shape[1] or A.shape[0] == 0:
            raise AdapterFileError(f"adapter {name!r}: '{p}' has A {tuple(A.shape)}, B {tuple(B.shape)}; the base "
                                   f"layer is {tuple(W.shape)} (an adapter for another base model?)")
        A = A.to(W.dtype).contiguous()
        sB = (B.float() * s).to(W.dtype).contiguous()
        if mag is not None and mag.numel() != W.shape[0]:
            raise AdapterFileError(f"adapter {name!r}: '{p}' has a magnitude vector of {mag.numel()} values; the "
                                   f"base layer has {W.shape[0]} outputs")
        g = _gain(lay, A, sB, mag.reshape(-1)) if mag is not None else None
        out.layers[p] = (A, sB, g)
    if not out.layers:
        raise AdapterFileError(f"adapter {name!r} at {d} has no weights")
    flat = [t for v in out.layers.values() for t in v if t is not None]
    norms = torch._foreach_norm(flat) if hasattr(torch, "_foreach_norm") else [t.norm() for t in flat]
    if not bool(torch.isfinite(torch.stack(list(norms))).all()):
        # (a norm can overflow on large finite weights: only a tensor with a NaN/inf entry is refused)
        bad = next((p for p, v in out.layers.items()
                    if not all(bool(torch.isfinite(t).all()) for t in v if t is not None)), None)
        if bad is not None:
            raise AdapterFileError(f"adapter {name!r}: non-finite weights at '{bad}'")
    return out


def _unserved(bank: AdapterBank, name: str, rest: str) -> str:
    """Why adapter ``name``'s tensor ``rest`` cannot go in the bank, naming the module (embeddings: scaled/tied)."""
    parts = rest.split(".")
    mod, path = None, ""
    for i in range(len(parts) - 1, 0, -1):
        try:
            mod, path = bank.model.get_submodule(".".join(parts[:i])), ".".join(parts[:i])
            break
        except AttributeError:
            continue
    if isinstance(mod, nn.Embedding):
        what = []
        if getattr(mod, "embed_scale", None) is not None:
            what.append("scales its output by embed_scale")
        shared = [n for n, q in bank.model.named_parameters(remove_duplicate=False)
                  if q is mod.weight and n != f"{path}.weight"]
        if shared:
            what.append(f"shares its weight with {', '.join(shared)}")
        return (f"adapter {name!r} adapts the input embedding '{path}'" + (f" (which {' and '.join(what)})"
                if what else "") + ": the bank serves adapters on nn.Linear layers only. Merge it into its own model "
                "(lorakit.merge_and_unload is exact for tied and scaled embeddings) and serve that model instead")
    return (f"adapter {name!r} has weights for '{rest}', a module the bank does not serve "
            "(only nn.Linear layers of the targeted set; embeddings/heads are not served)")


def _generic_lowrank(lay: BankLinear, method, mcfg, own_file: dict, name: str, p: str):
    """Any registered method whose ``lowrank()`` returns a LowRank: build it standalone, load, ask."""
    base = lay.base_layer
    a = method(base, mcfg, LayerView(base))
    try:
        own = a.from_file(own_file)
        new = a.on_load(base.weight.detach().float(), own)
        a.load_state_dict({k: v.to(a.state_dict()[k].dtype) for k, v in own.items()}, strict=True)
    except KeyError as e:
        raise AdapterFileError(f"adapter {name!r} ({method.name}) at '{p}': the weights file lacks {e} (are the "
                               f"files really a {method.name} adapter?)") from None
    except RuntimeError:
        log.warning("adapter %r (%s) at %r: state does not load", name, method.name, p, exc_info=True)
        raise AdapterFileError(f"adapter {name!r} ({method.name}) at '{p}': its weights do not match the "
                               f"{method.name} layout for this layer (missing, unexpected or mis-shaped "
                               "tensors)") from None
    a.eval()
    lr = a.lowrank()
    if lr is None:
        raise AdapterFileError(f"method '{method.name}' cannot be served from an adapter bank: its lowrank() is None "
                               "(it is not (A, B, scale)-shaped); merge it into its own model instead")
    A, B, s = lr.A.detach(), lr.B.detach(), lr.scale
    if new is not None:  # residual init: serve the exact LoRA on the ORIGINAL base
        lr0 = a.initial_lowrank()
        if lr0 is None or lr.magnitude is not None:
            raise AdapterFileError(f"method '{method.name}' replaces the base weights and has no initial_lowrank(); "
                                   "it cannot be served on a shared base")
        A = torch.cat([A, lr0.A.detach()], 0)
        B = torch.cat([B, -lr0.B.detach()], 1)
    mag = lr.magnitude.detach() if lr.magnitude is not None else None
    return A, B, s, mag


def served_from_model(bank: AdapterBank, model: nn.Module, adapter: str, name: str | None = None) -> ServedAdapter:
    """Save an attached adapter to a temp dir and read it back (convenience for tests/benchmarks)."""
    import tempfile

    from ..io import save_adapter

    with tempfile.TemporaryDirectory() as t:
        save_adapter(model, t, adapter)
        return read_served(bank, t, name or adapter)


def adapter_info(directory: str | os.PathLike, root: str | os.PathLike | None = None) -> dict:
    conf = read_adapter_config(directory, root)
    return {"peft_type": conf.get("peft_type"), "r": conf.get("r"), "base": conf.get("base_model_name_or_path")}
