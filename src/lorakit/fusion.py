"""Horizontal fusion of LoRA down-projections for inference: one ``x·[A_q; A_k; A_v]ᵀ`` GEMM for the adapters of
sibling layers that read the same input (q/k/v_proj of an attention block, gate/up_proj of an MLP).

Why: an unmerged LoRA forward adds two skinny GEMMs per layer. ``x·Aᵀ`` has only ``r`` output columns and runs far
below the base GEMM's efficiency on CPU (docs/benchmarks.md: ~22 vs ~52 GFLOP/s at r=16); stacking the A factors of
the layers that share an input gives one GEMM with ``3r`` (or ``2r``) columns and a third of the calls.

How (no model-specific table): an attach's adapters that declare ``Adapter.fuse_down`` are grouped by parent module
(``DownGroup``); which of them share an input is *observed*: during the first no-grad forward the group records the
runs of consecutive calls that receive the very same input tensor (``x is previous x``); from the next forward on,
the first adapter of a run computes ``x·[A_1; ...; A_k]ᵀ`` once (the stacked factor cached, rebuilt when a factor
changes) and each member takes its column slice (a view: the following ``addmm`` reads it strided, no copy). A member
that is called with another tensor, or with the same tensor modified in place, computes its own ``x·Aᵀ``, so the
result never depends on the plan being right. Only used without autograd (training keeps separate GEMMs: the
stacked factor would need a gradient split) and where the adapter's input is ``x`` itself (eval mode or no dropout).

Values: each output column is the same dot product as in ``x·A_iᵀ``; the GEMM's blocking over the wider matrix may
round the last bit differently (well inside the 1e-5 of the PEFT parity tests).
"""
from __future__ import annotations

import weakref

import torch
from torch import Tensor
from torch.nn import functional as F

__all__ = ["DownGroup", "group_by_parent"]


class _Run:
    """Adapters that receive one input tensor, in call order; the stacked factor and the current fused output."""

    def __init__(self, members: list):
        self.members = members
        self.offsets = {}
        o = 0
        for a in members:
            r = a.lora_A.weight.shape[0]
            self.offsets[a] = (o, o + r)
            o += r
        self._cat: Tensor | None = None
        self._key = None
        self.x = None  # weakref of the input of the fused GEMM
        self.version = -1
        self.h: Tensor | None = None
        self.left = 0

    def weight(self) -> Tensor:
        ws = [a.lora_A.weight for a in self.members]
        key = tuple((w.data_ptr(), w._version, w.dtype, w.device) for w in ws)
        if key != self._key:
            self._cat, self._key = torch.cat([w.detach() for w in ws]), key
        return self._cat


class DownGroup:
    """The ``fuse_down`` adapters of one parent module (see the module docstring)."""

    def __init__(self, members: list):
        self.members = list(members)
        self.runs: dict | None = None  # adapter -> _Run once learned
        self._calls: list = []  # first forward: (adapter, same input as the previous call)
        self._last = None

    def reset(self) -> None:
        self.runs, self._calls, self._last = None, [], None

    def _learn(self, a, x: Tensor) -> None:
        if any(b is a for b, _ in self._calls):  # a second forward began: the first one's calls are the plan
            runs: list[list] = []
            for b, same in self._calls:
                if same and runs:
                    runs[-1].append(b)
                else:
                    runs.append([b])
            self.runs = {}
            for members in runs:
                ok = len(members) > 1 and len({(m.lora_A.weight.dtype, m.lora_A.weight.device,
                                                m.lora_A.weight.shape[1]) for m in members}) == 1
                run = _Run(members) if ok else None
                for m in members:
                    self.runs[m] = run
            self._calls, self._last = [], None
            return
        prev = self._last() if self._last is not None else None
        self._calls.append((a, prev is x))
        self._last = weakref.ref(x)

    def down(self, a, x: Tensor) -> Tensor:
        """``x·A_aᵀ`` for member ``a`` (fused with its run when it can)."""
        if self.runs is None:
            self._learn(a, x)
            if self.runs is None:
                return F.linear(x, a.lora_A.weight)
        run = self.runs.get(a)
        if run is None:
            return F.linear(x, a.lora_A.weight)
        lo, hi = run.offsets[a]
        if a is run.members[0]:
            run.h = F.linear(x, run.weight())
            run.x, run.version, run.left = weakref.ref(x), x._version, len(run.members) - 1
            return run.h[..., lo:hi]
        if run.h is not None and run.x is not None and run.x() is x and x._version == run.version:
            h = run.h[..., lo:hi]
            run.left -= 1
            if run.left <= 0:
                run.h = run.x = None
            return h
        return F.linear(x, a.lora_A.weight)


def group_by_parent(members) -> list[DownGroup]:
    """One :class:`DownGroup` per parent module path of ``(path, adapter)`` pairs with two or more adapters."""
    by: dict[str, list] = {}
    for path, a in members:
        by.setdefault(path.rpartition(".")[0], []).append(a)
    return [DownGroup(v) for v in by.values() if len(v) > 1]
