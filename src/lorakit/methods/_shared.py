"""Frozen random bases shared by every adapter of one attach (VeRA, RandLoRA), and seeded generators.

One :class:`SharedBases` module is created by the method's ``share`` classmethod and registered as a child of every
adapter of that attach. Its tensors are NON-persistent buffers: they are not in the adapters' state dicts, they move
with ``model.to()`` (the module is converted once; later visits are no-ops, so all layers keep ONE storage), and they
are rebuilt from the seed whenever their storage is new (after ``to_empty`` in the meta-device flow). Methods whose
PEFT format saves the bases ("save_projection") write/read them through ``shared_to_file`` / ``shared_from_file``.
"""
from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor, nn

from ..errors import AdapterFileError


def kaiming_uniform_gen(shape: tuple[int, ...], g: torch.Generator, dtype=torch.float32, a: float | None = None
                        ) -> Tensor:
    """Kaiming-uniform (fan_in) from an explicit generator. ``a=None``: gain √2 (ReLU), as PEFT's VeRA init;
    ``a=√5``: torch's default Linear init, as PEFT's RandLoRA init. Computed the way torch.nn.init does, so the
    draws are bit-identical to ``kaiming_uniform_(..., generator=g)`` for the same generator state."""
    t = torch.empty(shape, dtype=dtype)
    if a is not None:
        return nn.init.kaiming_uniform_(t, a=a, generator=g)
    fan = nn.init._calculate_correct_fan(t, "fan_in")
    bound = math.sqrt(3.0) * (math.sqrt(2) / math.sqrt(fan))
    with torch.no_grad():
        return t.uniform_(-bound, bound, generator=g)


class SharedBases(nn.Module):
    """Named frozen tensors shared by all adapters of one attach. ``make()`` returns them (CPU) from the seed."""

    def __init__(self, shapes: dict[str, tuple[int, ...]], make: Callable[[], dict[str, Tensor]],
                 device=None, dtype=None):
        super().__init__()
        self.make = make
        self._filled: int | None = None
        for k, shp in shapes.items():
            self.register_buffer(k, torch.empty(shp, device=device, dtype=dtype), persistent=False)

    def _sig(self) -> int:
        return next(iter(self.buffers())).data_ptr()

    @torch.no_grad()
    def fill(self, force: bool = False) -> None:
        """(Re)generate from the seed unless already filled in this storage (no-op on meta)."""
        first = next(iter(self.buffers()))
        if first.device.type == "meta" or (not force and self._filled == self._sig()):
            return
        for k, v in self.make().items():
            getattr(self, k).copy_(v)
        self._filled = self._sig()

    @torch.no_grad()
    def load(self, tensors: dict[str, Tensor]) -> None:
        for k, v in tensors.items():
            buf = getattr(self, k)
            if tuple(v.shape) != tuple(buf.shape):
                raise AdapterFileError(f"shared tensor '{k}' has shape {tuple(v.shape)}, expected {tuple(buf.shape)} "
                                       "(an adapter for other target modules or another rank?)")
            buf.copy_(v.to(buf.dtype))
        self._filled = self._sig()

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={tuple(b.shape)}" for k, b in self.named_buffers())


def attach_shared(adapters: list, shapes: dict[str, tuple[int, ...]], make: Callable[[], dict[str, Tensor]]) -> None:
    """Create one SharedBases for ``adapters`` (on the device/dtype of their parameters), register it as
    ``bases`` on each, and fill it."""
    p = next(adapters[0].parameters())
    shared = SharedBases(shapes, make, device=p.device, dtype=p.dtype)
    for a in adapters:
        a.bases = shared
    shared.fill()
