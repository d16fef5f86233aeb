"""Twin-Merging: shared + exclusive knowledge, mixed per input (Lu et al., "Twin-Merging: Dynamic Integration of
Modular Expertise in Model Merging", NeurIPS 2024, arXiv:2406.15479; code github.com/LZY-the-boys/Twin-Merging).

Per adapted module, with task updates ``ΔW_t`` (the attached adapters):

1. *Shared expert*: ``ΔW* = λ Σ_t w_t ΔW_t`` (task arithmetic; the authors' configs use λ = 0.29/0.3), attached as
   a plain LoRA named ``name`` (exact: concatenated factors).
2. *Exclusive knowledge*: ``τ_t = ΔW_t − ΔW*`` compressed by a truncated SVD to rank ``rank`` (the official
   ``mask_strategy="svd"`` keeps 10% of ``min(d_out, d_in)``; for LoRA tasks ``τ_t`` has rank ≤ r_t + rank(ΔW*), and
   our default keeps the task adapter's rank ``r_t``). Stored as factors ``(Ã_t, B̃_t)``.
3. *Router*: an MLP on the input's representation under the shared model (our choice of representation: the
   mean over non-padding positions of the last hidden state; the official router reads the merged model's sentence
   representation), three linear layers as the official ``SimpleMLP`` (hidden size ``router_hidden``), trained with
   cross-entropy to predict the task id on a few labelled examples (:meth:`TwinMerged.fit_router`).
4. *Inference*: per input ``x``, ``ω = softmax(router(h(x)))`` and the layer computes ``(W + ΔW* + Σ_t ω_t B̃_tÃ_t) x``.
   The official code materialises ``θ* + Σ_t ω_t τ̃_t`` per batch with ``functional_call``; the exclusive parts are
   linear in ``ω``, so applying them per *sample* through their factors is the same function, without one weight copy
   per input, and a batch may mix tasks.

:meth:`TwinMerged.route` fixes ``ω`` by hand (a one-hot ``ω = e_t`` gives ``ΔW* + τ̃_t``, and ``ΔW_t`` exactly when the
SVD keeps the full rank: tested).
"""
from __future__ import annotations

import contextlib
from typing import Iterable, Sequence

import torch
from torch import Tensor, nn

from ..errors import ConfigError
from .combine import attach_factors, sources, _weights
from .functions import svd_factors

__all__ = ["TwinMerged", "twin_merge", "Router"]


class Router(nn.Module):
    """Three linear layers with ReLU (the official ``SimpleMLP``): representation -> task logits."""

    def __init__(self, d: int, n_tasks: int, hidden: int = 1024):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(d, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                                 nn.Linear(hidden, n_tasks))

    def forward(self, h: Tensor) -> Tensor:
        return self.net(h)


class _Exclusive:
    """The forward hook of one host: adds ``Σ_t ω[b, t] B̃_t Ã_t x`` for the current ``ω`` (None: nothing)."""

    def __init__(self, owner: "TwinMerged", factors: list[tuple[int, Tensor, Tensor]]):
        self.owner, self.factors = owner, factors

    def __call__(self, module, args, out):
        w = self.owner._omega
        if w is None:
            return out
        x = args[0]
        extra = 0
        for t, A, B in self.factors:
            wt = w[:, t].to(out.dtype).view(-1, *([1] * (out.dim() - 1)))
            extra = extra + wt * ((x.to(A.dtype) @ A.t()) @ B.t()).to(out.dtype)
        return out + extra


