"""Shared machinery for the mixtures of LoRA experts (GOAT, SMoRA, LoRAMoE, MoLA, DynMoLE, LLaVA-MoLE, MeteoRA,
MTLoRA, X-LoRA).

Experts are STACKED factor tensors, ``experts_A`` (E, r, d_in) and ``experts_B`` (E, d_out, r), applied with two
GEMMs for all experts at once (no Python loop over experts)::

    h   = x @ A.reshape(E·r, d_in)ᵀ            (..., E·r)   -> view (..., E, r)
    h  *= w[..., :, None] · s_e                 routing weights w (..., E), per-expert scale s_e
    out = h.reshape(..., E·r) @ B̃ᵀ             B̃ = B.permute(1, 0, 2).reshape(d_out, E·r)

Sparse (top-k) routing zeroes the weights of unselected experts, so the dense compute is exact; it costs E·r
columns instead of k·r, which is negligible for LoRA-sized experts and keeps forward free of data-dependent
shapes (torch.compile friendly: top-k via ``torch.topk`` + ``scatter``, no ``.item()``).

A forward in training mode records the router probabilities and weights of that step, so ``extra_loss()`` (the
load-balancing / auxiliary loss) and ``stats()`` (expert load, router entropy) can read them. Mixtures are not
mergeable: the output depends on the input through the router.
"""
from __future__ import annotations

from typing import ClassVar

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..attachments import get_attachment
from ..core import Adapted, Adapter, Factor, adaptable
from ..errors import ConfigError


@dataclass
class MixConfig:
    positive: ClassVar = ("r", "num_experts")
    r: int = 8  # rank of EACH expert
    alpha: float = 16.0  # expert scale s = alpha / r
    num_experts: int = 4
    top_k: int = 2  # 0 or >= num_experts: dense (soft) routing
    dropout: float = 0.0
    aux_coef: float = 0.0  # coefficient of the load-balancing loss returned by extra_loss()


def topk_mask(p: Tensor, k: int) -> Tensor:
    """0/1 mask (same shape as ``p``) of the ``k`` largest entries along the last dim."""
    idx = torch.topk(p, k, dim=-1).indices
    return torch.zeros_like(p).scatter(-1, idx, 1.0)


def switch_loss(probs: Tensor, frac: Tensor) -> Tensor:
    """Switch-Transformer load balance ``E · Σ_i f_i · P_i``: ``f_i`` the mean (over tokens) of ``frac[..., i]``
    (the selection mask or routed weight), ``P_i`` the mean router probability."""
    E = probs.shape[-1]
    P = probs.reshape(-1, E).float().mean(0)
    f = frac.reshape(-1, E).float().mean(0)
    return E * (f * P).sum()


def cv_squared(v: Tensor, eps: float = 1e-10) -> Tensor:
    """Squared coefficient of variation ``Var(v)/mean(v)²`` of a flattened tensor (unbiased variance)."""
    v = v.float().flatten()
    return v.var() / (v.mean() ** 2 + eps)


