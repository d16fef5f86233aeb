"""Shared helpers for the SVD- and data-driven inits (SORSA, KaSA, CorDA, LoRA-GA, BA-LoRA).

Every decomposition here runs in fp32 whatever the model dtype; results are cast to the adapter dtype afterwards.
"""
from __future__ import annotations

import torch
from torch import Tensor

from ..errors import ConfigError
from .pissa import PiSSA, svd_top

__all__ = ["svd_top", "svd_full", "ortho_penalty", "SavedResidualLoRA"]


def svd_full(weight: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Thin SVD in fp32: U (d_out, k), σ (k,) descending, V (d_in, k)."""
    U, S, Vh = torch.linalg.svd(weight.float(), full_matrices=False)
    return U, S, Vh.t()


def ortho_penalty(A: Tensor, B: Tensor) -> Tensor:
    """``‖AAᵀ − I‖_F + ‖BᵀB − I‖_F`` for A (r, d_in), B (d_out, r), in fp32."""
    A, B = A.float(), B.float()
    eye = torch.eye(A.shape[0], device=A.device)
    return torch.linalg.matrix_norm(A @ A.t() - eye) + torch.linalg.matrix_norm(B.t() @ B - eye)


class SavedResidualLoRA(PiSSA):
    """A LoRA on a residual base ``W_res = W0 − s·B₀A₀`` whose initial factors come from calibration data.

    The data are gone at load time, so ``A0``/``B0`` are *persistent* buffers (they are written to the adapter file,
    doubling its size) and ``on_load`` rebuilds ``W_res`` from them. ``initial_lowrank()`` (inherited) gives the
    rank-2r plain-LoRA conversion ``save_adapter(as_lora=True)``, the form PEFT can load without its preprocess step.
    """

    def __init__(self, base, cfg, view=None):
        super().__init__(base, cfg, view)
        self.register_buffer("A0", torch.zeros_like(self.lora_A.weight), persistent=True)
        self.register_buffer("B0", torch.zeros_like(self.lora_B.weight), persistent=True)

    @torch.no_grad()
    def install(self, A: Tensor, B: Tensor, weight: Tensor) -> Tensor:
        """Set A, B (and A0, B0) from fp32 factors; return the fp32 residual computed from the *cast* factors."""
        self.lora_A.weight.copy_(A.to(self.lora_A.weight.dtype))
        self.lora_B.weight.copy_(B.to(self.lora_B.weight.dtype))
        self.A0.copy_(self.lora_A.weight)
        self.B0.copy_(self.lora_B.weight)
        return weight - self.scale * (self.B0.float() @ self.A0.float())

    def on_load(self, weight: Tensor, state: dict[str, Tensor]) -> Tensor:
        if "A0" not in state or "B0" not in state:
            raise ConfigError(f"{self.name} adapter file lacks its initial factors A0/B0: cannot rebuild the residual")
        return weight - self.scale * (state["B0"].float() @ state["A0"].float())

    def init_from(self, weight: Tensor, stats=None) -> Tensor:
        if not stats:
            raise ConfigError(f"method '{self.name}' needs calibration statistics ({self.calibration}) for its init")
        return self.install(*self.factors(weight, stats), weight)

    def factors(self, weight: Tensor, stats: dict) -> tuple[Tensor, Tensor]:
        raise NotImplementedError
