"""Combining attached adapters into one new adapter (``lorakit.combine``) or into merged weights.

``lorakit.merge`` folds the *active* adapters into the base; this module builds a *new* adapter out of several
attached ones. Per adapted module, every source adapter contributes its update ``ΔW_t`` (a (d_out, d_in) matrix in
the layer's :class:`~lorakit.core.LayerView` convention) or its low-rank factors ``ΔW_t = s_t B_t A_t``:

* any method with ``lowrank()`` (LoRA, rsLoRA, VeRA, the three-factor family, ...) gives its factors exactly;
* any other *mergeable* method gives ``ΔW_t = merge(W) − W`` (computed in fp32), and where factors are needed, its
  SVD at the numerical rank (exact to rounding). So any mergeable method combines with any other.
* Methods that cannot be folded into one weight (routers, gates) and base-changing inits (PiSSA, OLoRA, ...: their
  factors apply to a changed base) are refused with :class:`~lorakit.errors.MergeError` before anything changes.

Two spaces (``space=``):

* ``"delta"`` (default, exact where the maths allows): the merge function acts on ``ΔW_t``. ``linear``/``cat``
  with no ``rank`` is written exactly as the concatenation ``B = [λ w_1 s_1 B_1 … ]``, ``A = [A_1; …]`` (rank Σr:
  ``[B_1 B_2][A_1; A_2] = B_1A_1 + B_2A_2``; where Σr exceeds ``min(d_out, d_in)`` the same sum is written as its SVD
  at the numerical rank, exact to rounding, since a LoRA rank may not exceed the layer's). Every other result (TIES/DARE/magnitude prune change entries of ΔW,
  so it is no longer low-rank) is written as its truncated SVD at ``rank`` (default: the largest input rank, as
  PEFT's ``*_svd``; ``rank="full"``: the numerical rank, lossless). The ``*_svd`` names are these same methods
  under PEFT's names.
* ``"factors"``: PEFT's ``add_weighted_adapter`` for ``linear``/``ties``/``dare_*``/``magnitude_prune``: A and B
  are merged *separately* with weights ``√|w_t s_t|`` (the sign on A). It needs equal ranks and is NOT the weighted
  sum of the updates: ``(Σ_t c_t B_t)(Σ_t c_t A_t)`` has the cross terms ``c_i c_j B_i A_j`` (i ≠ j). Use it to
  reproduce a PEFT merge; it equals PEFT's to rounding (tests/test_merging_peft.py).

The new adapter is a plain LoRA (scale 1, ``alpha = r`` per module, per-module ranks through overrides), so it
saves as a PEFT LoRA file, serves on the fast path and merges like any other.
"""
from __future__ import annotations

import contextlib
import math
import re
from dataclasses import dataclass
from typing import Any, Sequence

import torch
from torch import Tensor, nn

from ..errors import ConfigError, MergeError
from .functions import TENSOR_METHODS, merge_tensors, svd_factors

__all__ = ["METHODS", "FACTOR_ONLY", "has_delta_form", "combine", "merge_deltas", "merge_factors", "attach_factors",
           "sources", "Source", "normalize_method", "check_options"]

# every method name combine() takes; PEFT's names included
METHODS = ("linear", "cat", "svd", "ties", "ties_svd", "dare_linear", "dare_ties", "dare_linear_svd",
           "dare_ties_svd", "magnitude_prune", "magnitude_prune_svd", "lego")
# methods that combine factors and have no delta-space form (merge_deltas refuses them; a full-model merge goes
# through their factors)
FACTOR_ONLY = ("lego",)
_NEEDS_DENSITY = ("ties", "dare_linear", "dare_ties", "magnitude_prune")
_LAYER_KINDS = ("linear", "conv1d", "embedding")


