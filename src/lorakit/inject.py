"""Putting adapters on a model and taking them off: attach, detach, set_active, disabled, summary, calibrate.

The model is changed in place and stays the same object (an HF model keeps ``generate``/``save_pretrained``).
Every check runs before the first change, so a failing ``attach`` leaves the model exactly as it was.
"""
from __future__ import annotations

import contextlib
import copy
import logging
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
from torch import Tensor, nn

from .config import AttachConfig
from .attachments import Attachment, Member, attachments, get_attachment, registry
from .core import Adapted, Adapter, BatchContext, LayerView, ModulesToSave, ParamView, get_method, param_owner
from .errors import ConfigError, MergeError, TargetError
from .targets import match, resolve_trainable

log = logging.getLogger(__name__)

__all__ = ["attach", "check_attach", "detach", "set_active", "disabled", "summary", "hosts", "adapters", "init_adapters",
           "calibrate", "extra_loss", "output_loss", "needs_full_logits", "adapter_stats", "batch_context", "controllers", "attached", "active_names",
           "attachment", "Attachment", "calibration_kind", "match_parameters"]

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "float64": torch.float64}


# ----------------------------------------------------------------------------------------------------------------
# Book-keeping: one Attachment per attach (lorakit.attachments), stored on the model as a plain attribute
# ----------------------------------------------------------------------------------------------------------------
_meta = registry


def attached(model: nn.Module) -> dict[str, Attachment]:
    """``{name: Attachment}`` for each adapter on the model (``att["config"]`` / ``att["paths"]`` still work)."""
    return attachments(model)


def attachment(model: nn.Module, name: str = "default") -> Attachment:
    """The :class:`~lorakit.attachments.Attachment` of adapter ``name`` (ConfigError naming the attached ones)."""
    return get_attachment(model, name)


def hosts(model: nn.Module) -> Iterator[tuple[str, Adapted]]:
    for path, m in model.named_modules():
        if isinstance(m, Adapted):
            yield path, m


def adapters(model: nn.Module, name: str | None = None) -> Iterator[tuple[str, Adapter]]:
    """``(path, adapter)`` for every adapter named ``name`` (all names if None)."""
    for path, h in hosts(model):
        for n, a in h.adapters.items():
            if name is None or n == name:
                yield path, a


def active_names(model: nn.Module) -> tuple[str, ...]:
    return tuple(_meta(model).get("active", ()))


def _set_module(model: nn.Module, path: str, new: nn.Module) -> None:
    parent, _, leaf = path.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, new)


def _adapter_dtype(cfg: AttachConfig, base_w: Tensor) -> torch.dtype:
    if cfg.dtype:
        return _DTYPES[cfg.dtype]
    return base_w.dtype if base_w.dtype in (torch.float32, torch.float64) else torch.float32


def _grad_flags(model: nn.Module) -> dict[int, tuple[nn.Parameter, bool]]:
    return {id(p): (p, p.requires_grad) for p in model.parameters()}


def _restore_grad_flags(model: nn.Module, flags: dict | None, default: bool | None = None) -> None:
    """Give every parameter the flag it had when ``flags`` was taken; parameters not in it get ``default``
    (None: left as they are)."""
    flags = flags or {}
    for p in model.parameters():
        got = flags.get(id(p))
        if got is not None and got[0] is p:
            p.requires_grad_(got[1])
        elif default is not None:
            p.requires_grad_(default)


def _check_not_merged(model: nn.Module, what: str) -> None:
    merged = [p for p, h in hosts(model) if h.merged_names]
    if merged:
        raise MergeError(f"cannot {what} while adapters are merged into the base (e.g. at '{merged[0]}'): call "
                         "lorakit.unmerge(model) first (or leave the `with lorakit.merged(model)` block)")


