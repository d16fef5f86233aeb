"""LoRAPrune: LoRA-guided structured pruning during fine-tuning (Zhang et al. 2024, "LoRAPrune: Structured Pruning
Meets Low-Rank Parameter-Efficient Fine-Tuning", ACL Findings 2024, arXiv:2305.18403; official code aim-uofa/LoRAPrune).

A LoRA (``h = W0 x + s·BAx``) on every projection of Llama-style decoder blocks, plus structured masks that prune
whole units while it trains: attention heads (with grouped-query attention, a unit is one key/value head with its
query heads) and MLP intermediate channels. The importance of a unit comes from the LoRA gradients, never from a
gradient of the frozen W (which LoRA training does not compute):

* per matrix: ``Ĝ = ∂L/∂B·A + B·∂L/∂A − ∂L/∂B·∂L/∂A`` (the official code's estimate of ∂L/∂W, unscaled), and
  ``I = |Ĝ ⊙ (W0 + s·BA)|``;
* per unit: the sum of ``I`` over the rows the unit owns (q/k/v, gate/up outputs) or the columns (o_proj,
  down_proj inputs), L2-normalised per matrix, summed over the block's matrices;
* a moving average ``Ī ← 0.9·Ī + 0.1·I`` every step (``ema``);
* every ``prune_every`` steps, *local* pruning: in each prunable block the ``⌊ratio·units⌋`` units of lowest
  ``Ī ⊙ mask`` are masked (already pruned units score 0, so masks only grow), with ``ratio`` on the official cubic
  schedule from 0 to ``target_ratio`` (``initial_warmup`` and ``final_warmup`` fractions of the run at 0 and at the
  target);
* the first ``⌊0.1·L⌋`` blocks and the last block are never pruned (official ``freeze``).

Masks act as the official ones: on the outputs of q/k/v (the unit's rows) and of gate/up (the channel), so a pruned
head contributes nothing (its values are zero) and a pruned channel is ``act(0)·0 = 0``. The masked model equals the
physically pruned one (:func:`export_pruned` removes the rows/columns; tested). Merging folds the mask into the
weight (``(W0 + s·BA)·m`` row-wise). Masks are persistent buffers: checkpoints and files carry them.

Decisions: GQA units are key/value groups (the official code assumes multi-head attention with 32 heads; pruning
single query heads of a group would break ``repeat_kv``); the schedule is driven by the trainer's planned steps
(``on_train_begin``); ``head_dim``/head counts are read from the model config. Llama-family module names
(``self_attn.{q,k,v,o}_proj``, ``mlp.{gate,up,down}_proj``) are required; other targets train as plain LoRA
without masks (a warning says so).
"""
from __future__ import annotations

import logging
import re
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..controllers import Controller
from ..core import register
from ..errors import ConfigError, MergeError
from .lora import LoRA

log = logging.getLogger(__name__)

_ATTN = ("q_proj", "k_proj", "v_proj", "o_proj")
_MLP = ("gate_proj", "up_proj", "down_proj")
_MASKED = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")  # output-masked (official lora_mask)
_BLOCK = re.compile(r"^(.*)\.(self_attn|mlp)\.(\w+)$")


def cubic_ratio(step: int, total: int, initial_warmup: float, final_warmup: float, target: float) -> float:
    """The official cubic sparsity schedule (initial sparsity 0)."""
    if step <= initial_warmup * total:
        return 0.0
    if step > total - final_warmup * total:
        return target
    warm = initial_warmup * total
    span = total - (final_warmup + initial_warmup) * total
    return target + (0.0 - target) * (1 - (step - warm) / span) ** 3


