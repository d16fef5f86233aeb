import torch

import lorakit
from _moe import attached, x


def test_residual_identity_and_uniform_full_routing_preserves_output():
    torch.manual_seed(0)
    from conftest import MLP

    base = MLP()
    w0 = base.lin0.weight.detach().clone()
    ref = base(x()).detach()
    m = attached("goat", r=4, num_experts=2, top_k=2, scaling="goat")
    a = dict(lorakit.adapters(m))["lin0"]
    s = a.expert_scale()
    assert abs(s - (3 * 12 / 2) ** 0.5) < 1e-9  # √(3η d_in / r_e)
    W_res = m.lin0.base_layer.weight
    recon = W_res + 0.5 * s * torch.einsum("eor,eri->oi", a.experts_B, a.experts_A)
    torch.testing.assert_close(recon, w0, rtol=1e-5, atol=1e-5)
    for _, ad in lorakit.adapters(m):  # uniform router, top_k = E -> output == base
        with torch.no_grad():
            ad.router.weight.zero_()
    torch.testing.assert_close(m.eval()(x()), ref, rtol=1e-4, atol=1e-4)
    segs = a.segments(12)
    assert [list(r) for r in segs] == [[0, 1], [6, 7]]  # first r_e of each segment, disjoint


def test_goat_mini_takes_last_components():
    m = attached("goat", r=4, num_experts=2, init="goat_mini")
    assert [list(r) for r in dict(lorakit.adapters(m))["lin0"].segments(12)] == [[4, 5], [10, 11]]
