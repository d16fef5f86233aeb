import torch

import lorakit
from _moe import attached, fill, x


def test_full_activation_with_constant_router_is_plain_lora():
    m = attached("smora", r=4, activate_r=4, alpha=8.0)
    fill(m)
    a = dict(lorakit.adapters(m))["lin0"]
    with torch.no_grad():
        a.router.weight.zero_()
        xi = x()
        ref = xi @ a.experts_A[:, 0, :].t() @ a.experts_B[:, :, 0] * (8.0 / 4)
        torch.testing.assert_close(a.delta(xi), ref, rtol=1e-5, atol=1e-5)


def test_topk_ranks_and_bias_moves_by_u():
    m = attached("smora", r=4, activate_r=2, bias_lr=1e-3)
    fill(m)
    m.train()
    m(x())
    a = dict(lorakit.adapters(m))["lin0"]
    assert ((a._weights > 0).sum(-1) == 2).all()
    cnt = a._count.clone()
    from lorakit import training_controllers as controllers

    (ctrl,) = controllers(m)
    ctrl.step(1, m, None)
    torch.testing.assert_close(a.route_bias, 1e-3 * torch.sign(cnt.mean() - cnt))
    assert a._count.sum() == 0 and "route_bias" in a.state_dict()
