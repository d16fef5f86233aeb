"""Sparse deltas: ``ΔW`` nonzero only on a support, one file format for SaRA, SMT and LT-SFT.

File (per module, beside the other adapter tensors, under the module path):

* ``sparse_delta.indices``: int64 (k,), flat row-major indices into the ``(d_out, d_in)`` matrix, strictly increasing;
* ``sparse_delta.values``: (k,), ``ΔW.flatten()[indices]``;
* ``sparse_delta.shape``: int64 (2,), ``(d_out, d_in)`` of the matrix the delta was trained on.

``merge(W) = W + ΔW`` is exact (the delta is dense zero outside the support), so ``merge_and_unload`` works and
deltas of several tasks compose by addition (``W + Δ1 + Δ2``: load each as its own adapter and merge). The stored
shape makes a delta loaded into a base of other shapes fail with an :class:`AdapterFileError` that names both
shapes, before anything changes. :func:`sparse_to_file` / :func:`sparse_from_file` are the one writer and reader.

In memory (:class:`SparseDelta`) only the support is held, never a dense ``(d_out, d_in)`` delta once it is chosen:

* ``sparse_values``: the trainable values, ``(k,)`` for an element support (SaRA, LT-SFT) or ``(n, b, b)`` for a
  support of ``b × b`` blocks (SMT, ``unit = b``); ``sparse_indices``: ``(k,)`` flat element indices, resp. ``(n,)``
  flat block indices into the ``(d_out/b, d_in/b)`` block grid;
* ``frozen_indices`` / ``frozen_values``: changed entries that no longer train (SaRA's progressive re-selection
  drops entries whose current weight left the threshold; their change stays). Empty otherwise;
* methods with a dense first phase (``dense_first``: LT-SFT's full fine-tuning, SMT's training warm-up) hold the
  full ``(d_out, d_in)`` delta in ``sparse_values`` during that phase (one trainable Parameter throughout: its
  optimiser group and every reference to it stay valid); at the selection it is resized to the compact values.

The forward is a custom autograd function that saves only the layer input and the index set (no dense tensor lives
from the forward to the backward): blocks go through gathered ``b × b`` products (the gradient of the selected blocks
only, as SMT's official ``linearZ``); elements rebuild the dense ``ΔW`` transiently in the forward and the dense
``∂L/∂ΔW = gᵀx`` transiently in the backward, then gather the support's entries ("unstructural backprop": SaRA's
official ``Sparse`` function returns ``grad[mask]`` of the dense weight gradient the same way).

When the support changes during training (:class:`SupportController`'s selection, SaRA's progressive re-selection)
the Parameter *objects* stay and their data is resized (``p.data = ...``), so every holder of them (the optimiser,
the trainer's clipping list, the HF Trainer) keeps working; the optimiser state of the adapter is dropped (a fresh
state, as the official codes that build a new optimiser at that point). A checkpoint holds the resized tensors:
:meth:`SparseDelta.fit_state` resizes a fresh adapter to them before a resume copies them in.
"""
from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from ..controllers import Controller
from ..core import Adapter
from ..errors import AdapterFileError, ConfigError

INDICES, VALUES, SHAPE = "sparse_delta.indices", "sparse_delta.values", "sparse_delta.shape"


def sparse_to_file(shape: tuple[int, int], indices: Tensor, values: Tensor) -> dict[str, Tensor]:
    """The file tensors of a sparse delta of a ``shape`` matrix."""
    return {INDICES: indices.detach().to(torch.int64), VALUES: values.detach(),
            SHAPE: torch.tensor([int(shape[0]), int(shape[1])], dtype=torch.int64)}


def sparse_from_file(tensors: dict[str, Tensor], shape: tuple[int, int], where: str) -> tuple[Tensor, Tensor]:
    """``(indices, values)`` of a sparse delta file for a ``shape`` matrix, validated (keys, shape, index range and
    order); any problem is an :class:`AdapterFileError` naming the module."""
    missing = [k for k in (INDICES, VALUES, SHAPE) if k not in tensors]
    if missing:
        raise AdapterFileError(f"'{where}': the sparse delta lacks {missing} (a file of another method?)")
    s, idx, val = tensors[SHAPE], tensors[INDICES], tensors[VALUES]
    if s.numel() != 2 or s.is_floating_point():
        raise AdapterFileError(f"'{where}': {SHAPE} must hold two integers, got shape {tuple(s.shape)}")
    saved = tuple(int(v) for v in s.tolist())
    if saved != tuple(shape):
        raise AdapterFileError(f"'{where}': this sparse delta was trained on a {saved[0]}x{saved[1]} weight, but this "
                               f"model's layer is {shape[0]}x{shape[1]}: an adapter for another base model")
    if idx.dim() != 1 or idx.is_floating_point() or val.dim() != 1 or idx.numel() != val.numel():
        raise AdapterFileError(f"'{where}': {INDICES} (integers) and {VALUES} must be 1-D of one length, got "
                               f"{tuple(idx.shape)} {idx.dtype} and {tuple(val.shape)}")
    idx = idx.to(torch.int64)
    n = shape[0] * shape[1]
    if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= n):
        raise AdapterFileError(f"'{where}': {INDICES} must lie in [0, {n}) for a {shape[0]}x{shape[1]} weight")
    if idx.numel() > 1 and not bool((idx[1:] > idx[:-1]).all()):
        raise AdapterFileError(f"'{where}': {INDICES} must be strictly increasing (each entry once)")
    return idx, val