# ----------------------------------------------------------------------------------------------------------------
def check_attach(model: nn.Module, config: AttachConfig | dict | Any) -> list[str]:
    """Every check :func:`attach` makes about ``model`` before it builds anything, with nothing built or changed:
    the targets match, each matched layer is of a kind the method supports, and each can take the options (a rank
    above the layer's maximum is refused naming the layer: ``Adapter.check_layer``). Returns the matched paths.
    The trainer calls it right after the model loads, so a wrong target fails before any evaluation runs."""
    cfg = AttachConfig.make(config)
    method = get_method(cfg.method)
    cfg.trainable = resolve_trainable(model, cfg.trainable)
    if cfg.target_parameters and not cfg.targets:  # only parameters (PEFT: target_modules=[])
        paths = []
    else:
        paths = match(model, cfg.targets, cfg.exclude, cfg.layers, cfg.layers_pattern, skip=cfg.trainable)
    _check_not_shared(model, paths)
    for path in paths:
        mod = model.get_submodule(path)
        base = mod.base_layer if isinstance(mod, Adapted) else mod
        view = LayerView(base)
        if view.kind not in method.layers:
            raise TargetError(f"method '{method.name}' cannot adapt '{path}' ({type(base).__name__}); it supports "
                              f"{', '.join(method.layers)}. Narrow `targets` or add it to `exclude`.")
        problem = method.check_layer(cfg.method_config(path, method), view)
        if problem:
            raise ConfigError(f"method '{method.name}' cannot adapt '{path}': {problem}. Lower the option, give "
                              f"this layer its own value in `overrides` (e.g. {{{path!r}: {{...}}}}) or leave it "
                              "out with `exclude`")
    return paths


def attach(model: nn.Module, config: AttachConfig | dict | Any, name: str = "default", *, defer_init: bool = False,
           calibration: Iterable | None = None, loss_fn: Callable | None = None, stats: dict | None = None,
           provides: Iterable[str] | None = None) -> nn.Module:
    """Add adapter ``name`` (method and targets from ``config``) to ``model`` in place, make it the active one,
    freeze everything else, and run its init. Returns the same model.

    ``calibration``: batches (dicts for ``model(**batch)``) for data-dependent inits (CorDA, LoRA-GA, ...);
    ``loss_fn(model, batch) -> loss`` overrides ``model(**batch).loss`` for gradient-based inits.
    ``defer_init=True`` builds shapes only (meta-device flow); call :func:`init_adapters` after loading weights.
    ``provides``: the per-batch context keys the caller will pass (:func:`batch_context`); a method that reads a
    key not in it gets a warning (its mechanism would silently be off).

    Every check runs before the first change, and a failure after it (an init, a hook) takes everything back,
    so a failing ``attach`` leaves the model as it was. New modules take the train/eval mode of the layer they
    adapt.
    """
    cfg = AttachConfig.make(config)
    method = get_method(cfg.method)
    cfg.trainable = resolve_trainable(model, cfg.trainable)  # PEFT's modules_to_save matching (suffixes)
    if not isinstance(name, str) or not name or "." in name or "/" in name:
        raise ConfigError(f"adapter name {name!r} must be a non-empty string without '.' or '/'")
    meta = _meta(model)
    if name in meta["attachments"]:
        raise ConfigError(f"an adapter named '{name}' is already attached; detach it first or pick another name "
                          f"(attached: {sorted(meta['attachments'])})")
    _check_not_merged(model, f"attach adapter '{name}'")
    paths = check_attach(model, cfg)
    for other in meta["attachments"].values():  # weights another attach rewrites (S2FT's permutations) take no adapter
        hit = sorted(other.method.rewritten_paths(other) & (set(paths) | set(cfg.trainable)))
        if hit:
            raise TargetError(f"'{hit[0]}' is rewritten by adapter '{other.name}' ({other.method.name}: "
                              f"{other.method.exclusive or 'it changes that weight while attached'}); detach it "
                              "first or leave the module out")
    ptargets = match_parameters(model, cfg.target_parameters) if cfg.target_parameters else []
    if provides is not None:
        missing = missing_context(cfg, provides, [None, *paths])
        if missing:
            log.warning("method '%s' reads the per-batch context key(s) %s, which this data never provides: that "
                        "part of the method is off (pass them with lorakit.batch_context)", method.name, missing)

    # 1) build every adapter and its (not yet installed) host: nothing on the model changes yet
    att = Attachment(name=name, config=cfg, method=method, model=model, trainable=list(cfg.trainable))
    rng = torch.random.fork_rng(devices=[]) if cfg.seed is not None else contextlib.nullcontext()
    with rng:
        if cfg.seed is not None:
            torch.manual_seed(cfg.seed)
        for path in paths:
            mod = model.get_submodule(path)
            base = mod.base_layer if isinstance(mod, Adapted) else mod
            view = LayerView(base)
            mcfg = cfg.method_config(path, method)
            w = base.weight
            with torch.device(w.device):
                a = method(base, mcfg, view)
            if w.device.type != "meta":
                a.reset_parameters()
            a.to(_adapter_dtype(cfg, w))
            host = mod if isinstance(mod, Adapted) else Adapted(base)
            att.members.append(Member(path, host, a))
        _build_param_members(model, att, method, ptargets)
        method.share(att)
        _build_token_members(model, att, paths)
    kind = calibration_kind(cfg, paths)
    if kind and not defer_init and stats is None:
        if calibration is None:
            raise ConfigError(f"method '{method.name}' initialises from {kind} of calibration data: "
                              "pass calibration=<batches> to attach() (the CLI does this from the training set)")
        need = [p for p in paths if method.init_of(cfg.method_config(p, method))[1]]
        stats = calibrate(model, need, calibration, kind, loss_fn=loss_fn)

    # 2) install (rolled back by detach on any failure from here on)
    if meta["grad_flags"] is None:  # the flags before the first attach: restored when the last adapter goes
        meta["grad_flags"] = _grad_flags(model)
    prev_active, prev_flags = tuple(meta["active"]), _grad_flags(model)
    ctx = meta["ctx"]
    for m in att.all_members:
        mod = model.get_submodule(m.path)
        if m.host is not mod:
            m.host.training = m.host.adapters.training = m.host.base_layer.training
            _set_module(model, m.path, m.host)
        m.adapter.ctx = ctx
        m.host.adapters[name] = m.adapter
    _warn_tied_trainable(model, cfg.trainable)
    for t in cfg.trainable:
        mod = model.get_submodule(t)
        wrap = mod if isinstance(mod, ModulesToSave) else ModulesToSave(mod)
        if wrap is not mod:
            wrap.training = wrap.copies.training = mod.training
            _set_module(model, t, wrap)
        wrap.copies[name] = copy.deepcopy(wrap.original_module)
    if cfg.bias != "none":
        owners = [m.host.base_layer for m in att.members] if cfg.bias == "lora_only" else \
            [m for m in model.modules() if not isinstance(m, (Adapter, Adapted))]
        for m in owners:
            b = getattr(m, "bias", None)
            if isinstance(b, nn.Parameter) and id(b) not in meta["bias_stash"]:
                meta["bias_stash"][id(b)] = (b, b.detach().clone())
    _find_ties(model)
    meta["attachments"][name] = att
    try:
        att.handles = list(method.bind(att))
        for m in att.all_members:  # new modules (adapters, and what bind added to them) take the layer's mode
            m.adapter.train(m.host.base_layer.training)
        set_active(model, name)
        if not defer_init:
            init_adapters(model, name, stats)
    except BaseException:
        detach(model, name)
        if meta["attachments"]:
            set_active(model, [n for n in prev_active if n in meta["attachments"]], trainable=False)
            _restore_grad_flags(model, prev_flags)
        raise
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    n_all = sum(p.numel() for p in model.parameters())
    log.info("attached '%s' (%s) to %d modules: %s trainable params (%.3f%%)", name, method.name, len(paths),
             f"{n_train:,}", 100.0 * n_train / max(n_all, 1))
    return model


