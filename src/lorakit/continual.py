"""Continual learning over a sequence of tasks: I-LoRA and its baselines (sequential LoRA, replay-only LoRA).

I-LoRA (Ren et al. 2024, "Analyzing and Reducing Catastrophic Forgetting in Parameter Efficient Tuning",
arXiv:2402.18865; official code which47/LLMCL ``method/ILORA.py``) keeps two adapters on one model:

* a fast, plastic adapter ``fast`` trained by the optimiser, and a slow one ``slow`` that follows it by an EMA after
  every optimiser step: ``θ_slow ← a·θ_slow + (1 − a)·θ_fast`` with ``a = min(1 − 1/(t + 1), ema_alpha)`` (official
  ``ema_alpha = 0.25``, t the global step);
* a reservoir replay buffer (official 500 examples) of past tasks' training examples;
* on a replayed batch, the hidden states of every layer under the fast adapter ``h_f`` and under the slow one ``h_s``
  (no gradient) give the consistency loss ``L_cons = MSE(h_f, max(h_f, h_s))`` (element-wise max, as the code);
* the loss is ``(L_cur + L_replay)/2 + reg_weight·L_cons`` (official ``reg_weight = 1``); on the first task (empty
  buffer) it is ``L_cur``.

Baselines with the same budget: ``sequential`` (one adapter trained task after task) and ``replay`` (the same
reservoir, loss ``(L_cur + L_replay)/2``, no slow adapter).

Decisions: the model after each task is evaluated with the slow adapter for I-LoRA (the interpolated weights are the
method's output) and with the trained adapter for the baselines; the official code's reload of the EMA adapter
from its checkpoint after each task is a no-op here (the slow adapter is kept in memory). Built from the parts
``lorakit train`` uses: tasks (encode/collate/loss/evaluate), any registered method for the adapters (both get the
same config and initial weights), any training procedure (``optim.name``) for the optimiser, and the methods'
controllers; the loop itself is this module's (two adapters and a buffer are not a single ``lorakit train`` run).
Metrics: the accuracy matrix ``R[i][j]`` (after task i, on task j), the average accuracy after the last task, and
forgetting ``F = mean_{j<T} max_{i<T} (R[i][j] − R[T][j])`` (Chaudhry et al. 2018).
"""
from __future__ import annotations

import copy
import logging
import random
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .errors import ConfigError

log = logging.getLogger(__name__)

__all__ = ["ReservoirBuffer", "ema_coefficient", "ema_update", "consistency_loss", "ContinualConfig",
           "run_continual", "forgetting"]

MODES = ("ilora", "sequential", "replay")


class ReservoirBuffer:
    """Reservoir sampling (Vitter's algorithm R): after n offers, every offered item is kept with probability
    ``min(1, capacity / n)``."""

    def __init__(self, capacity: int, seed: int = 0):
        if capacity < 1:
            raise ConfigError(f"replay buffer capacity must be >= 1, got {capacity}")
        self.capacity, self.seen, self.items = capacity, 0, []
        self.rng = random.Random(seed)

    def add(self, item: Any) -> None:
        self.seen += 1
        if len(self.items) < self.capacity:
            self.items.append(item)
        else:
            j = self.rng.randrange(self.seen)
            if j < self.capacity:
                self.items[j] = item

    def sample(self, n: int) -> list:
        return self.rng.sample(self.items, min(n, len(self.items)))

    def __len__(self) -> int:
        return len(self.items)


def ema_coefficient(step: int, ema_alpha: float) -> float:
    """The official ``a = min(1 − 1/(t + 1), ema_alpha)``."""
    return min(1.0 - 1.0 / (step + 1), ema_alpha)


@torch.no_grad()
def ema_update(slow: list[Tensor], fast: list[Tensor], a: float) -> None:
    """``θ_slow ← a·θ_slow + (1 − a)·θ_fast`` in place."""
    for s, f in zip(slow, fast):
        s.mul_(a).add_(f.to(s.dtype), alpha=1.0 - a)


def consistency_loss(h_fast: list[Tensor] | tuple, h_slow: list[Tensor] | tuple) -> Tensor:
    """``mean over layers of MSE(h_f, max(h_f, h_s))`` (h_s without gradient)."""
    losses = [F.mse_loss(f, torch.where(f > s.detach(), f, s.detach())) for f, s in zip(h_fast, h_slow)]
    return torch.stack(losses).mean()


