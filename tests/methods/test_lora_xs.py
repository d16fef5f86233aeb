"""LoRA-XS mechanism: only the r×r core trains, ΔW stays in span(U_r)·R·span(V_r), R = I gives the SVD truncation."""
import torch
from safetensors.torch import load_file

import lorakit
from conftest import MLP

R = 3


def _model(**opts):
    torch.manual_seed(0)
    m = MLP()
    w0 = {n: m.get_submodule(n).weight.detach().clone() for n in ("lin0", "lin1")}
    lorakit.attach(m, {"method": "lora_xs", "targets": ["lin0", "lin1"], "r": R, "seed": 0, **opts})
    return m, w0


def test_only_core_trains_and_delta_stays_in_svd_subspaces():
    m, w0 = _model()
    trainable = [(n, p) for n, p in m.named_parameters() if p.requires_grad]
    assert len(trainable) == 2 and all(p.numel() == R * R for _, p in trainable)
    opt = torch.optim.SGD([p for _, p in trainable], lr=0.5)
    x = torch.randn(16, 12, generator=torch.Generator().manual_seed(3))
    for _ in range(5):
        opt.zero_grad()
        m(x).pow(2).mean().backward()
        opt.step()
    for path, a in lorakit.adapters(m):
        dw = a.delta_weight().detach()
        assert dw.abs().max() > 1e-4  # it did train
        U, _, Vh = torch.linalg.svd(w0[path])
        Ur, Vr = U[:, :R], Vh[:R].t()
        proj = Ur @ Ur.t() @ dw @ Vr @ Vr.t()
        assert torch.allclose(proj, dw, atol=1e-5)
        assert torch.linalg.matrix_rank(dw, atol=1e-5) <= R
        assert torch.allclose(a.B.t() @ a.B, torch.eye(R), atol=1e-5)  # BᵀB = I


def test_identity_core_is_the_svd_truncation_and_base_untouched():
    m, w0 = _model()
    for path, a in lorakit.adapters(m):
        assert torch.equal(a.base.weight, w0[path])
        with torch.no_grad():
            a.lora_N.weight.copy_(torch.eye(R))
        U, S, Vh = torch.linalg.svd(w0[path])
        trunc = U[:, :R] @ torch.diag(S[:R]) @ Vh[:R]
        assert torch.allclose(a.delta_weight(), trunc, atol=1e-5)


def test_randomised_svd_and_zero_init_noop():
    m, _ = _model(niter=4, init_std=0.0)
    x = torch.randn(4, 12)
    with lorakit.disabled(m):
        base = m(x)
    assert torch.equal(m(x), base)


def test_file_holds_only_the_core_and_bases_are_rebuilt(tmp_path):
    m, _ = _model()
    with torch.no_grad():
        for _, a in lorakit.adapters(m):
            a.lora_N.weight.normal_()
    x = torch.randn(4, 12)
    out = m(x)
    lorakit.save_adapter(m, tmp_path / "a")
    keys = set(load_file(str(tmp_path / "a" / "adapter_model.safetensors")))
    assert keys and all(k.endswith("lora_N.weight") for k in keys)
    torch.manual_seed(0)
    fresh = MLP()
    lorakit.load_adapter(fresh, tmp_path / "a")
    assert torch.allclose(fresh(x), out, atol=1e-6)
