"""Trainable tokens (PEFT's ``trainable_token_indices``): train only chosen rows of an embedding table.

For new special tokens: instead of training the whole (vocab, dim) table (``trainable: [embed_tokens]``), only the
rows of the listed token ids train. Any method's attach takes it (``trainable_token_indices`` in the attach
config, as PEFT names it): a list of ids means the model's input embedding (``get_input_embeddings()``), a mapping
``{module name or suffix: [ids]}`` names the embedding layers.

Semantics (PEFT's ``TrainableTokensLayer``, files interchangeable): the parameter holds the *new values* of the
rows (initialised to the current rows, so attaching changes nothing); the layer computes with those rows replaced.
A weight tied to the embedding (an output head sharing the Parameter) gets the same rows replaced, from the same
parameter, as PEFT does for tied heads; the file holds the rows once, under the embedding's path
(``<path>.token_adapter.trainable_tokens_delta``). Merging writes the rows into the weight through the host's
snapshot stack (a tied weight gets private copies on both sides, restored bit-exactly by unmerge/detach).
Decision: a replaced output-head row keeps its bias entry (PEFT's ``F.linear`` drops the whole bias; heads with
a bias are rare and this keeps the rows that are not trained exactly the base's).

The adapters sit on ordinary hosts (``Adapted``) under the attach's name, next to, not inside, the method's
adapters: ``Attachment.token_members``. A module cannot carry both the method's adapter and trainable tokens of
one attach (refused at attach).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .core import Adapter, LayerView, embed_scale
from .errors import ConfigError, TargetError

__all__ = ["TrainableTokens", "resolve_token_targets"]


class _Holder(nn.Module):
    """So the file key is PEFT's ``token_adapter.trainable_tokens_delta``."""

    def __init__(self, n: int, dim: int):
        super().__init__()
        self.trainable_tokens_delta = nn.Parameter(torch.empty(n, dim))


class TrainableTokens(Adapter):
    """Rows ``indices`` of an embedding (or of a head tied to it) replaced by trainable values."""

    name = "trainable_tokens"
    family = "token rows"
    layers = ("embedding", "linear")
    roles = {"token_adapter.trainable_tokens_delta": "other"}

    @dataclass
    class Config:
        indices: list[int] = field(default_factory=list)

    def __init__(self, base: nn.Module, cfg: Config, view: LayerView | None = None,
                 source: "TrainableTokens | None" = None):
        super().__init__(base, cfg, view)
        v = self.view
        vocab, dim = (v.d_in, v.d_out) if v.kind == "embedding" else (v.d_out, v.d_in)
        idx = list(cfg.indices)
        if not idx or any(not isinstance(i, int) or isinstance(i, bool) for i in idx):
            raise ConfigError(f"trainable_token_indices must be a non-empty list of token ids, got {idx!r}")
        bad = [i for i in idx if not 0 <= i < vocab]
        if bad:
            raise ConfigError(f"trainable_token_indices {bad[:5]} are outside the vocabulary [0, {vocab})")
        if len(set(idx)) != len(idx):
            raise ConfigError(f"trainable_token_indices lists a token twice: {sorted(i for i in set(idx) if idx.count(i) > 1)}")
        self._source = (source,) if source is not None else ()
        if source is None:
            self.token_adapter = _Holder(len(idx), dim)
        # plain CPU tensors, not buffers: never meta, never emptied by to_empty (moved to the input's device on use)
        self.slot = torch.full((vocab,), -1, dtype=torch.long, device="cpu")
        self.slot[torch.tensor(idx, device="cpu")] = torch.arange(len(idx), device="cpu")
        self.index = torch.tensor(idx, dtype=torch.long, device="cpu")

    @property
    def values(self) -> Tensor:
        """(n, dim): the trained rows (a tied head reads its embedding's)."""
        return self._source[0].values if self._source else self.token_adapter.trainable_tokens_delta

    @torch.no_grad()
    def reset_parameters(self) -> None:
        if not self._source:  # the native table is (vocab, dim) for an embedding and a head alike
            w = self.base.weight.detach()
            self.token_adapter.trainable_tokens_delta.copy_(w[self.index.to(w.device)])

    @torch.no_grad()
    def init_from(self, weight: Tensor, stats=None) -> None:
        if not self._source:
            w = self.view.native(weight)
            self.token_adapter.trainable_tokens_delta.copy_(w[self.index.to(w.device)])
        return None

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        vals = self.values
        if self.view.kind == "embedding":
            if self.slot.device != x.device:
                self.slot, self.index = self.slot.to(x.device), self.index.to(x.device)
            s = self.slot[x]
            rows = vals[s.clamp(min=0)]
            sc = embed_scale(self.base)
            if sc is not None:
                rows = rows.to(y.dtype) * (sc.to(y.dtype) if isinstance(sc, Tensor) else sc)
            return torch.where((s >= 0)[..., None], rows.to(y.dtype), y)
        cols = F.linear(x.to(vals.dtype), vals)
        b = self.base_bias()
        if b is not None:
            cols = cols + b[self.index.to(b.device)].to(cols.dtype)
        return y.index_copy(-1, self.index.to(y.device), cols.to(y.dtype))

    def merge(self, weight: Tensor) -> Tensor:
        W = weight.clone()
        v = self.values.detach().to(W.dtype)
        i = self.index.to(W.device)
        if self.view.kind == "embedding":
            W[:, i] = v.t()
        else:
            W[i] = v
        return W

    def delta_weight(self) -> Tensor:
        W = self.base_matrix().float()
        return self.merge(W) - W

    def extra_repr(self) -> str:
        return f"{len(self.index)} rows" + (" (tied)" if self._source else "")


def _input_embedding_path(model: nn.Module) -> str:
    get = getattr(model, "get_input_embeddings", None)
    emb = get() if callable(get) else None
    if emb is None:
        raise ConfigError(f"trainable_token_indices as a list needs a model with get_input_embeddings() "
                          f"({type(model).__name__} has none): give a mapping {{embedding module: [ids]}}")
    for p, m in model.named_modules():
        if m is emb or (getattr(m, "base_layer", None) is emb):
            return p
    raise TargetError("the input embedding is not a submodule of the model")


def resolve_token_targets(model: nn.Module, spec: Any) -> dict[str, list[int]]:
    """``trainable_token_indices`` -> ``{embedding path: ids}`` (a list: the input embedding; a mapping: module
    names or dotted suffixes, as PEFT matches them)."""
    if spec is None or spec == [] or spec == {}:
        return {}
    if isinstance(spec, (list, tuple)):
        return {_input_embedding_path(model): list(spec)}
    if not isinstance(spec, dict):
        raise ConfigError(f"trainable_token_indices must be a list of ids or a mapping {{module: [ids]}}, got {spec!r}")
    out: dict[str, list[int]] = {}
    names = [p for p, _ in model.named_modules() if p and ".base_layer" not in p and ".adapters." not in p]
    for key, ids in spec.items():
        hits = [p for p in names if p == key or p.endswith("." + key)]
        if not hits:
            raise TargetError(f"trainable_token_indices names '{key}', which matches no module of "
                              f"{type(model).__name__}")
        for p in hits:
            if not isinstance(ids, (list, tuple)):
                raise ConfigError(f"trainable_token_indices['{key}'] must be a list of token ids, got {ids!r}")
            out[p] = list(ids)
    return out
