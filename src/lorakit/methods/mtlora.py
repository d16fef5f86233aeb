"""MTLoRA: task-agnostic + task-specific low-rank adaptation (Agiza et al. 2024, arXiv:2403.20320, CVPR 2024;
official code scale-lab/MTLoRA ``models/lora.py`` ``MTLoRALinear``).

Every adapted module has a shared (task-agnostic) LoRA ``A_sh`` (r, d_in), ``B_sh`` (d_out, r) with the fixed scale
``shared_scale``; the modules named by ``task_targets`` (the official code: the last block of each stage; None =
every adapted module) also have per-task LoRAs ``task_A`` (T, r_task, d_in), ``task_B`` (T, d_out, r_task) with the
fixed scale ``task_scale``. Official defaults (``configs/mtlora/*_r16_scale4_pertask.yaml``, ``SHARED_MODE``
default ``matrix``): r = 16, r_task = 4, both scales 4.0, dropout 0.05. Outputs, as ``MTLoRALinear.forward``:

* shared path (every module without task LoRAs): ``W0 x + s_sh B_sh A_sh x``;
* task path of task ``t``, ``mode="matrix"`` (official default): ``W0 x + s_t B_t A_t x`` (no shared update);
  ``mode="matrixv2"``: ``W0 x + s_sh B_sh A_sh x + s_t B_t A_t x``.

Which variant this is: the official network keeps ONE shared trunk (each task module returns its shared output to
the next layer) and forks a feature path per task at every task module, running all task paths for every input, one
decoder head per task. A per-module adapter cannot fork the network, so here each sample runs ONE path: at every
task module it takes the task path of its own task (``task_ids`` (batch,) from the batch context,
``lorakit.batch_context(model, task_ids=...)``; task 0 when absent), elsewhere the shared path. That is the
official network restricted to a single task branch that replaces the trunk at the task modules (in ``matrix`` mode
a task module has no shared LoRA at all, since it only feeds the trunk; with ``task_targets`` None that leaves
per-task LoRAs only, so the recipe uses ``matrixv2`` there).
Init as official: A kaiming-uniform(a=√5), B = 0 (every path equals the base at init). Not mergeable as a whole
(per-sample task path); :func:`export_task` freezes one task to a plain LoRA of its path. (Before: every module had
task LoRAs, matrixv2 only, scales α/r and α/r_task.)
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..core import Adapter, Factor, register
from ..errors import ConfigError
from ._mixture import write_lora

MODES = ("matrix", "matrixv2")
log = logging.getLogger(__name__)


@register("mtlora", family="mixture of LoRA experts", paper="Agiza et al. 2024, MTLoRA: A Low-Rank Adaptation "
          "Approach for Efficient Multi-Task Learning, arXiv:2403.20320")
class MTLoRA(Adapter):
    __doc__ = __doc__
    mergeable = False
    layers = ("linear", "conv1d")
    roles = {"lora_A.weight": "A", "lora_B.weight": "B", "task_A": "A", "task_B": "B"}
    example = {"r": 2, "r_task": 2, "n_tasks": 3, "mode": "matrixv2"}  # both LoRAs in every module

    @classmethod
    def context_keys(cls, cfg) -> tuple[str, ...]:
        return ("task_ids",)

    @dataclass
    class Config:
        r: int = 16  # shared LoRA rank (official R 16)
        r_task: int = 4  # task LoRA rank (official R_PER_TASK 4)
        n_tasks: int = 2
        shared_scale: float = 4.0  # fixed scale of the shared LoRA (official SHARED_SCALE)
        task_scale: float = 4.0  # fixed scale of the task LoRAs (official TASK_SCALE)
        mode: str = "matrix"  # "matrix" (task path = W0x + task LoRA) | "matrixv2" (+ the shared LoRA)
        task_targets: Any = None  # modules with task LoRAs: names (suffix match) or one regex; None = every module
        dropout: float = 0.05
        positive: ClassVar = ("r", "r_task", "n_tasks")

        def validate(self) -> None:  # at config resolution (the __init__ checks stay as a guard)
            if self.mode not in MODES:
                raise ConfigError(f"mtlora: mode={self.mode!r}; valid: {', '.join(MODES)}")
            tt = self.task_targets
            if tt is not None and not isinstance(tt, str) and not (
                    isinstance(tt, (list, tuple)) and all(isinstance(t, str) for t in tt)):
                raise ConfigError(f"mtlora: task_targets must be null, a regex or a list of module names, got {tt!r}")

    @classmethod
    def check_context(cls, cfg, values: dict) -> None:
        cls._check_ids(values, "task_ids", cfg.n_tasks, "one task per row, n_tasks=" + str(cfg.n_tasks))

    def __init__(self, base, cfg: Config, view=None):
        super().__init__(base, cfg, view)
        if min(cfg.r, cfg.r_task, cfg.n_tasks) <= 0:
            raise ConfigError("MTLoRA: r, r_task and n_tasks must be positive")
        cfg.validate()  # a Config built by hand skips resolution: the same checks, once
        v = self.view
        self.lora_A, self.lora_B = Factor(cfg.r, v.d_in), Factor(v.d_out, cfg.r)
        self.task_A = nn.Parameter(torch.empty(cfg.n_tasks, cfg.r_task, v.d_in))
        self.task_B = nn.Parameter(torch.empty(cfg.n_tasks, v.d_out, cfg.r_task))
        self.dropout = nn.Dropout(cfg.dropout) if cfg.dropout > 0 else nn.Identity()
        self.s_sh, self.s_t = float(cfg.shared_scale), float(cfg.task_scale)

    @classmethod
    def share(cls, att) -> None:
        """Modules outside ``task_targets`` keep only the shared LoRA (no task tensors); in ``matrix`` mode the task
        modules keep no shared LoRA (it only feeds the official shared trunk, which a single task path never runs)."""
        from ..targets import _spec_match

        cfg = att.method_config(None)
        if cfg.task_targets is None and cfg.mode == "matrix":
            log.warning("mtlora: every adapted module has task LoRAs (task_targets null) and mode 'matrix' keeps no "
                        "shared LoRA in task modules, so this is per-task LoRAs only; set task_targets (official: the "
                        "last block of each stage) or mode 'matrixv2'")
        hits = 0
        for m in att.members:
            a = m.adapter
            if not isinstance(a, cls):
                continue
            if cfg.task_targets is None or _spec_match(m.path, cfg.task_targets):
                hits += 1
                if cfg.mode == "matrix":
                    a.lora_A = a.lora_B = None
            else:
                a.task_A = a.task_B = None
        if not hits:
            raise ConfigError(f"mtlora: task_targets={cfg.task_targets!r} matches none of the adapted modules "
                              f"{[m.path for m in att.members][:6]}")

    @property
    def has_tasks(self) -> bool:
        return self.task_A is not None

    def reset_parameters(self) -> None:
        if self.lora_A is not None:
            nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
            nn.init.zeros_(self.lora_B.weight)
        if self.has_tasks:
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
        if not self.has_tasks or self.cfg.mode == "matrixv2":
            out = F.linear(F.linear(x, self.lora_A.weight), self.lora_B.weight) * self.s_sh
            if not self.has_tasks:
                return out
        t = self.task_ids(x)
        xb = x.reshape(x.shape[0], -1, x.shape[-1])  # (batch, tokens, d_in)
        h = torch.bmm(xb, self.task_A[t].transpose(1, 2))  # (batch, tokens, r_task)
        y = (torch.bmm(h, self.task_B[t].transpose(1, 2)) * self.s_t).reshape(*x.shape[:-1], -1)
        return y if self.cfg.mode == "matrix" else out + y

    def task_lowrank(self, task: int) -> tuple[Tensor, Tensor]:
        """(A, B) of the plain LoRA (scale 1) equal to this module on the path of ``task``."""
        if not self.has_tasks:
            return self.lora_A.weight, self.lora_B.weight * self.s_sh
        own = (self.task_A[task], self.task_B[task] * self.s_t)
        if self.cfg.mode == "matrix":
            return own
        shared = (self.lora_A.weight, self.lora_B.weight * self.s_sh)
        return torch.cat([shared[0], own[0]], 0), torch.cat([shared[1], own[1]], 1)


def export_task(model: nn.Module, directory, task: int, name: str = "default"):
    """Write MTLoRA adapter ``name`` frozen to ``task`` as a normal ``lora`` adapter (loadable by PEFT)."""
    from ..attachments import get_attachment

    facs = {m.path: m.adapter.task_lowrank(task) for m in get_attachment(model, name).members}
    r = max(A.shape[0] for A, _ in facs.values())  # one rank per file: pad with zero components (exact)
    facs = {p: (F.pad(A, (0, 0, 0, r - A.shape[0])), F.pad(B, (0, r - B.shape[1]))) for p, (A, B) in facs.items()}
    return write_lora(model, directory, facs)
