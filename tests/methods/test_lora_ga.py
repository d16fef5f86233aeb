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


class DropMLP(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin0, self.drop, self.lin1 = torch.nn.Linear(12, 16), torch.nn.Dropout(0.5), torch.nn.Linear(16, 16)

    def forward(self, x):
        return self.lin1(self.drop(torch.relu(self.lin0(x))))


def test_gradients_are_calibrated_in_train_mode_as_the_official():
    """Official Outsider565/LoRA-GA ``estimate_gradient`` (``peft/src/peft/utils/lora_ga_utils/lora_ga_utils.py``)
    and PEFT's ``estimate_gradients`` call ``model.train()`` before the backward passes, so dropout is active:
    G = mean over batches of ∂L/∂W with dropout, computed here by hand with the same seed. The init then takes A₀'s
    rows from the top-r right singular vectors of that G (ArB2r, exact SVD)."""
    torch.manual_seed(0)
    m = DropMLP().eval()  # a model handed over in eval mode (as from_pretrained returns it)
    batches = [X[:8], X[8:]]
    ref = DropMLP()
    ref.load_state_dict(m.state_dict())
    ref.train()
    torch.manual_seed(5)
    G = 0
    for b in batches:
        ref.zero_grad()
        loss_fn(ref, b).backward()
        G = G + ref.lin1.weight.grad
    G = G / len(batches)
    ref.eval()
    G_eval = 0
    for b in batches:
        ref.zero_grad()
        loss_fn(ref, b).backward()
        G_eval = G_eval + ref.lin1.weight.grad
    assert not torch.allclose(G, G_eval / len(batches), atol=1e-3)  # dropout changes the gradient
    torch.manual_seed(5)
    stats = lorakit.calibrate(m, ["lin1"], batches, "gradients", loss_fn=loss_fn)
    torch.testing.assert_close(stats["lin1"]["grad"], G)
    assert not m.training and not m.drop.training  # the caller's mode is restored
    r, c = 2, 16 ** 0.25 / 16 ** 0.5
    torch.manual_seed(5)  # "seed" builds the adapter in a forked RNG: the calibration's dropout starts from here
    lorakit.attach(m, {"method": "lora_ga", "targets": ["lin1"], "r": r, "niter": 0, "seed": 1}, calibration=batches,
                   loss_fn=loss_fn)
    A0 = m.lin1.adapters["default"].lora_A.weight.detach() / c
    Vr = torch.linalg.svd(G)[2][:r].T  # (d_in, r)
    torch.testing.assert_close(A0.T @ A0, Vr @ Vr.T, rtol=1e-4, atol=1e-5)  # the same row space (signs arbitrary)
