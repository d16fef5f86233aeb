"""Shared pieces of the adaptive-rank family (AdaLoRA, IncreLoRA, TriAdaptLoRA, SoRA, DyLoRA).

* :class:`Sensitivity`: AdaLoRA's smoothed importance ``Ī·Ū`` per parameter entry, where ``I = |p ⊙ ∇p|``,
  ``Ī ← β1·Ī + (1−β1)·I`` (sensitivity) and ``Ū ← β2·Ū + (1−β2)·|I − Ī|`` (uncertainty).
* :func:`triplet_scores`: AdaLoRA's score of each rank-1 triplet ``(a_i, e_i, b_i)``:
  ``S_i = s(e_i) + mean_j s(A_ij) + mean_j s(B_ji)``.
* :func:`orth_penalty`: ``‖AAᵀ − I‖_F + ‖BᵀB − I‖_F`` (AdaLoRA/IncreLoRA's orthogonality regulariser).

Rank changes are masks over preallocated slots: parameter shapes never change during training, so optimisers,
schedulers, checkpoints and ``torch.compile`` graphs stay valid. Physically smaller adapters are produced only
after training (:mod:`lorakit.rank`).
"""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from ..controllers import Controller
from ..errors import ConfigError


class Sensitivity:
    """EMA sensitivity × uncertainty of ``|p ⊙ ∇p|`` for a set of named tensors (AdaLoRA eq. 8–10)."""

    def __init__(self, beta1: float = 0.85, beta2: float = 0.85):
        if not (0 < beta1 < 1 and 0 < beta2 < 1):
            raise ConfigError(f"beta1/beta2 must lie in (0, 1), got {beta1}, {beta2}")
        self.beta1, self.beta2 = beta1, beta2
        self.ipt: dict[str, Tensor] = {}
        self.unc: dict[str, Tensor] = {}

    @torch.no_grad()
    def update(self, key: str, p: Tensor, grad: Tensor | None) -> None:
        if grad is None:
            return
        self.update_value(key, (p.float() * grad.float()).abs())

    @torch.no_grad()
    def update_value(self, key: str, i: Tensor) -> None:
        """Fold one raw importance ``I`` (any shape, e.g. a per-module scalar) into the EMAs of ``key``."""
        i = i.float()
        if key not in self.ipt:
            self.ipt[key], self.unc[key] = torch.zeros_like(i), torch.zeros_like(i)
        self.ipt[key].mul_(self.beta1).add_(i, alpha=1 - self.beta1)
        self.unc[key].mul_(self.beta2).add_((i - self.ipt[key]).abs(), alpha=1 - self.beta2)

    def score(self, key: str) -> Tensor | None:
        if key not in self.ipt:
            return None
        return self.ipt[key] * self.unc[key]

    def reset(self) -> None:
        self.ipt.clear()
        self.unc.clear()

    def state_dict(self) -> dict:
        return {"ipt": dict(self.ipt), "unc": dict(self.unc)}

    def load_state_dict(self, state: dict) -> None:
        self.ipt, self.unc = dict(state.get("ipt", {})), dict(state.get("unc", {}))


def triplet_scores(sens: Sensitivity, key: str, r: int, device=None) -> Tensor:
    """Score of each of the ``r`` triplets of the module ``key`` (zeros before the first update)."""
    sA, sE, sB = (sens.score(f"{key}.{n}") for n in ("A", "E", "B"))
    if sA is None:
        return torch.zeros(r, device=device)
    return sE.reshape(-1) + sA.mean(1) + sB.mean(0)


def orth_penalty(A: Tensor, B: Tensor) -> Tensor:
    """``‖AAᵀ − I‖_F + ‖BᵀB − I‖_F`` for A (r, d_in), B (d_out, r)."""
    eye = torch.eye(A.shape[0], dtype=A.dtype, device=A.device)
    return torch.linalg.matrix_norm(A @ A.t() - eye) + torch.linalg.matrix_norm(B.t() @ B - eye)


class _RankController(Controller):
    """What the rank schedules share: the ``(path, adapter)`` members of one attach whose adapter is a ``cls``,
    and their config ``c``."""

    def __init__(self, att, cls):
        self.att, self.cls = att, cls
        mods = self.mods()
        if not mods:
            raise ConfigError(f"adapter {att.name!r} has no {cls.name} modules")
        self.c = mods[0][1].cfg

    def mods(self) -> list[tuple[str, nn.Module]]:
        return [(m.path, m.adapter) for m in self.att.members if isinstance(m.adapter, self.cls)]