class Mixture(Adapter):
    """Base class: E stacked LoRA experts plus a linear router ``router.weight`` (E, d_in) on the layer input.

    Subclasses override ``route(logits) -> (probs, weights)``, ``expert_scale()``, ``extra_loss()`` or ``delta``.
    """

    mergeable = False
    layers = ("linear", "conv1d")
    roles = {"experts_A": "A", "experts_B": "B", "router.weight": "router"}
    example = {"r": 2, "num_experts": 3, "top_k": 2, "aux_coef": 0.01}

    def __init__(self, base: nn.Module, cfg, view=None, *, num_experts: int | None = None, rank: int | None = None,
                 router: bool = True):
        super().__init__(base, cfg, view)
        E = cfg.num_experts if num_experts is None else num_experts
        r = cfg.r if rank is None else rank
        if E <= 0 or r <= 0:
            raise ConfigError(f"num_experts and r must be positive, got num_experts={E}, r={r}")
        self.E, self.r = E, r
        v = self.view
        self.experts_A = nn.Parameter(torch.empty(E, r, v.d_in))
        self.experts_B = nn.Parameter(torch.empty(E, v.d_out, r))
        self.router = Factor(E, v.d_in) if router else None
        self.dropout = nn.Dropout(cfg.dropout) if getattr(cfg, "dropout", 0) > 0 else nn.Identity()
        self._probs: Tensor | None = None  # last training step's router probabilities (..., E), with graph
        self._weights: Tensor | None = None  # last routing weights (..., E)

    # --- init ----------------------------------------------------------------------------------------------------
    def reset_parameters(self) -> None:
        for e in range(self.E):  # each expert as a LoRA: A kaiming-uniform(a=√5) on its (r, d_in) slice, B = 0
            nn.init.kaiming_uniform_(self.experts_A.data[e], a=math.sqrt(5))
        nn.init.zeros_(self.experts_B)
        if self.router is not None:
            nn.init.kaiming_uniform_(self.router.weight, a=math.sqrt(5))

    # --- routing -------------------------------------------------------------------------------------------------
    def expert_scale(self) -> Tensor | float:
        return self.cfg.alpha / self.r

    def route(self, logits: Tensor) -> tuple[Tensor, Tensor]:
        """Softmax router; top-k (renormalised) when ``0 < top_k < E``, else dense."""
        p = torch.softmax(logits.float(), dim=-1)
        k = self.cfg.top_k
        if 0 < k < self.E:
            w = p * topk_mask(p, k)
            return p, w / w.sum(-1, keepdim=True)
        return p, p

    def router_logits(self, x: Tensor) -> Tensor:
        return F.linear(x, self.router.weight)

    # --- compute -------------------------------------------------------------------------------------------------
    def mix(self, x: Tensor, w: Tensor, scale: Tensor | float | None = None) -> Tensor:
        """``Σ_e w_e · s_e · B_e A_e x`` for routing weights ``w`` (..., E) — two GEMMs over all experts."""
        E, r = self.E, self.r
        h = F.linear(x, self.experts_A.reshape(E * r, -1)).unflatten(-1, (E, r))
        s = self.expert_scale() if scale is None else scale
        g = w.to(h.dtype) * s if not isinstance(s, Tensor) else w.to(h.dtype) * s.to(h.dtype)
        h = (h * g.unsqueeze(-1)).flatten(-2)
        return F.linear(h, self.experts_B.permute(1, 0, 2).reshape(self.view.d_out, E * r))

    def record(self, probs: Tensor, weights: Tensor) -> None:
        if self.training:
            self._probs, self._weights = probs, weights

    def delta(self, x: Tensor) -> Tensor:
        x = self.cast_in(x)
        probs, w = self.route(self.router_logits(x))
        self.record(probs, w)
        return self.mix(self.dropout(x), w)

    # --- training extras -----------------------------------------------------------------------------------------
    def balance_loss(self) -> Tensor | None:
        """Switch loss with ``f_i`` = fraction of tokens that selected expert i (Σf = k, as GOAT's code)."""
        if self._probs is None:
            return None
        return switch_loss(self._probs, (self._weights > 0).float())

    def extra_loss(self) -> Tensor | None:
        coef = getattr(self.cfg, "aux_coef", 0.0)
        if not coef or self._probs is None:
            return None
        loss = self.balance_loss()
        return None if loss is None else coef * loss

    @torch.no_grad()
    def stats(self) -> dict[str, float]:
        """Expert load (share of routed weight per expert, sums to 1), its max/ideal ratio, and the router
        entropy normalised by log E (1 = uniform)."""
        if self._weights is None:
            return {}
        w = self._weights.detach().reshape(-1, self.E).float()
        load = w.sum(0) / w.sum().clamp_min(1e-12)
        p = self._probs.detach().reshape(-1, self.E).float()
        ent = -(p * p.clamp_min(1e-12).log()).sum(-1).mean() / math.log(max(self.E, 2))
        out = {f"moe_load_e{i}": float(v) for i, v in enumerate(load.tolist())} if self.E <= 16 else {}
        out.update(moe_load_max=float(load.max() * self.E), moe_router_entropy=float(ent))
        return out

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, experts={self.E}, r={self.r}"


# ----------------------------------------------------------------------------------------------------------------
# Plain-LoRA export / import (freezing a mixture to one expert set, loading pretrained LoRAs as experts)
# ----------------------------------------------------------------------------------------------------------------
def write_lora(model: nn.Module, directory, factors: dict[str, tuple[Tensor, Tensor]], alpha: float | None = None):
    """Write a normal ``lora`` adapter (PEFT format) from ``{module path: (A (r, d_in), B (d_out, r))}``.

    Scales must already be folded into B; ``alpha`` defaults to r (LoRA scale 1)."""
    from ..formats.peft_lora import PeftLoraConfig, write_lora as write_peft_lora

    ranks = {A.shape[0] for A, _ in factors.values()}
    if len(ranks) != 1:
        raise ConfigError(f"write_lora needs one rank for every module, got {sorted(ranks)}")
    r = ranks.pop()
    a = float(r if alpha is None else alpha)
    paths = sorted(factors)
    base = getattr(model, "name_or_path", None) or getattr(getattr(model, "config", None), "_name_or_path", None)
    cfg = PeftLoraConfig.for_modules({p: r for p in paths}, {p: a for p in paths}, base_model_name_or_path=base,
                                     lorakit={"method": "lora", "config": {"method": "lora", "targets": paths,
                                                                           "r": r, "alpha": a}, "paths": paths})
    return write_peft_lora(directory, cfg, factors)


