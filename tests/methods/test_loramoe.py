import torch

import lorakit
from lorakit.methods.loramoe import lbc_loss
from _moe import attached, fill, x


def test_dense_routing_and_lbc_loss_formula():
    m = attached("loramoe", r=2, num_experts=4, blc_alpha=0.2, blc_weight=0.5)
    fill(m)
    m.train()
    types = torch.tensor([1, 0, 1, 0, 0, 1])
    with lorakit.batch_context(m, task_types=types):
        m(x())
    a = dict(lorakit.adapters(m))["lin0"]
    w = a._weights.detach()
    assert (w > 0).all()  # dense
    Q = w.sum(1)  # (batch, E)
    I = torch.empty_like(Q)
    for b in range(6):
        for i in range(4):
            I[b, i] = 1.2 if (i < 2) == (types[b] == 1) else 0.8
    v = (Q * I).flatten()
    ref = 0.5 * v.var() / v.mean() ** 2
    torch.testing.assert_close(a.extra_loss(), ref, rtol=1e-4, atol=1e-6)
    assert float(lbc_loss(torch.ones(2, 3, 4), torch.tensor([0, 1]), 0.0)) < 1e-8  # constant Q⊙I -> 0
    m(x())  # outside the context: no types, no loss
    assert a.extra_loss() is None
