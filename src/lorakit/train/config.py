"""The training config: YAML sections mirror these dataclasses (``model``, ``adapter``, ``optim``, ``data``,
``train``, ``output``). ``adapter`` is a :class:`lorakit.AttachConfig` dict (method, targets, r, ...).

Precedence: built-in defaults < recipe YAML < ``--method NAME`` (``lorakit/recipes/methods/NAME.yaml``, or ``./configs/methods/NAME.yaml``) < ``key=value``.
"""
from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from ..config import AttachConfig, apply_overrides, from_dict, load_yaml, to_dict
from ..errors import ConfigError


def _range(key: str, v, gt=None, ge=None, le=None) -> None:
    """A number's range (None is left alone: 'not set'); NaN/inf are refused by ``from_dict`` already."""
    if v is None:
        return
    if (gt is not None and not v > gt) or (ge is not None and not v >= ge) or (le is not None and not v <= le):
        rng = " and ".join(x for x in (f"> {gt}" if gt is not None else "", f">= {ge}" if ge is not None else "",
                                       f"<= {le}" if le is not None else "") if x)
        raise ConfigError(f"{key}={v} must be {rng}")


OUTPUT_FIELDS = ("task", "method")  # the placeholders output.dir may use


def check_template(text: str | None, key: str, fields: tuple[str, ...], required: str | None = None) -> None:
    """A ``str.format`` template uses only ``fields`` (``{{``/``}}`` for literal braces) and has ``required``."""
    import string

    if text is None:
        return
    try:
        used = [(name, spec, conv) for _, name, spec, conv in string.Formatter().parse(text) if name is not None]
    except ValueError as e:
        raise ConfigError(f"{key}={text!r} is not a valid template ({e}); write literal braces as {{{{ and }}}}") \
            from None
    for name, spec, conv in used:
        if name not in fields or spec or conv:
            valid = ", ".join("{" + f + "}" for f in fields) or "none"
            raise ConfigError(f"{key}={text!r} uses the placeholder {{{name}{'!' + conv if conv else ''}"
                              f"{':' + spec if spec else ''}}}; valid placeholders: {valid} (literal braces: {{{{ }}}})")
    if required and required not in [u[0] for u in used]:
        raise ConfigError(f"{key}={text!r} must contain {{{required}}}")


def check_device(name: str) -> None:
    """``train.device``: auto, cpu, cuda, cuda:N or mps, and available on this machine."""
    import re

    import torch

    m = re.fullmatch(r"(auto|cpu|mps|cuda)(?::(\d+))?", name or "")
    if m is None or (m.group(2) is not None and m.group(1) != "cuda"):
        raise ConfigError(f"train.device={name!r}; valid: auto, cpu, cuda, cuda:N, mps")
    kind = m.group(1)
    if kind == "cuda":
        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if n == 0:
            raise ConfigError(f"train.device={name!r} but no CUDA device is available here (torch "
                              f"{torch.__version__}, CUDA build: {torch.version.cuda or 'no'}); use auto or cpu")
        if m.group(2) is not None and int(m.group(2)) >= n:
            raise ConfigError(f"train.device={name!r} but this machine has {n} CUDA device(s) (cuda:0..cuda:{n - 1})")
    if kind == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise ConfigError(f"train.device={name!r} but MPS is not available here; use auto or cpu")

