"""DP-SGD on the trained factor (lorakit.federated.dp): per-example clipping and Gaussian noise exactly as
g̃ = (Σ_i clip_C(g_i) + N(0, σ²C²)) / B, checked against per-example gradients computed here one by one; the
privacy accountant's ε behaves as (σ, q, steps) say."""
from __future__ import annotations

import pytest
import torch

from lorakit.federated.dp import DPSGD, epsilon

B, D = 6, 40


def _setup(seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.nn.Parameter(torch.randn(3, D, generator=g) * 0.1)
    head = torch.nn.Parameter(torch.randn(2, 3, generator=g))
    xs, ys = torch.randn(B, D, generator=g) * 3, torch.randint(0, 2, (B,), generator=g)
    return w, head, xs, ys


def _loss(w, head, x, y):
    return torch.nn.functional.cross_entropy((head @ torch.tanh(w @ x))[None], y[None])


def _per_example(w, head, xs, ys):
    out = []
    for x, y in zip(xs, ys):
        gw, gh = torch.autograd.grad(_loss(w, head, x, y), [w, head])
        out.append((gw, gh))
    return out


def _run_dp(w, head, xs, ys, clip, noise, gen=None):
    dp = DPSGD([w, head], batch=B, clip=clip, noise=noise, generator=gen)
    for x, y in zip(xs, ys):  # the trainer: one example per micro-batch, loss / grad_accum
        (_loss(w, head, x, y) / B).backward()
    dp.remove()
    return w.grad.clone(), head.grad.clone(), dp


@pytest.mark.parametrize("clip", [1e6, 0.05])
def test_dp_gradient_is_the_mean_of_clipped_per_example_gradients(clip):
    w, head, xs, ys = _setup()
    per = _per_example(w, head, xs, ys)
    want_w, want_h = torch.zeros_like(w), torch.zeros_like(head)
    for gw, gh in per:
        f = min(1.0, clip / float(torch.sqrt(gw.pow(2).sum() + gh.pow(2).sum())))
        want_w += f * gw / B
        want_h += f * gh / B
    got_w, got_h, dp = _run_dp(w, head, xs, ys, clip, noise=0.0)
    torch.testing.assert_close(got_w, want_w, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(got_h, want_h, atol=1e-6, rtol=1e-5)
    if clip < 1:
        assert all(n > clip for n in dp.norms)  # every example was clipped, so the mean has norm <= C
        assert float(torch.sqrt(got_w.pow(2).sum() + got_h.pow(2).sum())) <= clip + 1e-6


def test_dp_noise_has_std_sigma_c_over_b():
    w, head, xs, ys = _setup(1)
    clean_w, _, _ = _run_dp(w, head, xs, ys, clip=0.5, noise=0.0)
    devs = []
    for s in range(40):
        w.grad = head.grad = None
        noisy_w, _, _ = _run_dp(w, head, xs, ys, clip=0.5, noise=2.0, gen=torch.Generator().manual_seed(s))
        devs.append(noisy_w - clean_w)
    std = float(torch.stack(devs).std())
    assert std == pytest.approx(2.0 * 0.5 / B, rel=0.1)


def test_epsilon_follows_noise_rate_and_steps():
    e = epsilon(1.0, 0.01, 100, 1e-5)
    assert 0 < e < float("inf")
    assert epsilon(2.0, 0.01, 100, 1e-5) < e  # more noise: more private
    assert epsilon(1.0, 0.01, 400, 1e-5) > e  # more steps: less private
    assert epsilon(1.0, 0.05, 100, 1e-5) > e  # larger sampling rate: less private
