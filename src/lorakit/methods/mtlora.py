"""MTLoRA: task-agnostic + task-specific low-rank adaptation (Agiza et al. 2024, arXiv:2403.20320, CVPR 2024).

``h = W0 x + s_sh · B_sh A_sh x + s_t · B_t A_t x`` for the sample's task ``t``: a shared LoRA ``A_sh`` (r, d_in),
``B_sh`` (d_out, r) plus per-task LoRAs stacked as ``task_A`` (T, r_task, d_in), ``task_B`` (T, d_out, r_task),
selected per sample by ``task_ids`` (LongTensor (batch,)) from the batch context
(``lorakit.batch_context(model, task_ids=...)``); task 0 when absent. Scales ``s_sh = α/r``, ``s_t = α/r_task``.
Trains everything; init A kaiming, B = 0 (every task output equals the base at init).

Decisions: the official code (Swin) has task-specific modules only at the last block of each stage with one
feature path per task; a per-module adapter cannot fork the network, so every adapted module adds the shared and
the selected task update (the official "matrixv2" mode). Official scales are fixed constants (4.0) — use α = 4·r.
Not mergeable as a whole (per-sample task path); :func:`export_task` freezes one task to a plain rank-(r+r_task)
LoRA ``[s_sh B_sh | s_t B_t] [A_sh; A_t]``.
"""
from __future__ import annotations

from typing import ClassVar

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..core import Adapter, Factor, register
from ..errors import ConfigError
from ._mixture import write_lora


@register("mtlora", family="mixture of LoRA experts", paper="Agiza et al. 2024, MTLoRA: A Low-Rank Adaptation "
          "Approach for Efficient Multi-Task Learning, arXiv:2403.20320")
class MTLoRA(Adapter):
    __doc__ = __doc__
    mergeable = False
    layers = ("linear", "conv1d")
    roles = {"lora_A.weight": "A", "lora_B.weight": "B", "task_A": "A", "task_B": "B"}
    example = {"r": 2, "r_task": 2, "n_tasks": 3}

    @classmethod
    def context_keys(cls, cfg) -> tuple[str, ...]:
        return ("task_ids",)

    @dataclass
    class Config:
        r: int = 8
        r_task: int = 4
        n_tasks: int = 2
        alpha: float = 16.0
        dropout: float = 0.05
        positive: ClassVar = ("r", "r_task", "n_tasks")

    @classmethod
    def check_context(cls, cfg, values: dict) -> None:
        cls._check_ids(values, "task_ids", cfg.n_tasks, "one task per row, n_tasks=" + str(cfg.n_tasks))

    def __init__(self, base, cfg: Config, view=None):
        super().__init__(base, cfg, view)
        if min(cfg.r, cfg.r_task, cfg.n_tasks) <= 0:
            raise ConfigError("MTLoRA: r, r_task and n_tasks must be positive")
        v = self.view
        self.lora_A, self.lora_B = Factor(cfg.r, v.d_in), Factor(v.d_out, cfg.r)
        self.task_A = nn.Parameter(torch.empty(cfg.n_tasks, cfg.r_task, v.d_in))
        self.task_B = nn.Parameter(torch.empty(cfg.n_tasks, v.d_out, cfg.r_task))
        self.dropout = nn.Dropout(cfg.dropout) if cfg.dropout > 0 else nn.Identity()
        self.s_sh, self.s_t = cfg.alpha / cfg.r, cfg.alpha / cfg.r_task

    def reset_parameters(self) -> None:
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)
        for t in range(self.cfg.n_tasks):
            nn.init.kaiming_uniform_(self.task_A.data[t], a=math.sqrt(5))
        nn.init.zeros_(self.task_B)

    def task_ids(self, x: Tensor) -> Tensor:
        t = None if self.ctx is None else self.ctx.get("task_ids")
        if t is None:
            return torch.zeros(x.shape[0], dtype=torch.long, device=x.device)
        return t.to(x.device)

    def delta(self, x: Tensor) -> Tensor:
        x = self.dropout(self.cast_in(x))
        out = F.linear(F.linear(x, self.lora_A.weight), self.lora_B.weight) * self.s_sh
        t = self.task_ids(x)
        xb = x.reshape(x.shape[0], -1, x.shape[-1])  # (batch, tokens, d_in)
        h = torch.bmm(xb, self.task_A[t].transpose(1, 2))  # (batch, tokens, r_task)
        y = torch.bmm(h, self.task_B[t].transpose(1, 2)) * self.s_t  # (batch, tokens, d_out)
        return out + y.reshape(*x.shape[:-1], -1)

    def task_lowrank(self, task: int) -> tuple[Tensor, Tensor]:
        """(A, B) of the plain LoRA (scale 1) equal to this module for ``task``."""
        A = torch.cat([self.lora_A.weight, self.task_A[task]], 0)
        B = torch.cat([self.lora_B.weight * self.s_sh, self.task_B[task] * self.s_t], 1)
        return A, B


def export_task(model: nn.Module, directory, task: int, name: str = "default"):
    """Write MTLoRA adapter ``name`` frozen to ``task`` as a normal ``lora`` adapter (loadable by PEFT)."""
    from ..attachments import get_attachment

    return write_lora(model, directory, {m.path: m.adapter.task_lowrank(task)
                                         for m in get_attachment(model, name).members})
