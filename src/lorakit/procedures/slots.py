"""Fresh optimiser state and a warmup for rank slots grown during training (IncreLoRA, TriAdaptLoRA, ...).

A method that grows its rank (``Adapter.grows_slots``) preallocates the slots and turns slices of existing tensors
into new components. Left alone, AdamW treats such a slice as part of an old tensor: it inherits the tensor's step
count ``t`` (bias corrections ≈ 1) with moments that are zero or stale, so its first update is
``(1−β1)·g / √((1−β2)·g²) = 0.1/√0.001 ≈ 3.2×`` the nominal ``lr`` and stays inflated for ~100 steps. The authors'
code instead adds each growth to the optimiser as a NEW parameter group: zero moments, its own step count from 0 and
its own learning-rate warmup from 0.

:class:`SlotWarmup` reproduces that exactly for ``torch.optim.Adam``/``AdamW`` without changing the optimiser's
groups (the slots stay inside their tensors): a step pre-hook collects the slices the adapters reported
(:meth:`lorakit.Adapter.note_grown`) and zeroes their moments; a post-hook recomputes those entries' update with
their own step count ``k`` (bias corrections ``1−β^k``), the learning rate ``lr·min(1, k/warmup)`` (``lr`` the
group's current, scheduled rate) and the slice's weight decay, from the parameter value before the step and the
moments AdamW just updated. An entry whose gradient is exactly 0 at its first step (born after that step's
backward) is left untouched and its clock starts at its first gradient, as a new group's parameter without a
gradient is skipped. Each grown entry keeps its own age in the optimiser state
(``state[p]["lorakit_slot_age"]``, −1 = an original entry), so checkpoints resume it; an entry stops being tracked
once its bias corrections equal the tensor's (both within 1e-6 of 1) and its warmup is over. For other optimisers
the grown entries' state cannot be reset generically: a warning is logged once.

:func:`lorakit.procedures.setup` installs it when a trained adapter declares ``grows_slots``, so the trainer, the
HF callback and the arena get it without naming a method or a procedure.
"""
from __future__ import annotations

import logging
import weakref

import torch
from torch import nn

log = logging.getLogger(__name__)

__all__ = ["SlotWarmup", "install_slot_warmup", "set_run_warmup", "slot_warmup_of"]

_INSTALLED: "weakref.WeakKeyDictionary[torch.optim.Optimizer, SlotWarmup]" = weakref.WeakKeyDictionary()

AGE, WARM, WD = "lorakit_slot_age", "lorakit_slot_warmup", "lorakit_slot_wd"


