"""``optim.name=owlore``: OwLore, outlier-weighed layerwise sampled low-rank projection (Li, Yin, Gao, Liu 2024,
"OwLore: Outlier-weighed Layerwise Sampled Low-Rank Projection for Memory-Efficient LLM Fine-tuning",
arXiv:2405.18380; official code ``pixeli99/OwLore``, an LMFlow fork, ``src/lmflow/pipeline/finetuner.py``).

LISA (``optim.name=lisa``: γ blocks train per period of K steps, the rest frozen, embeddings and head always) with
two changes:

1. **Sampling weighted by outliers.** Block ℓ is drawn with probability ``p_ℓ = D_ℓ / Σ_k D_k`` (``prob_mode='owl'``;
   without replacement, as ``np.random.choice(..., replace=False, p=p)``), where ``D_ℓ`` is the block's outlier
   ratio (OWL, Yin et al. 2023): for every linear weight of the block the Wanda score ``A_ij = |W_ij|·‖X_j‖₂``
   (``‖X_j‖₂``: the norm of input feature j over the calibration tokens), and ``D_ℓ`` = the share of the block's
   scores (all its linear weights pooled) above ``M`` × their mean. The official repository reads these ratios from a
   cached file (``metric_cache/llama2_ratio_13.txt``: M = 13, our default ``outlier_m``). Calibration data: the
   training batches of the first step (every micro-batch of step 0): on-line, the forward hooks record ``‖X_j‖²`` and
   ``before_step(0)`` computes the ratios, samples, and drops the step-0 gradients of the blocks not sampled, so
   step 0 updates exactly the sampled blocks (the cost: one step computes every block's gradient once). If no score
   exceeds M × mean anywhere (tiny models), the probabilities are uniform (= LISA). The ratios are in checkpoints.
2. **Low-rank projection inside the sampled blocks.** The optimiser is GaLore's (``optim.name=galore``: rank
   ``rank``, ``update_proj_gap``, ``scale``; the official script hard-codes rank 256, gap 100, scale 1.0 and projects
   every attention/MLP linear weight). The Adam state of the blocks is dropped at each re-sampling (LISA's rule), so
   a newly sampled block starts a fresh projector and fresh moments.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from .base import TrainParam, register_procedure
from .galore import GaLore
from .lisa import LISA, layer_of

log = logging.getLogger(__name__)

__all__ = ["OwLore", "outlier_ratio"]


def outlier_ratio(scores: list[torch.Tensor], m: float) -> float:
    """OWL's layerwise outlier ratio: the share of the pooled Wanda scores above ``m`` × their mean."""
    a = torch.cat([s.reshape(-1).double() for s in scores])
    return float((a > m * a.mean()).double().mean())


@register_procedure("owlore")
class OwLore(LISA, GaLore):
    __doc__ = __doc__
    paper = "Li et al. 2024, OwLore, arXiv:2405.18380"
    family = "memory (layer sampling)"

    @dataclass
    class Config:
        layers: int = 5  # γ (run_owlore_low_rank.sh: lisa_activated_layers=5)
        interval: int = 50  # K (lisa_interval_steps=50)
        seed: int = 0
        layers_pattern: str | None = None
        outlier_m: float = 13.0  # M (the cached ratio file of the official repository: ratio_13)
        rank: int = 256  # GaLore inside the sampled blocks (the script's hard-coded 256)
        update_proj_gap: int = 100
        scale: float = 1.0
        proj_type: Literal["std", "reverse_std", "left", "right"] = "std"
        targets: str | None = None

    def validate(self) -> None:
        LISA.validate(self)
        GaLore.validate(self)

    def check(self, params: list[TrainParam]) -> None:
        LISA.check(self, params)
        GaLore.check(self, params)

    # --- calibration: ‖X_j‖² of every linear layer of the blocks over step 0's batches -------------------------------
    def on_train_begin(self, model: nn.Module, optimizer, total_steps: int) -> None:
        self.ratios: dict[int, float] | None = None
        self._sq: dict[nn.Module, torch.Tensor] = {}
        self._weights: dict[nn.Module, tuple[int, nn.Parameter]] = {}
        blocks = {id(p): i for i, ps in self._blocks.items() for p in ps}
        for mod in model.modules():
            w = getattr(mod, "weight", None)
            if isinstance(mod, nn.Linear) and isinstance(w, nn.Parameter) and id(w) in blocks:
                self._weights[mod] = (blocks[id(w)], w)
        self._hooks = [mod.register_forward_pre_hook(self._record) for mod in self._weights]
        self.active = sorted(self._blocks)  # step 0: every block computes its gradient (calibration step)
        self._apply()

    def _record(self, mod: nn.Module, args) -> None:
        x = args[0].detach().reshape(-1, args[0].shape[-1]).double()
        sq = (x * x).sum(0)
        self._sq[mod] = self._sq[mod] + sq if mod in self._sq else sq

    def _calibrate(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks = []
        # one block's Wanda scores at a time (float64, the size of its weights x2): holding every block's at once
        # cost 8 bytes per linear weight of the model (850 MB on SmolLM2-135M, more than AdamW's whole state;
        # measured with bench/memory.py, docs/benchmarks.md)
        mods: dict[int, list[nn.Module]] = {}
        for mod, (i, _) in self._weights.items():
            if mod in self._sq:
                mods.setdefault(i, []).append(mod)
        self.ratios = {}
        for i in sorted(self._blocks):
            scores = [self._weights[mod][1].detach().abs().double() * self._sq.pop(mod).sqrt()[None, :]
                      for mod in mods.get(i, [])]
            self.ratios[i] = outlier_ratio(scores, self.cfg.outlier_m) if scores else 0.0
            del scores
        self._sq.clear()
        log.info("owlore: outlier ratios %s", self.ratios)

    def probabilities(self) -> dict[int, float]:
        total = sum(self.ratios.values()) if self.ratios else 0.0
        if total <= 0:
            return super().probabilities()
        return {i: self.ratios[i] / total for i in sorted(self._blocks)}

    def before_step(self, step: int, model: nn.Module, optimizer) -> None:
        if self.ratios is None:
            self._calibrate()
            self.active = self.sample()
            self._apply()
            on = set(self.active)
            for i, ps in self._blocks.items():
                if i not in on:
                    for p in ps:
                        p.grad = None
            log.info("owlore: training blocks %s", self.active)

    def state_dict(self) -> dict:
        return {**super().state_dict(), "ratios": dict(self.ratios or {})}

    def load_state_dict(self, state: dict) -> None:
        if not state:
            return
        for h in self._hooks:
            h.remove()
        self._hooks = []
        self.ratios = {int(k): float(v) for k, v in state["ratios"].items()}
        super().load_state_dict(state)
