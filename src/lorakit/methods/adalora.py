"""AdaLoRA: adaptive budget allocation (Zhang et al. 2023, arXiv:2303.10512), with PEFT's semantics and files.

SVD-form update with a rank mask::

    h = W0 x + s · P diag(λ) Q x      Q = lora_A (R, d_in), λ = lora_E (R, 1), P = lora_B (d_out, R)
    s = α / (init_r + 1e-5)           (PEFT: scaling / (ranknum + 1e-5), ranknum = init_r even after pruning)

Trainable: A, E, B. Init (PEFT): E = 0, A, B ~ N(0, 0.02²) ⇒ ΔW = 0. Loss extra (``extra_loss``):
``orth_reg_weight · mean over modules of (‖QQᵀ−I‖_F + ‖PᵀP−I‖_F)/2`` (PEFT averages over all A and B matrices).

Schedule (:class:`AdaLoRAController`, PEFT's RankAllocator; the trainer runs it via ``lorakit.controllers``):
importance of each entry ``Ī·Ū`` (EMA β1/β2 of ``|p⊙∇p|``, taken in ``before_step`` while gradients exist);
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

import re
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..controllers import Controller
from ..core import Adapter, LowRank, PeftSpec, register
from ..errors import ConfigError
from ._adaptive import Sensitivity, adapters_of, orth_penalty, triplet_scores

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

    roles = {"lora_A": "A", "lora_B": "B", "lora_E": "singular values"}
    layers = ("linear", "conv1d", "conv2d")
    file_fields = ("kept",)
    example = {"init_r": 4, "target_r": 2}

    def __init__(self, base, cfg: Config, view=None):
        super().__init__(base, cfg, view)
        if cfg.init_r < 0 or cfg.target_r < 0 or (cfg.kept is not None and not 0 <= cfg.kept <= cfg.init_r):
            raise ValueError(f"need init_r >= 0, target_r >= 0 and 0 <= kept <= init_r; got {cfg}")
        R = cfg.init_r if cfg.kept is None else cfg.kept
        v = self.view
        self.lora_A = nn.Parameter(torch.empty(R, v.d_in))
        self.lora_E = nn.Parameter(torch.empty(R, 1))
        self.lora_B = nn.Parameter(torch.empty(v.d_out, R))
        self.register_buffer("rank_mask", torch.ones(R), persistent=False)
        self.scale = (cfg.alpha if cfg.alpha > 0 else float(cfg.init_r)) / (cfg.init_r + 1e-5)
        self.dropout = nn.Dropout(cfg.dropout) if cfg.dropout > 0 else nn.Identity()
        self.orth_modules = 1  # the controller sets the number of modules (PEFT averages the penalty over them)

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
        return w * orth_penalty(self.lora_A, self.lora_B) / (2 * self.orth_modules)

    def stats(self) -> dict[str, float]:
        return {"rank": float(self.rank_mask.sum())}

    # --- files: only the surviving triplets + PEFT's rank_pattern -----------------------------------------------
    def to_file(self, state: dict[str, Tensor]) -> dict[str, Tensor]:
        keep = self.rank_mask.bool()
        if bool(keep.all()):
            return dict(state)
        return {"lora_A": state["lora_A"][keep], "lora_E": state["lora_E"][keep], "lora_B": state["lora_B"][:, keep]}

    @classmethod
    def file_config(cls, model, name, conf):
        pattern, kept = {}, {}
        for path, a in adapters_of(model, name, cls):
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
    def controller(cls, model, name):
        return AdaLoRAController(model, name, cls)


class AdaLoRAController(Controller):
    """PEFT's RankAllocator as a Controller (see the AdaLoRA docstring for the schedule)."""

    def __init__(self, model, name: str, cls=AdaLoRA):
        self.model, self.name, self.cls = model, name, cls
        mods = adapters_of(model, name, cls)
        if not mods:
            raise ConfigError(f"adapter {name!r} has no {cls.name} modules")
        self.c = mods[0][1].cfg
        self.total = self.c.total_step
        self.sens = Sensitivity(self.c.beta1, self.c.beta2)
        self.init_bgt = sum(a.rank_mask.numel() for _, a in mods)
        self.target_bgt = self.c.target_r * len(mods)
        for _, a in mods:
            a.orth_modules = len(mods)

    def mods(self):
        return adapters_of(self.model, self.name, self.cls)

    def on_train_begin(self, model, optimizer, total_steps: int) -> None:
        if self.total is None:
            self.total = total_steps
        if self.c.tinit >= self.total - self.c.tfinal:
            raise ConfigError(f"AdaLoRA schedule has no budgeting phase: tinit={self.c.tinit} must be < total_step "
                              f"({self.total}) - tfinal ({self.c.tfinal})")

    def budget(self, step: int) -> tuple[int, bool]:
        c, T = self.c, self.total
        if step <= c.tinit:
            return self.init_bgt, False
        if step > T - c.tfinal:
            return self.target_bgt, True
        mul = 1 - (step - c.tinit) / (T - c.tfinal - c.tinit)
        return int((self.init_bgt - self.target_bgt) * mul ** 3 + self.target_bgt), step % c.deltaT == 0

    def before_step(self, step: int, model, optimizer) -> None:
        if self.total is None:
            raise ConfigError("AdaLoRA needs the total number of steps: set total_step or call on_train_begin")
        if step < self.total - self.c.tfinal:
            for path, a in self.mods():
                for k, p in (("A", a.lora_A), ("E", a.lora_E), ("B", a.lora_B)):
                    self.sens.update(f"{path}.{k}", p, p.grad)

    @torch.no_grad()
    def mask_to_budget(self, budget: int) -> None:
        mods = self.mods()
        scores = [triplet_scores(self.sens, p, a.rank_mask.numel(), a.rank_mask.device) for p, a in mods]
        flat = torch.cat([s.float().cpu() for s in scores]) if scores else torch.zeros(0)
        k = min(max(self.init_bgt - budget, 0), flat.numel())
        drop = torch.zeros(flat.numel(), dtype=torch.bool)
        drop[torch.argsort(flat, stable=True)[:k]] = True
        i = 0
        for _, a in mods:
            n = a.rank_mask.numel()
            a.rank_mask.copy_((~drop[i:i + n]).to(a.rank_mask))
            a.apply_mask()
            i += n

    def step(self, step: int, model, optimizer) -> None:
        final = self.total - self.c.tfinal
        if step < final:
            budget, now = self.budget(step)
            if now:
                self.mask_to_budget(budget)
        elif step == final:
            self.mask_to_budget(self.target_bgt)
            self.sens.reset()
        else:
            for _, a in self.mods():
                a.apply_mask()

    def active_ranks(self) -> int:
        return int(sum(a.rank_mask.sum() for _, a in self.mods()))

    def state_dict(self) -> dict:
        return {"total": self.total, "sens": self.sens.state_dict(),
                "masks": {p: a.rank_mask.clone() for p, a in self.mods()}}

    def load_state_dict(self, state: dict) -> None:
        self.total = state["total"]
        self.sens.load_state_dict(state["sens"])
        for p, a in self.mods():
            if p in state["masks"]:
                a.rank_mask.copy_(state["masks"][p])
