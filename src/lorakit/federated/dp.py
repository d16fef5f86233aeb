"""DP-SGD on the trained factor only (FFA-LoRA's B, Fed-SB's R), for federated clients.

DP-SGD (Abadi et al. 2016, arXiv:1607.00133): per example i, clip its gradient g_i to norm ≤ C, sum, add
Gaussian noise ``N(0, σ²C²I)``, divide by the batch size B::

    g̃ = (Σ_i g_i · min(1, C/‖g_i‖) + N(0, σ²C²)) / B

FFA-LoRA (D1) and Fed-SB (D2) apply it to the one trained factor, so the noise enters ΔW linearly ((B+ξ)A,
B(R+ξ)A) instead of through a product of two noisy factors. ``‖g_i‖`` is the norm over every trained tensor of
the client (the factor and, when the task trains one, the classification head).

Implementation (equivalent to Opacus' ``DPOptimizer`` with flat clipping; Opacus itself cannot compute per-example
gradients of lorakit's adapter modules without a grad sampler per method): the client trains with micro-batches of
one example (``data.batch_size=1``, ``train.grad_accum=B``), so every backward pass is one example's gradient.
A ``post_accumulate_grad`` hook per trained parameter takes that gradient off ``.grad``; when every parameter has
reported, the example's gradient is clipped as a whole and added to a running sum; after the B-th example the sum
plus noise, divided by B, is written back to ``.grad``, which the trainer's optimiser step then uses (the trainer's
own ``max_grad_norm`` clipping is off for DP clients). Batches are fixed-size shuffles (the trainer's data order),
accounted as Poisson sampling with rate q = B/n, as Opacus does by default.

Privacy accounting: Opacus' RDP accountant (``opacus.accountants.RDPAccountant``) over the client's cumulative
steps, (ε, δ) reported with every round; record-level DP of each client's data.
"""
from __future__ import annotations

import torch
from torch import nn

from ..errors import LorakitError

__all__ = ["DPSGD", "epsilon"]


def epsilon(noise: float, sample_rate: float, steps: int, delta: float) -> float:
    """ε of ``steps`` DP-SGD steps (noise multiplier σ, sampling rate q) at δ, by Opacus' RDP accountant."""
    try:
        from opacus.accountants import RDPAccountant
    except ImportError:
        raise LorakitError("federated.dp needs Opacus for the privacy accountant: pip install opacus") from None
    acc = RDPAccountant()
    acc.history = [(float(noise), float(min(sample_rate, 1.0)), int(steps))]
    return float(acc.get_epsilon(delta=delta))


class DPSGD:
    """Per-example clipping + Gaussian noise on the gradients of ``params`` (see the module docstring)."""

    def __init__(self, params: list[nn.Parameter], batch: int, clip: float, noise: float,
                 generator: torch.Generator | None = None):
        self.params, self.batch, self.clip, self.noise = list(params), int(batch), float(clip), float(noise)
        self.gen = generator
        self.sum = [torch.zeros_like(p, dtype=torch.float32) for p in self.params]
        self.cur: dict[int, torch.Tensor] = {}
        self.seen = 0
        self.norms: list[float] = []
        self.handles = [p.register_post_accumulate_grad_hook(self._hook(i)) for i, p in enumerate(self.params)]

    def _hook(self, i: int):
        def fn(p: torch.Tensor) -> None:
            # the trainer backpropagates loss / grad_accum; one micro-batch = one example: undo the 1/B
            self.cur[i] = p.grad.detach().float() * self.batch
            p.grad = None
            if len(self.cur) == len(self.params):
                self._example()
        return fn

    def _example(self) -> None:
        norm = torch.sqrt(sum(g.pow(2).sum() for g in self.cur.values()))
        self.norms.append(float(norm))
        f = min(1.0, self.clip / (float(norm) + 1e-12))
        for i, g in self.cur.items():
            self.sum[i] += f * g
        self.cur = {}
        self.seen += 1
        if self.seen == self.batch:
            for p, s in zip(self.params, self.sum):
                noise = torch.randn(s.shape, generator=self.gen, dtype=s.dtype) * (self.noise * self.clip) \
                    if self.noise > 0 else torch.zeros_like(s)
                p.grad = ((s + noise.to(s.device)) / self.batch).to(p.dtype)
                s.zero_()
            self.seen = 0

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []
