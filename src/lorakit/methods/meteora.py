"""MeteoRA: many task LoRAs embedded in one model with a gating network (Xu et al. 2024, arXiv:2405.13053).

Every adapted linear stacks L task LoRAs ``A_t`` (r, d_in), ``B_t`` (d_out, r) with a per-module gate ``W_g``
(L, d_in): ``p = softmax(W_g x)``, top-k (k=2) renormalised, switching per token:
``h = W0 x + Σ_{t∈TopK} p_t · s · B_t A_t x``, ``s = α/r``. Trains gate and LoRAs (the release script trains both;
``train_experts=False`` trains the gate only). Gate init ``N(0, 1)``; experts come from pretrained per-task LoRAs
(:func:`lorakit.methods._mixture.load_lora_experts`) or, untrained, the LoRA init (A kaiming, B = 0).

Aux loss (gate supervision, official ``modeling_llama_meteor.py``): cross-entropy between every token's gate logits
and its sample's task index, mean over tokens and modules, × ``aux_coef`` (50). Task indices come from the batch
context (``task_ids``, LongTensor (batch,)); without them there is no aux loss. Decision: no shift of the logits
(the official code shifts by one position for causal LM; per-token supervision is the same up to the last token).
Freeze to one task: :func:`lorakit.methods._mixture.export_expert` writes task t as a plain LoRA.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..core import register
from ._mixture import MixConfig, Mixture


@register("meteora", family="mixture of LoRA experts", paper="Xu et al. 2024, MeteoRA: Multiple-tasks Embedded LoRA "
          "for Large Language Models, arXiv:2405.13053")
class MeteoRA(Mixture):
    __doc__ = __doc__
    example = {"r": 2, "num_experts": 3, "aux_coef": 1.0}

    @classmethod
    def context_keys(cls, cfg) -> tuple[str, ...]:
        return ("task_ids",)

    @dataclass
    class Config(MixConfig):
        r: int = 8
        alpha: float = 16.0
        num_experts: int = 8  # L task LoRAs (the paper embeds 28)
        top_k: int = 2
        dropout: float = 0.0
        aux_coef: float = 50.0
        train_experts: bool = True

    def __init__(self, base, cfg: Config, view=None):
        super().__init__(base, cfg, view)
        self.frozen = () if cfg.train_experts else ("experts_A", "experts_B")

    def reset_parameters(self) -> None:
        super().reset_parameters()
        nn.init.normal_(self.router.weight)

    def delta(self, x: Tensor) -> Tensor:
        x = self.cast_in(x)
        logits = self.router_logits(x)
        probs, w = self.route(logits)
        self.record(probs, w)
        if self.training:
            self._logits, self._tasks = logits, None if self.ctx is None else self.ctx.get("task_ids")
        return self.mix(self.dropout(x), w)

    def extra_loss(self) -> Tensor | None:
        tasks = getattr(self, "_tasks", None)
        if self._probs is None or tasks is None or not self.cfg.aux_coef:
            return None
        lg = self._logits.float()
        tgt = tasks.to(lg.device).view(-1, *([1] * (lg.dim() - 2))).expand(lg.shape[:-1])
        return self.cfg.aux_coef * F.cross_entropy(lg.reshape(-1, self.E), tgt.reshape(-1))
