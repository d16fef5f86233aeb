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
    (c,) = lorakit.training_controllers(m)
    c.on_train_begin(m, None, 10 * T)
    assert c.total == T
    bad = _model()
    (c,) = lorakit.training_controllers(bad)
    with pytest.raises(lorakit.ConfigError):
        c.on_train_begin(bad, None, TINIT + TFINAL)


def test_orthogonality_loss_matches_formula():
    m = _model()
    lorakit.training_controllers(m)  # tells the adapters how many modules share the penalty
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
