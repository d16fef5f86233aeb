"""Config is data: dataclasses <-> dicts <-> YAML <-> ``key=value`` overrides.

Unknown keys and wrong types fail loudly with the valid keys listed (:class:`ConfigError`).
"""
from __future__ import annotations

import dataclasses
import difflib
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .errors import ConfigError

__all__ = ["AttachConfig", "from_dict", "to_dict", "load_yaml", "apply_overrides", "parse_value", "check_type"]


_ALIASES = {"rank": "r", "lora_r": "r", "lora_alpha": "alpha", "lora_dropout": "dropout", "use_rslora": "rslora",
            "target_modules": "targets", "modules_to_save": "trainable", "exclude_modules": "exclude",
            "layers_to_transform": "layers", "learning_rate": "lr"}


def _suggest(key: str, valid: list[str]) -> str:
    if _ALIASES.get(key) in valid:
        return f" (did you mean '{_ALIASES[key]}'?)"
    close = difflib.get_close_matches(key, valid, n=1)
    return f" (did you mean '{close[0]}'?)" if close else ""


def check_type(value: Any, tp: Any, where: str) -> Any:
    """Check (and gently coerce int->float) ``value`` against a type annotation."""
    origin = typing.get_origin(tp)
    if tp is Any or tp is typing.Any:
        return value
    if origin in (typing.Union, types.UnionType):
        errors = []
        for t in typing.get_args(tp):
            try:
                return check_type(value, t, where)
            except ConfigError as e:
                if t is not type(None):
                    errors.append(str(e))
        if value is not None and len(errors) == 1:  # `X | None` given a wrong X: say what is wrong with it
            raise ConfigError(errors[0])
        raise ConfigError(f"{where}: {value!r} is not of type {tp}")
    if tp is type(None):
        if value is None:
            return None
        raise ConfigError(f"{where}: expected null, got {value!r}")
    if origin is typing.Literal:
        if value in typing.get_args(tp):
            return value
        raise ConfigError(f"{where}: {value!r} is not one of {list(typing.get_args(tp))}")
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        args = typing.get_args(tp)
        if args and args[-1] is not Ellipsis and origin is list:
            return [check_type(v, args[0], f"{where}[{i}]") for i, v in enumerate(value)]
        return list(value) if origin is list else tuple(value)
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return value
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, where) if isinstance(value, dict) else value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true/false, got {value!r}")
        return value
    if tp is str:
        if isinstance(value, bool):
            raise ConfigError(f"{where}: expected a string, got the boolean {value!r} (YAML reads true/false as "
                              f"booleans: quote it, '{str(value).lower()}')")
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return value
    return value


def _hints(cls: type) -> dict[str, Any]:
    try:
        return typing.get_type_hints(cls)
    except Exception:  # pragma: no cover - forward refs we cannot resolve
        return {f.name: Any for f in dataclasses.fields(cls)}


def from_dict(cls: type, data: dict | None, where: str = "", options: bool = False) -> Any:
    """Build dataclass ``cls`` from ``data``; unknown keys and wrong types are errors naming the valid keys.

    Then every float must be finite, ``options=True`` (a method's Config) adds :func:`check_options`, and the
    class's own ``validate()`` runs last."""
    data = dict(data or {})
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    hints = _hints(cls)
    unknown = [k for k in data if k not in fields]
    if unknown:
        valid = sorted(fields)
        k = unknown[0]
        raise ConfigError(f"unknown key '{(where + '.') if where else ''}{k}'{_suggest(k, valid)}; "
                          f"valid keys: {', '.join(valid)}")
    kwargs = {k: check_type(v, hints.get(k, Any), f"{where}.{k}" if where else k) for k, v in data.items()}
    try:
        obj = cls(**kwargs)
    except ConfigError:
        raise
    except (ValueError, TypeError) as e:  # a dataclass's own __post_init__ refusing a value
        raise ConfigError(f"{where or cls.__name__}: {e}") from None
    check_finite(obj, where)
    if options:
        check_options(obj, where)
    validate = getattr(obj, "validate", None)
    if callable(validate):  # a Config's declared checks (ranges, relations between options)
        validate()
    return obj


def _name(where: str, key: str) -> str:
    return f"{where}.{key}" if where else key


def check_finite(obj: Any, where: str = "") -> None:
    """Every float field (and float list entry) of dataclass ``obj`` is finite: NaN and ±inf are refused."""
    import math

    for f in dataclasses.fields(obj):
        v = getattr(obj, f.name, None)
        vals = v if isinstance(v, (list, tuple)) else [v]
        for x in vals:
            if isinstance(x, float) and not math.isfinite(x):
                raise ConfigError(f"{_name(where, f.name)}={x} must be a finite number")