@register("loraprune", family="pruning", paper="Zhang et al. 2024, LoRAPrune, arXiv:2305.18403")
class LoRAPrune(LoRA):
    __doc__ = __doc__

    @dataclass
    class Config(LoRA.Config):
        target_ratio: float = 0.5  # fraction of the units of each prunable block removed by the end
        prune_every: int = 10  # optimiser steps between pruning rounds
        initial_warmup: float = 0.1  # fraction of the run before pruning starts
        final_warmup: float = 0.2  # fraction of the run at the target ratio
        ema: float = 0.9  # Ī ← ema·Ī + (1 − ema)·I

    inits = {}
    layers = ("linear",)
    example = {"r": 2, "prune_every": 1}
    fsdp_unsupported = ("its importance score multiplies the LoRA gradients by the whole base weight W0 every step, "
                        "which FSDP2 holds as a shard outside the layer's forward")

    def __init__(self, base: nn.Module, cfg: Config, view=None):
        super().__init__(base, cfg, view)
        if not 0.0 <= cfg.target_ratio < 1.0:
            raise ConfigError(f"loraprune: target_ratio={cfg.target_ratio} must be in [0, 1)")
        if cfg.prune_every < 1 or cfg.initial_warmup < 0 or cfg.final_warmup < 0 \
                or cfg.initial_warmup + cfg.final_warmup >= 1:
            raise ConfigError(f"loraprune: prune_every={cfg.prune_every} must be >= 1 and initial_warmup + "
                              f"final_warmup = {cfg.initial_warmup + cfg.final_warmup} must be in [0, 1)")
        if not 0.0 <= cfg.ema < 1.0:
            raise ConfigError(f"loraprune: ema={cfg.ema} must be in [0, 1)")
        self.register_buffer("prune_mask", torch.ones(self.view.d_out), persistent=True)

    def _masked(self) -> bool:
        if self.prune_mask.device.type == "meta":  # shape-only probes (config-resolution checks): never pruned yet
            return False
        return not bool(self.prune_mask.all())

    @classmethod
    def share(cls, att) -> None:
        """Mark the adapters whose outputs carry a unit mask (q/k/v, gate/up of Llama blocks): a Python flag, so the
        forward has no data-dependent branch (no graph break under torch.compile)."""
        super().share(att)  # LoRA's fused down-projection groups
        for m in att.members:
            hit = _BLOCK.match(m.path)
            m.adapter.__dict__["_out_masked"] = bool(hit and hit.group(3) in _MASKED)

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        out = super().forward(x, y)
        return out * self.prune_mask.to(out.dtype) if self.__dict__.get("_out_masked") else out

    def delta(self, x: Tensor) -> Tensor:
        if self._masked():
            raise MergeError("loraprune: a masked adapter's output is (W0 + s·BA)x ⊙ mask, not W0x + delta; use "
                             "forward")
        return super().delta(x)

    def merge(self, weight: Tensor) -> Tensor:
        w = weight + super().delta_weight().to(weight.dtype)
        return w * self.prune_mask.to(w.dtype)[:, None] if self._masked() else w

    def delta_weight(self) -> Tensor:
        if not self._masked():
            return super().delta_weight()
        W = self.base_matrix().float()
        return (self.merge(W) - W)

    def lowrank(self):
        if self._masked():
            raise MergeError("loraprune: the pruned adapter is not low-rank on the original base (masked rows "
                             "remove W0's rows too); merge it, or export the pruned model")
        return super().lowrank()

    def stats(self) -> dict[str, float]:
        return {"pruned_fraction": float(1 - self.prune_mask.mean())}

    @classmethod
    def controller(cls, att):
        return LoRAPruneController(att, cls)


