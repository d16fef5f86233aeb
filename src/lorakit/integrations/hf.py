"""Hugging Face ``Trainer`` support: ``Trainer(..., callbacks=[AdapterCallback()])`` on a model with lorakit adapters.

* writes the adapter (PEFT format) and the lorakit controller states into every ``checkpoint-N`` directory, so
  each checkpoint is a usable adapter;
* on ``trainer.train(resume_from_checkpoint=...)`` restores the adapter tensors and controller states of
  ``checkpoint-<global_step>`` (the Trainer restores optimizer, scheduler and RNG itself);
* runs ``lorakit.training_controllers(model)``: ``on_train_begin``, ``before_step`` before each optimizer step (gradients
  present), ``step`` at ``on_step_end``;
* adds the adapters' own losses to the loss the model returns in training (``lorakit.extra_loss``: AdaLoRA's
  orthogonality, SoRA's sparsity, MoE load balancing; ``lorakit.output_loss``: BA-LoRA's terms), through a forward
  hook on the model, so the Trainer optimises exactly what ``lorakit train`` does with no Trainer subclass.
"""
from __future__ import annotations

import logging
from pathlib import Path

import torch
from transformers import TrainerCallback

from ..inject import controllers, extra_loss, output_loss
from ..io import save_adapter
from ..train.checkpoint import adapter_tensors

log = logging.getLogger(__name__)

__all__ = ["AdapterCallback"]

STATE = "lorakit_state.pt"


class AdapterCallback(TrainerCallback):
    def __init__(self, name: str = "default", add_losses: bool = True):
        self.name = name
        self.ctrls: list = []
        self._opt = None
        self.add_losses = add_losses
        self._hook = None

    @staticmethod
    def _loss_hook(module, args, kwargs, output):
        if not module.training or not torch.is_grad_enabled():
            return None
        loss = output.get("loss") if hasattr(output, "get") else None
        if loss is None:
            return None
        for extra in (extra_loss(module), output_loss(module, output, kwargs or (args[0] if args else None))):
            if extra is not None:
                loss = loss + extra
        output["loss"] = loss
        return output

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kw):
        self._opt = optimizer
        if self.add_losses and self._hook is None and model is not None:
            self._hook = model.register_forward_hook(self._loss_hook, with_kwargs=True)
        self.ctrls = controllers(model)
        for c in self.ctrls:
            c.on_train_begin(model, optimizer, state.max_steps)
        ck = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        if state.global_step > 0 and (ck / STATE).is_file():
            st = torch.load(ck / STATE, map_location="cpu", weights_only=True)
            own = model.state_dict(keep_vars=True)
            with torch.no_grad():
                for k, v in st["tensors"].items():
                    own[k].copy_(v)
            for c, s in zip(self.ctrls, st["controllers"]):
                c.load_state_dict(s)
            log.info("lorakit: restored adapter and %d controller(s) from %s", len(self.ctrls), ck)

    def on_train_end(self, args, state, control, **kw):
        if self._hook is not None:
            self._hook.remove()
            self._hook = None

    def on_pre_optimizer_step(self, args, state, control, model=None, optimizer=None, **kw):
        for c in self.ctrls:
            c.before_step(state.global_step, model, optimizer or self._opt)

    def on_step_end(self, args, state, control, model=None, optimizer=None, **kw):
        for c in self.ctrls:
            c.step(state.global_step - 1, model, optimizer or self._opt)

    def on_save(self, args, state, control, model=None, **kw):
        ck = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        save_adapter(model, ck, self.name)
        tmp = ck / (STATE + ".tmp")
        torch.save({"tensors": adapter_tensors(model), "controllers": [c.state_dict() for c in self.ctrls]}, tmp)
        tmp.replace(ck / STATE)