def _shape(a: Adapter) -> tuple[int, int]:
    return (a.view.d_out, a.view.d_in)


# ---------------------------------------------------------------------------------------------------------------
# The products: x (N, d_in) -> x ΔWᵀ (N, d_out), saving only x and the index set for the backward
# ---------------------------------------------------------------------------------------------------------------
def _scatter(n: int, idx: Tensor, val: Tensor, fidx: Tensor, fval: Tensor, dtype: torch.dtype) -> Tensor:
    flat = torch.zeros(n, dtype=dtype, device=val.device)
    if fidx.numel():
        flat.index_copy_(0, fidx, fval.to(dtype))
    return flat.index_copy_(0, idx, val.to(dtype))


class _ElementProduct(torch.autograd.Function):
    """``x ΔWᵀ`` with ``ΔW.flatten()[idx] = val`` (and ``[fidx] = fval``, no gradient). Saves x, val and the
    indices; the dense ΔW (forward, backward) and ∂L/∂ΔW (backward) are transients of one layer."""

    @staticmethod
    def forward(ctx, x: Tensor, val: Tensor, idx: Tensor, fidx: Tensor, fval: Tensor, d_out: int, d_in: int):
        ctx.save_for_backward(x, val, idx, fidx, fval)
        ctx.dims = (d_out, d_in)
        w = _scatter(d_out * d_in, idx, val, fidx, fval, x.dtype).view(d_out, d_in)
        return x @ w.t()

    @staticmethod
    def backward(ctx, g: Tensor):
        x, val, idx, fidx, fval = ctx.saved_tensors
        d_out, d_in = ctx.dims
        gx = gv = None
        if ctx.needs_input_grad[0]:
            w = _scatter(d_out * d_in, idx, val, fidx, fval, g.dtype).view(d_out, d_in)
            gx = g @ w
        if ctx.needs_input_grad[1]:
            gv = (g.t() @ x.to(g.dtype)).reshape(-1).index_select(0, idx).to(val.dtype)
        return gx, gv, None, None, None, None, None