def missing_context(config: AttachConfig | dict | Any, provided: Iterable[str],
                    paths: Iterable[str | None] = (None,)) -> list[str]:
    """The per-batch context keys the method of ``config`` reads (its ``context_keys``, per module ``paths``; None:
    the attach-wide options) that ``provided`` lacks: that part of the method would silently be off."""
    cfg = AttachConfig.make(config)
    method = get_method(cfg.method)
    return sorted({k for p in paths for k in method.context_keys(cfg.method_config(p, method))} - set(provided))


def calibration_kind(config: AttachConfig | dict | Any, paths: Iterable[str] | None = None) -> str | None:
    """The calibration data (``"activations"`` | ``"gradients"`` | None) the init of ``config`` needs, from the
    method's declaration (per config: LoRA's ``init="eva"`` needs activations). ``paths``: the modules it will
    adapt (None: the attach-wide options and every override). Mixed kinds in one attach are refused."""
    cfg = AttachConfig.make(config)
    method = get_method(cfg.method)
    cfgs = [cfg.method_config(p, method) for p in paths] if paths is not None else \
        [cfg.method_config(None, method)] + [cfg.method_config(None, method, ov) for ov in cfg.overrides.values()]
    kinds = sorted({k for k in (method.init_of(c)[1] for c in cfgs) if k})
    if len(kinds) > 1:
        raise ConfigError(f"one attach of '{method.name}' needs both {kinds[0]} and {kinds[1]} calibration; attach "
                          "the modules that need each separately")
    return kinds[0] if kinds else None


