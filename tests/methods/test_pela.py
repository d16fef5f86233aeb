"""PELA mechanism: the layer becomes R L with k = ⌊d_in d_out / (c (d_in + d_out))⌋; at init RL is the
Eckart–Young optimum (‖W − RL‖_F = ‖σ_{k+1:}‖), the factors hold ≤ 1/c of the weights, detach restores W."""
import torch

import lorakit
from lorakit.methods.pela import pela_rank
from conftest import MLP


def test_low_rank_approximation_error_and_size():
    torch.manual_seed(0)
    m = MLP(d_in=40, d_h=48, d_out=10)
    W0 = m.lin1.weight.detach().clone()
    lorakit.attach(m, {"method": "pela", "targets": ["lin1"]})
    a = dict(lorakit.adapters(m))["lin1"]
    k = pela_rank(48, 48, 3.0)
    assert a.k == k == 8
    S = torch.linalg.svdvals(W0)
    err = torch.linalg.norm(W0 - a.delta_weight())
    assert torch.allclose(err, S[k:].norm(), rtol=1e-4)
    n = sum(p.numel() for p in a.parameters())
    assert n <= W0.numel() / 3
    assert torch.equal(m.lin1.base_layer.weight, torch.zeros_like(W0))  # the layer IS R L (+ bias)
    x = torch.randn(3, 48)
    assert torch.allclose(m.lin1(x), x @ a.delta_weight().T + m.lin1.base_layer.bias, atol=1e-5)
    lorakit.detach(m)
    assert torch.equal(m.lin1.weight, W0)