class LoRAPruneController(Controller):
    """Importance (from the LoRA gradients) every step, pruning rounds on the cubic schedule."""

    def __init__(self, att, cls):
        self.att = att
        self.cfg = att.method_config(None)
        self.total = 1
        self.blocks = self._blocks()
        self.scores: dict[str, dict[str, Tensor]] = {}

    def _blocks(self) -> dict[str, dict[str, LoRAPrune]]:
        blocks: dict[str, dict[str, LoRAPrune]] = {}
        loose = []
        for m in self.att.members:
            hit = _BLOCK.match(m.path)
            if hit and hit.group(3) in (_ATTN if hit.group(2) == "self_attn" else _MLP):
                blocks.setdefault(hit.group(1), {})[f"{hit.group(2)}.{hit.group(3)}"] = m.adapter
            else:
                loose.append(m.path)
        if loose:
            log.warning("loraprune: %d targets are not Llama block projections and train as plain LoRA without "
                        "masks (%s)", len(loose), ", ".join(loose[:4]))
        cfg = getattr(self.att.model, "config", None)
        self.n_h = getattr(cfg, "num_attention_heads", None)
        self.n_kv = getattr(cfg, "num_key_value_heads", None) or self.n_h
        self.hd = getattr(cfg, "head_dim", None) or (cfg.hidden_size // self.n_h if self.n_h else None)
        names = sorted(blocks, key=lambda p: [int(t) if t.isdigit() else t for t in p.split(".")])
        n = len(names)
        skip = set(names[: int(n * 0.1)]) | ({names[-1]} if names else set())  # official `freeze`
        self.prunable = [p for p in names if p not in skip]
        return blocks

    # --- importance ---------------------------------------------------------------------------------------------
    def _unit_scores(self, key: str, a: LoRAPrune) -> Tensor | None:
        gA, gB = a.lora_A.weight.grad, a.lora_B.weight.grad
        if gA is None or gB is None:
            return None
        A, B = a.lora_A.weight.detach(), a.lora_B.weight.detach()
        G = gB @ A + B @ gA - gB @ gA
        imp = (G * (a.scale * B @ A + a.base_matrix().float())).abs()
        part, name = key.split(".")
        if name in ("o_proj", "down_proj"):
            imp = imp.t()  # units are input columns
        imp = imp.sum(1)  # one value per row (output unit)
        if part == "self_attn":
            heads = imp.view(-1, self.hd).sum(1)
            if name in ("q_proj", "o_proj"):  # query heads -> their key/value group
                heads = heads.view(self.n_kv, -1).sum(1)
            imp = heads
        return imp / (torch.linalg.norm(imp) + 1e-8)

    def before_step(self, step, model, optimizer) -> None:
        if not self.prunable or not self.hd:
            return
        for blk in self.prunable:
            parts = self.blocks[blk]
            new: dict[str, Tensor] = {}
            for key, a in parts.items():
                s = self._unit_scores(key, a)
                if s is None:
                    continue
                part = key.split(".")[0]
                new[part] = new[part] + s if part in new else s
            if any(torch.isnan(v).any() for v in new.values()):
                continue  # official: skip the update on NaN
            old = self.scores.setdefault(blk, {})
            for part, v in new.items():
                old[part] = self.cfg.ema * old[part] + (1 - self.cfg.ema) * v if part in old else (1 - self.cfg.ema) * v

    # --- pruning ------------------------------------------------------------------------------------------------
    def on_train_begin(self, model, optimizer, total_steps: int) -> None:
        self.total = max(1, int(total_steps))

    def ratio(self, step: int) -> float:
        c = self.cfg
        return cubic_ratio(step, self.total, c.initial_warmup, c.final_warmup, c.target_ratio)

    @torch.no_grad()
    def step(self, step, model, optimizer) -> None:
        if step % self.cfg.prune_every or not self.hd:
            return
        ratio = self.ratio(step)
        if ratio <= 0:
            return
        for blk in self.prunable:
            parts, scores = self.blocks[blk], self.scores.get(blk, {})
            for part, keys in (("self_attn", _ATTN), ("mlp", _MLP)):
                if part not in scores or not all(f"{part}.{k}" in parts for k in keys):
                    continue
                mask = self.unit_mask(blk, part)
                need = int(mask.numel() * ratio)
                if (1 - mask.mean()).item() >= ratio or need == 0:
                    continue
                order = torch.argsort(scores[part] * mask)[:need]
                mask[order] = 0
                self._set_unit_mask(parts, part, mask)

    def unit_mask(self, blk: str, part: str) -> Tensor:
        """The block's current unit mask (kv groups for attention, channels for the MLP)."""
        parts = self.blocks[blk]
        if part == "self_attn":
            return parts["self_attn.v_proj"].prune_mask.view(self.n_kv, self.hd)[:, 0].clone()
        return parts["mlp.up_proj"].prune_mask.clone()

    def _set_unit_mask(self, parts, part: str, unit: Tensor) -> None:
        if part == "self_attn":
            kv_rows = unit.repeat_interleave(self.hd)
            q_rows = unit.repeat_interleave((self.n_h // self.n_kv) * self.hd)
            for name, rows in (("q_proj", q_rows), ("k_proj", kv_rows), ("v_proj", kv_rows)):
                a = parts.get(f"self_attn.{name}")
                if a is not None:
                    a.prune_mask.copy_(rows)
        else:
            for name in ("gate_proj", "up_proj"):
                a = parts.get(f"mlp.{name}")
                if a is not None:
                    a.prune_mask.copy_(unit)

    def state_dict(self) -> dict:
        return {"total": self.total, "scores": {b: {p: v.clone() for p, v in d.items()} for b, d in self.scores.items()}}

    def load_state_dict(self, state: dict) -> None:
        self.total = int(state.get("total", self.total))
        self.scores = {b: dict(d) for b, d in state.get("scores", {}).items()}


def export_pruned(model: nn.Module, name: str = "default") -> nn.Module:
    """Merge the LoRAPrune adapter ``name`` and physically remove the pruned units (kv groups with their query
    heads, MLP channels): returns the smaller model (per-layer sizes may differ; in memory, forward-compatible)."""
    from .. import attachment, merge_and_unload
    from ..loram import narrow_block

    att = attachment(model, name)
    ctl = att.controller()
    if not isinstance(ctl, LoRAPruneController):
        raise ConfigError(f"export_pruned: adapter '{name}' is a {att.method.name}, not loraprune")
    keep = {}
    for blk in ctl.blocks:
        keep[blk] = (ctl.unit_mask(blk, "self_attn").nonzero().flatten().tolist() if ctl.hd else None,
                     ctl.unit_mask(blk, "mlp").nonzero().flatten().tolist())
    merged = merge_and_unload(model)
    cfg = merged.config
    for blk, (kv, ch) in keep.items():
        mod = merged.get_submodule(blk)
        narrow_block(mod, kv, ch, ctl.n_h, ctl.n_kv, ctl.hd, cfg.intermediate_size)
    return merged
