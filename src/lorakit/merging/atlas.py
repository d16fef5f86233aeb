"""aTLAS: knowledge composition with learned anisotropic scaling of task vectors (Zhang et al., "Knowledge
Composition using Task Vectors with Learned Anisotropic Scaling", NeurIPS 2024, arXiv:2407.02880; code
github.com/fredzzhang/atlas, ``WeightedImageEncoder``).

``θ = θ_0 + Σ_t Σ_b λ_{t,b} τ_{t,b}``: one learnable coefficient per task ``t`` and parameter *block* ``b``. The
official code's blocks are the model's parameter tensors; here the task vectors are the attached adapters' updates
``ΔW_t`` and a block is one adapted module (a LoRA's update of one weight matrix), so there are ``T × B``
coefficients. The base and the task vectors stay frozen; only ``λ`` trains, by gradient descent on the downstream
loss over a few examples (:meth:`ATLAS.fit`). ``λ`` starts at 0 as in the official code (``init=`` to start
elsewhere). ``blockwise=False`` gives one coefficient per task (the paper's isotropic variant). The paper's random
``partition`` of blocks and the linearised variant are not implemented.

The update ``Σ_t λ_{t,b} ΔW_{t,b} x`` is applied by a forward hook through each task's factors (``ΔW_t = s_t B_t A_t``),
so training costs the rank-r products, never a dense ΔW. With every ``λ_{t,b} = w_t`` it is task arithmetic with
weights ``w`` (tested against ``combine(method="linear")``). :meth:`ATLAS.to_adapter` bakes the learned coefficients
into a plain LoRA (the concatenation ``[λ_{1,b} B_1 … ]``, exact).
"""
from __future__ import annotations

from typing import Callable, Iterable, Sequence

import torch
from torch import Tensor, nn

from ..errors import ConfigError
from .combine import attach_factors, sources

__all__ = ["ATLAS", "atlas"]


class _Block:
    def __init__(self, owner: "ATLAS", b: int, factors: list[tuple[int, Tensor, Tensor]]):
        self.owner, self.b, self.factors = owner, b, factors

    def __call__(self, module, args, out):
        if not self.owner.enabled:
            return out
        x = args[0]
        lam = self.owner.coefficients()
        extra = 0
        for t, A, B in self.factors:
            extra = extra + lam[t, self.b] * ((x.to(A.dtype) @ A.t()) @ B.t())
        return out + extra.to(out.dtype)


class ATLAS(nn.Module):
    """The model with the task vectors hooked in and ``lam`` (T, B) (or (T, 1) isotropic) as the only trainable
    parameters. The attached source adapters are made inactive (their updates enter only through ``lam``)."""

    def __init__(self, model: nn.Module, adapters: Sequence[str], *, blockwise: bool = True,
                 init: float | Sequence[float] = 0.0):
        super().__init__()
        from ..inject import set_active

        srcs = sources(model, list(adapters))
        for path, ss in srcs.items():
            if any(s.adapter.view.kind == "embedding" for s in ss):
                raise ConfigError(f"aTLAS applies task vectors to linear layers; '{path}' is an embedding")
        self.model = model
        self.adapters = list(adapters)
        self.paths = list(srcs)
        T, nb = len(self.adapters), len(self.paths)
        w = torch.as_tensor(init, dtype=torch.float32)
        if w.dim() == 0:
            w = w.expand(T)
        if w.shape != (T,):
            raise ConfigError(f"init takes one number or {T} (one per task), got shape {tuple(w.shape)}")
        self.blockwise = bool(blockwise)
        self.lam = nn.Parameter(w[:, None].repeat(1, nb if blockwise else 1).clone())
        set_active(model, [], trainable=True)  # freezes every model parameter
        self.enabled = True
        idx = {n: i for i, n in enumerate(self.adapters)}
        self.factors: dict[str, list[tuple[int, Tensor, Tensor]]] = {}
        self._handles = []
        for b, path in enumerate(self.paths):
            fs = [(idx[s.name], *s.factors()) for s in srcs[path]]
            self.factors[path] = fs
            self._handles.append(model.get_submodule(path).register_forward_hook(_Block(self, b, fs)))

    def coefficients(self) -> Tensor:
        """``λ`` as (T, B) (the isotropic column broadcast to every block)."""
        return self.lam if self.blockwise else self.lam.expand(-1, len(self.paths))

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def forward(self, *args, **kw):
        return self.model(*args, **kw)

    def fit(self, batches: Iterable[dict], *, steps: int = 50, lr: float = 1e-2,
            loss_fn: Callable[[nn.Module, dict], Tensor] | None = None) -> list[float]:
        """Adam on ``λ`` only, ``steps`` steps over ``batches`` (cycled); the loss is ``model(**batch).loss`` or
        ``loss_fn(model, batch)``. Returns the losses."""
        data = list(batches)
        if not data:
            raise ConfigError("aTLAS.fit needs at least one batch")
        opt = torch.optim.Adam([self.lam], lr=lr)
        losses = []
        was = self.model.training
        self.model.eval()  # dropout off: only λ is learned
        try:
            for i in range(int(steps)):
                b = data[i % len(data)]
                loss = loss_fn(self.model, b) if loss_fn is not None else self.model(**b).loss
                opt.zero_grad()
                loss.backward()
                opt.step()
                losses.append(float(loss.detach()))
        finally:
            self.model.train(was)
        return losses

    @torch.no_grad()
    def to_adapter(self, name: str = "atlas") -> nn.Module:
        """Remove the hooks and attach the learned composition as a plain LoRA ``name`` (exact concatenation)."""
        lam = self.coefficients().detach()
        out = {}
        for b, path in enumerate(self.paths):
            fs = self.factors[path]
            out[path] = (torch.cat([A for _, A, _ in fs], 0),
                         torch.cat([B * float(lam[t, b]) for t, _, B in fs], 1))
        self.remove()
        attach_factors(self.model, out, name, meta={"method": "atlas", "adapters": self.adapters,
                                                      "lambda": lam.tolist()})
        return self.model


def atlas(model: nn.Module, adapters: Sequence[str], **kw) -> ATLAS:
    """:class:`ATLAS` over the attached ``adapters``."""
    return ATLAS(model, adapters, **kw)
