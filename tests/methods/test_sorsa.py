"""SORSA mechanism: exact residual, PiSSA equivalence, L_o formula, and the decoupled γ/η step after clipping."""
import torch

import lorakit
import lorakit.inject
from conftest import MLP


def _model(**kw):
    torch.manual_seed(0)
    m = MLP()
    lorakit.attach(m, {"method": "sorsa", "targets": ["lin0", "lin1"], "r": 3, **kw})
    return m


def test_residual_plus_update_is_w0_and_matches_pissa():
    torch.manual_seed(0)
    w0 = MLP().lin1.weight.detach().clone()
    m = _model()
    a = m.lin1.adapters["default"]
    W = m.lin1.base_layer.weight.detach()
    assert torch.allclose(W + a.delta_weight(), w0, atol=1e-5)
    # singular values of the residual are the tail σ_{r+1:}
    s = torch.linalg.svdvals(w0)
    assert torch.allclose(torch.linalg.svdvals(W)[: len(s) - 3], s[3:], atol=1e-5)
    assert torch.allclose(a.sorsa_S.detach(), s[:3], atol=1e-5)
    torch.manual_seed(0)
    p = MLP()
    lorakit.attach(p, {"method": "pissa", "targets": ["lin1"], "r": 3, "alpha": 3})
    assert torch.allclose(p.lin1.adapters["default"].delta_weight(), a.delta_weight(), atol=1e-5)
    assert all(x.requires_grad for x in (a.sorsa_A, a.sorsa_S, a.sorsa_B))


def test_ortho_loss_formula_and_zero_at_init():
    m = _model()
    mods = [a for _, a in lorakit.adapters(m)]
    assert all(float(a.ortho_loss()) < 1e-5 for a in mods)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for a in mods:
            a.sorsa_A.add_(torch.randn(a.sorsa_A.shape, generator=g) * 0.1)
            a.sorsa_B.add_(torch.randn(a.sorsa_B.shape, generator=g) * 0.1)
    ref = []
    for a in mods:
        A, B = a.sorsa_A.detach(), a.sorsa_B.detach()
        ref += [torch.linalg.norm(A @ A.T - torch.eye(3)), torch.linalg.norm(B.T @ B - torch.eye(3))]
    expected = sum(ref) / len(ref)
    got = sum(a.ortho_loss() for a in mods) / len(mods)
    assert torch.allclose(got, expected, atol=1e-6)


def test_controller_adds_gamma_over_lr_gradient_after_clipping():
    gamma, lr = 0.5, 0.01
    m = _model(gamma=gamma)
    mods = [a for _, a in lorakit.adapters(m)]
    with torch.no_grad():
        for a in mods:
            a.sorsa_B.mul_(1.3)
    params = [p for p in m.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.1)  # scheduled lr differs from the configured one
    assert opt.param_groups[0]["lr"] != lr
    (ctrl,) = lorakit.training_controllers(m)
    m(torch.randn(4, 12)).pow(2).mean().backward()
    torch.nn.utils.clip_grad_norm_(params, 1e-3)
    clipped = [p.grad.clone() for p in params]
    ctrl.before_step(0, m, opt)
    lo = sum(a.ortho_loss() for a in mods) / len(mods)
    ref = torch.autograd.grad(lo, params, allow_unused=True)
    for p, c, r in zip(params, clipped, ref):
        r = torch.zeros_like(p) if r is None else r
        assert torch.allclose(p.grad, c + gamma / lr * r, atol=1e-5)
    del sched
