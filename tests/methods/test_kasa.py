"""KaSA mechanism: the truncation drops exactly the bottom-r singular values; zero update at init; the regulariser
equals its formula; merge→unmerge returns the truncated base; detach restores W0."""
import torch

import lorakit
from conftest import MLP


def _model(r=3, **kw):
    torch.manual_seed(0)
    m = MLP(d_in=12, d_h=16)
    lorakit.attach(m, {"method": "kasa", "targets": ["lin0", "lin1"], "r": r, **kw})
    return m


def test_truncation_drops_bottom_r():
    torch.manual_seed(0)
    ref = MLP(d_in=12, d_h=16)
    m = _model(r=3)
    for name, k in (("lin0", 12), ("lin1", 16)):
        w0 = getattr(ref, name).weight.detach()
        wt = getattr(m, name).base_layer.weight.detach()
        s0 = torch.linalg.svdvals(w0)
        st = torch.linalg.svdvals(wt)
        assert torch.allclose(st[: k - 3], s0[: k - 3], atol=1e-5)
        assert st[k - 3:].abs().max() < 1e-5  # rank k − r
        assert abs(torch.linalg.norm(w0 - wt) - torch.linalg.norm(s0[k - 3:])) < 1e-5
        a = getattr(m, name).adapters["default"]
        assert a.delta_weight().abs().max() == 0  # B = 0: the adapter adds nothing at init


def test_extra_loss_is_the_official_block_mean():
    """Official juyongjiang/KaSA ``main.py`` ``loss_fn``: (β·Σ‖ΔΣ‖² + γ·Σ orth) / block_num, block_num = number of
    KaSA modules (``lora_diag`` parameters), with the paper's Eq. 11 rank-space orthogonality terms."""
    m = _model(beta=0.3, gamma=0.7)
    g = torch.Generator().manual_seed(2)
    l2, l3, blocks = 0.0, 0.0, 0
    with torch.no_grad():
        for _, a in lorakit.adapters(m):
            a.lora_B.weight.copy_(torch.randn(a.lora_B.weight.shape, generator=g))
            A, B, d = a.lora_A.weight, a.lora_B.weight, a.lora_diag
            I = torch.eye(3)
            blocks += 1
            l2 += (d ** 2).sum()
            l3 += torch.linalg.norm(B.T @ B - I) + torch.linalg.norm(A @ A.T - I)
    assert blocks == 2
    ref = (0.3 * l2 + 0.7 * l3) / blocks
    assert torch.allclose(lorakit.extra_loss(m), ref, atol=1e-5)


def test_merge_unmerge_returns_truncated_base_and_detach_restores_w0():
    torch.manual_seed(0)
    w0 = MLP(d_in=12, d_h=16).lin1.weight.detach().clone()
    m = _model()
    wt = m.lin1.base_layer.weight.detach().clone()
    with torch.no_grad():
        m.lin1.adapters["default"].lora_B.weight.normal_()
    with lorakit.merged(m):
        assert not torch.allclose(m.lin1.base_layer.weight, wt)
    assert torch.equal(m.lin1.base_layer.weight, wt)
    lorakit.detach(m)
    assert torch.equal(m.lin1.weight, w0)
