"""AdaLoRA: adaptive budget allocation (Zhang et al. 2023, arXiv:2303.10512), with PEFT's semantics and files.

SVD-form update with a rank mask::

    h = W0 x + s · P diag(λ) Q x      Q = lora_A (R, d_in), λ = lora_E (R, 1), P = lora_B (d_out, R)
    s = α / (init_r + 1e-5)           (PEFT: scaling / (ranknum + 1e-5), ranknum = init_r even after pruning)

Trainable: A, E, B. Init (PEFT): E = 0, A, B ~ N(0, 0.02²) ⇒ ΔW = 0. Loss extra (``extra_loss``):
``orth_reg_weight · mean over modules of (‖QQᵀ−I‖_F + ‖PᵀP−I‖_F)/2`` (PEFT's ``AdaLoraModel.forward`` averages over
all non-empty A and B matrices): ``extra_loss`` gives the module's ``w·(…)/2`` and ``loss_reduction = "mean"``
averages over the modules that returned one (a module pruned to rank 0 returns none, as PEFT skips it).

Schedule (:class:`AdaLoRAController`, PEFT's RankAllocator; the trainer runs it via ``lorakit.training_controllers``):
importance of each entry ``Ī·Ū`` (EMA β1/β2 of ``|p⊙∇p|``, taken in the controller's ``step``: after
``optimizer.step()``, with that step's gradients still present, as PEFT's ``update_and_allocate``);
triplet score ``S_i = s(λ_i) + mean s(Q_i·) + mean s(P_·i)``. Budget ``b(t)`` (total ranks over all modules):
``init_bgt`` for ``t ≤ tinit``; ``init_bgt − (init_bgt − target_bgt)(1 − (t−tinit)/(T−tfinal−tinit))³`` (floored
towards ``target_bgt``) every ``deltaT`` steps in between; ``target_bgt = target_r × #modules`` from
``T − tfinal`` on, where the allocation is frozen and re-applied every step. Masking zeroes ``λ_i`` of the
lowest-scoring triplets (they may revive until the next allocation, as in PEFT). ``T`` = ``total_step`` if set,
else ``total_steps`` from ``on_train_begin``.

Decisions: exactly ``init_bgt − b(t)`` triplets are masked (PEFT's ``<= kthvalue`` over-masks on ties and fails
for k = 0). Shapes never change during training (masks), so optimisers stay valid. Files: the surviving triplets
only, with PEFT's ``rank_pattern`` (and ``kept`` per module in the lorakit block); ``lorakit.rank.to_lora``
turns the result into a plain LoRA.
"""
from __future__ import annotations

from typing import ClassVar

import re
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..core import Adapter, LowRank, PeftSpec, register
from ..errors import ConfigError
from ._adaptive import AdaLoRAController, orth_penalty

_FIELDS = {k: k for k in ("init_r", "target_r", "tinit", "tfinal", "deltaT", "beta1", "beta2", "orth_reg_weight",
                          "total_step")}


@register("adalora", family="adaptive rank", paper="Zhang et al. 2023, AdaLoRA, arXiv:2303.10512",
          peft=PeftSpec("ADALORA", {**_FIELDS, "alpha": "lora_alpha", "dropout": "lora_dropout"},
                        defaults={"init_r": 12, "target_r": 8, "lora_alpha": 8, "lora_dropout": 0.0, "tinit": 0,
                                  "tfinal": 0, "deltaT": 1, "beta1": 0.85, "beta2": 0.85, "orth_reg_weight": 0.5}))