def check_options(obj: Any, where: str = "") -> None:
    """The generic range checks every method ``Config`` gets (declared by the class, never by method name):

    * integer options are >= 0 (seeds excepted), and the ones the class lists in ``positive`` (a ClassVar;
      default ``("r",)``) are >= 1;
    * an option whose name contains ``dropout`` lies in [0, 1);
    * float options are finite (:func:`check_finite`, already run by :func:`from_dict`).

    Method-specific relations live in the Config's own ``validate()``, which :func:`from_dict` calls."""
    positive = getattr(type(obj), "positive", ("r",))
    for f in dataclasses.fields(obj):
        if not f.init:
            continue
        v = getattr(obj, f.name)
        key = _name(where, f.name)
        if isinstance(v, bool) or v is None:
            continue
        if isinstance(v, int):
            lo = 1 if f.name in positive else (None if "seed" in f.name else 0)
            if lo is not None and v < lo:
                raise ConfigError(f"{key}={v} must be >= {lo}")
        if isinstance(v, (int, float)) and "dropout" in f.name and not 0.0 <= v < 1.0:
            raise ConfigError(f"{key}={v} must lie in [0, 1)")


def to_dict(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        # fields with init=False are fixed by the class (LowRankConfig.lora_bias for DoRA, ...), not options
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj) if f.init}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj


class YamlLoader(yaml.SafeLoader):
    """YAML 1.2's booleans: only ``true``/``false`` are booleans, so ``yes``/``no``/``on``/``off`` (YAML 1.1
    booleans) stay strings: ``data.label_words=[yes, no]`` means the words "yes" and "no"."""


YamlLoader.yaml_implicit_resolvers = {
    k: [(tag, rx) for tag, rx in v if tag != "tag:yaml.org,2002:bool"]
    for k, v in yaml.SafeLoader.yaml_implicit_resolvers.items()}
YamlLoader.add_implicit_resolver("tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"),
                                 list("tTfF"))


def yaml_load(text: str) -> Any:
    return yaml.load(text, Loader=YamlLoader)  # noqa: S506 - a SafeLoader subclass


def load_yaml(path: str | Path) -> dict:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file not found: {p}")
    try:
        data = yaml_load(p.read_text(encoding="utf-8")) or {}
    except UnicodeDecodeError as e:
        raise ConfigError(f"{p} is not UTF-8 text: {e}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{p} is not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{p}: the top level must be a mapping of sections")
    return data


def parse_value(text: str) -> Any:
    """``key=value`` values are YAML scalars/lists: ``1e-4`` -> float, ``[q_proj,v_proj]`` -> list, ``null``."""
    try:
        v = yaml_load(text)
    except yaml.YAMLError:
        return text
    if isinstance(v, str):  # YAML reads 1e-4 as a string; be helpful
        try:
            return float(v) if any(c in v for c in "eE.") else v
        except ValueError:
            return v
    return v


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Apply dotlist overrides (``adapter.r=16 optim.lr=1e-4``) to a nested dict, in place."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}' is not of the form key=value (e.g. adapter.r=16)")
        key, text = item.split("=", 1)
        parts = key.strip().split(".")
        node = data
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override '{item}': '{p}' is not a section")
        node[parts[-1]] = parse_value(text)
    return data