class SlotWarmup:
    """Optimiser hooks giving grown slots the state of a new parameter group (see the module docstring)."""

    def __init__(self, optimizer: torch.optim.Optimizer, adapters: list[nn.Module]):
        self.opt = optimizer
        self.adapters = adapters
        self.adam = isinstance(optimizer, (torch.optim.Adam, torch.optim.AdamW))
        self.decoupled = isinstance(optimizer, torch.optim.AdamW) or any(
            g.get("decoupled_weight_decay", False) for g in optimizer.param_groups)
        self._before: dict[int, torch.Tensor] = {}
        self._warned = False
        self.run_warmup = 0  # the run's LR warmup in steps: the default warmup of grown slots (set_run_warmup)
        self.handles = [optimizer.register_step_pre_hook(self.pre), optimizer.register_step_post_hook(self.post)]
        for a in adapters:  # growth is applied when it happens (a checkpoint between steps then holds all of it)
            a.__dict__["_grown_listener"] = self.take

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        for a in self.adapters:
            if a.__dict__.get("_grown_listener") == self.take:
                del a.__dict__["_grown_listener"]

    @torch.no_grad()
    def take(self, a: nn.Module) -> None:
        """Reset the optimiser state of the slots ``a`` just grew (fresh moments, own step count and warmup)."""
        for g in a.take_grown():
            self.reset(getattr_path(a, g.param), g)

    # --- hooks ------------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def pre(self, opt, args, kwargs) -> None:
        for a in self.adapters:  # growth noted while no listener was set (e.g. before the optimiser existed)
            self.take(a)
        self._before = {}
        for p in self.tracked():
            if p.grad is not None:
                self._before[id(p)] = p.detach().clone()

    @torch.no_grad()
    def post(self, opt, args, kwargs) -> None:
        for p in self.tracked():
            before = self._before.get(id(p))
            if before is not None:
                self.correct(p, before)
        self._before = {}

    # --- the mechanism ------------------------------------------------------------------------------------------------
    def tracked(self):
        for g in self.opt.param_groups:
            for p in g["params"]:
                st = self.opt.state.get(p)
                if st and AGE in st:
                    yield p

    def reset(self, p: nn.Parameter, g) -> None:
        """Zero the moments of the grown entries and start their own step count at 0."""
        if self._group(p) is None:
            return  # frozen (e.g. train_experts=False) or not in this optimiser
        st = self.opt.state.get(p)
        if not st or "exp_avg" not in st:  # no state yet: the slice starts fresh anyway
            if not self.adam and not self._warned:
                self._warn()
            return
        if not self.adam:
            self._warn()
            return
        idx = [slice(None)] * p.dim()
        idx[g.dim] = slice(g.start, g.stop)
        idx = tuple(idx)
        for k in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq"):
            if k in st:
                st[k][idx] = 0
        if AGE not in st:
            st[AGE] = torch.full(p.shape, -1.0, device=p.device)
            st[WARM] = torch.zeros(p.shape, device=p.device)
            st[WD] = torch.full(p.shape, float("nan"), device=p.device)
        st[AGE][idx] = 0.0
        st[WARM][idx] = float(self.run_warmup if g.warmup is None else g.warmup)
        st[WD][idx] = float("nan") if g.weight_decay is None else float(g.weight_decay)

    def correct(self, p: nn.Parameter, before: torch.Tensor) -> None:
        """Rewrite the grown entries' update as a fresh AdamW group's (own step count, warmup, weight decay)."""
        st, grp = self.opt.state[p], self._group(p)
        age = st[AGE]
        fresh = age >= 0
        if not bool(fresh.any()):
            del st[AGE], st[WARM], st[WD]
            return
        # an entry born after this step's backward has no gradient yet: as a parameter with no grad, it is skipped
        # (its clock starts at its first gradient, as a new group's parameter's would)
        waiting = (age == 0) & (p.grad == 0) if p.grad is not None else age == 0
        fresh = fresh & ~waiting
        b1, b2 = grp["betas"]
        lr, eps = float(grp["lr"]), grp["eps"]
        k = (age + 1).where(fresh, torch.ones_like(age))
        m, v = st["exp_avg"], st.get("max_exp_avg_sq", st["exp_avg_sq"])
        bc1 = 1 - torch.pow(torch.full_like(k, b1), k)
        bc2 = 1 - torch.pow(torch.full_like(k, b2), k)
        warm = st[WARM]
        ramp = torch.where(warm > 0, (k / warm.clamp_min(1)).clamp(max=1.0), torch.ones_like(k))
        lr_k = lr * ramp
        wd = torch.where(torch.isnan(st[WD]), torch.full_like(k, grp["weight_decay"]), st[WD])
        x0 = before.float()
        if self.decoupled:
            x0 = x0 * (1 - lr_k * wd)
        # (Adam's coupled decay is already inside the moments; only the step size differs)
        new = x0 - lr_k / bc1 * m.float() / ((v.float() / bc2).sqrt() + eps)
        p.copy_(torch.where(fresh, new.to(p.dtype), torch.where(waiting, before, p)))
        age.add_(fresh.to(age.dtype))
        done = fresh & (k >= warm) & (torch.pow(torch.full_like(k, max(b1, b2)), k) < 1e-6)
        age.masked_fill_(done, -1.0)

    def _group(self, p: nn.Parameter) -> dict | None:
        """The live parameter group of ``p`` (looked up each time: ``optimizer.load_state_dict`` on resume replaces
        the group dicts, and the LR scheduler writes the rate into the new ones)."""
        return next((g for g in self.opt.param_groups if any(q is p for q in g["params"])), None)

    def _warn(self) -> None:
        if not self._warned:
            self._warned = True
            log.warning("grown rank slots keep the optimiser state of their tensor: %s is not Adam/AdamW, whose state "
                        "lorakit can reset per slot", type(self.opt).__name__)


def getattr_path(module: nn.Module, name: str) -> nn.Parameter:
    for part in name.split("."):
        module = getattr(module, part)
    return module


def install_slot_warmup(optimizer: torch.optim.Optimizer, params) -> SlotWarmup | None:
    """Install :class:`SlotWarmup` on ``optimizer`` when any of the trained adapters (``TrainParam.adapter``)
    declares ``grows_slots``; returns it (None when no adapter grows)."""
    seen, adapters = set(), []
    for t in params:
        a = t.adapter
        if a is not None and getattr(type(a), "grows_slots", False) and id(a) not in seen:
            seen.add(id(a))
            adapters.append(a)
    if not adapters:
        return None
    for a in adapters:
        a.take_grown()  # growth before training (none expected) is not the optimiser's business
    sw = SlotWarmup(optimizer, adapters)
    _INSTALLED[optimizer] = sw
    return sw


def slot_warmup_of(optimizer) -> SlotWarmup | None:
    """The :class:`SlotWarmup` installed on ``optimizer`` (accelerate's wrapper is looked through), or None."""
    for _ in range(4):
        if optimizer is None:
            return None
        try:
            if optimizer in _INSTALLED:
                return _INSTALLED[optimizer]
        except TypeError:
            return None
        optimizer = getattr(optimizer, "optimizer", None)
    return None


def set_run_warmup(optimizer, steps: int) -> None:
    """Tell the grown-slot hooks the run's LR warmup (in optimiser steps): the warmup of a grown slot whose method
    leaves it to the run (``grow_warmup: null``), as the authors' schedulers give each new group the run's warmup.
    Drivers call it once the schedule is known; a no-op when nothing grows."""
    sw = slot_warmup_of(optimizer)
    if sw is not None:
        sw.run_warmup = max(int(steps), 0)