class AdaLoRAController(_RankController):
    """PEFT's RankAllocator as a Controller (see the AdaLoRA docstring for the schedule). ``cls``: the adapter
    class (needs ``cfg`` with the AdaLoRA schedule fields, ``rank_mask``, ``lora_A/E/B``, ``apply_mask``)."""

    def __init__(self, att, cls):
        super().__init__(att, cls)
        mods = self.mods()
        self.total = self.c.total_step
        self.sens = Sensitivity(self.c.beta1, self.c.beta2)
        self.init_bgt = sum(a.rank_mask.numel() for _, a in mods)
        self.target_bgt = self.c.target_r * len(mods)

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

    def update_sensitivity(self) -> None:
        """Fold ``|p ⊙ ∇p|`` of every A, E, B into the EMAs: ``p`` AFTER ``optimizer.step()``, with the gradient of
        that step still present (PEFT ``RankAllocator.update_ipt``, run by ``update_and_allocate`` between
        ``optimizer.step()`` and ``zero_grad()``)."""
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
        """PEFT's ``update_and_allocate(step)``: runs after ``optimizer.step()`` and before ``zero_grad()`` (the
        trainer's and the HF callback's ``step`` hook), so the sensitivities see the updated parameters."""
        if self.total is None:
            raise ConfigError("AdaLoRA needs the total number of steps: set total_step or call on_train_begin")
        final = self.total - self.c.tfinal
        if step < final:
            self.update_sensitivity()
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


def masked_orth_penalty(A: Tensor, B: Tensor, used: Tensor) -> Tensor:
    """:func:`orth_penalty` restricted to the slots where ``used`` (R,) is true (shapes stay fixed)."""
    m = used.to(A.dtype)
    mm = m.unsqueeze(0) * m.unsqueeze(1)
    eye = torch.diag(m)
    return torch.linalg.matrix_norm((A @ A.t()) * mm - eye) + torch.linalg.matrix_norm((B.t() @ B) * mm - eye)


class IncreLoRAController(_RankController):
    """IncreLoRA's RankAllocator as a Controller (see the IncreLoRA docstring). ``cls``: the adapter class (needs
    ``cfg``, ``slots``, ``max_r``, ``add_r``, ``scoring``, ``take_score``, ``activate``, ``refill``,
    ``drop_reserves``). Everything happens in ``before_step`` (after backward, before ``optimizer.step``) with the
    0-based step, as the official ``update_and_increase``."""

    def __init__(self, att, cls):
        super().__init__(att, cls)
        mods = self.mods()
        self.sens = Sensitivity(self.c.beta1, self.c.beta2)
        self.budget = self.c.target_rank * len(mods)
        self.started = False
        self.gen = torch.Generator().manual_seed(0x1C7E)  # fresh reserves; its state is checkpointed
        self._scoring()

    def total_rank(self) -> int:
        return int(sum(int(a.slots[0]) for _, a in self.mods()))

    def _scoring(self) -> None:
        on = self.total_rank() < self.budget
        for _, a in self.mods():
            a.scoring = on

    def before_step(self, step: int, model, optimizer) -> None:
        mods = self.mods()
        if not self.started:
            self.started = True
            if self.total_rank() < self.budget:
                for _, a in mods:
                    a.refill(self.gen)
        if self.total_rank() >= self.budget:
            return
        for p, a in mods:
            s = a.take_score()
            if s is not None:
                self.sens.update_value(p, s)
        if step > self.c.init_warmup and step % self.c.incre_interval == 0:
            self.grow(mods)

    @torch.no_grad()
    def grow(self, mods) -> list[str]:
        """Give ``incre_rank_num`` ranks to each of the ``top_h`` most important modules (within the budget)."""
        left = self.budget - self.total_rank()
        scores = torch.stack([(self.sens.score(p) if self.sens.score(p) is not None else torch.zeros(()))
                              .float().cpu() for p, _ in mods])
        grown = []
        for i in torch.argsort(-scores, stable=True).tolist():
            p, a = mods[i]
            room = a.max_r - int(a.slots[0])
            if len(grown) == self.c.top_h or left <= 0:
                break
            if room <= 0:
                continue
            n = min(a.add_r, left, room)
            a.activate(n, self.gen)
            left -= n
            grown.append(p)
        if left <= 0:  # budget reached: drop the reserves, stop scoring (official: zero their e, remove hooks)
            for _, a in mods:
                a.drop_reserves()
            self.sens.reset()
        else:
            for p, a in mods:
                if p in grown:
                    a.refill(self.gen)
        self._scoring()
        return grown

    def state_dict(self) -> dict:
        return {"started": self.started, "sens": self.sens.state_dict(), "gen": self.gen.get_state(),
                "slots": {p: a.slots.clone() for p, a in self.mods()}}

    def load_state_dict(self, state: dict) -> None:
        self.started = bool(state["started"])
        self.sens.load_state_dict(state["sens"])
        self.gen.set_state(state["gen"])
        for p, a in self.mods():
            if p in state["slots"]:
                a.slots.copy_(state["slots"][p])
        self._scoring()


