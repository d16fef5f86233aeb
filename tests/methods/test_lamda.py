"""LaMDA mechanism: A never trains; the controller freezes B's columns at the scheduled steps, then B entirely;
LaMDA++ rank allocation follows the spectrum energy and spends the budget."""
import pytest
import torch

import lorakit
from lorakit.methods.lamda import lamda_plus_ranks
from conftest import MLP

R = 2


def _train(init="svd"):
    torch.manual_seed(0)
    m = MLP()
    lorakit.attach(m, {"method": "lamda", "targets": ["lin0", "lin1"], "r": R, "init": init, "freeze_steps": 4})
    (ctrl,) = lorakit.inject.controllers(m)
    params = [p for p in m.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=0.05, weight_decay=0.1)
    ctrl.on_train_begin(m, opt, 10)
    ads = [a for _, a in lorakit.adapters(m)]
    A0 = [a.A.clone() for a in ads]
    x = torch.randn(16, 12, generator=torch.Generator().manual_seed(2))
    hist = []
    for step in range(7):
        opt.zero_grad(set_to_none=True)
        m(x).pow(2).mean().backward()
        ctrl.before_step(step, m, opt)
        opt.step()
        ctrl.step(step, m, opt)
        hist.append([(a.frozen_cols, a.B.detach().clone(), a.N.detach().clone(), a.B.requires_grad) for a in ads])
    return ads, A0, hist


@pytest.mark.parametrize("init", ["svd", "lora"])
def test_controller_freezes_second_projection_on_schedule(init):
    ads, A0, hist = _train(init)
    # r=2 over 4 steps: column 0 frozen after 2 steps, column 1 (all of B) after 4
    assert [h[0][0] for h in hist] == [0, 1, 1, 2, 2, 2, 2]
    assert [h[0][3] for h in hist] == [True, True, True, False, False, False, False]
    for i, a in enumerate(ads):
        assert torch.equal(a.A, A0[i])  # the first projection never trains
        assert a.lora_A.weight.requires_grad is False
        for t in (2, 3):  # column 0 frozen at the end of step index 1
            assert torch.equal(hist[t][i][1][:, 0], hist[1][i][1][:, 0])
        assert not torch.equal(hist[2][i][1][:, 1], hist[1][i][1][:, 1])  # column 1 still moves
        for t in (4, 5, 6):  # all of B frozen at the end of step index 3, S keeps training
            assert torch.equal(hist[t][i][1], hist[3][i][1])
            assert not torch.equal(hist[t][i][2], hist[t - 1][i][2])


def test_noop_init_and_svd_bases():
    torch.manual_seed(0)
    m = MLP()
    x = torch.randn(4, 12)
    base = m(x)
    lorakit.attach(m, {"method": "lamda", "targets": ["lin0"], "r": R})
    assert torch.equal(m(x), base)
    (_, a), = lorakit.adapters(m)
    U, _, Vh = torch.linalg.svd(a.base.weight.detach())
    assert torch.allclose(a.B.abs(), U[:, :R].abs(), atol=1e-5)
    assert torch.allclose(a.A.abs(), Vh[:R].abs(), atol=1e-5)


def test_lamda_plus_ranks_follows_spectrum_energy():
    torch.manual_seed(0)
    m = MLP()
    with torch.no_grad():  # lin0: energy concentrated in one direction; lin1: flat spectrum
        m.lin0.weight.copy_(torch.randn(16, 1) @ torch.randn(1, 12) + 1e-3 * torch.randn(16, 12))
        m.lin1.weight.copy_(torch.linalg.qr(torch.randn(16, 16))[0])
    ov = lamda_plus_ranks(m, ["lin0", "lin1"], budget=12)
    r0, r1 = ov["lin0"]["r"], ov["lin1"]["r"]
    assert r0 + r1 == 12 and r1 > r0 >= 1
    lorakit.attach(m, {"method": "lamda", "targets": ["lin0", "lin1"], "overrides": ov})
    assert {p: a.cfg.r for p, a in lorakit.adapters(m)} == {"lin0": r0, "lin1": r1}


def test_resume_restores_the_frozen_state():
    ads, _, _ = _train()
    torch.manual_seed(0)
    m = MLP()
    lorakit.attach(m, {"method": "lamda", "targets": ["lin0", "lin1"], "r": R, "freeze_steps": 4})
    (ctrl,) = lorakit.inject.controllers(m)
    ctrl.load_state_dict({"done": 3})
    assert [a.frozen_cols for _, a in lorakit.adapters(m)] == [1, 1]
    ctrl.step(3, m, None)
    assert all(a.frozen_cols == R and not a.lora_B.weight.requires_grad for _, a in lorakit.adapters(m))
