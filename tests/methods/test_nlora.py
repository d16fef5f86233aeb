"""SLoRA / NLoRA / IntTune mechanisms: Nyström identity, code-semantics init, residual option, what trains."""
import torch
from safetensors.torch import load_file

import lorakit
from lorakit.methods.nlora import nystrom_factors
from conftest import MLP

R = 3


def _mlp(method, **opts):
    torch.manual_seed(0)
    m = MLP()
    w0 = {n: m.get_submodule(n).weight.detach().clone() for n in ("lin0", "lin1")}
    lorakit.attach(m, {"method": method, "targets": ["lin0", "lin1"], "r": R, "seed": 0, **opts})
    return m, w0


def test_nystrom_identity_on_a_rank_r_matrix():
    g = torch.Generator().manual_seed(0)
    W = torch.randn(20, R, generator=g) @ torch.randn(R, 15, generator=g)
    A, N, B = nystrom_factors(W, R, "pinv")
    assert torch.allclose(B @ N @ A, W, atol=1e-4)
    A, N, B = nystrom_factors(W, R, "raw")  # the released code: N = W[:r,:r] itself
    assert torch.allclose(B @ N @ A, W[:, :R] @ W[:R, :R] @ W[:R, :], atol=1e-5)


def test_nlora_code_init_and_all_factors_train():
    m, w0 = _mlp("nlora")
    for path, a in lorakit.adapters(m):
        W = w0[path]
        assert torch.equal(a.base.weight, W)  # not residualised (released code)
        assert torch.allclose(a.delta_weight(), W[:, :R] @ W[:R, :R] @ W[:R, :] * a.scale, atol=1e-6)
    names = {n.rsplit(".", 2)[-2] for n, p in m.named_parameters() if p.requires_grad}
    assert names == {"lora_A", "lora_N", "lora_B"}


def test_nlora_pinv_residual_preserves_output():
    m, w0 = _mlp("nlora", middle="pinv", residual=True)
    x = torch.randn(5, 12)
    out = m(x)
    lorakit.detach(m)
    assert torch.allclose(m(x), out, atol=1e-4)


def test_slora_noop_init():
    m, _ = _mlp("slora")
    x = torch.randn(5, 12)
    with lorakit.disabled(m):
        base = m(x)
    assert torch.equal(m(x), base)
    assert all(a.N.abs().sum() > 0 and a.B.abs().sum() == 0 for _, a in lorakit.adapters(m))


def test_inttune_only_the_middle_matrix_trains(tmp_path):
    m, _ = _mlp("inttune")
    trainable = [(n, p) for n, p in m.named_parameters() if p.requires_grad]
    assert [n.rsplit(".", 2)[-2] for n, _ in trainable] == ["lora_N", "lora_N"]
    assert all(p.numel() == R * R for _, p in trainable)
    before = {path: (a.A.clone(), a.B.clone(), a.N.clone()) for path, a in lorakit.adapters(m)}
    opt = torch.optim.SGD([p for _, p in trainable], lr=0.1)
    x = torch.randn(8, 12)
    for _ in range(3):
        opt.zero_grad()
        m(x).pow(2).mean().backward()
        opt.step()
    for path, a in lorakit.adapters(m):
        A, B, N = before[path]
        assert torch.equal(a.A, A) and torch.equal(a.B, B) and not torch.equal(a.N, N)
    out = m(x)
    lorakit.save_adapter(m, tmp_path / "a")
    assert all(k.endswith("lora_N.weight") for k in load_file(str(tmp_path / "a" / "adapter_model.safetensors")))
    torch.manual_seed(0)
    fresh = MLP()
    lorakit.load_adapter(fresh, tmp_path / "a")
    assert torch.allclose(fresh(x), out, atol=1e-6)