def forgetting(R: list[list[float]], tasks: list[int] | None = None) -> float:
    """``mean_j max_{j<=i<T}(R[i][j] − R[T][j])`` over the tasks ``j`` before the last (default: all of them; 0 for
    one task)."""
    T = len(R) - 1
    cols = list(range(T)) if tasks is None else [j for j in tasks if j < T]
    if T < 1 or not cols:
        return 0.0
    return sum(max(R[i][j] for i in range(j, T)) - R[T][j] for j in cols) / len(cols)


@dataclass
class ContinualConfig:
    mode: str = "ilora"  # ilora | sequential | replay
    steps_per_task: int = 50
    batch_size: int = 8
    lr: float = 2e-4
    procedure: str = "adamw"
    procedure_options: dict = field(default_factory=dict)
    ema_alpha: float = 0.25
    reg_weight: float = 1.0
    buffer_size: int = 500
    eval_size: int = 100
    seed: int = 0

    def validate(self) -> None:
        if self.mode not in MODES:
            raise ConfigError(f"continual mode {self.mode!r}; valid: {', '.join(MODES)}")
        for k in ("steps_per_task", "batch_size", "buffer_size", "eval_size"):
            if getattr(self, k) < 1:
                raise ConfigError(f"continual {k}={getattr(self, k)} must be >= 1")
        if not 0.0 <= self.ema_alpha <= 1.0 or self.reg_weight < 0 or self.lr <= 0:
            raise ConfigError("continual: ema_alpha in [0, 1], reg_weight >= 0, lr > 0")


class _Only:
    """Run with exactly adapter ``name`` active (the host's active set; no requires_grad changes)."""

    def __init__(self, model, name):
        from .inject import hosts

        self.saved = [(h, h.active) for _, h in hosts(model)]
        self.name = name

    def __enter__(self):
        for h, _ in self.saved:
            h.active = (self.name,) if self.name in h.adapters else ()

    def __exit__(self, *exc):
        for h, act in self.saved:
            h.active = act


def _params(model, name) -> list[Tensor]:
    from .inject import adapters

    return [p for _, a in adapters(model, name) for _, p in sorted(a.named_parameters())]


def _task_loss(task, model, examples, device) -> Tensor:
    from .tasks.base import to_device

    return task.loss(model, to_device(task.collate(examples), device))


def _replay_loss(tasks, model, items, device) -> tuple[Tensor, list[tuple[Any, list]]]:
    """Mean loss over a replayed batch that may mix tasks (each task collates its own examples)."""
    groups: dict[int, list] = {}
    for ti, ex in items:
        groups.setdefault(ti, []).append(ex)
    parts = [(len(exs), _task_loss(tasks[ti], model, exs, device)) for ti, exs in groups.items()]
    n = sum(k for k, _ in parts)
    return sum(k * l for k, l in parts) / n, [(tasks[ti], exs) for ti, exs in groups.items()]


def _hidden(model, task, examples, device) -> tuple:
    from .tasks.base import to_device

    b = to_device(task.collate(examples), device)
    out = model(input_ids=b["input_ids"], attention_mask=b.get("attention_mask"), output_hidden_states=True)
    return out.hidden_states


