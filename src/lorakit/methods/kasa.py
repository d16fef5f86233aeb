"""KaSA: Knowledge-aware Singular-value Adaptation (Wang et al. 2024, arXiv:2412.06071).

Forward: ``h = W_t x + s · B diag(ΔΣ) A x``, A (r, d_in), ΔΣ (r,), B (d_out, r), ``s = α/r`` (rsLoRA: ``α/√r``).
Base: ``W_t = Σ_{i≤k−r} σ_i u_i v_iᵀ`` — W0 with its **r smallest** singular components dropped (k = min(d_out, d_in)),
computed in fp32 and written over the frozen base. Init: A kaiming-uniform (LoRA), B = 0, ΔΣ ~ N(0, 1), so the
adapter adds nothing at init but the base is truncated: ``init = "changes"`` (not output-preserving, by design).
The truncation is small only where the base's spectrum decays: on a small model it is not. In SmolLM2-135M the
GQA ``v_proj`` (192×576) has its 3 smallest singular values at ~1/4 of its largest (5% of ‖W‖_F), and dropping
them in ``v_proj`` alone raised the language-model loss of two sentences from 4.49 to 8.95 (docs/arena.md,
session 15); prefer a larger model or a small ``r`` there.

Trainable: A, ΔΣ, B. Regulariser (``extra_loss`` per module, ``loss_reduction = "mean"``: AVERAGED over the
modules of the attach, as the official ``main.py`` ``loss_fn``, which divides the summed terms by ``block_num``, the
number of ``lora_diag`` parameters; PEFT's ``LoraModel._get_kasa_loss`` sums instead, which makes β and γ depend on
the number of adapted modules): ``(1/n) Σ_modules [β·‖ΔΣ‖² + γ·(‖BᵀB − I‖_F + ‖AAᵀ − I‖_F)]``.
The orthogonality terms are the paper's Eq. 11 in rank space (r×r Gram matrices, as PEFT); the official
``main.py`` takes ``‖AᵀA − I‖_F`` (d_in×d_in) and ``‖BBᵀ − I‖_F`` (d_out×d_out), which cannot vanish for r < d.

Merge/unmerge: merging gives ``W_t + s·B diag(ΔΣ) A`` and unmerging returns **the truncated base W_t, not W0**.
``detach`` restores W0 bit-exactly (the original is stashed at attach). Loading rebuilds W_t from the base (the SVD
is deterministic), so files hold only A, ΔΣ, B. No plain-LoRA conversion
(``as_lora``) is offered: the result depends on the truncated base (PEFT forbids ``convert_to_lora`` too).

Decisions: k − r uses ``k = min(d_out, d_in)`` as PEFT's port (the official code uses ``d_in − r``, which drops
nothing when ``d_in − r ≥ d_out``). ``niter > 0`` uses a seeded randomised SVD of rank k − r (offered for
uniformity; it saves little because k − r ≈ k). No PeftSpec: PEFT's KaSA (``kasa_config``) is linear-only, nests β/γ
in a sub-config and is unreleased; a parity spec is possible later for linear layers.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..core import Adapter, LowRankConfig, register, scale_of
from ..errors import ConfigError
from ._svd import ortho_penalty, svd_full, svd_top


@register("kasa", family="SVD init", paper="Wang et al. 2024, KaSA, arXiv:2412.06071")
class KaSA(Adapter):
    __doc__ = __doc__
    init = "changes"

    @dataclass
    class Config(LowRankConfig):
        beta: float = 1e-4  # weight of ‖ΔΣ‖²
        gamma: float = 1e-3  # weight of the orthogonality penalty
        niter: int = 0  # 0: full SVD; K: randomised SVD (rank k − r) with K subspace iterations
        seed: int = 0

    roles = {"lora_A.weight": "A", "lora_diag": "singular_values", "lora_B.weight": "B"}
    layers = ("linear", "conv1d")
    loss_reduction = "mean"  # official main.py: (β·Σ‖ΔΣ‖² + γ·Σ orth) / block_num

    def __init__(self, base, cfg: Config, view=None):
        super().__init__(base, cfg, view)
        v = self.view
        if not 0 < cfg.r < min(v.d_in, v.d_out):
            raise ConfigError(f"KaSA needs 0 < r < min(d_in, d_out) = {min(v.d_in, v.d_out)} (it truncates r "
                              f"singular components of the base); got r={cfg.r}")
        from ..core import Factor

        self.lora_A = Factor(cfg.r, v.d_in)
        self.lora_B = Factor(v.d_out, cfg.r)
        self.lora_diag = nn.Parameter(torch.empty(cfg.r))
        self.dropout = nn.Dropout(cfg.dropout) if cfg.dropout > 0 else nn.Identity()
        self.scale = scale_of(cfg.alpha, cfg.r, cfg.rslora)

    def reset_parameters(self) -> None:
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)
        nn.init.normal_(self.lora_diag)

    @torch.no_grad()
    def truncate(self, weight: Tensor) -> Tensor:
        """``W_t``: the rank-(k − r) part of the fp32 base (the r smallest singular components dropped)."""
        keep = min(weight.shape) - self.cfg.r
        if self.cfg.niter > 0:
            U, S, V = svd_top(weight, keep, self.cfg.niter, self.cfg.seed)
        else:
            U, S, V = svd_full(weight)
            U, S, V = U[:, :keep], S[:keep], V[:, :keep]
        return (U * S) @ V.t()

    def init_from(self, weight: Tensor, stats=None) -> Tensor:
        return self.truncate(weight)

    def on_load(self, weight: Tensor, state) -> Tensor:
        return self.truncate(weight)

    def delta(self, x: Tensor) -> Tensor:
        h = self.view.down(self.dropout(self.cast_in(x)), self.lora_A.weight)
        return self.view.up(h * (self.lora_diag * self.scale), self.lora_B.weight)

    def delta_weight(self) -> Tensor:
        return (self.lora_B.weight * self.lora_diag) @ self.lora_A.weight * self.scale

    def extra_loss(self) -> Tensor:
        return self.cfg.beta * self.lora_diag.float().pow(2).sum() + \
            self.cfg.gamma * ortho_penalty(self.lora_A.weight, self.lora_B.weight)
