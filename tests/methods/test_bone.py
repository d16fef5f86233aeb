"""Bone mechanism: ΔW_ij = W_ij M_i + M_i per r×r block (reference loop), the forward uses W + ΔW, and the
block matrices are PEFT's MiSS "bat" (same logits from the same miss_block)."""
import pytest
import torch

import lorakit
from conftest import MLP, run


def test_block_formula_vs_loop():
    torch.manual_seed(0)
    m = MLP()
    lorakit.attach(m, {"method": "bone", "targets": ["lin0"], "r": 4})
    a = dict(lorakit.adapters(m))["lin0"]
    with torch.no_grad():
        a.miss_block.normal_()
    W = m.lin0.base_layer.weight.detach()
    ref = torch.zeros_like(W)
    for i in range(W.shape[0] // 4):
        for j in range(W.shape[1] // 4):
            Wij = W[4 * i:4 * i + 4, 4 * j:4 * j + 4]
            ref[4 * i:4 * i + 4, 4 * j:4 * j + 4] = Wij @ a.miss_block[i] + a.miss_block[i]
    assert torch.allclose(a.delta_weight(), ref, atol=1e-6)
    x = torch.randn(3, 12)
    assert torch.allclose(m.lin0(x), x @ (W + ref).T + m.lin0.base_layer.bias, atol=1e-5)


def test_bad_r_is_an_error():
    with pytest.raises(lorakit.LorakitError, match="dividing"):
        lorakit.attach(MLP(), {"method": "bone", "targets": ["lin0"], "r": 5})


def test_same_as_peft_bat(tmp_path):
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    pm = peft.get_peft_model(MLP(), peft.MissConfig(r=2, init_weights="bat", target_modules=["lin0", "lin1"]))
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "miss_block" in n:
                p.normal_(std=0.1)
    pm.save_pretrained(str(tmp_path))
    fresh = MLP()
    fresh.load_state_dict({k.replace(".base_layer", ""): v for k, v in pm.get_base_model().state_dict().items()
                           if "miss_" not in k})
    lorakit.load_adapter(fresh, tmp_path)
    x = torch.randn(5, 12)
    assert torch.allclose(run(fresh, x), pm(x), atol=1e-5)
