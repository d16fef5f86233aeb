"""RecLoRA mechanism (arXiv:2408.03533): Σ_k w_{b,k} s B_k A_k x_b per example, written here from the factors;
one-hot weights give exactly one LoRA; the update is linear in w; the user gate is one shared parameter."""
import pytest
import torch

import lorakit
from conftest import MLP


def _attach(**kw):
    torch.manual_seed(0)
    m = MLP()
    lorakit.attach(m, {"method": "reclora", "targets": ["lin0", "lin1"], "r": 2, "alpha": 4, "num_loras": 3, **kw})
    with torch.no_grad():
        for _, a in lorakit.adapters(m):
            a.reclora_B.normal_()
    return m


def _ref(a, x, w):
    out = torch.zeros(x.shape[0], a.view.d_out)
    for b in range(x.shape[0]):
        for k in range(3):
            A = a.reclora_A[2 * k:2 * k + 2]
            B = a.reclora_B[:, 2 * k:2 * k + 2]
            out[b] += w[b, k] * 2.0 * (B @ (A @ x[b]))
    return out


def test_per_example_mixture_and_one_hot():
    m = _attach()
    a = dict(lorakit.adapters(m))["lin0"]
    x = torch.randn(4, 12)
    w = torch.rand(4, 3)
    with lorakit.batch_context(m, mixture_weights=w):
        got = a.delta(x)
    assert torch.allclose(got, _ref(a, x, w), atol=1e-5)
    onehot = torch.eye(3)[[2, 0, 1, 2]]
    with lorakit.batch_context(m, mixture_weights=onehot):
        got = a.delta(x)
    for b, k in enumerate([2, 0, 1, 2]):
        assert torch.allclose(got[b], x[b] @ a.delta_weight_of(k).T, atol=1e-5)
    # linear in w: f(w1 + w2) = f(w1) + f(w2)
    w1, w2 = torch.rand(4, 3), torch.rand(4, 3)
    with lorakit.batch_context(m, mixture_weights=w1):
        f1 = a.delta(x)
    with lorakit.batch_context(m, mixture_weights=w2):
        f2 = a.delta(x)
    with lorakit.batch_context(m, mixture_weights=w1 + w2):
        f12 = a.delta(x)
    assert torch.allclose(f12, f1 + f2, atol=1e-5)
    # no weights: the uniform mixture
    assert torch.allclose(a.delta(x), _ref(a, x, torch.full((4, 3), 1 / 3)), atol=1e-5)


def test_user_gate_is_shared_and_trains():
    m = _attach(user_dim=5)
    ads = dict(lorakit.adapters(m))
    gates = [n for n, p in m.named_parameters() if "reclora_gate" in n]
    assert len(gates) == 1
    u = torch.randn(4, 5)
    x = torch.randn(4, 12)
    with lorakit.batch_context(m, user_repr=u):
        y = m(x)
    y.sum().backward()
    G = ads["lin0"].reclora_gate
    assert G.grad is not None and G.grad.abs().sum() > 0
    w = torch.softmax(u @ G.detach().t(), -1)
    with lorakit.batch_context(m, user_repr=u):
        got = ads["lin1"].delta(torch.randn(4, 16).clone())
    assert got.shape == (4, 16)
    a = ads["lin0"]
    with lorakit.batch_context(m, user_repr=u):
        assert torch.allclose(a.delta(x), _ref(a, x, w), atol=1e-5)


def test_bad_context_is_named():
    m = _attach()
    with pytest.raises(lorakit.LorakitError, match="num_loras=3"):
        with lorakit.batch_context(m, mixture_weights=torch.rand(4, 2)):
            m(torch.randn(4, 12))
