"""QLoRA: LoRA on a 4-bit NormalFloat base with double quantisation (Dettmers et al. 2023, arXiv:2305.14314).

``h = dequant_NF4(W_q) x + s·B A dropout(x)``, ``s = α/r``; ``A`` (r, d_in), ``B`` (d_out, r) train, the quantised
base is frozen and gradients flow through its dequantised values. ``W_q``: NF4 levels, blocks of 64 with one absmax
each, the absmax constants themselves 8-bit (dynamic map) in blocks of 256 (``lorakit.quant``, bit-compatible with
bitsandbytes' ``quantize_4bit(..., quant_type="nf4", compress_statistics=True)``). Paper defaults: all linear
layers, r=64, α=16, dropout 0.1 (7B/13B), lr 2e-4, constant schedule, max_grad_norm 0.3.

Design (an adapter never owns or replaces its base module):

* **Real memory saving** comes from the base: ``lorakit.quant_model.quantize_model(model)`` swaps ``nn.Linear`` for
  ``QuantLinear`` (packed codes + constants, ``weight`` dequantises on access); with ``model.quantize: nf4`` the
  trainer reads the checkpoint through ``quant_model.load_quantized`` instead, quantising each weight as it is read
  (the float model never exists whole; same codes). On such a base ``init_from`` does nothing: output == ``dequant(W_q)x`` at init.
* **On a float base** ``init_from`` *simulates* it exactly: the base becomes ``dequant(quant(W))`` (the same fp32
  values ``QuantLinear`` would produce; ``init="changes"``), so results match a quantised run but memory does not
  shrink (logged). ``detach`` restores the float base bit-exactly; ``on_load`` rebuilds the same base.
* A plain ``lora`` adapter on a ``quantize_model``-ed base is the same computation; ``qlora`` only adds the
  quantisation options and the float-base simulation. Files are ``LORAKIT``-typed: on a float base PEFT would
  compute ``Wx`` instead of ``dequant(W_q)x``.
* Merging into a ``QuantLinear`` requantises (lossy, warned, as PEFT/bnb); ``dequantize_model`` first gives the
  paper's 16-bit merge. Unmerge/detach restore the packed storage bit-exactly.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import Tensor

from .. import quant
from ..errors import ConfigError
from ..core import LowRankConfig, register
from ._quant import base_qcfg, fake_quant, qcfg_of
from .lora import LoRA

log = logging.getLogger(__name__)


@register("qlora", family="quantised base", paper="Dettmers et al. 2023, QLoRA, arXiv:2305.14314")
class QLoRA(LoRA):
    __doc__ = __doc__
    init = "changes"
    layers = ("linear", "conv1d")
    example = {"dropout": 0.0}  # the paper's 0.1 would make the tiny (train-mode) contract models random

    @dataclass
    class Config(LowRankConfig):
        r: int = 64
        dropout: float = 0.1
        bits: int = 4  # NF4 (2, 3 and 8 give NF-k)
        block: int = 64
        double_quant: bool = True
        dq_block: int = 256

        def validate(self) -> None:
            if self.bits not in (2, 3, 4, 8):
                raise ConfigError(f"bits={self.bits}; valid: 2, 3, 4, 8")

    def __init__(self, base, cfg: Config, view=None):
        super().__init__(base, cfg, view)
        self.qcfg = qcfg_of(cfg)

    @torch.no_grad()
    def init_from(self, weight: Tensor, stats=None) -> Tensor | None:
        if quant.is_quantized(self.base):
            base_qcfg(self, self.qcfg)
            return None  # already stored quantised: nothing to simulate
        log.debug("qlora on a float base: simulating %s (use lorakit.quant_model.quantize_model to save memory)",
                  self.qcfg)
        return fake_quant(weight, self.qcfg)

    def on_load(self, weight: Tensor, state: dict[str, Tensor]) -> Tensor | None:
        return self.init_from(weight)
