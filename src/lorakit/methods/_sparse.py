"""Sparse deltas: ``ΔW`` nonzero only on a support, one file format for SaRA, SMT and LT-SFT.

File (per module, beside the other adapter tensors, under the module path):

* ``sparse_delta.indices``: int64 (k,), flat row-major indices into the ``(d_out, d_in)`` matrix, strictly increasing;
* ``sparse_delta.values``: (k,), ``ΔW.flatten()[indices]``;
* ``sparse_delta.shape``: int64 (2,), ``(d_out, d_in)`` of the matrix the delta was trained on.

``merge(W) = W + ΔW`` is exact (the delta is dense zero outside the support), so ``merge_and_unload`` works and
deltas of several tasks compose by addition (``W + Δ1 + Δ2``: load each as its own adapter and merge). The stored
shape makes a delta loaded into a base of other shapes fail with an :class:`AdapterFileError` that names both
shapes, before anything changes. :func:`sparse_to_file` / :func:`sparse_from_file` are the one writer and reader.

Two in-memory forms share it:

* :class:`SparseDelta` (compact): a trainable ``(k,)`` vector of values and a ``(k,)`` index buffer, for a support
  known when the adapter is initialised (SaRA: the small-magnitude entries of ``W0``). Memory is ``O(k)``.
* :class:`MaskedDelta` (dense with a mask): a trainable ``(d_out, d_in)`` delta and a boolean support buffer; the
  forward uses ``ΔW ⊙ M``, so entries outside the support get exactly zero gradient. For methods whose support is
  chosen *during* training (SMT after its warm-up, LT-SFT after its full fine-tuning phase): the shapes never change,
  so the optimiser, checkpoints and resume need nothing special. :class:`SupportController` is the per-step
  schedule they share (select once, then keep the delta zero outside the support).
"""
from __future__ import annotations

from typing import Any

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


class SparseDelta(Adapter):
    """Compact sparse delta: ``ΔW.flatten()[sparse_indices] = sparse_values``, zero elsewhere (see the module doc).

    A subclass sets the support in ``init_from`` with :meth:`set_support` (before the optimiser exists); loading
    takes it from the file. Parameters: ``sparse_values`` (k,); buffer ``sparse_indices`` (k,) int64."""

    layers = ("linear", "conv1d")

    def __init__(self, base: nn.Module, cfg: Any, view=None):
        super().__init__(base, cfg, view)
        self.sparse_values = nn.Parameter(torch.zeros(0))
        self.register_buffer("sparse_indices", torch.zeros(0, dtype=torch.int64))

    def set_support(self, indices: Tensor, values: Tensor | None = None) -> None:
        """Replace the support (and the values: zero unless given). Only before the optimiser is built."""
        p = self.sparse_values
        k = int(indices.numel())
        v = torch.zeros(k, dtype=p.dtype, device=p.device) if values is None else values.to(p.dtype).to(p.device)
        self.sparse_values = nn.Parameter(v.detach().clone(), requires_grad=p.requires_grad)
        self.sparse_indices = indices.to(torch.int64).to(self.sparse_indices.device).clone()

    def _dense(self) -> Tensor:
        v = self.sparse_values
        flat = torch.zeros(self.view.d_out * self.view.d_in, dtype=v.dtype, device=v.device)
        return flat.scatter(0, self.sparse_indices, v).view(self.view.d_out, self.view.d_in)

    def delta(self, x: Tensor) -> Tensor:
        return self.view.dense(self.cast_in(x), self._dense())

    def delta_weight(self) -> Tensor:
        return self._dense().float()

    def stats(self) -> dict[str, float]:
        return {"sparse_density": self.sparse_indices.numel() / (self.view.d_out * self.view.d_in)}

    # --- file: indices + values + shape ------------------------------------------------------------------------
    def fit_file(self, tensors: dict[str, Tensor], where: str) -> None:
        idx, val = sparse_from_file(tensors, _shape(self), where)
        if idx.numel() != self.sparse_indices.numel() or not torch.equal(idx.to(self.sparse_indices.device),
                                                                             self.sparse_indices):
            self.set_support(idx)

    def to_file(self, state: dict[str, Tensor]) -> dict[str, Tensor]:
        return sparse_to_file(_shape(self), state["sparse_indices"], state["sparse_values"])

    def from_file(self, state: dict[str, Tensor]) -> dict[str, Tensor]:
        idx, val = sparse_from_file(state, _shape(self), type(self).name)
        return {"sparse_values": val, "sparse_indices": idx}


