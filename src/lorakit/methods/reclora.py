"""RecLoRA: personalised mixture of meta-LoRAs (Zhu et al. 2024, "Lifelong Personalized Low-Rank Adaptation of Large
Language Models for Recommendation", arXiv:2408.03533).

The *Personalized LoRA* of the paper keeps a small bank of K meta-LoRAs per adapted matrix and mixes them per
example with weights from the user's representation in a conventional recommendation model (CRM):

``h_b = W0 x_b + Σ_k w_{b,k} · s · B_k A_k x_b``,  ``A_k`` (r, d_in), ``B_k`` (d_out, r), ``s = α/r``.

The weights ``w`` (batch, K) come per batch through :func:`lorakit.batch_context`:

* ``mixture_weights`` (batch, K): given directly (external per-sample weights; one-hot weights give exactly the
  k-th LoRA; the update is linear in w), or
* ``user_repr`` (batch, user_dim) with ``user_dim`` set: ``w = softmax(G u / τ)`` by ONE trainable gate ``G``
  (K, user_dim) shared by every adapted matrix (the user is the same in every layer), owned by the attach's first
  adapter (``reclora_gate``, stored once).

With neither in the context the mixture is uniform (``w = 1/K``; with a gate: a zero user representation): a plain LoRA of rank K·r at 1/K scale, which keeps
generic evaluation and generation working. Decisions (no official code located): meta-LoRAs are initialised as LoRA
(A kaiming, B = 0); the gate as nn.Linear without bias; the long-short modality retriever (long ID history in the CRM,
short text history in the prompt) and the Few2Many strategy are data/workflow choices, shown by the recommendation
task in ``bench/reclora.py`` (docs/workflows.md). Not mergeable (the update depends on the example).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..core import Adapter, LowRankConfig, register, scale_of
from ..errors import ConfigError


@register("reclora", family="mixture", paper="Zhu et al. 2024, RecLoRA, arXiv:2408.03533")
class RecLoRA(Adapter):
    __doc__ = __doc__
    mergeable = False

    @dataclass
    class Config(LowRankConfig):
        num_loras: int = 4  # K meta-LoRAs
        user_dim: int | None = None  # width of `user_repr` (enables the trainable gate)
        temperature: float = 1.0

    roles = {"reclora_A": "A", "reclora_B": "B", "reclora_gate": "router"}
    layers = ("linear", "conv1d")
    example = {"r": 2, "num_loras": 3, "user_dim": 4}

    @classmethod
    def context_keys(cls, cfg) -> tuple[str, ...]:
        return ("mixture_weights", "user_repr") if cfg.user_dim else ("mixture_weights",)

    @classmethod
    def check_context(cls, cfg, values: dict) -> None:
        w = values.get("mixture_weights")
        if w is not None:
            w = torch.as_tensor(w)
            if w.dim() != 2 or w.shape[1] != cfg.num_loras:
                raise ConfigError(f"reclora: mixture_weights must be (batch, num_loras={cfg.num_loras}), got "
                                  f"{tuple(w.shape)}")
            if not bool(torch.isfinite(w).all()):
                raise ConfigError("reclora: mixture_weights has non-finite values")
        u = values.get("user_repr")
        if u is not None and cfg.user_dim:
            u = torch.as_tensor(u)
            if u.dim() != 2 or u.shape[1] != cfg.user_dim:
                raise ConfigError(f"reclora: user_repr must be (batch, user_dim={cfg.user_dim}), got {tuple(u.shape)}")

    def __init__(self, base: nn.Module, cfg: Config, view=None):
        super().__init__(base, cfg, view)
        if cfg.r <= 0 or cfg.num_loras < 1:
            raise ConfigError(f"reclora: r={cfg.r} and num_loras={cfg.num_loras} must be >= 1")
        if cfg.user_dim is not None and cfg.user_dim < 1:
            raise ConfigError(f"reclora: user_dim={cfg.user_dim} must be >= 1 or null")
        if cfg.temperature <= 0:
            raise ConfigError(f"reclora: temperature={cfg.temperature} must be > 0")
        v, K = self.view, cfg.num_loras
        self.reclora_A = nn.Parameter(torch.empty(K * cfg.r, v.d_in))  # K stacked (r, d_in) blocks
        self.reclora_B = nn.Parameter(torch.zeros(v.d_out, K * cfg.r))  # K stacked (d_out, r) blocks
        self.reclora_gate = nn.Parameter(torch.empty(K, cfg.user_dim)) if cfg.user_dim else None
        self.dropout = nn.Dropout(cfg.dropout) if cfg.dropout > 0 else nn.Identity()
        self.scale = scale_of(cfg.alpha, cfg.r, cfg.rslora)

    @classmethod
    def share(cls, att) -> None:
        first = None
        for a in att.adapters:
            if not isinstance(a, cls) or a.reclora_gate is None:
                continue
            if first is None:
                first = a
            else:
                a.reclora_gate = None  # one gate per attach: the user is the same in every layer
                a.__dict__["_gate_owner"] = first

    @torch.no_grad()
    def reset_parameters(self) -> None:
        K, r = self.cfg.num_loras, self.cfg.r
        for k in range(K):  # each meta-LoRA as LoRA: kaiming A (fan-in d_in), zero B
            nn.init.kaiming_uniform_(self.reclora_A[k * r:(k + 1) * r], a=math.sqrt(5))
        nn.init.zeros_(self.reclora_B)
        if self.reclora_gate is not None:
            nn.init.kaiming_uniform_(self.reclora_gate, a=math.sqrt(5))

    def weights(self, batch: int) -> Tensor | None:
        """The (batch, K) mixture weights of this forward, or None for the uniform mixture."""
        ctx = self.ctx
        w = None if ctx is None else ctx.get("mixture_weights")
        if w is not None:
            return torch.as_tensor(w)
        u = None if ctx is None else ctx.get("user_repr")
        if self.cfg.user_dim:
            owner = self.__dict__.get("_gate_owner", self)
            # no user in the batch: a zero representation, i.e. the uniform mixture through the gate (same weights
            # as without a gate, and the gate stays in the graph with a zero gradient)
            u = torch.zeros(batch, self.cfg.user_dim) if u is None else torch.as_tensor(u)
            u = u.to(owner.reclora_gate)
            return torch.softmax(u @ owner.reclora_gate.t() / self.cfg.temperature, dim=-1)
        return None

    def delta(self, x: Tensor) -> Tensor:
        x = self.cast_in(x)
        K, r = self.cfg.num_loras, self.cfg.r
        h = self.view.down(self.dropout(x), self.reclora_A)  # (..., K*r)
        w = self.weights(x.shape[0])
        if w is None:
            h = h / K
        else:
            w = w.to(h)
            if w.shape[0] != x.shape[0]:
                raise ConfigError(f"reclora: mixture weights for {w.shape[0]} examples, the batch has {x.shape[0]}")
            shape = (x.shape[0],) + (1,) * (h.dim() - 2) + (K, 1)
            h = (h.unflatten(-1, (K, r)) * w.view(shape)).flatten(-2)
        return self.view.up(h * self.scale, self.reclora_B)

    def delta_weight_of(self, k: int) -> Tensor:
        """``s·B_k A_k``: the k-th meta-LoRA's update."""
        r = self.cfg.r
        return self.scale * self.reclora_B[:, k * r:(k + 1) * r] @ self.reclora_A[k * r:(k + 1) * r]