class TriAdaptController(_RankController):
    """TriAdaptLoRA's RankAllocator as a Controller (see the TriAdaptLoRA docstring). ``cls``: the adapter class
    (needs ``cfg``, ``rank``, ``max_r``, ``add_r``, ``norm_score``, ``grow``). Growth happens in ``step`` (after
    ``optimizer.step``; the score needs no gradient) with the 0-based step."""

    def __init__(self, att, cls):
        super().__init__(att, cls)
        mods = self.mods()
        self.total = self.c.total_step
        self.budget = self.c.target_total_rank or self.c.reference_rank * len(mods)
        self.prev = {p: a.norm_score() for p, a in mods}  # ‖C‖_F/#pieces at the last allocation
        self.gen = torch.Generator().manual_seed(0x7A1D)  # new A rows; its state is checkpointed

    def total_rank(self) -> int:
        return int(sum(a.rank for _, a in self.mods()))

    def on_train_begin(self, model, optimizer, total_steps: int) -> None:
        if self.total is None:
            self.total = total_steps
        if self.total is not None and self.total <= self.c.init_warmup:
            raise ConfigError(f"TriAdaptLoRA: total_step ({self.total}) must exceed init_warmup "
                              f"({self.c.init_warmup})")

    def n_grow(self, step: int, n_modules: int) -> int:
        """How many modules grow at ``step`` (the dynamic threshold is the n-th largest score)."""
        if self.total is None:
            raise ConfigError("TriAdaptLoRA needs the total number of steps: set total_step or call on_train_begin")
        m = (step - self.c.init_warmup) / (self.total - self.c.init_warmup)
        left = self.budget - self.total_rank()
        n = int(left * m) if self.c.rank_growth_model == "linear" else int(math.exp(m * math.log(max(left, 1))))
        return min(max(n, 1), n_modules)

    def step(self, step: int, model, optimizer) -> None:
        if self.total_rank() < self.budget and step > self.c.init_warmup and step % self.c.incre_interval == 0:
            self.grow(step)

    def scores(self, mods) -> list[float]:
        """Importance: the increase of ``‖C‖_F/#pieces`` since the last allocation (which this call becomes)."""
        out = []
        for p, a in mods:
            s = a.norm_score()
            out.append(s - self.prev.get(p, s))
            self.prev[p] = s
        return out

    @torch.no_grad()
    def grow(self, step: int) -> list[str]:
        mods = self.mods()
        scores = torch.tensor(self.scores(mods), dtype=torch.float64)
        n = self.n_grow(step, len(mods))
        thr = torch.topk(scores, n).values[-1]
        left, grown = self.budget - self.total_rank(), []
        for i in torch.argsort(-scores, stable=True).tolist():
            p, a = mods[i]
            k = min(a.add_r, left, a.max_r - a.rank)
            if scores[i] < thr or left <= 0:
                break
            if k > 0:
                a.grow(k, self.gen)
                left -= k
                grown.append(p)
        return grown

    def state_dict(self) -> dict:
        return {"total": self.total, "prev": dict(self.prev), "gen": self.gen.get_state(),
                "pieces": {p: a.pieces.clone() for p, a in self.mods()}}

    def load_state_dict(self, state: dict) -> None:
        self.total = state["total"]
        self.prev = dict(state["prev"])
        self.gen.set_state(state["gen"])
        for p, a in self.mods():
            if p in state["pieces"]:
                a.pieces.copy_(state["pieces"][p])
