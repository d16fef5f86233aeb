"""LoRA-SB mechanism: s·BRA is the truncated SVD of the simulated first step −η·sign(mean ∂L/∂W)."""
import pytest
import torch

import lorakit
from conftest import MLP

R, ETA = 3, 1e-2


def _setup(**opts):
    torch.manual_seed(0)
    m = MLP()
    g = torch.Generator().manual_seed(5)
    batches = [torch.randn(8, 12, generator=g) for _ in range(3)]
    loss_fn = lambda mdl, b: mdl(b).pow(2).mean()  # noqa: E731
    # reference gradient, accumulated by hand
    ref = {}
    for b in batches:
        m.zero_grad()
        loss_fn(m, b).backward()
        for n in ("lin0", "lin1"):
            ref[n] = ref.get(n, 0) + m.get_submodule(n).weight.grad.detach() / len(batches)
    m.zero_grad()
    w0 = {n: m.get_submodule(n).weight.detach().clone() for n in ref}
    cfg = {"method": "lora_sb", "targets": ["lin0", "lin1"], "r": R, "eta": ETA, "seed": 0, **opts}
    lorakit.attach(m, cfg, calibration=batches, loss_fn=loss_fn)
    return m, ref, w0


@pytest.mark.parametrize("niter,tol", [(0, 1e-5), (10, None)])
def test_init_is_truncated_svd_of_simulated_step(niter, tol):
    m, grads, w0 = _setup(niter=niter, alpha=6.0)
    for path, a in lorakit.adapters(m):
        dw = -ETA * torch.sign(grads[path])
        U, S, Vh = torch.linalg.svd(dw)
        best = U[:, :R] @ torch.diag(S[:R]) @ Vh[:R]
        got = a.delta_weight().detach()
        assert torch.equal(a.base.weight, w0[path])  # W0 untouched
        assert torch.allclose(a.B.t() @ a.B, torch.eye(R), atol=1e-5)
        assert torch.allclose(a.A @ a.A.t(), torch.eye(R), atol=1e-5)
        if tol is not None:
            assert torch.allclose(got, best, atol=tol)
        else:  # randomised: within a few % of the Eckart–Young optimum
            assert (dw - got).norm() <= 1.05 * S[R:].norm() + 1e-6


def test_only_core_trains_and_bases_are_saved(tmp_path):
    m, _, _ = _setup()
    trainable = [p for p in m.parameters() if p.requires_grad]
    assert len(trainable) == 2 and all(p.numel() == R * R for p in trainable)
    with torch.no_grad():
        for p in trainable:
            p.add_(torch.randn_like(p) * 0.1)
    x = torch.randn(4, 12)
    out = m(x)
    lorakit.save_adapter(m, tmp_path / "a")
    torch.manual_seed(0)
    fresh = MLP()
    lorakit.load_adapter(fresh, tmp_path / "a")  # no calibration needed: the bases are in the file
    assert torch.allclose(fresh(x), out, atol=1e-6)


def test_needs_calibration():
    torch.manual_seed(0)
    with pytest.raises(lorakit.ConfigError):
        lorakit.attach(MLP(), {"method": "lora_sb", "targets": ["lin0"], "r": 2})