@torch.no_grad()
def init_adapters(model: nn.Module, name: str = "default", stats: dict | None = None) -> None:
    """Run each adapter's ``init_from`` on its fp32 base matrix; write back a returned base (PiSSA-like inits).

    A base the init replaces is pushed on the host's snapshot stack, so :func:`detach` restores it bit-exactly.
    """
    att = get_attachment(model, name)
    _check_not_merged(model, f"initialise adapter '{name}'")
    for m in att.all_members:
        h, a = m.host, m.adapter
        w = h.base_weight()
        if w.device.type == "meta":
            raise ConfigError(f"'{m.path}' still has meta weights: load the base weights before init_adapters()")
        if any(p.device.type == "meta" for p in a.parameters()):
            a.to_empty(device=w.device)
            a.reset_parameters()
        h.release_base(name)  # a second init starts again from the base it was given
        w = h._get_w()  # dense (dequantised for quantised storage)
        new = a.init_from(a.view.matrix(w).float(), (stats or {}).get(m.path))
        if new is not None:
            h.change_base(name, a.view.native(new).to(w.dtype))


def match_parameters(model: nn.Module, targets: Iterable[str]) -> list[tuple[str, str]]:
    """``target_parameters`` -> ``[(module path, parameter name)]`` as PEFT matches them: ``"<module>.<param>"``
    equal to a target or ending with ``"." + target``, the parameter held by the module itself (not a child), in
    ``named_modules`` order and, within a module, in parameter registration order. Raises if none match."""
    if isinstance(targets, str) or not all(isinstance(t, str) for t in targets):
        raise ConfigError(f"target_parameters must be a list of '<module>.<parameter>' names, got {targets!r}")
    names = sorted(set(targets))
    out: list[tuple[str, str]] = []
    for path, mod in model.named_modules():
        if isinstance(mod, (Adapted, Adapter, ModulesToSave)) or ".adapters." in f".{path}." \
                or ".copies." in f".{path}." or ".original_module" in path:
            continue
        clean = ".".join(s for s in path.split(".") if s != "base_layer")
        for pname, _ in mod.named_parameters(recurse=False):
            key = f"{clean}.{pname}" if clean else pname
            if key in names or any(key.endswith("." + t) for t in names):
                out.append((clean, pname))
    if not out:
        raise TargetError(f"target_parameters={list(targets)!r} matched no parameter of {type(model).__name__} "
                          "(give '<module path or suffix>.<parameter>', e.g. 'mlp.experts.gate_up_proj')")
    return out


def _build_param_members(model: nn.Module, att: Attachment, method: type, ptargets: list[tuple[str, str]]) -> None:
    """One host per targeted parameter, nested on its module as PEFT nests its ParamWrappers: the first parameter
    (registration order) innermost, so the file keys are PEFT's (``experts.base_layer.lora_A.weight`` for the inner
    one). Every adapter on a module's parameters must target the same set (PEFT's rule), so paths never shift."""
    by_mod: dict[str, list[str]] = {}
    for path, pname in ptargets:
        by_mod.setdefault(path, []).append(pname)
    for path, params in by_mod.items():
        mod = model.get_submodule(path)
        chain, m = [], mod
        while isinstance(m, Adapted):
            if m.param is None:
                raise TargetError(f"'{path}' is adapted as a layer; it cannot also take parameter targets "
                                  f"{params} (adapt the layer, or its parameters)")
            chain.append(m)
            m = m.base_layer
        owner = m
        if chain and {h.param for h in chain} != set(params):
            raise ConfigError(f"the parameters of '{path}' already adapted are {sorted(h.param for h in chain)}; "
                              f"every adapter on them must target the same set (as in PEFT), got {sorted(params)}")
        hosts_ = {h.param: h for h in chain}
        k = len(params)
        built: list[Member] = []
        inner: nn.Module = owner
        for i, pname in enumerate(params):  # innermost first
            host = hosts_.get(pname) or Adapted(inner, param=pname)
            inner = host
            view = ParamView(owner, pname)
            if view.kind not in method.layers:
                raise TargetError(f"method '{method.name}' cannot adapt parameter '{path}.{pname}'; methods that "
                                  "declare the 'param' layer kind can (LoRA)")
            key = f"{path}.{pname}" if path else pname
            mcfg = att.config.method_config(key, method)
            w = owner._parameters[pname]
            with torch.device(w.device):
                a = method(owner, mcfg, view)
            if w.device.type != "meta":
                a.reset_parameters()
            a.to(_adapter_dtype(att.config, w))
            built.append(Member(path + ".base_layer" * (k - 1 - i), host, a, param=key))
        att.members.extend(reversed(built))  # outermost first: installing it makes the inner paths resolvable