@dataclass
class Source:
    """One adapter's contribution at one module: its adapter, and lazily its fp32 ΔW and scale-folded factors."""

    name: str
    adapter: Any
    _delta: Tensor | None = None
    _factors: tuple[Tensor, Tensor] | None = None
    exact_lowrank: bool = False

    def delta(self) -> Tensor:
        if self._delta is None:
            f = self._lowrank()
            if f is not None:
                A, B = f
                self._delta = B @ A
            else:
                W = self.adapter.base_matrix().detach().float()
                self._delta = (self.adapter.merge(W.clone()).float() - W).detach()
        return self._delta

    def _lowrank(self) -> tuple[Tensor, Tensor] | None:
        if self._factors is None:
            lr = self.adapter.lowrank()
            if lr is not None and lr.magnitude is None:
                self._factors = (lr.A.detach().float(), (lr.B.detach().float() * float(lr.scale)))
                self.exact_lowrank = True
        return self._factors

    def factors(self) -> tuple[Tensor, Tensor]:
        """``(A, s·B)`` with ``s·B A = ΔW`` (the SVD at the numerical rank for methods without ``lowrank()``)."""
        f = self._lowrank()
        if f is None:
            self._factors = svd_factors(self.delta(), None)
        return self._factors

    @property
    def rank(self) -> int:
        return self.factors()[0].shape[0]


def normalize_method(method: str) -> tuple[str, bool]:
    """``(base method, svd)``: PEFT's ``ties_svd`` is ``ties`` in delta space refactorised by SVD; ``svd`` is
    ``linear`` refactorised."""
    if method not in METHODS:
        raise ConfigError(f"unknown merge method {method!r}; valid: {', '.join(METHODS)}")
    if method == "svd":
        return "linear", True
    if method.endswith("_svd"):
        return method[:-4], True
    return method, False


def has_delta_form(method: str) -> bool:
    """Whether ``method`` merges in delta space (``merge_deltas``): every method but the factor-only ones."""
    return normalize_method(method)[0] not in FACTOR_ONLY


def check_options(method: str, weights: Sequence[float], *, density: float | None = None, rank: Any = None,
                  space: str = "delta", majority_sign: str = "total", lam: float = 1.0, flavor: str = "peft",
                  n_adapters: int | None = None) -> None:
    """Every option check that needs no model (the CLI runs it before loading anything)."""
    base, svd = normalize_method(method)
    if n_adapters is not None and len(weights) != n_adapters:
        raise ConfigError(f"{n_adapters} adapters but {len(weights)} weights")
    for w in weights:
        if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w):
            raise ConfigError(f"weights must be finite numbers, got {w!r}")
    if isinstance(lam, bool) or not isinstance(lam, (int, float)) or not math.isfinite(lam):
        raise ConfigError(f"lambda must be a finite number, got {lam!r}")
    if base in _NEEDS_DENSITY:
        if density is None or isinstance(density, bool) or not isinstance(density, (int, float)) \
                or not 0.0 <= float(density) <= 1.0:
            raise ConfigError(f"merge method {method!r} needs density in [0, 1] (the share of entries each task "
                              f"keeps), got {density!r}")
    elif density is not None:
        raise ConfigError(f"merge method {method!r} takes no density (only {', '.join(_NEEDS_DENSITY)} and their "
                          "_svd variants prune)")
    if rank is not None and rank != "full" and (isinstance(rank, bool) or not isinstance(rank, int) or rank < 1):
        raise ConfigError(f"rank must be a positive integer or 'full', got {rank!r}")
    if rank is not None and base == "cat":
        raise ConfigError("cat is exact at rank Σr and takes no rank (use 'svd' to refactorise to a rank)")
    if not has_delta_form(base) and (rank is None or rank == "full"):  # lego: k = the number of clusters
        raise ConfigError(f"{base} needs rank=k, the merged rank (it merges factors into k of them)")
    if space not in ("delta", "factors"):
        raise ConfigError(f"space={space!r}; valid: 'delta' (exact, on ΔW) or 'factors' (PEFT's A/B-separate merge)")
    if space == "factors" and (base not in TENSOR_METHODS or svd):
        raise ConfigError(f"space='factors' (PEFT's A/B-separate merge) exists for {', '.join(TENSOR_METHODS)}, "
                          f"not {method!r}")
    if space == "factors" and rank is not None:
        raise ConfigError("space='factors' keeps the common input rank and takes no rank")
    if majority_sign not in ("total", "frequency"):
        raise ConfigError(f"majority_sign={majority_sign!r}; valid: 'total', 'frequency'")
    if flavor not in ("peft", "mergekit"):
        raise ConfigError(f"flavor={flavor!r}; valid: 'peft', 'mergekit'")


