"""Folding adapters into the base weights.

``merge_and_unload`` is permanent; ``merged()`` is an exact, temporary merge (the original weights are stashed,
not recomputed, because ``W + ΔW − ΔW ≠ W`` in low precision); ``unmerge`` restores the stash.
"""
from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator

from torch import nn

from .core import Adapted, ModulesToSave
from .errors import MergeError
from .inject import _meta, _restore_grad_flags, _set_module, hosts

__all__ = ["merge", "unmerge", "merged", "merge_and_unload"]

log = logging.getLogger(__name__)


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


def _record_untied(model: nn.Module) -> None:
    """After merging into a tied weight for good, the model's weights are no longer tied: say so in its
    transformers bookkeeping, so ``save_pretrained`` writes both tensors and ``from_pretrained`` does not tie them
    again (which would load the merged input embedding as the output head, or the reverse)."""
    for m in model.modules():
        keys = getattr(m, "all_tied_weights_keys", None)
        if not isinstance(keys, dict) or not keys:
            continue
        broken = []
        for target, source in list(keys.items()):
            try:
                same = m.get_parameter(target) is m.get_parameter(source)
            except AttributeError:
                continue
            if not same:
                broken.append(target)
                del keys[target]
        if not broken:
            continue
        cfg = getattr(m, "config", None)
        if keys:
            log.warning("merge_and_unload untied %s, but %s are still tied; the config's tie_word_embeddings cannot "
                        "express that, so save_pretrained/from_pretrained may not round-trip", broken, sorted(keys))
            continue
        for c in (cfg, getattr(cfg, "get_text_config", lambda: None)()):
            if c is not None and getattr(c, "tie_word_embeddings", False):
                c.tie_word_embeddings = False


def merge_and_unload(model: nn.Module) -> nn.Module:
    """Merge the active adapters for good and remove every host; returns the plain base model (same object).

    Trainable module copies (``trainable``/modules_to_save) of the active adapter replace the originals.
    An adapter (or a trained copy) on a module whose weight is tied to another (input embedding and output head)
    is merged into that module alone: the returned model has untied weights and ``tie_word_embeddings=False``,
    computes what the unmerged adapter computed, and saves/reloads both tensors with ``save_pretrained``.
    """
    _check_mergeable(model)
    meta = _meta(model)
    flags = meta["grad_flags"]
    for path, h in reversed(list(hosts(model))):  # nested (parameter) hosts: the inner one first
        h.merge(h.active)
        h._snapshots.clear()  # for good: the merged weight is the new base
        if h._untied is not None and flags:  # a tied base's merged private copy takes the shared weight's flag
            f = flags.get(id(h._untied[0]))
            if f is not None:
                flags[id(h.base_layer.weight)] = (h.base_layer.weight, f[1])
        _set_module(model, path, h.base_layer)
    # what bind() installed ends with the hosts, after the merge (S2FT's co-permutation is undone on merged weights)
    # (a handle with ``on_merge`` is told the merge is for good instead: `full` keeps its trained weights rather than
    # writing the originals back, which detach's ``remove`` does)
    for att in meta["attachments"].values():
        for handle in att.handles:
            getattr(handle, "on_merge", handle.remove)()
        att.handles = []
    for path, m in list(model.named_modules()):
        if isinstance(m, ModulesToSave):
            keep = m.copies[m.active[-1]] if m.active else m.original_module
            for p, q in zip(keep.parameters(), m.original_module.parameters()):
                f = (flags or {}).get(id(q))  # the trained copy takes the original's flag
                if f is not None:
                    flags[id(p)] = (p, f[1])
            _set_module(model, path, keep)
    _record_untied(model)  # merged tied bases and trained copies of a tied module are no longer tied
    meta["attachments"].clear()
    meta["bias_stash"].clear()
    meta["active"] = ()
    _restore_grad_flags(model, flags, default=False)  # the flags the model had before the first attach
    meta["grad_flags"] = None
    return model