def _build_token_members(model: nn.Module, att: Attachment, paths: list[str]) -> None:
    """Trainable token rows (``trainable_token_indices``): one :class:`lorakit.tokens.TrainableTokens` per named
    embedding, plus one reading the same rows on every module that shares (ties) its weight Parameter."""
    from .tokens import TrainableTokens, resolve_token_targets

    spec = resolve_token_targets(model, att.config.trainable_token_indices)
    if not spec:
        return
    users: dict[int, list[str]] = {}
    for mp, m in model.named_modules():
        b = m.base_layer if isinstance(m, Adapted) else m
        if isinstance(m, (Adapter,)) or ".base_layer" in mp:
            continue
        w = b._parameters.get("weight") if isinstance(b, (nn.Embedding, nn.Linear)) else None
        if w is not None:
            users.setdefault(id(w), []).append(mp)
    for path, ids in spec.items():
        mod = model.get_submodule(path)
        base = mod.base_layer if isinstance(mod, Adapted) else mod
        if not isinstance(base, nn.Embedding):
            raise TargetError(f"trainable_token_indices names '{path}' ({type(base).__name__}); it trains rows of an "
                              "nn.Embedding (a head tied to it follows by itself)")
        tied = [p for p in users.get(id(base.weight), []) if p != path]
        for p in [path, *tied]:
            if p in paths:
                raise ConfigError(f"'{p}' is both a target of '{att.method.name}' and {'tied to ' if p != path else ''}"
                                  "the trainable-token embedding; one attach can do one of them: drop it from "
                                  "`targets` (or attach the tokens separately)")
            if any(m.path == p for m in att.token_members):
                raise ConfigError(f"trainable_token_indices names '{p}' twice")
        cfg = TrainableTokens.Config(indices=list(ids))
        src = None
        for p in [path, *tied]:
            mod = model.get_submodule(p)
            b = mod.base_layer if isinstance(mod, Adapted) else mod
            w = b.weight
            with torch.device(w.device):
                a = TrainableTokens(b, cfg, LayerView(b), source=src)
            if w.device.type != "meta":
                a.reset_parameters()
            a.to(_adapter_dtype(att.config, w))
            src = src or a
            att.token_members.append(Member(p, mod if isinstance(mod, Adapted) else Adapted(b), a))


def _check_not_shared(model: nn.Module, paths: list[str]) -> None:
    """A module object used at two paths (module-level sharing) cannot be adapted at one of them exactly: the host
    replaces one path, while a merge would change the other too. Refuse before anything changes."""
    where: dict[int, list[str]] = {}
    for p, m in model.named_modules(remove_duplicate=False):
        where.setdefault(id(m), []).append(p)
    for path in paths:
        mod = model.get_submodule(path)
        base = mod.base_layer if isinstance(mod, Adapted) else mod
        uses = [p for p in where.get(id(base), []) if p not in (path, f"{path}.base_layer")]
        if uses:
            raise TargetError(f"'{path}' ({type(base).__name__}) is the same module object as '{uses[0]}': an adapter "
                              "on one of them cannot be merged exactly. Exclude it, or give the model separate "
                              "modules that share (tie) the weight Parameter instead")


def _warn_tied_trainable(model: nn.Module, trainable) -> None:
    """A trainable copy of a module whose parameter another module shares (tied input embedding / output head)
    unties them: the copy trains, the other module keeps reading the frozen original. Say so once per module, naming
    the other user, since a run that trains ``embed_tokens`` on a tied model otherwise has a frozen head."""
    chosen = tuple(trainable)
    if not chosen:
        return
    users = _param_users(model)
    inside = lambda path, root: path == root or path.startswith(root + ".")  # noqa: E731
    for t in chosen:
        mod = model.get_submodule(t)
        if isinstance(mod, ModulesToSave):
            continue
        for pn, prm in mod.named_parameters(remove_duplicate=False):
            others = sorted({u for u, _ in users.get(id(prm), []) if not inside(u, t)
                             and not any(inside(u, c) for c in chosen)})
            if others:
                log.warning("trainable '%s': its %s is shared with %s (tied weights); the trainable copy unties "
                            "them, so %s keeps the frozen original. List %s in `trainable` too to train it (as its "
                            "own copy), or train '%s' through an adapter instead.", t, pn, others, others,
                            others[0], t)


def _param_users(model: nn.Module) -> dict[int, list[tuple[str, str]]]:
    """``id(Parameter)`` -> every (module path, parameter name) holding it, shared (tied) uses included."""
    users: dict[int, list[tuple[str, str]]] = {}
    for mp, m in model.named_modules(remove_duplicate=False):
        for pn, prm in m._parameters.items():
            if prm is not None:
                users.setdefault(id(prm), []).append((mp, pn))
    return users


