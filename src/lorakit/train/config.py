"""The training config: YAML sections mirror these dataclasses (``model``, ``adapter``, ``optim``, ``data``,
``train``, ``output``). ``adapter`` is a :class:`lorakit.AttachConfig` dict (method, targets, r, ...).

Precedence: built-in defaults < recipe YAML < ``--method NAME`` (``configs/methods/NAME.yaml``) < ``key=value``.
"""
from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from ..config import AttachConfig, apply_overrides, from_dict, load_yaml, to_dict
from ..errors import ConfigError

__all__ = ["ModelSection", "OptimSection", "DataSection", "TrainSection", "OutputSection", "RunConfig",
           "DEFAULT", "resolve", "method_file", "CONFIG_DIRS"]


@dataclass
class ModelSection:
    name: str | None = None  # a lorakit model (smollm2-135m, minilm-l6) or a local HF directory; None: the task's
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"  # base weights
    gradient_checkpointing: bool = False
    quantize: Literal["none", "nf4"] = "none"  # nf4: lorakit.quant_model.quantize_model (QLoRA's 4-bit base) before attach


@dataclass
class OptimSection:
    """The optimiser. ``name`` is a training procedure (:mod:`lorakit.procedures`: adamw, loraplus, or one you
    register); its own options sit beside the common keys (``optim.ratio=16`` for loraplus) and are validated
    against its ``Config``; they are kept in ``options``."""

    name: str = "adamw"
    lr: float = 2e-4
    weight_decay: float = 0.0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    warmup: float = 0.1  # < 1: fraction of the steps; >= 1: number of steps
    min_lr_ratio: float = 0.0
    max_grad_norm: float | None = 1.0
    trainable_lr: float | None = None  # learning rate of the `adapter.trainable` modules (a new head); None: lr
    options: dict[str, Any] = field(default_factory=dict)  # the procedure's own options (written flat in YAML)

    def hyper(self):
        from ..procedures import Hyper

        return Hyper(lr=self.lr, weight_decay=self.weight_decay, betas=tuple(self.betas), eps=self.eps,
                     trainable_lr=self.trainable_lr)

    def procedure(self):
        """The :class:`lorakit.procedures.Procedure` this section names, with its options (validated)."""
        from ..procedures import make_procedure

        return make_procedure(self.name, self.options, self.hyper())


@dataclass
class DataSection:
    task: str = "sentiment-smollm2"
    path: str | None = None  # your JSONL/CSV (text/label or prompt/completion); replaces the task's dataset
    eval_path: str | None = None  # default: a seeded 10% of `path`
    eval_split: Literal["validation", "test"] = "test"  # for the named datasets
    labels: list[str] | None = None
    label_words: list[str] | None = None
    prompt: str | None = None  # template with {text} or {prompt}
    max_length: int = 128
    train_size: int | None = None
    eval_size: int | None = 200
    batch_size: int = 8
    eval_batch_size: int = 32
    gen_samples: int = 0  # GSM8K: greedy exact match on this many eval rows
    max_new_tokens: int = 160
    # sft tasks: "prompt" (prompt/completion rows) or "messages" (chats rendered with the tokenizer's chat template,
    # loss on the assistant turns only; your file: a `messages` column, a list of {role, content})
    format: Literal["prompt", "messages"] = "prompt"
    packing: bool = False  # sft: pack a batch's samples into rows of max_length, no attention across samples
    dpo_beta: float = 0.1  # dpo tasks: the KL coefficient beta of the DPO loss


@dataclass
class TrainSection:
    steps: int = 100  # optimiser steps
    grad_accum: int = 1
    seed: int = 0
    precision: Literal["fp32", "bf16"] = "fp32"  # bf16 = autocast
    device: str = "auto"
    threads: int | None = None  # torch.set_num_threads
    log_every: int = 1
    eval_every: int = 0  # 0: only before and after
    eval_before: bool = True
    save_every: int = 0  # checkpoint every N steps (0: never; Ctrl-C still saves one)
    keep_checkpoints: int = 2
    calibration_batches: int = 4  # for methods that initialise from data (get_method(m).calibration)
    # where the scalars go besides metrics.jsonl (always written): jsonl, tensorboard, wandb (offline)
    report_to: list[str] = field(default_factory=lambda: ["jsonl"])


@dataclass
class OutputSection:
    dir: str = "runs/{task}-{method}"  # {task} and {method} are filled in
    save_adapter: bool = True


@dataclass
class RunConfig:
    model: ModelSection = field(default_factory=ModelSection)
    adapter: dict[str, Any] = field(default_factory=lambda: {"method": "lora"})
    optim: OptimSection = field(default_factory=OptimSection)
    data: DataSection = field(default_factory=DataSection)
    train: TrainSection = field(default_factory=TrainSection)
    output: OutputSection = field(default_factory=OutputSection)

    def to_dict(self) -> dict:
        d = to_dict(self)
        opts = d["optim"].pop("options", {}) or {}
        d["optim"].update(opts)  # procedure options are written flat, as they are given (optim.ratio=16)
        return d

    @property
    def out_dir(self) -> Path:
        return Path(self.output.dir.format(task=self.data.task, method=self.adapter.get("method", "lora")))


