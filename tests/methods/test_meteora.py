import torch
import torch.nn.functional as F

import lorakit
from lorakit.methods._mixture import export_expert, load_lora_experts
from _moe import attached, fill, x


def test_onehot_gate_equals_single_lora_and_export(tmp_path):
    from conftest import MLP

    loras = []
    for t in range(3):  # three task LoRAs
        torch.manual_seed(0)
        mm = MLP()
        lorakit.attach(mm, {"method": "lora", "targets": ["lin0", "lin1"], "r": 2, "alpha": 4.0, "seed": t})
        fill(mm, seed=10 + t)
        lorakit.save_adapter(mm, tmp_path / f"t{t}")
        loras.append(mm)
    m = attached("meteora", r=2, num_experts=3, top_k=1)
    load_lora_experts(m, [tmp_path / f"t{t}" for t in range(3)])
    for _, a in lorakit.adapters(m):
        with torch.no_grad():
            a.router.weight.zero_()
            a.router.weight[1] = 0.0
    xi = x().abs()
    for _, a in lorakit.adapters(m):
        with torch.no_grad():
            a.router.weight[1] = 100.0  # positive inputs -> task 1 always selected
    m.eval()
    torch.testing.assert_close(m(xi), loras[1](xi), rtol=1e-4, atol=1e-4)
    export_expert(m, tmp_path / "e1", 1)
    torch.manual_seed(0)
    fresh = MLP()
    lorakit.load_adapter(fresh, tmp_path / "e1")
    torch.testing.assert_close(fresh(xi), loras[1](xi), rtol=1e-4, atol=1e-4)


def test_gate_supervision_loss():
    m = attached("meteora", r=2, num_experts=3, aux_coef=2.0)
    fill(m)
    m.train()
    t = torch.tensor([0, 2, 1, 1, 0, 2])
    with lorakit.batch_context(m, task_ids=t):
        m(x())
    a = dict(lorakit.adapters(m))["lin0"]
    lg = a._logits.detach()
    ref = 2.0 * F.cross_entropy(lg.reshape(-1, 3), t[:, None].expand(6, 5).reshape(-1))
    torch.testing.assert_close(a.extra_loss().detach(), ref)
