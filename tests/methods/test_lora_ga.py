"""LoRA-GA mechanism: exact residual, orthonormal A₀ rows / B₀ in span(U_{r+1:2r}), and the first SGD step of the
product equals −η s² c² G_{2r} (best rank-2r approximation of the full gradient step) to first order."""
import torch

import lorakit
from conftest import MLP

X = torch.randn(16, 12, generator=torch.Generator().manual_seed(4))


def loss_fn(model, x):
    return (model(x) - 1).pow(2).mean()


def test_first_step_approximates_projected_full_gradient():
    r, alpha, gamma = 2, 4.0, 16.0
    torch.manual_seed(0)
    m = MLP()
    w0 = m.lin1.weight.detach().clone()
    G = lorakit.calibrate(m, ["lin1"], [X], "gradients", loss_fn=loss_fn)["lin1"]["grad"]
    lorakit.attach(m, {"method": "lora_ga", "targets": ["lin1"], "r": r, "alpha": alpha, "niter": 0,
                       "stable_gamma": gamma}, calibration=[X], loss_fn=loss_fn)
    a = m.lin1.adapters["default"]
    s, c = alpha / r, 16 ** 0.25 / gamma ** 0.5
    U, S, Vh = torch.linalg.svd(G)
    assert torch.allclose(m.lin1.base_layer.weight + a.delta_weight(), w0, atol=1e-5)
    A0 = a.lora_A.weight.detach() / c
    assert torch.allclose(A0 @ A0.T, torch.eye(r), atol=1e-5)
    B0 = a.lora_B.weight.detach() / c
    P = U[:, r:2 * r] @ U[:, r:2 * r].T
    assert torch.allclose(P @ B0, B0, atol=1e-5)
    # one SGD step on A, B
    eta = 1e-3
    before = a.delta_weight().detach().clone()
    loss_fn(m, X).backward()
    with torch.no_grad():
        for p in a.parameters():
            if p.requires_grad:
                p -= eta * p.grad
    step = a.delta_weight().detach() - before
    G2r = (U[:, :2 * r] * S[:2 * r]) @ Vh[:2 * r]
    expected = -eta * s ** 2 * c ** 2 * G2r
    assert (step - expected).norm() < 1e-2 * expected.norm()


def test_randomised_svd_is_seeded_and_close_to_exact():
    def build(niter):
        torch.manual_seed(0)
        m = MLP()
        lorakit.attach(m, {"method": "lora_ga", "targets": ["lin1"], "r": 2, "niter": niter},
                       calibration=[X], loss_fn=loss_fn)
        a = m.lin1.adapters["default"]
        A, B = a.lora_A.weight.detach(), a.lora_B.weight.detach()
        return A.T @ A, B @ B.T  # the projections (singular-vector signs are arbitrary)

    assert all(torch.equal(u, v) for u, v in zip(build(4), build(4)))
    assert all(torch.allclose(u, v, atol=1e-3) for u, v in zip(build(4), build(0)))