# ----------------------------------------------------------------------------------------------------------------
@dataclass
class AttachConfig:
    """What :func:`lorakit.attach` needs. ``options`` holds the method's own fields (validated by its ``Config``).

    From a dict, every key that is not a field here is a method option: ``{"method": "lora", "r": 16}``.
    """

    method: str = "lora"
    targets: Any = None  # str regex | list of names/suffixes | "all-linear" | None (architecture default)
    exclude: Any = None
    layers: list[int] | None = None
    layers_pattern: Any = None
    overrides: dict[str, dict] = field(default_factory=dict)  # {regex: {r: 4, alpha: 8, ...}}
    trainable: list[str] = field(default_factory=list)  # PEFT's modules_to_save
    # PEFT's target_parameters: parameters adapted by name (fused MoE expert weights), "<module path or suffix>.<param>"
    target_parameters: list[str] | None = None
    # PEFT's trainable_token_indices: [ids] (the input embedding) | {module: [ids]}: only those rows train
    trainable_token_indices: Any = None
    bias: str = "none"  # "none" | "all" | "lora_only": also train base biases (of all / of adapted modules)
    seed: int | None = None
    dtype: str | None = None  # adapter parameter dtype; default: fp32 for fp16/bf16 bases, else the base dtype
    options: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def make(cls, cfg: "AttachConfig | dict | Any") -> "AttachConfig":
        from .core import get_method

        if isinstance(cfg, AttachConfig):
            out = dataclasses.replace(cfg, options=dict(cfg.options))
        elif isinstance(cfg, dict):
            own = {f.name for f in dataclasses.fields(cls)} - {"options"}
            data = {k: v for k, v in cfg.items() if k in own}
            opts = {k: v for k, v in cfg.items() if k not in own}
            opts.update(cfg.get("options", {}) or {}) if "options" in cfg else None
            opts.pop("options", None)
            out = from_dict(cls, data)
            out.options = opts
        elif dataclasses.is_dataclass(cfg):  # a method's own Config instance
            cls_ = next((m for m in _registry().values() if isinstance(cfg, m.Config)), None)
            if cls_ is None:
                raise ConfigError(f"{type(cfg).__name__} is not the Config of a registered method")
            out = cls(method=cls_.name, options=to_dict(cfg))
        else:
            raise ConfigError(f"config must be an AttachConfig, a dict or a method Config, not {type(cfg).__name__}")
        if out.bias not in ("none", "all", "lora_only"):
            raise ConfigError(f"bias={out.bias!r}; valid: 'none', 'all', 'lora_only'")
        if out.dtype not in (None, "float32", "bfloat16", "float16", "float64"):
            raise ConfigError(f"dtype={out.dtype!r}; valid: float32, bfloat16, float16, float64 or null")
        if not (out.target_parameters and isinstance(out.targets, (list, tuple)) and not out.targets):
            _check_spec(out.targets, "targets", allow_keywords=True)  # [] + target_parameters: parameters only
        _check_spec(out.exclude, "exclude")
        _check_spec(out.layers_pattern, "layers_pattern", regex=False)
        if not isinstance(out.overrides, dict):
            raise ConfigError(f"overrides must be a mapping of regex -> options, got {out.overrides!r}")
        for pat in out.overrides:
            _check_regex(pat, f"overrides key {pat!r}")
        if out.layers is not None and any(isinstance(i, bool) or not isinstance(i, int) or i < 0 for i in out.layers):
            raise ConfigError(f"layers={out.layers!r} must be a list of non-negative layer indices")
        if not all(isinstance(t, str) and t for t in out.trainable):
            raise ConfigError(f"trainable={out.trainable!r} must be a list of module paths (strings)")
        method = get_method(out.method)
        out.method_config(None, method)  # validates option keys now, before anything is touched
        for pat, ov in out.overrides.items():
            if not isinstance(ov, dict):
                raise ConfigError(f"overrides[{pat!r}] must be a mapping of option -> value")
            out.method_config(None, method, ov, where=f"overrides[{pat!r}]")
        return out

    def method_config(self, path: str | None, method=None, extra: dict | None = None, where: str = "adapter"):
        """The method's ``Config`` for module ``path`` (options + matching overrides)."""
        from .core import get_method
        from .targets import pattern_lookup

        method = method or get_method(self.method)
        opts = dict(self.options)
        if extra:
            opts.update(extra)
        if path is not None and self.overrides:
            opts.update(pattern_lookup(path, self.overrides))
        try:
            return from_dict(method.Config, opts, where=where, options=True)
        except ConfigError as e:
            raise ConfigError(f"{e} (method '{method.name}'; common keys: method, targets, exclude, layers, "
                              "layers_pattern, overrides, trainable, target_parameters, trainable_token_indices, bias, seed, dtype)") from None

    def to_dict(self) -> dict:
        d = {f.name: to_dict(getattr(self, f.name)) for f in dataclasses.fields(self) if f.name != "options"}
        d.update(to_dict(self.options))
        return d


TARGET_KEYWORDS = ("all-linear", "all-attention")


def _check_regex(pat: Any, what: str) -> None:
    import re

    if not isinstance(pat, str):
        raise ConfigError(f"{what} must be a string (a regex), got {type(pat).__name__} {pat!r}")
    try:
        re.compile(pat)
    except re.error as e:
        raise ConfigError(f"{what} is not a valid regular expression: {e}") from None


def _check_spec(spec: Any, key: str, allow_keywords: bool = False, regex: bool = True) -> None:
    """A target spec: null, a string (a regex matched against the full path; for ``targets`` also the keywords
    ``all-linear`` / ``all-attention``), or a non-empty list of module names/suffixes (strings)."""
    if spec is None:
        return
    if isinstance(spec, str):
        if allow_keywords and spec in TARGET_KEYWORDS:
            return
        if regex:
            _check_regex(spec, f"{key}={spec!r}")
        return
    if isinstance(spec, (list, tuple)):
        bad = [t for t in spec if not isinstance(t, str) or not t]
        if bad:
            raise ConfigError(f"{key}: every entry must be a module name (a non-empty string), got {bad[0]!r} in "
                              f"{list(spec)!r}")
        if not spec and key == "targets":
            raise ConfigError("targets is an empty list; give module names, a regex, 'all-linear', "
                              "'all-attention' or null (the architecture's default)")
        return
    raise ConfigError(f"{key}={spec!r} must be null, a regex string"
                      f"{', ' + ' or '.join(repr(k) for k in TARGET_KEYWORDS) if allow_keywords else ''} "
                      "or a list of module names")


def _registry():
    from .core import REGISTRY
    import importlib

    importlib.import_module("lorakit.methods")

    return REGISTRY
