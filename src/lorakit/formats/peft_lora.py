"""PEFT LoRA files (``peft_type: "LORA"``): the one reader and writer of their config schema.

A PEFT LoRA config gives every targeted module a rank ``r`` and an ``alpha``: the top-level ``r``/``lora_alpha``,
unless a key of ``rank_pattern``/``alpha_pattern`` matches the module path. PEFT's rule (``get_pattern_key``): a
key ``k`` matches path ``p`` when ``re.match(rf"(.*\\.)?({k})$", p)``, i.e. ``k`` is a regular expression that
matches the whole path or a dotted suffix of it; the FIRST matching key in the mapping's order wins, and rank and
alpha are looked up independently. The scale is ``alpha / r`` (``use_rslora``: ``alpha / √r``).

:class:`PeftLoraConfig` holds the fields lorakit reads, validated on construction (bad values raise
:class:`~lorakit.errors.ConfigError` naming the key), plus every other key of the file verbatim in ``extra``, so a
read-then-written config loses nothing. :meth:`PeftLoraConfig.resolve` gives a module's ``(r, alpha, scale)``.
:meth:`PeftLoraConfig.for_modules` builds the config of a set of per-module ranks/alphas (exact paths in the
patterns), :func:`read_lora` / :func:`write_lora` read and write a plain LoRA's factors with it.
"""
from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

from torch import Tensor

from ..errors import AdapterFileError, ConfigError
from .peft import PREFIX, read_adapter_config, read_tensors, write_adapter_dir

__all__ = ["PeftLoraConfig", "Resolved", "pattern_key", "pattern_overrides", "read_config", "read_lora",
           "write_lora"]

# Keys of a PEFT LoraConfig whose defaults lorakit writes when it builds a config from scratch.
_WRITE_DEFAULTS: dict[str, Any] = {
    "lora_dropout": 0.0, "bias": "none", "fan_in_fan_out": False, "init_lora_weights": True,
    "modules_to_save": None, "task_type": None, "inference_mode": True,
}


class Resolved(NamedTuple):
    """One module's values: rank, alpha and the scale ``alpha/r`` (rsLoRA ``alpha/√r``)."""

    r: int
    alpha: float
    scale: float


def pattern_key(keys, path: str) -> str | None:
    """The first of ``keys`` that matches module ``path`` by PEFT's rule (whole path or dotted suffix, as a regex),
    or None. A key that is not a valid regular expression raises :class:`ConfigError`."""
    for k in keys:
        try:
            if re.match(rf"(.*\.)?({k})$", path):
                return k
        except re.error as e:
            raise ConfigError(f"pattern key {k!r} is not a valid regular expression: {e}") from None
    return None


def _number(v: Any, where: str, kind: type) -> Any:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise ConfigError(f"{where} must be a number, got {v!r}")
    if kind is int:
        if isinstance(v, float) and not v.is_integer():
            raise ConfigError(f"{where} must be an integer, got {v!r}")
        v = int(v)
        if v <= 0:
            raise ConfigError(f"{where} must be a positive rank, got {v}")
        return v
    if not math.isfinite(v):
        raise ConfigError(f"{where} must be finite, got {v!r}")
    return float(v) if isinstance(v, float) else v


def _pattern(v: Any, where: str, kind: type) -> dict:
    if v is None:
        return {}
    if not isinstance(v, dict):
        raise ConfigError(f"{where} must be a mapping of module pattern -> value, got {v!r}")
    out = {}
    for k, val in v.items():
        if not isinstance(k, str) or not k:
            raise ConfigError(f"{where} keys must be non-empty module patterns, got {k!r}")
        try:
            re.compile(k)
        except re.error as e:
            raise ConfigError(f"{where}[{k!r}] is not a valid regular expression: {e}") from None
        out[k] = _number(val, f"{where}[{k!r}]", kind)
    return out


