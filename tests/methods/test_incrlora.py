import copy
import math

import torch

import lorakit
from conftest import MLP
from _drive import train

OPTS = {"method": "incrlora", "targets": ["lin0", "lin1"], "r": 1, "target_rank": 3, "init_warmup": 2,
        "incre_interval": 2, "top_h": 1, "incre_rank_num": 1, "alpha": 8.0, "seed": 0}


def _model(**kw):
    torch.manual_seed(0)
    m = MLP()
    lorakit.attach(m, {**OPTS, **kw})
    return m


def _ranks(m):
    return {p: int(a.slots[0]) for p, a in lorakit.adapters(m)}


def test_zero_e_means_zero_update_and_noop_init():
    m = _model()
    x = torch.randn(5, 12)
    for _, a in lorakit.adapters(m):
        assert torch.all(a.lora_E == 0) and torch.all(a.delta_weight() == 0)
        assert torch.all(a.delta(x if a.view.d_in == 12 else torch.randn(5, a.view.d_in)) == 0)


def test_rank_grows_monotonically_up_to_the_budget_and_not_beyond():
    m = _model()
    budget, seen = 3 * 2, []

    def check(step, ctrls):
        (c,) = ctrls
        seen.append(c.total_rank())
        assert c.total_rank() <= budget
        for _, a in lorakit.adapters(m):
            assert int(a.slots[1]) == (0 if c.total_rank() == budget else 1)  # reserves until the budget

    train(m, torch.randn(5, 12), 20, hook=check)
    assert seen == sorted(seen) and seen[0] == 2 and seen[-1] == budget
    # growth only at steps > init_warmup with step % incre_interval == 0: 4, 6, 8, 10
    assert seen[3] == 2 and seen[4] == 3 and seen[5] == 3 and seen[6] == 4 and seen[10] == budget
    for _, a in lorakit.adapters(m):  # no reserve contributes once the budget is reached
        assert torch.all(a.gates()[int(a.slots[0]):] == 0)


def test_activated_component_adds_exactly_its_advance_term():
    m = _model()
    (c,) = lorakit.controllers(m)
    c.before_step(0, m, None)  # step 0: reserves appear
    path, a = next(iter(lorakit.adapters(m)))
    with torch.no_grad():
        a.lora_E[0] = 0.3
    before = a.delta_weight().clone()
    A, B, E0 = a.lora_A.detach().clone(), a.lora_B.detach().clone(), 0.3
    # before: active 0 (scale α/1) + reserve slot 1 at 1e-5 (same scale)
    assert torch.allclose(before, 8.0 / (1 + 1e-5) * (E0 * B[:, :1] @ A[:1] + 1e-5 * B[:, 1:2] @ A[1:2]))
    a.activate(1)
    after = a.delta_weight()
    s = 8.0 / (2 + 1e-5)  # ranknum grew to 2
    new_term = 1e-5 * torch.outer(B[:, 1], A[1]) * s
    assert torch.allclose(after, s * E0 * B[:, :1] @ A[:1] + new_term, atol=1e-12)
    assert int(a.slots[0]) == 2 and a.lora_E[1].item() == torch.tensor(1e-5).item()


def test_growth_goes_to_the_most_important_module():
    m = _model()
    (c,) = lorakit.controllers(m)
    c.before_step(0, m, None)
    paths = [p for p, _ in lorakit.adapters(m)]
    for k in range(5):  # lin1 has the larger sensitivity × uncertainty
        c.sens.update_value(paths[0], torch.tensor(1.0))
        c.sens.update_value(paths[1], torch.tensor(50.0 * (k % 2)))
    assert c.grow(c.mods()) == [paths[1]] and _ranks(m) == {paths[0]: 1, paths[1]: 2}
    for k in range(5):
        c.sens.update_value(paths[0], torch.tensor(1e3 * (k % 2)))
    assert c.grow(c.mods()) == [paths[0]] and _ranks(m) == {paths[0]: 2, paths[1]: 2}


def test_score_value_reference():
    """S = Σ|ΔW ⊙ ∂L/∂ΔW| / √numel with ∂L/∂ΔW = Σ_tokens g_out x_inᵀ for a linear layer."""
    m = _model()
    (c,) = lorakit.controllers(m)
    c.before_step(0, m, None)
    path, a = next(iter(lorakit.adapters(m)))
    with torch.no_grad():
        a.lora_E.fill_(0.2)
    x = torch.randn(7, a.view.d_in, requires_grad=False)
    a.train()
    out = a.delta(x)
    g = torch.randn_like(out)
    out.backward(g)
    dw = a.delta_weight().detach()
    ref = (dw * (g.t() @ x)).abs().sum() / math.sqrt(dw.numel())
    assert torch.allclose(a.take_score(), ref, rtol=1e-5)


def _run(m, x, opt, ctrl, start, stop):
    m.train()
    for step in range(start, stop):
        opt.zero_grad()
        (m(x).pow(2).mean() + lorakit.extra_loss(m)).backward()
        ctrl.before_step(step, m, opt)
        opt.step()
        ctrl.step(step, m, opt)


def _setup(x):
    m = _model()
    opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.01)
    (c,) = lorakit.controllers(m)
    c.on_train_begin(m, opt, 12)
    return m, opt, c


def test_controller_state_resumes_exactly_and_files_record_growth(tmp_path):
    x = torch.randn(5, 12)
    full, opt, c = _setup(x)
    _run(full, x, opt, c, 0, 12)
    cut, opt, c = _setup(x)
    _run(cut, x, opt, c, 0, 7)
    saved = [copy.deepcopy(o.state_dict()) for o in (cut, opt, c)]
    resumed, opt, c = _setup(x)
    for o, s in zip((resumed, opt, c), saved):
        o.load_state_dict(s)
    _run(resumed, x, opt, c, 7, 12)
    assert _ranks(resumed) == _ranks(full) and sum(_ranks(full).values()) == 6
    for (_, a), (_, b) in zip(lorakit.adapters(full), lorakit.adapters(resumed)):
        for k, v in a.state_dict().items():
            assert torch.equal(v, b.state_dict()[k]), k
    # the saved adapter records the grown ranks and reproduces the logits; merging too
    full.eval()
    ref = full(x).detach()
    lorakit.save_adapter(full, tmp_path / "a")
    torch.manual_seed(0)
    fresh = MLP()
    lorakit.load_adapter(fresh, tmp_path / "a")
    assert _ranks(fresh) == _ranks(full)
    assert torch.allclose(fresh.eval()(x), ref, atol=1e-6)
    assert torch.allclose(lorakit.merge_and_unload(fresh)(x), ref, atol=1e-5)


def test_orth_loss_is_the_mean_over_modules_without_a_controller():
    """``orth_reg_weight · Σ_modules (‖AAᵀ−I‖_F + ‖BᵀB−I‖_F) / (2·#modules)`` over the used slots (as AdaLoRA's PEFT
    regulariser); no controller needs to exist for the mean to be right (it used to be set by the controller)."""
    m = _model(orth_reg_weight=0.3)
    ref, n = 0.0, 0
    for _, a in lorakit.adapters(m):
        used = a._used()[1]
        A, B = a.lora_A[used].detach(), a.lora_B[:, used].detach()
        eye = torch.eye(int(used.sum()))
        ref += torch.linalg.matrix_norm(A @ A.t() - eye) + torch.linalg.matrix_norm(B.t() @ B - eye)
        n += 1
    assert n == 2
    torch.testing.assert_close(lorakit.extra_loss(m).detach(), 0.3 * ref / (2 * n))
