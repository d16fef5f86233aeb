"""Folding adapters into the base weights.

``merge_and_unload`` is permanent; ``merged()`` is an exact, temporary merge (the original weights are stashed,
not recomputed, because ``W + ΔW − ΔW ≠ W`` in low precision); ``unmerge`` restores the stash.
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator

from torch import nn

from .core import Adapted, ModulesToSave
from .errors import MergeError
from .inject import _meta, _restore_grad_flags, _set_module, hosts

__all__ = ["merge", "unmerge", "merged", "merge_and_unload"]


def _check_mergeable(model: nn.Module) -> None:
    for path, h in hosts(model):
        for n in h.active:
            a = h.adapters[n]
            if not a.mergeable:
                raise MergeError(f"adapter '{n}' at '{path}' uses method '{a.name}', which is not mergeable "
                                 "(its output depends on the input); serve it unmerged instead")


def merge(model: nn.Module) -> nn.Module:
    """Fold the active adapters into the base weights (reversibly: see :func:`unmerge`)."""
    _check_mergeable(model)
    for _, h in hosts(model):
        h.merge(h.active)
    return model


def unmerge(model: nn.Module) -> nn.Module:
    """Restore the exact pre-merge weights and re-activate the merged adapters."""
    for _, h in hosts(model):
        names = h.unmerge()
        h.active = names + tuple(n for n in h.active if n not in names)
    return model


@contextlib.contextmanager
def merged(model: nn.Module) -> Iterator[nn.Module]:
    """``with merged(model): ...`` runs on merged weights, then restores the originals bit-exactly."""
    merge(model)
    try:
        yield model
    finally:
        unmerge(model)


def merge_and_unload(model: nn.Module) -> nn.Module:
    """Merge the active adapters for good and remove every host; returns the plain base model (same object).

    Trainable module copies (``trainable``/modules_to_save) of the active adapter replace the originals.
    """
    _check_mergeable(model)
    meta = _meta(model)
    flags = meta["grad_flags"]
    for path, h in list(hosts(model)):
        h.merge(h.active)
        h._snapshots.clear()  # for good: the merged weight is the new base
        _set_module(model, path, h.base_layer)
    for path, m in list(model.named_modules()):
        if isinstance(m, ModulesToSave):
            keep = m.copies[m.active[-1]] if m.active else m.original_module
            for p, q in zip(keep.parameters(), m.original_module.parameters()):
                f = (flags or {}).get(id(q))  # the trained copy takes the original's flag
                if f is not None:
                    flags[id(p)] = (p, f[1])
            _set_module(model, path, keep)
    meta["attachments"].clear()
    meta["bias_stash"].clear()
    meta["active"] = ()
    _restore_grad_flags(model, flags, default=False)  # the flags the model had before the first attach
    meta["grad_flags"] = None
    return model
