"""VeRA: vector-based random matrix adaptation (Kopiczko et al. 2024, arXiv:2310.11454).

``h = W0 x + Λ_b B Λ_d A x`` with ONE pair of frozen random matrices shared by every adapted layer:
``A`` (r, d_in_max), ``B`` (d_out_max, r), sized to the largest target and sliced per layer
(``A[:, :d_in]``, ``B[:d_out, :]``). Per layer only two vectors train: ``λ_d`` (r,) and ``λ_b`` (d_out,).
``ΔW = diag(λ_b) B[:d_out] diag(λ_d) A[:, :d_in]``. Init: ``λ_b = 0`` (ΔW = 0), ``λ_d = d_initial`` (0.1).

PEFT parity (PEFT ``VeraModel``, read and re-implemented): the bases come from ``torch.Generator("cpu")`` seeded with
``projection_prng_key``: first ``A`` then ``B``, each kaiming-uniform with gain √2 over fan_in (A: d_in_max,
B: r), fp32. The max shape is taken over the targeted layers exactly as PEFT does, so a PEFT file saved with
``save_projection=False`` reloads with bit-identical bases. With ``save_projection=True`` (PEFT's default) the file
also holds ``base_model.vera_A`` / ``base_model.vera_B`` (model-level keys, written/read by ``shared_to_file`` /
``shared_from_file``); loaded bases replace the regenerated ones. File keys: ``vera_lambda_b``, ``vera_lambda_d``.

Decisions: the bases live in one :class:`~lorakit.methods._shared.SharedBases` module that is a child of every
adapter (non-persistent buffers, one storage for the whole model). The seed option is ``projection_seed`` (the
attach-level ``seed`` drives the global RNG, not PEFT's key). Layers: Linear and Conv1D, as PEFT.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..core import Adapter, LowRank, PeftSpec, register
from ..errors import ConfigError
from ._shared import attach_shared, kaiming_uniform_gen

KEYS = {"A": "base_model.vera_A", "B": "base_model.vera_B"}


def vera_bases(seed: int, r: int, d_in: int, d_out: int) -> dict[str, Tensor]:
    g = torch.Generator(device="cpu").manual_seed(seed)
    A = kaiming_uniform_gen((r, d_in), g)
    return {"A": A, "B": kaiming_uniform_gen((d_out, r), g)}


@register("vera", family="random-basis", paper="Kopiczko et al. 2024, VeRA, arXiv:2310.11454",
          peft=PeftSpec("VERA", {"r": "r", "d_initial": "d_initial", "dropout": "vera_dropout",
                                 "projection_seed": "projection_prng_key", "save_projection": "save_projection"},
                        fixed={"init_weights": True, "fan_in_fan_out": False},
                        defaults={"r": 256, "d_initial": 0.1, "vera_dropout": 0.0, "projection_prng_key": 0,
                                  "save_projection": True}))
class VeRA(Adapter):
    __doc__ = __doc__

    @dataclass
    class Config:
        r: int = 256
        d_initial: float = 0.1
        dropout: float = 0.0
        projection_seed: int = 0
        save_projection: bool = True

    roles = {"vera_lambda_d": "scale", "vera_lambda_b": "scale"}
    layers = ("linear", "conv1d")

    @classmethod
    def max_rank(cls, view) -> int:
        # r sizes the shared random bases and the trainable λ_d (r,): it may exceed min(d_out, d_in) (PEFT's default
        # 256 on smaller layers), but more scaling entries than the layer has weights is meaningless
        return view.d_out * view.d_in

    def __init__(self, base: nn.Module, cfg: Config, view=None):
        super().__init__(base, cfg, view)
        if cfg.r <= 0:
            raise ConfigError(f"r must be positive, got {cfg.r}")
        self.vera_lambda_b = nn.Parameter(torch.empty(self.view.d_out))
        self.vera_lambda_d = nn.Parameter(torch.empty(cfg.r))
        self.dropout = nn.Dropout(cfg.dropout) if cfg.dropout > 0 else nn.Identity()

    @classmethod
    def share(cls, att) -> None:
        adapters = att.adapters
        c = adapters[0].cfg
        if len({(a.cfg.r, a.cfg.projection_seed) for a in adapters}) > 1:
            from ..errors import ConfigError

            raise ConfigError("VeRA shares one pair of bases per adapter: r and projection_seed cannot vary per module")
        d_in, d_out = max(a.view.d_in for a in adapters), max(a.view.d_out for a in adapters)
        attach_shared(adapters, {"A": (c.r, d_in), "B": (d_out, c.r)},
                      lambda: vera_bases(c.projection_seed, c.r, d_in, d_out))

    @classmethod
    def shared_to_file(cls, att) -> dict[str, Tensor]:
        adapters = att.adapters
        if not adapters[0].cfg.save_projection:
            return {}
        b = adapters[0].bases
        return {KEYS["A"]: b.A, KEYS["B"]: b.B}

    @classmethod
    def shared_from_file(cls, att, tensors: dict[str, Tensor]) -> set[str]:
        adapters = att.adapters
        found = {k: tensors[f] for k, f in KEYS.items() if f in tensors}
        if found:
            adapters[0].bases.load(found)
        return {KEYS[k] for k in found}

    def reset_parameters(self) -> None:
        with torch.no_grad():
            self.vera_lambda_b.zero_()
            self.vera_lambda_d.fill_(self.cfg.d_initial)
        if "bases" in self._modules:
            self.bases.fill()

    def _AB(self) -> tuple[Tensor, Tensor]:
        return self.bases.A[:, : self.view.d_in], self.bases.B[: self.view.d_out]

    def delta(self, x: Tensor) -> Tensor:
        A, B = self._AB()
        h = self.view.down(self.dropout(self.cast_in(x)), A.to(self.vera_lambda_d.dtype))
        return self.view.up(h * self.vera_lambda_d, B.to(self.vera_lambda_b.dtype)) * self.vera_lambda_b

    def delta_weight(self) -> Tensor:
        A, B = self._AB()
        return (self.vera_lambda_b[:, None] * B) @ (self.vera_lambda_d[:, None] * A)

    def lowrank(self) -> LowRank:
        A, B = self._AB()
        return LowRank(self.vera_lambda_d[:, None] * A, self.vera_lambda_b[:, None] * B, 1.0)
