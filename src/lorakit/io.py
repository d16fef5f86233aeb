"""Adapter files in PEFT's format: ``adapter_config.json`` + ``adapter_model.safetensors``.

Tensor keys are ``base_model.model.<module path>.<param>`` with the adapter name removed, exactly as PEFT writes
them, so a LoRA/DoRA/... trained here loads in PEFT, vLLM and the rest of the ecosystem, and PEFT adapters load
here. Methods PEFT lacks are written with ``"peft_type": "LORAKIT"`` and are never labelled a PEFT type they are
not; every file carries a ``"lorakit"`` block (method, full config, version) that makes the round trip exact.

Loading validates everything (config, keys, shapes) and rolls back on any error, so a bad file leaves the model
as it was. Nothing is ever unpickled: a ``.bin`` adapter is refused with the conversion to use.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from . import quant
from .config import AttachConfig, to_dict
from .core import REGISTRY, Adapted, Adapter, ModulesToSave, get_method
from .errors import AdapterFileError, ConfigError, LorakitError
from .attachments import Attachment, get_attachment
from .formats.peft import CONFIG_NAME, PREFIX, WEIGHTS_NAME, read_adapter_config, write_adapter_dir
from .formats.peft import atomic_dir_write as _atomic_dir_write, read_tensors as _read_tensors  # noqa: F401
from .formats.peft_lora import PeftLoraConfig, pattern_overrides
from .inject import _meta, attach, attached, detach, hosts

log = logging.getLogger(__name__)

__all__ = ["save_adapter", "load_adapter", "read_adapter_config", "adapter_state", "CONFIG_NAME", "WEIGHTS_NAME"]

FORMAT_VERSION = 1

# PEFT LoraConfig options that change the computed function and that lorakit does not implement: loading a file
# that sets one of them to a non-default value is refused rather than silently computing something else.
_UNSUPPORTED_PEFT = {
    "use_qalora": False, "layer_replication": None, "alora_invocation_tokens": None,
    "use_bdlora": None, "arrow_config": None, "lora_bias": False, "megatron_config": None,
}  # fan_in_fan_out is not here: lorakit reads the layout from the layer type (transformers Conv1D)


def _version() -> str:
    from . import __version__

    return __version__


def _base_name(model: nn.Module) -> str | None:
    return getattr(model, "name_or_path", None) or getattr(getattr(model, "config", None), "_name_or_path", None)


# ----------------------------------------------------------------------------------------------------------------
def adapter_state(model: nn.Module, name: str = "default") -> dict[str, Tensor]:
    """The tensors of adapter ``name`` under PEFT's file keys."""
    att = get_attachment(model, name)
    out: dict[str, Tensor] = {}
    for m in att.all_members:
        a = m.adapter
        for k, v in a.to_file(a.state_dict()).items():
            out[f"{PREFIX}{m.path}.{k}"] = v
    for path, m in model.named_modules():
        if isinstance(m, ModulesToSave) and name in m.copies:
            for k, v in m.copies[name].state_dict().items():
                out[f"{PREFIX}{path}.{k}"] = v
    pid = {id(p): n for n, p in model.named_parameters()}
    for p, _ in _meta(model)["bias_stash"].values():
        n = pid.get(id(p))
        if n is not None:
            out[PREFIX + n] = p
    if att.members:
        out.update(att.method.shared_to_file(att))
    return {k: v.detach().contiguous().cpu() for k, v in out.items()}


