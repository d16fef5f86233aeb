import math

import torch

import lorakit
from lorakit.methods.dynmole import tsallis_normalised
from _moe import attached, fill, x


def test_uniform_entropy_is_one_and_activates_all():
    p = torch.full((3, 5), 0.2)
    torch.testing.assert_close(tsallis_normalised(p, 1.1), torch.ones(3), rtol=1e-4, atol=1e-4)


def test_mask_and_aux_loss_vs_formula():
    m = attached("dynmole", r=2, num_experts=4)
    fill(m, std=1.0)
    m.train()
    m(x())
    a = dict(lorakit.adapters(m))["lin0"]
    p, w = a._probs.detach(), a._weights.detach()
    assert ((w > 0).sum(-1) >= 2).all()  # keep_top_k
    q, E = 1.1, 4
    H = ((1 - p.clamp_min(1e-5).pow(q).sum(-1)) / (q - 1)) / ((1 - E ** (1 - q)) / (q - 1))
    hi = H > 0.9
    assert ((w > 0).sum(-1)[hi] == 4).all()
    torch.testing.assert_close(w[~hi].sum(-1) <= 1 + 1e-6, torch.ones_like(w[~hi].sum(-1), dtype=torch.bool))
    f, P = w.reshape(-1, E).mean(0), p.reshape(-1, E).mean(0)
    ref = 0.01 * H.mean() + 0.001 * E * (f * P).sum()
    torch.testing.assert_close(a.extra_loss().detach(), ref, rtol=1e-4, atol=1e-7)
