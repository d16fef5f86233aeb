"""The second abstraction: a :class:`Procedure` says *how* the adapters' parameters are trained.

Methods say *what* trains (their parameters and the ``roles`` they declare); a procedure turns the trainable
parameters into optimiser parameter groups, builds the optimiser, may transform gradients between backward and
``optimizer.step()``, may change per step which parameters train (layer sampling, masks), and saves its own state
in checkpoints. The trainer (:mod:`lorakit.train.loop`), the HF callback (:mod:`lorakit.integrations.hf`) and the
arena drive procedures through these hooks and never name one.

Order of calls, in ``lorakit train`` and (through ``create_optimizer`` + ``AdapterCallback``) in the HF Trainer::

    proc = make_procedure(name, options, hyper)       # unknown name/option: ConfigError (at config resolution)
    params = trainable_parameters(model)               # [TrainParam], model.named_parameters() order
    proc.check(params)                                 # ConfigError if this method cannot be trained this way
    opt = proc.build_optimizer(params)                 # default: AdamW over proc.param_groups(params)
    proc.set_validation(loss_fn)                       # only if the class declares needs_validation
    proc.on_train_begin(model, opt, total_steps)
    proc.load_state_dict(...)                          # on resume only
    per step: proc.before_forward(step, model, opt) -> forward/backward of the micro-batches -> clip
              -> controllers' before_step -> proc.before_step(step, model, opt)
              -> opt.step() -> proc.after_step(step, model, opt) -> LR scheduler -> controllers' step
              -> proc.step_metrics() logged as ``procedure/<key>``
    checkpoint: proc.state_dict()
"""
from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from typing import Any, ClassVar, NoReturn

import torch
from torch import nn

from ..config import _suggest, from_dict, to_dict
from ..errors import ConfigError

log = logging.getLogger(__name__)

__all__ = ["ROLES", "TrainParam", "Hyper", "Procedure", "register_procedure", "get_procedure", "PROCEDURES",
           "make_procedure", "trainable_parameters", "list_procedures", "procedures_markdown", "adapter_roles", "setup", "role_settings", "check_role_optim"]

# The role vocabulary: what a parameter *is* in an adapter's structure (``Adapter.roles`` values must be one of these;
# tests/test_contract.py checks every registered method). Procedures group and treat parameters by role, never by
# their names.
ROLES: dict[str, str] = {
    "A": "down-projection factor (r, d_in), the input side of ΔW = B·A (stacked experts' A too)",
    "B": "up-projection factor (d_out, r), the output side of ΔW = B·A (stacked experts' B too)",
    "core": "a matrix in rank space between A and B (LoRA-XS's R, TriAdaptLoRA's L/U, NLoRA's N)",
    "singular_values": "the per-rank diagonal of an SVD-form update (AdaLoRA's E, SVFit, SORSA, KaSA)",
    "magnitude": "a per-output-row magnitude vector (DoRA)",
    "scale": "trainable scaling vectors around frozen factors (VeRA's d and b, LoLDU, RandLoRA)",
    "gate": "a per-rank gate that switches ranks on and off (SoRA)",
    "router": "input-dependent mixture weights (MoE routers, X-LoRA's classifier, MHR's routing logits)",
    "head": "a trainable copy of a whole module (`adapter.trainable`, PEFT's modules_to_save)",
    "bias": "a base layer's bias trained with `adapter.bias=all|lora_only`",
    "sparse": "the values of a sparse update on a fixed support (SLTrain's S)",
    "weight": "a base model's own parameter trained in place (method `full`: its layers' weights and, with `rest`, "
              "every other base parameter)",
    "other": "a trainable parameter whose method declares no role for it",
}


@dataclass(eq=False)
class TrainParam:
    """One trainable parameter with what a procedure needs to know about it.

    ``name``: its name in ``model.named_parameters()``; ``role``: one of :data:`ROLES`; ``adapter``: the
    :class:`lorakit.Adapter` that owns it (None for heads and biases) -- pair A with B, read ``lowrank()``/scales
    through it; ``adapter_name``: the attach name ("default"); ``method``: the registered method name; ``kind``:
    the adapted layer's kind (linear, conv1d, embedding, conv2d); ``path``: the module path of the host (or of the
    head / biased layer); ``local``: the name inside the adapter (``lora_A.weight``)."""

    name: str
    param: nn.Parameter
    role: str
    adapter: nn.Module | None = None
    adapter_name: str | None = None
    method: str | None = None
    kind: str | None = None
    path: str = ""
    local: str = ""


