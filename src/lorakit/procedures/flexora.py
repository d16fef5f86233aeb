"""``optim.name=flexora``: Flexora (Wei, Shu, He, Yu 2025, "Flexora: Flexible Low-Rank Adaptation for Large Language
Models", ACL 2025, arXiv:2408.10774): which layers get LoRA, chosen by hyper-parameter optimisation.

Stage 1 (layer selection, the first ``search_fraction`` of the steps): every layer ℓ (a transformer block: the
adapters whose module path shares the prefix up to its first integer component, ``model.layers.3``) gets a scalar
gate ``α_ℓ`` on its adapters' output, ``y = base(x) + α_ℓ·(adapter(x, y) − base(x))`` (for LoRA: ``W0x + α_ℓ·s·BAx``).
The adapters train on the training batches (the trainer's ordinary step); the gates are the hyper-parameters of
the bi-level problem ``min_α L_val(θ*(α), α)``, ``θ*(α) = argmin_θ L_train(θ, α)``, solved by one-step unrolled
differentiation: at each search step (after the training backward, before the optimiser step)::

    θ'(α) = θ − ξ·∇_θ L_train(θ, α)            (ξ = ``unroll_lr``, default the current optim.lr)
    α     ← Adam_α(d/dα L_val(θ'(α), α))        (``gate_lr``; one validation batch per step)

Stage 2: the layers whose gate rose during the search are selected (``select: increased``); the adapters of the
other layers are reset to their no-op init and frozen (they stay in the file as zero updates, so every layer loads),
the gates are removed, the selected adapters are re-initialised (``reinit``) and train alone for the remaining steps.

**Verified against the official code** (github.com/kithib/Flexora, the authors' LLaMA-Factory fork:
``src/llamafactory/train/flora.py``, ``flexora.yaml``, ``sft.yaml``, ``train/sft/workflow.py``; read 2026-12):

* **Gates = L·softmax(h)** over the L layers, one logit ``h_ℓ`` per layer starting at 0 (so every gate starts at 1:
  the search begins from plain LoRA), the logits trained by Adam at lr **0.01** (``gate_lr``): ``gates: softmax``
  (default). ``gates: direct`` trains the L gates as free scalars from 1 (the reference's reading; earlier default).
* **Selection: the layers whose logit ended above its start** (``selected_layer() = hyper_param > 0``): the number
  of layers is data-dependent (the official per-task lists keep 7 to 16 of 32 layers), not a fixed share:
  ``select: increased`` (default; with ``gates: direct``, the gates above 1). ``select: top`` keeps the ``keep``
  share with the largest gates (the reference's reading; earlier default). If no gate rose, the largest one is kept
  (the official code would train no layer).
* **First order.** The official hyper-step takes the gradient of the validation loss with respect to the logits at
  the current adapter weights (after the step), without a second-order term: ``second_order: false`` (default);
  ``true`` adds DARTS' finite-difference term (below).
* **Stage 2 re-trains from scratch** (a fresh LoRA on the selected layers, a separate run in the official scripts):
  ``reinit: true``. Validation batches are held out of the training rows (official: ``val_size: 200``).

Differences that remain: the official gate multiplies the *input* of each PEFT ``lora_*`` submodule (a pre-hook), so
with dropout, A and B hooked the LoRA path is scaled by α³; here the adapter's output ``ΔW x`` is scaled by α once
(the paper's ``α_ℓ·s·B_ℓA_ℓx``, reference A5). The official hyper-step sums the gradients of 8 validation batches
per step; here one batch per step. The official search runs one epoch of 5000 samples at lr 1e-4 (then 3 epochs
of fine-tuning); here the first ``search_fraction`` of the steps (ours).

Other choices:

* **The hyper-gradient** ``d/dα L_val(θ − ξ∇_θL_train(θ, α), α) = ∇_α L_val(θ', α) − ξ·∇²_{α,θ}L_train(θ, α)·v``,
  ``v = ∇_θ' L_val(θ', α)``: by default first order (the official code's choice; the gradient at the look-ahead
  point θ', which the official code reaches by the optimiser's real step); ``second_order: true`` adds the mixed
  second derivative by DARTS' central difference (two extra forward/backward passes on the step's first training
  micro-batch, which the trainer supplies through ``loss_fn(step, split="train")``). The HF Trainer does not hand
  its training batches to callbacks, so there the first-order form is always used (logged once).
  θ' uses the step's gradient after clipping (what the optimiser steps with).
* **Validation data = held-out training rows** (``val_fraction``, default 10%, taken from the end of the training
  set before training starts), never the evaluation split the reported metrics come from. The trainer honours
  the ``needs_validation`` capability; the HF callback takes ``create_optimizer(..., validation=[batches])``.
* ``select: top``: ties break by layer order.
* **Re-initialising the selected layers** follows the reference's reading of the paper (fine-tune the selected
  layers from scratch); ``reinit: false`` keeps their searched weights. Re-initialisation draws from a generator
  seeded with the adapter seed, so the run's RNG stream is untouched.

State (checkpointed): the gates, their Adam state and the selected layers.
"""
from __future__ import annotations