def _find_ties(model: nn.Module) -> None:
    """Record on every host where else its base weight Parameter is used (tied input/output embeddings): merging
    and residual inits then write into a private copy (``core.untie``), so only the adapted module changes."""
    users = _param_users(model)
    for path, h in hosts(model):
        w = h.base_layer._parameters.get("weight")
        if h._untied is not None:
            w = h._untied[0]
        own = f"{path}.base_layer.weight"
        names = (f"{mp}.{pn}" if mp else pn for mp, pn in users.get(id(w), [])) if w is not None else ()
        h.tied_to = tuple(u for u in names if u != own)


# ----------------------------------------------------------------------------------------------------------------
def set_active(model: nn.Module, names: str | Iterable[str], *, trainable: bool = True) -> None:
    """Make exactly ``names`` active (their outputs add up, in order). Their parameters (and their
    ``trainable`` module copies and biases) require grad; everything else is frozen when ``trainable``."""
    names = (names,) if isinstance(names, str) else tuple(names)
    meta = _meta(model)
    unknown = [n for n in names if n not in meta["attachments"]]
    if unknown:
        raise ConfigError(f"no adapter named {unknown[0]!r}; attached: {sorted(meta['attachments'])}")
    _check_not_merged(model, "change the active adapters")
    for _, h in hosts(model):
        h.active = tuple(n for n in names if n in h.adapters)
    for m in model.modules():
        if isinstance(m, ModulesToSave):
            m.active = tuple(n for n in names if n in m.copies)
    meta["active"] = names
    if trainable:
        for p in model.parameters():
            p.requires_grad_(False)
        for _, h in hosts(model):
            for n in h.active:
                for p in h.adapters[n].parameters():
                    p.requires_grad_(True)
        for m in model.modules():
            if isinstance(m, ModulesToSave):
                for n in m.active:
                    m.copies[n].requires_grad_(True)
        for p, _ in meta["bias_stash"].values():
            p.requires_grad_(True)
        _freeze_frozen_buffers(model)


def _freeze_frozen_buffers(model: nn.Module) -> None:
    """Adapters may hold frozen parameters (shared random bases, frozen SVD factors): keep them frozen."""
    for _, a in adapters(model):
        for pname in getattr(a, "frozen", ()):
            a.get_parameter(pname).requires_grad_(False)


@contextlib.contextmanager
def disabled(model: nn.Module) -> Iterator[nn.Module]:
    """Run the base model alone inside the block (e.g. a DPO reference pass); restores the active set after."""
    saved = [(h, h.active) for _, h in hosts(model)]
    saved_m = [(m, m.active) for m in model.modules() if isinstance(m, ModulesToSave)]
    try:
        for h, _ in saved:
            h.active = ()
        for m, _ in saved_m:
            m.active = ()
        yield model
    finally:
        for h, act in saved:
            h.active = act
        for m, act in saved_m:
            m.active = act


@contextlib.contextmanager
def batch_context(model: nn.Module, **values: Any) -> Iterator[None]:
    """Per-batch values every adapter can read (``task_ids`` for multi-task methods, ...)."""
    meta = _meta(model)
    ctx: BatchContext = meta["ctx"]
    for n in active_names(model):  # each method checks the values it reads, once per batch (not per module)
        att = meta["attachments"].get(n)
        if att is not None:
            att.method.check_context(att.method_config(None), values)
    old = dict(ctx.values)
    ctx.values.update(values)
    try:
        yield
    finally:
        ctx.values = old


def detach(model: nn.Module, name: str | None = None) -> nn.Module:
    """Remove adapter ``name`` (all if None) and restore the base bit-exactly (weights replaced by a
    residual init, trainable copies and trained biases included). Once the last adapter is gone every parameter
    gets back the ``requires_grad`` flag it had before the first attach."""
    meta = _meta(model)
    names = list(meta["attachments"]) if name is None else [name]
    for n in names:
        if n not in meta["attachments"]:
            raise ConfigError(f"no adapter named {n!r}; attached: {sorted(meta['attachments'])}")
    for n in names:
        for handle in meta["attachments"][n].handles:
            handle.remove()
    for path, h in reversed(list(hosts(model))):  # nested (parameter) hosts: the inner one first
        h.unmerge()
        for n in names:
            if n in h.adapters:
                del h.adapters[n]
            h.release_base(n)
        h.active = tuple(a for a in h.active if a not in names)
        if not h.adapters:
            _set_module(model, path, h.base_layer)
    for path, m in list(model.named_modules()):
        if isinstance(m, ModulesToSave):
            for n in names:
                if n in m.copies:
                    del m.copies[n]
            m.active = tuple(a for a in m.active if a not in names)
            if not len(m.copies):
                _set_module(model, path, m.original_module)
    for n in names:
        del meta["attachments"][n]
    meta["active"] = tuple(a for a in meta.get("active", ()) if a not in names)
    if not meta["attachments"]:
        with torch.no_grad():
            for p, orig in meta["bias_stash"].values():
                p.copy_(orig)
        meta["bias_stash"].clear()
        _restore_grad_flags(model, meta["grad_flags"], default=True)
        meta["grad_flags"] = None
    return model


