"""Horizontal fusion of LoRA's down-projections at inference (issue 23, item 3): the siblings that read one input
share one GEMM, learned from the calls (q/k/v, gate/up), with the unfused outputs; anything else is unchanged."""
from __future__ import annotations

import torch

import lorakit
from lorakit.fusion import DownGroup

from conftest import tiny_llama


def _model(method="lora", **kw):
    torch.manual_seed(0)
    m = tiny_llama()
    lorakit.attach(m, {"method": method, "targets": "all-linear", "r": 4, "alpha": 8, "seed": 0, **kw})
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for n, p in m.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return m.eval()


def _groups(m):
    return {id(g): g for _, a in lorakit.inject.adapters(m) if (g := a.__dict__.get("_fuse")) is not None}.values()


def test_siblings_reading_one_input_share_one_gemm_with_the_unfused_outputs():
    m = _model()
    x = torch.randint(0, 64, (2, 7))
    with torch.enable_grad():
        ref = m(x).logits.detach()  # autograd on: every adapter runs its own x·Aᵀ
    with torch.no_grad():
        first = m(x).logits  # learns which siblings share their input
        calls = []
        orig = torch.nn.functional.linear

        def spy(inp, w, b=None):
            calls.append(tuple(w.shape))
            return orig(inp, w, b)

        torch.nn.functional.linear = spy
        try:
            fused = m(x).logits
        finally:
            torch.nn.functional.linear = orig
    torch.testing.assert_close(first, ref, rtol=0, atol=0)
    torch.testing.assert_close(fused, ref, rtol=1e-6, atol=1e-6)
    names = {id(a): p.rsplit(".", 1)[1] for p, a in lorakit.inject.adapters(m)}
    runs = set()
    for g in _groups(m):
        assert g.runs is not None
        runs |= {tuple(names[id(a)] for a in r.members) for r in g.runs.values() if r is not None}
    assert runs == {("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj")}
    layers = m.config.num_hidden_layers
    r = 4
    assert calls.count((3 * r, m.config.hidden_size)) == layers  # one stacked [A_q; A_k; A_v] GEMM per block
    assert calls.count((2 * r, m.config.hidden_size)) == layers  # one [A_gate; A_up] GEMM per MLP
    assert calls.count((r, m.config.hidden_size)) == layers  # o_proj alone
    assert calls.count((r, m.config.intermediate_size)) == layers  # down_proj alone


def test_a_member_called_with_another_input_computes_its_own():
    a, b = torch.nn.Linear(6, 4), torch.nn.Linear(6, 4)
    ad = [type("A", (), {})() for _ in range(2)]
    for obj, lin in zip(ad, (a, b)):
        obj.lora_A = lin
    g = DownGroup(ad)
    x, z = torch.randn(3, 6), torch.randn(3, 6)
    with torch.no_grad():
        g.down(ad[0], x), g.down(ad[1], x)  # first pass: the plan
        g.down(ad[0], x)  # a second pass begins: fused from here
        assert g.runs[ad[0]] is g.runs[ad[1]]
        torch.testing.assert_close(g.down(ad[1], z), torch.nn.functional.linear(z, b.weight))  # not the fused x
        h0 = g.down(ad[0], x)
        x.add_(1.0)  # the shared input changed in place: no stale slice
        torch.testing.assert_close(g.down(ad[1], x), torch.nn.functional.linear(x, b.weight))
        assert h0.shape == (3, 4)


def test_merge_unmerge_and_training_are_unchanged():
    m = _model()
    x = torch.randint(0, 64, (2, 7))
    with torch.no_grad():
        m(x), m(x)
        unmerged = m(x).logits
        with lorakit.merged(m):
            merged = m(x).logits
    torch.testing.assert_close(merged, unmerged, rtol=1e-5, atol=1e-5)
    m.train()
    loss = m(x, labels=x).loss  # autograd: separate GEMMs, gradients reach every A
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for n, p in m.named_parameters() if "lora_A" in n)


def test_methods_with_their_own_forward_do_not_fuse():
    m = _model("dora")
    x = torch.randint(0, 64, (2, 7))
    with torch.no_grad():
        m(x), m(x)
    assert all(g.runs is None for g in _groups(m))  # grouped (inherited share) but never asked: DoRA's own forward