__all__ = ["ModelSection", "OptimSection", "DataSection", "TrainSection", "OutputSection", "RunConfig",
           "DEFAULT", "resolve", "method_file", "CONFIG_DIRS", "RECIPES_DIR", "list_recipes", "recipe_path"]


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
    # per-role lr / weight decay over the method's declared defaults: {router: {lr: 0.1, weight_decay: 0.0}}
    role_optim: dict[str, Any] = field(default_factory=dict)
    options: dict[str, Any] = field(default_factory=dict)  # the procedure's own options (written flat in YAML)

    def validate(self) -> None:
        _range("optim.lr", self.lr, gt=0)
        _range("optim.weight_decay", self.weight_decay, ge=0)
        _range("optim.eps", self.eps, gt=0)
        _range("optim.warmup", self.warmup, ge=0)
        _range("optim.min_lr_ratio", self.min_lr_ratio, ge=0, le=1)
        _range("optim.max_grad_norm", self.max_grad_norm, gt=0)
        _range("optim.trainable_lr", self.trainable_lr, ge=0)  # 0: the head stays fixed
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ConfigError(f"optim.betas={list(self.betas)} must be two numbers in [0, 1) (e.g. [0.9, 0.999])")

    def hyper(self):
        from ..procedures import Hyper

        return Hyper(lr=self.lr, weight_decay=self.weight_decay, betas=tuple(self.betas), eps=self.eps,
                     trainable_lr=self.trainable_lr, role_optim=dict(self.role_optim) or None)

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
    # head-classify tasks (LS-LLaMA): how per-token logits are pooled, and LS-unLLaMA's bidirectional attention
    pooling: Literal["last", "mean", "max"] = "last"
    attention: Literal["causal", "bidirectional"] = "causal"

    def validate(self) -> None:
        for k, lo in (("max_length", 8), ("batch_size", 1), ("eval_batch_size", 1), ("train_size", 1),
                      ("eval_size", 1), ("gen_samples", 0), ("max_new_tokens", 1)):
            _range(f"data.{k}", getattr(self, k), ge=lo)
        for k in ("labels", "label_words"):
            v = getattr(self, k)
            if v is not None and (not v or len(set(v)) != len(v)):
                raise ConfigError(f"data.{k}={v!r} must be a non-empty list of distinct strings")
        for k in ("path", "eval_path"):
            if getattr(self, k) == "":
                raise ConfigError(f"data.{k} is empty: give a JSONL/CSV file or null")


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
    # several processes (torchrun / accelerate launch): ddp (replicated model) or fsdp (FSDP2: the base sharded,
    # the adapters replicated); data.batch_size is the global micro-batch. See lorakit.train.distributed.
    distributed: Literal["none", "ddp", "fsdp"] = "none"

    def validate(self) -> None:
        for k, lo in (("steps", 1), ("grad_accum", 1), ("threads", 1), ("log_every", 0), ("eval_every", 0),
                      ("save_every", 0), ("keep_checkpoints", 1), ("calibration_batches", 1)):
            _range(f"train.{k}", getattr(self, k), ge=lo)
        check_device(self.device)


@dataclass
class OutputSection:
    dir: str = "runs/{task}-{method}"  # {task} and {method} are filled in
    save_adapter: bool = True

    def validate(self) -> None:
        check_template(self.dir, "output.dir", OUTPUT_FIELDS)


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


# The embedded default: `lorakit train` with no arguments (identical to the packaged recipe sentiment-smollm2-lora.yaml).
# targets "all-attention": every projection in an attention block, derived from the model (q/k/v/o_proj on
# SmolLM2, query/key/value/attention.output.dense on MiniLM), so `model.name=...` keeps a working default.
# Measured: see docs/training.md.
DEFAULT: dict[str, Any] = {
    "model": {"name": "smollm2-135m"},
    "adapter": {"method": "lora", "targets": "all-attention", "r": 8, "alpha": 16,
                "seed": 0},
    "optim": {"lr": 1e-3, "warmup": 0.1, "schedule": "cosine"},
    "data": {"task": "sentiment-smollm2", "max_length": 64, "batch_size": 8, "eval_size": 200,
             "eval_batch_size": 50},
    "train": {"steps": 40, "seed": 0, "log_every": 1},
    "output": {"dir": "runs/{task}-{method}"},
}

# The recipes ship inside the package (lorakit/recipes: <task>-lora.yaml and methods/<name>.yaml), so a wheel
# install has them; a ./configs directory (a user's own method files) is looked at first.
RECIPES_DIR = Path(__file__).resolve().parents[1] / "recipes"
CONFIG_DIRS = [Path.cwd() / "configs", RECIPES_DIR]


