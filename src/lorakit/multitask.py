"""Multi-task data for the task-routed mixtures (MTLoRA, MeteoRA, MHR/Poly, LoRAMoE sample types)."""
from __future__ import annotations

from .errors import ConfigError

__all__ = ["make_multitask"]


def make_multitask(datasets: dict[str, list[dict]], key: str = "task_ids") -> list[dict]:
    """Tag every example with its task index (tasks numbered in the order of ``datasets``) and concatenate.

    ``{"sentiment": [...], "bbc": [...]}`` -> examples with ``task_ids`` 0 and 1. The trainer turns the per-example
    ints into a LongTensor (batch,) and sets it as the batch context (``lorakit.batch_context``)."""
    if not datasets:
        raise ConfigError("make_multitask needs at least one dataset")
    out: list[dict] = []
    for i, (name, rows) in enumerate(datasets.items()):
        for j, ex in enumerate(rows):
            if not isinstance(ex, dict):
                raise ConfigError(f"make_multitask: example {j} of task '{name}' is not a dict")
            out.append({**ex, key: i})
    return out
