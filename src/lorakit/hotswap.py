"""Swapping one attached LoRA's weights for another saved LoRA's, in place, without recompiling a compiled model.

A compiled graph (``torch.compile``) is specialised on what the forward reads: tensor *shapes* and Python
*constants*. A LoRA's forward reads the shapes of its factors (its rank) and its scale ``alpha/r`` (a Python float
attribute), so loading another adapter of another rank or alpha the ordinary way (detach + load) makes dynamo trace
and compile again. :func:`prepare_for_hotswap` removes both dependencies once, before compiling:

* every factor is zero-padded to ``max_rank`` (``A``: zero rows, ``B``: zero columns), which adds exactly nothing
  to the output (``B A`` is unchanged);
* the scale becomes a 0-dim tensor (a non-persistent buffer, so it never reaches a file), read by the forward as a
  tensor, so its value is data, not a constant of the graph.

:func:`hotswap` then copies the new adapter into the same tensors (``copy_``; the rest of the padding set to zero)
and fills the scale tensor: same shapes, same storage, no Python constant changed, hence no recompilation. It swaps
an adapter of the same or smaller rank per module; a module the new file does not adapt gets zero factors. The
adapter keeps its name, and its configuration becomes the new file's (``save_adapter`` writes the swapped-in
adapter at its own ranks).

Everything is validated before the first tensor is written (same method family and ``lora_bias``, no module the
attachment does not hold, ranks within the prepared capacity, matching feature sizes): an incompatible adapter
raises a :class:`~lorakit.errors.ConfigError` and changes nothing. Only plain low-rank adapters (methods declared
``fast_serve="lowrank"``: LoRA and rsLoRA) can be swapped: their whole state is ``A``, ``B`` and the scale.
Dropout is a training-time module and is not swapped.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import re
from pathlib import Path

import torch
from torch import Tensor, nn

from .attachments import attachments, get_attachment
from .config import AttachConfig
from .core import Adapter, get_method, scale_of
from .errors import AdapterFileError, ConfigError, LorakitError
from .formats.peft import PREFIX, read_adapter_config

log = logging.getLogger(__name__)

__all__ = ["prepare_for_hotswap", "hotswap"]


def _unwrap(model: nn.Module) -> nn.Module:
    """The model itself, also when given the ``torch.compile`` wrapper (its ``_orig_mod``)."""
    return getattr(model, "_orig_mod", model)


def _check_swappable(att) -> None:
    if att.method.fast_serve != "lowrank":
        raise ConfigError(f"adapter '{att.name}' uses method '{att.method.name}', which cannot be hot-swapped: only "
                          "plain low-rank adapters (LoRA, rsLoRA: A, B and a scale) can be")
    merged = [m.path for m in att.members if att.name in m.host.merged_names]
    if merged:
        raise ConfigError(f"adapter '{att.name}' is merged into the base (e.g. at '{merged[0]}'): unmerge it "
                          "before preparing or swapping")


def _rank_dims(a: Adapter) -> tuple[int, int]:
    return a.lora_A.weight.shape[0], a.lora_B.weight.shape[1]


@torch.no_grad()
def _pad(param: nn.Parameter, dim: int, size: int) -> nn.Parameter:
    extra = size - param.shape[dim]
    if extra == 0:
        return param
    shape = list(param.shape)
    shape[dim] = extra
    data = torch.cat([param.data, param.new_zeros(shape)], dim)
    return nn.Parameter(data, requires_grad=param.requires_grad)


def prepare_for_hotswap(model: nn.Module, max_rank: int, name: str | None = None) -> nn.Module:
    """Make adapter ``name`` (every attached adapter if None) hot-swappable up to rank ``max_rank`` without
    recompiling: zero-pad its factors to ``max_rank`` and make its scales tensors (see the module docstring).

    Call it *before* ``torch.compile`` and before building an optimiser (the padded factors are new Parameters).
    The output is unchanged. Raises :class:`ConfigError` for a non-low-rank method, a merged adapter, or a
    ``max_rank`` below a current rank."""
    model = _unwrap(model)
    if not isinstance(max_rank, int) or isinstance(max_rank, bool) or max_rank < 1:
        raise ConfigError(f"max_rank must be a positive integer, got {max_rank!r}")
    atts = list(attachments(model).values()) if name is None else [get_attachment(model, name)]
    if not atts:
        raise ConfigError("no adapter is attached: attach or load one before prepare_for_hotswap")
    for att in atts:
        _check_swappable(att)
        for m in att.members:
            r = max(_rank_dims(m.adapter))
            if r > max_rank:
                raise ConfigError(f"adapter '{att.name}' has rank {r} at '{m.path}', above max_rank={max_rank}")
    for att in atts:
        for m in att.members:
            a = m.adapter
            a.lora_A.weight = _pad(a.lora_A.weight, 0, max_rank)
            a.lora_B.weight = _pad(a.lora_B.weight, 1, max_rank)
            a.padded_rank = True  # LoRA.to_file / lowrank use the adapter's own rank cfg.r, not the padded one
            if not isinstance(a.scale, Tensor):
                s = float(a.scale)
                del a.scale
                a.register_buffer("scale", torch.tensor(s, dtype=torch.float32, device=a.lora_A.weight.device),
                                  persistent=False)
    log.info("prepared %s for hot-swapping up to rank %d", [a.name for a in atts], max_rank)
    return model


def _file_config(model: nn.Module, directory: Path, conf: dict) -> AttachConfig:
    from .io import config_of_file

    return config_of_file(model, conf, directory)


@torch.no_grad()
def hotswap(model: nn.Module, directory: str | os.PathLike, name: str = "default") -> nn.Module:
    """Replace the weights of attached adapter ``name`` by those of the adapter saved in ``directory`` (same or
    smaller rank per module, modules the attachment holds), in place: a model compiled after
    :func:`prepare_for_hotswap` runs the new adapter without recompiling. Validates everything first; an
    incompatible adapter raises :class:`ConfigError` (a malformed directory :class:`AdapterFileError`) and changes
    nothing."""
    from .io import _read_tensors

    model = _unwrap(model)
    att = get_attachment(model, name)
    _check_swappable(att)
    directory = Path(directory)
    conf = read_adapter_config(directory)
    tensors = _read_tensors(directory)
    new_cfg = _file_config(model, directory, conf)
    try:
        method = get_method(new_cfg.method)
    except LorakitError as e:
        raise ConfigError(f"{directory}: {e}") from None
    if method.fast_serve != "lowrank":
        raise ConfigError(f"{directory} holds a '{method.name}' adapter; only plain low-rank adapters (LoRA, "
                          f"rsLoRA) can be hot-swapped into '{name}' ({att.method.name})")
    if new_cfg.trainable or new_cfg.bias != "none":
        raise ConfigError(f"{directory} also trains whole modules or base biases (modules_to_save={new_cfg.trainable},"
                          f" bias={new_cfg.bias!r}); hot-swapping replaces LoRA factors only")

    # 1) validate: which members the file adapts, their configs, shapes and ranks
    plan: list[tuple] = []  # (member, cfg, {own key: tensor} | None)
    claimed: set[str] = set()
    for m in att.members:
        a = m.adapter
        keys = {fk: f"{PREFIX}{m.path}.{fk}" for fk in a.to_file(dict(a.state_dict()))}
        present = [k for k in keys.values() if k in tensors]
        cfg = new_cfg.method_config(m.path, method)
        if cfg.lora_bias != a.cfg.lora_bias:
            raise ConfigError(f"{directory}: lora_bias={cfg.lora_bias} but adapter '{name}' has lora_bias="
                              f"{a.cfg.lora_bias}; a hot swap cannot add or remove the bias term")
        if not present:  # the new adapter leaves this module alone: zero factors, at a rank the tensors hold
            plan.append((m, dataclasses.replace(cfg, r=min(cfg.r, a.lora_A.weight.shape[0])), None))
            continue
        if len(present) != len(keys):
            missing = sorted(set(keys.values()) - set(present))
            raise ConfigError(f"{directory}: module '{m.path}' lacks {missing[:2]}")
        claimed.update(present)
        own = a.from_file({fk: tensors[k] for fk, k in keys.items()})
        A, B = own["lora_A.weight"], own["lora_B.weight"]
        capA, capB = a.lora_A.weight, a.lora_B.weight
        r = A.shape[0]
        if r != cfg.r or B.shape[1] != r:
            raise ConfigError(f"{directory}: '{m.path}' has factors of rank {r}/{B.shape[1]} but its config says "
                              f"r={cfg.r}")
        if r > capA.shape[0]:
            raise ConfigError(f"{directory}: '{m.path}' has rank {r}, above the {capA.shape[0]} adapter '{name}' "
                              f"holds; call lorakit.prepare_for_hotswap(model, max_rank={r}) before compiling")
        if A.shape[1:] != capA.shape[1:] or B.shape[0] != capB.shape[0] or B.shape[2:] != capB.shape[2:]:
            raise ConfigError(f"{directory}: '{m.path}' factors A {tuple(A.shape)}, B {tuple(B.shape)} do not fit "
                              f"this layer (A {tuple(capA.shape)}, B {tuple(capB.shape)}): an adapter for another "
                              "model?")
        plan.append((m, cfg, own))
    other = sorted(k for k in tensors if k not in claimed)
    if other:
        raise ConfigError(f"{directory} adapts modules adapter '{name}' does not hold (e.g. {other[:3]}); a hot swap "
                          "cannot add modules (attach the new targets before compiling, or load it normally)")
    if not claimed:
        raise ConfigError(f"{directory} has no tensor for any module of adapter '{name}'")

    # 2) swap in place: same tensors, same shapes; the scale is a tensor after prepare_for_hotswap
    for m, cfg, own in plan:
        a = m.adapter
        wa, wb = a.lora_A.weight, a.lora_B.weight
        wa.zero_()
        wb.zero_()
        if own is not None:
            r = own["lora_A.weight"].shape[0]
            wa[:r].copy_(own["lora_A.weight"].to(wa.dtype))
            wb[:, :r].copy_(own["lora_B.weight"].to(wb.dtype))
            if cfg.lora_bias:
                a.lora_B.bias.copy_(own["lora_B.bias"].to(a.lora_B.bias.dtype))
        elif cfg.lora_bias:
            a.lora_B.bias.zero_()
        s = scale_of(cfg.alpha, cfg.r, cfg.rslora)
        if isinstance(a.scale, Tensor):
            a.scale.fill_(s)
        else:
            a.scale = s  # not prepared: works, but a compiled model recompiles for a new Python constant
        a.padded_rank = True
        for f in ("r", "alpha", "rslora"):  # the adapter now describes the swapped-in one (in place: the compiled
            setattr(a.cfg, f, getattr(cfg, f))  # forward reads none of these, and the config object stays the same)
        a.clear_cache()
    # the attachment now describes the swapped-in adapter (save_adapter writes it at its own ranks and alphas)
    cfg = AttachConfig.make({**new_cfg.to_dict(), "targets": list(att.paths), "exclude": None, "layers": None,
                             "layers_pattern": None})
    cfg.overrides = {re.escape(m.path): {"r": c.r, "alpha": c.alpha} for m, c, _ in plan}
    att.config = cfg
    log.info("hot-swapped adapter '%s' with %s (%d of %d modules adapted)", name, directory,
             sum(o is not None for _, _, o in plan), len(plan))
    return model

