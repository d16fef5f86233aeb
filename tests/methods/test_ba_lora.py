"""BA-LoRA mechanism: the teacher is the pretrained model (not the residual), L_cons = 0 at init, L_svd within
[−1, −k/n], and lorakit.output_loss equals λ1·L_cons + λ2·L_div + λ3·L_svd computed against a separate pretrained copy."""
import copy

import torch

import lorakit
from conftest import _ids, tiny_llama
from lorakit.methods.ba_lora import BALoRA, svd_ratio_loss


def _setup(**kw):
    m = tiny_llama()
    ref = copy.deepcopy(m)
    lorakit.attach(m, {"method": "ba_lora", "targets": "all-linear", "r": 2, **kw})
    return m, ref, {"input_ids": _ids(), "labels": _ids()}


def test_consistency_zero_at_init_and_teacher_is_pretrained():
    m, ref, batch = _setup(lambda2=0.0, lambda3=0.0)
    out = m(**batch)
    assert abs(float(lorakit.output_loss(m, out, batch))) < 1e-6
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for _, a in lorakit.adapters(m):
            a.lora_B.weight.add_(torch.randn(a.lora_B.weight.shape, generator=g) * 0.05)
    z_pre = ref(input_ids=batch["input_ids"]).logits
    assert torch.allclose(BALoRA.teacher_logits(m, "default", batch), z_pre, atol=1e-4)
    with lorakit.disabled(m):  # the residual base alone is NOT the pretrained model
        assert not torch.allclose(m(input_ids=batch["input_ids"]).logits, z_pre, atol=1e-3)
    assert not torch.allclose(m(**batch).logits, z_pre, atol=1e-3)  # the swap was undone


def test_output_loss_matches_formula():
    m, ref, batch = _setup(lambda1=0.5, lambda2=0.25, lambda3=2.0, k=3)
    with torch.no_grad():
        for _, a in lorakit.adapters(m):
            a.lora_A.weight.mul_(1.2)
    m.train()
    out = m(**batch)
    z, zp = out.logits, ref(input_ids=batch["input_ids"]).logits
    p, pp = z.softmax(-1), zp.softmax(-1)
    l_cons = (pp * (pp.log() - p.log())).sum() / z.shape[0]
    l_div = (p * p.log()).sum(-1).mean()
    s = torch.linalg.svdvals(z)
    l_svd = -(s[:, :3].sum(-1) / s.sum(-1)).mean()
    got = lorakit.output_loss(m, out, batch)
    assert torch.allclose(got, 0.5 * l_cons + 0.25 * l_div + 2.0 * l_svd, atol=1e-5)
    got.backward()
    assert all(p.grad is not None for _, a in lorakit.adapters(m) for p in a.parameters() if p.requires_grad)
    assert m.training


def test_svd_loss_bounds():
    g = torch.Generator().manual_seed(1)
    for shape, n in (((3, 7, 64), 7), ((5, 4), 4)):
        z = torch.randn(shape, generator=g)
        v = float(svd_ratio_loss(z, 3))
        assert -1 - 1e-6 <= v <= -3 / n + 1e-6
    rank1 = torch.ones(2, 6, 10)
    assert abs(float(svd_ratio_loss(rank1, 3)) + 1) < 1e-5  # all energy in σ_1 -> −1