# ----------------------------------------------------------------------------------------------------------------
def summary(model: nn.Module) -> str:
    """A table of trainable parameters per adapted module and in total."""
    rows = []
    for path, h in hosts(model):
        for n, a in h.adapters.items():
            cnt = sum(p.numel() for p in a.parameters() if p.requires_grad)
            rows.append((path, n, a.name, f"{a.view.d_in}->{a.view.d_out}", cnt))
    for path, m in model.named_modules():
        if isinstance(m, ModulesToSave):
            for n, c in m.copies.items():
                rows.append((path, n, "trainable copy", "", sum(p.numel() for p in c.parameters() if p.requires_grad)))
    total = sum(p.numel() for p in model.parameters())
    train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    w = max([len(r[0]) for r in rows] + [6])
    lines = [f"{'module':<{w}}  {'adapter':<10} {'method':<14} {'shape':<14} {'trainable':>12}"]
    lines += [f"{r[0]:<{w}}  {r[1]:<10} {r[2]:<14} {r[3]:<14} {r[4]:>12,}" for r in rows]
    lines.append(f"trainable: {train:,} of {total:,} parameters ({100.0 * train / max(total, 1):.4f}%)")
    return "\n".join(lines)


def extra_loss(model: nn.Module) -> Tensor | None:
    """The sum over active attaches of each one's extra loss (regularisers, load balancing: ``method.attach_loss``,
    which reduces its modules' losses as the method declares), or None if there is none."""
    total = None
    for n in active_names(model):
        att = attachments(model).get(n)
        if att is None:
            continue
        loss = att.method.attach_loss(att)
        if loss is not None:
            total = loss if total is None else total + loss
    return total


def output_loss(model: nn.Module, outputs: Any, batch: Any) -> Tensor | None:
    """The sum of every active method's loss on the model outputs of this batch (``Adapter.output_loss``), or None.

    The trainer calls it after the forward pass: ``loss = task + extra_loss(model) + output_loss(model, out, batch)``.
    """
    total = None
    for n in active_names(model):
        att = attachments(model).get(n)
        if att is None:
            continue
        loss = att.method.output_loss(att, outputs, batch)
        if loss is not None:
            total = loss if total is None else total + loss
    return total


def needs_full_logits(model: nn.Module) -> bool:
    """Whether an active attach declares ``Adapter.full_logits`` (its loss or hooks read the output head at every
    position); tasks then compute the full logits instead of only the positions their loss reads."""
    for n in active_names(model):
        att = attachments(model).get(n)
        if att is None:
            continue
        m = att.method
        full = m.full_logits
        if full is None:
            full = getattr(m.output_loss, "__func__", None) is not Adapter.output_loss.__func__
        if full:
            return True
    return False


def adapter_stats(model: nn.Module) -> dict[str, float]:
    """Mean over modules of each statistic the active adapters report (router load, entropy, rank, ...)."""
    acc: dict[str, list[float]] = {}
    for _, h in hosts(model):
        for n in h.active:
            for k, v in h.adapters[n].stats().items():
                acc.setdefault(k, []).append(float(v))
    return {k: sum(v) / len(v) for k, v in acc.items()}


def controllers(model: nn.Module) -> list:
    """The Controllers the attached methods need during training (schedules run by themselves), one per attach,
    built once (the same objects on every call, so their state lives as long as the attach)."""
    return [c for c in (att.controller() for att in attachments(model).values()) if c is not None]