class AdaLoRA(Adapter):
    __doc__ = __doc__

    @dataclass
    class Config:
        init_r: int = 12
        target_r: int = 8
        alpha: float = 8.0
        dropout: float = 0.0
        tinit: int = 0
        tfinal: int = 0
        deltaT: int = 1
        beta1: float = 0.85
        beta2: float = 0.85
        orth_reg_weight: float = 0.5
        total_step: int | None = None
        kept: int | None = None  # stored triplets of a pruned module (set when loading a pruned file)
        positive: ClassVar = ("deltaT",)

        def validate(self) -> None:
            if self.kept is not None and not 0 <= self.kept <= self.init_r:
                raise ConfigError(f"kept={self.kept} must lie in [0, init_r={self.init_r}]")
            if not (0 < self.beta1 < 1 and 0 < self.beta2 < 1):
                raise ConfigError(f"beta1={self.beta1}, beta2={self.beta2} must lie in (0, 1)")

    roles = {"lora_A": "A", "lora_B": "B", "lora_E": "singular_values"}
    masked_rank = True
    layers = ("linear", "conv1d", "conv2d")
    loss_reduction = "mean"  # the orthogonality penalty is averaged over the modules
    file_fields = ("kept",)
    example = {"init_r": 4, "target_r": 2}
    rank_options = ("init_r",)

    def __init__(self, base, cfg: Config, view=None):
        super().__init__(base, cfg, view)
        if cfg.init_r < 0 or cfg.target_r < 0 or (cfg.kept is not None and not 0 <= cfg.kept <= cfg.init_r):
            raise ConfigError(f"need init_r >= 0, target_r >= 0 and 0 <= kept <= init_r; got {cfg}")
        R = cfg.init_r if cfg.kept is None else cfg.kept
        v = self.view
        self.lora_A = nn.Parameter(torch.empty(R, v.d_in))
        self.lora_E = nn.Parameter(torch.empty(R, 1))
        self.lora_B = nn.Parameter(torch.empty(v.d_out, R))
        self.register_buffer("rank_mask", torch.ones(R), persistent=False)
        self.scale = (cfg.alpha if cfg.alpha > 0 else float(cfg.init_r)) / (cfg.init_r + 1e-5)
        self.dropout = nn.Dropout(cfg.dropout) if cfg.dropout > 0 else nn.Identity()

    def reset_parameters(self) -> None:
        nn.init.zeros_(self.lora_E)
        nn.init.normal_(self.lora_A, std=0.02)
        nn.init.normal_(self.lora_B, std=0.02)
        self.rank_mask.fill_(1)

    def on_load(self, weight, state):
        self.rank_mask.fill_(1)
        return None

    def delta(self, x: Tensor) -> Tensor:
        h = self.view.down(self.dropout(self.cast_in(x)), self.lora_A)
        return self.view.up(self.view.rank_scale(h, self.lora_E.view(-1) * self.scale), self.lora_B)

    def delta_weight(self) -> Tensor:
        return self.lora_B @ (self.lora_A * self.lora_E) * self.scale

    def lowrank(self) -> LowRank:
        return LowRank(self.lora_A * self.lora_E, self.lora_B, self.scale)

    def kept_lowrank(self) -> LowRank:
        keep = (self.lora_E.view(-1) != 0) & self.rank_mask.bool()
        return LowRank(self.lora_A[keep], self.lora_B[:, keep] * self.lora_E.view(-1)[keep], self.scale)

    @torch.no_grad()
    def apply_mask(self) -> None:
        self.lora_E.masked_fill_(self.rank_mask.view(-1, 1) == 0, 0.0)

    def extra_loss(self) -> Tensor | None:
        w = self.cfg.orth_reg_weight
        if w <= 0 or self.lora_A.shape[0] == 0:
            return None
        return w * orth_penalty(self.lora_A, self.lora_B) / 2  # averaged over modules (loss_reduction)

    def stats(self) -> dict[str, float]:
        return {"rank": float(self.rank_mask.sum())}

    # --- files: only the surviving triplets + PEFT's rank_pattern -----------------------------------------------
    def to_file(self, state: dict[str, Tensor]) -> dict[str, Tensor]:
        keep = self.rank_mask.bool()
        if bool(keep.all()):
            return dict(state)
        return {"lora_A": state["lora_A"][keep], "lora_E": state["lora_E"][keep], "lora_B": state["lora_B"][:, keep]}

    @classmethod
    def file_config(cls, att, conf):
        pattern, kept = {}, {}
        for path, a in ((m.path, m.adapter) for m in att.members if isinstance(m.adapter, cls)):
            n = int(a.rank_mask.sum())
            if n < a.cfg.init_r:
                pattern[f"{path}.lora_E"] = [True] * n + [False] * (a.cfg.init_r - n)
                kept["^" + re.escape(path) + "$"] = {"kept": n}
        block = conf.get("lorakit", {}).get("config")
        if block is not None and kept:
            block["overrides"] = {**kept, **(block.get("overrides") or {})}
        if conf.get("peft_type") == "ADALORA":
            conf["rank_pattern"] = pattern or None
            if conf.get("total_step") is None:  # PEFT refuses a null total_step; any valid value serves inference
                conf["total_step"] = (conf.get("tinit") or 0) + (conf.get("tfinal") or 0) + 1
        return conf

    @classmethod
    def from_peft_config(cls, conf, data):
        ov = dict(data.get("overrides") or {})
        for key, mask in (conf.get("rank_pattern") or {}).items():
            path = key.split(".lora_E")[0]
            ov["^" + re.escape(path) + "$"] = {**ov.get(path, {}), "kept": int(sum(bool(m) for m in mask))}
        data["overrides"] = ov
        return data

    @classmethod
    def controller(cls, att):
        return AdaLoRAController(att, cls)