def export_expert(model: nn.Module, directory, expert: int, name: str = "default"):
    """Freeze a stacked mixture to ONE expert: a plain LoRA ``s·B_e A_e`` for every module (MeteoRA/X-LoRA)."""
    out = {}
    for path, a in ((m.path, m.adapter) for m in get_attachment(model, name).members):
        if not isinstance(a, Mixture) or not 0 <= expert < a.E:
            raise ConfigError(f"'{path}' has no expert {expert}")
        s = a.expert_scale()
        s = float(s[expert]) if isinstance(s, Tensor) else float(s)
        out[path] = (a.experts_A[expert], a.experts_B[expert] * s)
    return write_lora(model, directory, out)


@torch.no_grad()
def load_lora_experts(model: nn.Module, directories: list, name: str = "default") -> None:
    """Fill the experts of mixture adapter ``name`` from saved plain LoRA adapters (expert i <- directories[i]);
    each LoRA's own scale ``α/r`` is folded into its B (relative to the mixture's expert scale)."""
    from ..errors import AdapterFileError
    from ..formats.peft_lora import read_lora

    mods = {m.path: m.adapter for m in get_attachment(model, name).members}
    for i, d in enumerate(directories):
        _, lora = read_lora(d, fold_scale=True)  # each module's own scale (α/r, rsLoRA, rank/alpha patterns)
        for path, a in mods.items():
            if path not in lora:
                raise AdapterFileError(f"{d}: no LoRA factors for '{path}'")
            A, sB = lora[path]
            if i >= a.E or A.shape != a.experts_A.shape[1:] or sB.shape != a.experts_B.shape[1:]:
                raise AdapterFileError(f"{d}: LoRA for '{path}' has shapes {tuple(A.shape)}/{tuple(sB.shape)}, "
                                       f"expert slots are {tuple(a.experts_A.shape[1:])}/{tuple(a.experts_B.shape[1:])}")
            s = a.expert_scale()
            s = float(s[i]) if isinstance(s, Tensor) else float(s)
            a.experts_A[i] = A.to(a.experts_A.dtype)
            a.experts_B[i] = (sB / s).to(a.experts_B.dtype)


# ----------------------------------------------------------------------------------------------------------------
# Model-level helpers (routers that read the whole model: X-LoRA)
# ----------------------------------------------------------------------------------------------------------------
def output_head(model: nn.Module) -> nn.Module:
    """The model's output head (``get_output_embeddings()``, else its last linear layer): its input is the last
    hidden state (HF's ``hidden_states[-1]``). Used by model-level routers (X-LoRA)."""
    get = getattr(model, "get_output_embeddings", None)
    head = get() if callable(get) else None
    if head is None:
        cands = [m for p, m in model.named_modules() if ".adapters." not in f".{p}." and adaptable(m) in
                 ("linear", "conv1d")]
        if not cands:
            raise ConfigError("this method needs an output head (a linear layer) whose input is the last hidden state")
        head = cands[-1]
    return head.base_layer if isinstance(head, Adapted) else head


class RestoreForward:
    """A handle (for ``Adapter.bind``) that puts back the model's forward a method replaced: ``prior`` is what
    ``model.__dict__["forward"]`` held before (None: the class's own forward)."""

    def __init__(self, model: nn.Module, prior):
        self.model, self.prior = model, prior

    def remove(self) -> None:
        if self.prior is None:
            self.model.__dict__.pop("forward", None)
        else:
            self.model.forward = self.prior


def read_lora_factors(directory) -> dict[str, tuple[Tensor, Tensor]]:
    """``{module path: (A (r, d_in), s·B (d_out, r))}`` of a plain LoRA adapter directory (PEFT format), each
    module's scale ``s`` (α/r, rsLoRA α/√r, rank/alpha patterns) folded into B, fp32."""
    from ..formats.peft_lora import read_lora

    return read_lora(directory, fold_scale=True)[1]
