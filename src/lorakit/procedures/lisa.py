"""``optim.name=lisa``: LISA, layerwise importance sampled AdamW (Pan et al. 2024, "LISA: Layerwise Importance
Sampling for Memory-Efficient Large Language Model Fine-Tuning", arXiv:2403.17919; official code: LMFlow,
``src/lmflow/pipeline/utils/lisa_trainer.py``).

Full-parameter training (method ``full``, or any adapter) where at any time only γ = ``layers`` of the N_L
transformer blocks train; every ``interval`` = K steps γ blocks are re-sampled uniformly without replacement and the
others frozen (``requires_grad=False``: no gradient is computed or stored for them). Parameters outside the blocks
(embeddings, the final norm, the LM head) always train (the paper's p_emb = p_head = 1, p_ℓ = γ/N_L).

Optimiser state (as the official ``LISATrainer``, which rebuilds the optimiser at every switch and carries over only
the state of the groups outside the body layers): at each re-sampling the Adam state of the block parameters is
dropped, so the newly sampled blocks start with fresh moments and the state held at any time is that of the γ active
blocks plus the always-trained parameters. Inner AdamW: torch's, over lorakit's default groups (as ``adamw``).

Blocks are found by the layer index in the parameter name (the first number after ``layers_pattern``, default any
of ``layers``/``h``/``block``/``blocks``/``layer``, as ``adapter.layers`` does). Sampling uses a
``torch.Generator`` seeded with ``seed`` (the official code uses NumPy's global RNG); its state and the active
blocks are saved in checkpoints, so ``--resume`` continues the same sequence. Sampled blocks are logged.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from ..errors import ConfigError
from ..targets import _layer_index
from .base import Procedure, TrainParam, register_procedure

log = logging.getLogger(__name__)

__all__ = ["LISA", "layer_of"]


def layer_of(t: TrainParam, pattern: str | None = None) -> int | None:
    """The transformer block index of a trainable parameter (None: outside the blocks)."""
    return _layer_index(t.path or t.name, pattern) if t.path else _layer_index(t.name, pattern)


@register_procedure("lisa")
class LISA(Procedure):
    __doc__ = __doc__
    paper = "Pan et al. 2024, LISA, arXiv:2403.17919"
    family = "memory (layer sampling)"

    @dataclass
    class Config:
        layers: int = 2  # γ: blocks trained at a time (LMFlow's lisa_activated_layers)
        interval: int = 20  # K: steps between re-samplings (lisa_interval_steps)
        seed: int = 0  # the sampling RNG
        layers_pattern: str | None = None  # the name of the block list (None: layers, h, block, blocks, layer)

    def validate(self) -> None:
        if self.cfg.layers < 1 or self.cfg.interval < 1:
            raise ConfigError(f"{self.name}: layers={self.cfg.layers} and interval={self.cfg.interval} must be >= 1")

    def check(self, params: list[TrainParam]) -> None:
        if all(t.adapter_name == "probe" for t in params):  # a shape-only probe (config resolution): no model yet
            return
        if not any(layer_of(t, self.cfg.layers_pattern) is not None for t in params):
            self.refuse("no trainable parameter lies in a numbered transformer block (…layers.<i>…), so there is no "
                        "layer to sample", params)

    # --- sampling --------------------------------------------------------------------------------------------------
    def build_optimizer(self, params: list[TrainParam]) -> torch.optim.Optimizer:
        self._blocks: dict[int, list[torch.nn.Parameter]] = {}
        for t in params:
            i = layer_of(t, self.cfg.layers_pattern)
            if i is not None:
                self._blocks.setdefault(i, []).append(t.param)
        self.n_layers = len(self._blocks)
        self._gen = torch.Generator().manual_seed(self.cfg.seed)
        self.active: list[int] = []
        return super().build_optimizer(params)

    def probabilities(self) -> dict[int, float]:
        """Each block's sampling probability (uniform; OwLore overrides)."""
        return {i: 1.0 / self.n_layers for i in sorted(self._blocks)}

    def sample(self) -> list[int]:
        ids = sorted(self._blocks)
        k = min(self.cfg.layers, len(ids))
        probs = self.probabilities()
        w = torch.tensor([probs[i] for i in ids], dtype=torch.float64)
        pick = torch.multinomial(w, k, replacement=False, generator=self._gen)
        return sorted(ids[j] for j in pick.tolist())

    def _apply(self) -> None:
        on = set(self.active)
        for i, ps in self._blocks.items():
            for p in ps:
                p.requires_grad_(i in on)

    def _switch(self, optimizer: torch.optim.Optimizer) -> None:
        for ps in self._blocks.values():  # fresh moments for the new blocks, none kept for the old (LMFlow)
            for p in ps:
                optimizer.state.pop(p, None)
        self.active = self.sample()
        self._apply()
        log.info("%s: training blocks %s", self.name, self.active)

    def on_train_begin(self, model, optimizer, total_steps: int) -> None:
        self._switch(optimizer)

    def after_step(self, step: int, model, optimizer) -> None:
        if (step + 1) % self.cfg.interval == 0:
            self._switch(optimizer)

    def state_dict(self) -> dict:
        return {"rng": self._gen.get_state(), "active": list(self.active)}

    def load_state_dict(self, state: dict) -> None:
        if not state:
            return
        self._gen.set_state(state["rng"])
        self.active = [int(i) for i in state["active"]]
        self._apply()
