"""LoLDU mechanism: P·L·D·U reconstructs W, L is unit lower / U unit upper, the residual base plus the trained
part is W0 at init, and only r numbers train per layer."""
import torch

import lorakit
from lorakit.methods.loldu import ldu
from conftest import MLP


def test_pldu_reconstructs_w():
    torch.manual_seed(0)
    for shape in [(16, 12), (10, 16), (8, 8)]:
        W = torch.randn(shape)
        P, L, D, U = ldu(W)
        assert torch.allclose(P @ L @ torch.diag(D) @ U, W, atol=1e-5)
        assert torch.allclose(torch.diagonal(L), torch.ones(min(shape)))
        assert torch.allclose(torch.diagonal(U), torch.ones(min(shape)))
        assert torch.equal(L, torch.tril(L)) and torch.equal(U, torch.triu(U))


def test_residual_and_trainable_z():
    torch.manual_seed(0)
    m = MLP()
    W0 = m.lin0.weight.detach().clone()
    lorakit.attach(m, {"method": "loldu", "targets": ["lin0", "lin1"], "r": 4})
    a = dict(lorakit.adapters(m))["lin0"]
    W_res = m.lin0.base_layer.weight.detach()
    assert not torch.allclose(W_res, W0)
    assert torch.allclose(W_res + a.delta_weight(), W0, atol=1e-5)
    P, L, D, U = ldu(W0)
    assert torch.allclose(a.loldu_z, D[:4])
    assert torch.allclose(a.PL, P @ L[:, :4]) and torch.allclose(a.U, U[:4])
    train = [(n, p.numel()) for n, p in m.named_parameters() if p.requires_grad]
    assert [n.rsplit(".", 1)[-1] for n, _ in train] == ["loldu_z"] * 2 and all(k == 4 for _, k in train)
    lorakit.detach(m)
    assert torch.equal(m.lin0.weight, W0)
