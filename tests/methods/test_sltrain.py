"""SLTrain mechanism (arXiv:2406.02214): W = s·BA + S on a fixed random support of ⌊δ·m·n⌋ entries; the dense
reference below rebuilds S from (index, value) pairs independently of the method's own scatter."""
import math

import pytest
import torch

import lorakit
from conftest import MLP, run


def _attach(init="default", sp=0.25, r=2, alpha=4.0, seed=0):
    torch.manual_seed(seed)
    m = MLP()
    base = {n: p.detach().clone() for n, p in m.named_parameters()}
    lorakit.attach(m, {"method": "sltrain", "targets": ["lin0", "lin1"], "r": r, "alpha": alpha,
                       "sp_ratio": sp, "init": init})
    return m, base


def _dense_reference(a):
    """S from the (flat index, value) pairs, one entry at a time (no index_put)."""
    m, n = a.view.d_out, a.view.d_in
    S = torch.zeros(m, n)
    for i, v in zip(a.sparse_index.tolist(), a.sparse_values.detach().tolist()):
        S[i // n, i % n] = v
    return a.scale * a.lora_B.weight.detach() @ a.lora_A.weight.detach() + S


def test_parameter_count_and_support():
    m, _ = _attach(sp=0.25, r=2)
    a = dict(lorakit.adapters(m))["lin0"]  # 12 -> 16
    assert a.sparse_values.numel() == math.floor(0.25 * 16 * 12)
    assert a.sparse_index.unique().numel() == a.sparse_index.numel()  # distinct entries
    assert 0 <= int(a.sparse_index.min()) and int(a.sparse_index.max()) < 16 * 12
    n_train = sum(p.numel() for n, p in a.named_parameters() if p.requires_grad)
    assert n_train == 2 * (12 + 16) + math.floor(0.25 * 16 * 12)


def test_forward_equals_dense_reference_fine_tuning():
    m, base = _attach("default")
    for _, a in lorakit.adapters(m):
        assert a.sparse_values.abs().sum() == 0  # fine-tuning starts as a no-op
        with torch.no_grad():
            a.sparse_values.normal_()
            a.lora_B.weight.normal_()
    x = torch.randn(5, 12)
    a0, a1 = (dict(lorakit.adapters(m))[k] for k in ("lin0", "lin1"))
    W0 = base["lin0.weight"] + _dense_reference(a0)
    W1 = base["lin1.weight"] + _dense_reference(a1)
    h = torch.relu(x @ W0.T + base["lin0.bias"])
    h = torch.relu(h @ W1.T + base["lin1.bias"])
    ref = h @ base["out.weight"].T + base["out.bias"]
    assert torch.allclose(run(m, x), ref, atol=1e-5)
    assert torch.allclose(a0.delta_weight(), _dense_reference(a0), atol=1e-6)


def test_replace_is_pretraining_layer_and_detach_restores():
    m, base = _attach("replace", sp=0.3)
    a = dict(lorakit.adapters(m))["lin0"]
    bound = 1 / math.sqrt(12)
    assert a.sparse_values.abs().max() <= bound and a.sparse_values.abs().sum() > 0  # U(-1/sqrt(n), 1/sqrt(n))
    assert a.lora_B.weight.abs().sum() == 0
    x = torch.randn(4, 12)
    # the layer is exactly s·BA + S (+ its bias): the pretrained base is gone
    host = m.lin0
    assert torch.allclose(host(x), x @ _dense_reference(a).T + base["lin0.bias"], atol=1e-6)
    lorakit.detach(m)
    assert torch.equal(m.lin0.weight, base["lin0.weight"])


def test_support_fixed_and_gradients_only_on_support():
    m, _ = _attach("replace", sp=0.2)
    a = dict(lorakit.adapters(m))["lin1"]
    idx0 = a.sparse_index.clone()
    opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=0.05)
    for _ in range(3):
        opt.zero_grad()
        run(m, torch.randn(6, 12)).pow(2).mean().backward()
        opt.step()
    assert torch.equal(a.sparse_index, idx0)
    # off the support, the update stays exactly s·BA: W_eff - s·BA is zero outside the support
    S = a.delta_weight().detach() - a.scale * a.lora_B.weight.detach() @ a.lora_A.weight.detach()
    mask = torch.zeros(16 * 16, dtype=torch.bool)
    mask[idx0] = True
    assert S.flatten()[~mask].abs().max() < 1e-6 and S.flatten()[mask].abs().sum() > 0


def test_zero_sparsity_is_plain_low_rank():
    m, _ = _attach("replace", sp=0.0, r=3)
    a = dict(lorakit.adapters(m))["lin0"]
    assert a.sparse_values.numel() == 0
    with torch.no_grad():
        a.lora_B.weight.normal_()
    assert torch.allclose(a.delta_weight(), a.scale * a.lora_B.weight @ a.lora_A.weight)


def test_save_load_keeps_the_support(tmp_path):
    m, _ = _attach("replace", sp=0.25, seed=0)
    with torch.no_grad():
        for _, a in lorakit.adapters(m):
            a.lora_B.weight.normal_()
    x = torch.randn(3, 12)
    y = run(m, x)
    lorakit.save_adapter(m, tmp_path / "ad")
    torch.manual_seed(0)
    fresh = MLP()
    torch.manual_seed(123)  # a different draw of the support at load: the file's support must win
    lorakit.load_adapter(fresh, tmp_path / "ad")
    a_new, a_old = dict(lorakit.adapters(fresh))["lin0"], dict(lorakit.adapters(m))["lin0"]
    assert torch.equal(a_new.sparse_index, a_old.sparse_index)
    assert torch.allclose(run(fresh, x), y, atol=1e-6)


def test_bad_options_are_config_errors():
    with pytest.raises(lorakit.LorakitError, match="sp_ratio"):
        _attach(sp=1.5)
