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
    (c,) = lorakit.controllers(m)
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


def test_l1_is_one_mean_over_all_gates_as_the_official_trainer():
    """Official TsinghuaC3I/SoRA ``src/trainer.py`` ``SparseTrainerMixin.compute_loss``:
    ``loss += sparse_lambda * Σ_{gate params} Σ|g| / p_total`` with p_total the number of gate entries (all modules);
    written here with modules of different rank, where a mean of per-module means would differ."""
    torch.manual_seed(0)
    m = MLP()
    lorakit.attach(m, {"method": "sora", "targets": ["lin0", "lin1"], "r": 6, "l1": 0.25,
                       "overrides": {"lin1": {"r": 2}}})
    gates = [a.lora_gate.detach() for _, a in lorakit.adapters(m)]
    assert sorted(g.numel() for g in gates) == [2, 6]
    sparse_loss = sum(g.abs().sum() for g in gates)
    p_total = sum(g.numel() for g in gates)
    torch.testing.assert_close(lorakit.extra_loss(m), 0.25 * sparse_loss / p_total)
    per_module_means = sum(0.25 * g.abs().mean() for g in gates) / 2
    assert not torch.allclose(lorakit.extra_loss(m), per_module_means)


def test_l1_is_on_by_default_with_the_official_weight():
    m = _model()  # official run_glue.py SparseArguments.sparse_lambda = 1e-3, added whenever --train_sparse
    gates = torch.cat([a.lora_gate.detach() for _, a in lorakit.adapters(m)])
    torch.testing.assert_close(lorakit.extra_loss(m), 1e-3 * gates.abs().sum() / gates.numel())
