"""LQ-LoRA mechanism: the alternating decomposition W ≈ Q + L1L2 (non-increasing error, beats plain quantisation,
s·BA = L1L2 at init), deterministic reload, the Fisher-weighted variant and the budgeted bit allocation."""
from __future__ import annotations

import torch

import lorakit
from lorakit.methods._quant import allocate, budget_overrides, fake_quant, lq_decompose
from lorakit.quant import QuantConfig, bits_per_weight

from conftest import MLP


def _w(d_out=32, d_in=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    # a low-rank part plus noise: the regime where LQ beats quantising W alone
    return torch.randn(d_out, 4, generator=g) @ torch.randn(4, d_in, generator=g) + 0.3 * torch.randn(d_out, d_in, generator=g)


def test_decomposition_invariants():
    W, cfg = _w(), QuantConfig(bits=3, block=16)
    Q, L1, L2, errs = lq_decompose(W, 4, cfg, iters=30)
    assert all(b <= a for a, b in zip(errs, errs[1:])) and len(errs) >= 2
    assert abs((W - Q - L1 @ L2).norm().item() - errs[-1]) < 1e-4
    assert errs[-1] < (W - fake_quant(W, cfg)).norm().item()


def test_adapter_init_reload_and_product(tmp_path):
    torch.manual_seed(0)
    m = MLP()
    W0 = m.lin1.weight.detach().clone()
    cfg = {"method": "lq_lora", "targets": ["lin1"], "r": 4, "alpha": 8, "bits": 3, "block": 16, "iters": 10}
    lorakit.attach(m, cfg)
    a = m.lin1.adapters["default"]
    _, L1, L2, errs = lq_decompose(W0, 4, QuantConfig(bits=3, block=16), 10)
    assert torch.allclose(a.scale * a.B @ a.A, L1 @ L2, atol=1e-5)  # s·BA == L1L2
    Q = m.lin1.base_layer.weight.detach().clone()
    assert torch.equal(Q, fake_quant(W0 - a.scale * a.B0 @ a.A0, QuantConfig(bits=3, block=16)))
    assert (W0 - Q - a.delta_weight()).norm() < (W0 - fake_quant(W0, QuantConfig(bits=3, block=16))).norm()
    with torch.no_grad():
        a.lora_A.weight.add_(0.1)
    lorakit.save_adapter(m, tmp_path / "a")
    torch.manual_seed(0)
    fresh = MLP()
    lorakit.load_adapter(fresh, tmp_path / "a")
    assert torch.equal(fresh.lin1.base_layer.weight, Q)  # the residual is rebuilt bit-exactly, without data
    x = torch.randn(3, 12)
    assert torch.allclose(fresh(x), m(x), atol=1e-6)


def test_fisher_weighting_lowers_the_weighted_error():
    W = _w(seed=1)
    g = torch.Generator().manual_seed(2)
    F = torch.rand(32, 1, generator=g).pow(4) * 100 @ torch.rand(1, 64, generator=g).pow(4)  # rank-1, skewed
    cfg = QuantConfig(bits=2, block=16)
    Qf, L1f, L2f, _ = lq_decompose(W, 4, cfg, 10, fisher=F)
    Qp, L1p, L2p, _ = lq_decompose(W, 4, cfg, 10)
    werr = lambda Q, L1, L2: (F * (W - Q - L1 @ L2) ** 2).sum()  # noqa: E731
    assert werr(Qf, L1f, L2f) < werr(Qp, L1p, L2p)


def test_budgeted_allocation():
    mats = {"easy": _w(seed=3) * 0.1, "hard": _w(seed=4) * 3.0 + torch.randn(32, 64)}
    configs = [QuantConfig(bits=b, block=64) for b in (2, 3, 4, 8)]
    n = sum(w.numel() for w in mats.values())
    errs = []
    for budget in (3.2, 4.2, 8.2):
        plan = allocate(mats, 2, budget, configs, iters=3)
        assert sum(bits_per_weight(plan[p]) * w.numel() for p, w in mats.items()) <= budget * n + 1e-6
        errs.append(sum(lq_decompose(w, 2, plan[p], 3)[3][-1] ** 2 for p, w in mats.items()))
    assert errs[0] >= errs[1] >= errs[2]
    plan = allocate(mats, 2, 3.2, configs, iters=3)
    assert plan["hard"].bits > plan["easy"].bits  # bits go where they buy the most error
    torch.manual_seed(0)
    ov = budget_overrides(MLP(), ["lin0", "lin1"], 3.2, r=2, iters=2)
    m = lorakit.attach(MLP(), {"method": "lq_lora", "targets": ["lin0", "lin1"], "r": 2, "iters": 2, "overrides": ov})
    assert m.lin0.adapters["default"].cfg.bits == ov["lin0"]["bits"]