@dataclass
class PeftLoraConfig:
    """The fields of a PEFT ``LoraConfig`` that decide what a LoRA file computes (see the module docstring)."""

    r: int = 8
    lora_alpha: float = 8
    use_rslora: bool = False
    use_dora: bool = False
    target_modules: list[str] | str | None = None
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)  # every other key of the file, kept verbatim

    def __post_init__(self) -> None:
        self.r = _number(self.r, "r", int)
        self.lora_alpha = _number(self.lora_alpha, "lora_alpha", float)
        for k in ("use_rslora", "use_dora"):
            if not isinstance(getattr(self, k), bool):
                raise ConfigError(f"{k} must be true/false, got {getattr(self, k)!r}")
        t = self.target_modules
        if not (t is None or isinstance(t, str) or (isinstance(t, (list, tuple, set))
                                                   and all(isinstance(x, str) for x in t))):
            raise ConfigError(f"target_modules must be a regex string, a list of module names or null, got {t!r}")
        if isinstance(t, (tuple, set)):
            self.target_modules = sorted(t) if isinstance(t, set) else list(t)
        self.rank_pattern = _pattern(self.rank_pattern, "rank_pattern", int)
        self.alpha_pattern = _pattern(self.alpha_pattern, "alpha_pattern", float)

    # --- reading ----------------------------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, conf: dict) -> "PeftLoraConfig":
        """From a parsed ``adapter_config.json`` of ``peft_type`` LORA (missing keys take PEFT's defaults)."""
        if not isinstance(conf, dict):
            raise ConfigError(f"a PEFT LoRA config must be a mapping, got {type(conf).__name__}")
        if conf.get("peft_type", "LORA") != "LORA":
            raise ConfigError(f"expected a PEFT LoRA config (peft_type 'LORA'), got peft_type {conf['peft_type']!r}")
        own = {"r", "lora_alpha", "use_rslora", "use_dora", "target_modules", "rank_pattern", "alpha_pattern"}
        kw = {k: conf[k] for k in own if k in conf and not (conf[k] is None and k not in ("target_modules",))}
        return cls(**kw, extra={k: v for k, v in conf.items() if k not in own})

    # --- per-module values -------------------------------------------------------------------------------------
    def rank(self, path: str) -> int:
        k = pattern_key(self.rank_pattern, path)
        return self.r if k is None else self.rank_pattern[k]

    def alpha(self, path: str) -> float:
        k = pattern_key(self.alpha_pattern, path)
        return self.lora_alpha if k is None else self.alpha_pattern[k]

    def resolve(self, path: str) -> Resolved:
        """``(r, alpha, scale)`` of module ``path`` exactly as PEFT's ``LoraModel`` builds it."""
        r, a = self.rank(path), self.alpha(path)
        return Resolved(r, a, a / (math.sqrt(r) if self.use_rslora else r))

    def scale(self, path: str) -> float:
        return self.resolve(path).scale

    # --- writing -----------------------------------------------------------------------------------------------
    @classmethod
    def for_modules(cls, ranks: dict[str, int], alphas: dict[str, float], *, use_rslora: bool = False,
                    target_modules: list[str] | str | None = None, **extra: Any) -> "PeftLoraConfig":
        """The config giving each module path its rank and alpha: the default ``r`` is the largest rank (servers
        size their buffers by it) with the alpha of the first module of that rank; every other module is an
        exact-path entry of ``rank_pattern``/``alpha_pattern``. ``target_modules`` defaults to the sorted paths."""
        if not ranks:
            raise ConfigError("a LoRA config needs at least one module")
        if set(ranks) != set(alphas):
            raise ConfigError(f"ranks and alphas name different modules: {sorted(set(ranks) ^ set(alphas))[:4]}")
        r0 = max(ranks.values())
        alpha0 = alphas[next(p for p in ranks if ranks[p] == r0)]
        paths = sorted(ranks)
        return cls(r=r0, lora_alpha=alpha0, use_rslora=use_rslora, use_dora=False,
                   target_modules=paths if target_modules is None else target_modules,
                   rank_pattern={re.escape(p) if _needs_escape(p) else p: ranks[p] for p in paths if ranks[p] != r0},
                   alpha_pattern={re.escape(p) if _needs_escape(p) else p: alphas[p] for p in paths
                                  if alphas[p] != alpha0},
                   extra={**_WRITE_DEFAULTS, **extra})

    def to_dict(self) -> dict:
        """The ``adapter_config.json`` content (``peft_type`` LORA)."""
        return {**self.extra, "peft_type": "LORA", "r": self.r, "lora_alpha": self.lora_alpha,
                "use_rslora": self.use_rslora, "use_dora": self.use_dora, "target_modules": self.target_modules,
                "rank_pattern": dict(self.rank_pattern), "alpha_pattern": dict(self.alpha_pattern)}


