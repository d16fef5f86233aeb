"""NOLA: compressing LoRA using linear combination of random basis (Koohpayegani et al. 2024, ICLR,
arXiv:2310.02556; reference code UCDvision/NOLA).

``h = W0 x + s · B A x`` with ``A = A0 + Σ_{i<k} α_i A_i`` (r, d_in) and ``B = Σ_{j<l} β_j B_j`` (d_out, r),
``s = α/r``. The bases ``A_i`` (k, r, d_in), ``B_j`` (l, d_out, r) are frozen random ``U(−1, 1)/√k`` (``/√l``) and
``A0`` (r, d_in) is a frozen kaiming-uniform offset (as the reference ``LoRA(use_nola=True)``; without it α and β
would both start with zero gradient). **Only the coefficients α (k,) and β (l,) train**: the parameter count does not
depend on r or the layer size. Init ``α = β = 0`` so ΔW = 0. Merge: materialise A, B, add ``s·BA``.

Files hold only ``nola_alpha`` / ``nola_beta``; the bases are non-persistent buffers regenerated from
``basis_seed`` (a CPU ``torch.Generator``, so the same seed gives bit-identical bases on every machine).

Decisions: the reference draws an independent seed per layer and regenerates the basis inside a custom backward
to save memory. Here the bases are materialised once and SHARED by all layers of the same shape (one storage per
distinct (d_out, d_in) in the attach, seeded from (basis_seed, d_out, d_in)); layers differ by their coefficients.
This keeps memory at one basis set per shape and makes the model reproducible from the config alone; it is a
deliberate deviation (the function class per layer is the same).

Defaults follow the reference GPT-2-M E2E recipe (``gpt/scripts/finetune_gpt2m_e2e_qv_nola.sh``): ``r = 8``,
``α = 8`` (s = 1), ``num_basis_A = num_basis_B = 512`` (``--nola_num_basis 512``; the module/argparse default
is 1024), on the attention query and value projections (``--lora_qv``), trained with lr 5e-3, weight decay 0,
linear schedule with 500 warm-up steps, 5 epochs, label smoothing 0.1 (``configs/methods/nola.yaml``).
Checked against ``gpt/src/model_nola.py`` (``LoRA``, ``NOLALinear``, ``GenerateParams``): bases
``U(−1, 1)/√num_basis``, A's offset ``kaiming_uniform_(a=√5)``, B's offset 0, coefficients 0, ``s = α/r``.
"""
from __future__ import annotations

from typing import ClassVar

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..core import Adapter, LowRank, register, scale_of
from ..errors import ConfigError
from ._shared import SharedBases


def nola_bases(seed: int, r: int, d_in: int, d_out: int, k: int, l: int) -> dict[str, Tensor]:
    g = torch.Generator(device="cpu").manual_seed((seed * 1_000_003 + d_out) * 1_000_003 + d_in)
    A0 = nn.init.kaiming_uniform_(torch.empty(r, d_in), a=math.sqrt(5), generator=g)
    Ab = (torch.rand(k, r, d_in, generator=g) * 2 - 1) / math.sqrt(k)
    Bb = (torch.rand(l, d_out, r, generator=g) * 2 - 1) / math.sqrt(l)
    return {"A0": A0, "Ab": Ab, "Bb": Bb}


@register("nola", family="random-basis", paper="Koohpayegani et al. 2024, NOLA, arXiv:2310.02556")
class NOLA(Adapter):
    __doc__ = __doc__

    @dataclass
    class Config:
        r: int = 8
        alpha: float = 8.0
        num_basis_A: int = 512  # GPT-2-M E2E script: --nola_num_basis 512 (module default 1024)
        num_basis_B: int = 512
        basis_seed: int = 0
        positive: ClassVar = ("r", "num_basis_A", "num_basis_B")

    layers = ("linear", "conv1d", "embedding", "conv2d")
    example = {"r": 2, "num_basis_A": 8, "num_basis_B": 6}

    def __init__(self, base: nn.Module, cfg: Config, view=None):
        super().__init__(base, cfg, view)
        if min(cfg.r, cfg.num_basis_A, cfg.num_basis_B) <= 0:
            raise ConfigError("r, num_basis_A and num_basis_B must be positive")
        self.nola_alpha = nn.Parameter(torch.empty(cfg.num_basis_A))
        self.nola_beta = nn.Parameter(torch.empty(cfg.num_basis_B))
        self.scale = scale_of(cfg.alpha, cfg.r)

    @classmethod
    def share(cls, att) -> None:
        adapters = att.adapters
        groups: dict[tuple, list[Adapter]] = {}
        for a in adapters:
            c = a.cfg
            groups.setdefault((a.view.d_in, a.view.d_out, c.r, c.num_basis_A, c.num_basis_B, c.basis_seed),
                              []).append(a)
        for (d_in, d_out, r, k, l, seed), group in groups.items():
            p = next(group[0].parameters())
            shared = SharedBases({"A0": (r, d_in), "Ab": (k, r, d_in), "Bb": (l, d_out, r)},
                                 lambda s=seed, r=r, i=d_in, o=d_out, k=k, l=l: nola_bases(s, r, i, o, k, l),
                                 device=p.device, dtype=p.dtype)
            for a in group:
                a.bases = shared
            shared.fill()

    def reset_parameters(self) -> None:
        nn.init.zeros_(self.nola_alpha)
        nn.init.zeros_(self.nola_beta)
        if "bases" in self._modules:
            self.bases.fill()

    @property
    def A(self) -> Tensor:  # (r, d_in)
        b = self.bases
        return b.A0 + torch.einsum("k,krd->rd", self.nola_alpha, b.Ab)

    @property
    def B(self) -> Tensor:  # (d_out, r)
        return torch.einsum("l,lor->or", self.nola_beta, self.bases.Bb)

    def delta(self, x: Tensor) -> Tensor:
        return self.view.up(self.view.down(self.cast_in(x), self.A) * self.scale, self.B)

    def delta_weight(self) -> Tensor:
        return (self.B @ self.A) * self.scale

    def lowrank(self) -> LowRank:
        return LowRank(self.A, self.B, self.scale)
