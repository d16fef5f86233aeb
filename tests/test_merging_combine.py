"""lorakit.combine on tiny models: exactness in delta space, PEFT's factor space against its formula written out,
any low-rank method with any other, files, and refusals before anything changes."""
from __future__ import annotations

import pytest
import torch

import lorakit
from lorakit.errors import ConfigError, MergeError
from lorakit.inject import adapters as adapters_of

from conftest import MLP


def _model_with(specs, seed=0):
    torch.manual_seed(seed)
    m = MLP().eval()
    for i, (name, cfg) in enumerate(specs):
        lorakit.attach(m, {"targets": ["lin0", "lin1", "out"], "seed": 10 + i, **cfg}, name)
        with torch.no_grad():  # non-zero updates
            g = torch.Generator().manual_seed(100 + i)
            for _, a in adapters_of(m, name):
                for p in a.parameters():
                    p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return m


def _dw(m, name):
    return {p: a.delta_weight().detach().double() for p, a in adapters_of(m, name)}


def _lora(m, name):
    return {p: (a.A.detach().double(), a.B.detach().double(), float(a.scale)) for p, a in adapters_of(m, name)}


SPECS = [("a", {"method": "lora", "r": 2, "alpha": 4}), ("b", {"method": "lora", "r": 3, "alpha": 3, "rslora": True})]


def test_cat_reproduces_the_weighted_sum_of_updates_exactly():
    m = _model_with(SPECS)
    da, db = _dw(m, "a"), _dw(m, "b")
    lorakit.combine(m, ["a", "b"], [0.7, -1.2], method="cat", name="c")
    dc = _dw(m, "c")
    for p in da:
        torch.testing.assert_close(dc[p], 0.7 * da[p] - 1.2 * db[p], atol=1e-6, rtol=1e-6)
        assert lorakit.attachment(m, "c").method_config(p).r == 5  # rank Σr
    # and the model computes it: the combined adapter alone == both sources active with their weights folded
    x = torch.randn(4, 12)
    y = m(x)
    lorakit.set_active(m, ["a"])
    ya = m(x)
    with lorakit.disabled(m):
        y0 = m(x)
    assert not torch.allclose(y, y0) and not torch.allclose(y, ya)


def test_linear_in_delta_space_is_exact_and_svd_truncates():
    m = _model_with(SPECS)
    da, db = _dw(m, "a"), _dw(m, "b")
    lorakit.combine(m, ["a", "b"], [1.0, 0.5], method="linear", name="lin", lam=0.8)
    lorakit.combine(m, ["a", "b"], [1.0, 0.5], method="svd", rank=2, name="s2")
    for p in da:
        want = 0.8 * (da[p] + 0.5 * db[p])
        torch.testing.assert_close(_dw(m, "lin")[p], want, atol=1e-6, rtol=1e-6)
        want = want / 0.8  # the svd merge has lambda 1
        s = torch.linalg.svdvals(want)
        err = float((_dw(m, "s2")[p] - want).norm())
        assert abs(err - float(s[2:].norm())) < 1e-4  # the best rank-2 approximation


def test_factor_space_is_peft_formula_with_cross_terms():
    specs = [("a", {"method": "lora", "r": 3, "alpha": 6}), ("b", {"method": "lora", "r": 3, "alpha": 3})]
    m = _model_with(specs)
    la, lb = _lora(m, "a"), _lora(m, "b")
    w = [0.9, -0.6]
    lorakit.combine(m, ["a", "b"], w, method="linear", space="factors", name="pf")
    lorakit.combine(m, ["a", "b"], w, method="linear", name="ex")
    for p in la:
        (Aa, Ba, sa), (Ab, Bb, sb) = la[p], lb[p]
        ca, cb = w[0] * sa, w[1] * sb
        A = (abs(ca) ** 0.5) * (1 if ca >= 0 else -1) * Aa + (abs(cb) ** 0.5) * (1 if cb >= 0 else -1) * Ab
        B = abs(ca) ** 0.5 * Ba + abs(cb) ** 0.5 * Bb
        torch.testing.assert_close(_dw(m, "pf")[p], B @ A, atol=1e-6, rtol=1e-6)
        # the exact merge differs from it by the cross terms
        exact = ca * Ba @ Aa + cb * Bb @ Ab
        torch.testing.assert_close(_dw(m, "ex")[p], exact, atol=1e-6, rtol=1e-6)
        assert float((B @ A - exact).norm()) > 1e-3