def method_file(name: str) -> Path | None:
    for d in CONFIG_DIRS:
        p = d / "methods" / f"{name}.yaml"
        if p.is_file():
            return p
    return None


def _describe(p: Path) -> str:
    """The first comment line of a recipe file (its one-line description)."""
    for line in p.read_text(encoding="utf-8").splitlines():
        if line.startswith("#"):
            return line.lstrip("# ").strip()
        if line.strip():
            break
    return ""


def list_recipes() -> list[dict]:
    """The packaged recipes: ``{"kind": "recipe" | "method", "name", "path", "description"}`` each."""
    out = [{"kind": "recipe", "name": p.stem, "path": p, "description": _describe(p)}
           for p in sorted(RECIPES_DIR.glob("*.yaml"))]
    out += [{"kind": "method", "name": p.stem, "path": p, "description": _describe(p)}
            for p in sorted((RECIPES_DIR / "methods").glob("*.yaml"))]
    out += [{"kind": "merge", "name": p.stem, "path": p, "description": _describe(p)}
            for p in sorted((RECIPES_DIR / "merge").glob("*.yaml"))]  # `lorakit merge` configs
    return out


def recipe_path(path: str | Path) -> Path:
    """A recipe file: ``path`` itself when it exists, else the packaged recipe of that name
    (``sentiment-minilm-lora``, ``sentiment-minilm-lora.yaml`` and ``configs/sentiment-minilm-lora.yaml`` all work
    from a wheel install)."""
    p = Path(path)
    if p.is_file():
        return p
    name = p.name[:-5] if p.name.endswith(".yaml") else p.name
    sub = "methods" if p.parent.name == "methods" else ""
    cand = RECIPES_DIR / sub / f"{name}.yaml"
    if cand.is_file():
        return cand
    names = [r["name"] for r in list_recipes() if r["kind"] == "recipe"]
    raise ConfigError(f"config file not found: {p} (packaged recipes: {', '.join(names)}; see `lorakit recipes`)")


def _apply_method(data: dict, name: str) -> dict:
    """Swap in ``configs/methods/NAME.yaml``'s adapter (keeping the recipe's targets if it has none) and its optim
    section; without such a file just set ``adapter.method``. ``trainable`` is the union, recipe's first: the
    recipe's modules are the task's (a new classification head must train whatever the method), the method's are
    its own (LongLoRA's embeddings and norms)."""
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
    if new.get("targets") is None and old.get("targets") is not None:
        new["targets"] = old["targets"]
    if old.get("trainable") or new.get("trainable") is not None:
        mine, theirs = list(old.get("trainable") or []), list(new.get("trainable") or [])
        new["trainable"] = mine + [t for t in theirs if t not in mine]
    data["adapter"] = new
    if m.get("optim"):
        data["optim"] = {**(data.get("optim") or {}), **m["optim"]}
    return data


def resolve(path: str | Path | None = None, overrides: list[str] | None = None, method: str | None = None,
            base: dict | None = None) -> RunConfig:
    """Build a validated :class:`RunConfig` from a recipe (or the embedded default), a method, overrides."""
    data = copy.deepcopy(base if base is not None else DEFAULT) if path is None else load_yaml(recipe_path(path))
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
    # the task: its data.prompt placeholders, and your data files (read now: a bad file fails before any model)
    from ..tasks import get_task

    get_task(cfg.data.task, cfg.data).check_config()
    _check_extras(cfg)
    from .distributed import check_config as check_distributed

    check_distributed(cfg)  # the launch (WORLD_SIZE), the batch split and the method under FSDP2
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
    if kind is not None and kind != "head-classify" and (d.pooling != "last" or d.attention != "causal"):
        raise ConfigError(f"data.pooling/data.attention apply to head-classify tasks (sentiment-smollm2-head, "
                          f"bbc-smollm2-head, classify-head); task '{d.task}' is a {kind} task")
    if not d.dpo_beta > 0:
        raise ConfigError(f"data.dpo_beta={d.dpo_beta} must be > 0")
