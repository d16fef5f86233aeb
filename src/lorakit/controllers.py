"""Controllers: everything that changes structure or trainability during training (rank schedules, gradual
freezing, layer sampling). The trainer calls ``step`` after every optimiser step; the HF Trainer callback in
:mod:`lorakit.integrations.hf` does the same, so no method needs special cases anywhere else."""
from __future__ import annotations

from typing import Any

from torch import nn


class Controller:
    """Base class. Override what you need; every hook is optional."""

    def on_train_begin(self, model: nn.Module, optimizer: Any, total_steps: int) -> None:
        """Called once before the first step with the planned number of optimiser steps."""

    def before_step(self, step: int, model: nn.Module, optimizer: Any) -> None:
        """After backward (gradients present), before ``optimizer.step()``: importance scores, gradient edits."""

    def step(self, step: int, model: nn.Module, optimizer: Any) -> None:
        """After ``optimizer.step()``: prune/grow ranks, freeze, resample."""

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        """Restore from a checkpoint (resume)."""


def _training_controllers():
    from .inject import controllers

    return controllers


from ._deprecated import callable_module  # noqa: E402

callable_module(__name__, "lorakit.training_controllers", _training_controllers)
