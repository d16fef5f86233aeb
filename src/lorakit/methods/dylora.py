"""DyLoRA: nested-rank LoRA (Valipour et al. 2023, arXiv:2210.07558; official code huawei-noah/Efficient-NLP/DyLoRA).

A LoRA of maximum rank ``r`` trained so that every prefix ``b ≤ r`` works on its own. Each training step samples
``b ~ p_B`` (uniform over {1..r}) and uses the first ``b`` components with the official scaling (each truncated
factor × ``√(r/b)``, i.e. overall ``α/b``)::

    h = W0 x + (α/b) · B[:, :b] A[:b] x        A (r, d_in), B (d_out, r)

Trainable: A, B (``frozen_lower=True``: only row/column ``b`` gets a gradient that step, the official "frozen"
mode). Init as LoRA (A Kaiming, B = 0). After training any ``b`` is a plain rank-b LoRA with ``alpha = b``:
:func:`lorakit.rank.truncate` cuts the adapter for good.

Decisions: ``b`` is drawn once per optimiser step for the whole model by the :class:`DyLoRAController` (the
trainer runs it via ``lorakit.training_controllers``) from a generator seeded by ``seed``, so runs are reproducible and the
controller's state (the generator) is checkpointed. Without a controller, training mode uses the rank last set
(full ``r`` by default). In eval mode the rank is the constant ``eval_rank`` (default ``r``): no data-dependent
branch, no graph break. Merging/``lowrank()`` use the eval rank.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from ..controllers import Controller
from ..core import LowRank, LowRankConfig, register
from ..errors import ConfigError
from .lora import LoRA


@register("dylora", family="adaptive rank", paper="Valipour et al. 2023, DyLoRA, arXiv:2210.07558")
class DyLoRA(LoRA):
    __doc__ = __doc__
    nested_ranks = True

    @dataclass
    class Config(LowRankConfig):
        rslora: bool = field(default=False, init=False)  # the paper's scale is α/r
        eval_rank: int | None = None  # rank used in eval mode / merge (default r)
        frozen_lower: bool = False  # only the sampled b-th component trains each step
        seed: int = 0  # seeds the per-step rank sampler

        def validate(self) -> None:
            if self.eval_rank is not None and not 1 <= self.eval_rank <= self.r:
                raise ConfigError(f"eval_rank={self.eval_rank} must lie in [1, r={self.r}]")

    layers = ("linear", "conv1d", "embedding", "conv2d")

    def __init__(self, base, cfg: Config, view=None):
        super().__init__(base, cfg, view)
        if cfg.eval_rank is not None and not 1 <= cfg.eval_rank <= cfg.r:
            raise ConfigError(f"eval_rank must lie in [1, r={cfg.r}], got {cfg.eval_rank}")
        self.b = cfg.r  # training rank, set by the controller each step

    def rank(self) -> int:
        return self.b if self.training else (self.cfg.eval_rank or self.cfg.r)

    def factors(self, b: int | None = None) -> tuple[Tensor, Tensor, float]:
        b = self.rank() if b is None else b
        A, B = self.A[:b], self.B[:, :b]
        if self.training and self.cfg.frozen_lower and b > 1:
            A = torch.cat([A[: b - 1].detach(), A[b - 1:]], 0)
            B = torch.cat([B[:, : b - 1].detach(), B[:, b - 1:]], 1)
        return A, B, self.cfg.alpha / b

    def delta(self, x: Tensor) -> Tensor:
        A, B, s = self.factors()
        return self.view.up(self.view.down(self.dropout(self.cast_in(x)), A) * s, B)

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        return y + self.delta(x).to(y.dtype)

    def delta_weight(self) -> Tensor:
        A, B, s = self.factors(self.cfg.eval_rank or self.cfg.r)
        return (B @ A) * s

    def lowrank(self) -> LowRank:
        A, B, s = self.factors(self.cfg.eval_rank or self.cfg.r)
        return LowRank(A, B, s)

    @torch.no_grad()
    def truncate(self, b: int) -> None:
        """Keep the first ``b`` components for good (a rank-b DyLoRA whose full rank computes ``(α/b)·BA``)."""
        b = min(b, self.cfg.r)
        shape_a, shape_b = list(self.lora_A.weight.shape), list(self.lora_B.weight.shape)
        shape_a[0], shape_b[1] = b, b
        self.lora_A.weight = torch.nn.Parameter(self.lora_A.weight[:b].clone().reshape(shape_a),
                                                requires_grad=self.lora_A.weight.requires_grad)
        self.lora_B.weight = torch.nn.Parameter(self.lora_B.weight[:, :b].clone().reshape(shape_b),
                                                requires_grad=self.lora_B.weight.requires_grad)
        self.cfg.r, self.cfg.eval_rank, self.b = b, None, b
        self.scale = self.cfg.alpha / b

    def stats(self) -> dict[str, float]:
        return {"rank": float(self.rank())}

    @classmethod
    def controller(cls, att):
        return DyLoRAController(att)


class DyLoRAController(Controller):
    """Samples ``b ~ U{1..r}`` once per optimiser step (seeded) and sets it on every DyLoRA module of ``name``.

    Modules with a smaller per-module ``r`` use ``min(b, r)``."""

    def __init__(self, att):
        self.att = att
        mods = [(m.path, m.adapter) for m in att.members if isinstance(m.adapter, DyLoRA)]
        self.r_max = max((a.cfg.r for _, a in mods), default=1)
        seed = mods[0][1].cfg.seed if mods else 0
        self.gen = torch.Generator().manual_seed(seed)
        self.current = self.r_max

    def sample(self) -> int:
        self.current = int(torch.randint(1, self.r_max + 1, (1,), generator=self.gen))
        for _, a in ((m.path, m.adapter) for m in self.att.members if isinstance(m.adapter, DyLoRA)):
            a.b = min(self.current, a.cfg.r)
        return self.current

    def on_train_begin(self, model, optimizer, total_steps: int) -> None:
        self.sample()

    def step(self, step: int, model, optimizer) -> None:
        self.sample()  # the rank for the next step

    def state_dict(self) -> dict:
        return {"gen": self.gen.get_state(), "current": self.current}

    def load_state_dict(self, state: dict) -> None:
        self.gen.set_state(state["gen"])
        self.current = state["current"]
        for _, a in ((m.path, m.adapter) for m in self.att.members if isinstance(m.adapter, DyLoRA)):
            a.b = min(self.current, a.cfg.r)