@dataclass
class Hyper:
    """The optimiser settings every procedure shares: ``optim.lr/weight_decay/betas/eps/trainable_lr`` in YAML,
    ``learning_rate/weight_decay/adam_beta1/adam_beta2/adam_epsilon`` in HF ``TrainingArguments``."""

    lr: float = 2e-4
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    trainable_lr: float | None = None  # the rate of `adapter.trainable` copies (role "head"); None: lr
    # per-role settings ``{role: {"lr": ..., "weight_decay": ...}}`` over the methods' declared ``role_optim``
    role_optim: dict[str, dict[str, float]] | None = None

    @property
    def head_lr(self) -> float:
        return self.trainable_lr if self.trainable_lr is not None else self.lr


# ----------------------------------------------------------------------------------------------------------------
# Which parameters train, and their roles (the one place that reads the model's structure: re-point it here)
# ----------------------------------------------------------------------------------------------------------------
def adapter_roles(adapter: nn.Module, local: str) -> str:
    """The declared role of parameter ``local`` of ``adapter``: a ``roles`` key equal to it, or naming a submodule
    that holds it (``"xlora_classifier"`` covers ``xlora_classifier.0.weight``); the longest key wins."""
    best, role = -1, "other"
    for key, r in getattr(type(adapter), "roles", {}).items():
        if (local == key or local.startswith(key + ".")) and len(key) > best:
            best, role = len(key), r
    return role


def trainable_parameters(model: nn.Module) -> list[TrainParam]:
    """Every parameter of ``model`` that requires grad, in ``model.named_parameters()`` order, with its role:
    adapter parameters by their method's declared ``roles`` ("other" when undeclared), ``ModulesToSave`` copies
    "head", base biases trained through ``adapter.bias`` "bias", anything else "other"."""
    from ..attachments import attachments
    from ..core import Adapter, ModulesToSave

    info: dict[int, dict[str, Any]] = {}
    for att in attachments(model).values():
        for m in att.members:
            a = m.adapter
            for local, p in a.named_parameters():
                info.setdefault(id(p), dict(role=adapter_roles(a, local), adapter=a, adapter_name=att.name,
                                            method=type(a).name, kind=a.view.kind, path=m.path, local=local))
    for path, m in model.named_modules():
        if isinstance(m, ModulesToSave):
            for aname, copy in m.copies.items():
                for local, p in copy.named_parameters():
                    info.setdefault(id(p), dict(role="head", adapter_name=aname, path=path, local=local))
        elif not isinstance(m, Adapter):
            b = dict(m.named_parameters(recurse=False)).get("bias")
            if b is not None and id(b) not in info:
                info[id(b)] = dict(role="bias", path=path, local="bias")
    stash = (getattr(model, "__dict__", {}).get("_lorakit") or {}).get("bias_stash", {})
    for p, _ in stash.values():  # other base parameters trained in place (method full's `rest`): role weight
        info.setdefault(id(p), dict(role="weight"))
    return [TrainParam(name=n, param=p, **info.get(id(p), {"role": "other"}))
            for n, p in model.named_parameters() if p.requires_grad]


ROLE_OPTIM_KEYS = ("lr", "weight_decay")


