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


def test_gate_loss_is_one_masked_mean_ce_over_all_modules():
    E, coef = 3, 50.0
    m = attached("meteora", r=2, num_experts=E, aux_coef=coef)
    fill(m)
    m.train()
    xi = x()
    tasks = torch.tensor([0, 2, 1, 1, 0, 2])
    mask = torch.ones(6, 5, dtype=torch.long)
    mask[1, 3:] = 0  # right padding
    mask[4, 1:] = 0
    seen = {}
    hooks = [h.register_forward_hook(lambda mod, a, out, p=p: seen.__setitem__(p, a[0].detach()))
             for p, h in lorakit.hosts(m)]
    with lorakit.batch_context(m, task_ids=tasks, attention_mask=mask):
        m(xi)
        got = lorakit.extra_loss(m)
    for h in hooks:
        h.remove()
    # official, independently: the gate of each module is a bias-free linear map of that module's input
    adapters = dict(lorakit.adapters(m))
    labels = tasks[:, None].expand(6, 5).masked_fill(mask == 0, -100)
    all_logits, all_labels = [], []
    for p in ("lin0", "lin1"):
        logits = seen[p] @ adapters[p].router.weight.detach().T  # (6, 5, E)
        all_logits.append(logits[:, :-1, :].reshape(-1, E))
        all_labels.append(labels[:, 1:].reshape(-1))
    ref = coef * F.cross_entropy(torch.cat(all_logits), torch.cat(all_labels), ignore_index=-100)
    torch.testing.assert_close(got.detach(), ref)
    # not the old reduction (a per-module CE summed over modules, padding supervised)
    old = sum(coef * F.cross_entropy((seen[p] @ adapters[p].router.weight.detach().T).reshape(-1, E),
                                     tasks[:, None].expand(6, 5).reshape(-1)) for p in ("lin0", "lin1"))
    assert not torch.allclose(got.detach(), old)
    assert got.requires_grad


def test_gate_loss_per_token_labels_and_bounds():
    m = attached("meteora", r=2, num_experts=3, aux_coef=1.0)
    fill(m)
    m.train()
    tasks = torch.tensor([0, 2, 1, 1, 0, 2])
    mask = torch.ones(6, 5, dtype=torch.long)
    mask[2, 2:] = 0
    with lorakit.batch_context(m, task_ids=tasks, attention_mask=mask):
        m(x())
        a = lorakit.extra_loss(m).detach()
    tok = tasks[:, None].expand(6, 5).masked_fill(mask == 0, -100)  # official per-token gate labels
    with lorakit.batch_context(m, task_ids=tok):
        m(x())
        b = lorakit.extra_loss(m).detach()
    torch.testing.assert_close(a, b)
    import pytest
    from lorakit.errors import ConfigError
    with pytest.raises(ConfigError, match="task_ids"):
        with lorakit.batch_context(m, task_ids=torch.tensor([0, 3, 1, 1, 0, 2])):
            pass