# ----------------------------------------------------------------------------------------------------------------
def calibrate(model: nn.Module, paths: list[str], batches: Iterable, kind: str,
              loss_fn: Callable | None = None, max_batches: int | None = None,
              train: bool | None = None) -> dict[str, dict[str, Tensor]]:
    """Statistics of the target modules over calibration batches (one shared path for every data-driven init).

    ``kind="activations"``: per module ``{"cov": XᵀX/n (d_in, d_in), "n": rows, "x_abs_mean": (d_in,),
    "x_mean": (d_in,)}``.
    ``kind="gradients"``: per module ``{"grad": mean ∂L/∂W (d_out, d_in), "grad_sq": mean (∂L/∂W)² over batches
    (an empirical Fisher diagonal), "n": batches}`` (fp32).
    ``train``: the mode the model runs in (dropout on or off). Default: train mode for gradients — the official
    LoRA-GA ``estimate_gradient`` (``peft/utils/lora_ga_utils/lora_ga_utils.py``), PEFT's
    ``lora.loraga.estimate_gradients`` and LoRA-SB's ``estimate_and_process_grads_torch`` all call
    ``model.train()`` before their backward passes — and eval mode for activations (no backward).
    The model's weights, modes and requires_grad flags are restored afterwards.
    """
    if kind not in ("activations", "gradients"):
        raise ConfigError(f"unknown calibration kind {kind!r}")
    if train is None:
        train = kind == "gradients"
    mods = {}
    for p in paths:
        m = model.get_submodule(p)
        mods[p] = m.base_layer if isinstance(m, Adapted) else m
    stats: dict[str, dict[str, Any]] = {p: {} for p in paths}
    modes = [(m, m.training) for m in model.modules()]  # restored module by module (mixed modes survive)
    model.train(train)
    handles = []
    flags = {id(p): p.requires_grad for p in model.parameters()}
    untied: list[tuple[nn.Module, nn.Parameter]] = []  # tied weights given a private copy while calibrating
    n_batches = 0
    try:
        if kind == "activations":
            def hook(path):
                view = LayerView(mods[path])

                def fn(_m, inp, _out):
                    x = view.input_features(inp[0].detach()).float()
                    s = stats[path]
                    s["cov"] = s.get("cov", 0) + x.t() @ x
                    s["x_abs_sum"] = s.get("x_abs_sum", 0) + x.abs().sum(0)
                    s["x_sum"] = s.get("x_sum", 0) + x.sum(0)
                    s["n"] = s.get("n", 0) + x.shape[0]
                return fn

            for p, m in mods.items():
                handles.append(m.register_forward_hook(hook(p)))
            with torch.no_grad():
                for b in batches:
                    _call(model, b)
                    n_batches += 1
                    if max_batches and n_batches >= max_batches:
                        break
            for s in stats.values():
                if not s:
                    continue
                s["cov"] = s["cov"] / max(s["n"], 1)
                s["x_abs_mean"] = s.pop("x_abs_sum") / max(s["n"], 1)
                s["x_mean"] = s.pop("x_sum") / max(s["n"], 1)
        else:
            for p, m in mods.items():
                if not isinstance(m.weight, nn.Parameter):
                    raise ConfigError(f"gradient calibration needs a float weight parameter at '{p}' "
                                      f"({type(m).__name__}); calibrate before quantising the base")
            for p in model.parameters():
                p.requires_grad_(False)
            uses: dict[int, int] = {}
            for _, prm in model.named_parameters(remove_duplicate=False):
                uses[id(prm)] = uses.get(id(prm), 0) + 1
            for m in mods.values():
                if uses.get(id(m.weight), 0) > 1:  # tied: the gradient of this module's use of the weight only
                    untied.append((m, m.weight))
                    m.weight = nn.Parameter(m.weight.detach().clone())
                m.weight.requires_grad_(True)
                m.weight.grad = None
            for b in batches:
                loss = loss_fn(model, b) if loss_fn else _call(model, b).loss
                if loss is None:
                    raise ConfigError("gradient calibration needs a loss: batches must carry labels or pass loss_fn")
                loss.backward()
                for p, m in mods.items():  # per-batch sums: mean gradient and mean squared gradient (Fisher diag)
                    g = m.weight.grad.float()
                    s = stats[p]
                    s["grad"] = s.get("grad", 0) + g
                    s["grad_sq"] = s.get("grad_sq", 0) + g * g
                    m.weight.grad = None
                n_batches += 1
                if max_batches and n_batches >= max_batches:
                    break
            for p, m in mods.items():
                v, s = LayerView(m), stats[p]
                if s:
                    stats[p] = {"grad": v.matrix(s["grad"]) / n_batches, "grad_sq": v.matrix(s["grad_sq"]) / n_batches,
                                "n": n_batches}
    finally:
        for m, shared in untied:
            m.weight = shared
        for h in handles:
            h.remove()
        for p in model.parameters():
            p.requires_grad_(flags.get(id(p), False))
        for m, mode in modes:
            m.training = mode
    if n_batches == 0:
        raise ConfigError("calibration got no batches (the calibration set is empty)")
    return stats


def _call(model: nn.Module, batch: Any) -> Any:
    if isinstance(batch, dict):
        return model(**batch)
    if isinstance(batch, (list, tuple)):
        return model(*batch)
    return model(batch)