class TwinMerged(nn.Module):
    """The model with the shared expert attached (as adapter ``name``), the exclusive factors and a router.
    Calling it routes each input (or uses the fixed ``ω`` of :meth:`route`), then runs the model."""

    def __init__(self, model: nn.Module, name: str, exclusive: dict[str, list[tuple[int, Tensor, Tensor]]],
                 n_tasks: int, router_hidden: int = 1024):
        super().__init__()
        self.model = model
        self.name = name
        self.n_tasks = n_tasks
        d = getattr(getattr(model, "config", None), "hidden_size", None)
        if d is None:
            raise ConfigError("Twin-Merging's router reads the model's hidden_size from model.config")
        self.router = Router(int(d), n_tasks, router_hidden)
        self._omega: Tensor | None = None
        self._fixed: Tensor | None = None
        self._handles = []
        self.exclusive = exclusive
        for path, fs in exclusive.items():
            self._handles.append(model.get_submodule(path).register_forward_hook(_Exclusive(self, fs)))

    def remove(self) -> None:
        """Take the exclusive hooks off (the shared adapter stays attached)."""
        for h in self._handles:
            h.remove()
        self._handles = []

    @torch.no_grad()
    def features(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        """The router's input: the mean last hidden state of the shared model over non-padding positions."""
        saved, self._omega = self._omega, None
        try:
            out = self.model(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True)
        finally:
            self._omega = saved
        h = out.hidden_states[-1].float()
        m = torch.ones(h.shape[:2], device=h.device) if attention_mask is None else attention_mask.float()
        return (h * m[..., None]).sum(1) / m.sum(1, keepdim=True).clamp_min(1.0)

    def fit_router(self, batches: Iterable[tuple[dict, Tensor]], *, epochs: int = 20, lr: float = 1e-3,
                   seed: int = 0) -> list[float]:
        """Train the router on ``(batch, task ids)`` pairs (cross-entropy; the features are computed once)."""
        feats, ys = [], []
        for b, y in batches:
            feats.append(self.features(b["input_ids"], b.get("attention_mask")))
            ys.append(torch.as_tensor(y, dtype=torch.long))
        if not feats:
            raise ConfigError("fit_router needs at least one labelled batch")
        X, Y = torch.cat(feats), torch.cat(ys).to(feats[0].device)
        if int(Y.min()) < 0 or int(Y.max()) >= self.n_tasks:
            raise ConfigError(f"task ids must be in [0, {self.n_tasks}), got {sorted(set(Y.tolist()))}")
        mu, sd = X.mean(0), X.std(0).clamp_min(1e-6)
        self.register_buffer("feat_mu", mu)
        self.register_buffer("feat_sd", sd)
        g = torch.Generator().manual_seed(seed)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            for p in self.router.parameters():
                nn.init.normal_(p, std=0.02) if p.dim() > 1 else nn.init.zeros_(p)
        opt = torch.optim.Adam(self.router.parameters(), lr=lr)
        losses = []
        self.router.train()
        for _ in range(epochs):
            perm = torch.randperm(len(X), generator=g)
            for i in range(0, len(X), 32):
                idx = perm[i:i + 32]
                loss = nn.functional.cross_entropy(self.router((X[idx] - mu) / sd), Y[idx])
                opt.zero_grad()
                loss.backward()
                opt.step()
                losses.append(float(loss.detach()))
        self.router.eval()
        return losses

    @torch.no_grad()
    def omega(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        """``softmax(router(h(x)))`` per input, (batch, T)."""
        h = self.features(input_ids, attention_mask)
        if hasattr(self, "feat_mu"):
            h = (h - self.feat_mu) / self.feat_sd
        return torch.softmax(self.router(h), -1)

    @contextlib.contextmanager
    def route(self, weights: Sequence[float] | Tensor):
        """Use the fixed mixture ``weights`` (T,) for every input inside the block."""
        w = torch.as_tensor(weights, dtype=torch.float32)
        if w.shape != (self.n_tasks,):
            raise ConfigError(f"route() takes {self.n_tasks} weights, got shape {tuple(w.shape)}")
        saved, self._fixed = self._fixed, w
        try:
            yield self
        finally:
            self._fixed = saved

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None, **kw):
        if self._fixed is not None:
            w = self._fixed.to(input_ids.device)[None].expand(input_ids.shape[0], -1)
        else:
            w = self.omega(input_ids, attention_mask)
        self._omega = w
        try:
            return self.model(input_ids=input_ids, attention_mask=attention_mask, **kw)
        finally:
            self._omega = None


def twin_merge(model: nn.Module, adapters: Sequence[str], weights: Sequence[float] | None = None, *,
               lam: float = 0.3, rank: int | str | None = None, name: str = "twin",
               router_hidden: int = 1024) -> TwinMerged:
    """Build Twin-Merging from the attached ``adapters`` (see the module docstring): attaches the shared expert as
    adapter ``name`` (the only active one) and returns the :class:`TwinMerged` wrapper (router untrained: call
    ``fit_router`` or use ``route``). ``rank``: the exclusive parts' rank (None: each task's own rank; ``"full"``:
    lossless)."""
    from ..inject import attached

    if name in attached(model):
        raise ConfigError(f"an adapter named {name!r} is already attached; pick another name")
    if rank is not None and rank != "full" and (isinstance(rank, bool) or not isinstance(rank, int) or rank < 1):
        raise ConfigError(f"rank must be a positive integer, 'full' or None, got {rank!r}")
    wd = _weights(adapters, weights)
    srcs = sources(model, list(adapters))
    for path, ss in srcs.items():
        if any(s.adapter.view.kind == "embedding" for s in ss):
            raise ConfigError(f"Twin-Merging's per-input exclusive parts work on linear layers; '{path}' is an "
                              "embedding")
    shared, exclusive = {}, {}
    idx = {n: i for i, n in enumerate(adapters)}
    for path, ss in srcs.items():
        fs = [s.factors() for s in ss]
        A = torch.cat([a for a, _ in fs], 0)
        B = torch.cat([b * (wd[s.name] * lam) for s, (_, b) in zip(ss, fs)], 1)
        shared[path] = (A, B)
        dstar = B @ A
        ex = []
        own = {s.name: f for s, f in zip(ss, fs)}
        for n in adapters:  # a task that does not adapt this module has τ_t = 0 − ΔW* there
            a, b = own.get(n, (None, None))
            k = None if rank == "full" else (rank if rank is not None else
                                              (a.shape[0] if a is not None else max(x.shape[0] for x, _ in fs)))
            ea, eb = svd_factors((b @ a if a is not None else 0) - dstar, k)
            ex.append((idx[n], ea, eb))
        exclusive[path] = ex
    attach_factors(model, shared, name, meta={"method": "twin", "adapters": list(adapters), "lambda": lam})
    from ..inject import set_active

    set_active(model, [name], trainable=False)
    return TwinMerged(model, name, exclusive, len(adapters), router_hidden)
