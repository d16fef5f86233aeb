"""Federated LoRA on Flower: ``lorakit federate CONFIG.yaml`` (docs/federated.md).

:mod:`.strategies` (the aggregation maths: FedIT, FFA-LoRA, Fed-SB, LoRA-FAIR, exact ΔW) and :mod:`.split`
(Dirichlet label skew) need only torch; :mod:`.rounds` runs a client's round through ``lorakit train``'s loop;
:mod:`.app` (the Flower ServerApp/ClientApp and strategy) and :mod:`.engines` (simulation / deployment) import
Flower lazily: without it ``lorakit federate`` raises a LorakitError naming ``pip install 'lorakit[federated]'``.
"""
from __future__ import annotations

from .config import FederatedConfig, FederatedSection, resolve_federated
from .split import dirichlet_split
from .strategies import STRATEGIES, aggregate

__all__ = ["FederatedConfig", "FederatedSection", "resolve_federated", "dirichlet_split", "STRATEGIES", "aggregate",
           "federate"]


def federate(config=None, overrides: list[str] | None = None, *, base: dict | None = None, **kw) -> dict:
    """Resolve a federated config (a YAML path / packaged recipe, or ``base`` as a dict) and run it on the engine
    it names (``federated.engine``); returns the result written to ``output.dir/federated.json``."""
    from .engines import run_federated

    fc = resolve_federated(config, overrides, base=base)
    return run_federated(fc, **kw)