def sources(model: nn.Module, names: Sequence[str]) -> dict[str, list[Source]]:
    """``{module path: [Source per adapter that adapts it, in the order of names]}``, paths in model order.
    Raises before anything changes for an unknown name, an adapter that cannot be folded, or a layer kind."""
    from ..inject import attached, hosts

    atts = attached(model)
    if not names:
        raise ConfigError("combine needs at least one adapter name")
    if len(set(names)) != len(names):
        raise ConfigError(f"an adapter is named twice: {list(names)}")
    for n in names:
        if n not in atts:
            raise ConfigError(f"no adapter named {n!r}; attached: {sorted(atts)}")
        att = atts[n]
        if att.trainable:
            raise MergeError(f"adapter {n!r} trains whole module copies ({att.trainable}); a merged adapter cannot "
                             "combine them: merge adapters without `trainable` modules")
        if att.param_targets or att.token_members:
            raise MergeError(f"adapter {n!r} adapts parameters by name or trains token rows (target_parameters / "
                             "trainable_token_indices): combine merges module updates only")
    out: dict[str, list[Source]] = {}
    for path, h in hosts(model):
        for n in names:
            a = h.adapters[n] if n in h.adapters else None
            if a is None:
                continue
            if not a.mergeable:
                raise MergeError(f"adapter {n!r} at '{path}' uses method '{a.name}', which is not mergeable (its "
                                 "output depends on the input), so it has no single update to combine")
            if type(a).changes_base(a.cfg):
                raise MergeError(f"adapter {n!r} at '{path}' ({a.name}) replaced the base weight at init; its "
                                 "factors apply to that residual base, not the shared one. Save it with "
                                 "as_lora=True and load that file instead")
            if a.view.kind not in _LAYER_KINDS:
                raise MergeError(f"adapter {n!r} at '{path}' is on a {a.view.kind} layer; combine supports "
                                 f"{', '.join(_LAYER_KINDS)}")
            out.setdefault(path, []).append(Source(n, a))
    if not out:
        raise ConfigError(f"adapters {list(names)} adapt no module")
    return out


def _weights(names: Sequence[str], weights: Sequence[float] | None) -> dict[str, float]:
    if weights is None:
        weights = [1.0] * len(names)
    weights = list(weights)
    if len(weights) != len(names):
        raise ConfigError(f"{len(names)} adapters but {len(weights)} weights")
    return dict(zip(names, (float(w) for w in weights)))


def _rng(seed: int | None):
    if seed is None:
        return contextlib.nullcontext()
    ctx = torch.random.fork_rng(devices=[])

    @contextlib.contextmanager
    def seeded():
        with ctx:
            torch.manual_seed(int(seed))
            yield
    return seeded()


def merge_deltas(model: nn.Module, adapters: Sequence[str], weights: Sequence[float] | None = None,
                 method: str = "linear", *, density: float | None = None, majority_sign: str = "total",
                 lam: float = 1.0, flavor: str = "peft", normalize: bool | None = None, seed: int | None = None,
                 srcs: dict[str, list[Source]] | None = None) -> dict[str, Tensor]:
    """``{module path: merged ΔW}`` (fp32, dense) in delta space: what a full-model merge adds to each base weight.
    A module some adapters do not adapt takes only the others (their ``τ`` is 0 there, as in PEFT and mergekit)."""
    base, _ = normalize_method(method)
    if not has_delta_form(base):
        raise ConfigError(f"{base} merges factors (merge_factors); its ΔW is the product of its result")
    wd = _weights(adapters, weights)
    check_options(method, list(wd.values()), density=density, majority_sign=majority_sign, lam=lam, flavor=flavor)
    tm = "linear" if base == "cat" else base
    srcs = srcs if srcs is not None else sources(model, adapters)
    out = {}
    with _rng(seed):
        for path, ss in srcs.items():
            out[path] = merge_tensors(tm, [s.delta() for s in ss], [wd[s.name] for s in ss], density=density,
                                      majority_sign=majority_sign, lam=lam, flavor=flavor, normalize=normalize)
    return out


