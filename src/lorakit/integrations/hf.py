"""Hugging Face ``Trainer`` support: ``Trainer(..., callbacks=[AdapterCallback()])`` on a model with lorakit adapters.

* writes the adapter (PEFT format) and the lorakit controller states into every ``checkpoint-N`` directory, so
  each checkpoint is a usable adapter;
* on ``trainer.train(resume_from_checkpoint=...)`` restores the adapter tensors and controller states of
  ``checkpoint-<global_step>`` (the Trainer restores optimizer, scheduler and RNG itself);
* runs ``lorakit.training_controllers(model)``: ``on_train_begin``, ``before_step`` before each optimizer step (gradients
  present), ``step`` right after it (``on_optimizer_step``: the gradients are still there, as in ``lorakit train``;
  at ``on_step_end`` the Trainer has already zeroed them, and AdaLoRA's sensitivities need them);
* drives a lorakit training procedure (``optim.name`` in ``lorakit train``: adamw, loraplus, ...) when the optimiser
  comes from :func:`create_optimizer`: its ``before_forward`` at ``on_step_begin``, its ``before_step`` before each
  optimizer step (after the Trainer's gradient clipping and the controllers), ``after_step`` right after it, its
  ``step_metrics`` in the Trainer's logs, and its state in every checkpoint::

      opt = create_optimizer(model, args, "loraplus", ratio=16)
      Trainer(model=model, args=args, optimizers=(opt, None), callbacks=[AdapterCallback()], ...)

* works under ``torchrun`` / ``accelerate launch`` (the Trainer's DDP): the controllers and the procedure run on
  every rank on the averaged gradients, so the replicas stay identical, and only the process the Trainer saves
  from (``args.should_save``) writes the adapter and state files (tested with 2 gloo processes). The Trainer's
  FSDP (``fsdp=...`` / an accelerate FSDP config) is not tested with lorakit adapters: use ``lorakit train
  train.distributed=fsdp`` for a sharded base;
* adds the adapters' own losses to the loss the model returns in training (``lorakit.extra_loss``: AdaLoRA's
  orthogonality, SoRA's sparsity, MoE load balancing; ``lorakit.output_loss``: BA-LoRA's terms), through a forward
  hook on the model, so the Trainer optimises exactly what ``lorakit train`` does with no Trainer subclass.
"""
from __future__ import annotations

import dataclasses
import logging
import weakref
from pathlib import Path
from typing import Any

import torch
from transformers import TrainerCallback

from ..inject import controllers, extra_loss, output_loss
from ..io import save_adapter
from ..errors import ConfigError
from ..procedures import Hyper, Procedure, make_procedure, setup
from ..train.checkpoint import adapter_tensors, fit_saved_tensors

log = logging.getLogger(__name__)

__all__ = ["AdapterCallback", "create_optimizer", "procedure_of"]

STATE = "lorakit_state.pt"

_PROCEDURES: "weakref.WeakKeyDictionary[torch.optim.Optimizer, Procedure]" = weakref.WeakKeyDictionary()


def create_optimizer(model: torch.nn.Module, args: Any = None, procedure: str = "adamw", validation: Any = None,
                     **options: Any) -> torch.optim.Optimizer:
    """The optimiser of lorakit training procedure ``procedure`` for the model's trainable parameters, to pass as
    ``Trainer(optimizers=(opt, None))`` next to an :class:`AdapterCallback` (which then runs the procedure's hooks
    and checkpoints its state). ``args`` (``TrainingArguments``) gives ``learning_rate``, ``weight_decay``,
    ``adam_beta1/2`` and ``adam_epsilon``; ``options`` are the procedure's own (``ratio=16`` for loraplus) and may
    override those shared settings by their lorakit names (``lr``, ``weight_decay``, ``betas``, ``eps``,
    ``trainable_lr``). Bad names or options raise :class:`lorakit.ConfigError`, as does a method the procedure
    cannot train (e.g. LoRA+ on VeRA). A procedure that trains on validation losses (``needs_validation``:
    flexora) needs ``validation``: a list of batches (dicts of tensors the model takes, with ``labels``); its loss
    is ``model(**batch).loss``; without it a :class:`lorakit.ConfigError` says so."""
    hp = Hyper()
    if args is not None:
        hp = Hyper(lr=args.learning_rate, weight_decay=args.weight_decay, betas=(args.adam_beta1, args.adam_beta2),
                   eps=args.adam_epsilon)
    shared = {f.name for f in dataclasses.fields(Hyper)}
    hp = dataclasses.replace(hp, **{k: options.pop(k) for k in list(options) if k in shared})
    proc = make_procedure(procedure, options, hp, where="create_optimizer", common=tuple(sorted(shared)))
    if proc.needs_validation:
        if not validation:
            raise ConfigError(f"procedure '{procedure}' trains on validation losses: pass "
                              "create_optimizer(..., validation=[batch, ...]) (dicts of tensors with labels, kept "
                              "apart from the training set)")
        batches = list(validation)

        def loss_fn(i: int, split: str = "validation"):
            if split != "validation":
                raise NotImplementedError("the HF Trainer's training batches are not available to the procedure")
            dev = next(model.parameters()).device
            b = batches[i % len(batches)]
            return model(**{k: (v.to(dev) if torch.is_tensor(v) else v) for k, v in b.items()}).loss

        proc.set_validation(loss_fn)
    elif validation is not None:
        raise ConfigError(f"create_optimizer: procedure '{procedure}' takes no validation batches")
    _, opt = setup(model, proc)
    _PROCEDURES[opt] = proc
    return opt