import logging
import math
import re
from dataclasses import dataclass
from typing import Literal

import torch

from ..errors import ConfigError
from .base import Procedure, TrainParam, register_procedure

__all__ = ["Flexora", "layer_key"]

log = logging.getLogger(__name__)


def layer_key(path: str) -> str:
    """The layer an adapted module belongs to: its path up to the first integer component (``model.layers.3``);
    the whole path when it has none."""
    parts = path.split(".")
    for i, p in enumerate(parts):
        if re.fullmatch(r"\d+", p):
            return ".".join(parts[:i + 1])
    return path


@register_procedure("flexora")
class Flexora(Procedure):
    paper = "Wei et al. 2025, ACL, arXiv:2408.10774"
    family = "selection"
    needs_validation = True

    @dataclass
    class Config:
        search_fraction: float = 0.25  # share of train.steps spent on the layer search (stage 1)
        keep: float = 0.5  # share of the layers kept with select=top
        gate_lr: float = 0.01  # Adam rate of the gate parameters (official: 0.01)
        gates: Literal["softmax", "direct"] = "softmax"  # softmax: gates = L·softmax(h), h from 0 (official)
        select: Literal["increased", "top"] = "increased"  # increased: the gates that rose (official); top: `keep`
        unroll_lr: float | None = None  # ξ of the unrolled step; None: the current optim.lr
        val_fraction: float = 0.1  # training rows held out as validation data
        reinit: bool = True  # re-initialise the selected adapters after the search
        second_order: bool = False  # the unrolled step's second-order term (DARTS; the official code: none)

    def __init__(self, cfg=None, hp=None):
        super().__init__(cfg, hp)
        self.layers: list[str] = []
        self.gates: torch.Tensor | None = None
        self.gate_opt: torch.optim.Optimizer | None = None
        self.selected: list[str] | None = None
        self.search_steps = 0
        self._members: dict[str, list] = {}
        self._hooks: list = []
        self.last_gate_grad: torch.Tensor | None = None
        self._warned = False

    def validate(self) -> None:
        c = self.cfg
        for k in ("search_fraction", "keep", "val_fraction"):
            v = getattr(c, k)
            if not 0 < v < 1 and not (k == "keep" and v == 1):
                raise ConfigError(f"flexora: {k}={v} must be in (0, 1)")
        if not c.gate_lr > 0:
            raise ConfigError(f"flexora: gate_lr={c.gate_lr} must be > 0")
        if c.unroll_lr is not None and c.unroll_lr < 0:
            raise ConfigError(f"flexora: unroll_lr={c.unroll_lr} must be >= 0")
        if c.gates not in ("softmax", "direct"):
            raise ConfigError(f"flexora: gates={c.gates!r}; valid: softmax (official), direct")
        if c.select not in ("increased", "top"):
            raise ConfigError(f"flexora: select={c.select!r}; valid: increased (official), top")

    def validation_rows(self, n_train: int) -> int:
        return max(1, round(self.cfg.val_fraction * n_train))

    def check(self, params: list[TrainParam]) -> None:
        if not any(t.adapter is not None for t in params):
            self.refuse("Flexora gates the adapters of each layer, but no trainable parameter belongs to an adapter",
                        params)

    # --- setup ----------------------------------------------------------------------------------------------------
    def on_train_begin(self, model, optimizer, total_steps) -> None:
        from ..attachments import attachments

        if self.validation_loss is None:
            raise ConfigError("optim.name=flexora needs validation batches: `lorakit train` holds them out of the "
                              "training set; with the HF Trainer pass create_optimizer(..., validation=[batches])")
        self._members = {}
        for att in attachments(model).values():
            for m in att.members:
                if any(p.requires_grad for p in m.adapter.parameters()):
                    self._members.setdefault(layer_key(m.path), []).append(m.adapter)
        self.layers = list(self._members)
        if len(self.layers) < 2:
            raise ConfigError(f"optim.name=flexora selects layers, but the adapters sit in {len(self.layers)} layer(s) "
                              f"({', '.join(self.layers) or 'none'}); target modules in several blocks")
        self.search_steps = max(1, round(self.cfg.search_fraction * total_steps))
        dev = next(iter(self._members.values()))[0].parameters().__next__().device
        start = 0.0 if self.cfg.gates == "softmax" else 1.0  # every gate value starts at 1
        self.gates = torch.full((len(self.layers),), start, device=dev, requires_grad=True)
        self.gate_opt = torch.optim.Adam([self.gates], lr=self.cfg.gate_lr)
        self._install_gates()

    def _install_gates(self) -> None:
        self._remove_gates()
        base_out: dict[int, torch.Tensor] = {}

        def keep_y(mod, args):
            base_out[id(mod)] = args[1]
            if not torch.is_grad_enabled():  # LoRA adds into y in place without grad: give it a copy
                return (args[0], args[1].clone(), *args[2:])
            return None

        for i, key in enumerate(self.layers):
            for a in self._members[key]:
                def gate(mod, args, out, i=i):
                    y = base_out.pop(id(mod))
                    return y + self.gate_values()[i].to(out.dtype) * (out - y)
                self._hooks.append(a.register_forward_pre_hook(keep_y))
                self._hooks.append(a.register_forward_hook(gate))

    def gate_values(self) -> torch.Tensor:
        """α: ``L·softmax(h)`` of the trained logits (``gates: softmax``), or the trained gates themselves."""
        if self.cfg.gates == "softmax":
            return len(self.layers) * torch.softmax(self.gates, dim=0)
        return self.gates

    def _remove_gates(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks = []

    # --- stage 1: the gates ---------------------------------------------------------------------------------------
    def before_step(self, step, model, optimizer) -> None:
        if self.selected is not None:
            return
        self.gates.grad = None  # the training loss's gradient on α is not the hyper-gradient
        params = [p for key in self.layers for a in self._members[key] for p in a.parameters()
                  if p.requires_grad and p.grad is not None]
        xi = self.cfg.unroll_lr if self.cfg.unroll_lr is not None else optimizer.param_groups[0]["lr"]
        saved = [p.detach().clone() for p in params]
        try:
            with torch.no_grad():
                for p in params:
                    p.add_(p.grad, alpha=-xi)  # θ' = θ − ξ ∇θ L_train(θ, α)
            grads = torch.autograd.grad(self.validation_loss(step), [self.gates, *params], allow_unused=True)
            g, v = grads[0], [torch.zeros_like(p) if d is None else d for p, d in zip(params, grads[1:])]
            if self.cfg.second_order and xi > 0:
                g = g - xi * self._mixed_hvp(step, params, saved, v)
        finally:
            with torch.no_grad():
                for p, p0 in zip(params, saved):
                    p.copy_(p0)
        self.last_gate_grad = g.detach().clone()
        self.gate_opt.zero_grad(set_to_none=True)
        self.gates.grad = g
        self.gate_opt.step()
        self.gates.grad = None

    def _mixed_hvp(self, step, params, saved, v) -> torch.Tensor:
        """``∇²_{α,θ} L_train(θ, α) · v`` by DARTS' central difference: ``[∇_α L_train(θ + εv) − ∇_α L_train(θ − εv)]
        / 2ε``, ε = 0.01/‖v‖, on the step's first training micro-batch (zero when the training batches are not
        available, e.g. in the HF Trainer: then the first-order hyper-gradient, logged once)."""
        norm = math.sqrt(sum(float(d.pow(2).sum()) for d in v))
        if not norm > 0:
            return torch.zeros_like(self.gates)
        eps = 0.01 / float(norm)
        out = []
        for sign in (1.0, -1.0):
            with torch.no_grad():
                for p, p0, d in zip(params, saved, v):
                    p.copy_(p0).add_(d, alpha=sign * eps)
            try:
                loss = self.validation_loss(step, split="train")
            except NotImplementedError as e:
                if not self._warned:
                    log.warning("flexora: %s; using the first-order hyper-gradient", e)
                    self._warned = True
                return torch.zeros_like(self.gates)
            (ga,) = torch.autograd.grad(loss, [self.gates])
            out.append(ga)
        return (out[0] - out[1]) / (2 * eps)

    def after_step(self, step, model, optimizer) -> None:
        if self.selected is None and step + 1 >= self.search_steps:
            self._select(optimizer, reinit=self.cfg.reinit)

    # --- stage 2: the chosen layers -------------------------------------------------------------------------------
    def selection(self) -> list[str]:
        """The layers to keep: those whose gate parameter rose above its start (``select: increased``: logit > 0, or
        gate > 1 for direct gates), else the ``keep`` share with the largest gates; at least one."""
        order = sorted(range(len(self.layers)), key=lambda i: (-float(self.gates[i].detach()), i))
        if self.cfg.select == "increased":
            start = 0.0 if self.cfg.gates == "softmax" else 1.0
            up = [i for i in range(len(self.layers)) if float(self.gates[i].detach()) > start]
            return [self.layers[i] for i in (up or order[:1])]
        k = max(1, round(self.cfg.keep * len(self.layers)))
        return [self.layers[i] for i in sorted(order[:k])]

    def _select(self, optimizer, reinit: bool, chosen: list[str] | None = None) -> None:
        self.selected = chosen if chosen is not None else self.selection()
        self._remove_gates()
        keep = set(self.selected)
        seed = 0
        with torch.random.fork_rng(devices=[]):
            for key in self.layers:
                for a in self._members[key]:
                    if key not in keep or reinit:
                        torch.manual_seed(seed)
                        seed += 1
                        with torch.no_grad():
                            a.reset_parameters()
                        for p in a.parameters():
                            optimizer.state.pop(p, None)  # a fresh start: no moments from the search
                    if key not in keep:
                        for p in a.parameters():
                            p.requires_grad_(False)
                            p.grad = None

    def step_metrics(self) -> dict[str, float]:
        if self.gates is None:
            return {}
        out = {f"gate/{k}": float(v) for k, v in zip(self.layers, self.gate_values().detach())}
        out["selected_layers"] = float(len(self.selected)) if self.selected is not None else 0.0
        return out

    def state_dict(self) -> dict:
        return {"gates": self.gates.detach().clone() if self.gates is not None else None,
                "gate_opt": self.gate_opt.state_dict() if self.gate_opt is not None else None,
                "selected": list(self.selected) if self.selected is not None else None}

    def load_state_dict(self, state: dict) -> None:
        if state.get("gates") is not None:
            with torch.no_grad():
                self.gates.copy_(state["gates"].to(self.gates.device))
            self.gate_opt.load_state_dict(state["gate_opt"])
        if state.get("selected") is not None:  # the checkpoint's tensors are already the trained ones: no reinit
            self._freeze_only(state["selected"])

    def _freeze_only(self, chosen: list[str]) -> None:
        self.selected = list(chosen)
        self._remove_gates()
        for key in self.layers:
            if key not in set(chosen):
                for a in self._members[key]:
                    for p in a.parameters():
                        p.requires_grad_(False)
                        p.grad = None
