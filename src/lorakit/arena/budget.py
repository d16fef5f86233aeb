"""Fair budgets: match a method's trainable-parameter count to the LoRA baseline through its rank-like knob.

The count is taken by attaching to the task's model built on the meta device (shapes only, no weights, no data),
so matching costs milliseconds and works for every registered method with no per-method code. The knob is the
first of ``RANK_KNOBS`` that the method has *and* that moves its trainable count (NOLA's ``r`` does not: its count
is set by its number of bases). A method whose count cannot come within 2x of the target keeps its paper settings
and is reported as unmatched, with the reason. A method whose rank is not an adapter size but the model's own
capacity (PELA: compression) declares ``budget_exempt`` and keeps its paper settings, reported as unmatched.
"""
from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Callable

from torch import nn

from ..core import get_method
from ..inject import attach

log = logging.getLogger(__name__)

# a knob is a field, or a tuple of fields set together (NOLA's bases for A and B)
RANK_KNOBS = ("r", "rank", "init_r", "target_rank", ("num_basis_A", "num_basis_B"), "num_bases", "r_max")
CANDIDATES = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024)


def trainable_count(make_meta: Callable[[], nn.Module], adapter_cfg: dict) -> int:
    """Trainable parameters of ``adapter_cfg`` on a fresh meta-device model."""
    model = make_meta()
    quiet = logging.getLogger("lorakit.inject")
    level = quiet.level
    quiet.setLevel(logging.ERROR)  # one "attached ..." line (or tied-weights warning) per probe is noise: the run
    # itself attaches once and says it there
    try:
        attach(model, adapter_cfg, defer_init=True)
    finally:
        quiet.setLevel(level)
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def rank_knobs(method: str) -> list[str | tuple[str, ...]]:
    fields = {f.name for f in dataclasses.fields(get_method(method).Config) if f.init}
    return [k for k in RANK_KNOBS if (set(k) <= fields if isinstance(k, tuple) else k in fields)]


def _set(cfg: dict, knob, v: int) -> dict:
    return {**cfg, **({k: v for k in knob} if isinstance(knob, tuple) else {knob: v})}


def _name(knob) -> str:
    return "+".join(knob) if isinstance(knob, tuple) else knob


RANK_LIKE = ("r", "rank", "init_r", "target_rank", "r_max")


def full_rank(make_meta: Callable[[], nn.Module], adapter_cfg: dict) -> int | None:
    """min(d_in, d_out) over the targeted modules: a rank-like knob above it is meaningless (and invalid for most)."""
    from ..targets import match

    model = make_meta()
    dims = []
    for path in match(model, adapter_cfg.get("targets"), adapter_cfg.get("exclude"), adapter_cfg.get("layers")):
        w = getattr(model.get_submodule(path), "weight", None)
        if w is not None and w.ndim >= 2:
            dims.append(min(w.shape[0], w.shape[1]))
    return min(dims) if dims else None


def fit_targets(make_meta: Callable[[], nn.Module], adapter_cfg: dict, fallback) -> tuple[dict, str | None]:
    """A method file written for another architecture (Llama names on a BERT task) gets the task's own targets:
    the input embedding for an embedding-side method, else the recipe's. Returns (config, note or None)."""
    from ..errors import TargetError
    from ..targets import match

    model = make_meta()
    adapter_cfg, note = _fit_trainable(model, adapter_cfg)
    try:
        match(model, adapter_cfg.get("targets"), adapter_cfg.get("exclude"), adapter_cfg.get("layers"))
        return adapter_cfg, note
    except TargetError:
        pass
    old = adapter_cfg.get("targets")
    names = [old] if isinstance(old, str) else list(old or [])
    new = fallback
    if names and all("embed" in n for n in names):
        emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
        new = next(([n] for n, m in model.named_modules() if m is emb and emb is not None), fallback)
    return {**adapter_cfg, "targets": new}, "; ".join(x for x in (note, f"targets {old} are not in this model: "
                                                                     f"used {new}") if x)


