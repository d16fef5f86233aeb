"""The ``federated`` section of a ``lorakit federate`` config, and its resolution (before any model loads).

A federated config is a training config (``model``, ``adapter``, ``optim``, ``data``, ``train``, ``output``: what
each client runs every round, through ``lorakit train``'s own loop) plus a ``federated`` section::

    federated:
      strategy: ffa          # fedit | ffa | fedsb | fair | exact
      clients: 4             # K
      rounds: 5
      local_steps: 10        # optimiser steps per client per round (train.steps is ignored)
      alpha: 0.5             # Dirichlet label skew (small: non-IID)
      split_seed: 0
      engine: simulation     # simulation | deployment

``train.steps`` of the clients is ``local_steps``; the server evaluates the global adapter on the task's eval set
after every round (``eval_every_round``).
"""
from __future__ import annotations

import copy
from pathlib import Path
from dataclasses import dataclass
from typing import Literal

from ..config import apply_overrides, from_dict, load_yaml, to_dict
from ..errors import ConfigError
from ..train.config import RECIPES_DIR, RunConfig, _range, recipe_path, resolve
from .strategies import STRATEGIES

__all__ = ["FederatedSection", "FederatedConfig", "resolve_federated"]


@dataclass
class FederatedSection:
    strategy: str = "ffa"
    clients: int = 4
    rounds: int = 5
    local_steps: int = 10
    alpha: float = 0.5
    split_seed: int = 0
    engine: Literal["simulation", "deployment"] = "simulation"
    fraction: float = 1.0  # share of the K clients sampled per round (Flower's fraction_train)
    client_eval_rows: int = 16  # rows of the eval set each client evaluates after its local steps (0 < n)
    eval_every_round: bool = True  # the server evaluates the global adapter after every round
    fair_solver: Literal["cosine", "frobenius"] = "cosine"
    fair_lambda: float = 0.01
    fair_steps: int = 100
    fair_lr: float = 0.05
    # differential privacy (ffa, fedsb): DP-SGD on the trained factor (lorakit.federated.dp), (ε, δ) per round
    dp: bool = False
    dp_noise: float = 1.0  # noise multiplier σ (noise std σ·C on the summed clipped gradients)
    dp_clip: float = 1.0  # per-example clipping norm C
    dp_delta: float = 1e-5
    timeout_s: float = 3600.0  # how long the server waits for a round's replies

    def validate(self) -> None:
        if self.strategy not in STRATEGIES:
            raise ConfigError(f"federated.strategy={self.strategy!r}; valid: {', '.join(STRATEGIES)}")
        for k, lo in (("clients", 1), ("rounds", 1), ("local_steps", 1), ("client_eval_rows", 1), ("fair_steps", 0)):
            _range(f"federated.{k}", getattr(self, k), ge=lo)
        _range("federated.alpha", self.alpha, gt=0)
        _range("federated.fraction", self.fraction, gt=0, le=1)
        _range("federated.fair_lambda", self.fair_lambda, gt=0)
        _range("federated.fair_lr", self.fair_lr, gt=0)
        _range("federated.timeout_s", self.timeout_s, gt=0)
        _range("federated.dp_noise", self.dp_noise, ge=0)
        _range("federated.dp_clip", self.dp_clip, gt=0)
        _range("federated.dp_delta", self.dp_delta, gt=0, le=1)
        if self.dp and not STRATEGIES[self.strategy].dp:
            ok = [n for n, s in STRATEGIES.items() if s.dp]
            raise ConfigError(f"federated.dp=true needs a strategy whose one trained factor enters ΔW linearly "
                              f"({', '.join(ok)}); federated.strategy={self.strategy} trains a product of two")


@dataclass
class FederatedConfig:
    run: RunConfig
    fed: FederatedSection

    def to_dict(self) -> dict:
        return {**self.run.to_dict(), "federated": to_dict(self.fed)}


def resolve_federated(path=None, overrides: list[str] | None = None, base: dict | None = None) -> FederatedConfig:
    """Validate everything (the run sections as ``lorakit train`` does, the federated section, the strategy against
    the method's trained roles) before any model or dataset loads."""
    if path is None and base is None:
        raise ConfigError("lorakit federate needs a config: a YAML file or a packaged recipe such as "
                          "federated-sentiment-minilm-ffa (see `lorakit recipes`)")
    data = copy.deepcopy(base) if path is None else load_yaml(federated_recipe(path))
    apply_overrides(data, list(overrides or []))
    fed = data.pop("federated", None) or {}
    if not isinstance(fed, dict):
        raise ConfigError(f"section 'federated' must be a mapping, got {fed!r}")
    fsec = from_dict(FederatedSection, fed)
    run = resolve(base=data)
    check_strategy(fsec, run)
    return FederatedConfig(run, fsec)


FEDERATED_RECIPES = RECIPES_DIR / "federated"


def federated_recipe(path) -> Path:
    """A YAML file, or a packaged federated recipe by name (``sentiment-minilm``, ``federated/sentiment-minilm``,
    ``federated-sentiment-minilm``; see ``lorakit recipes``)."""
    p = Path(path)
    if p.is_file():
        return p
    name = p.name[:-5] if p.name.endswith(".yaml") else p.name
    for cand in (name, name.removeprefix("federated-")):
        if (FEDERATED_RECIPES / f"{cand}.yaml").is_file():
            return FEDERATED_RECIPES / f"{cand}.yaml"
    names = sorted(q.stem for q in FEDERATED_RECIPES.glob("*.yaml"))
    if p.suffix == ".yaml" or "/" in str(path):
        return recipe_path(path)  # the usual "config file not found" error
    raise ConfigError(f"federated config not found: {path} (packaged federated recipes: {', '.join(names)})")


def check_strategy(fed: FederatedSection, run: RunConfig) -> None:
    """The strategy against the roles the method trains (from a shape-only probe adapter, no model)."""
    from ..procedures.base import probe_parameters

    s = STRATEGIES[fed.strategy]
    params = probe_parameters(run.adapter)
    if params is None:  # the method cannot be probed without a model: checked again on the server
        return
    roles = {t.role for t in params}
    if s.frozen_roles and not set(s.frozen_roles) & roles:
        raise ConfigError(f"federated.strategy={fed.strategy} freezes the {'/'.join(s.frozen_roles)} factor, but "
                          f"method '{run.adapter['method']}' trains {sorted(roles)}; use a LoRA-family method "
                          "(adapter.method=lora)")
    if s.frozen_roles and not roles - set(s.frozen_roles):
        raise ConfigError(f"federated.strategy={fed.strategy} would freeze everything method "
                          f"'{run.adapter['method']}' trains ({sorted(roles)})")
    if s.pairs and not {"A", "B"} <= roles:
        raise ConfigError(f"federated.strategy={fed.strategy} corrects (A, B) factor pairs, but method "
                          f"'{run.adapter['method']}' trains {sorted(roles)}; use a method with trained A and B")
    if s.pairs:
        for t in params:
            if t.role in ("A", "B") and t.param.dim() != 2:
                raise ConfigError(f"federated.strategy={fed.strategy} needs 2-D A/B factors; method "
                                  f"'{run.adapter['method']}' has a {t.param.dim()}-D {t.role} ('{t.local}')")
    if s.only_roles is not None and not roles <= set(s.only_roles):
        raise ConfigError(f"federated.strategy={fed.strategy} averages only the r×r core of a method with frozen "
                          f"shared bases (LoRA-SB: adapter.method=lora_sb); method '{run.adapter['method']}' trains "
                          f"{sorted(roles)}")