class MaskedDelta(Adapter):
    """Dense delta with a boolean support: ``ΔW = dense_delta ⊙ support`` (see the module doc). The support starts
    full (density 1: full fine-tuning of the target) until a :class:`SupportController` selects it."""

    layers = ("linear", "conv1d")

    def __init__(self, base: nn.Module, cfg: Any, view=None):
        super().__init__(base, cfg, view)
        v = self.view
        self.dense_delta = nn.Parameter(torch.zeros(v.d_out, v.d_in))
        self.register_buffer("support", torch.ones(v.d_out, v.d_in, dtype=torch.bool))

    def reset_parameters(self) -> None:
        nn.init.zeros_(self.dense_delta)

    def _masked(self) -> Tensor:
        return self.dense_delta * self.support.to(self.dense_delta.dtype)

    def delta(self, x: Tensor) -> Tensor:
        return self.view.dense(self.cast_in(x), self._masked())

    def delta_weight(self) -> Tensor:
        return self._masked().float()

    def stats(self) -> dict[str, float]:
        return {"sparse_density": float(self.support.float().mean())}

    @torch.no_grad()
    def set_support(self, mask: Tensor) -> None:
        self.support.copy_(mask.to(self.support.device))
        self.dense_delta.mul_(self.support.to(self.dense_delta.dtype))

    # --- file: indices + values + shape (only the support is written) ------------------------------------------
    def fit_file(self, tensors: dict[str, Tensor], where: str) -> None:
        idx, _ = sparse_from_file(tensors, _shape(self), where)
        mask = torch.zeros(self.view.d_out * self.view.d_in, dtype=torch.bool)
        mask[idx] = True
        with torch.no_grad():
            self.support.copy_(mask.view_as(self.support).to(self.support.device))

    def to_file(self, state: dict[str, Tensor]) -> dict[str, Tensor]:
        idx = state["support"].reshape(-1).nonzero().squeeze(1)
        return sparse_to_file(_shape(self), idx, state["dense_delta"].reshape(-1)[idx])

    def from_file(self, state: dict[str, Tensor]) -> dict[str, Tensor]:
        shape = _shape(self)
        idx, val = sparse_from_file(state, shape, type(self).name)
        n = shape[0] * shape[1]
        dense = torch.zeros(n, dtype=val.dtype).scatter(0, idx, val).view(shape)
        mask = torch.zeros(n, dtype=torch.bool)
        mask[idx] = True
        return {"dense_delta": dense, "support": mask.view(shape)}


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


class SupportController(Controller):
    """The schedule of a :class:`MaskedDelta` method: ``select_at(total)`` optimiser steps after the start it calls
    ``select(optimizer)`` once (the subclass sets every adapter's support); afterwards the delta is kept exactly zero
    outside the support after every step. ``state_dict`` holds the step count (the supports are adapter buffers, so
    a checkpoint restores them)."""

    def __init__(self, att, cls: type):
        self.att, self.cls, self.total, self.done = att, cls, None, 0

    def adapters(self) -> list[MaskedDelta]:
        return self.att.of_type(self.cls)

    def select_at(self, total: int | None) -> int:
        raise NotImplementedError

    def select(self, optimizer: Any) -> None:
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
        if self.selected():
            with torch.no_grad():
                for a in self.adapters():
                    a.dense_delta.mul_(a.support.to(a.dense_delta.dtype))

    @staticmethod
    @torch.no_grad()
    def reset_state(optimizer: Any, a: MaskedDelta, mask: Tensor | None = None) -> None:
        """Forget the optimiser state of ``a.dense_delta`` (all of it, or the entries outside ``mask``)."""
        if optimizer is None:
            return
        st = optimizer.state.get(a.dense_delta)
        if not st:
            return
        if mask is None:
            del optimizer.state[a.dense_delta]
            return
        for v in st.values():
            if isinstance(v, Tensor) and v.shape == mask.shape:
                v.mul_(mask.to(v.dtype))

    def state_dict(self) -> dict:
        return {"done": self.done}

    def load_state_dict(self, state: dict) -> None:
        self.done = int(state.get("done", 0))