def _peft_config(model: nn.Module, name: str, cfg: AttachConfig, paths: list[str],
                 att: Attachment | None = None) -> dict[str, Any]:
    method = get_method(cfg.method)
    spec = method.peft
    block = {"method": method.name, "version": _version(), "format": FORMAT_VERSION, "config": cfg.to_dict(),
             "paths": paths}
    if att is not None and att.param_targets:
        block["params"] = att.param_targets
    base = {"base_model_name_or_path": _base_name(model), "task_type": None, "inference_mode": True,
            "lorakit": block, "modules_to_save": cfg.trainable or None, "bias": cfg.bias}
    if cfg.trainable_token_indices:  # PEFT's key (read by every PEFT tuner that supports trainable tokens)
        base["trainable_token_indices"] = cfg.trainable_token_indices
    representable = spec is not None
    if spec is not None:
        # per-module values become PEFT's rank_pattern / alpha_pattern (full paths, exact); other overridden
        # options have no PEFT encoding, and then the file is written as lorakit-only.
        default = cfg.method_config(None, method)
        rank_pattern, alpha_pattern = {}, {}
        for p in paths:
            c = cfg.method_config(p, method)
            for f in default.__dataclass_fields__:
                if getattr(c, f) == getattr(default, f):
                    continue
                key = spec.fields.get(f)
                if key == "r":
                    rank_pattern[p] = getattr(c, f)
                elif key == "lora_alpha":
                    alpha_pattern[p] = getattr(c, f)
                elif f not in method.file_fields:  # file_fields: per-module state the file_config hook encodes
                    representable = False
        if representable:
            d = dict(base)
            d["peft_type"] = spec.peft_type
            for f, key in spec.fields.items():
                d[key] = to_dict(getattr(default, f))
            d.update(spec.fixed)
            d.update(target_modules=sorted(paths), exclude_modules=None, layers_to_transform=None,
                     target_parameters=sorted(att.param_targets) if att is not None and att.param_targets else None,
                     layers_pattern=None, rank_pattern=rank_pattern, alpha_pattern=alpha_pattern,
                     peft_version=None, revision=None, auto_mapping=None)
            if spec.peft_type == "LORA":  # the LoRA schema is validated and serialised by its one writer
                d = PeftLoraConfig.from_dict(d).to_dict()
            return method.file_config(att, d) if att is not None else d
        log.warning("'%s' uses per-module options PEFT cannot encode; writing a lorakit-only adapter file", name)
    d = dict(base)
    d["peft_type"] = "LORAKIT"
    d["target_modules"] = sorted(paths)
    return method.file_config(att, d) if att is not None else d


def save_adapter(model: nn.Module, directory: str | os.PathLike, name: str = "default", *,
                 as_lora: bool = False) -> Path:
    """Write adapter ``name`` as ``adapter_config.json`` + ``adapter_model.safetensors`` in PEFT's format.

    ``as_lora=True`` (residual-init methods such as PiSSA): write a plain LoRA of rank 2r that applies to the
    *original* base model, ``ΔW = [B | −B₀][A; A₀]`` (PEFT's ``path_initial_model_for_weight_conversion``).
    Files are written to temporaries and renamed, so an interrupted save never leaves a half-written adapter.
    """
    att = get_attachment(model, name)
    cfg, paths = att.config, att.paths
    directory = Path(directory)
    if as_lora:
        from .convert import residual_to_lora

        state, conf = residual_to_lora(model, name)
        conf["base_model_name_or_path"] = _base_name(model)
    else:
        state = adapter_state(model, name)
        conf = _peft_config(model, name, cfg, paths, att)
    write_adapter_dir(directory, conf, state)
    return directory


# ----------------------------------------------------------------------------------------------------------------
def _config_from_peft(model: nn.Module, conf: dict) -> AttachConfig:
    """Map a PEFT adapter_config.json onto a lorakit AttachConfig."""
    import importlib

    importlib.import_module("lorakit.methods")

    ptype = conf["peft_type"]
    cands = [m for m in REGISTRY.values() if m.peft is not None and m.peft.peft_type == ptype]
    if not cands:
        supported = sorted({m.peft.peft_type for m in REGISTRY.values() if m.peft})
        raise AdapterFileError(f"PEFT adapter type '{ptype}' is not supported by lorakit; supported PEFT types: "
                               f"{', '.join(supported)}")

    def matches(m) -> int:
        for k, v in m.peft.load_match.items():
            got = conf.get(k)
            if callable(v) and not v(got):
                return -1
            if not callable(v) and got != v:
                return -1
        return len(m.peft.load_match)

    scored = sorted(((matches(m), m) for m in cands), key=lambda t: -t[0])
    if scored[0][0] < 0:
        raise AdapterFileError(f"this {ptype} adapter uses options lorakit does not support "
                               f"({ {k: conf.get(k) for m in cands for k in m.peft.load_match} })")
    method = scored[0][1]
    if ptype == "LORA":
        for k, default in _UNSUPPORTED_PEFT.items():
            if conf.get(k, default) not in (default, [], {}, None if default is None else default):
                raise AdapterFileError(f"PEFT option {k}={conf.get(k)!r} is not supported by lorakit")
    opts: dict[str, Any] = {}
    for f, key in method.peft.fields.items():
        if key in conf and conf[key] is not None:
            opts[f] = conf[key]
        elif key in method.peft.defaults:
            opts[f] = method.peft.defaults[key]
    rev = {v: k for k, v in method.peft.fields.items()}
    # rank_pattern / alpha_pattern: resolved per module exactly as PEFT does (lorakit.formats.peft_lora)
    overrides = pattern_overrides(conf, rev.get("r"), rev.get("lora_alpha"))
    from .targets import resolve_trainable

    trainable = resolve_trainable(model, conf.get("modules_to_save") or [], strict=False)
    targets = conf.get("target_modules")
    if isinstance(targets, list):
        targets = list(targets)
    layers = conf.get("layers_to_transform")
    if isinstance(layers, int):
        layers = [layers]
    return AttachConfig.make(method.from_peft_config(conf, {"method": method.name, "targets": targets, "exclude": conf.get("exclude_modules"),
                              "layers": layers, "layers_pattern": conf.get("layers_pattern"),
                              "overrides": overrides, "trainable": sorted(set(trainable)),
                              "trainable_token_indices": conf.get("trainable_token_indices") or None,
                              "target_parameters": conf.get("target_parameters") or None,
                              "bias": conf.get("bias") or "none", **opts}))


