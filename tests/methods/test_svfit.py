"""SVFit mechanism: ΔW only rescales the top-r singular values of W0 (singular vectors and the tail untouched)."""
import torch

import lorakit
from conftest import MLP

R = 3


def test_delta_only_rescales_top_singular_values(tmp_path):
    torch.manual_seed(0)
    m = MLP()
    w0 = {n: m.get_submodule(n).weight.detach().clone() for n in ("lin0", "lin1")}
    lorakit.attach(m, {"method": "svfit", "targets": ["lin0", "lin1"], "r": R})
    trainable = [p for p in m.parameters() if p.requires_grad]
    assert len(trainable) == 2 and all(p.numel() == R for p in trainable)  # r parameters per module
    x = torch.randn(8, 12)
    with lorakit.disabled(m):
        base = m(x)
    assert torch.allclose(m(x), base, atol=1e-6)  # σ̃ = σ_r at init
    opt = torch.optim.SGD(trainable, lr=0.5)
    for _ in range(5):
        opt.zero_grad()
        m(x).pow(2).mean().backward()
        opt.step()
    for path, a in lorakit.adapters(m):
        W = w0[path]
        U, S, Vh = torch.linalg.svd(W, full_matrices=False)
        new = W + a.delta_weight().detach()
        core = U.t() @ new @ Vh.t()  # W0's singular bases diagonalise W0 + ΔW
        expect = S.clone()
        expect[:R] = a.svfit_sigma.detach()
        assert torch.allclose(core, torch.diag(expect), atol=1e-5)
        assert not torch.allclose(expect[:R], S[:R], atol=1e-4)  # it did train
        assert torch.allclose(a.lowrank().B @ a.lowrank().A, a.delta_weight(), atol=1e-6)
    out = m(x)
    lorakit.save_adapter(m, tmp_path / "a")
    torch.manual_seed(0)
    fresh = MLP()
    lorakit.load_adapter(fresh, tmp_path / "a")  # bases rebuilt from W0, σ̃ from the file
    assert torch.allclose(fresh(x), out, atol=1e-6)
