"""Mechanism tests for LoRA, rsLoRA, DoRA and PiSSA (reference values from the formulas)."""
from __future__ import annotations

import math

import torch
from torch import nn

import lorakit
from conftest import tiny_llama


def _lin(seed=0, d_in=16, d_out=12):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(d_in, d_out))


def test_lora_formula_and_scaling():
    m = _lin()
    W, b = m[0].weight.detach().clone(), m[0].bias.detach().clone()
    lorakit.attach(m, {"method": "lora", "targets": ["0"], "r": 4, "alpha": 8})
    a = m[0].adapters["default"]
    assert a.scale == 2.0
    with torch.no_grad():
        a.lora_B.weight.normal_()
    x = torch.randn(3, 16)
    ref = x @ (W + 2.0 * a.lora_B.weight @ a.lora_A.weight).t() + b
    assert torch.allclose(m(x), ref, atol=1e-5)
    # at step 0 (B = 0): dL/dA = 0, dL/dB != 0
    m2 = _lin()
    lorakit.attach(m2, {"method": "lora", "targets": ["0"], "r": 4})
    m2(x).sum().backward()
    a2 = m2[0].adapters["default"]
    assert a2.lora_A.weight.grad.abs().max() == 0 and a2.lora_B.weight.grad.abs().max() > 0


def test_rslora_scaling():
    m = _lin()
    lorakit.attach(m, {"method": "lora", "targets": ["0"], "r": 9, "alpha": 8, "rslora": True})
    assert m[0].adapters["default"].scale == 8 / math.sqrt(9)  # r <= min(d_out, d_in) = 12 (a larger rank is refused)
    m1 = _lin()
    lorakit.attach(m1, {"method": "lora", "targets": ["0"], "r": 1, "alpha": 8, "rslora": True})
    assert m1[0].adapters["default"].scale == 8.0  # r = 1: identical to LoRA


def test_dora_norm_magnitude_and_detached_norm():
    m = _lin()
    W = m[0].weight.detach().clone()
    lorakit.attach(m, {"method": "dora", "targets": ["0"], "r": 4, "alpha": 4})
    a = m[0].adapters["default"]
    assert torch.allclose(a.lora_magnitude_vector, W.norm(dim=1), atol=1e-6)  # m = ‖W0‖_row at init
    with torch.no_grad():
        a.lora_B.weight.normal_(std=0.3)
        a.lora_magnitude_vector.mul_(1.5)
    V = W + a.scale * a.lora_B.weight @ a.lora_A.weight
    # fast expanded norm == direct norm
    assert torch.allclose(a.weight_norm(), V.norm(dim=1), rtol=1e-5)
    Wd = a.lora_magnitude_vector[:, None] * V / V.norm(dim=1, keepdim=True)
    x = torch.randn(5, 16)
    assert torch.allclose(m(x), x @ Wd.t() + m[0].bias, atol=1e-5)
    with lorakit.merged(m):
        assert torch.allclose(m[0].weight.norm(dim=1), a.lora_magnitude_vector, atol=1e-5)  # merged rows = m
    # the norm is a constant in backward: grads equal those of a graph with V.norm detached
    m.zero_grad()
    m(x).pow(2).sum().backward()
    A = a.lora_A.weight.detach().clone().requires_grad_()
    B = a.lora_B.weight.detach().clone().requires_grad_()
    mag = a.lora_magnitude_vector.detach().clone().requires_grad_()
    V2 = W + a.scale * B @ A
    y = x @ (mag[:, None] * V2 / V2.norm(dim=1, keepdim=True).detach()).t() + m[0].bias
    y.pow(2).sum().backward()
    assert torch.allclose(a.lora_A.weight.grad, A.grad, rtol=1e-4, atol=1e-6)
    assert torch.allclose(a.lora_B.weight.grad, B.grad, rtol=1e-4, atol=1e-6)


def test_dora_eval_cache_is_invalidated():
    m = _lin()
    lorakit.attach(m, {"method": "dora", "targets": ["0"], "r": 4})
    a = m[0].adapters["default"]
    m.eval()
    x = torch.randn(2, 16)
    with torch.no_grad():
        y1 = m(x)
        assert a._g is not None  # cached in eval
        a.lora_B.weight.normal_()
        a.clear_cache()
        y2 = m(x)
    assert not torch.allclose(y1, y2)
    m.train()
    assert a._g is None