def check_role_optim(spec: Any, where: str) -> dict[str, dict[str, float]]:
    """Validate a ``{role: {"lr": x, "weight_decay": y}}`` mapping (a method's ``role_optim`` or the user's
    ``optim.role_optim``); raise :class:`ConfigError` naming the bad role/key/value and the valid ones."""
    if spec is None:
        return {}
    if not isinstance(spec, dict):
        raise ConfigError(f"{where} must be a mapping role -> {{lr, weight_decay}}, got {spec!r}")
    out = {}
    for role, opts in spec.items():
        if role not in ROLES or role == "head":
            raise ConfigError(f"{where}: unknown role {role!r}{_suggest(str(role), list(ROLES))}; valid roles: "
                              f"{', '.join(r for r in ROLES if r != 'head')} (heads take optim.trainable_lr)")
        if not isinstance(opts, dict):
            raise ConfigError(f"{where}.{role} must be a mapping with keys {', '.join(ROLE_OPTIM_KEYS)}, got {opts!r}")
        for k, v in opts.items():
            if k not in ROLE_OPTIM_KEYS:
                raise ConfigError(f"{where}.{role}: unknown key {k!r}; valid keys: {', '.join(ROLE_OPTIM_KEYS)}")
            if isinstance(v, bool) or not isinstance(v, (int, float)) or v < 0:
                raise ConfigError(f"{where}.{role}.{k}={v!r} must be a number >= 0")
        out[role] = {k: float(v) for k, v in opts.items()}
    return out


def role_settings(t: TrainParam, hp: Hyper) -> dict[str, float]:
    """The optimiser settings a parameter's role asks for: its method's declared ``role_optim[role]`` updated by the
    user's ``optim.role_optim[role]`` (either may give ``lr`` and/or ``weight_decay``); {} when neither does."""
    if t.role == "head":
        return {}
    out = dict(getattr(type(t.adapter), "role_optim", {}).get(t.role, {})) if t.adapter is not None else {}
    out.update((hp.role_optim or {}).get(t.role, {}))
    return out


