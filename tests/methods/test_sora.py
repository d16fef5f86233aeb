import torch

import lorakit
from lorakit.rank import prune_gates
from conftest import MLP
from _drive import train


def _model(**kw):
    torch.manual_seed(0)
    m = MLP()
    lorakit.attach(m, {"method": "sora", "targets": ["lin0", "lin1"], "r": 6, "seed": 0, **kw})
    return m


def test_proximal_step_soft_thresholds_gates():
    m = _model(sparse_lambda_2=0.5)
    before = {p: a.lora_gate.detach().clone() for p, a in lorakit.adapters(m)}
    (c,) = lorakit.training_controllers(m)
    c.on_train_begin(m, None, 10)
    c.step(0, m, None)
    for p, a in lorakit.adapters(m):
        g0 = before[p]
        assert torch.equal(a.lora_gate[g0.abs() <= 0.5], torch.zeros_like(a.lora_gate[g0.abs() <= 0.5]))
        big = g0.abs() > 0.5
        assert torch.allclose(a.lora_gate[big], g0[big] - 0.5 * g0[big].sign())


def test_zero_gates_drop_out_exactly_when_pruned(tmp_path):
    m = _model(sparse_lambda_2=0.01)
    x = torch.randn(5, 12)
    train(m, x, 5)
    with torch.no_grad():
        for _, a in lorakit.adapters(m):
            a.lora_gate[::2] = 0.0
    m.eval()
    ref = m(x).detach()
    kept = {p: int((a.lora_gate != 0).sum()) for p, a in lorakit.adapters(m)}
    prune_gates(m)
    for p, a in lorakit.adapters(m):
        assert a.name == "lora" and a.lora_A.weight.shape[0] == kept[p]
    assert torch.allclose(m(x), ref, atol=1e-6)
    lorakit.save_adapter(m, tmp_path / "a")
    conf = lorakit.read_adapter_config(tmp_path / "a")
    assert conf["peft_type"] == "LORA"
    torch.manual_seed(0)
    fresh = MLP()
    lorakit.load_adapter(fresh, tmp_path / "a")
    assert torch.allclose(fresh.eval()(x), ref, atol=1e-6)


def test_lambda_schedule_rises():
    m = _model(sparse_lambda_2=1e-4, lambda_schedule="linear", max_lambda=1e-3, lambda_num=4)
    (c,) = train(m, torch.randn(5, 12), 8)
    assert abs(c.xi - 1e-3) < 1e-12