def config_of_file(model: nn.Module, conf: dict, where: str | os.PathLike) -> AttachConfig:
    """The AttachConfig an adapter config describes for ``model``: a lorakit file's own block (exact module list,
    parameter targets), else the mapping of a PEFT config. Any problem is an :class:`AdapterFileError` naming the
    file and what is wrong (never a raw KeyError/TypeError). The one reader for load_adapter, the server's bank and
    hot-swapping."""
    block = conf.get("lorakit")
    try:
        if isinstance(block, dict) and "config" in block:
            c = dict(block["config"])
            if "paths" in block:  # exact module list of the saved adapter
                c["targets"], c["exclude"], c["layers"] = list(block["paths"]), None, None
                if "params" in block:
                    c["target_parameters"] = list(block["params"])
            return AttachConfig.make(c)
        if conf["peft_type"] == "LORAKIT":
            raise AdapterFileError(f"{where}: peft_type LORAKIT but no 'lorakit' block")
        return _config_from_peft(model, conf)
    except AdapterFileError:
        raise
    except LorakitError as e:
        raise AdapterFileError(f"{where}/{CONFIG_NAME}: {e}") from None
    except KeyError as e:
        raise AdapterFileError(f"{where}/{CONFIG_NAME}: missing key {e}") from None
    except (TypeError, ValueError, AttributeError):
        log.warning("%s/%s: unexpected value", where, CONFIG_NAME, exc_info=True)
        raise AdapterFileError(f"{where}/{CONFIG_NAME}: a value has the wrong type or form (for example a number "
                               "where a list or mapping is expected)") from None


def load_adapter(model: nn.Module, directory: str | os.PathLike, name: str = "default", *,
                 trainable: bool = False) -> nn.Module:
    """Load an adapter directory (written by lorakit or by PEFT) onto ``model`` as adapter ``name``.

    Everything is validated (config, method, module paths, tensor names and shapes); on any error the model is
    left exactly as it was. The loaded adapter becomes the active one (frozen unless ``trainable``).
    """
    directory = Path(directory)
    conf = read_adapter_config(directory)
    tensors = _read_tensors(directory)
    cfg = config_of_file(model, conf, directory)
    want_base, have_base = conf.get("base_model_name_or_path"), _base_name(model)
    if want_base and have_base and Path(str(want_base)).name != Path(str(have_base)).name:
        log.warning("adapter was trained on %r, loading onto %r", want_base, have_base)

    try:
        attach(model, cfg, name, defer_init=True)
    except LorakitError as e:
        raise AdapterFileError(f"{directory}: cannot attach this adapter to {type(model).__name__}: {e}") from None
    try:
        _load_into(model, name, tensors)
    except BaseException:
        detach(model, name)
        raise
    from .inject import set_active

    set_active(model, name, trainable=trainable)
    if not trainable:
        for p in model.parameters():
            p.requires_grad_(False)
    return model


