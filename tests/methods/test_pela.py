"""PELA mechanism: the layer becomes R L with k = ⌊d_in d_out / (c (d_in + d_out))⌋; at init RL is the
Eckart–Young optimum (‖W − RL‖_F = ‖σ_{k+1:}‖), the factors hold ≤ 1/c of the weights, detach restores W."""
import torch

import lorakit
from lorakit.methods.pela import pela_rank
from conftest import MLP


def test_low_rank_approximation_error_and_size():
    torch.manual_seed(0)
    m = MLP(d_in=40, d_h=48, d_out=10)
    W0 = m.lin1.weight.detach().clone()
    lorakit.attach(m, {"method": "pela", "targets": ["lin1"]})
    a = dict(lorakit.adapters(m))["lin1"]
    k = pela_rank(48, 48, 3.0)
    assert a.k == k == 8
    S = torch.linalg.svdvals(W0)
    err = torch.linalg.norm(W0 - a.delta_weight())
    assert torch.allclose(err, S[k:].norm(), rtol=1e-4)
    n = sum(p.numel() for p in a.parameters())
    assert n <= W0.numel() / 3
    assert torch.equal(m.lin1.base_layer.weight, torch.zeros_like(W0))  # the layer IS R L (+ bias)
    x = torch.randn(3, 48)
    assert torch.allclose(m.lin1(x), x @ a.delta_weight().T + m.lin1.base_layer.bias, atol=1e-5)
    lorakit.detach(m)
    assert torch.equal(m.lin1.weight, W0)


def test_weight_perturbation_regulariser_matches_official_inf_norm(tmp_path):
    """ALBEF/models/model_pretrain.py inf_norm: mean over compressed layers of MSE(‖R L − W‖_∞, ε=1e-3), the
    ∞-norm of the flattened residual (torch.norm(M, inf) with no dim = the largest absolute entry)."""
    import torch.nn.functional as F

    torch.manual_seed(0)
    m = MLP(d_in=40, d_h=48, d_out=10)
    W = {p: getattr(m, p).weight.detach().clone() for p in ("lin0", "lin1")}
    lorakit.attach(m, {"method": "pela", "targets": ["lin0", "lin1"], "bias": "lora_only"})
    ads = dict(lorakit.adapters(m))
    with torch.no_grad():  # move away from the SVD optimum
        for a in ads.values():
            a.pela_R.weight.add_(torch.randn_like(a.pela_R.weight) * 0.05)
    m.train()
    m(torch.randn(3, 40))
    got = lorakit.extra_loss(m)

    def official(pairs, eps=1e-3):
        err = 0.0
        for R, L, Wt in pairs:
            residual = torch.norm(torch.mm(R, L) - Wt, float("inf"))
            err = err + F.mse_loss(residual, torch.tensor(eps))
        return err / len(pairs)

    ref = official([(ads[p].pela_R.weight.detach(), ads[p].pela_L.weight.detach(), W[p]) for p in ("lin0", "lin1")])
    torch.testing.assert_close(got.detach(), ref, rtol=1e-5, atol=1e-8)
    assert got.requires_grad
    # biases train as in the official code (bias: lora_only), the factors too
    names = {n for n, p in m.named_parameters() if p.requires_grad}
    assert {"lin0.base_layer.bias", "lin1.base_layer.bias"} <= names
    # the copy of W comes back on load (non-persistent: not in the file)
    lorakit.save_adapter(m, tmp_path / "p")
    torch.manual_seed(0)
    fresh = MLP(d_in=40, d_h=48, d_out=10)
    lorakit.load_adapter(fresh, tmp_path / "p")
    fa = dict(lorakit.adapters(fresh))
    assert torch.equal(fa["lin1"].teacher, W["lin1"])
    # off: no loss, no copy
    torch.manual_seed(0)
    m2 = MLP(d_in=40, d_h=48, d_out=10)
    lorakit.attach(m2, {"method": "pela", "targets": ["lin1"], "norm_reg": 0.0})
    m2.train()
    m2(torch.randn(3, 40))
    assert lorakit.extra_loss(m2) is None and dict(lorakit.adapters(m2))["lin1"].teacher is None
