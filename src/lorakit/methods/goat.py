"""GOAT: Great LoRA Mixture-of-Experts (Fan et al. 2025, arXiv:2502.16894, ICML 2025).

E experts of rank ``r_e = r/E``, router ``p = softmax(W_g x)`` (``W_g`` (E, d_in)), top-k renormalised:
``h = W_res x + Σ_{i∈TopK} w_i · s · B_i A_i x``; ``A_i`` (r_e, d_in), ``B_i`` (d_out, r_e).
Trains A, B, W_g; the base is replaced by the residual ``W_res`` (frozen).

SVD-structured init (official ``goat/peta/src/goat/layer.py``, init "goat"): ``W0 = U diag(σ) Vᵀ`` (fp32), the index
range ``[0, min(d_out, d_in))`` is cut into E segments of length ``L = ⌊k/E⌋``; expert i takes the FIRST ``r_e``
components of segment i (``init="goat_mini"``: the last ``r_e``). With ``σ̃ = σ/(s·ρ)``: ``A_i = diag(√σ̃) V_segᵀ``,
``B_i = U_seg diag(√σ̃)`` and ``W_res = W0 − c · s · Σ_i B_i A_i`` (``c = init_cof``, default 1/E as the
released scripts pass). ρ = 10, η = 1.

Scaling. Default ``scaling="lora"``: ``s = α/r_e``, which is what the released code runs: the scripts pass
``--lora src.goat`` (``init_type="goat"``) with ``--alpha 16 --rank 8 --experts 8``, and ``GOATLayer.update_layer``
(``goat/peta/src/goat/layer.py``) sets ``scaling = lora_alpha / rank_list[i]`` unless ``"scale" in init_type``
(or a ``SCALING`` environment variable is set) — so the SVD init's ``σ/(s·ρ)`` and the residual use ``s = 16``.
``scaling="goat"`` is the paper's theoretical factor ``s = √(3 η d_in / r_e)`` (the code's ``"scale"`` init
types, e.g. ``lora_scale``; the released code has no init that combines it with the GOAT segments), kept as an
option. ``scaling="rslora"``: ``α/√r_e`` (the code's ``"rs"`` init types).
Not output-preserving under top-k routing (init class "changes"); with a uniform router, ``top_k = E`` and
``c = 1/E`` the init output equals the base (tested). Aux loss: Switch ``E·Σ f_i P_i`` with f the top-k
selection fractions (Σf = k), coefficient ``aux_coef`` (scripts 1e-3), summed over the modules
(``loss_reduction = "sum"``, as the official ``GOATModel.get_aux_loss`` adds every ``moe_layer``'s loss).
The residual is rebuilt from the base on load.
"""
from __future__ import annotations

from typing import ClassVar, Literal

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from ..core import register
from ..errors import ConfigError
from ._mixture import MixConfig, Mixture


@register("goat", family="mixture of LoRA experts", paper="Fan et al. 2025, Make LoRA Great Again: Boosting LoRA "
          "with Adaptive Singular Values and Mixture-of-Experts Optimization Alignment (GOAT), arXiv:2502.16894")
class GOAT(Mixture):
    __doc__ = __doc__
    init = "changes"
    example = {"r": 4, "num_experts": 2, "top_k": 1, "aux_coef": 1e-3}

    @dataclass
    class Config(MixConfig):
        r: int = 8  # TOTAL rank; each expert has r // num_experts
        alpha: float = 16.0
        num_experts: int = 8
        top_k: int = 2
        dropout: float = 0.05
        aux_coef: float = 1e-3
        scaling: Literal["lora", "goat", "rslora"] = "lora"  # "lora": α / r_e (released code) | "goat": √(3η d_in / r_e) | "rslora": α / √r_e
        init: Literal["goat", "goat_mini"] = "goat"  # "goat" (first r_e of each segment) | "goat_mini" (last r_e)
        rho: float = 10.0
        eta: float = 1.0
        init_cof: float | None = None  # c; None = 1/num_experts
        positive: ClassVar = ("r", "num_experts")

        def validate(self) -> None:
            if self.r < self.num_experts:
                raise ConfigError(f"r={self.r} must be >= num_experts={self.num_experts} (rank per expert r/E)")

    @classmethod
    def check_layer(cls, cfg, view) -> str | None:
        k, E = min(view.d_out, view.d_in), cfg.num_experts
        if k // E < cfg.r // E:
            return (f"r={cfg.r} gives r/num_experts={cfg.r // E} singular components per expert, but min(d_out, d_in)"
                    f"={k} splits into segments of {k // E}; the maximum here is r={(k // E) * E}")
        return super().check_layer(cfg, view)

    def __init__(self, base, cfg: Config, view=None):
        if cfg.r // cfg.num_experts <= 0:
            raise ConfigError(f"GOAT: r={cfg.r} must be >= num_experts={cfg.num_experts} (rank per expert r/E)")
        if cfg.scaling not in ("goat", "lora", "rslora") or cfg.init not in ("goat", "goat_mini"):
            raise ConfigError(f"GOAT: scaling must be 'lora'|'goat'|'rslora' and init 'goat'|'goat_mini', got "
                             f"{cfg.scaling!r}, {cfg.init!r}")
        super().__init__(base, cfg, view, rank=cfg.r // cfg.num_experts)

    def expert_scale(self) -> float:
        if self.cfg.scaling == "goat":
            return math.sqrt(3 * self.cfg.eta * self.view.d_in / self.r)
        if self.cfg.scaling == "rslora":
            return self.cfg.alpha / math.sqrt(self.r)
        return self.cfg.alpha / self.r

    def segments(self, k: int) -> list[range]:
        L = k // self.E
        if L < self.r:
            raise ConfigError(f"GOAT: min(d_out, d_in)={k} gives segments of {L} < r/E={self.r} singular components")
        off = 0 if self.cfg.init == "goat" else L - self.r
        return [range(i * L + off, i * L + off + self.r) for i in range(self.E)]

    @torch.no_grad()
    def init_from(self, weight: Tensor, stats=None) -> Tensor:
        U, S, Vh = torch.linalg.svd(weight.float(), full_matrices=False)
        idx = torch.tensor([i for seg in self.segments(S.numel()) for i in seg], device=S.device)
        s = self.expert_scale()
        root = (S[idx] / (s * self.cfg.rho)).sqrt().view(self.E, self.r)  # (E, r_e)
        A = root[..., None] * Vh[idx].view(self.E, self.r, -1)  # (E, r_e, d_in)
        B = U[:, idx].view(-1, self.E, self.r).permute(1, 0, 2) * root[:, None, :]  # (E, d_out, r_e)
        self.experts_A.copy_(A.to(self.experts_A.dtype))
        self.experts_B.copy_(B.to(self.experts_B.dtype))
        c = 1.0 / self.E if self.cfg.init_cof is None else self.cfg.init_cof
        return weight - c * s * torch.einsum("eor,eri->oi", self.experts_B.float(), self.experts_A.float())

    def on_load(self, weight: Tensor, state) -> Tensor:
        return self.init_from(weight)