def _check_saved_base_weights(att: Attachment, tensors: dict[str, Tensor], unexpected: list[str]) -> list[str]:
    """PEFT writes the full base weight of an adapted embedding layer (``save_embedding_layers="auto"`` when
    ``target_modules`` names ``embed_tokens``/``lm_head``, for resized vocabularies). Accept it when it is this
    model's weight (the file then adds nothing); refuse a different one, which means another base. Returns the
    unexpected keys left."""
    left = set(unexpected)
    for m in att.members:
        path, h = m.path, m.host
        for k in (f"{PREFIX}{path}.base_layer.weight", f"{PREFIX}{path}.weight"):
            if k not in left:
                continue
            t, w = tensors[k], h.base_layer.weight
            same = tuple(t.shape) == tuple(w.shape) and (torch.equal(t.to(w.dtype), w) or torch.equal(t, w.to(t.dtype)))
            if not same:
                raise AdapterFileError(f"tensor '{k}' is a full base weight of '{path}' (PEFT saves the embedding "
                                       f"layers it adapts) of shape {tuple(t.shape)} that differs from this model's "
                                       f"{tuple(w.shape)} weight: the adapter was trained on another base (or a "
                                       "resized vocabulary); load it onto that base")
            left.discard(k)
    return sorted(left)


@torch.no_grad()
def _load_into(model: nn.Module, name: str, tensors: dict[str, Tensor]) -> None:
    att = get_attachment(model, name)
    for m in att.all_members:  # methods whose sizes come from the file (sparse supports) adopt them first
        pre = f"{PREFIX}{m.path}."
        m.adapter.fit_file({k[len(pre):]: v for k, v in tensors.items() if k.startswith(pre)}, m.path)
    expected: dict[str, tuple[nn.Module, str, Any]] = {}
    for m in att.all_members:
        a = m.adapter
        for fk, v in a.to_file(dict(a.state_dict())).items():
            expected[f"{PREFIX}{m.path}.{fk}"] = (a, fk, v)
    for path, mod in model.named_modules():
        if isinstance(mod, ModulesToSave) and name in mod.copies:
            for k, v in mod.copies[name].state_dict().items():
                expected[f"{PREFIX}{path}.{k}"] = (mod.copies[name], k, v)
    pid = {id(p): n for n, p in model.named_parameters()}
    for p, _ in _meta(model)["bias_stash"].values():
        n = pid.get(id(p))
        if n is not None:
            expected[PREFIX + n] = (None, n, p)
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if unexpected:
        unexpected = _check_saved_base_weights(att, tensors, unexpected)
    if att.members and unexpected:  # model-level tensors (shared bases) belong to the method
        used = att.method.shared_from_file(att, {k: tensors[k] for k in unexpected})
        unexpected = [k for k in unexpected if k not in used]
    bad_prefix = [k for k in unexpected if not k.startswith(PREFIX)]
    if bad_prefix:
        raise AdapterFileError(f"unexpected tensor key '{bad_prefix[0]}' (expected the '{PREFIX}' prefix)")
    if missing:
        raise AdapterFileError(f"adapter file is missing {len(missing)} tensors, e.g. {missing[:3]}")
    if unexpected:
        raise AdapterFileError(f"adapter file has {len(unexpected)} tensors this model's adapter does not have, "
                               f"e.g. {unexpected[:3]} (an adapter for another base model?)")
    for k, (_, _, v) in expected.items():
        if tuple(tensors[k].shape) != tuple(v.shape):
            raise AdapterFileError(f"tensor '{k}' has shape {tuple(tensors[k].shape)}, expected {tuple(v.shape)} "
                                   "(wrong rank, or an adapter for another base model?)")
    # residual inits: rebuild the base the adapter was trained against (pushed on the host's snapshot stack)
    for m in att.all_members:
        h, a = m.host, m.adapter
        w = h._get_w()  # dense (dequantised for quantised storage)
        if any(p.device.type == "meta" for p in a.parameters()):
            a.to_empty(device=w.device)
        file_part = {fk: tensors[f"{PREFIX}{m.path}.{fk}"] for fk in a.to_file(a.state_dict())}
        own = a.from_file(file_part)
        new = a.on_load(a.view.matrix(w).float(), own)
        if new is not None:
            h.change_base(name, a.view.native(new).to(w.dtype))
        sd = {k: v.to(a.state_dict()[k].dtype) for k, v in own.items()}
        a.load_state_dict(sd, strict=True)
        a.clear_cache()
    for k, (mod, _key, v) in expected.items():
        if not isinstance(mod, Adapter):  # trainable module copies and biases (state tensors share storage)
            v.copy_(tensors[k].to(v.dtype))