def test_pissa_residual_identity_and_spectrum():
    m = _lin(d_in=20, d_out=16)
    W = m[0].weight.detach().clone()
    lorakit.attach(m, {"method": "pissa", "targets": ["0"], "r": 4, "alpha": 8})
    a = m[0].adapters["default"]
    Wres = m[0].weight.detach()
    assert torch.allclose(Wres + a.scale * a.lora_B.weight @ a.lora_A.weight, W, atol=1e-5)
    s_full = torch.linalg.svdvals(W)
    s_res = torch.linalg.svdvals(Wres)
    assert torch.allclose(s_res[: 16 - 4], s_full[4:], atol=1e-5)  # W_res keeps σ_{r+1:}
    lorakit.detach(m)
    assert torch.equal(m[0].weight, W)


def test_pissa_fast_svd_close_to_full():
    m = _lin(d_in=64, d_out=48)
    with torch.no_grad():  # a decaying spectrum, as pretrained weights have
        U, _, Vh = torch.linalg.svd(torch.randn(48, 64), full_matrices=False)
        m[0].weight.copy_(U @ torch.diag(0.7 ** torch.arange(48.0)) @ Vh)
    W = m[0].weight.detach().clone()
    lorakit.attach(m, {"method": "pissa", "targets": ["0"], "r": 4, "niter": 8})
    a = m[0].adapters["default"]
    assert torch.allclose(m[0].weight + a.scale * a.lora_B.weight @ a.lora_A.weight, W, atol=1e-5)
    top = torch.linalg.svdvals(W)[:4]
    got = torch.linalg.svdvals(a.scale * a.lora_B.weight @ a.lora_A.weight)[:4]
    assert torch.allclose(got, top, rtol=0.05)


def test_multiple_adapters_disabled_and_set_active():
    m = tiny_llama()
    x = torch.randint(0, 64, (1, 5))
    base = m(x).logits
    lorakit.attach(m, {"method": "lora", "targets": ["q_proj"], "r": 2}, name="a")
    lorakit.attach(m, {"method": "lora", "targets": ["q_proj", "v_proj"], "r": 2}, name="b")
    for _, ad in lorakit.adapters(m):
        with torch.no_grad():
            ad.lora_B.weight.normal_()
    only_b = m(x).logits
    lorakit.set_active(m, ["a", "b"])
    both = m(x).logits
    with lorakit.disabled(m):
        assert torch.allclose(m(x).logits, base, atol=1e-6)
    assert torch.allclose(m(x).logits, both)
    assert not torch.allclose(both, only_b)
    s = lorakit.summary(m)
    assert "trainable:" in s and "q_proj" in s
    lorakit.detach(m, "a")
    assert torch.allclose(m(x).logits, only_b, atol=1e-6)


def test_dora_fused_paths_match_the_formula_without_bias_and_under_no_grad():
    torch.manual_seed(1)
    m = nn.Sequential(nn.Linear(16, 12, bias=False))
    W = m[0].weight.detach().clone()
    lorakit.attach(m, {"method": "dora", "targets": ["0"], "r": 4, "alpha": 8})
    a = m[0].adapters["default"]
    with torch.no_grad():
        a.lora_B.weight.normal_(std=0.3)
        a.lora_magnitude_vector.mul_(torch.linspace(0.5, 1.5, 12))
    x = torch.randn(3, 5, 16)
    V = W + a.scale * a.lora_B.weight @ a.lora_A.weight
    ref = x @ (a.lora_magnitude_vector[:, None] * V / V.norm(dim=1, keepdim=True)).t()
    out = m(x)  # train mode, grad enabled
    assert torch.allclose(out, ref, atol=1e-5)
    out.sum().backward()
    mag = a.lora_magnitude_vector.detach().clone().requires_grad_()
    (x @ (mag[:, None] * V.detach() / V.norm(dim=1, keepdim=True).detach()).t()).sum().backward()
    assert torch.allclose(a.lora_magnitude_vector.grad, mag.grad, rtol=1e-4, atol=1e-6)
    m.eval()
    with torch.no_grad():
        assert torch.allclose(m(x), ref, atol=1e-5) and torch.allclose(m(x), ref, atol=1e-5)  # cached gain
