import pytest
import torch

import lorakit
from conftest import MLP
from _drive import train

T, TINIT, TFINAL, DT = 300, 20, 50, 10


def _model(**kw):
    torch.manual_seed(0)
    m = MLP()
    lorakit.attach(m, {"method": "adalora", "targets": ["lin0", "lin1"], "init_r": 4, "target_r": 2, "seed": 0,
                       "tinit": TINIT, "tfinal": TFINAL, "deltaT": DT, **kw})
    return m


def expected(step, init=8, target=4):
    if step <= TINIT:
        return init
    if step >= T - TFINAL:
        return target
    mul = 1 - (step - TINIT) / (T - TFINAL - TINIT)
    return int((init - target) * mul ** 3 + target)


def test_budget_schedule_is_respected():
    m = _model()
    last = {"n": 8}

    def check(step, ctrls):
        (c,) = ctrls
        n = c.active_ranks()
        if step <= TINIT:
            assert n == 8
        elif step >= T - TFINAL or step % DT == 0:
            assert n == expected(step), (step, n)
            last["n"] = n
        else:
            assert n == last["n"]  # unchanged between allocations
        if step > T - TFINAL:  # frozen allocation re-applied every step
            for _, a in lorakit.adapters(m):
                assert torch.all(a.lora_E.view(-1)[a.rank_mask == 0] == 0)

    train(m, torch.randn(5, 12), T, fake_grads=True, hook=check)
    assert last["n"] == 4


def test_total_step_from_config_wins():
    m = _model(total_step=T)
    (c,) = lorakit.controllers(m)
    c.on_train_begin(m, None, 10 * T)
    assert c.total == T
    bad = _model()
    (c,) = lorakit.controllers(bad)
    with pytest.raises(lorakit.ConfigError):
        c.on_train_begin(bad, None, TINIT + TFINAL)


def test_orthogonality_loss_matches_formula():
    """PEFT ``AdaLoraModel.forward``: ``orth_reg_weight · Σ_{A, B matrices} ‖·‖_F / num_param`` (4 matrices here),
    with or without the controller having been built."""
    m = _model()
    ref = 0
    for _, a in lorakit.adapters(m):
        A, B = a.lora_A, a.lora_B
        ref = ref + torch.linalg.norm(A @ A.T - torch.eye(4)) + torch.linalg.norm(B.T @ B - torch.eye(4))
    assert torch.allclose(lorakit.extra_loss(m), 0.5 * ref / 4)


def test_pruned_adapter_round_trips_through_peft(tmp_path):
    peft = pytest.importorskip("peft")
    m = _model()
    x = torch.randn(5, 12)
    train(m, x, T, fake_grads=True)
    with torch.no_grad():
        for _, a in lorakit.adapters(m):
            a.lora_E.add_(0.5 * a.rank_mask.view(-1, 1))  # make the surviving triplets matter
    m.eval()
    ref = m(x).detach()
    lorakit.save_adapter(m, tmp_path / "lk")
    conf = lorakit.read_adapter_config(tmp_path / "lk")
    assert conf["peft_type"] == "ADALORA" and sum(sum(v) for v in conf["rank_pattern"].values()) <= 8
    torch.manual_seed(0)
    pm = peft.PeftModel.from_pretrained(MLP(), str(tmp_path / "lk")).eval()
    assert torch.allclose(pm(x), ref, atol=1e-5)
    pm.save_pretrained(str(tmp_path / "pf"))
    torch.manual_seed(0)
    fresh = MLP()
    lorakit.load_adapter(fresh, tmp_path / "pf")
    assert torch.allclose(fresh.eval()(x), ref, atol=1e-5)
    assert sum(a.lora_A.shape[0] for _, a in lorakit.adapters(fresh)) == 4
    lorakit.save_adapter(fresh, tmp_path / "again")  # re-saving a loaded pruned adapter stays PEFT-typed
    assert lorakit.read_adapter_config(tmp_path / "again")["peft_type"] == "ADALORA"
    lorakit.rank.to_lora(fresh)
    assert torch.allclose(fresh(x), ref, atol=1e-5)


def test_allocation_matches_peft_rank_allocator_after_the_optimizer_step():
    """PEFT's AdaLoRA as the oracle: ``loss.backward(); optimizer.step(); update_and_allocate(step); zero_grad()`` (the
    order in PEFT's ``AdaLoraModel.update_and_allocate`` docstring), so the sensitivities ``|p ⊙ ∇p|`` use the
    parameters AFTER the step. Same initial factors, same gradients, same SGD: every A, E, B must agree at every
    step (taking the sensitivities before the step ranks the triplets differently and fails)."""
    peft = pytest.importorskip("peft")
    T2, TI, TF, DT2 = 40, 4, 10, 3
    m = _model(tinit=TI, tfinal=TF, deltaT=DT2, total_step=T2)
    torch.manual_seed(0)
    cfg = peft.AdaLoraConfig(target_modules=["lin0", "lin1"], init_r=4, target_r=2, tinit=TI, tfinal=TF, deltaT=DT2,
                             total_step=T2, beta1=0.85, beta2=0.85, orth_reg_weight=0.0)
    pm = peft.get_peft_model(MLP(), cfg)
    ours = dict(lorakit.adapters(m))
    theirs = {p: pm.base_model.model.get_submodule(p) for p in ours}
    names = ("lora_A", "lora_E", "lora_B")
    with torch.no_grad():
        for p, a in ours.items():
            for n in names:
                getattr(theirs[p], n)["default"].copy_(getattr(a, n))
    ours_p = [getattr(ours[p], n) for p in sorted(ours) for n in names]
    theirs_p = [getattr(theirs[p], n)["default"] for p in sorted(ours) for n in names]
    opt_o, opt_t = torch.optim.SGD(ours_p, lr=0.5), torch.optim.SGD(theirs_p, lr=0.5)
    (ctrl,) = lorakit.controllers(m)
    ctrl.on_train_begin(m, opt_o, T2)
    g = torch.Generator().manual_seed(3)
    for step in range(T2):
        for po, pt in zip(ours_p, theirs_p):
            po.grad = torch.randn(po.shape, generator=g)
            pt.grad = po.grad.clone()
        ctrl.before_step(step, m, opt_o)
        opt_o.step()
        ctrl.step(step, m, opt_o)
        opt_o.zero_grad()
        opt_t.step()
        pm.base_model.update_and_allocate(step)
        opt_t.zero_grad()
        for po, pt in zip(ours_p, theirs_p):
            torch.testing.assert_close(po, pt, rtol=1e-5, atol=1e-6, msg=lambda s, step=step: f"step {step}: {s}")
    assert ctrl.active_ranks() == 4
