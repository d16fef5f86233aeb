"""CorDA mechanism: W0 = U S Vᵀ exactly; IPM/KPM adapters carry the largest/smallest covariance-weighted
components; the residual is exact; loading rebuilds it without data; the as_lora form loads in PEFT."""
import pytest
import torch

import lorakit
from conftest import MLP
from lorakit.methods.corda import damped_inverse

X = torch.randn(64, 12, generator=torch.Generator().manual_seed(3)) * torch.linspace(0.2, 3, 12)


def _attach(mode, r=3, **kw):
    torch.manual_seed(0)
    m = MLP()
    w0 = m.lin0.weight.detach().clone()
    stats = lorakit.calibrate(m, ["lin0"], [X[:32], X[32:]], "activations")
    lorakit.attach(m, {"method": "corda", "targets": ["lin0"], "r": r, "alpha": 2 * r, "mode": mode, **kw},
                   calibration=[X[:32], X[32:]])
    return m, w0, stats["lin0"]["cov"]


@pytest.mark.parametrize("mode", ["ipm", "kpm"])
def test_adapter_spans_the_selected_covariance_weighted_directions(mode):
    m, w0, C = _attach(mode)
    a = m.lin0.adapters["default"]
    Ch, _ = damped_inverse(C)
    wres = m.lin0.base_layer.weight.detach()
    dw = a.delta_weight().detach()
    assert torch.allclose(wres + dw, w0, atol=1e-5)  # exact residual
    s_all = torch.linalg.svdvals(w0 @ Ch)
    s_ad = torch.linalg.svdvals(dw @ Ch)[:3]
    s_res = torch.linalg.svdvals(wres @ Ch)
    sel, rest = (s_all[:3], s_all[3:]) if mode == "ipm" else (s_all[-3:], s_all[:-3])
    assert torch.allclose(s_ad, sel, rtol=1e-4, atol=1e-5)
    assert torch.allclose(s_res[: len(rest)], rest, rtol=1e-4, atol=1e-5)
    # W0 = U S Vᵀ: the (ipm) complementary parts add up to W0 Ĉ
    assert torch.allclose((wres + dw) @ Ch, w0 @ Ch, atol=1e-4)


def test_ipm_and_kpm_are_complementary_ends():
    m1, w0, _ = _attach("ipm", r=6)
    m2, _, _ = _attach("kpm", r=6)  # 6 + 6 = d_in: together they rebuild W0
    d1 = m1.lin0.adapters["default"].delta_weight().detach()
    d2 = m2.lin0.adapters["default"].delta_weight().detach()
    assert torch.allclose(d1 + d2, w0, atol=1e-4)


def test_load_rebuilds_residual_without_data_and_as_lora_loads_in_peft(tmp_path):
    m, w0, _ = _attach("ipm")
    with torch.no_grad():
        m.lin0.adapters["default"].lora_B.weight.add_(0.1)
    x = torch.randn(5, 12)
    out = m(x).detach()
    lorakit.save_adapter(m, tmp_path / "a")
    lorakit.save_adapter(m, tmp_path / "lora", as_lora=True)
    torch.manual_seed(0)
    fresh = MLP()
    lorakit.load_adapter(fresh, tmp_path / "a")  # no calibration data needed
    assert torch.allclose(fresh(x), out, atol=1e-5)
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    pm = peft.PeftModel.from_pretrained(MLP(), str(tmp_path / "lora"))
    assert torch.allclose(pm(x), out, atol=1e-5)