# ----------------------------------------------------------------------------------------------------------------
# The abstraction
# ----------------------------------------------------------------------------------------------------------------
class Procedure:
    """How the adapters' parameters are trained. Subclass, give it a nested ``@dataclass Config`` of its own options
    (``optim.<option>=...`` in YAML) and register it with :func:`register_procedure`. Every hook is optional: the
    default is plain AdamW over :meth:`param_groups` (lorakit's classic groups, see there).

    ``self.cfg`` is the validated ``Config``; ``self.hp`` the shared :class:`Hyper` settings (lr, betas, ...)."""

    name: ClassVar[str] = ""
    # what `lorakit procedures` lists: the paper ("Authors Year, arXiv:...") and the kind of procedure
    # (optimiser | memory | sparse | selection | ...: free text, grouped in docs/procedures.md)
    paper: ClassVar[str] = ""
    family: ClassVar[str] = "optimiser"

    # Capability: the procedure needs a loss on held-out validation batches inside the training loop (Flexora's
    # bi-level search). The trainer then holds out ``validation_rows(n)`` training examples and hands the procedure
    # ``set_validation(loss_fn)``, ``loss_fn(i)`` being the task loss (with grad) on validation batch ``i``; the HF
    # callback takes them from ``create_optimizer(..., validation=[batches])``.
    needs_validation: ClassVar[bool] = False

    @dataclass
    class Config:
        pass

    def __init__(self, cfg: Any = None, hp: Hyper | None = None):
        self.cfg = cfg if cfg is not None else self.Config()
        self.hp = hp or Hyper()
        self.validation_loss = None  # set by set_validation (needs_validation procedures)

    # --- deciding -------------------------------------------------------------------------------------------------
    def validate(self) -> None:
        """Check the option values (``self.cfg``) and raise :class:`ConfigError` naming the bad one."""

    def check(self, params: list[TrainParam]) -> None:
        """Raise :class:`ConfigError` (use :meth:`refuse`) when these parameters cannot be trained this way (e.g. no
        A/B roles for LoRA+). Runs at config resolution on a shape-only probe of the method and again on the model."""

    def param_groups(self, params: list[TrainParam]) -> list[dict]:
        """Optimiser parameter groups. Default (lorakit's classic AdamW groups, ``optim.name=adamw``): parameters of
        2 or more dimensions with ``weight_decay``, the rest (vectors, scalars) without, heads (role "head") with
        ``weight_decay`` at ``trainable_lr``; empty groups are dropped. A role with settings (the method's declared
        ``role_optim``, overridden by ``optim.role_optim``; see :func:`role_settings`) gets its own group per
        distinct setting, named ``role:<role>``: its ``lr`` (else ``optim.lr``) and its ``weight_decay`` (else the
        rule above)."""
        hp = self.hp
        own = [(t, role_settings(t, hp)) for t in params]
        body = [t for t, s in own if t.role != "head" and not s]
        groups = [{"name": "decay", "params": [t.param for t in body if t.param.ndim >= 2],
                   "weight_decay": hp.weight_decay},
                  {"name": "no_decay", "params": [t.param for t in body if t.param.ndim < 2], "weight_decay": 0.0},
                  {"name": "head", "params": [t.param for t in params if t.role == "head"],
                   "weight_decay": hp.weight_decay, "lr": hp.head_lr}]
        groups += self.role_groups([(t, s) for t, s in own if s])
        return [g for g in groups if g["params"]]

    def role_groups(self, params: list[tuple[TrainParam, dict]]) -> list[dict]:
        """Groups for parameters with role settings (``(param, settings)`` pairs): one per (role, lr, weight decay),
        weight decay defaulting to adamw's rule (``optim.weight_decay`` on 2-D and larger, none on vectors)."""
        hp, out = self.hp, {}
        for t, s in params:
            lr = s.get("lr", hp.lr)
            wd = s.get("weight_decay", hp.weight_decay if t.param.ndim >= 2 else 0.0)
            key = (t.role, lr, wd)
            if key not in out:
                out[key] = {"name": f"role:{t.role}", "params": [], "weight_decay": wd, "lr": lr}
            out[key]["params"].append(t.param)
        return list(out.values())

    def build_optimizer(self, params: list[TrainParam]) -> torch.optim.Optimizer:
        """The optimiser (one per run). Default: ``torch.optim.AdamW`` over :meth:`param_groups`."""
        hp = self.hp
        return torch.optim.AdamW(self.param_groups(params), lr=hp.lr, betas=tuple(hp.betas), eps=hp.eps)

    # --- during training ------------------------------------------------------------------------------------------
    def on_train_begin(self, model: nn.Module, optimizer: torch.optim.Optimizer, total_steps: int) -> None:
        """Once before the first step (and before a resumed run's state is loaded)."""

    def validation_rows(self, n_train: int) -> int:
        """How many of the ``n_train`` training examples the trainer holds out as validation data (read only when the
        class declares ``needs_validation``)."""
        return 0

    def set_validation(self, loss_fn) -> None:
        """Receive ``loss_fn(i) -> loss tensor`` (with grad) on validation batch ``i`` (``needs_validation``);
        ``loss_fn(step, split="train")`` is the loss on the first training micro-batch of ``step`` (raises
        NotImplementedError where the training batches are not available, e.g. in the HF Trainer)."""
        self.validation_loss = loss_fn

    def before_forward(self, step: int, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        """At the start of step ``step``, before the forward of its first micro-batch (weight perturbations, e.g.
        LoRA-GGPO, which must be taken off again in :meth:`before_step` so that checkpoints, evaluations and the
        optimiser never see them)."""

    def step_metrics(self) -> dict[str, float]:
        """Numbers about the last step, logged with it as ``procedure/<key>`` (LoRA-Pro's approximation error)."""
        return {}

    def before_step(self, step: int, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        """Gradient transforms: after backward, gradient clipping and the controllers' ``before_step``, before
        ``optimizer.step()`` (``step`` counts from 0). Projections (GaLore), adjusted gradients (LoRA-Pro), masks."""

    def after_step(self, step: int, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        """After ``optimizer.step()`` (gradients still present), before the LR scheduler and the controllers' step:
        schedules of which layers/parameters train next (LISA), re-applying masks, federated rounds."""

    def state_dict(self) -> dict:
        """Extra state for checkpoints (tensors, numbers, lists, dicts); the optimiser's own state is saved apart."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        """Restore :meth:`state_dict` on resume (exact resume must hold)."""

    # --- helpers --------------------------------------------------------------------------------------------------
    def refuse(self, problem: str, params: list[TrainParam]) -> NoReturn:
        """Raise a ConfigError: ``optim.name=<this>: <problem>``, naming the methods and the roles they train and
        the procedures that accept these parameters."""
        global _PROBING
        if _PROBING:  # asked by another procedure's refuse(): just say no
            raise ConfigError(problem)
        methods = sorted({t.method for t in params if t.method}) or ["(no adapter)"]
        roles = sorted({t.role for t in params})
        fits = []
        _PROBING = True
        try:
            for n in sorted(PROCEDURES):
                if n == self.name:
                    continue
                try:
                    PROCEDURES[n](None, self.hp).check(params)
                    fits.append(n)
                except Exception:  # noqa: BLE001 - a ConfigError or a user procedure failing: not a fit
                    pass
        finally:
            _PROBING = False
        raise ConfigError(f"optim.name={self.name}: {problem}; method {', '.join(repr(m) for m in methods)} trains "
                          f"roles {', '.join(roles) or 'none'}. Procedures that fit it: {', '.join(fits) or 'none'}")


PROCEDURES: dict[str, type[Procedure]] = {}
_PROBING = False


def register_procedure(name: str):
    """Class decorator: ``@register_procedure("loraplus")``. User procedures register the same way (import the
    module before resolving a config, e.g. an arena ``--plugins`` module)."""

    def deco(cls: type[Procedure]) -> type[Procedure]:
        if not (isinstance(cls, type) and issubclass(cls, Procedure)):
            raise TypeError(f"@register_procedure({name!r}) needs a Procedure subclass, got {cls!r}")
        if name in PROCEDURES and PROCEDURES[name] is not cls:
            raise ValueError(f"procedure '{name}' registered twice ({PROCEDURES[name].__qualname__}, "
                             f"{cls.__qualname__})")
        if not dataclasses.is_dataclass(cls.Config):
            raise TypeError(f"{cls.__qualname__}.Config must be a @dataclass")
        cls.name = name
        PROCEDURES[name] = cls
        return cls

    return deco


def list_procedures() -> list[dict]:
    """Every registered procedure: name, family, paper, its options with defaults and the docstring's first line."""
    out = []
    for name in sorted(PROCEDURES):
        cls = PROCEDURES[name]
        opts = {f.name: (f.default_factory() if f.default_factory is not dataclasses.MISSING else
                         None if f.default is dataclasses.MISSING else f.default)
                for f in dataclasses.fields(cls.Config) if f.init}
        doc = (cls.__doc__ or "").strip()
        out.append({"name": name, "family": cls.family, "paper": cls.paper, "options": opts,
                    "summary": doc.split("\n\n")[0].replace("\n", " ") if doc else ""})
    return out


def procedures_markdown() -> str:
    """docs/procedures.md: the table of registered procedures, then each class docstring (formula and choices)."""
    rows = list_procedures()
    out = ["# Training procedures", "", f"{len(rows)} registered procedures (`optim.name=...`), generated from the "
           "registry (`lorakit procedures --markdown`). A procedure says *how* the trainable parameters train "
           "(groups, optimiser, gradient transforms, schedules); any method x any procedure either works or is "
           "refused at config resolution (see docs/design.md).", "",
           "| procedure | family | paper | options |", "|---|---|---|---|"]
    for r in rows:
        opts = ", ".join(f"{k}={v!r}" for k, v in r["options"].items())
        out.append(f"| `{r['name']}` | {r['family']} | {r['paper'] or '-'} | {opts or '-'} |")
    out.append("")
    for r in rows:
        out += [f"## `{r['name']}`", "", (PROCEDURES[r["name"]].__doc__ or "").strip() or
                (__import__("sys").modules[PROCEDURES[r["name"]].__module__].__doc__ or "").strip(), ""]
    return "\n".join(out)


def get_procedure(name: str) -> type[Procedure]:
    import importlib

    importlib.import_module("lorakit.procedures")  # registers the built-in procedures
    if name not in PROCEDURES:
        raise ConfigError(f"unknown procedure optim.name={name!r}{_suggest(name, sorted(PROCEDURES))}; registered: "
                          f"{', '.join(sorted(PROCEDURES))}")
    return PROCEDURES[name]


DEFAULT_PROCEDURE = "adamw"  # optim.name when none is given: plain AdamW over every trainable parameter

COMMON_KEYS = ("betas", "eps", "lr", "max_grad_norm", "min_lr_ratio", "name", "role_optim", "schedule", "trainable_lr",
               "warmup", "weight_decay")


def make_procedure(name: str = DEFAULT_PROCEDURE, options: dict | None = None, hyper: Hyper | None = None,
                   where: str = "optim", common: tuple[str, ...] = COMMON_KEYS) -> Procedure:
    """Build procedure ``name`` with its ``options`` (validated against its ``Config``: an unknown option is a
    ConfigError naming the valid ones; ``where``/``common`` only shape that message) and the shared ``hyper``."""
    cls = get_procedure(name)
    opts = dict(options or {})
    fields = sorted(f.name for f in dataclasses.fields(cls.Config) if f.init)
    unknown = [k for k in opts if k not in fields]
    if unknown:
        k = unknown[0]
        own = f"takes the options {', '.join(fields)}" if fields else "has no options of its own"
        raise ConfigError(f"unknown key '{where}.{k}'{_suggest(k, fields + list(common))}: procedure '{name}' {own}; "
                          f"common keys: {', '.join(common)}")
    cfg = from_dict(cls.Config, opts, where=where)
    hyper = hyper or Hyper()
    if hyper.role_optim:
        hyper = dataclasses.replace(hyper, role_optim=check_role_optim(hyper.role_optim, f"{where}.role_optim"))
    proc = cls(cfg, hyper)
    proc.validate()
    return proc


def options_dict(proc: Procedure) -> dict:
    """The procedure's full options (defaults filled in), as plain data for config files and checkpoints."""
    return to_dict(proc.cfg)


def setup(model: nn.Module, proc: Procedure) -> tuple[list[TrainParam], torch.optim.Optimizer]:
    """Check the model's trainable parameters against ``proc`` and build its optimiser."""
    params = trainable_parameters(model)
    if not params:
        raise ConfigError("the model has no trainable parameters: attach an adapter first (lorakit.attach)")
    proc.check(params)
    opt = proc.build_optimizer(params)
    from .slots import install_slot_warmup

    install_slot_warmup(opt, params)  # grown rank slots: fresh AdamW state + warmup (methods with grows_slots)
    if log.isEnabledFor(logging.INFO):
        groups = ", ".join(f"{g.get('name', i)}: {sum(p.numel() for p in g['params']):,} params at lr {g['lr']:g}"
                           for i, g in enumerate(opt.param_groups))
        log.info("procedure %s: %s", proc.name, groups)
    return params, opt


# ----------------------------------------------------------------------------------------------------------------
# Preflight: the roles a method would train, from one shape-only adapter (no model needed)
# ----------------------------------------------------------------------------------------------------------------
def probe_parameters(adapter_cfg: Any) -> list[TrainParam] | None:
    """The trainable parameters one adapter of this config would have, built on the meta device (shapes only), so
    a procedure can refuse a method at config resolution, before any model loads. None if it cannot be probed
    (the check then runs on the real model)."""
    from ..config import AttachConfig
    from ..core import LayerView, get_method

    try:
        cfg = AttachConfig.make(adapter_cfg)
        method = get_method(cfg.method)
        kinds = {"linear": lambda: nn.Linear(512, 512), "embedding": lambda: nn.Embedding(512, 512),
                 "conv2d": lambda: nn.Conv2d(64, 64, 3)}
        kind = next((k for k in ("linear", "embedding", "conv2d") if k in method.layers), None)
        if kind is None:
            return None
        with torch.device("meta"):
            base = kinds[kind]()
            a = method(base, cfg.method_config(None, method), LayerView(base))
        frozen = set(getattr(method, "frozen", ()))
        out = [TrainParam(name=local, param=p, role=adapter_roles(a, local), adapter=a, adapter_name="probe",
                          method=method.name, kind=kind, local=local)
               for local, p in a.named_parameters() if p.requires_grad and local not in frozen]
        for t in cfg.trainable:
            out.append(TrainParam(name=t, param=nn.Parameter(torch.empty(1, 1, device="meta")), role="head", path=t,
                                  adapter_name="probe"))  # a shape-only stand-in too: checks defer to the model
        return out
    except Exception:  # noqa: BLE001 - probing is best effort; the real check runs after attach
        return None


def preflight(proc: Procedure, adapter_cfg: Any) -> None:
    """Run ``proc.check`` on a shape-only probe of the method (see :func:`probe_parameters`)."""
    params = probe_parameters(adapter_cfg)
    if params:
        proc.check(params)
