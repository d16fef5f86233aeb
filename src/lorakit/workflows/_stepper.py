"""One optimiser step at a time with a training procedure, in the trainer's order (for online workflows).

``lorakit.train.run_training`` trains on a dataset; a workflow that trains as it goes (Temp-Lora) needs the same
step: loss + ``extra_loss`` + ``output_loss``, backward, clipping, the controllers' ``before_step``, the
procedure's ``before_step``, ``optimizer.step()``, the procedure's ``after_step``, the scheduler, the controllers'
``step`` (see :mod:`lorakit.train.loop`). Any method and any procedure (``optim.name``) therefore work here too.
"""
from __future__ import annotations

import math
from typing import Any, Callable

import torch
from torch import nn

from .. import inject
from ..errors import ConfigError
from ..procedures import Hyper, make_procedure
from ..procedures import setup as setup_procedure


class Stepper:
    def __init__(self, model: nn.Module, *, optim: str = "adamw", options: dict | None = None, lr: float = 2e-4,
                 weight_decay: float = 0.0, betas=(0.9, 0.999), eps: float = 1e-8, total_steps: int = 1,
                 warmup: int = 0, schedule: str = "constant", max_grad_norm: float | None = None,
                 lr_fn: Callable[[int], float] | None = None):
        from ..train.loop import lr_lambda

        if not (lr >= 0 and math.isfinite(lr)):
            raise ConfigError(f"lr={lr} must be a finite number >= 0")
        self.model = model
        self.proc = make_procedure(optim, options, Hyper(lr=lr, weight_decay=weight_decay, betas=tuple(betas),
                                                          eps=eps))
        tparams, self.opt = setup_procedure(model, self.proc)
        self.params = [t.param for t in tparams]
        self.sched = torch.optim.lr_scheduler.LambdaLR(
            self.opt, lr_fn or lr_lambda(max(total_steps, 1), warmup, schedule))
        self.ctrls = inject.controllers(model)
        for c in self.ctrls:
            c.on_train_begin(model, self.opt, total_steps)
        self.proc.on_train_begin(model, self.opt, total_steps)
        self.max_grad_norm = max_grad_norm
        self.n = 0

    def step(self, forward: Callable[[], tuple[torch.Tensor, Any]], batch: Any = None, schedule: bool = True) -> float:
        """``forward()`` returns ``(task loss, model outputs)``; returns the task loss. ``schedule=False`` leaves the
        LR scheduler where it is (Temp-Lora steps its scheduler once per chunk, not per epoch)."""
        was = self.model.training
        self.model.train()
        loss, out = forward()
        full = loss
        for extra in (inject.extra_loss(self.model), inject.output_loss(self.model, out, batch)):
            if extra is not None:
                full = full + extra
        del out
        full.backward()
        if self.max_grad_norm:
            torch.nn.utils.clip_grad_norm_(self.params, self.max_grad_norm)
        for c in self.ctrls:
            c.before_step(self.n, self.model, self.opt)
        self.proc.before_step(self.n, self.model, self.opt)
        self.opt.step()
        self.proc.after_step(self.n, self.model, self.opt)
        if schedule:
            self.sched.step()
        for c in self.ctrls:
            c.step(self.n, self.model, self.opt)
        self.opt.zero_grad(set_to_none=True)
        self.n += 1
        self.model.train(was)
        return float(loss.detach())

    def schedule_step(self) -> None:
        self.sched.step()