def merge_factors(model: nn.Module, adapters: Sequence[str], weights: Sequence[float] | None = None,
                  method: str = "linear", *, density: float | None = None, rank: int | str | None = None,
                  space: str = "delta", majority_sign: str = "total", lam: float = 1.0, seed: int | None = None,
                  lego_options: dict | None = None) -> dict[str, tuple[Tensor, Tensor]]:
    """``{module path: (A (k, d_in), B (d_out, k))}`` with ``B A`` the merged update (scale 1). See the module
    docstring for the spaces and the ranks."""
    base, svd = normalize_method(method)
    wd = _weights(adapters, weights)
    check_options(method, list(wd.values()), density=density, rank=rank, space=space, majority_sign=majority_sign,
                  lam=lam)
    srcs = sources(model, adapters)
    if base == "lego":
        from .lego import lego_merge

        return {p: lego_merge([s.factors() for s in ss], [wd[s.name] * lam for s in ss], k=int(rank),
                              **(lego_options or {}))
                for p, ss in srcs.items()}
    out: dict[str, tuple[Tensor, Tensor]] = {}
    if space == "factors":
        with _rng(seed):
            for path, ss in srcs.items():
                out[path] = _peft_factor_merge(base, ss, wd, density, majority_sign, path)
        return out
    if base in ("cat", "linear") and not svd and rank is None:
        for path, ss in srcs.items():
            fs = [s.factors() for s in ss]
            A = torch.cat([A for A, _ in fs], 0)
            B = torch.cat([B * (wd[s.name] * lam) for s, (_, B) in zip(ss, fs)], 1)
            if A.shape[0] > min(A.shape[1], B.shape[0]):  # Σr above the layer's rank: the same ΔW, refactorised
                A, B = svd_factors(B @ A, None)
            out[path] = (A, B)
        return out
    deltas = merge_deltas(model, adapters, list(wd.values()), "linear" if base == "cat" else base, density=density,
                          majority_sign=majority_sign, lam=lam, seed=seed, srcs=srcs)
    for path, ss in srcs.items():
        k = None if rank == "full" else (rank if rank is not None else max(s.rank for s in ss))
        out[path] = svd_factors(deltas[path], k)
    return out


def _peft_factor_merge(base: str, ss: list[Source], wd: dict[str, float], density, majority_sign, path):
    """PEFT's ``_generalized_task_arithmetic_weighted_adapter``: A and B merged separately with √|w s| each (sign on
    A), the factors unscaled (so a method's scale enters through the weights, as PEFT's ``target.scaling``)."""
    As, Bs, wa, wb = [], [], [], []
    ranks = set()
    for s in ss:
        lr = s.adapter.lowrank()
        if lr is None or lr.magnitude is not None:
            raise MergeError(f"space='factors' merges LoRA factors; adapter {s.name!r} at '{path}' "
                             f"({s.adapter.name}) has none: use space='delta'")
        ws = wd[s.name] * float(lr.scale)
        sign = 1.0 if ws >= 0 else -1.0
        wa.append(math.sqrt(abs(ws)) * sign)
        wb.append(math.sqrt(abs(ws)))
        As.append(lr.A.detach().float())
        Bs.append(lr.B.detach().float())
        ranks.add(lr.A.shape[0])
    if len(ranks) != 1:
        raise MergeError(f"space='factors' needs equal ranks (PEFT's rule); '{path}' has ranks {sorted(ranks)}: use "
                         "space='delta' (exact) or cat")
    A = merge_tensors(base, As, wa, density=density, majority_sign=majority_sign)
    B = merge_tensors(base, Bs, wb, density=density, majority_sign=majority_sign)
    return A, B


