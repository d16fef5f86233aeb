"""QLoRA mechanism: the frozen base is exactly dequant(NF4(W)) (simulated on a float base, stored on a quantised
one), the init output equals dequant(W_q)x, and reloading rebuilds the same base."""
from __future__ import annotations

import torch

import lorakit
from lorakit import quant, quant_model
from lorakit.quant import QuantLinear

from conftest import MLP


def _x():
    return torch.randn(5, 12, generator=torch.Generator().manual_seed(3))


def test_float_base_becomes_dequantised_nf4(tmp_path):
    torch.manual_seed(0)
    m = MLP()
    w0 = m.lin1.weight.detach().clone()
    ref = QuantLinear.from_linear(m.lin1).weight  # what a stored NF4+DQ base dequantises to
    lorakit.attach(m, {"method": "qlora", "targets": ["lin0", "lin1"], "r": 4, "dropout": 0.0})
    assert torch.equal(m.lin1.base_layer.weight, ref)
    # the LoRA init output equals dequant(W_q)x (B = 0)
    q = MLP()
    q.load_state_dict({k.replace("base_layer.", ""): v for k, v in m.state_dict().items() if "adapters" not in k})
    assert torch.equal(m(_x()), q(_x()))
    lorakit.save_adapter(m, tmp_path / "a")
    torch.manual_seed(0)
    fresh = MLP()
    lorakit.load_adapter(fresh, tmp_path / "a")
    assert torch.equal(fresh.lin1.base_layer.weight, ref)
    lorakit.detach(m)
    assert torch.equal(m.lin1.weight, w0)


def test_quantised_base_is_left_alone_and_init_is_noop():
    torch.manual_seed(0)
    m = quant_model.quantize_model(MLP(), ["lin0", "lin1"])
    codes = m.lin1.codes.clone()
    y0 = m(_x()).detach()
    lorakit.attach(m, {"method": "qlora", "targets": ["lin0", "lin1"], "r": 4, "dropout": 0.0})
    assert torch.equal(m.lin1.base_layer.codes, codes)
    assert torch.equal(m(_x()), y0)
    n_lora = sum(p.numel() for p in m.parameters() if p.requires_grad)
    assert n_lora == 4 * (12 + 16) + 4 * (16 + 16)