def procedure_of(optimizer: Any) -> Procedure | None:
    """The procedure that built ``optimizer`` (through :func:`create_optimizer`; accelerate's wrapper is looked
    through), or None for any other optimiser."""
    seen = 0
    while optimizer is not None and seen < 4:
        try:
            if optimizer in _PROCEDURES:
                return _PROCEDURES[optimizer]
        except TypeError:  # not weak-referenceable
            pass
        optimizer, seen = getattr(optimizer, "optimizer", None), seen + 1
    return None


class AdapterCallback(TrainerCallback):
    def __init__(self, name: str = "default", add_losses: bool = True):
        self.name = name
        self.ctrls: list = []
        self.proc: Procedure | None = None
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
        if optimizer is not None and getattr(args, "get_warmup_steps", None) is not None:
            from ..procedures.slots import set_run_warmup  # grown rank slots warm up as the run does
            set_run_warmup(optimizer, args.get_warmup_steps(state.max_steps))
        self.proc = procedure_of(optimizer)
        if self.proc is not None:
            self.proc.on_train_begin(model, optimizer, state.max_steps)
        ck = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        if state.global_step > 0 and (ck / STATE).is_file():
            st = torch.load(ck / STATE, map_location="cpu", weights_only=True)
            fit_saved_tensors(model, st["tensors"])  # supports selected during training (sparse methods)
            own = model.state_dict(keep_vars=True)
            with torch.no_grad():
                for k, v in st["tensors"].items():
                    own[k].copy_(v)
            for c, s in zip(self.ctrls, st["controllers"]):
                c.load_state_dict(s)
            if self.proc is not None and st.get("procedure") is not None:
                self.proc.load_state_dict(st["procedure"])
            log.info("lorakit: restored adapter and %d controller(s) from %s", len(self.ctrls), ck)

    def on_train_end(self, args, state, control, **kw):
        if self._hook is not None:
            self._hook.remove()
            self._hook = None

    def on_step_begin(self, args, state, control, model=None, optimizer=None, **kw):
        # before the first micro-batch's forward of an optimizer step (weight perturbations: LoRA-GGPO)
        if self.proc is not None:
            self.proc.before_forward(state.global_step, model, optimizer or self._opt)

    def on_log(self, args, state, control, logs=None, **kw):
        # the procedure's numbers of the last step (LoRA-Pro's approximation error) as procedure/<key>
        if self.proc is not None and logs is not None:
            extra = {f"procedure/{k}": v for k, v in self.proc.step_metrics().items()}
            logs.update(extra)
            if state.log_history:
                state.log_history[-1].update(extra)

    def on_pre_optimizer_step(self, args, state, control, model=None, optimizer=None, **kw):
        if torch.distributed.is_available() and torch.distributed.is_initialized():  # torchrun: whole-batch stats
            from ..train.distributed import sum_buffers

            sum_buffers(getattr(model, "module", model), torch.distributed.get_world_size())
        for c in self.ctrls:
            c.before_step(state.global_step, model, optimizer or self._opt)
        if self.proc is not None:
            self.proc.before_step(state.global_step, model, optimizer or self._opt)

    def on_optimizer_step(self, args, state, control, model=None, optimizer=None, **kw):
        # after optimizer.step(), before zero_grad(); global_step is not incremented yet: the same index as
        # before_step. The procedure first, then the controllers, as in lorakit train.
        if self.proc is not None:
            self.proc.after_step(state.global_step, model, optimizer or self._opt)
        for c in self.ctrls:
            c.step(state.global_step, model, optimizer or self._opt)

    def on_save(self, args, state, control, model=None, **kw):
        if not getattr(args, "should_save", True):  # torchrun / accelerate: the process the Trainer saves from
            return
        ck = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        save_adapter(model, ck, self.name)
        tmp = ck / (STATE + ".tmp")
        torch.save({"tensors": adapter_tensors(model), "controllers": [c.state_dict() for c in self.ctrls],
                    "procedure": self.proc.state_dict() if self.proc is not None else None}, tmp)
        tmp.replace(ck / STATE)
