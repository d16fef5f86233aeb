"""MeteoRA: many task LoRAs embedded in one model with a gating network (Xu et al. 2024, arXiv:2405.13053).

Every adapted linear stacks L task LoRAs ``A_t`` (r, d_in), ``B_t`` (d_out, r) with a per-module gate ``W_g``
(L, d_in): ``p = softmax(W_g x)``, top-k (k=2) renormalised, switching per token:
``h = W0 x + Σ_{t∈TopK} p_t · s · B_t A_t x``, ``s = α/r``. Trains gate and LoRAs (the release script trains both;
``train_experts=False`` trains the gate only). Gate init ``N(0, 1)``; experts come from pretrained per-task LoRAs
(:func:`lorakit.methods._mixture.load_lora_experts`) or, untrained, the LoRA init (A kaiming, B = 0).

Aux loss (gate supervision, official ``modeling_llama_meteor.py`` ``lora_gate_loss_func``): ONE cross-entropy
over the gate logits of every gated module of the attach, concatenated, against each token's task index, mean over
the supervised (module, token) pairs, × ``aux_coef`` (50, the official ``moe_aux_loss_coef``); padding is not
supervised (the official gate labels are −100 there). Task indices come from the batch context: ``task_ids``
(LongTensor (batch,), one task per sample, or (batch, seq), the official per-token gate labels with −100 =
ignored); padding from the context's ``attention_mask`` (0 = padding), which the trainer shares from the batch.
For sequence inputs (batch, seq, d) the logits are shifted as the official code does (position i is supervised by
the label of position i+1, so a sample's last real token is not supervised); 2-D inputs are not shifted. Without
task ids there is no aux loss. (Before: a per-module CE summed over modules, ≈ 50 × #modules, padding supervised.)
Freeze to one task: :func:`lorakit.methods._mixture.export_expert` writes task t as a plain LoRA.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..core import register
from ._mixture import MixConfig, Mixture

IGNORE = -100  # the official gate label of padding (and of any token not to supervise)


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

    @classmethod
    def check_context(cls, cfg, values: dict) -> None:
        t = values.get("task_ids")
        if t is None:
            return
        t = torch.as_tensor(t)
        ok = t[t != IGNORE]
        if ok.numel() and (int(ok.min()) < 0 or int(ok.max()) >= cfg.num_experts):
            from ..errors import ConfigError
            raise ConfigError(f"meteora: batch task_ids must lie in [0, {cfg.num_experts}) (one task LoRA each, "
                              f"num_experts={cfg.num_experts}) or be {IGNORE} (ignored), got "
                              f"{sorted(set(t.reshape(-1).tolist()))[:8]}")

    def delta(self, x: Tensor) -> Tensor:
        x = self.cast_in(x)
        logits = self.router_logits(x)
        probs, w = self.route(logits)
        self.record(probs, w)
        if self.training:
            self._logits = logits
            self._tasks = None if self.ctx is None else self.ctx.get("task_ids")
            self._mask = None if self.ctx is None else self.ctx.get("attention_mask")
        return self.mix(self.dropout(x), w)

    def gate_targets(self) -> tuple[Tensor, Tensor] | None:
        """This step's ``(logits (N, E), labels (N,))`` for the gate loss: labels −100 where not supervised
        (padding, explicit −100), shifted by one position for sequence inputs as the official code."""
        tasks = getattr(self, "_tasks", None)
        if self._probs is None or tasks is None:
            return None
        lg = self._logits.float()
        tasks = tasks.to(lg.device).long()
        lead = lg.shape[:-1]
        tgt = tasks if tasks.shape == lead else tasks.view(-1, *([1] * (lg.dim() - 2))).expand(lead)
        mask = getattr(self, "_mask", None)
        if mask is not None and mask.shape == lead:
            tgt = tgt.masked_fill(mask.to(tgt.device) == 0, IGNORE)
        if lg.dim() >= 3:  # (batch, seq, E): logits[:, :-1] against labels[:, 1:]
            lg, tgt = lg[:, :-1], tgt[:, 1:]
        return lg.reshape(-1, self.E), tgt.reshape(-1)

    def extra_loss(self) -> Tensor | None:
        """This module's own gate loss (``aux_coef`` × masked mean CE); the attach's loss is :meth:`attach_loss`."""
        got = self.gate_targets()
        if got is None or not self.cfg.aux_coef or not bool((got[1] != IGNORE).any()):
            return None
        return self.cfg.aux_coef * F.cross_entropy(*got, ignore_index=IGNORE)

    @classmethod
    def attach_loss(cls, att) -> Tensor | None:
        """The official reduction: one CE over the concatenated gate logits of all active modules."""
        parts = [g for g in (a.gate_targets() for a in att.active_adapters if isinstance(a, MeteoRA)) if g]
        coef = att.method_config(None).aux_coef if parts else 0.0
        if not parts or not coef:
            return None
        logits = torch.cat([p[0] for p in parts])
        labels = torch.cat([p[1].to(logits.device) for p in parts])
        if not bool((labels != IGNORE).any()):
            return None
        return coef * F.cross_entropy(logits, labels, ignore_index=IGNORE)