class _BlockProduct(torch.autograd.Function):
    """``x ΔWᵀ`` with ``ΔW`` made of the ``b × b`` blocks ``val[q]`` at block rows ``rows[q]`` and block columns
    ``cols[q]``. Saves x, val and the block indices; the backward computes the gradient of the selected blocks only
    (``Σ_N g_rowsᵀ x_cols``)."""

    @staticmethod
    def forward(ctx, x: Tensor, val: Tensor, rows: Tensor, cols: Tensor, d_out: int, d_in: int):
        ctx.save_for_backward(x, val, rows, cols)
        ctx.dims = (d_out, d_in)
        n_tok, b = x.shape[0], val.shape[-1]
        xb = x.reshape(n_tok, d_in // b, b).index_select(1, cols)  # (N, n, b)
        ob = torch.einsum("tnj,nij->tni", xb, val.to(x.dtype))
        return ob.new_zeros(n_tok, d_out // b, b).index_add_(1, rows, ob).view(n_tok, d_out)  # autocast: ob's dtype

    @staticmethod
    def backward(ctx, g: Tensor):
        x, val, rows, cols = ctx.saved_tensors
        d_out, d_in = ctx.dims
        n_tok, b = x.shape[0], val.shape[-1]
        gb = g.reshape(n_tok, d_out // b, b).index_select(1, rows)  # (N, n, b)
        gx = gv = None
        if ctx.needs_input_grad[0]:
            gxb = torch.einsum("tni,nij->tnj", gb, val.to(g.dtype))
            gx = gxb.new_zeros(n_tok, d_in // b, b).index_add_(1, cols, gxb).view(n_tok, d_in)
        if ctx.needs_input_grad[1]:
            xb = x.to(g.dtype).reshape(n_tok, d_in // b, b).index_select(1, cols)
            gv = torch.einsum("tni,tnj->nij", gb, xb).to(val.dtype)
        return gx, gv, None, None, None, None


class _GradientProbe(torch.autograd.Function):
    """Adds nothing to the output; in the backward hands ``∂L/∂W = gᵀx`` (a transient of one layer) to ``sink``.
    ``anchor`` (a trainable tensor, possibly empty) puts the probe on the autograd graph."""

    @staticmethod
    def forward(ctx, x: Tensor, anchor: Tensor, d_out: int, sink: Any):
        ctx.save_for_backward(x)
        ctx.sink, ctx.anchor_shape = sink, anchor.shape
        return x.new_zeros(x.shape[0], d_out)

    @staticmethod
    def backward(ctx, g: Tensor):
        (x,) = ctx.saved_tensors
        ctx.sink(g.float().t() @ x.float())
        return None, g.new_zeros(ctx.anchor_shape), None, None


# ---------------------------------------------------------------------------------------------------------------
class SparseDelta(Adapter):
    """Compact sparse delta (see the module doc). A subclass sets the support in ``init_from`` with
    :meth:`set_support` (SaRA), or starts dense (``dense_first``) and a :class:`SupportController` calls
    :meth:`compact` at its selection (SMT, LT-SFT). ``unit()`` is the block side ``b`` (1: single entries)."""

    layers = ("linear", "conv1d")
    dense_first: ClassVar[bool] = False  # a dense phase (the full delta trains) before the support is selected

    def __init__(self, base: nn.Module, cfg: Any, view=None):
        super().__init__(base, cfg, view)
        b = self.unit()
        shape = (self.view.d_out, self.view.d_in) if self.dense_first else (0,) if b == 1 else (0, b, b)
        self.sparse_values = nn.Parameter(torch.zeros(shape))
        self.register_buffer("sparse_indices", torch.zeros(0, dtype=torch.int64))
        self.register_buffer("frozen_indices", torch.zeros(0, dtype=torch.int64))
        self.register_buffer("frozen_values", torch.zeros(0))

    def unit(self) -> int:
        return 1

    def dense_phase(self) -> bool:
        """True while the full delta trains (before the selection of a ``dense_first`` method): ``sparse_values``
        is then the dense ``(d_out, d_in)`` delta (compact values are 1-D, or 3-D blocks)."""
        return self.sparse_values.dim() == 2

    def reset_parameters(self) -> None:
        with torch.no_grad():
            for p in self.parameters():
                p.zero_()

    # --- resizing (Parameter objects kept: the optimiser holds them) ---------------------------------------------
    @staticmethod
    def _resize(p: nn.Parameter, value: Tensor) -> None:
        """Give ``p`` new data (any shape), dropping its gradient. Autograd caches a leaf's gradient accumulator
        (with the leaf's shape) while any graph that used it is alive, e.g. the previous step's loss the trainer still
        holds; ``set_data`` drops that cache only when the dtype or device changes, so the data passes through
        another dtype first and the next forward gets an accumulator of the new shape."""
        new = value.detach().to(device=p.device, dtype=p.dtype).clone()
        p.data = new.to(torch.float64 if p.dtype != torch.float64 else torch.float32)
        p.data = new
        p.grad = None

    def _set_buffer(self, name: str, value: Tensor) -> None:
        old = getattr(self, name)
        setattr(self, name, value.detach().to(device=old.device, dtype=old.dtype).clone())

    def set_support(self, indices: Tensor, values: Tensor | None = None, frozen: tuple[Tensor, Tensor] | None = None,
                    ) -> None:
        """Replace the support: ``indices`` in the unit grid (elements, or blocks for ``unit() > 1``), the trainable
        values (zero unless given) and the frozen part (empty unless given). Leaves the dense phase."""
        b, p = self.unit(), self.sparse_values
        k = int(indices.numel())
        shape = (k,) if b == 1 else (k, b, b)
        self._resize(p, torch.zeros(shape, dtype=p.dtype, device=p.device) if values is None else values.reshape(shape))
        self._set_buffer("sparse_indices", indices.reshape(-1))
        fi, fv = frozen if frozen is not None else (self.frozen_indices[:0], self.frozen_values[:0])
        self._set_buffer("frozen_indices", fi)
        self._set_buffer("frozen_values", fv)

    @torch.no_grad()
    def compact(self, keep: Tensor, rewind: bool) -> None:
        """Leave the dense phase: keep the units where the boolean unit-grid mask ``keep`` is set, with their
        dense-phase values (``rewind=False``) or zero (``rewind=True``); the dense tensor is freed."""
        b = self.unit()
        ids = keep.reshape(-1).nonzero().squeeze(1)
        vals = None
        if not rewind and self.dense_phase():
            d = self.sparse_values
            if b == 1:
                vals = d.reshape(-1)[ids]
            else:
                nc = self.view.d_in // b
                grid = d.reshape(self.view.d_out // b, b, nc, b).permute(0, 2, 1, 3).reshape(-1, b, b)
                vals = grid[ids]
        self.set_support(ids.to(self.sparse_indices.device), vals)

    def fit_state(self, state: dict[str, Tensor]) -> None:
        for name, p in self.named_parameters(recurse=False):
            if name in state and state[name].shape != p.shape:
                self._resize(p, torch.zeros(state[name].shape, dtype=p.dtype))
        for name, t in self.named_buffers(recurse=False):
            if name in state and state[name].shape != t.shape:
                self._set_buffer(name, torch.zeros(state[name].shape, dtype=t.dtype))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # ``model.load_state_dict`` of a model saved after the selection (the HF Trainer's resume): adopt the sizes
        self.fit_state({k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)})
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    # --- maths ---------------------------------------------------------------------------------------------------
    def element_support(self) -> tuple[Tensor, Tensor]:
        """``(indices, values)`` of every changed entry (trainable and frozen), flat, strictly increasing."""
        if self.dense_phase():
            d = self.sparse_values.detach().reshape(-1)
            return torch.arange(d.numel(), device=d.device), d
        return self._elements(self.sparse_indices, self.sparse_values.detach(), self.frozen_indices, self.frozen_values)

    def _elements(self, idx: Tensor, val: Tensor, fidx: Tensor, fval: Tensor) -> tuple[Tensor, Tensor]:
        b = self.unit()
        if b > 1:
            nc, d_in = self.view.d_in // b, self.view.d_in
            r0, c0 = (idx // nc) * b, (idx % nc) * b
            ar = torch.arange(b, device=idx.device)
            idx = ((r0[:, None, None] + ar[None, :, None]) * d_in + c0[:, None, None] + ar[None, None, :]).reshape(-1)
            val = val.reshape(-1)
        idx, val = torch.cat([idx, fidx]), torch.cat([val, fval.to(val.dtype)])
        order = torch.argsort(idx)
        return idx[order], val[order]

    def delta_weight(self) -> Tensor:
        if self.dense_phase():
            return self.sparse_values.float()
        idx, val = self.element_support()
        n = self.view.d_out * self.view.d_in
        flat = torch.zeros(n, dtype=torch.float32, device=val.device)
        return flat.index_copy_(0, idx, val.float()).view(_shape(self))

    def delta(self, x: Tensor) -> Tensor:
        x = self.cast_in(x)
        if self.dense_phase():
            return self.view.dense(x, self.sparse_values)
        lead, d_out, d_in = x.shape[:-1], self.view.d_out, self.view.d_in
        x2 = x.reshape(-1, d_in)
        if self.unit() > 1:
            nc = d_in // self.unit()
            y = _BlockProduct.apply(x2, self.sparse_values, self.sparse_indices // nc, self.sparse_indices % nc,
                                    d_out, d_in)
        else:
            y = _ElementProduct.apply(x2, self.sparse_values, self.sparse_indices, self.frozen_indices,
                                      self.frozen_values, d_out, d_in)
        return y.reshape(*lead, d_out)

    def stats(self) -> dict[str, float]:
        if self.dense_phase():
            return {"sparse_density": 1.0}
        k = self.sparse_values.numel() + self.frozen_indices.numel()
        return {"sparse_density": k / (self.view.d_out * self.view.d_in)}

    # --- file: indices + values + shape --------------------------------------------------------------------------
    def _from_elements(self, idx: Tensor, val: Tensor, where: str) -> tuple[Tensor, Tensor]:
        """File elements -> ``(unit indices, values)`` in this adapter's layout (whole blocks for ``unit() > 1``)."""
        b = self.unit()
        if b == 1:
            return idx, val
        d_in, nc, bb = self.view.d_in, self.view.d_in // b, b * b
        row, col = idx // d_in, idx % d_in
        key = ((row // b) * nc + col // b) * bb + (row % b) * b + col % b
        order = torch.argsort(key)
        key = key[order]
        if key.numel() % bb or not torch.equal(key.view(-1, bb) - key.view(-1, bb)[:, :1],
                                               torch.arange(bb).expand(key.numel() // bb, bb)) \
                or bool((key.view(-1, bb)[:, 0] % bb).any()):
            raise AdapterFileError(f"'{where}': the sparse delta is not made of whole {b}x{b} blocks (block={b}): "
                                   "a file of another method or block size")
        return key.view(-1, bb)[:, 0] // bb, val[order].view(-1, b, b)

    def fit_file(self, tensors: dict[str, Tensor], where: str) -> None:
        idx, val = sparse_from_file(tensors, _shape(self), where)
        ids, _ = self._from_elements(idx, val, where)
        self.set_support(ids)

    def to_file(self, state: dict[str, Tensor]) -> dict[str, Tensor]:
        if state["sparse_values"].dim() == 2:  # the dense phase: every entry
            d = state["sparse_values"].reshape(-1)
            return sparse_to_file(_shape(self), torch.arange(d.numel()), d)
        idx, val = self._elements(state["sparse_indices"], state["sparse_values"], state["frozen_indices"],
                                  state["frozen_values"])
        return sparse_to_file(_shape(self), idx, val)

    def from_file(self, state: dict[str, Tensor]) -> dict[str, Tensor]:
        idx, val = sparse_from_file(state, _shape(self), type(self).name)
        ids, v = self._from_elements(idx, val, type(self).name)
        return {"sparse_values": v, "sparse_indices": ids, "frozen_indices": ids[:0],
                "frozen_values": torch.zeros(0, dtype=val.dtype)}


def top_k_mask(scores: list[Tensor], k: int) -> list[Tensor]:
    """Boolean masks (one per score tensor) of the ``k`` largest scores over ALL tensors together (ties broken by
    position, first tensor first)."""
    flat = torch.cat([s.reshape(-1).float() for s in scores])
    k = max(0, min(int(k), flat.numel()))
    keep = torch.zeros(flat.numel(), dtype=torch.bool)
    if k:
        keep[torch.topk(flat, k, sorted=False).indices] = True
    out, i = [], 0
    for s in scores:
        out.append(keep[i:i + s.numel()].view(s.shape))
        i += s.numel()
    return out


def forget_state(optimizer: Any, params: list[Tensor]) -> None:
    """Drop the optimiser state of ``params`` (their next step starts from a fresh state: zero moments, step 0)."""
    if optimizer is None:
        return
    inner = optimizer
    for _ in range(4):  # accelerate / HF wrappers hold the torch optimiser as .optimizer
        if isinstance(getattr(inner, "state", None), dict):
            break
        inner = getattr(inner, "optimizer", None)
        if inner is None:
            return
    for p in params:
        inner.state.pop(p, None)


class SupportController(Controller):
    """Select-then-train, shared by SMT and LT-SFT: ``select_at(total)`` optimiser steps after the start, the global
    top-``count()`` units of ``scores()`` (one unit-grid tensor per adapter) become the support of every adapter
    (:meth:`SparseDelta.compact`: the dense phase's tensor is freed, the values kept or rewound per ``rewind``),
    and the optimiser state of the adapters is dropped (a fresh state, as the official codes' new optimiser). The
    supports are adapter tensors (a checkpoint holds them); ``state_dict`` holds the step count."""

    rewind: ClassVar[bool] = True

    def __init__(self, att, cls: type):
        self.att, self.cls, self.total, self.done = att, cls, None, 0

    def adapters(self) -> list[SparseDelta]:
        return self.att.of_type(self.cls)

    def select_at(self, total: int | None) -> int:
        raise NotImplementedError

    def scores(self) -> list[Tensor]:
        raise NotImplementedError

    def count(self) -> int:
        raise NotImplementedError

    def on_train_begin(self, model, optimizer, total_steps: int) -> None:
        self.total = total_steps
        if self.adapters() and self.select_at(total_steps) >= total_steps:
            raise ConfigError(f"{self.cls.name}: its selection comes after step {self.select_at(total_steps)}, but "
                              f"the run has {total_steps} steps, so nothing would be selected; shorten the first "
                              "phase (see the method's options)")

    def selected(self) -> bool:
        return self.done >= self.select_at(self.total)

    def step(self, step: int, model, optimizer) -> None:
        self.done = step + 1
        if self.done == self.select_at(self.total):
            self.select(optimizer)

    @torch.no_grad()
    def select(self, optimizer: Any) -> None:
        ads = self.adapters()
        if not ads:
            return
        masks = top_k_mask(self.scores(), self.count())
        for a, keep in zip(ads, masks):
            a.compact(keep, rewind=self.rewind)
            forget_state(optimizer, list(a.parameters()))

    def state_dict(self) -> dict:
        return {"done": self.done}

    def load_state_dict(self, state: dict) -> None:
        self.done = int(state.get("done", 0))
