import torch

import lorakit
from _moe import attached, fill, x


def test_top1_output_is_single_expert_lora():
    m = attached("llava_mole", r=2, num_experts=3)
    fill(m)
    a = dict(lorakit.adapters(m))["lin0"]
    xi = x()
    with torch.no_grad():
        out = a.delta(xi)
        e = (xi @ a.router.weight.t()).argmax(-1)
        ref = torch.einsum("...ri,...i->...r", a.experts_A[e], xi)
        ref = torch.einsum("...or,...r->...o", a.experts_B[e], ref) * a.expert_scale()
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    m.train()
    m(xi)
    assert ((a._weights.abs() > 1e-6).sum(-1) == 1).all()
    assert lorakit.extra_loss(m) is not None