# The embedded default: `lorakit train` with no arguments (identical to configs/sentiment-smollm2-lora.yaml).
# Measured: see docs/training.md.
DEFAULT: dict[str, Any] = {
    "model": {"name": "smollm2-135m"},
    "adapter": {"method": "lora", "targets": ["q_proj", "k_proj", "v_proj", "o_proj"], "r": 8, "alpha": 16,
                "seed": 0},
    "optim": {"lr": 1e-3, "warmup": 0.1, "schedule": "cosine"},
    "data": {"task": "sentiment-smollm2", "max_length": 64, "batch_size": 8, "eval_size": 200,
             "eval_batch_size": 50},
    "train": {"steps": 40, "seed": 0, "log_every": 1},
    "output": {"dir": "runs/{task}-{method}"},
}

CONFIG_DIRS = [Path.cwd() / "configs", Path(__file__).resolve().parents[3] / "configs"]


def method_file(name: str) -> Path | None:
    for d in CONFIG_DIRS:
        p = d / "methods" / f"{name}.yaml"
        if p.is_file():
            return p
    return None


def _apply_method(data: dict, name: str) -> dict:
    """Swap in ``configs/methods/NAME.yaml``'s adapter (keeping the recipe's targets/trainable if it has none) and
    its optim section; without such a file just set ``adapter.method``."""
    p = method_file(name)
    old = dict(data.get("adapter") or {})
    if p is None:
        data["adapter"] = {**old, "method": name}
        return data
    m = load_yaml(p)
    unknown = set(m) - {"adapter", "optim"}
    if unknown:
        raise ConfigError(f"{p}: unknown section(s) {sorted(unknown)}; a method file has `adapter` and `optim`")
    new = dict(m.get("adapter") or {})
    new.setdefault("method", name)
    for keep in ("targets", "trainable"):
        if new.get(keep) is None and old.get(keep) is not None:
            new[keep] = old[keep]
    data["adapter"] = new
    if m.get("optim"):
        data["optim"] = {**(data.get("optim") or {}), **m["optim"]}
    return data


def resolve(path: str | Path | None = None, overrides: list[str] | None = None, method: str | None = None,
            base: dict | None = None) -> RunConfig:
    """Build a validated :class:`RunConfig` from a recipe (or the embedded default), a method, overrides."""
    data = copy.deepcopy(base if base is not None else DEFAULT) if path is None else load_yaml(path)
    if method:
        _apply_method(data, method)
    apply_overrides(data, list(overrides or []))
    unknown = [k for k in data if k not in ("model", "adapter", "optim", "data", "train", "output")]
    if unknown:
        from ..config import _suggest

        valid = ["adapter", "data", "model", "optim", "output", "train"]
        raise ConfigError(f"unknown section '{unknown[0]}'{_suggest(unknown[0], valid)}; valid sections: "
                          f"{', '.join(valid)}")
    for sec in ("model", "adapter", "optim", "data", "train", "output"):
        if data.get(sec) is not None and not isinstance(data[sec], dict):
            raise ConfigError(f"section '{sec}' must be a mapping, got {data[sec]!r}")
    optim = data.get("optim")
    if isinstance(optim, dict):  # keys that are not common optimiser keys are the procedure's own options
        common = {f.name for f in dataclasses.fields(OptimSection)}
        extra = {k: optim.pop(k) for k in list(optim) if k not in common}
        if extra:
            if optim.get("options") is not None and not isinstance(optim["options"], dict):
                raise ConfigError(f"optim.options must be a mapping, got {optim['options']!r}")
            optim["options"] = {**(optim.get("options") or {}), **extra}
    cfg = from_dict(RunConfig, {k: v for k, v in data.items() if v is not None})
    AttachConfig.make(cfg.adapter)  # validates method and options now (names the valid keys)
    from ..procedures import options_dict, preflight

    proc = cfg.optim.procedure()  # unknown procedure or option: ConfigError naming the valid ones
    cfg.optim.options = options_dict(proc)  # every option written out, defaults included
    preflight(proc, cfg.adapter)  # a method this procedure cannot train fails now, before any model loads
    t = cfg.train
    for name, v, lo in (("train.steps", t.steps, 1), ("train.grad_accum", t.grad_accum, 1),
                        ("data.batch_size", cfg.data.batch_size, 1), ("data.max_length", cfg.data.max_length, 8)):
        if v < lo:
            raise ConfigError(f"{name}={v} must be >= {lo}")
    if cfg.optim.lr <= 0:
        raise ConfigError(f"optim.lr={cfg.optim.lr} must be > 0")
    _check_extras(cfg)
    return cfg


def _check_extras(cfg: RunConfig) -> None:
    """Resolve-time checks of the data-format, packing, DPO and reporter keys (issue 24)."""
    from .loggers import check_report_to

    cfg.train.report_to = check_report_to(cfg.train.report_to)
    from ..tasks import TASKS

    d = cfg.data
    kind = TASKS[d.task].kind if d.task in TASKS else None  # an unknown task is refused when the task is built
    if d.format == "messages":
        if kind is not None and kind != "sft":
            raise ConfigError(f"data.format=messages needs an sft task (sft, gsm8k-smollm2); task '{d.task}' is "
                              f"a {kind} task")
        if d.prompt is not None:
            raise ConfigError("data.prompt does not apply to data.format=messages: the tokenizer's chat template "
                              "renders the conversation")
    if d.packing and kind is not None and kind != "sft":
        raise ConfigError(f"data.packing=true needs an sft task; task '{d.task}' is a {kind} task")
    if not d.dpo_beta > 0:
        raise ConfigError(f"data.dpo_beta={d.dpo_beta} must be > 0")