def _needs_escape(path: str) -> bool:
    """Module paths are dotted identifiers: ``.`` is the only regex metacharacter they hold, and as a wildcard it
    matches itself, so an exact path is written as-is (what PEFT users write). Anything else is escaped."""
    return re.fullmatch(r"[A-Za-z0-9_.]+", path) is None


def pattern_overrides(conf: dict, r_field: str | None, alpha_field: str | None) -> dict[str, dict]:
    """A PEFT config's ``rank_pattern``/``alpha_pattern`` as lorakit ``overrides`` ({regex: {field: value}}) that
    resolve every module exactly as PEFT does. lorakit merges overrides per field, first matching key first; a key
    present in both patterns would put the alpha lookup in rank-pattern order, so alpha keys are wrapped in a
    non-capturing group ``(?:k)`` (the same regex, a distinct key)."""
    out: dict[str, dict] = {}
    if r_field is not None:
        for k, v in _pattern(conf.get("rank_pattern"), "rank_pattern", int).items():
            out[k] = {r_field: v}
    if alpha_field is not None:
        for k, v in _pattern(conf.get("alpha_pattern"), "alpha_pattern", float).items():
            key = f"(?:{k})" if k in out else k
            out.setdefault(key, {})[alpha_field] = v
    return out


def read_config(directory: str | os.PathLike) -> PeftLoraConfig:
    """The :class:`PeftLoraConfig` of an adapter directory (``adapter_config.json`` of peft_type LORA)."""
    conf = read_adapter_config(directory)
    try:
        return PeftLoraConfig.from_dict(conf)
    except ConfigError as e:
        raise AdapterFileError(f"{Path(directory)}/adapter_config.json: {e}") from None


def read_lora(directory: str | os.PathLike, *, fold_scale: bool = False
              ) -> tuple[PeftLoraConfig, dict[str, tuple[Tensor, Tensor]]]:
    """A plain LoRA directory: its config and ``{module path: (A (r, d_in), B (d_out, r))}``; with ``fold_scale``,
    B is returned as ``scale·B`` in fp32 (each module's own scale, patterns and rsLoRA honoured)."""
    cfg = read_config(directory)
    if cfg.use_dora:
        raise AdapterFileError(f"{directory}: expected a plain LoRA adapter, this one is DoRA (use_dora=true)")
    t = read_tensors(directory)
    out = {}
    for k, A in t.items():
        if not (k.startswith(PREFIX) and k.endswith(".lora_A.weight")):
            continue
        p = k[len(PREFIX):-len(".lora_A.weight")]
        B = t.get(f"{PREFIX}{p}.lora_B.weight")
        if B is None:
            raise AdapterFileError(f"{directory}: '{p}' has lora_A but no lora_B")
        if A.dim() != 2 or B.dim() != 2 or A.shape[0] != B.shape[1]:
            raise AdapterFileError(f"{directory}: '{p}' has A {tuple(A.shape)}, B {tuple(B.shape)}: not a LoRA pair")
        r = cfg.rank(p)
        if A.shape[0] != r:
            raise AdapterFileError(f"{directory}: '{p}' has rank {A.shape[0]} but its config resolves r={r}")
        out[p] = (A.float(), B.float() * cfg.scale(p)) if fold_scale else (A, B)
    if not out:
        raise AdapterFileError(f"{directory}: no LoRA factors (lora_A.weight / lora_B.weight) in the file")
    return cfg, out


def write_lora(directory: str | os.PathLike, cfg: PeftLoraConfig, factors: dict[str, tuple[Tensor, Tensor]]
               ) -> Path:
    """Write a plain LoRA directory: ``cfg`` and ``{module path: (A, B)}`` (B unscaled: the file's scale applies).
    Every module's rank must be the one ``cfg`` resolves for it."""
    state = {}
    for p, (A, B) in factors.items():
        if A.shape[0] != cfg.rank(p) or B.shape[1] != A.shape[0]:
            raise ConfigError(f"'{p}': factors of rank {A.shape[0]}/{B.shape[1]}, config resolves r={cfg.rank(p)}")
        state[f"{PREFIX}{p}.lora_A.weight"] = A.detach().float()
        state[f"{PREFIX}{p}.lora_B.weight"] = B.detach().float()
    return write_adapter_dir(directory, cfg.to_dict(), state)
