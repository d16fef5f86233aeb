"""Full fine-tuning: the base model's own weights train in place (the baseline every PEFT paper compares with).

``full`` is a registered method so that everything written against the :class:`~lorakit.core.Adapter` abstraction
(``lorakit train``, the HF callback, the arena, every training procedure, checkpoints and ``--resume``) trains a
whole model without a special case. Each targeted layer gets a host whose adapter holds **the layer's own weight
Parameter** (the same object, not a copy) under the role ``weight``; its forward adds nothing (``y = base(x)``),
so the trained weight is the model. With ``rest: true`` (default) every other base parameter of the model (norms,
biases, untargeted layers; not other adapters' parameters) also trains in place, held like the biases that
``bias: all`` trains (restored on detach). With ``targets: ".*"`` that is every parameter of the model.

Why this shape (docs/design.md, "Full fine-tuning"): the trainable tensors *are* the base weights, so there is no
second copy of the model in memory (an additive ΔW of full shape would double it), ``trainable_parameters`` hands
them to procedures with a role (GaLore projects role ``weight`` matrices, LISA freezes them per layer, LoRA+
refuses them: no A/B), and the checkpoint/adapter machinery saves exactly the trained tensors.

Choices:

* ``keep_original: true`` (default) keeps a copy of the targeted weights when attaching, so ``detach`` gives the
  base back bit-exactly (the contract every method keeps). It costs one extra copy of the targeted weights; turn it
  off for large runs (the recipes and ``bench/memory.py`` do): ``detach`` then leaves the trained weights in place,
  as ``merge_and_unload`` does.
* Tied weights (SmolLM2's ``embed_tokens``/``lm_head``): the shared Parameter trains once (as in a plain PyTorch or
  HF full fine-tune); it is held and saved by the first member that has it, later members hold nothing.
* Files: ``adapter_model.safetensors`` holds the trained tensors under the base model's own module paths
  (``base_model.model.<path>.weight``, and for ``rest`` the model's parameter names), with ``peft_type: LORAKIT``
  and the ``lorakit`` block (method ``full``), i.e. a *weights file* (the values, not a delta). Loading onto a
  base of other shapes is refused naming the tensor (the generic shape check of ``load_adapter``).
* ``mergeable``: merging is a no-op (the weights already are the trained ones); ``merge_and_unload`` unwraps.
* Quantised bases (QLoRA's NF4, bitsandbytes) hold packed codes, not a float Parameter: refused at attach.
* The adapter never moves or casts the aliased weight itself (``attach`` casts adapters to float32): the base
  layer owns it, so ``model.to(...)`` moves it once and a bf16 model's weights stay bf16.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..attachments import registry
from ..core import Adapter, register
from ..errors import TargetError

__all__ = ["Full"]


class _Restore:
    """A ``bind`` handle: ``remove()`` (called by ``detach``) writes the original weights back in place."""

    def __init__(self, pairs: list[tuple[nn.Parameter, Tensor]]):
        self.pairs = pairs

    @torch.no_grad()
    def remove(self) -> None:
        for p, orig in self.pairs:
            p.copy_(orig)
        self.pairs = []

    def on_merge(self) -> None:
        """``merge_and_unload``: the trained weights are the model now; the originals are dropped, not restored."""
        self.pairs = []


@register("full", family="full fine-tuning", paper="baseline: every base weight trains in place (no adapter)")
class Full(Adapter):
    __doc__ = __doc__

    @dataclass
    class Config:
        rest: bool = True  # also train every base parameter that is not a targeted layer's weight, in place
        keep_original: bool = True  # keep a copy of the targeted weights so that detach restores them bit-exactly

    roles = {"weight": "weight"}
    layers = ("linear", "conv1d", "embedding", "conv2d")
    init = "noop"
    budget_exempt = "full fine-tuning trains the base weights themselves; no option sizes it"
    example = {"rest": False}  # the contract suite checks that only adapter parameters train; rest: own tests

    def __init__(self, base: nn.Module, cfg: Config, view=None):
        super().__init__(base, cfg, view)
        w = base._parameters.get("weight")
        if not isinstance(w, nn.Parameter) or not w.is_floating_point():
            raise TargetError(f"method 'full' trains a layer's float weight Parameter in place; this "
                              f"{type(base).__name__} stores its weight as "
                              f"{type(getattr(base, 'weight', None)).__name__} (quantised bases cannot be fully "
                              "fine-tuned: dequantise first, or use an adapter such as qlora)")
        self.weight = w  # the layer's own Parameter (an alias, not a copy)

    def _apply(self, fn, recurse=True):  # the base layer owns the aliased weight: never cast/move it from here
        own = self._parameters.pop("weight", None)
        try:
            return super()._apply(fn, recurse)
        finally:
            if own is not None:
                self._parameters["weight"] = own

    # The model's state_dict holds the weight once, under the base layer's name (``save_pretrained`` and the HF
    # Trainer refuse a tensor stored under two names); the adapter's own state_dict (its file) holds it as "weight".
    def _save_to_state_dict(self, destination, prefix, keep_vars):
        if not prefix:
            super()._save_to_state_dict(destination, prefix, keep_vars)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        if not prefix or prefix + "weight" in state_dict:
            super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        return y

    def delta_weight(self) -> Tensor:
        return torch.zeros(self.view.d_out, self.view.d_in)

    def merge(self, weight: Tensor) -> Tensor:
        return weight  # the base weight already is the trained one

    @classmethod
    def bind(cls, att) -> list:
        """Tied duplicates dropped; the rest of the base put in training (``rest``); the original weights kept
        for ``detach`` (``keep_original``)."""
        seen: dict[int, nn.Parameter] = {}
        for m in att.members:
            w = m.adapter._parameters.get("weight")
            if w is None:
                continue
            if id(w) in seen:  # a tied weight another member already holds
                del m.adapter._parameters["weight"]
                continue
            seen[id(w)] = w
        cfg = att.method_config(None)
        if cfg.rest:
            stash = registry(att.model)["bias_stash"]
            for n, p in att.model.named_parameters():
                if id(p) in seen or id(p) in stash or not p.is_floating_point():
                    continue
                if any(s in f".{n}." for s in (".adapters.", ".copies.", ".original_module.")):
                    continue  # other adapters' parameters, trainable copies and the originals they replace
                stash[id(p)] = (p, p.detach().clone())
        if not cfg.keep_original:
            return []
        return [_Restore([(w, w.detach().clone()) for w in seen.values()])]