def test_ties_on_one_adapter_full_density_full_rank_is_w_times_it():
    m = _model_with(SPECS[:1])
    da = _dw(m, "a")
    lorakit.combine(m, ["a"], [0.4], method="ties", density=1.0, rank="full", name="t")
    for p in da:
        torch.testing.assert_close(_dw(m, "t")[p], 0.4 * da[p], atol=1e-6, rtol=1e-6)


def test_any_lowrank_method_merges_with_any_other():
    specs = [("lo", {"method": "lora", "r": 2}), ("ve", {"method": "vera", "r": 4}),
             ("do", {"method": "dora", "r": 2})]
    m = _model_with(specs)
    want = {p: _dw(m, "lo")[p] + _dw(m, "ve")[p] for p in _dw(m, "lo")}
    lorakit.combine(m, ["lo", "ve"], method="cat", name="c")
    for p in want:
        torch.testing.assert_close(_dw(m, "c")[p], want[p], atol=1e-5, rtol=1e-5)
    # DoRA has no pure low-rank form (a magnitude): its update W' - W enters through the delta space
    W = {p: a.base_matrix().detach().double() for p, a in adapters_of(m, "do")}
    ddo = {p: a.merge(W[p].float().clone()).double() - W[p] for p, a in adapters_of(m, "do")}
    lorakit.combine(m, ["lo", "do"], [1.0, 2.0], method="linear", name="ld")
    for p in want:
        torch.testing.assert_close(_dw(m, "ld")[p], _dw(m, "lo")[p] + 2 * ddo[p], atol=1e-5, rtol=1e-5)


def test_combined_adapter_saves_as_a_peft_lora_and_reloads(tmp_path):
    m = _model_with(SPECS)
    lorakit.combine(m, ["a", "b"], [1.0, 1.0], method="ties", density=0.5, rank=2, name="t")
    x = torch.randn(3, 12)
    lorakit.set_active(m, ["t"])
    y = m(x)
    lorakit.save_adapter(m, tmp_path / "t", "t")
    import json

    conf = json.loads((tmp_path / "t" / "adapter_config.json").read_text())
    assert conf["peft_type"] == "LORA" and conf["r"] == 2 and conf["lora_alpha"] == 2
    torch.manual_seed(0)
    fresh = MLP().eval()
    fresh.load_state_dict({k.replace(".base_layer", ""): v for k, v in m.state_dict().items() if "lora" not in k})
    lorakit.load_adapter(fresh, tmp_path / "t")
    torch.testing.assert_close(fresh(x), y)


def test_refusals_change_nothing():
    m = _model_with(SPECS)
    before = set(lorakit.attached(m))
    with pytest.raises(ConfigError, match="density"):
        lorakit.combine(m, ["a", "b"], method="ties")
    with pytest.raises(ConfigError, match="no adapter named"):
        lorakit.combine(m, ["a", "zz"])
    with pytest.raises(ConfigError, match="2 adapters but 1 weights"):
        lorakit.combine(m, ["a", "b"], [1.0])
    with pytest.raises(MergeError, match="equal ranks"):
        lorakit.combine(m, ["a", "b"], method="linear", space="factors")
    with pytest.raises(ConfigError, match="unknown merge method"):
        lorakit.combine(m, ["a", "b"], method="slerp")
    with pytest.raises(ConfigError, match="already attached"):
        lorakit.combine(m, ["a", "b"], name="a")
    assert set(lorakit.attached(m)) == before


def test_unmergeable_and_base_changing_adapters_are_refused():
    m = _model_with([("a", {"method": "lora", "r": 2}), ("p", {"method": "pissa", "r": 2})])
    with pytest.raises(MergeError, match="residual base"):
        lorakit.combine(m, ["a", "p"])