def _fit_trainable(model: nn.Module, adapter_cfg: dict) -> tuple[dict, str | None]:
    """Trainable modules a method file names for another architecture (LongLoRA's Llama ``embed_tokens`` and
    ``*norm``) by their role in this model: a name with "embed" is the input embedding, a name with "norm" every
    normalisation layer (``LayerNorm``/``RMSNorm`` modules); names found as they are stay."""
    from ..targets import resolve_trainable

    names = list(adapter_cfg.get("trainable") or [])
    missing = [t for t in names if not resolve_trainable(model, [t], strict=False)]
    if not missing:
        return adapter_cfg, None
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    out = [t for t in names if t not in missing]
    for t in missing:
        if "embed" in t.lower():
            found = [p for p, m in model.named_modules() if emb is not None and m is emb]
        elif "norm" in t.lower():
            found = [p for p, m in model.named_modules() if p and "norm" in type(m).__name__.lower()]
        else:
            found = []
        out += [p for p in found if p not in out]
    shown = ", ".join(out[:4]) + (f", ... ({len(out)} modules)" if len(out) > 4 else "")
    return {**adapter_cfg, "trainable": out}, f"trainable {missing} are not in this model: trained {shown}"


def _search(make_meta, adapter_cfg: dict, knob, target: int, vals: list[int]) -> dict[int, int]:
    """Counts at the values needed to find the one closest to ``target``: the two ends, then a bisection (the
    count grows with a rank-like knob), so ~7 probes instead of one per candidate. A value the method rejects
    (e.g. too large for a layer) is skipped; if one falls inside the bisection every value is probed."""
    memo: dict[int, int | None] = {}

    def count(v: int) -> int | None:
        if v not in memo:
            try:
                memo[v] = trainable_count(make_meta, _set(adapter_cfg, knob, v))
            except Exception as e:  # an invalid value for this method
                log.debug("budget probe %s=%s failed: %s", _name(knob), v, e)
                memo[v] = None
        return memo[v]

    lo, hi = 0, len(vals) - 1
    while lo <= hi and count(vals[lo]) is None:
        lo += 1
    while hi >= lo and count(vals[hi]) is None:
        hi -= 1
    if lo < hi and count(vals[lo]) != count(vals[hi]):
        up = count(vals[hi]) > count(vals[lo])  # RandLoRA's count falls as r grows (fewer, larger bases)
        a, b = lo, hi
        while a < b:
            c = count(vals[(a + b) // 2])
            if c is None:
                for v in vals[lo:hi + 1]:
                    count(v)
                break
            past = c >= target if up else c <= target
            a, b = (a, (a + b) // 2) if past else ((a + b) // 2 + 1, b)
        count(vals[a])
        if a > lo:
            count(vals[a - 1])
    return {v: n for v, n in memo.items() if n is not None}


def match_budget(make_meta: Callable[[], nn.Module], adapter_cfg: dict, target: int,
                 candidates=CANDIDATES) -> tuple[dict, dict]:
    """Pick the knob value whose trainable count is closest to ``target`` (in log ratio).

    Returns (adapter config, info): info says which knob was used, its value, the count and the target, and
    ``matched`` (within 2x). Unmatched methods keep their own (paper) configuration.
    """
    knobs = rank_knobs(adapter_cfg["method"])
    cap = full_rank(make_meta, adapter_cfg)
    clamped = [k for k in knobs if isinstance(k, str) and k in RANK_LIKE and cap is not None
               and isinstance(adapter_cfg.get(k), int) and adapter_cfg[k] > cap]
    if clamped:  # a paper rank larger than this model's layers (LoLDU's 768 on a 576-wide model): full rank
        adapter_cfg = {**adapter_cfg, **{k: cap for k in clamped}}
    own = trainable_count(make_meta, adapter_cfg)
    exempt = get_method(adapter_cfg["method"]).budget_exempt
    if exempt:
        return adapter_cfg, {"matched": False, "reason": exempt, "trainable": own, "target": target}
    if not knobs:
        return adapter_cfg, {"matched": False, "reason": "no rank-like knob", "trainable": own, "target": target}
    tried = []
    for knob in knobs:
        counts = _search(make_meta, adapter_cfg, knob, target,
                         [v for v in candidates if not (cap is not None and knob in RANK_LIKE and v > cap)])
        if len(set(counts.values())) <= 1:
            tried.append(_name(knob))
            continue
        v, n = min(counts.items(), key=lambda kv: (abs(math.log(max(kv[1], 1) / target)), kv[0]))
        if 0.5 <= n / target <= 2.0:
            return _set(adapter_cfg, knob, v), {"matched": True, "knob": _name(knob), "value": v, "trainable": n,
                                                "target": target}
        k = _name(knob)
        return adapter_cfg, {"matched": False, "knob": k, "trainable": own, "target": target,
                             "reason": f"{k} cannot reach the budget (closest {k}={v}: {n:,} trainable, "
                                       f"{n / target:.2g}x); paper settings kept"}
    return adapter_cfg, {"matched": False, "trainable": own, "target": target,
                         "reason": f"trainable count does not depend on {', '.join(tried)}; paper settings kept"}