def attach_factors(model: nn.Module, factors: dict[str, tuple[Tensor, Tensor]], name: str, *,
                   meta: dict | None = None) -> nn.Module:
    """Attach a plain LoRA named ``name`` whose module ``p`` computes ``B A`` (scale 1: ``alpha = r`` per module,
    per-module ranks as overrides) from ``{p: (A, B)}``. The new adapter becomes the active one."""
    from ..inject import adapters as _adapters, attach

    if not factors:
        raise ConfigError("nothing to attach: no factors")
    ranks = {p: int(A.shape[0]) for p, (A, _) in factors.items()}
    r0 = max(ranks.values())
    cfg = {"method": "lora", "targets": list(factors), "r": r0, "alpha": float(r0), "seed": 0,
           "overrides": {re.escape(p): {"r": k, "alpha": float(k)} for p, k in ranks.items() if k != r0}}
    attach(model, cfg, name)
    with torch.no_grad():
        for path, a in _adapters(model, name):
            A, B = factors[path]
            a.lora_A.weight.copy_(A.reshape(a.lora_A.weight.shape).to(a.lora_A.weight.dtype))
            a.lora_B.weight.copy_(B.reshape(a.lora_B.weight.shape).to(a.lora_B.weight.dtype))
            a.clear_cache()
    if meta is not None:
        from ..inject import attachment

        attachment(model, name).__dict__["merge_info"] = dict(meta)
    return model


def combine(model: nn.Module, adapters: Sequence[str], weights: Sequence[float] | None = None, *,
            method: str = "linear", density: float | None = None, rank: int | str | None = None,
            name: str = "merged", space: str = "delta", majority_sign: str = "total", lam: float = 1.0,
            seed: int | None = None, active: bool = True, lego_options: dict | None = None) -> nn.Module:
    """Add adapter ``name``: the merge of the attached ``adapters`` with ``weights`` (default 1 each).

    ``method``: ``linear`` | ``cat`` | ``svd`` | ``ties`` | ``dare_linear`` | ``dare_ties`` | ``magnitude_prune``
    (and PEFT's ``*_svd`` names) | ``lego`` (LoRA-LEGO, ``rank`` = number of clusters). ``density``: the share
    each task keeps (TIES, DARE, magnitude prune). ``rank``: the merged rank (SVD refactorisation; None: the largest
    input rank, exact concatenation for linear/cat; ``"full"``: lossless). ``space``: ``"delta"`` (exact, default)
    or ``"factors"`` (PEFT's A/B-separate merge, cross terms included). ``lam``: task arithmetic's λ. ``seed``:
    DARE's draws (None: the global generator). ``active=False`` leaves the previously active adapters active.

    Checks everything before the model changes; returns the model with the new adapter attached (and active)."""
    from ..inject import active_names, attached, set_active

    if not isinstance(name, str) or not name or "." in name or "/" in name:
        raise ConfigError(f"adapter name {name!r} must be a non-empty string without '.' or '/'")
    if name in attached(model):
        raise ConfigError(f"an adapter named {name!r} is already attached; pick another name")
    prev = active_names(model)
    factors = merge_factors(model, list(adapters), weights, method, density=density, rank=rank, space=space,
                            majority_sign=majority_sign, lam=lam, seed=seed, lego_options=lego_options)
    info = {"method": method, "adapters": list(adapters), "weights": list(_weights(adapters, weights).values()),
            "density": density, "rank": rank, "space": space, "majority_sign": majority_sign, "lambda": lam,
            "seed": seed}
    attach_factors(model, factors, name, meta=info)
    if not active:
        set_active(model, [n for n in prev if n in attached(model)], trainable=False)
    return model
