"""``optim.name=frugal``: FRUGAL, full-rank updates with gradient splitting (Zmushko, Beznosikov, Takáč, Horváth,
ICML 2025, "FRUGAL: Memory-Efficient Optimization by Reducing State Overhead for Scalable Training",
arXiv:2411.07837; official code ``philip-zmushko/FRUGAL``).

Every step the gradient of each *splittable* parameter (a 2-D weight of a linear layer other than the output head,
as GaLore's) is split into
a part in a low-dimensional *state-full* subspace and the rest::

    g = g_full + g_free,        g_full = 𝒫_t(g),  g_free = g − g_full
    θ ← θ − lr·Adam(g_full) − lr_free·sign(g_free)              (state-free signSGD; ``state_free: sgd``: g_free)

and the subspace is re-chosen every ``update_gap`` = T steps. Two subspaces (``proj``):

* ``blocks`` (default, the paper's main setting, "blockwise" à la BAdam [paper~, not checked against the code]):
  whole matrices are the blocks; a fraction ``density`` = ρ of the splittable matrices (rounded, at least one) is
  state-full (Adam), the rest state-free, chosen uniformly at random without replacement every T steps. The two
  parts have disjoint supports and sum to g exactly; the optimiser state is ρ × Adam's on these matrices.
* ``svd``: GaLore's projector (top ``round(ρ·min(m, n))`` singular vectors of g, side by ``proj_type=std``,
  refreshed every T steps): ``g_full = back(P-projection of g)``, ``g_free = g − g_full``; Adam runs on the
  projected r-dimensional gradient (state m×r or r×n), as GaLore with scale 1.

Everything that is not splittable (embeddings, norms, heads, vectors) is always state-full: the paper keeps the
embeddings, norms and the logits layer in Adam [paper~]. When a block leaves the state-full set its moments are
dropped (it restarts from zero when sampled again): the paper leaves this open; dropping keeps the memory at
ρ × Adam's, which is the method's point. Adam is the Hugging Face/GaLore form (bias corrections in the step size,
decoupled weight decay after the update, ``optim.weight_decay`` on 2-D parameters); ``state_free_lr`` (None:
``optim.lr``) scales with the LR schedule like ``optim.lr``. The sampling RNG (``seed``) and the state-full set are
in checkpoints (exact ``--resume``).
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from ..errors import ConfigError
from .base import Procedure, TrainParam, register_procedure
from .galore import _side, adam_direction, adam_step_size, is_output_head, orthogonal_projector, project, project_back

__all__ = ["FRUGAL", "FrugalAdamW", "split_gradient"]


def split_gradient(g: Tensor, P: Tensor, side: str) -> tuple[Tensor, Tensor, Tensor]:
    """``(R, g_full, g_free)`` for a projector ``P``: the projected gradient, its part in the subspace and the rest
    (``g_full + g_free == g``)."""
    R = project(g, P, side)
    full = project_back(R, P, side)
    return R, full, g - full


class FrugalAdamW(torch.optim.Optimizer):
    """Groups with ``frugal: True`` hold splittable matrices; ``self.statefull`` (ids) says which of them are
    state-full now (mode ``blocks``); mode ``svd`` splits every one of them. Other groups: plain Adam."""

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0):
        super().__init__(params, {"lr": lr, "betas": tuple(betas), "eps": eps, "weight_decay": weight_decay})
        self.statefull: set[int] = set()

    @staticmethod
    def _adam(st: dict, R: Tensor, group: dict) -> tuple[Tensor, float]:
        if "exp_avg" not in st:
            st["step"] = 0
        st["step"] += 1
        N = adam_direction(st, R, group["betas"], group["eps"])
        return N, adam_step_size(group["lr"], group["betas"], st["step"])

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure() if closure is not None else None
        for group in self.param_groups:
            mode = group.get("frugal")
            for p in group["params"]:
                if p.grad is None:
                    continue
                g = p.grad
                free_lr = group["lr"] * group.get("free_ratio", 1.0)
                if mode == "blocks" and id(p) not in self.statefull:
                    self.state.pop(p, None)  # state-free: no state at all
                    p.add_(g.sign() if group["state_free"] == "signsgd" else g, alpha=-free_lr)
                elif mode == "svd":
                    st = self.state[p]
                    side = _side(p.shape, "std")
                    if "projector" not in st or st["tick"] % group["update_gap"] == 0:
                        r = max(1, round(group["density"] * min(p.shape)))
                        st["projector"] = orthogonal_projector(g, r, side)
                    st["tick"] = st.get("tick", 0) + 1
                    R, _, free = split_gradient(g, st["projector"], side)
                    N, step_size = self._adam(st, R, group)
                    p.add_(project_back(N, st["projector"], side), alpha=-step_size)
                    p.add_(free.sign() if group["state_free"] == "signsgd" else free, alpha=-free_lr)
                else:
                    N, step_size = self._adam(self.state[p], g, group)
                    p.add_(N, alpha=-step_size)
                if group["weight_decay"] > 0.0:
                    p.add_(p, alpha=-group["lr"] * group["weight_decay"])
        return loss


def _splittable(t: TrainParam, targets: str | None) -> bool:
    p = t.param
    return (p.ndim == 2 and t.kind in ("linear", "conv1d") and min(p.shape) > 1 and not is_output_head(t)
            and (targets is None or re.search(targets, t.name) is not None))


@register_procedure("frugal")
class FRUGAL(Procedure):
    __doc__ = __doc__
    paper = "Zmushko et al. 2025, FRUGAL, arXiv:2411.07837"
    family = "memory (gradient splitting)"

    @dataclass
    class Config:
        density: float = 0.25  # ρ: the state-full share (of the matrices, or of each matrix's rank)
        update_gap: int = 200  # T: steps between re-choosing the subspace
        proj: Literal["blocks", "svd"] = "blocks"
        state_free: Literal["signsgd", "sgd"] = "signsgd"
        state_free_lr: float | None = None  # None: optim.lr
        seed: int = 0  # the block sampling RNG
        targets: str | None = None  # regex on parameter names: which 2-D linear weights are split (None: all)

    def validate(self) -> None:
        c = self.cfg
        if not 0.0 <= c.density <= 1.0:
            raise ConfigError(f"frugal: density={c.density} must lie in [0, 1] (the state-full share ρ)")
        if c.update_gap < 1:
            raise ConfigError(f"frugal: update_gap={c.update_gap} must be >= 1")
        if c.state_free_lr is not None and c.state_free_lr < 0:
            raise ConfigError(f"frugal: state_free_lr={c.state_free_lr} must be >= 0")

    def check(self, params: list[TrainParam]) -> None:
        if all(t.adapter_name == "probe" for t in params) and any(t.param.ndim == 2 for t in params):
            return  # a shape-only probe at config resolution (a 512x512 layer): the model's shapes decide later
        if not any(_splittable(t, self.cfg.targets) for t in params):
            self.refuse("no trainable 2-D linear weight to split into a state-full and a state-free part", params)

    def param_groups(self, params: list[TrainParam]) -> list[dict]:
        c, hp = self.cfg, self.hp
        ids = {id(t.param) for t in params if _splittable(t, c.targets)}
        ratio = 1.0 if c.state_free_lr is None else c.state_free_lr / hp.lr if hp.lr else 0.0
        out = []
        for g in super().param_groups(params):
            mine = [p for p in g["params"] if id(p) in ids]
            rest = [p for p in g["params"] if id(p) not in ids]
            if rest:
                out.append({**g, "params": rest})
            if mine:
                out.append({**g, "name": f"{g.get('name', 'group')}:split", "params": mine, "frugal": c.proj,
                            "density": c.density, "update_gap": c.update_gap, "state_free": c.state_free,
                            "free_ratio": ratio})
        return out

    def build_optimizer(self, params: list[TrainParam]) -> torch.optim.Optimizer:
        hp = self.hp
        opt = FrugalAdamW(self.param_groups(params), lr=hp.lr, betas=tuple(hp.betas), eps=hp.eps,
                          weight_decay=hp.weight_decay)
        self._blocks = [p for g in opt.param_groups if g.get("frugal") == "blocks" for p in g["params"]]
        self._gen = torch.Generator().manual_seed(self.cfg.seed)
        self.chosen: list[int] = []
        self._opt = opt
        return opt

    def _choose(self, optimizer) -> None:
        n = len(self._blocks)
        if not n:
            return
        k = min(n, max(1, round(self.cfg.density * n))) if self.cfg.density > 0 else 0
        self.chosen = sorted(torch.randperm(n, generator=self._gen)[:k].tolist())
        self._set(optimizer)

    def _set(self, optimizer) -> None:
        optimizer.statefull = {id(self._blocks[i]) for i in self.chosen}
        for p in self._blocks:  # a block that left the state-full set drops its moments
            if id(p) not in optimizer.statefull:
                optimizer.state.pop(p, None)

    def on_train_begin(self, model, optimizer, total_steps: int) -> None:
        self._choose(optimizer)

    def after_step(self, step: int, model, optimizer) -> None:
        if (step + 1) % self.cfg.update_gap == 0:
            self._choose(optimizer)

    def state_dict(self) -> dict:
        return {"rng": self._gen.get_state(), "chosen": list(self.chosen)}

    def load_state_dict(self, state: dict) -> None:
        if not state:
            return
        self._gen.set_state(state["rng"])
        self.chosen = [int(i) for i in state["chosen"]]
        self._set(self._opt)