def run_continual(model: nn.Module, tok, tasks: list, adapter: dict, cfg: ContinualConfig,
                  data: list[dict[str, list]] | None = None) -> dict:
    """Train over ``tasks`` (lorakit Task objects, in order) and return ``{"R": accuracy matrix, "avg_acc",
    "forgetting", "mode", ...}``. ``data[i]`` = ``{"train": encoded examples, "eval": encoded examples}`` (default:
    each task's own rows, encoded with ``tok``). ``adapter``: the attach config (any method)."""
    from . import procedures
    from .inject import attach, controllers, set_active

    cfg.validate()
    if not tasks:
        raise ConfigError("run_continual needs at least one task")
    device = next(model.parameters()).device
    if data is None:
        data = []
        for t in tasks:
            rows = t.rows()
            data.append({"train": t.encode(rows["train"], tok), "eval": t.encode(rows["eval"], tok)})
    torch.manual_seed(cfg.seed)
    attach(model, adapter, name="fast")
    if cfg.mode == "ilora":
        attach(model, adapter, name="slow")
        with torch.no_grad():
            for s, f in zip(_params(model, "slow"), _params(model, "fast")):
                s.copy_(f)
    set_active(model, "fast")
    proc = procedures.make_procedure(cfg.procedure, cfg.procedure_options, procedures.Hyper(lr=cfg.lr))
    tparams, opt = procedures.setup(model, proc)
    ctrls = controllers(model)
    total = cfg.steps_per_task * len(tasks)
    for c in ctrls:
        c.on_train_begin(model, opt, total)
    proc.on_train_begin(model, opt, total)
    buf = ReservoirBuffer(cfg.buffer_size, cfg.seed) if cfg.mode != "sequential" else None
    rng = random.Random(cfg.seed)
    R: list[list[float]] = []
    step = 0
    slow, fast = (_params(model, "slow"), _params(model, "fast")) if cfg.mode == "ilora" else ([], [])
    for ti, task in enumerate(tasks):
        train = data[ti]["train"]
        model.train()
        for _ in range(cfg.steps_per_task):
            step += 1
            cur = [train[rng.randrange(len(train))] for _ in range(cfg.batch_size)]
            loss = _task_loss(task, model, cur, device)
            if buf is not None and len(buf):
                items = buf.sample(cfg.batch_size)
                l_rep, groups = _replay_loss(tasks, model, items, device)
                loss = (loss + l_rep) / 2
                if cfg.mode == "ilora" and cfg.reg_weight:
                    cons = []
                    for gtask, exs in groups:
                        h_f = _hidden(model, gtask, exs, device)
                        with torch.no_grad(), _Only(model, "slow"):
                            h_s = _hidden(model, gtask, exs, device)
                        cons.append(consistency_loss(h_f, h_s))
                    loss = loss + cfg.reg_weight * torch.stack(cons).mean()
            loss.backward()
            for c in ctrls:
                c.before_step(step, model, opt)
            proc.before_step(step, model, opt)
            opt.step()
            proc.after_step(step, model, opt)
            opt.zero_grad(set_to_none=True)
            for c in ctrls:
                c.step(step, model, opt)
            if cfg.mode == "ilora":
                ema_update(slow, fast, ema_coefficient(step, cfg.ema_alpha))
        if buf is not None:
            for ex in train:
                buf.add((ti, ex))
        row, names = [], []
        with _Only(model, "slow" if cfg.mode == "ilora" else "fast"):
            for tj in range(len(tasks)):
                m = tasks[tj].evaluate(model, tok, data[tj]["eval"][:cfg.eval_size])
                key = next((k for k in ("accuracy", "exact_match") if k in m), "loss")
                names.append(key)
                row.append(float(m[key]))
        R.append(row)
        log.info("continual %s: after task %d: %s", cfg.mode, ti, row)
    T = len(tasks) - 1
    acc = [j for j, k in enumerate(names) if k != "loss"]  # higher-is-better tasks (a loss is reported apart)
    return {"mode": cfg.mode, "R": R, "metrics": names,
            "avg_acc": sum(R[T][j] for j in acc) / len(acc) if acc else float("nan"),
            "forgetting": forgetting(R, [j for j in acc if j < T]),
            "steps": step}


SEQUENCE = ("sentiment", "bbc", "gsm8k")


def sequence_tasks(names: tuple[str, ...] = SEQUENCE, *, max_length: int = 128, eval_size: int = 100,
                   gen_samples: int = 0) -> list:
    """The offline task sequence on SmolLM2 (the parts of the ``multitask-smollm2`` task: sentiment, BBC News topic
    with label words, GSM8K SFT), each a lorakit Task."""
    from .tasks import TASKS, _KINDS
    from .train.config import DataSection

    parts = dict(TASKS["multitask-smollm2"].parts)
    unknown = [n for n in names if n not in parts]
    if unknown:
        raise ConfigError(f"continual: unknown task(s) {unknown}; the offline sequence offers {list(parts)}")
    out = []
    for n in names:
        spec = parts[n]
        out.append(_KINDS[spec.kind](spec, DataSection(task=spec.name, max_length=max_length, eval_size=eval_size,
                                                       gen_samples=gen_samples)))
    return out


def run_sequence(cfg: ContinualConfig, adapter: dict | None = None, names: tuple[str, ...] = SEQUENCE,
                 max_length: int = 128) -> dict:
    """``lorakit continual``: SmolLM2 over the offline sequence in one mode; returns :func:`run_continual`'s dict."""
    import copy as _copy

    from .assets import load_causal_lm

    cfg.validate()
    tasks = sequence_tasks(names, max_length=max_length, eval_size=cfg.eval_size)
    model, tok = load_causal_lm("smollm2-135m")
    model = _copy.deepcopy(model)
    res = run_continual(model, tok, tasks, adapter or {"method": "lora", "targets": ["q_proj", "k_proj", "v_proj",
                                                                                     "o_proj"], "r": 8, "alpha": 16},
                        cfg)
    res["tasks"] = list(names)
    return res
